"""GPU benchmark: one prepared run for a GPU machine (< 6 minutes on one H100 / H200).

A model of the Llama-3.1-8B shape with random weights in bf16 (no download; `--model PATH`
for real weights), 2,000 SQL-shaped prompts (one shared ~300-token instruction, then one
movies row each), 16 new tokens each (EOS ignored, so every system does the same work),
greedy, all in one process on the same weights:
  (a) transformers `generate` with SDPA at batch 32, 64 and 128 (timed on the first
      `--hf-prompts` prompts; its best rows/s counts)
  (b) our engine, prefix cache off        (deterministic kernels)
  (c) our engine, prefix cache on         (deterministic kernels)
  (d) our engine, prefix cache on, deterministic=False (cuBLAS, split-K chosen per step,
      cascade attention over the shared prefix)
Prints rows/s, prefill and decode tokens/s, the prefix hit rate, the share of the GPU's bf16
matmul peak that prefill steps reach and of its memory bandwidth that decode steps reach
(both peaks measured in this run), and ends with one JSON line: speedup_vs_hf (c over the
best of a), prefill_mfu and decode_bw_util (of c), identical_b_c (every answer of b equals c).

    python bench/gpu.py                 # on a GPU machine
    python bench/gpu.py --smoke         # the same code on a tiny model on CPU (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import sqlite3
import time
import zlib
from dataclasses import dataclass, field

import torch

from llmudf.engine.config import EngineConfig
from llmudf.engine.engine import Engine
from llmudf.engine.model_config import ModelConfig
from llmudf.engine.models import build_model, tiny_config
from llmudf.engine.params import SamplingParams
from llmudf.engine.tokenizer import Tokenizer

LLAMA_8B = dict(
    family="llama",
    vocab_size=128256,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    intermediate_size=14336,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    rms_norm_eps=1e-5,
    max_position_embeddings=16384,  # enough here; keeps the graphs' block tables small
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_ids=(128001,),
)
FIELDS = ("title", "year", "genre", "director", "language", "country")
INSTRUCTION = " ".join(
    [
        "You are a careful film librarian who rates movies for a family streaming service.",
        "Read the movie record below and decide whether the movie is suitable for young",
        "children between five and ten years old. Consider the genre, the director's usual",
        "work, the year and the country of release, and anything the title suggests about",
        "violence, fear, language, sexual content, drug use or mature themes. Horror, crime,",
        "war and erotic films are unsuitable unless the record clearly says otherwise;",
        "animation, family and musical films are usually suitable; comedies and adventures",
        "depend on their audience. When the record is ambiguous, prefer the answer that a",
        "cautious parent would give. Do not invent facts that the record does not support,",
        "and do not mention these instructions.",
    ]
    * 3
)


@dataclass
class StepTimes:
    """Wall time of the engine's forward steps, split into steps with prompt tokens
    (prefill, maybe with decodes) and decode-only steps; FLOPs and bytes they moved."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    prefill_flops: float = 0.0
    decode_bytes: float = 0.0
    shapes: list = field(default_factory=list)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (CI)")
    parser.add_argument("--model", help="a HF model folder (default: random Llama-3.1-8B)")
    parser.add_argument("--num-prompts", type=int, default=None)
    parser.add_argument("--hf-prompts", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    num_prompts = args.num_prompts or (12 if smoke else 2000)
    hf_prompts = min(args.hf_prompts or (8 if smoke else 384), num_prompts)
    batches = (4, 8) if smoke else (32, 64, 128)
    torch.manual_seed(0)

    hf, config, tokenizer = load_models(args.model, smoke, device, dtype)
    prompts = sql_prompts(num_prompts, tokenizer, args.model is not None, smoke)
    lens = [len(p) for p in prompts]
    print(f"device: {describe(device)}; {num_prompts} prompts, {min(lens)}-{max(lens)} tokens")
    peak_flops, peak_bw = measure_peaks(device, dtype, smoke)
    print(f"measured peaks: {peak_flops / 1e12:.1f} TFLOP/s matmul, {peak_bw / 1e9:.0f} GB/s copy")

    results = {}
    results["a"] = run_hf(hf, prompts[:hf_prompts], batches, args.max_new_tokens, device)
    ours = our_model(config, hf, device, dtype, deterministic=True)
    for name, cache in (("b", False), ("c", True)):
        results[name] = run_engine(ours, tokenizer, prompts, cache, args.max_new_tokens, smoke)
    del ours
    free_memory(device)
    ours_fast = our_model(config, hf, device, dtype, deterministic=False)
    results["d"] = run_engine(ours_fast, tokenizer, prompts, True, args.max_new_tokens, smoke)

    c = results["c"]
    flops_per_s = c["times"].prefill_flops / max(c["times"].prefill_s, 1e-9)
    bytes_per_s = c["times"].decode_bytes / max(c["times"].decode_s, 1e-9)
    for name, label in (
        ("a", "transformers generate"),
        ("b", "engine, cache off"),
        ("c", "engine, cache on"),
        ("d", "engine, cache on, deterministic=False"),
    ):
        print_row(name, label, results[name])
    summary = {
        "device": describe(device),
        "num_prompts": num_prompts,
        "hf_best_batch": results["a"]["batch"],
        "rows_per_s": {k: round(v["rows_per_s"], 2) for k, v in results.items()},
        "prefix_hit_rate": round(c["hit_rate"], 4),
        "speedup_vs_hf": round(c["rows_per_s"] / results["a"]["rows_per_s"], 3),
        "speedup_d_vs_hf": round(results["d"]["rows_per_s"] / results["a"]["rows_per_s"], 3),
        "prefill_mfu": round(flops_per_s / peak_flops, 4),
        "decode_bw_util": round(bytes_per_s / peak_bw, 4),
        "identical_b_c": results["b"]["answers"] == c["answers"],
        "identical_c_d": c["answers"] == results["d"]["answers"],
    }
    print(json.dumps(summary))


# ---- models and prompts -------------------------------------------------------------------


def load_models(path, smoke, device, dtype):
    """transformers' model (the weights' one copy that all systems start from), our
    ModelConfig and a tokenizer."""
    from transformers import AutoModelForCausalLM

    if path is not None:
        from llmudf.engine.weights import read_config, resolve_model_dir

        folder = resolve_model_dir(path)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        config = read_config(folder)
        tokenizer = Tokenizer.from_dir(folder, extra_eos_ids=config.eos_token_ids)
        return hf.to(device).eval(), config, tokenizer
    config = tiny_config("llama") if smoke else ModelConfig(**LLAMA_8B)
    hf_dict = config.to_hf()
    from transformers import AutoConfig

    hf_config = AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, attn_implementation="sdpa"
        ).eval()
    return hf, config, word_tokenizer(config.vocab_size)


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer over `vocab_size` made-up words (`w0`, `w1`, ...): random weights have no
    vocabulary of their own; prompts are made of hashed words (see `sql_prompts`)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w1"))


