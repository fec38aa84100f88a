"""`ModelConfig`: the shape of a Llama-family model, read from a HF config.json (v4 or v5)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from llmudf.kernels.rotary import SUPPORTED_ROPE_TYPES

# HF model_type -> the architecture class transformers uses for it (also written to config.json)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


@dataclass(slots=True)
class ModelConfig:
    """One Llama-family decoder: Llama, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm).

    >>> cfg = ModelConfig.from_hf({"model_type": "llama", "vocab_size": 100, "hidden_size": 64,
    ...     "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128})
    >>> cfg.num_kv_heads, cfg.head_dim
    (4, 16)
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    # the longest context served; a sliding-window model is capped at its window so that
    # full attention stays exact
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.family not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model family {self.family!r}; supported: {list(ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope scaling {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}"
            )
        self.eos_token_ids = tuple(self.eos_token_ids)
        self.rope_scaling = dict(self.rope_scaling) if self.rope_scaling else None  # own copy

    @classmethod
    def from_hf(cls, config: dict) -> ModelConfig:
        """From the dict of a HF config.json (transformers v4 `rope_theta`/`rope_scaling` or
        v5 `rope_parameters`)."""
        family = config.get("model_type")
        if family not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {family!r} (architectures {config.get('architectures')}); "
                f"supported: {list(ARCHITECTURES)}"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {config['hidden_act']!r}; expected 'silu'")
        if family in ("llama", "mistral") and (
            config.get("attention_bias") or config.get("mlp_bias")
        ):
            raise ValueError(
                "Llama/Mistral models with attention_bias or mlp_bias are not supported"
            )
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or config.get("rope_theta") or 10000.0
        if "type" in rope and "rope_type" not in rope:  # the oldest spelling
            rope["rope_type"] = rope.pop("type")
        scaling = rope if rope.get("rope_type", "default") != "default" else None
        heads = config["num_attention_heads"]
        max_pos = config.get("max_position_embeddings", 4096)
        window = config.get("sliding_window")
        uses_window = family == "mistral" or config.get("use_sliding_window", False)
        if window and uses_window:
            max_pos = min(max_pos, window)
        eos = config.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        return cls(
            family=family,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            qkv_bias=family == "qwen2"
            or (family == "qwen3" and config.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            max_position_embeddings=max_pos,
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos,
        )

    def to_hf(self) -> dict:
        """The HF config.json dict of this model (what transformers needs to rebuild it)."""
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        out = {
            "architectures": [ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) or None,
            "torch_dtype": "float32",
        }
        if self.family == "qwen3":
            out["attention_bias"] = self.qkv_bias
        if self.family == "mistral":
            out["sliding_window"] = None
        return out

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return ModelConfig(**{**asdict(self), **changes})
