"""NEO-style decode attention on the CPU for requests whose KV lives in the host pool.

The scheduler puts those requests last in a step's flat batch (`ScheduledBatch.num_host_seqs`).
Every linear layer still runs on the device for the whole batch; in each attention layer the
device attends the first rows (paged KV in the device pool) while the CPU attends the last
ones (paged KV in the host pool), and the two outputs are joined. On CUDA the host rows'
q/k/v are copied to pinned memory before the device attention is launched, so the CPU works
while the GPU attends (NEO's asymmetric pipelining, within one layer). On a CPU-only machine
both run on the CPU, one after the other, which is what makes the path testable here.
"""

from __future__ import annotations

import torch

from llmudf.engine.host_kv import KVCopier
from llmudf.engine.request import Sequence
from llmudf.kernels import AttentionMetadata, AttentionPlan, KernelSet
from llmudf.kernels.cpu_attention import cpu_decode_attention, store_decode_kv


class HostDecodeBatch:
    """The host-KV decodes of one step: rows `num_device_tokens:` of the flat batch."""

    def __init__(
        self,
        copier: KVCopier,
        seqs: list[Sequence],
        seq_lens: list[int],
        num_device_tokens: int,
        device: torch.device,
    ):
        host = copier.host_pool
        page_size = host.page_size
        copier.synchronize()  # write-backs of this step's moves are done before the CPU reads
        self.host = host
        self.num_device_tokens = num_device_tokens
        self.num_seqs = len(seqs)
        self.device = device
        width = max(len(seq.host_pages) for seq in seqs)
        table = [
            seq.host_pages + [seq.host_pages[0]] * (width - len(seq.host_pages)) for seq in seqs
        ]
        self.block_tables = torch.tensor(table, dtype=torch.long)  # [B, P] on the CPU
        self.seq_lens = torch.tensor(seq_lens)
        pos = [n - 1 for n in seq_lens]  # the new token's position
        self.slots = torch.tensor(
            [
                seq.host_pages[p // page_size] * page_size + p % page_size
                for seq, p in zip(seqs, pos, strict=True)
            ],
            dtype=torch.long,
        )
        if device.type == "cuda":
            self._done = torch.cuda.Event()

    def layer(self, index: int) -> LayerDecode:
        return LayerDecode(self, index)


class LayerDecode:
    """One attention layer's split: device rows on the device, host rows on the CPU."""

    def __init__(self, batch: HostDecodeBatch, index: int):
        self.batch = batch
        self.index = index

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata | None,
        plan: AttentionPlan | None,
        scale: float,
        ops: KernelSet,
    ) -> torch.Tensor:
        """q: [T, Hq, D], k, v: [T, Hkv, D] of the whole flat batch -> attention out [T, Hq, D];
        the device rows go through the model's kernel set `ops`."""
        batch, n = self.batch, self.batch.num_device_tokens
        qh, kh, vh = self._to_cpu(q[n:], k[n:], v[n:])
        out = None
        if n:  # launched before the CPU part: on CUDA both run at once
            ops.store_kv(k[:n], v[:n], kv_cache[0], kv_cache[1], meta.slot_mapping)
            out = ops.paged_attention(q[:n], kv_cache[0], kv_cache[1], meta, scale, plan)
        if batch.device.type == "cuda":
            batch._done.synchronize()  # only the q/k/v copies, not the device attention
        host_k, host_v = batch.host.k_caches[self.index], batch.host.v_caches[self.index]
        store_decode_kv(kh, vh, host_k, host_v, batch.slots)
        oh = cpu_decode_attention(qh, host_k, host_v, batch.block_tables, batch.seq_lens, scale)
        oh = oh.to(q.device, non_blocking=True)
        return oh if out is None else torch.cat([out, oh])

    def _to_cpu(self, q, k, v):
        if self.batch.device.type != "cuda":
            return q, k, v
        # pinned staging, so the copies are asynchronous and precede the device attention
        copies = []
        for t in (q, k, v):
            pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            pinned.copy_(t, non_blocking=True)
            copies.append(pinned)
        self.batch._done.record()
        return copies
