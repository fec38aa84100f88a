"""The scheduler: which tokens of which requests run in the next forward pass.

Each step fills a token budget (Sarathi-style): first one token per decoding request and the
next chunk of each request still prefilling, then new requests from the waiting queue. The
queue is kept in token-id order, which is depth-first order of the batch's prefix tree and
hit-rate optimal for an offline batch (SGLang, Theorem 3.1). A simulated radix tree of the
requests admitted this step defers a request whose prompt mostly repeats one admitted in the
same step: one step later it reads that prefix from the cache instead of recomputing it.

When KV pages run short the cache is evicted (LRU leaves), then the newest running request is
preempted: its computed prefix goes into the cache and it waits, first in line, to be
recomputed. No request is dropped.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from llmudf.engine.config import EngineConfig
from llmudf.engine.kv_pool import KVPool
from llmudf.engine.radix_cache import RadixCache
from llmudf.engine.request import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step: `num_new_tokens[i]` tokens of `seqs[i]` run, from `seqs[i].num_computed_tokens`.

    A sequence samples its next token when this step computes its last known token."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """Continuous batching over a KVPool, with an optional radix prefix cache.

    >>> from llmudf.engine.kv_pool import KVShape
    >>> from llmudf.engine.params import SamplingParams
    >>> pool = KVPool(KVShape(num_layers=1, num_kv_heads=1, head_dim=2, page_size=4), 8)
    >>> sched = Scheduler(EngineConfig(device="cpu", page_size=4), pool)
    >>> sched.add(Sequence("a", 0, [1, 2, 3, 4, 5], SamplingParams(), max_len=32))
    >>> sched.schedule().num_new_tokens
    [5]
    """

    def __init__(self, config: EngineConfig, pool: KVPool):
        self.config = config
        self.pool = pool
        self.page_size = pool.page_size
        self.cache = RadixCache(pool, pool.page_size) if config.enable_prefix_cache else None
        self.waiting: list[Sequence] = []  # in admission order (sorted for "dfs")
        self.preempted: deque[Sequence] = deque()  # go before `waiting`
        self.running: list[Sequence] = []  # in admission order; the last is preempted first
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.preempted) + len(self.running)

    def add(self, seq: Sequence) -> None:
        if self.config.schedule_policy == "dfs":
            bisect.insort(self.waiting, seq, key=_dfs_key)
        else:
            self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        """Picks this step's work and reserves KV pages for it (an empty batch if none)."""
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if self._reserve(seq, seq.num_computed_tokens + n):
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
            else:  # out of KV: the newest running request waits and is recomputed later
                self.preempt(self.running[-1])
                preempted = True
        if not preempted or not batch.seqs:
            self._admit(batch, budget)
        return batch

    def commit(self, batch: ScheduledBatch) -> None:
        """Records that the batch ran: its tokens now have KV; prefill progress is cached."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            if n > 1 and self.cache is not None:
                self._cache_prefix(seq)

    def finish(self, seq: Sequence) -> None:
        """Releases a finished (or aborted) request; its computed KV stays in the cache."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.preempted:
            self.preempted.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.preempted.appendleft(seq)

    # ---- private helpers -------------------------------------------------------------

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        lookahead = RadixCache.simulated(self.page_size) if self.cache is not None else None
        if lookahead is not None:
            for seq in batch.seqs:  # running prefills also become cached soon
                if seq.num_computed_tokens < seq.num_prompt_tokens:
                    lookahead.insert(seq.token_ids)
        for queue in (self.preempted, self.waiting):
            kept = []
            while queue and budget > 0 and len(self.running) < self.config.max_num_seqs:
                seq = queue.popleft() if queue is self.preempted else queue.pop(0)
                verdict = self._try_admit(seq, budget, lookahead if batch.seqs else None)
                if verdict is None:  # deferred by the look-ahead: try the next one
                    kept.append(seq)
                    continue
                if verdict == 0:  # out of KV: stop admitting this step
                    kept.append(seq)
                    break
                batch.seqs.append(seq)
                batch.num_new_tokens.append(verdict)
                budget -= verdict
                if lookahead is not None:
                    lookahead.insert(seq.token_ids)
            if queue is self.preempted:
                queue.extendleft(reversed(kept))
            else:
                queue[:0] = kept

    def _try_admit(self, seq: Sequence, budget: int, lookahead: RadixCache | None) -> int | None:
        """Admits `seq` and returns its token count this step; None = deferred, 0 = no KV."""
        node, pages, num_cached = None, [], 0
        if self.cache is not None:
            match = self.cache.match_prefix(seq.token_ids[: len(seq) - 1])  # >= 1 token to run
            node, pages, num_cached = match.last_node, match.pages, match.num_tokens
            if lookahead is not None:
                shared = lookahead.match_prefix(seq.token_ids[: len(seq) - 1]).num_tokens
                if shared - num_cached >= self.config.min_shared_prefix_to_defer:
                    return None
        n = min(len(seq) - num_cached, budget)
        self.pool.inc_ref(pages)
        seq.pages = list(pages)
        if not self._reserve(seq, num_cached + n):
            self.pool.dec_ref(seq.pages)
            seq.pages = []
            return 0
        if node is not None:
            self.cache.inc_lock_ref(node)
        seq.cache_node, seq.cache_len = node, num_cached
        seq.num_computed_tokens = num_cached
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = num_cached
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return n

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Makes `seq.pages` cover `num_tokens` tokens, evicting the cache if needed."""
        needed = -(-num_tokens // self.page_size) - len(seq.pages)
        if needed <= 0:
            return True
        short = needed - self.pool.num_free_pages
        if short > 0 and self.cache is not None:
            self.cache.evict(short)
        if not self.pool.can_allocate(needed):
            return False
        seq.pages.extend(self.pool.allocate(needed))
        return True

    def _cache_prefix(self, seq: Sequence) -> None:
        """Puts the whole computed pages of a running request into the cache, swaps its
        duplicate pages for the cached ones, and moves its lock to the new end."""
        num_full = seq.num_computed_tokens - seq.num_computed_tokens % self.page_size
        if num_full <= seq.cache_len:
            return
        key = seq.token_ids[:num_full]
        self.cache.insert(key, seq.pages)
        match = self.cache.match_prefix(key)
        for i, page in enumerate(match.pages):
            if seq.pages[i] != page:
                self.pool.inc_ref([page])
                self.pool.dec_ref([seq.pages[i]])
                seq.pages[i] = page
        self.cache.inc_lock_ref(match.last_node)
        if seq.cache_node is not None:
            self.cache.dec_lock_ref(seq.cache_node)
        seq.cache_node, seq.cache_len = match.last_node, match.num_tokens

    def _release(self, seq: Sequence) -> None:
        """Gives back a request's pages; its whole computed pages stay in the cache."""
        if self.cache is not None:
            num_full = seq.num_computed_tokens - seq.num_computed_tokens % self.page_size
            self.cache.insert(seq.token_ids[:num_full], seq.pages)
            if seq.cache_node is not None:
                self.cache.dec_lock_ref(seq.cache_node)
        self.pool.dec_ref(seq.pages)
        seq.pages, seq.cache_node, seq.cache_len = [], None, 0
        seq.num_computed_tokens = 0


def _dfs_key(seq: Sequence) -> tuple[list[int], int]:
    return seq.token_ids, seq.arrival
