"""CUDA graphs for decode-only steps: one graph per batch-size bucket, replayed with the step
padded to its bucket.

A decode step of a big model launches hundreds of small kernels; on a GPU their launch cost
is larger than their work. A graph is captured once per bucket over static input buffers
(token ids, positions, sequence lengths, block tables, KV slots); a step copies its inputs into
them from one pinned host buffer with a single non-blocking copy and replays. Padding rows have
length 0 and KV slot -1: the attention kernel and the KV store skip them. Only kernel sets
whose attention plan can be built without reading the device (Triton) are captured.

The same padded path runs eagerly (`capture=False`), which is how the CPU tests check it.
"""

from __future__ import annotations

import bisect

import torch

from llmudf.kernels import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    """Graphs of `model.forward` over decode-only steps of up to `max_batch` sequences whose
    contexts are at most `max_seq_len` tokens."""

    def __init__(
        self,
        model,
        kv_caches: list,
        page_size: int,
        max_seq_len: int,
        max_batch: int,
        device: torch.device,
        capture: bool = True,
    ):
        if not model.ops.supports_cuda_graphs:
            raise ValueError(f"the {model.ops.name!r} kernels cannot be captured in CUDA graphs")
        self.model = model
        self.kv_caches = kv_caches
        self.page_size = page_size
        self.max_seq_len = max_seq_len
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.capture = capture
        self.device = device
        num, self.max_pages = max_batch, -(-max_seq_len // page_size)
        # static inputs, views of one int64 device buffer filled from one pinned host buffer:
        # ids [num], positions [num], seq_lens [num], slots [num], block tables [num, max_pages]
        sizes = (num, num, num, num, num * self.max_pages)
        pin = device.type == "cuda"
        self._host = torch.zeros(sum(sizes), dtype=torch.int64, pin_memory=pin)
        self._static = torch.zeros(sum(sizes), dtype=torch.int64, device=device)
        ids, pos, lens, slots, tables = self._static.split(sizes)
        self._ids, self._positions, self._slots = ids, pos, slots
        self._seq_lens32 = torch.zeros(num, dtype=torch.int32, device=device)
        self._tables32 = torch.zeros(num, self.max_pages, dtype=torch.int32, device=device)
        self._lens64, self._tables64 = lens, tables.view(num, self.max_pages)
        self._cu = torch.arange(num + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._pool = None

    def capture_all(self) -> None:
        """Capture every bucket now (at engine start), over all-padding inputs, so that no
        step pays for a capture."""
        num = self.buckets[-1]
        self._host[2 * num : 4 * num] = torch.tensor([0] * num + [-1] * num)
        self._static.copy_(self._host)
        for bucket in reversed(self.buckets):  # the largest first: the others reuse its pool
            if bucket not in self._graphs:
                self._capture(bucket)

    def can_run(self, num_seqs: int, seq_lens: list[int]) -> bool:
        return num_seqs <= self.buckets[-1] and max(seq_lens) <= self.max_seq_len

    def run(
        self,
        token_ids: list[int],
        positions: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
    ) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode-only step of n sequences (one token each)."""
        n = len(token_ids)
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        num, width = self.buckets[-1], self.max_pages
        host = self._host  # rows past n keep stale ids and positions: harmless, length 0
        host[:n] = torch.tensor(token_ids)
        host[num : num + n] = torch.tensor(positions)
        host[2 * num : 3 * num] = 0
        host[2 * num : 2 * num + n] = torch.tensor(seq_lens)
        slots = [t[(p) // self.page_size] * self.page_size + p % self.page_size
                 for t, p in zip(tables, positions, strict=True)]  # fmt: skip
        host[3 * num : 4 * num] = -1
        host[3 * num : 3 * num + n] = torch.tensor(slots)
        rows = host[4 * num :].view(num, width)
        for i, pages in enumerate(tables):
            rows[i, : len(pages)] = torch.tensor(pages)
        self._static.copy_(host, non_blocking=True)
        if not self.capture:
            return self._forward(bucket)[:n]
        if bucket not in self._graphs:
            self._capture(bucket)
        self._graphs[bucket].replay()
        return self._outputs[bucket][:n]

    # -- private helpers -------------------------------------------------------------------

    def _forward(self, bucket: int) -> torch.Tensor:
        # int32 metadata from the int64 staging buffer: device ops, captured with the graph
        self._seq_lens32.copy_(self._lens64)
        self._tables32.copy_(self._tables64)
        meta = AttentionMetadata(
            cu_seqlens_q=self._cu[: bucket + 1],
            seq_lens=self._seq_lens32[:bucket],
            block_tables=self._tables32[:bucket],
            slot_mapping=self._slots[:bucket],
            max_seqlen_q=1,
            max_seqlen_k=self.max_seq_len,
        )
        cfg, dtype = self.model.config, self.model.embed_tokens.weight.dtype
        plan = self.model.ops.build_plan(
            meta,
            self.page_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            dtype,
            cascade=False,
            max_seq_len=self.max_seq_len,
        )
        return self.model.forward(
            self._ids[:bucket], self._positions[:bucket], meta, self.kv_caches, None, plan
        )

    def _capture(self, bucket: int) -> None:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(bucket)  # warm-up: compiles the kernels outside the capture
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self._outputs[bucket] = self._forward(bucket)
        self._graphs[bucket] = graph
