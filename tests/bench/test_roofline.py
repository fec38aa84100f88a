"""bench/_roofline.py: the FLOPs it counts are the ones torch's own counter sees in a real
forward pass (a tiny random-init transformers Llama), and the peak is a plausible rate."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from llmudf.engine.models import tiny_config


def test_flops_match_torch_flop_counter(bench_module):
    from transformers import LlamaConfig, LlamaForCausalLM

    roofline = bench_module("_roofline")
    cfg = tiny_config("llama")
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            tie_word_embeddings=False,
        )
    ).eval()
    model = roofline.FlopModel.from_config(cfg)
    hf.config._attn_implementation = "eager"  # attention as plain matmuls, which torch counts
    length = 12
    ids = torch.randint(0, cfg.vocab_size, (1, length))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        hf(ids, logits_to_keep=1)
    per_token = 2 * cfg.num_layers * model.matmul_weights_per_layer
    logits = 2 * cfg.hidden_size * cfg.vocab_size
    score_flops = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim
    # eager attention computes the whole length x length score matrix ...
    assert counter.get_total_flops() == per_token * length + logits + score_flops * length**2
    # ... of which a causal forward needs each position's keys so far
    causal = score_flops * length * (length + 1) // 2
    assert model.flops([(0, length)], num_logits=1) == per_token * length + logits + causal


def test_spans_count_cached_keys_but_not_cached_tokens(bench_module):
    model = bench_module("_roofline").FlopModel(1, 4, 1, 1, 4, 8, 10)
    per_token = 2 * model.matmul_weights_per_layer
    # positions 5..7 computed (5 cached): keys 6 + 7 + 8
    assert model.flops([(5, 8)], 0) == 3 * per_token + 4 * 4 * (6 + 7 + 8)
    assert model.flops([(0, 2), (2, 3)], 0) == model.flops([(0, 3)], 0)


def test_matmul_peak_is_a_plausible_rate(bench_module):
    peak = bench_module("_roofline").matmul_peak_flops(size=256, repeats=2)
    assert 1e8 < peak < 1e15
