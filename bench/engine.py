"""Engine benchmark: our engine against its peers on one CPU, and against the physical limit.

Movie prompts from movies.db rows (one shared instruction + title, year, genre, director,
language, country, through the chat template), the default SmolLM2-135M-Instruct, greedy, up
to 8 new tokens. The instruction asks for the movie's mood, which the model answers in many
different ways (rows that all got one answer would make "identical" trivial). Sides, all in
this process, on the same prompts (token ids) and the same weights:
  (a) transformers `LlamaForCausalLM.generate`, left padding, fp32, at each batch size of
      `--batch-sizes` once (each reported), then at the fastest of them;
  (b) our engine, prefix cache off;  (c) our engine, prefix cache on (fp32);
  (l) llama.cpp through llama-cpp-python on the same GGUF file (its Q4_1 weights),
      `--llama-threads` threads, one prompt after another, reusing the previous prompt's KV
      for their common prefix (llama-cpp-python does that on its own). Its high-level API
      generates one sequence at a time, so there is no batched llama.cpp side. Skipped, and
      said so, when llama-cpp-python (the optional `bench` extra) is not installed.
(a) at its best batch size, (b), (c) and (l) run `--repeat` times each, alternating; medians
are compared, each with its spread. Every engine run starts with an empty prefix cache.

The physical limit: the fp32 peak of a large `torch.mm`, measured in the same run, and the
FLOPs each fp32 side really computes (bench/_roofline.py); `fraction_of_roofline` is the
FLOPs of (c) over peak x wall time. llama.cpp computes in 4/8-bit integers, so the fp32
limit does not bound it.

    python bench/engine.py                      # the full run (~9 min on 2 cores)
    python bench/engine.py --num-prompts 16 --batch-sizes 8 --repeat 1   # a quick one

Writes bench/results/engine.json; exits 1 if (c)'s answers hold fewer than 3 distinct values.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
from pathlib import Path

# On a shared machine OpenMP's spinning barriers collapse when another process holds a core
# (small ops became ~100x slower here); passive waiting keeps all sides comparable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _common import Checks, Runs, alternate, write_result  # noqa: E402
from _roofline import FlopModel, matmul_peak_flops  # noqa: E402

from llmudf.calls.prompt import ChatPrompt, render_user_message  # noqa: E402
from llmudf.engine.config import EngineConfig  # noqa: E402
from llmudf.engine.engine import Engine  # noqa: E402
from llmudf.engine.params import SamplingParams  # noqa: E402
from llmudf.engine.weights import default_gguf_path, load_model, resolve_model_dir  # noqa: E402
from llmudf.runtime.paths import movies_db  # noqa: E402

INSTRUCTION = "In one word, what is the mood of this movie?"
FIELDS = ("title", "year", "genre", "director", "language", "country")
MAX_NEW_TOKENS = 8
TARGETS = {
    "speedup_vs_best_hf": ">= 2.5",
    "speedup_vs_llama_cpp": ">= 2.0",
    "fraction_of_roofline": ">= 0.85",
    "identical_b_c": "== true",
    "agree_a_c": ">= 0.95",
    "distinct_answers": ">= 3",
}


def movie_prompts(n: int) -> list[list[dict]]:
    con = sqlite3.connect(movies_db())
    rows = con.execute(
        "SELECT Title, Year, Genre, Director, Language, Country FROM omdb ORDER BY ID LIMIT ?",
        (n,),
    ).fetchall()
    return [
        ChatPrompt(render_user_message(INSTRUCTION, zip(FIELDS, row, strict=True))).messages()
        for row in rows
    ]


# ---- (a) transformers ------------------------------------------------------------------


def load_transformers(dtype):
    """transformers' model for the same weights (loaded untimed)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model_dir(None), dtype=dtype).eval()


def run_transformers(token_lists, model, eos_ids, pad_id, batch_size) -> tuple[list, list]:
    """What a user would write today: batched `generate` with left padding. Returns the
    answers' token ids and, per batch, (rows, padded prompt length, generation steps)."""
    answers, shapes = [], []
    with torch.inference_mode():
        for i in range(0, len(token_lists), batch_size):
            batch = token_lists[i : i + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[pad_id] * (width - len(t)) + t for t in batch])
            mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in batch])
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_ids,
            )
            new = out[:, width:]
            shapes.append((len(batch), width, new.shape[1]))
            answers += [[t for t in row.tolist() if t not in eos_ids] for row in new]
    return answers, shapes


def transformers_flops(flop_model: FlopModel, shapes) -> float:
    """What padded `generate` computes: every row's padded prompt, then one token per row
    per step but the last (whose token is never fed back), one row of logits per row per
    step (generate keeps only the last position's logits)."""
    spans, num_logits = [], 0
    for rows, width, steps in shapes:
        spans += [(0, width), (width, width + steps - 1)] * rows
        num_logits += rows * steps
    return flop_model.flops(spans, num_logits)


# ---- (b), (c) our engine ---------------------------------------------------------------


