"""The model runner: turns a ScheduledBatch into one flat forward pass and samples.

Every scheduled token of every sequence goes into one flat batch ([T]); logits are computed
only for the last token of the sequences that sample this step (the model's last layer
runs its o_proj and MLP on those tokens only). The step's attention metadata and plan are
built here, once, and passed to every layer. A constrained sequence's `Constraint` says
which tokens it may take; the runner does not know what kind of constraint it is.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
from dataclasses import dataclass

import torch

from llmudf.engine.cpu_offload import HostDecodeBatch
from llmudf.engine.cuda_graphs import DecodeGraphs
from llmudf.engine.host_kv import KVCopier
from llmudf.engine.kv_pool import KVPool
from llmudf.engine.request import Sequence
from llmudf.engine.sampling import Sampler
from llmudf.engine.scheduler import ScheduledBatch
from llmudf.kernels import AttentionMetadata


@dataclass(slots=True)
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float | None


class ModelRunner:
    """Runs `model` (forward + compute_logits, see docs/DESIGN.md) over the pool's KV pages."""

    def __init__(
        self,
        model,
        pool: KVPool,
        device: torch.device,
        vocab_size: int,
        copier: KVCopier | None = None,
        cuda_graph_max_batch: int = 256,
    ):
        self.model = model
        self.copier = copier  # the host KV tier, for steps with decodes over host KV
        # the tokenizer's vocab may be smaller than the model's padded embedding table
        self.vocab_size = vocab_size
        self.pool = pool
        self.device = device
        self.sampler = Sampler()
        cfg = model.config
        self._heads = (cfg.num_heads, cfg.num_kv_heads)
        self._dtype = next(model.parameters()).dtype
        self._kv_caches = pool.kv_caches
        if device.type == "cpu":
            keep_freed_host_memory()
        self._graphs = _decode_graphs(model, pool, device, cuda_graph_max_batch)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[SampledToken]:
        seqs, counts = batch.seqs, batch.num_new_tokens
        starts = [seq.num_computed_tokens for seq in seqs]
        input_ids: list[int] = []
        for seq, start, n in zip(seqs, starts, counts, strict=True):
            input_ids += seq.token_ids[start : start + n]
        seq_lens = [start + n for start, n in zip(starts, counts, strict=True)]
        page_size = self.pool.page_size
        # the last batch.num_host_seqs sequences decode over host KV, on the CPU (NEO)
        num_device = batch.num_device_seqs
        meta = plan = offload = None
        if num_device:
            meta = AttentionMetadata.build(
                counts[:num_device],
                seq_lens[:num_device],
                [seq.pages for seq in seqs[:num_device]],
                page_size,
                self.device,
            )
            plan = self.model.ops.build_plan(meta, page_size, *self._heads, self._dtype)
        if num_device < len(seqs):
            offload = HostDecodeBatch(
                self.copier,
                seqs[num_device:],
                seq_lens[num_device:],
                sum(counts[:num_device]),
                self.device,
            )
        counts_t = torch.tensor(counts, device=self.device)
        cu = torch.tensor([0, *itertools.accumulate(counts)], device=self.device)
        # position of flat token t = its offset inside its sequence's chunk + the chunk's start
        offsets = torch.tensor(starts, device=self.device) - cu[:-1]
        positions = torch.arange(len(input_ids), device=self.device)
        positions += torch.repeat_interleave(offsets, counts_t)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        rows = [i for i, seq in enumerate(seqs) if seq_lens[i] == len(seq)]
        last = (cu[1:] - 1)[torch.tensor(rows, dtype=torch.long, device=self.device)]
        if self._use_graphs(counts, seq_lens, offload):
            if self.copier is not None:  # a replay takes no layer-wise waits for load-backs
                self.copier.wait_for_loads()
            tables = [seq.pages for seq in seqs]
            hidden = self._graphs.run(input_ids, starts, seq_lens, tables)  # [N, H]
        else:
            hidden = self.model.forward(
                ids, positions, meta, self._kv_caches, last, plan, offload
            )  # [N, H]
        if not rows:
            return []
        sampling = [seqs[i] for i in rows]
        params = [seq.params for seq in sampling]
        allowed = [None if s.constraint is None else s.constraint.allowed() for s in sampling]
        want_logprobs = any(p.logprobs for p in params)
        candidates = _candidate_tokens(allowed, params, want_logprobs)
        if candidates is None:
            logits = self.model.compute_logits(hidden)[:, : self.vocab_size]  # [N, V] fp32
        else:  # the logits of the few tokens the rows may take: [N, U]
            column = {t: j for j, t in enumerate(candidates)}
            allowed = [[column[t] for t in a] for a in allowed]
            candidates = torch.tensor(candidates, device=self.device)
            logits = self.model.compute_logits(hidden, candidates)
        tokens, logprobs = self.sampler.sample(
            logits, params, [seq.generator for seq in sampling], allowed, want_logprobs
        )
        if candidates is not None:
            tokens = candidates[tokens]
        token_list = tokens.tolist()
        lp_list = logprobs.tolist() if logprobs is not None else [None] * len(sampling)
        return [
            SampledToken(seq, tok, lp)
            for seq, tok, lp in zip(sampling, token_list, lp_list, strict=True)
        ]

    def _use_graphs(self, counts: list[int], seq_lens: list[int], offload) -> bool:
        return (
            self._graphs is not None
            and offload is None
            and all(n == 1 for n in counts)
            and self._graphs.can_run(len(counts), seq_lens)
        )


def _decode_graphs(model, pool: KVPool, device: torch.device, max_batch: int):
    """CUDA graphs for decode-only steps where they apply: a CUDA device and kernels that can
    be captured (Triton). Without determinism, decodes of more than 32 sequences run eagerly,
    where cascade attention over their shared prefix saves more than the launches cost."""
    ops = getattr(model, "ops", None)
    if device.type != "cuda" or max_batch < 1 or ops is None or not ops.supports_cuda_graphs:
        return None
    if not ops.deterministic:
        max_batch = min(max_batch, 32)
    max_len = min(model.config.max_position_embeddings, pool.num_pages * pool.page_size)
    graphs = DecodeGraphs(model, pool.kv_caches, pool.page_size, max_len, max_batch, device)
    graphs.capture_all()
    return graphs


# above this many candidate tokens a step computes the whole vocabulary's logits
MAX_CANDIDATE_TOKENS = 256


def _candidate_tokens(allowed: list, params: list, want_logprobs: bool) -> list[int] | None:
    """The sorted token ids some row may take, when every row is greedy and constrained to a
    few (choices: llm_filter, llm_choice, llm_score), so the step skips the rest of the
    vocabulary's logits (for SmolLM2-135M, 28M of its 135M weights); else None."""
    if want_logprobs or any(a is None for a in allowed) or any(not p.is_greedy for p in params):
        return None
    union = sorted(set().union(*allowed))
    return union if len(union) <= MAX_CANDIDATE_TOKENS else None


@functools.cache
def keep_freed_host_memory() -> bool:
    """Makes glibc keep freed activations for reuse instead of giving them back to the OS.

    By default it serves large blocks with fresh mmaps (above an adaptive threshold) and trims
    the heap top on free, so every big activation of a step is page-faulted and zeroed again:
    1-4 M minor faults and ~10% of the time of `bench/engine.py`'s cached run. Fixing the mmap
    threshold at its 32 MiB maximum and the trim threshold at 1 GiB brings that to ~20 k.
    Process-wide and once; False where the C library has no `mallopt` (not glibc).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