def movie_rows(n: int) -> list[tuple]:
    """`n` rows of movies.db (bokeh-sampledata), repeated if it has fewer; synthetic rows
    when the package is not installed."""
    try:
        from llmudf.runtime.paths import movies_db

        con = sqlite3.connect(movies_db())
        rows = con.execute(
            "SELECT Title, Year, Genre, Director, Language, Country FROM omdb ORDER BY ID LIMIT ?",
            (n,),
        ).fetchall()
    except Exception as exc:  # noqa: BLE001 (any failure: fall back, and say so)
        print(f"movies.db unavailable ({exc}); synthetic rows")
        rows = []
    while len(rows) < n:
        i = len(rows)
        rows.append((f"Movie {i}", 1950 + i % 70, "Drama", f"Director {i % 97}", "English", "USA"))
    return rows[:n]


def sql_prompts(n: int, tokenizer: Tokenizer, real: bool, smoke: bool) -> list[list[int]]:
    """Token ids of `n` prompts: the instruction, then one row's `name: value` lines. With a
    real model, its chat template; with random weights, words hashed to token ids."""
    from llmudf.calls.prompt import ChatPrompt, render_user_message

    rows = movie_rows(n)
    instruction = " ".join(INSTRUCTION.split()[:30]) if smoke else INSTRUCTION
    texts = [render_user_message(instruction, zip(FIELDS, row, strict=True)) for row in rows]
    if real:
        return [tokenizer.encode_chat(ChatPrompt(t).messages()) for t in texts]
    vocab = tokenizer.vocab_size
    return [[zlib.crc32(w.encode()) % (vocab - 2) + 2 for w in t.split()] for t in texts]


def warmup_prompts(vocab_size: int, n: int, shared_len: int) -> list[list[int]]:
    """`n` prompts of random tokens behind one random prefix of `shared_len` tokens."""
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(2, vocab_size, (shared_len,), generator=gen).tolist()
    return [shared + torch.randint(2, vocab_size, (60,), generator=gen).tolist() for _ in range(n)]


def our_model(config, hf, device, dtype, deterministic: bool):
    """Our model with transformers' weights, its kernels chosen for the device."""
    model = build_model(config, device, dtype, seed=None, deterministic=deterministic)
    model.load_weights(hf.state_dict().items())
    return model


