import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from llmudf.kernels import apply_rotary, rms_norm, rope_inv_freq, rotary_cos_sin


def test_rms_norm_matches_transformers():
    x = torch.randn(5, 32) * 3
    ref = LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(32))
    torch.testing.assert_close(rms_norm(x, ref.weight, 1e-5), ref(x))


def test_apply_rotary_matches_transformers():
    inv_freq = rope_inv_freq(16, 10000.0)
    cos, sin = rotary_cos_sin(inv_freq, 64)
    positions = torch.tensor([0, 5, 63, 7])
    q, k = torch.randn(4, 3, 16), torch.randn(4, 1, 16)
    # transformers: [B, H, T, D] with cos/sin [B, T, D]
    ref_q, ref_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[positions][None], sin[positions][None]
    )
    torch.testing.assert_close(
        apply_rotary(q, cos[positions], sin[positions]), ref_q[0].transpose(0, 1)
    )
    torch.testing.assert_close(
        apply_rotary(k, cos[positions], sin[positions]), ref_k[0].transpose(0, 1)
    )
    assert torch.equal(apply_rotary(q, cos[:1].expand(4, -1), sin[:1].expand(4, -1)), q)  # pos 0


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_inv_freq_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=128, num_attention_heads=2, rope_theta=500000.0, rope_scaling=scaling
    )
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected = LlamaRotaryEmbedding.compute_default_rope_parameters(config)[0]
    else:
        expected = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")[0]
    torch.testing.assert_close(rope_inv_freq(64, 500000.0, scaling), expected)
    if scaling:
        assert not torch.equal(rope_inv_freq(64, 500000.0, scaling), rope_inv_freq(64, 500000.0))


def test_unknown_rope_type_is_rejected():
    with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 2.0})
