import pytest
import torch

from llmudf.engine.models import LlamaForCausalLM, build_model, tiny_config
from llmudf.engine.weights import load_model
from llmudf.kernels import AttentionMetadata


class PagedSequences:
    """Runs steps of a model over a paged KV cache; each step is {seq_id: new token ids}."""

    def __init__(self, model: LlamaForCausalLM, page_size: int = 4, num_pages: int = 128):
        cfg = model.config
        shape = (num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)
        self.model, self.page_size = model, page_size
        self.kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)]
        self.free_pages = torch.randperm(
            num_pages, generator=torch.Generator().manual_seed(0)
        ).tolist()
        self.lengths: dict[int, int] = {}
        self.pages: dict[int, list[int]] = {}

    def step(self, new_tokens: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        ids, positions, query_lens, seq_lens, tables = [], [], [], [], []
        for seq, tokens in new_tokens.items():
            start = self.lengths.get(seq, 0)
            self.lengths[seq] = start + len(tokens)
            pages = self.pages.setdefault(seq, [])
            while len(pages) * self.page_size < self.lengths[seq]:
                pages.append(self.free_pages.pop())
            ids += tokens
            positions += range(start, start + len(tokens))
            query_lens.append(len(tokens))
            seq_lens.append(self.lengths[seq])
            tables.append(pages)
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, self.page_size)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.kv_caches)
        logits = self.model.compute_logits(hidden).split(query_lens)
        return dict(zip(new_tokens, logits, strict=True))


def prompts(vocab: int = 259, lengths=(13, 6, 21), seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


VARIANTS = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
            "rope_theta": 500000.0,
        },
    ),
    "mistral": ("mistral", {}),
    "qwen2-bias": ("qwen2", {}),
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    "qwen3-qk-norm": ("qwen3", {}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, make_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    family, overrides = VARIANTS[variant]
    folder = make_tiny_model_dir(family, **overrides)
    model, config, _ = load_model(folder)
    assert config == tiny_config(family, **overrides)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batch = prompts()
    with torch.no_grad():
        ours = PagedSequences(model).step(dict(enumerate(batch)))
        for i, tokens in enumerate(batch):
            expected = reference(torch.tensor([tokens])).logits[0]
            assert expected.std() > 0.1  # random weights large enough to make the test bite
            torch.testing.assert_close(ours[i], expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_chunked_prefill_and_decode_equal_one_pass(family, make_tiny_model_dir):
    model, _, _ = load_model(make_tiny_model_dir(family))
    target, other_a, other_b = prompts(lengths=(20, 9, 14), seed=1)
    with torch.no_grad():
        whole = PagedSequences(model).step({0: target})[0]
        runner = PagedSequences(model, page_size=3)
        runner.step({1: other_a[:5]})
        # a prefill chunk next to another sequence's chunk, then chunks next to decodes
        first = runner.step({0: target[:7], 1: other_a[5:]})[0]
        second = runner.step({2: other_b, 0: target[7:15], 1: [5]})[0]
        decodes = [runner.step({1: [7], 0: [t], 2: [9]})[0] for t in target[15:]]
    pieces = torch.cat([first, second, *decodes])
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=1e-5)


def test_page_size_does_not_change_logits(tiny_model_dir):
    model, _, _ = load_model(tiny_model_dir)
    batch = dict(enumerate(prompts(lengths=(11, 4))))
    with torch.no_grad():
        small = PagedSequences(model, page_size=1, num_pages=32).step(batch)
        large = PagedSequences(model, page_size=16, num_pages=4).step(batch)
    for i in batch:
        torch.testing.assert_close(small[i], large[i], atol=1e-5, rtol=1e-5)


def test_build_model_is_seeded_and_logits_are_float32():
    a = build_model(tiny_config("qwen2"), seed=3)
    b = build_model(tiny_config("qwen2"), seed=3)
    c = build_model(tiny_config("qwen2"), seed=4)
    assert torch.equal(a.embed_tokens.weight, b.embed_tokens.weight)
    assert not torch.equal(a.embed_tokens.weight, c.embed_tokens.weight)
    assert a.compute_logits(torch.ones(2, 64)).dtype == torch.float32


def test_bfloat16_model_stays_close_to_float32(tiny_model_dir):
    model32, _, _ = load_model(tiny_model_dir)
    model16, _, _ = load_model(tiny_model_dir, dtype=torch.bfloat16)
    assert model16.embed_tokens.weight.dtype == torch.bfloat16
    batch = dict(enumerate(prompts(lengths=(9,))))
    with torch.no_grad():
        ref = PagedSequences(model32).step(batch)[0]
        low = PagedSequences(model16)
        low.kv_caches = [(k.bfloat16(), v.bfloat16()) for k, v in low.kv_caches]
        out = low.step(batch)[0]
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_tiny_config_rejects_unknown_family():
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        tiny_config("gpt2")


@pytest.mark.slow
def test_default_model_matches_transformers_and_answers(default_model_dir):
    from transformers import AutoModelForCausalLM

    model, config, tokenizer = load_model()
    assert (config.family, config.num_layers, config.tie_word_embeddings) == ("llama", 30, True)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    ids = tokenizer.encode(text)
    reference = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        runner = PagedSequences(model, page_size=16, num_pages=8)
        ours = runner.step({0: ids})[0]
        torch.testing.assert_close(
            ours, reference(torch.tensor([ids])).logits[0], atol=5e-4, rtol=1e-4
        )
        answer = [int(ours[-1].argmax())]
        while len(answer) < 12 and answer[-1] not in tokenizer.eos_token_ids:
            answer.append(int(runner.step({0: answer[-1:]})[0][-1].argmax()))
    # a wrong q/k un-permutation of the GGUF weights would garble this answer
    assert "Paris" in tokenizer.decode(answer)
