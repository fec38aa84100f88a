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
from dataclasses import dataclass

import torch

from llmudf.engine.kv_pool import KVPool
from llmudf.engine.request import Sequence
from llmudf.engine.sampling import Sampler
from llmudf.engine.scheduler import ScheduledBatch
from llmudf.kernels import AttentionMetadata, AttentionPlan


@dataclass(slots=True)
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float | None


class ModelRunner:
    """Runs `model` (forward + compute_logits, see docs/DESIGN.md) over the pool's KV pages."""

    def __init__(self, model, pool: KVPool, device: torch.device, vocab_size: int):
        self.model = model
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

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> list[SampledToken]:
        seqs, counts = batch.seqs, batch.num_new_tokens
        starts = [seq.num_computed_tokens for seq in seqs]
        input_ids: list[int] = []
        for seq, start, n in zip(seqs, starts, counts, strict=True):
            input_ids += seq.token_ids[start : start + n]
        seq_lens = [start + n for start, n in zip(starts, counts, strict=True)]
        page_size = self.pool.page_size
        meta = AttentionMetadata.build(
            counts, seq_lens, [seq.pages for seq in seqs], page_size, self.device
        )
        plan = AttentionPlan.build(meta, page_size, *self._heads, self._dtype)
        counts_t = torch.tensor(counts, device=self.device)
        cu = meta.cu_seqlens_q.long()
        # position of flat token t = its offset inside its sequence's chunk + the chunk's start
        offsets = torch.tensor(starts, device=self.device) - cu[:-1]
        positions = torch.arange(len(input_ids), device=self.device)
        positions += torch.repeat_interleave(offsets, counts_t)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        rows = [i for i, seq in enumerate(seqs) if seq_lens[i] == len(seq)]
        last = (cu[1:] - 1)[torch.tensor(rows, dtype=torch.long, device=self.device)]
        hidden = self.model.forward(ids, positions, meta, self._kv_caches, last, plan)  # [N, H]
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
