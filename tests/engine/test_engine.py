"""The engine end to end on tiny random-init models (and one slow test on the real model)."""

import pyarrow as pa
import pytest
import torch

from llmudf.calls.prompt import ChatPrompt
from llmudf.engine.config import EngineConfig
from llmudf.engine.engine import Engine
from llmudf.engine.sampling import SamplingParams
from llmudf.engine.weights import load_model

GREEDY8 = SamplingParams(max_tokens=8, logprobs=True)


def make_engine(tiny, **cfg):
    cfg.setdefault("device", "cpu")
    cfg.setdefault("num_kv_pages", 256)
    model, _, tokenizer = tiny
    return Engine(EngineConfig(**cfg), model=model, tokenizer=tokenizer)


def prompts(n=12):
    """Chat prompts sharing a system prompt and, in groups, longer instructions."""
    questions = ["Is it a comedy?", "Is it a drama about a family?", "What year?"]
    return [
        ChatPrompt(f"{questions[i % 3]}\n\ntitle: Movie {i * 7 % 11}\nyear: {1990 + i}").messages()
        for i in range(n)
    ]


def answers(outputs):
    return [o.token_ids for o in outputs]


def assert_same(outs, ref):
    assert answers(outs) == answers(ref)
    for a, b in zip(outs, ref, strict=True):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def reference(tiny):
    """Each prompt alone, no cache, one sequence at a time: the plain answer."""
    engine = make_engine(tiny, enable_prefix_cache=False, max_num_seqs=1)
    return engine.generate(prompts(), GREEDY8)


def test_matches_transformers_greedy(tiny_model_dir, tiny, reference):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = tiny[2]
    for prompt, out in zip(prompts()[:3], reference, strict=False):
        ids = tokenizer.encode(tokenizer.apply_chat_template(prompt))
        expected = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            # the engine never samples ids the tokenizer cannot decode (the tiny model pads its
            # vocab past the tokenizer's)
            suppress_tokens=list(range(tokenizer.vocab_size, hf.config.vocab_size)),
        )[0, len(ids) :].tolist()
        assert out.token_ids == expected


@pytest.mark.parametrize(
    "cfg",
    [
        dict(enable_prefix_cache=True),
        dict(enable_prefix_cache=True, page_size=4),
        dict(enable_prefix_cache=True, max_num_batched_tokens=37),  # chunked prefill
        dict(enable_prefix_cache=True, schedule_policy="fcfs", max_num_seqs=3),
        dict(enable_prefix_cache=False, max_num_batched_tokens=64, page_size=8),
    ],
    ids=["cache", "cache-page4", "cache-chunked", "cache-fcfs", "nocache-chunked"],
)
def test_answers_and_logprobs_do_not_depend_on_cache_or_batching(tiny, reference, cfg):
    engine = make_engine(tiny, **cfg)
    outs = engine.generate(prompts(), GREEDY8)
    assert_same(outs, reference)
    if cfg["enable_prefix_cache"]:
        assert engine.stats.prefix_hit_rate > 0.5
        assert all(o.num_cached_tokens > 0 for o in outs[1:])
    else:
        assert engine.stats.num_cached_tokens == 0
    again = engine.generate(prompts()[::-1], GREEDY8)  # other order, warm cache
    assert_same(again[::-1], reference)


def test_kv_pressure_preempts_but_answers_stay_the_same(tiny, reference):
    # 12 requests of ~130 tokens in a pool of 300 token slots
    engine = make_engine(tiny, num_kv_pages=75, page_size=4)
    outs = engine.generate(prompts(), GREEDY8)
    assert_same(outs, reference)
    assert engine.stats.num_preemptions > 0
    pool = engine.pool
    engine.scheduler.cache.evict(pool.num_pages)
    assert pool.num_free_pages == pool.num_pages


def test_outputs_and_stats(tiny, reference):
    engine = make_engine(tiny)
    outs = engine.generate(prompts(), SamplingParams(max_tokens=8))
    assert [o.request_id for o in outs] == [str(i) for i in range(12)]
    tokenizer = tiny[2]
    for o in outs:
        assert o.finish_reason == "length" and o.num_generated_tokens == 8
        assert o.text == tokenizer.decode(o.token_ids)
        assert o.logprobs is None
    stats = engine.stats
    assert stats.num_requests == 12
    assert stats.num_prompt_tokens == sum(o.num_prompt_tokens for o in outs)
    assert stats.num_cached_tokens == sum(o.num_cached_tokens for o in outs)
    assert stats.num_forward_tokens < stats.num_prompt_tokens + stats.num_generated_tokens
    assert stats.tokens_per_s > 0


def test_prompt_kinds_agree(tiny, reference):
    engine = make_engine(tiny)
    tokenizer = tiny[2]
    chats = prompts()[:3]
    texts = [tokenizer.apply_chat_template(p) for p in chats]
    ids = [tokenizer.encode(t) for t in texts]
    system, user = zip(*[(p[0]["content"], p[1]["content"]) for p in chats], strict=True)
    table = pa.table({"user": list(user), "system": list(system)})
    for kind in (texts, ids, table, pa.table({"prompt": texts})):
        assert answers(engine.generate(kind, GREEDY8)) == answers(reference[:3])


def test_choices_constrain_the_answer(tiny):
    engine = make_engine(tiny)
    choices = ["yes", "no", "not sure"]
    outs = engine.generate(prompts(6), SamplingParams(choices=choices))
    assert all(o.text in choices and o.finish_reason == "stop" for o in outs)
    scores = engine.generate(prompts(6), SamplingParams(choices=["1", "2", "3", "4", "5"]))
    assert all(o.text in {"1", "2", "3", "4", "5"} for o in scores)

    def sample(seed: int) -> list[str]:
        params = SamplingParams(choices=choices, temperature=2.0, seed=seed)
        return [o.text for o in engine.generate(prompts(2), params)]

    assert sample(3) == sample(3)  # a seed repeats its draw
    draws = [sample(seed) for seed in range(12)]
    assert len({tuple(d) for d in draws}) > 1  # and the temperature is not ignored
    assert all(a in choices for d in draws for a in d)


def test_greedy_choices_compute_only_their_tokens_logits_and_pick_the_same(tiny, monkeypatch):
    from llmudf.engine import model_runner

    choice_sets = (["yes", "no", "not sure"], ["1", "2", "3", "4", "5"], ["Drama", "Comedy"])
    engine = make_engine(tiny)
    widths = []
    compute_logits = engine.runner.model.compute_logits

    def spy(hidden, token_ids=None):
        logits = compute_logits(hidden, token_ids)
        widths.append(logits.shape[1])
        return logits

    monkeypatch.setattr(engine.runner.model, "compute_logits", spy)
    subset = [engine.generate(prompts(12), SamplingParams(choices=c)) for c in choice_sets]
    assert widths and max(widths) <= 8  # the choices' tokens (+ EOS), not the vocabulary
    monkeypatch.setattr(model_runner, "MAX_CANDIDATE_TOKENS", 0)
    widths.clear()
    full = [make_engine(tiny).generate(prompts(12), SamplingParams(choices=c)) for c in choice_sets]
    assert min(widths) >= engine.runner.vocab_size
    assert [[o.text for o in outs] for outs in subset] == [[o.text for o in outs] for outs in full]
    assert len({o.text for outs in subset for o in outs}) > 3


def test_stop_strings_eos_and_stream(tiny, reference):
    engine = make_engine(tiny)
    tokenizer = tiny[2]
    full = reference[0]
    stop = tokenizer.decode(full.token_ids[2:4])
    out = engine.generate(prompts(1), SamplingParams(max_tokens=8, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert (
        out.text == tokenizer.decode(full.token_ids)[: tokenizer.decode(full.token_ids).find(stop)]
    )
    first = full.token_ids[0]
    out = engine.generate(prompts(1), SamplingParams(max_tokens=8, stop_token_ids=[first]))[0]
    assert (out.finish_reason, out.token_ids, out.text) == ("stop", [], "")
    streamed = []
    rid = engine.add_request(prompts(1)[0], GREEDY8, stream=lambda r, t: streamed.append((r, t)))
    done = []
    while engine.num_unfinished:
        done += engine.step()
    assert [t for _, t in streamed] == full.token_ids == done[0].token_ids
    assert {r for r, _ in streamed} == {rid}


def test_incremental_api_and_abort(tiny, reference):
    engine = make_engine(tiny)
    ids = [engine.add_request(p, GREEDY8, request_id=f"q{i}") for i, p in enumerate(prompts(4))]
    assert engine.num_unfinished == 4
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(prompts(1)[0], GREEDY8, request_id="q0")
    engine.step()
    engine.abort("q1")
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.generate(prompts(1))
    done = {}
    while engine.num_unfinished:
        done.update((o.request_id, o) for o in engine.step())
    assert sorted(done) == ["q0", "q2", "q3"]
    assert [done[i].token_ids for i in ("q0", "q2", "q3")] == answers(
        [reference[i] for i in (0, 2, 3)]
    )
    assert ids == ["q0", "q1", "q2", "q3"]


def test_bad_input_errors(tiny):
    engine = make_engine(tiny, max_model_len=64)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate(["hi", ""])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, 10**6]])
    with pytest.raises(ValueError, match="has 100 tokens but the context holds 64"):
        engine.generate(["x" * 100])
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        engine.generate(["hi"], [SamplingParams(), SamplingParams()])
    with pytest.raises(TypeError, match="list of prompts"):
        engine.generate("hi")
    with pytest.raises(TypeError, match="wrap a single prompt in a list"):
        engine.generate([{"role": "user", "content": "hi"}])  # one chat, not a list of them
    with pytest.raises(ValueError, match="prompt 0: message 0 needs a role"):
        engine.generate([[{"user": "hi"}]])
    with pytest.raises(TypeError, match="prompt 0 is a float"):
        engine.generate([0.5])
    with pytest.raises(ValueError, match="'prompt' or 'user' column"):
        engine.generate(pa.table({"text": ["hi"]}))
    assert engine.num_unfinished == 0  # nothing half-queued
    out = engine.generate(["x" * 100], SamplingParams(max_tokens=4, truncate_left=True))[0]
    assert out.num_prompt_tokens == 60 and out.num_generated_tokens == 4
    trunc = make_engine(tiny, max_model_len=64, prompt_overflow="truncate_left")
    with pytest.warns(UserWarning, match="max_tokens=70 is more than the model's context"):
        out = trunc.generate(["y" * 100], SamplingParams(max_tokens=70))[0]
    assert out.num_prompt_tokens == 1 and out.finish_reason == "length"
    assert out.num_prompt_tokens + out.num_generated_tokens == 64


