"""EngineConfig: every knob of the engine in one validated dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT_OVERFLOW_POLICIES = ("error", "truncate_left")
SCHEDULE_POLICIES = ("dfs", "fcfs")
CPU_KV_BYTES_CAP = 2 << 30
HOST_KV_FRACTION = 0.3  # at most this share of free RAM goes to the default host KV tier


@dataclass(slots=True)
class EngineConfig:
    """How to build and run an Engine.

    model: a Hugging Face model folder, a .gguf file, or None / "smollm2" for the default
    SmolLM2-135M-Instruct. device: "auto" (cuda if available, else cpu), "cpu", "cuda[:i]".
    dtype: "auto" (float32 on CPU, bfloat16 on CUDA) or a name from float32/bfloat16/float16.

    page_size: tokens per KV page; None = 1 on CPU (prefixes are reused to the token; the
    torch attention gathers by slot, so small pages cost nothing) and 16 on CUDA.

    KV memory: `num_kv_pages` if given, else `kv_cache_bytes` if given, else
    `kv_cache_fraction` of the device's free memory; on CPU that share of host RAM is capped
    at `CPU_KV_BYTES_CAP` (2 GiB), since host memory is shared with everything else.
    `host_kv_cache_bytes`: the host tier under the prefix cache (see the field's comment);
    `cpu_attention_offload`: NEO-style decode attention on the CPU for requests whose KV
    does not fit the device pool (docs/DESIGN.md, "KV tiers").

    kernels: "auto" (Triton on CUDA when importable, else the torch references), "torch" or
    "triton"; chosen once when the model is built. deterministic: batch-invariant kernels on
    the GPU (fixed attention split, fixed-tile matmuls, no cascade), so a greedy answer is the
    same whatever the batch, plan or cache state; False allows cascade attention and faster
    splits. CUDA graphs replay decode-only steps of at most `cuda_graph_max_batch` sequences
    (0 = never).

    prompt_overflow: what to do with a prompt that leaves no room for generation within
    `max_model_len`: "error" (default; a ValueError naming both lengths) or "truncate_left"
    (keep the end of the prompt; SamplingParams.truncate_left overrides per request).

    >>> EngineConfig(device="cpu", max_num_batched_tokens=1024).max_num_batched_tokens
    1024
    """

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    page_size: int | None = None
    num_kv_pages: int | None = None
    kv_cache_bytes: int | None = None
    kv_cache_fraction: float = 0.8
    max_num_batched_tokens: int = 4096
    max_num_seqs: int = 256
    max_model_len: int | None = None
    enable_prefix_cache: bool = True
    schedule_policy: str = "dfs"
    prompt_overflow: str = "error"
    # In-step look-ahead: a waiting request that shares this many more tokens with a request
    # admitted in the same step than with the cache waits one step and reuses its KV instead.
    # 8, not more: a server holds the system prompt already, and a query's instruction is
    # often ~10 tokens; with 32, 63 filter prompts computed 1,366 tokens instead of 743.
    min_shared_prefix_to_defer: int = 8
    kernels: str = "auto"
    deterministic: bool = True
    cuda_graph_max_batch: int = 256
    # Host KV tier under the radix cache: bytes of host memory (pinned on CUDA) that evicted
    # prefixes are written back to and loaded from instead of recomputed; None = twice the
    # device pool (SGLang's default ratio), at most HOST_KV_FRACTION of free RAM; 0 = off.
    host_kv_cache_bytes: int | None = None
    # NEO: when the device pool runs short, decoding requests move their KV to the host pool
    # and their decode attention runs on the CPU instead of being preempted and recomputed.
    cpu_attention_offload: bool = False

    def __post_init__(self):
        if self.page_size is None:
            self.page_size = 16 if resolve_device(self.device).type == "cuda" else 1
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")
        if self.num_kv_pages is not None and self.num_kv_pages < 1:
            raise ValueError(f"num_kv_pages must be >= 1, got {self.num_kv_pages}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")
        if self.host_kv_cache_bytes is not None and self.host_kv_cache_bytes < 0:
            raise ValueError(
                "host_kv_cache_bytes must be >= 0 (0 = no host tier), "
                f"got {self.host_kv_cache_bytes}"
            )
        if self.cpu_attention_offload and self.host_kv_cache_bytes == 0:
            raise ValueError("cpu_attention_offload needs a host KV pool; host_kv_cache_bytes is 0")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(
                f"schedule_policy must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}"
            )
        if self.prompt_overflow not in PROMPT_OVERFLOW_POLICIES:
            raise ValueError(
                f"prompt_overflow must be one of {PROMPT_OVERFLOW_POLICIES}, "
                f"got {self.prompt_overflow!r}"
            )
        if self.kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"kernels must be 'auto', 'torch' or 'triton', got {self.kernels!r}")
        if self.cuda_graph_max_batch < 0:
            raise ValueError(f"cuda_graph_max_batch must be >= 0, got {self.cuda_graph_max_batch}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {list(_DTYPES)}, got {self.dtype!r}")
        resolve_device(self.device)  # fail early on a malformed device string

    @property
    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        return torch.bfloat16 if self.torch_device.type == "cuda" else torch.float32


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}") from exc


def free_device_memory(device: torch.device) -> int:
    """Bytes free on `device` now (host RAM available to this process on CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
