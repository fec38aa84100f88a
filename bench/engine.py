"""Engine benchmark: transformers `generate` vs our engine, prefix cache off and on.

256 prompts from movies.db rows (one shared instruction + title, year, genre, director,
language, country, through the chat template), the default SmolLM2-135M-Instruct, greedy, up
to 8 new tokens, one dtype everywhere (fp32 on CPU). All three systems run in this process on
the same prompts and weights:
  (a) transformers LlamaForCausalLM.generate, batch 16, left padding
  (b) our engine, prefix cache off
  (c) our engine, prefix cache on
Prints rows/s and prompt tokens/s of each, the prefix hit rate of (c), the ratios, and ends
with one JSON line.

    python bench/engine.py                   # the full run
    python bench/engine.py --num-prompts 32  # a quick one
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time

# On a shared machine OpenMP's spinning barriers collapse when another process holds a core
# (small ops became ~100x slower here); passive waiting keeps all three systems comparable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from llmudf.calls.prompt import ChatPrompt, render_user_message  # noqa: E402
from llmudf.engine.config import EngineConfig  # noqa: E402
from llmudf.engine.engine import Engine  # noqa: E402
from llmudf.engine.params import SamplingParams  # noqa: E402
from llmudf.engine.weights import load_model, resolve_model_dir  # noqa: E402
from llmudf.runtime.paths import movies_db  # noqa: E402

INSTRUCTION = "Is this movie suitable for young children? Answer yes or no."
FIELDS = ("title", "year", "genre", "director", "language", "country")
MAX_NEW_TOKENS = 8
HF_BATCH = 16


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


def load_transformers(dtype):
    """transformers' model and left-padding tokenizer for the same weights (loaded untimed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_dir(None)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if hf_tok.pad_token is None:
        hf_tok.pad_token = hf_tok.eos_token
    return model, hf_tok


def run_transformers(prompts: list[list[dict]], tokenizer, model, hf_tok) -> list[str]:
    """What a user would write today: batched `generate` with left padding."""
    texts = [tokenizer.apply_chat_template(messages) for messages in prompts]
    answers: list[str] = []
    with torch.inference_mode():
        for i in range(0, len(texts), HF_BATCH):
            enc = hf_tok(
                texts[i : i + HF_BATCH], return_tensors="pt", padding=True, add_special_tokens=False
            )
            out = model.generate(
                **enc,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                pad_token_id=hf_tok.pad_token_id,
                eos_token_id=list(tokenizer.eos_token_ids),
            )
            new = out[:, enc["input_ids"].shape[1] :]
            answers += hf_tok.batch_decode(new, skip_special_tokens=True)
    return answers


def timed(fn):
    """(result, wall seconds, CPU seconds of this process). On a shared machine the wall time
    of each system depends on what else ran meanwhile; CPU time much less so."""
    start, cpu_start = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - start, time.process_time() - cpu_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    args = parser.parse_args()

    config = EngineConfig(max_num_batched_tokens=args.max_num_batched_tokens)
    model, _, tokenizer = load_model(None, config.torch_device, config.torch_dtype)
    prompts = movie_prompts(args.num_prompts)
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS)
    n = len(prompts)

    def engine(prefix_cache: bool) -> Engine:
        cfg = EngineConfig(
            max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_cache=prefix_cache
        )
        return Engine(cfg, model=model, tokenizer=tokenizer)

    # both sides loaded and warmed up untimed (one-time allocator/kernel setup)
    hf_model, hf_tok = load_transformers(config.torch_dtype)
    run_transformers(prompts[:4], tokenizer, hf_model, hf_tok)
    engine(False).generate(prompts[:4], params)
    hf_answers, t_a, cpu_a = timed(lambda: run_transformers(prompts, tokenizer, hf_model, hf_tok))
    engine_b = engine(False)
    out_b, t_b, cpu_b = timed(lambda: engine_b.generate(prompts, params))
    engine_c = engine(True)
    out_c, t_c, cpu_c = timed(lambda: engine_c.generate(prompts, params))

    num_prompt_tokens = sum(o.num_prompt_tokens for o in out_c)
    answers_b = [o.text for o in out_b]
    answers_c = [o.text for o in out_c]
    identical = answers_b == answers_c
    agree = sum(a.strip() == c.strip() for a, c in zip(hf_answers, answers_c, strict=True)) / n
    hit_rate = engine_c.stats.prefix_hit_rate
    print(
        f"{n} prompts, {num_prompt_tokens / n:.1f} prompt tokens each, "
        f"up to {MAX_NEW_TOKENS} new tokens, {config.torch_dtype}, "
        f"{torch.get_num_threads()} threads"
    )
    for name, t, cpu in (
        ("(a) transformers generate, batch 16", t_a, cpu_a),
        ("(b) engine, prefix cache off", t_b, cpu_b),
        ("(c) engine, prefix cache on", t_c, cpu_c),
    ):
        print(
            f"{name:38s} {t:7.2f} s  {n / t:7.2f} rows/s  {num_prompt_tokens / t:8.1f} prompt tok/s"
            f"  ({cpu:7.2f} CPU s)"
        )
    print(f"prefix hit rate (c): {hit_rate:.1%}; preemptions (c): {engine_c.stats.num_preemptions}")
    print(
        f"speedup (c)/(a): {t_a / t_c:.2f}x   (c)/(b): {t_b / t_c:.2f}x   (b)/(a): {t_a / t_b:.2f}x"
        f"   in CPU time (c)/(a): {cpu_a / cpu_c:.2f}x"
    )
    print(
        f"answers: (b) == (c) for {sum(map(str.__eq__, answers_b, answers_c))}/{n}; "
        f"(a) == (c) for {agree:.1%}"
    )
    print(
        json.dumps(
            {
                "num_prompts": n,
                "rows_per_s": {"hf": n / t_a, "engine_no_cache": n / t_b, "engine_cache": n / t_c},
                "speedup_vs_hf": t_a / t_c,
                "speedup_vs_hf_cpu": cpu_a / cpu_c,
                "speedup_cache": t_b / t_c,
                "hit_rate": hit_rate,
                "identical_b_c": identical,
                "agree_a_c": agree,
            }
        )
    )


if __name__ == "__main__":
    main()
