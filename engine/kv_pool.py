"""The paged KV pool: preallocated K/V pages per layer, a free list, and page refcounts.

A page is referenced by every running sequence whose block table holds it and by the radix
cache node that stores it; it returns to the free list when the last reference goes.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass

import torch

from llmudf.engine.config import CPU_KV_BYTES_CAP, EngineConfig, free_device_memory


@dataclass(frozen=True, slots=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    page_size: int

    def bytes_per_page(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        # K and V, every layer
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * elem


class KVPool:
    """Preallocated pages `[num_pages, page_size, num_kv_heads, head_dim]` for K and V per layer.

    >>> pool = KVPool(KVShape(num_layers=2, num_kv_heads=1, head_dim=4, page_size=8), 4)
    >>> pages = pool.allocate(3); pool.num_free_pages
    1
    >>> pool.dec_ref(pages)  # pages freed
    3
    """

    def __init__(
        self,
        shape: KVShape,
        num_pages: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if num_pages < 1:
            raise ValueError(f"a KV pool needs at least one page, got {num_pages}")
        self.shape = shape
        self.num_pages = num_pages
        self.page_size = shape.page_size
        dims = (num_pages, shape.page_size, shape.num_kv_heads, shape.head_dim)
        self.k_caches = [
            torch.zeros(dims, device=device, dtype=dtype) for _ in range(shape.num_layers)
        ]
        self.v_caches = [
            torch.zeros(dims, device=device, dtype=dtype) for _ in range(shape.num_layers)
        ]
        self._ref_counts = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        # called with i right before layer i's caches are handed to the model (set by the
        # host tier's KVCopier on CUDA to wait for that layer's load-back)
        self.before_layer: Callable[[int], None] | None = None

    @classmethod
    def from_budget(
        cls,
        shape: KVShape,
        num_bytes: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVPool:
        """As many pages as fit in `num_bytes`; a clear error if not even one does."""
        per_page = shape.bytes_per_page(dtype)
        num_pages = num_bytes // per_page
        if num_pages < 1:
            raise ValueError(
                f"a KV budget of {num_bytes} bytes holds no page (one page takes {per_page} bytes)"
            )
        return cls(shape, num_pages, device, dtype)

    @classmethod
    def from_config(cls, config: EngineConfig, shape: KVShape, max_len: int) -> KVPool:
        """An engine's pool: `num_kv_pages` if set, else `kv_cache_bytes`, else
        `kv_cache_fraction` of the device's free memory (at most CPU_KV_BYTES_CAP on CPU);
        never more than `max_num_seqs` sequences of `max_len` tokens can use."""
        device, dtype = config.torch_device, config.torch_dtype
        if config.num_kv_pages is not None:
            return cls(shape, config.num_kv_pages, device, dtype)
        budget = config.kv_cache_bytes
        if budget is None:
            budget = int(free_device_memory(device) * config.kv_cache_fraction)
            if device.type == "cpu":
                budget = min(budget, CPU_KV_BYTES_CAP)
        max_pages = -(-max_len // shape.page_size) * config.max_num_seqs
        budget = min(budget, max_pages * shape.bytes_per_page(dtype))
        return cls.from_budget(shape, budget, device, dtype)

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def kv_caches(self) -> SequenceABC[tuple[torch.Tensor, torch.Tensor]]:
        """(k_cache, v_cache) per layer; with a `before_layer` hook, a sequence that calls it
        as each layer's pair is taken (the model takes them one layer at a time)."""
        if self.before_layer is None:
            return list(zip(self.k_caches, self.v_caches, strict=True))
        return _LayerwiseCaches(self)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        """`num_pages` fresh pages with refcount 1; raises if the pool cannot supply them."""
        if num_pages > len(self._free):
            raise RuntimeError(
                f"KV pool exhausted: asked for {num_pages} pages, {len(self._free)} free"
            )
        pages = [self._free.pop() for _ in range(num_pages)]
        for page in pages:
            self._ref_counts[page] = 1
        return pages

    def inc_ref(self, pages: list[int]) -> None:
        for page in pages:
            if self._ref_counts[page] == 0:
                raise RuntimeError(f"page {page} is free; cannot take a reference to it")
            self._ref_counts[page] += 1

    def dec_ref(self, pages: list[int]) -> int:
        """Drops one reference from each page; returns how many pages became free."""
        num_freed = 0
        for page in pages:
            count = self._ref_counts[page] - 1
            if count < 0:
                raise RuntimeError(f"page {page} is already free")
            self._ref_counts[page] = count
            if count == 0:
                self._free.append(page)
                num_freed += 1
        return num_freed

    def ref_count(self, page: int) -> int:
        return self._ref_counts[page]


class _LayerwiseCaches(SequenceABC):
    def __init__(self, pool: KVPool):
        self._pool = pool

    def __len__(self) -> int:
        return len(self._pool.k_caches)

    def __getitem__(self, layer):
        if not isinstance(layer, int):
            raise TypeError("index the layer caches with one layer number")
        if not -len(self) <= layer < len(self):
            raise IndexError(layer)
        layer %= len(self)
        self._pool.before_layer(layer)
        return self._pool.k_caches[layer], self._pool.v_caches[layer]