def engine_flops(flop_model: FlopModel, outputs) -> float:
    """Each request computes its uncached prompt tokens, then feeds back every generated
    token but the last; one row of logits per generated token."""
    spans = [
        (o.num_cached_tokens, o.num_prompt_tokens + max(o.num_generated_tokens - 1, 0))
        for o in outputs
    ]
    return flop_model.flops(spans, sum(o.num_generated_tokens for o in outputs))


# ---- (l) llama.cpp ---------------------------------------------------------------------


def load_llama_cpp(threads: int):
    """llama-cpp-python's Llama on the default GGUF file, or None when not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(
        model_path=str(default_gguf_path()),
        n_ctx=2048,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
    )


def run_llama_cpp(llm, token_lists) -> list[str]:
    """One prompt after another (given as our token ids); llama-cpp-python keeps the KV of
    its previous prompt and recomputes only what follows their common prefix."""
    texts = []
    for ids in token_lists:
        out = llm.create_completion(ids, max_tokens=MAX_NEW_TOKENS, temperature=0.0, top_k=1)
        texts.append(out["choices"][0]["text"])
    return texts


def common_prefix_tokens(token_lists) -> int:
    """Prompt tokens that sequential prefix reuse skips: each prompt's common prefix with
    the one before it."""
    total = 0
    for prev, cur in zip(token_lists, token_lists[1:], strict=False):
        n = 0
        while n < min(len(prev), len(cur)) and prev[n] == cur[n]:
            n += 1
        total += n
    return total


# ---- the run ---------------------------------------------------------------------------


def side_report(runs: Runs, n: int, num_prompt_tokens: int, flops, peak: float) -> dict:
    out = runs.summary() | {
        "rows_per_s": round(n / runs.median, 3),
        "prompt_tokens_per_s": round(num_prompt_tokens / runs.median, 1),
    }
    if flops is not None:
        out["gflop"] = round(flops / 1e9, 2)
        out["fraction_of_roofline"] = round(flops / (peak * runs.median), 3)
    return out


def agreement(a: list[str], b: list[str]) -> float:
    return sum(x.strip() == y.strip() for x, y in zip(a, b, strict=True)) / len(a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,8,16,32,64", help="transformers' batches")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side")
    parser.add_argument("--llama-threads", type=int, default=2)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    peak = matmul_peak_flops()
    print(f"fp32 matmul peak (2048^3 torch.mm): {peak / 1e9:.1f} GFLOP/s")
    config = EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens)
    model, model_cfg, tokenizer = load_model(None, config.torch_device, config.torch_dtype)
    flop_model = FlopModel.from_config(model_cfg)
    prompts = movie_prompts(args.num_prompts)
    token_lists = tokenizer.encode_chat_batch(prompts)
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS)
    n, num_prompt_tokens = len(prompts), sum(map(len, token_lists))
    eos_ids = list(tokenizer.eos_token_ids)
    pad_id = eos_ids[0]

    def engine(prefix_cache: bool) -> Engine:
        cfg = EngineConfig(
            max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_cache=prefix_cache
        )
        return Engine(cfg, model=model, tokenizer=tokenizer)

    # every side loaded and warmed up untimed (one-time allocator / thread-pool setup)
    hf_model = load_transformers(config.torch_dtype)
    run_transformers(token_lists[:4], hf_model, eos_ids, pad_id, 4)
    engine(False).generate(token_lists[:4], params)
    llm = load_llama_cpp(args.llama_threads)
    if llm is not None:
        run_llama_cpp(llm, token_lists[:2])

    sweep = {}
    for batch_size in batch_sizes:
        one = alternate(
            {
                "hf": lambda b=batch_size: run_transformers(
                    token_lists, hf_model, eos_ids, pad_id, b
                )
            },
            1,
        )["hf"]
        sweep[batch_size] = one
        print(f"(a) transformers, batch {batch_size:<3} {n / one.median:7.2f} rows/s")
    best_batch = min(sweep, key=lambda b: sweep[b].median)

    engines: dict[str, Engine] = {}

    def fresh_engines(name: str) -> None:  # untimed: every engine run starts cold
        if name.startswith("engine"):
            engines[name] = engine(name == "engine_cache")
        elif name == "llama_cpp":
            llm.reset()

    sides = {
        "hf": lambda: run_transformers(token_lists, hf_model, eos_ids, pad_id, best_batch),
        "engine_no_cache": lambda: engines["engine_no_cache"].generate(token_lists, params),
        "engine_cache": lambda: engines["engine_cache"].generate(token_lists, params),
    }
    if llm is not None:
        sides["llama_cpp"] = lambda: run_llama_cpp(llm, token_lists)
    runs = alternate(sides, args.repeat, prepare=fresh_engines)

    hf_ids, hf_shapes = runs["hf"].results[0]
    hf_answers = [tokenizer.decode(ids) for ids in hf_ids]
    out_b, out_c = runs["engine_no_cache"].results[0], runs["engine_cache"].results[0]
    answers_b, answers_c = [o.text for o in out_b], [o.text for o in out_c]
    stats_c = engines["engine_cache"].stats
    hit_rate = stats_c.prefix_hit_rate
    checks = Checks()
    # the FLOP count's token count must be the one the engine ran (no preemption recomputed)
    counted = sum(
        o.num_prompt_tokens - o.num_cached_tokens + o.num_generated_tokens - 1 for o in out_c
    )
    checks.require(
        counted == stats_c.num_forward_tokens,
        f"(c) FLOPs counted for {counted} tokens, the engine ran {stats_c.num_forward_tokens}",
    )
    flops = {
        "hf": transformers_flops(flop_model, hf_shapes),
        "engine_no_cache": engine_flops(flop_model, out_b),
        "engine_cache": engine_flops(flop_model, out_c),
        "llama_cpp": None,
    }
    peak = max(peak, matmul_peak_flops())  # again, warm: the higher of the two
    print(f"fp32 matmul peak, the higher of two measurements: {peak / 1e9:.1f} GFLOP/s")
    report = {
        name: side_report(r, n, num_prompt_tokens, flops[name], peak) for name, r in runs.items()
    }
    t = {name: r.median for name, r in runs.items()}
    num_distinct = checks.require_varying("(c) engine answers", answers_c)
    # every run of a side gives the same answers (greedy)
    checks.require(
        all([o.text for o in r] == answers_c for r in runs["engine_cache"].results),
        "(c) answers differ between runs",
    )

    print(
        f"\n{n} prompts, {num_prompt_tokens / n:.1f} prompt tokens each, up to "
        f"{MAX_NEW_TOKENS} new tokens, {config.torch_dtype}, {torch.get_num_threads()} threads;"
        f" {num_distinct} distinct answers"
    )
    labels = {
        "hf": f"(a) transformers, batch {best_batch}",
        "engine_no_cache": "(b) engine, prefix cache off",
        "engine_cache": "(c) engine, prefix cache on",
        "llama_cpp": f"(l) llama.cpp, {args.llama_threads} threads",
    }
    for name, r in runs.items():
        roof = report[name].get("fraction_of_roofline")
        print(
            f"{labels[name]:32s} {n / r.median:7.2f} rows/s  {r.describe()}"
            + (f"  roofline {roof:.2f}" if roof is not None else "")
        )
    print(
        f"prefix hit rate (c): {hit_rate:.1%}; forward tokens (c): {stats_c.num_forward_tokens};"
        f" preemptions (c): {stats_c.num_preemptions}"
    )
    payload = {
        "num_prompts": n,
        "mean_prompt_tokens": round(num_prompt_tokens / n, 1),
        "max_new_tokens": MAX_NEW_TOKENS,
        "instruction": INSTRUCTION,
        "fields": list(FIELDS),
        "peak_gflops": round(peak / 1e9, 1),
        "hf_batch_sweep_rows_per_s": {b: round(n / r.median, 3) for b, r in sweep.items()},
        "best_hf_batch": best_batch,
        "sides": report,
        "speedup_vs_best_hf": round(t["hf"] / t["engine_cache"], 3),
        "speedup_cache": round(t["engine_no_cache"] / t["engine_cache"], 3),
        "fraction_of_roofline": report["engine_cache"]["fraction_of_roofline"],
        "fraction_of_roofline_hf": report["hf"]["fraction_of_roofline"],
        "hit_rate": round(hit_rate, 4),
        "identical_b_c": answers_b == answers_c,
        "agree_a_c": round(agreement(hf_answers, answers_c), 4),
        "distinct_answers": num_distinct,
        "llama_cpp_batched": "not measured: llama-cpp-python's Llama generates one sequence at"
        " a time",
    }
    if 16 in sweep:
        payload["speedup_vs_hf_batch16"] = round(sweep[16].median / t["engine_cache"], 3)
    if llm is None:
        payload["llama_cpp"] = "skipped: llama-cpp-python is not installed (pip install .[bench])"
        print(payload["llama_cpp"])
    else:
        llama_answers = runs["llama_cpp"].results[0]
        payload["speedup_vs_llama_cpp"] = round(t["llama_cpp"] / t["engine_cache"], 3)
        payload["agree_llama_cpp_c"] = round(agreement(llama_answers, answers_c), 4)
        payload["llama_cpp_prefix_reuse"] = round(
            common_prefix_tokens(token_lists) / num_prompt_tokens, 4
        )
    ratios = {k: v for k, v in payload.items() if k.startswith(("speedup", "fraction", "agree"))}
    print("  ".join(f"{k} {v}" for k, v in ratios.items()))
    print(f"identical (b) == (c): {payload['identical_b_c']}")
    headline = {
        k: payload[k]
        for k in (
            "speedup_vs_best_hf",
            "best_hf_batch",
            "speedup_vs_llama_cpp",
            "fraction_of_roofline",
            "fraction_of_roofline_hf",
            "identical_b_c",
            "agree_a_c",
            "distinct_answers",
            "hit_rate",
            "peak_gflops",
        )
        if k in payload
    }
    if llm is None:
        headline["speedup_vs_llama_cpp"] = "skipped (llama-cpp-python not installed)"
    targets = {k: v for k, v in TARGETS.items() if k in headline}
    write_result("engine", payload, headline=headline, targets=targets,
                 results_dir=args.results_dir)  # fmt: skip
    checks.exit_if_failed()


if __name__ == "__main__":
    main()
