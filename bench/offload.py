"""Host KV tier benchmark: reused prefixes that do not fit the device pool, tier off vs on.

Instructions of a few hundred tokens each (12 by default; 40 with `--num-instructions 40`)
are asked over the same movies.db rows (6 by default) in an interleaved order: one engine
call per row, each asking every instruction about that row (a SQL workload of many call
sites over one table). A prompt is ~350 tokens and SmolLM2-135M prefills ~250 tokens per
CPU-second on 2 cores, so the defaults keep both runs within a few minutes; the issue's
40 x 200 shape takes hours there. The device KV pool holds about a quarter of
the distinct instruction-prefix tokens, so by the time an instruction comes back its prefix
has been evicted. Without the host tier it is recomputed every time; with it, it is written
back to host memory on eviction and loaded back on the next hit. The default SmolLM2-135M,
greedy, up to 4 new tokens; both runs in this process on the same prompts and weights.

Prints tokens computed, tokens loaded from the host, hit rate per tier and wall time of
each run, and ends with one JSON line: `recompute_saved` (prompt tokens computed off / on),
`speedup` (wall time off / on), `identical` (all answers equal). Targets on a 2-core CPU:
recompute_saved >= 3, speedup >= 1.5, identical.

    python bench/offload.py                 # the default run (a few minutes on 2 cores)
    python bench/offload.py --num-instructions 40 --num-rows 10   # closer to the issue
    python bench/offload.py --cpu-attention # the NEO case instead (meant for a GPU)

`--cpu-attention`: many decoding requests whose KV does not fit the device pool, with
`cpu_attention_offload` off (they are preempted and recomputed) and on (they decode over
host KV, attention on the CPU); prints the wall time of each and whether the answers are
identical. Its speed-up means something on a GPU only; on a CPU both sides run on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import time

# On a shared machine OpenMP's spinning barriers collapse when another process holds a core
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from _common import write_result  # noqa: E402

from llmudf.calls.prompt import ChatPrompt, render_user_message  # noqa: E402
from llmudf.engine.config import EngineConfig  # noqa: E402
from llmudf.engine.engine import Engine  # noqa: E402
from llmudf.engine.kv_pool import KVShape  # noqa: E402
from llmudf.engine.params import SamplingParams  # noqa: E402
from llmudf.engine.radix_cache import RadixCache  # noqa: E402
from llmudf.engine.weights import load_model  # noqa: E402
from llmudf.runtime.paths import movies_db  # noqa: E402

FIELDS = ("title", "year", "genre", "director", "language", "country")
AUDIENCES = (
    "parents of young children", "film students", "a retirement home", "a horror club",
    "a language school", "a history teacher", "a family road trip", "a film festival jury",
    "a late-night TV channel", "an airline's entertainment system",
)  # fmt: skip
CRITERIA = (
    "Consider whether the plot depends on violence, and how graphic that violence would be.",
    "Think about the language used by the characters and whether it suits the audience.",
    "Weigh the running time against the attention span of the people who will watch it.",
    "Ask yourself whether the genre matches what this audience usually enjoys watching.",
    "Consider the year of release and whether the film has aged well for today's viewers.",
    "Take the director's reputation into account, including the tone of their other films.",
    "Think about whether the country of origin implies subtitles and if that is acceptable.",
    "Consider whether the story needs background knowledge the audience may not have.",
    "Judge whether the film is likely to start a good conversation after the screening.",
    "Think about how the film treats its female characters and whether that holds up.",
    "Consider whether the humour relies on references that only a narrow group would get.",
    "Weigh how widely available the film is and whether it can be shown legally here.",
    "Think about whether the soundtrack and pacing suit a shared viewing in one room.",
    "Consider whether any scenes could upset viewers who have lived through similar events.",
    "Ask whether the film fits the season and the occasion for which it would be shown.",
    "Judge whether the genre label hides a darker film than the title would suggest.",
    "Consider whether critics and ordinary viewers tend to agree about this film.",
    "Think about whether the film would still work on a small screen with poor sound.",
    "Consider whether the ending is satisfying or leaves the audience feeling cheated.",
    "Weigh whether the film teaches something, and whether that matters to this audience.",
)
NEW_TOKENS = 4


def instructions(n: int) -> list[str]:
    """n distinct instructions of a few hundred tokens (seeded, so every run asks the same)."""
    rng = random.Random(0)
    texts = []
    for i in range(n):
        audience = AUDIENCES[i % len(AUDIENCES)]
        criteria = rng.sample(CRITERIA, 14)
        lines = "\n".join(f"{k + 1}. {c}" for k, c in enumerate(criteria))
        texts.append(
            f"Reviewer #{i + 1}: you pick films to show to {audience}. Read the movie record "
            f"below and go through these points before you answer:\n{lines}\n"
            "Is this movie a good pick for them? Answer yes or no."
        )
    return texts


def movie_rows(n: int) -> list[tuple]:
    con = sqlite3.connect(movies_db())
    return con.execute(
        "SELECT Title, Year, Genre, Director, Language, Country FROM omdb ORDER BY ID LIMIT ?",
        (n,),
    ).fetchall()


def prompt(instruction: str, row: tuple) -> list[dict]:
    return ChatPrompt(render_user_message(instruction, zip(FIELDS, row, strict=True))).messages()


def distinct_prefix_tokens(tokenizer, texts: list[str], rows: list[tuple]) -> int:
    """Tokens of the instruction prefixes (what two rows' prompts of one instruction share),
    counted once however many instructions share them."""
    tree = RadixCache.simulated()
    for text in texts:
        a, b = (tokenizer.encode_chat(prompt(text, row)) for row in rows[:2])
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))
        tree.insert(a[:n])
    return tree.total_size


def run(engine: Engine, texts: list[str], rows: list[tuple]) -> tuple[list[str], float, float]:
    """One call per row, each asking every instruction: (answers, wall s, CPU s)."""
    params = SamplingParams(max_tokens=NEW_TOKENS)
    rng = random.Random(1)
    answers = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for row in rows:
        order = rng.sample(range(len(texts)), len(texts))  # instructions interleaved
        outs = engine.generate([prompt(texts[i], row) for i in order], params)
        by_instruction = dict(zip(order, (o.text for o in outs), strict=True))
        answers += [by_instruction[i] for i in range(len(texts))]
    return answers, time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-instructions", type=int, default=12)
    parser.add_argument("--num-rows", type=int, default=6)
    parser.add_argument("--device-share", type=float, default=0.25)
    parser.add_argument("--cpu-attention", action="store_true", help="the NEO case instead")
    args = parser.parse_args()

    config = EngineConfig()
    model, model_config, tokenizer = load_model(None, config.torch_device, config.torch_dtype)
    if args.cpu_attention:
        cpu_attention_case(model, tokenizer, config, args.num_rows * 8, args.device_share)
        return
    texts = instructions(args.num_instructions)
    rows = movie_rows(max(args.num_rows, 2))[: args.num_rows]
    num_prefix = distinct_prefix_tokens(tokenizer, texts, movie_rows(2))
    num_pages = int(num_prefix * args.device_share) // config.page_size
    shape = KVShape(
        model_config.num_layers, model_config.num_kv_heads, model_config.head_dim, config.page_size
    )
    # the host holds every prefix twice over
    host_bytes = 2 * -(-num_prefix // config.page_size) * shape.bytes_per_page(config.torch_dtype)

    def engine(host_kv_cache_bytes: int) -> Engine:
        cfg = EngineConfig(num_kv_pages=num_pages, host_kv_cache_bytes=host_kv_cache_bytes)
        return Engine(cfg, model=model, tokenizer=tokenizer)

    engine(0).generate([prompt(texts[0], rows[0])], SamplingParams(max_tokens=1))  # warm-up
    results = {}
    for name, host in (("off", 0), ("on", host_bytes)):
        e = engine(host)
        answers, wall, cpu = run(e, texts, rows)
        results[name] = (answers, wall, cpu, e.stats)

    num_requests = len(texts) * len(rows)
    print(
        f"{len(texts)} instructions x {len(rows)} rows = {num_requests} prompts, interleaved; "
        f"{num_prefix} distinct prefix tokens, device pool {num_pages * config.page_size} "
        f"tokens ({args.device_share:.0%}), host tier {host_bytes / 2**20:.0f} MiB; "
        f"{config.torch_dtype}, {torch.get_num_threads()} threads"
    )
    for name, (_, wall, cpu, s) in results.items():
        print(
            f"host tier {name:3s}: {s.num_computed_prompt_tokens:7d} prompt tokens computed, "
            f"{s.num_host_hit_tokens:7d} loaded from host; hit rate device "
            f"{s.num_device_hit_tokens / s.num_prompt_tokens:6.1%} host "
            f"{s.num_host_hit_tokens / s.num_prompt_tokens:6.1%}; "
            f"{s.num_bytes_to_host / 2**20:7.0f} MiB to host, "
            f"{s.num_bytes_to_device / 2**20:7.0f} MiB back; {wall:6.1f} s ({cpu:6.1f} CPU s)"
        )
    (ans_off, wall_off, cpu_off, off), (ans_on, wall_on, cpu_on, on) = results.values()
    identical = ans_off == ans_on
    saved = off.num_computed_prompt_tokens / on.num_computed_prompt_tokens
    print(
        f"recompute saved {saved:.2f}x, speedup {wall_off / wall_on:.2f}x "
        f"(CPU time {cpu_off / cpu_on:.2f}x); answers identical: {identical} "
        f"({sum(a == b for a, b in zip(ans_off, ans_on, strict=True))}/{num_requests})"
    )
    distinct = len(set(ans_on))
    result = {
        "recompute_saved": round(saved, 3),
        "speedup": round(wall_off / wall_on, 3),
        "speedup_cpu": round(cpu_off / cpu_on, 3),
        "identical": identical,
        "distinct_answers": distinct,
        "tokens_computed_off": off.num_computed_prompt_tokens,
        "tokens_computed_on": on.num_computed_prompt_tokens,
        "tokens_loaded_from_host": on.num_host_hit_tokens,
    }
    write_result(
        "offload",
        result,
        targets={
            "recompute_saved": ">= 3",
            "speedup": ">= 1.5",
            "identical": "== true",
            "distinct_answers": ">= 3",
        },
    )
    if distinct < 3:
        raise SystemExit(f"only {distinct} distinct answers: 'identical' would prove nothing")
    print(
        json.dumps(
            {
                "num_prompts": num_requests,
                "distinct_prefix_tokens": num_prefix,
                "device_pool_tokens": num_pages * config.page_size,
                "computed_tokens": {
                    "off": off.num_computed_prompt_tokens,
                    "on": on.num_computed_prompt_tokens,
                },
                "loaded_tokens": on.num_host_hit_tokens,
                "wall_s": {"off": wall_off, "on": wall_on},
                "recompute_saved": saved,
                "speedup": wall_off / wall_on,
                "speedup_cpu": cpu_off / cpu_on,
                "identical": identical,
            }
        )
    )


def cpu_attention_case(model, tokenizer, config, num_prompts: int, share: float) -> None:
    texts = instructions(1)
    prompts = [prompt(texts[0], row) for row in movie_rows(num_prompts)]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    tree = RadixCache.simulated()  # the KV all requests need at once: shared prefix once
    for p in prompts:
        tree.insert(tokenizer.encode_chat(p))
    needed = tree.total_size + len(prompts) * params.max_tokens
    longest = max(len(tokenizer.encode_chat(p)) for p in prompts) + params.max_tokens
    num_pages = max(int(needed * share), 2 * longest) // config.page_size
    results = {}
    for offload in (False, True):
        cfg = EngineConfig(num_kv_pages=num_pages, cpu_attention_offload=offload)
        engine = Engine(cfg, model=model, tokenizer=tokenizer)
        engine.generate(prompts[:2], SamplingParams(max_tokens=2))  # warm-up
        engine.reset_stats()
        start = time.perf_counter()
        outs = engine.generate(prompts, params)
        results[offload] = ([o.token_ids for o in outs], time.perf_counter() - start, engine.stats)
    (ans_off, t_off, off), (ans_on, t_on, on) = results[False], results[True]
    print(
        f"{len(prompts)} prompts x {params.max_tokens} new tokens, device pool "
        f"{num_pages * config.page_size} tokens ({share:.0%} of all requests' KV), "
        f"{config.torch_device}\n"
        f"cpu attention off: {t_off:6.1f} s, {off.num_preemptions} preemptions, "
        f"{off.num_computed_prompt_tokens} prompt tokens computed\n"
        f"cpu attention on : {t_on:6.1f} s, {on.num_preemptions} preemptions, "
        f"{on.num_computed_prompt_tokens} prompt tokens computed, {on.num_offloaded_requests} "
        f"requests moved to the host, {on.num_cpu_attention_tokens} decode tokens on the CPU"
    )
    print(
        json.dumps(
            {
                "case": "cpu_attention",
                "device": str(config.torch_device),
                "wall_s": {"off": t_off, "on": t_on},
                "speedup": t_off / t_on,
                "identical": ans_off == ans_on,
            }
        )
    )


if __name__ == "__main__":
    main()
