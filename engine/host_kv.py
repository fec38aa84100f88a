"""The host tier of the KV cache: pages in host memory and the copies to and from the device.

`HostKVPool` holds K/V pages per layer in host RAM (pinned on CUDA, so copies are
asynchronous). A host page has one owner (a radix node, or a request whose decode attention
runs on the CPU), so the pool keeps a free list and no reference counts.

`KVCopier` copies whole pages between the device `KVPool` and the host pool. On CPU both
pools are in RAM and a copy is an `index_copy_`. On CUDA copies run on a side stream:
- write-back (device -> host) waits for the compute stream's work so far, and the compute
  stream waits for the write-back before its next forward (`before_forward`), so a freed
  device page is not overwritten while it is still being read;
- load-back (host -> device) records one event per layer; layer i's caches are handed to the
  model only after the compute stream waits for event i (`KVPool.kv_caches` calls
  `before_layer`), so the first layers compute while the last ones still load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmudf.engine.config import HOST_KV_FRACTION, EngineConfig, free_device_memory
from llmudf.engine.kv_pool import KVPool, KVShape


class HostKVPool:
    """Host pages `[num_pages, page_size, num_kv_heads, head_dim]` for K and V per layer.

    >>> host = HostKVPool(KVShape(num_layers=1, num_kv_heads=1, head_dim=2, page_size=4), 3)
    >>> pages = host.allocate(2); host.num_free_pages
    1
    >>> host.free(pages); host.num_free_pages
    3
    """

    def __init__(
        self,
        shape: KVShape,
        num_pages: int,
        dtype: torch.dtype = torch.float32,
        pin_memory: bool = False,
    ):
        if num_pages < 1:
            raise ValueError(f"a host KV pool needs at least one page, got {num_pages}")
        self.shape = shape
        self.num_pages = num_pages
        self.page_size = shape.page_size
        dims = (num_pages, shape.page_size, shape.num_kv_heads, shape.head_dim)
        # empty, not zeros: a page is always written before it is read, and untouched host
        # pages of a large pool then cost no resident memory
        self.k_caches = [
            torch.empty(dims, dtype=dtype, pin_memory=pin_memory) for _ in range(shape.num_layers)
        ]
        self.v_caches = [
            torch.empty(dims, dtype=dtype, pin_memory=pin_memory) for _ in range(shape.num_layers)
        ]
        self._is_free = [True] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @classmethod
    def from_config(cls, config: EngineConfig, device_pool: KVPool) -> HostKVPool | None:
        """The engine's host pool: `host_kv_cache_bytes`, or by default twice the device pool
        capped at HOST_KV_FRACTION of free RAM; None when the tier is off (0 bytes)."""
        dtype = config.torch_dtype
        per_page = device_pool.shape.bytes_per_page(dtype)
        budget = config.host_kv_cache_bytes
        if budget is None:
            host_free = free_device_memory(torch.device("cpu"))
            budget = min(2 * device_pool.num_pages * per_page, int(host_free * HOST_KV_FRACTION))
        if budget == 0:
            return None
        num_pages = budget // per_page
        if num_pages < 1:
            raise ValueError(
                f"a host KV budget of {budget} bytes holds no page (one page takes "
                f"{per_page} bytes); set host_kv_cache_bytes=0 to turn the host tier off"
            )
        pin = config.torch_device.type == "cuda"
        return cls(device_pool.shape, num_pages, dtype, pin_memory=pin)

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def can_allocate(self, num_pages: int) -> bool:
        return num_pages <= len(self._free)

    def allocate(self, num_pages: int) -> list[int]:
        if num_pages > len(self._free):
            raise RuntimeError(
                f"host KV pool exhausted: asked for {num_pages} pages, {len(self._free)} free"
            )
        pages = [self._free.pop() for _ in range(num_pages)]
        for page in pages:
            self._is_free[page] = False
        return pages

    def zero(self, pages: list[int]) -> None:
        """Zeroes pages whose unwritten slots will be read (a decode's last page): attention
        masks those slots out, but a NaN left there by old memory would survive the mask."""
        index = torch.tensor(pages, dtype=torch.long)
        for cache in (*self.k_caches, *self.v_caches):
            cache.index_fill_(0, index, 0)

    def free(self, pages: list[int]) -> None:
        for page in pages:
            if self._is_free[page]:
                raise RuntimeError(f"host page {page} is already free")
            self._is_free[page] = True
            self._free.append(page)


@dataclass(slots=True)
class CopyStats:
    num_pages_to_host: int = 0
    num_pages_to_device: int = 0
    num_bytes_to_host: int = 0
    num_bytes_to_device: int = 0


class KVCopier:
    """Copies whole pages between a device KVPool and a HostKVPool (see the module doc)."""

    def __init__(self, device_pool: KVPool, host_pool: HostKVPool):
        if device_pool.shape != host_pool.shape:
            raise ValueError("the host pool's page shape differs from the device pool's")
        self.device_pool = device_pool
        self.host_pool = host_pool
        self.stats = CopyStats()
        self._bytes_per_page = device_pool.shape.bytes_per_page(device_pool.k_caches[0].dtype)
        device = device_pool.k_caches[0].device
        self._is_cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._is_cuda else None
        self._write_done: torch.cuda.Event | None = None
        self._layer_loaded: list[torch.cuda.Event] | None = None
        if self._is_cuda:
            device_pool.before_layer = self.before_layer

    def to_host(self, device_pages: list[int], host_pages: list[int]) -> None:
        """Write-back: device pages' K/V into host pages (the caller may free the device pages
        at once; on CUDA the next forward waits for the copy, see `before_forward`)."""
        if not device_pages:
            return
        src, dst = self.device_pool, self.host_pool
        if self._is_cuda:
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                _copy_runs(src, device_pages, dst, host_pages)
                self._write_done = torch.cuda.Event()
                self._write_done.record()
        else:
            _copy_indexed(src, device_pages, dst, host_pages)
        self.stats.num_pages_to_host += len(device_pages)
        self.stats.num_bytes_to_host += len(device_pages) * self._bytes_per_page

    def to_device(self, host_pages: list[int], device_pages: list[int]) -> None:
        """Load-back: host pages' K/V into (freshly allocated) device pages. On CUDA it runs
        asynchronously; layer i is waited for only right before layer i runs."""
        if not host_pages:
            return
        src, dst = self.host_pool, self.device_pool
        if self._is_cuda:
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                events = []
                for layer in range(len(dst.k_caches)):
                    _copy_runs(src, host_pages, dst, device_pages, layer)
                    events.append(torch.cuda.Event())
                    events[-1].record()
            self._layer_loaded = events  # later loads run after earlier ones on one stream
        else:
            _copy_indexed(src, host_pages, dst, device_pages)
        self.stats.num_pages_to_device += len(host_pages)
        self.stats.num_bytes_to_device += len(host_pages) * self._bytes_per_page

    def synchronize(self) -> None:
        """Blocks until every copy issued so far is done (before the CPU reads host pages)."""
        if self._is_cuda:
            self._stream.synchronize()

    def before_forward(self) -> None:
        """CUDA: the compute stream waits (on the GPU, not the CPU) for pending write-backs,
        whose source pages may be handed out again in this step."""
        if self._write_done is not None:
            torch.cuda.current_stream().wait_event(self._write_done)
            self._write_done = None

    def wait_for_loads(self) -> None:
        """CUDA: the compute stream waits for every pending load-back (before a CUDA graph
        replay, which skips the per-layer waits)."""
        if self._layer_loaded is not None:
            torch.cuda.current_stream().wait_event(self._layer_loaded[-1])
            self._layer_loaded = None

    def before_layer(self, layer: int) -> None:
        if self._layer_loaded is not None:
            torch.cuda.current_stream().wait_event(self._layer_loaded[layer])
            if layer == len(self._layer_loaded) - 1:
                self._layer_loaded = None


# ---- private helpers ---------------------------------------------------------------------


def _copy_indexed(src, src_pages: list[int], dst, dst_pages: list[int]) -> None:
    """Same-device-kind copy (CPU): one gather + scatter per layer and K/V."""
    src_index = torch.tensor(src_pages, dtype=torch.long)
    dst_index = torch.tensor(dst_pages, dtype=torch.long)
    for caches in ((src.k_caches, dst.k_caches), (src.v_caches, dst.v_caches)):
        for s, d in zip(*caches, strict=True):
            d.index_copy_(0, dst_index, s.index_select(0, src_index))


def _copy_runs(src, src_pages, dst, dst_pages, layer: int | None = None) -> None:
    """Host <-> device copy (CUDA, on the current stream): one asynchronous memcpy per run of
    pages consecutive on both sides (pinned host memory makes non_blocking truly async)."""
    layers = range(len(src.k_caches)) if layer is None else (layer,)
    for s0, d0, n in _runs(src_pages, dst_pages):
        for i in layers:
            dst.k_caches[i][d0 : d0 + n].copy_(src.k_caches[i][s0 : s0 + n], non_blocking=True)
            dst.v_caches[i][d0 : d0 + n].copy_(src.v_caches[i][s0 : s0 + n], non_blocking=True)


def _runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """[(src_start, dst_start, length)] of runs where both page lists count up by one.

    >>> _runs([4, 5, 6, 9], [0, 1, 7, 8])
    [(4, 0, 2), (6, 7, 1), (9, 8, 1)]
    """
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs
