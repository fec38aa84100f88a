import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmudf.calls.prompt import ChatPrompt
from llmudf.optimizer import estimate_cost, plan_call, prefix_hit_rate, prefix_hits


def byte_tokenize(texts):
    return [list(t.encode("utf-8")) for t in texts]


def naive_hits(seqs, window=None):
    hits = []
    for i, s in enumerate(seqs):
        earlier = seqs[max(0, i - window) : i] if window else seqs[:i]
        best = 0
        for e in earlier:
            n = 0
            while n < min(len(s), len(e)) and s[n] == e[n]:
                n += 1
            best = max(best, n)
        hits.append(best)
    return hits


def test_hand_computed_rates():
    assert prefix_hit_rate([]) == 0.0
    assert prefix_hit_rate(["abc"]) == 0.0
    assert prefix_hit_rate(["abc", "abc"]) == 0.5
    # "abd" shares 2 with "abc"; "xbc" shares nothing; "abc!" shares 3 with "abc"
    assert prefix_hit_rate(["abc", "xbc", "abd", "abc!"]) == pytest.approx(5 / 13)
    assert prefix_hit_rate(["abc", "xbc", "abd", "abc!"], window=1) == pytest.approx(2 / 13)
    assert prefix_hit_rate(["abc", "xbc", "abd", "abc!"], window=2) == pytest.approx(4 / 13)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.text(alphabet="ab\n", max_size=8), max_size=25), st.sampled_from([None, 1, 3]))
def test_hits_equal_brute_force(seqs, window):
    hits, lengths = prefix_hits(seqs, window=window)
    assert hits.tolist() == naive_hits(seqs, window)
    assert lengths.tolist() == [len(s) for s in seqs]


def test_tokens_and_rendered_prompt():
    prompts = ["Q\n\na: é", "Q\n\na: è"]
    chars = prefix_hit_rate(prompts)
    tokens = prefix_hit_rate(prompts, tokenize=byte_tokenize)
    assert chars == pytest.approx(6 / 14)
    assert tokens == pytest.approx(7 / 16)  # é and è share their first UTF-8 byte

    def render(user):
        return "<system>" + ChatPrompt(user).system + "</system><user>" + user

    rendered = prefix_hit_rate(prompts, render=render)
    head = len(render(""))
    assert rendered == pytest.approx((head + 6) / (2 * (head + 7)))
    with pytest.raises(ValueError, match="token ids"):
        prefix_hit_rate(["x"], tokenize=lambda texts: [[-1] for _ in texts])
    with pytest.raises(ValueError, match="window"):
        prefix_hit_rate(["x"], window=0)


def test_cost_estimate_counts_dedup_and_cache():
    df = pd.DataFrame({"lang": ["en", "en", "en", "fr"], "t": ["a", "a", "b", "c"]})
    plan = plan_call("Q", df)
    cost = estimate_cost(plan)
    lengths = [len(p) for p in plan.prompts]
    assert cost.unit == "chars"
    assert (cost.num_rows, cost.num_requests) == (4, 3)
    assert cost.prompt_units == sum(lengths)
    assert cost.prompt_units_without_dedup == sum(len(plan.prompts[j]) for j in plan.row_to_request)
    assert cost.cached_units == sum(naive_hits(plan.prompts))
    assert cost.computed_units == cost.prompt_units - cost.cached_units
    assert cost.prefix_hit_rate == pytest.approx(prefix_hit_rate(plan.prompts))
    assert 0 < cost.saving < 1
    tokens = estimate_cost(plan, tokenize=byte_tokenize)
    assert tokens.unit == "tokens" and tokens.prompt_units == sum(lengths)