def describe(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peaks(device, dtype, smoke) -> tuple[float, float]:
    """The device's bf16 matmul FLOP/s (one large square matmul) and copy bandwidth (bytes
    read + written per second), best of a few runs."""
    n = 512 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty((16 if smoke else 4096) << 18, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    best_mm = best_copy = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best_mm = min(best_mm, time.perf_counter() - start)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best_copy = min(best_copy, time.perf_counter() - start)
    return 2 * n**3 / best_mm, 2 * src.numel() * src.element_size() / best_copy


# ---- (a) transformers ---------------------------------------------------------------------


def run_hf(model, prompts, batches, max_new_tokens, device) -> dict:
    best = None
    for batch_size in batches:
        hf_generate(model, prompts[:batch_size], batch_size, max_new_tokens, device)  # warm-up
        start = time.perf_counter()
        hf_generate(model, prompts, batch_size, max_new_tokens, device)
        elapsed = time.perf_counter() - start
        rows_per_s = len(prompts) / elapsed
        print(f"  transformers batch {batch_size}: {rows_per_s:.1f} rows/s")
        if best is None or rows_per_s > best["rows_per_s"]:
            best = {"rows_per_s": rows_per_s, "batch": batch_size, "elapsed": elapsed}
    return best


def hf_generate(model, prompts, batch_size, max_new_tokens, device) -> None:
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[0] * (width - len(t)) + t for t in batch], device=device)
            mask = torch.tensor([[0] * (width - len(t)) + [1] * len(t) for t in batch])
            model.generate(
                input_ids=ids,
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
    sync(device)


# ---- (b), (c), (d) our engine -------------------------------------------------------------


def run_engine(model, tokenizer, prompts, cache: bool, max_new_tokens: int, smoke: bool) -> dict:
    config = EngineConfig(
        device="cpu" if smoke else "cuda",
        dtype="float32" if smoke else "bfloat16",
        enable_prefix_cache=cache,
        kv_cache_fraction=0.7,
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        deterministic=model.ops.deterministic,
    )
    engine = Engine(config, model=model, tokenizer=tokenizer)  # captures the decode graphs
    params = SamplingParams(max_tokens=max_new_tokens, ignore_eos=True)
    # warm-up (compiles the kernels, cascade included): prompts of random tokens, so that
    # nothing they leave in the prefix cache serves the timed prompts
    num, shared = (4, 20) if smoke else (48, 300)
    engine.generate(warmup_prompts(model.config.vocab_size, num, shared), params)
    engine.reset_stats()
    times = StepTimes()
    _time_steps(engine, model.config, times)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    result = {
        "rows_per_s": len(prompts) / elapsed,
        "hit_rate": engine.stats.prefix_hit_rate,
        "times": times,
        "answers": [o.token_ids for o in outputs],
    }
    del engine
    free_memory(model.embed_tokens.weight.device)
    return result


def _time_steps(engine, cfg, times: StepTimes) -> None:
    """Wrap the runner's `run` to time each step (it ends in a host read of the sampled
    tokens, so wall time covers the GPU work) and count its FLOPs and bytes."""
    run = engine.runner.run
    matmul_params = _matmul_params(cfg)
    weight_bytes = matmul_params * engine.runner._dtype.itemsize
    kv_bytes_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    attn_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim  # per (query, key) pair

    def timed(batch):
        start = time.perf_counter()
        out = run(batch)
        elapsed = time.perf_counter() - start
        spans = [
            (seq.num_computed_tokens, n)
            for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
        ]
        prompt = [
            (s, n)
            for (s, n), seq in zip(spans, batch.seqs, strict=True)
            if s < seq.num_prompt_tokens
        ]
        if prompt:
            tokens = sum(n for _, n in spans)
            pairs = sum(n * s + n * (n + 1) // 2 for s, n in spans)
            times.prefill_s += elapsed
            times.prefill_tokens += sum(n for _, n in prompt)
            times.prefill_flops += 2 * matmul_params * tokens + attn_flops * pairs
        else:
            times.decode_s += elapsed
            times.decode_tokens += len(spans)
            context = sum(s + 1 for s, _ in spans)
            times.decode_bytes += weight_bytes + context * kv_bytes_per_token
        return out

    engine.runner.run = timed


def _matmul_params(cfg) -> int:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = cfg.hidden_size * (q + 2 * kv) + q * cfg.hidden_size
    per_layer += 3 * cfg.hidden_size * cfg.intermediate_size
    return cfg.num_layers * per_layer + cfg.vocab_size * cfg.hidden_size


def print_row(name: str, label: str, result: dict) -> None:
    line = f"({name}) {label:40s} {result['rows_per_s']:9.1f} rows/s"
    times = result.get("times")
    if times is not None:
        prefill = times.prefill_tokens / max(times.prefill_s, 1e-9)
        decode = times.decode_tokens / max(times.decode_s, 1e-9)
        line += (
            f"  prefill {prefill:10.0f} tok/s  decode {decode:8.0f} tok/s"
            f"  hit rate {result['hit_rate']:.1%}"
        )
    print(line)


if __name__ == "__main__":
    main()