def test_bad_model_path():
    with pytest.raises(FileNotFoundError, match="model not found"):
        Engine(EngineConfig(model="/nonexistent/model", device="cpu"))


@pytest.mark.slow
def test_default_model_greedy_answers_do_not_depend_on_the_cache():
    from llmudf.calls.prompt import render_user_message

    model, _, tokenizer = load_model(None)
    rows = [("Up", 2009, "Animation"), ("Heat", 1995, "Crime"), ("Up", 2009, "Comedy")]
    chats = [
        ChatPrompt(render_user_message(q, [("title", t), ("year", y), ("genre", g)])).messages()
        for q in ("Is this movie for kids? Answer yes or no.", "Name its director.")
        for t, y, g in rows
    ]
    params = SamplingParams(max_tokens=6)
    cached = Engine(
        EngineConfig(kv_cache_bytes=2**28, page_size=1), model=model, tokenizer=tokenizer
    )
    plain = Engine(
        EngineConfig(kv_cache_bytes=2**28, enable_prefix_cache=False, max_num_seqs=1),
        model=model,
        tokenizer=tokenizer,
    )
    with_cache = cached.generate(chats, params)
    assert [o.text for o in with_cache] == [o.text for o in plain.generate(chats, params)]
    assert cached.stats.prefix_hit_rate > 0.3
    assert all(o.text.lower().startswith(("yes", "no")) for o in with_cache[:3])


SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "year": {"type": "integer"},
        "rating": {"type": "number"},
        "kids": {"type": "boolean"},
        "genre": {"enum": ["comedy", "drama", 10, 1]},
    },
}


def test_json_schema_output_parses_and_follows_the_schema(tiny):
    import json

    engine = make_engine(tiny, num_kv_pages=2048)
    outs = engine.generate(prompts(4), SamplingParams(json_schema=SCHEMA))  # greedy
    for seed in range(1, 4):  # sampling explores other digits, leading zeros, decimal points
        params = SamplingParams(json_schema=SCHEMA, temperature=1.0, seed=seed, top_k=40)
        outs += engine.generate(prompts(4), params)
    for out in outs:
        assert out.finish_reason == "stop"
        value = json.loads(out.text)
        assert list(value) == list(SCHEMA["properties"])
        assert isinstance(value["title"], str)
        assert isinstance(value["year"], int) and not isinstance(value["year"], bool)
        assert isinstance(value["rating"], int | float)
        assert isinstance(value["kids"], bool)
        assert value["genre"] in ["comedy", "drama", 10, 1]


@pytest.mark.parametrize(
    ("schema", "match"),
    [
        ({"type": "array"}, "object schema"),
        ({"type": "object", "properties": {}}, "at least one property"),
        ({"type": "object", "properties": {"a": {"type": "array"}}}, "unsupported type"),
        ({"type": "object", "properties": {"a": {"enum": []}}}, "non-empty list"),
    ],
)
def test_bad_json_schema(tiny, schema, match):
    engine = make_engine(tiny)
    with pytest.raises(ValueError, match=match):
        engine.generate(prompts(1), SamplingParams(json_schema=schema))
    with pytest.raises(ValueError, match="cannot both"):
        SamplingParams(json_schema=SCHEMA, choices=["a"])
