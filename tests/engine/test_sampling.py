import pytest
import torch

from llmudf.engine.params import SamplingParams
from llmudf.engine.sampling import Sampler

GREEDY = SamplingParams()


def logits_batch(rows=4, vocab=50, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def sample(logits, params, generators=None, allowed=None):
    n = logits.shape[0]
    tokens, _ = Sampler().sample(logits, params, generators or [None] * n, allowed or [None] * n)
    return tokens.tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(stop=[""]), "stop"),
        (dict(stop="end"), "stop"),
        (dict(choices=[]), "choices"),
        (dict(choices=["a", "a"]), "distinct"),
        (dict(choices=["a", ""]), "choices"),
    ],
)
def test_invalid_params_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = logits_batch()
    tokens, logprobs = Sampler().sample(logits, [GREEDY] * 4, [None] * 4, [None] * 4, True)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).max(-1).values
    torch.testing.assert_close(logprobs, expected)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    logits = logits_batch(rows=8)
    greedy = logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams(temperature=2.0, top_k=1)] * 8) == greedy
    assert sample(logits, [SamplingParams(temperature=1.0, top_p=1e-6)] * 8) == greedy


def test_top_k_keeps_only_the_k_best():
    logits = logits_batch(rows=1, vocab=20)
    top3 = set(logits[0].topk(3).indices.tolist())
    row = logits.expand(200, -1).contiguous()
    drawn = set(sample(row, [SamplingParams(temperature=5.0, top_k=3)] * 200))
    assert drawn <= top3 and len(drawn) > 1


def test_seeded_draws_do_not_depend_on_the_batch():
    logits = logits_batch(rows=5, vocab=30)
    params = SamplingParams(temperature=1.0, seed=7)

    def draw_row(i, batch_rows):
        gens = [torch.Generator().manual_seed(7) if r == i else None for r in batch_rows]
        ps = [params if r == i else SamplingParams(temperature=1.0) for r in batch_rows]
        out = sample(logits[batch_rows], ps, gens)
        return out[batch_rows.index(i)]

    alone = [draw_row(2, [2]) for _ in range(3)]
    mixed = draw_row(2, [4, 0, 2, 1])
    assert len(set(alone)) == 1 and mixed == alone[0]


def test_constraints_mask_everything_else():
    logits = logits_batch(rows=3, vocab=40)
    allowed = [[5, 9], None, [33]]
    params = [GREEDY, GREEDY, SamplingParams(temperature=1.0)]
    tokens = sample(logits, params, allowed=allowed)
    assert tokens[0] == max([5, 9], key=lambda t: logits[0, t])
    assert tokens[1] == logits[1].argmax().item()
    assert tokens[2] == 33
