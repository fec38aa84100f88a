"""One forward pass of the default model: our paged model vs transformers, same weights.

    python bench/forward.py --seqs 16 --tokens 100

Runs (a) a prefill of `seqs` prompts of `tokens` tokens each and (b) one decode step of the
same sequences, in our model (flat batch, paged KV) and in transformers (padded batch, its
own KV cache), fp32, and prints the median time of each (runs interleaved), the ratios, and
what fraction of this machine's fp32 matmul peak (measured in the same run) each prefill
reaches; the last line is JSON. Writes bench/results/forward.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _common import alternate, write_result
from _roofline import FlopModel, matmul_peak_flops

from llmudf.engine.weights import load_model, resolve_model_dir
from llmudf.kernels import AttentionMetadata


def median_of(fns, repeats: int) -> list[float]:
    """The median time of each function, run interleaved so that load from elsewhere on the
    machine hits all of them alike."""
    runs = alternate({str(i): fn for i, fn in enumerate(fns)}, repeats)
    return [runs[str(i)].median for i in range(len(fns))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = matmul_peak_flops()
    from transformers import AutoModelForCausalLM

    model, cfg, _ = load_model()
    hf = AutoModelForCausalLM.from_pretrained(resolve_model_dir(None), dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (args.seqs, args.tokens), generator=gen)
    page_size = 16
    pages_per_seq = -(-(args.tokens + 1) // page_size)
    shape = (args.seqs * pages_per_seq, page_size, cfg.num_kv_heads, cfg.head_dim)
    kv_caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)]
    tables = [list(range(s * pages_per_seq, (s + 1) * pages_per_seq)) for s in range(args.seqs)]
    last_rows = torch.arange(args.seqs) * args.tokens + args.tokens - 1

    def ours_prefill():
        meta = AttentionMetadata.build(
            [args.tokens] * args.seqs, [args.tokens] * args.seqs, tables, page_size
        )
        positions = torch.arange(args.tokens).repeat(args.seqs)
        hidden = model(ids.flatten(), positions, meta, kv_caches)
        return model.compute_logits(hidden[last_rows])

    def ours_decode():
        n = args.tokens + 1
        meta = AttentionMetadata.build([1] * args.seqs, [n] * args.seqs, tables, page_size)
        hidden = model(ids[:, 0], torch.full((args.seqs,), n - 1), meta, kv_caches)
        return model.compute_logits(hidden)

    hf_state = {}

    def hf_prefill():
        out = hf(ids, use_cache=True, logits_to_keep=1)
        hf_state["cache"] = out.past_key_values
        return out.logits[:, -1]

    def hf_decode():
        cache = hf_state["cache"]
        extra = cache.get_seq_length() - args.tokens
        if extra:
            cache.crop(-extra)  # undo the previous timed decode step
        return hf(ids[:, :1], past_key_values=cache, use_cache=True).logits[:, -1]

    with torch.inference_mode():
        torch.testing.assert_close(ours_prefill(), hf_prefill(), atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(ours_decode(), hf_decode(), atol=1e-3, rtol=1e-3)
        t_ours_prefill, t_hf_prefill = median_of([ours_prefill, hf_prefill], args.repeats)
        t_ours_decode, t_hf_decode = median_of([ours_decode, hf_decode], args.repeats * 3)
    peak = max(peak, matmul_peak_flops())  # again, warm: the higher of the two
    tokens = args.seqs * args.tokens
    prefill_flops = FlopModel.from_config(cfg).flops([(0, args.tokens)] * args.seqs, args.seqs)
    roofline = {
        "ours": prefill_flops / (peak * t_ours_prefill),
        "hf": prefill_flops / (peak * t_hf_prefill),
    }
    print(
        f"prefill {args.seqs}x{args.tokens}: ours {t_ours_prefill:.3f}s "
        f"({tokens / t_ours_prefill:.0f} tok/s)"
        f"  transformers {t_hf_prefill:.3f}s  ratio {t_hf_prefill / t_ours_prefill:.2f}x"
    )
    print(
        f"decode  {args.seqs} seqs at {args.tokens}: ours {t_ours_decode * 1e3:.1f}ms"
        f"  transformers {t_hf_decode * 1e3:.1f}ms  ratio {t_hf_decode / t_ours_decode:.2f}x"
    )
    print(
        f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; prefill reaches {roofline['ours']:.2f} of"
        f" it (ours), {roofline['hf']:.2f} (transformers)"
    )
    result = {
        "seqs": args.seqs,
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "peak_gflops": round(peak / 1e9, 1),
        "prefill_s_ours": round(t_ours_prefill, 4),
        "prefill_s_hf": round(t_hf_prefill, 4),
        "prefill_speedup": round(t_hf_prefill / t_ours_prefill, 3),
        "prefill_fraction_of_roofline_ours": round(roofline["ours"], 3),
        "prefill_fraction_of_roofline_hf": round(roofline["hf"], 3),
        "decode_ms_ours": round(t_ours_decode * 1e3, 2),
        "decode_ms_hf": round(t_hf_decode * 1e3, 2),
        "decode_speedup": round(t_hf_decode / t_ours_decode, 3),
    }
    print(json.dumps(result))
    headline = {
        k: result[k]
        for k in (
            "prefill_speedup",
            "decode_speedup",
            "prefill_fraction_of_roofline_ours",
            "prefill_fraction_of_roofline_hf",
        )
    }
    write_result("forward", result, headline=headline, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
