"""The scheduler: which tokens of which requests run in the next forward pass.

Each step fills a token budget (Sarathi-style): first one token per decoding request and the
next chunk of each request still prefilling, then new requests from the waiting queue. The
queue is kept in token-id order, which is depth-first order of the batch's prefix tree and
hit-rate optimal for an offline batch (SGLang, Theorem 3.1). A simulated radix tree of the
requests admitted this step defers a request whose prompt mostly repeats one admitted in the
same step: one step later it reads that prefix from the cache instead of recomputing it.

When KV pages run short the cache is evicted (LRU leaves; with a host tier they are written
back to host memory, and a later hit loads them back instead of recomputing them). Then, with
`cpu_attention_offload`, the newest decoding request moves its KV to the host pool and its
decode attention runs on the CPU from then on (NEO); admission does the same, so the batch
grows past what the device holds. Else (or when
the host is full too) the newest running request is preempted: its computed prefix goes into
the cache and it waits, first in line, to be recomputed. No request is dropped.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from llmudf.engine.config import EngineConfig
from llmudf.engine.host_kv import KVCopier
from llmudf.engine.kv_pool import KVPool
from llmudf.engine.radix_cache import RadixCache
from llmudf.engine.request import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    """One step: `num_new_tokens[i]` tokens of `seqs[i]` run, from `seqs[i].num_computed_tokens`.

    A sequence samples its next token when this step computes its last known token. The last
    `num_host_seqs` sequences decode over host KV (their attention runs on the CPU)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_host_seqs: int = 0

    @property
    def num_device_seqs(self) -> int:
        return len(self.seqs) - self.num_host_seqs

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


@dataclass(slots=True)
class TierCounters:
    """What the KV tiers did since the engine last took the counters."""

    num_device_hit_tokens: int = 0  # prompt tokens found in the device tier at admission
    num_host_hit_tokens: int = 0  # ... found in the host tier and loaded back
    num_computed_prompt_tokens: int = 0  # prompt tokens the model ran (recomputation included)
    num_offloaded_requests: int = 0  # requests moved to the host for CPU decode attention
    num_cpu_attention_tokens: int = 0  # decode tokens whose attention ran on the CPU
    num_bytes_to_host: int = 0
    num_bytes_to_device: int = 0


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

    def __init__(self, config: EngineConfig, pool: KVPool, copier: KVCopier | None = None):
        self.config = config
        self.pool = pool
        self.page_size = pool.page_size
        self.copier = copier  # the host tier (None: no host pool)
        self.host = copier.host_pool if copier is not None else None
        self.cache = None
        if config.enable_prefix_cache:
            self.cache = RadixCache(pool, pool.page_size, copier)
        self.offload = config.cpu_attention_offload and copier is not None
        self.counters = TierCounters()
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
        on_host: list[Sequence] = []
        budget = self.config.max_num_batched_tokens
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.is_on_host:
                if self._reserve_host(seq, seq.num_computed_tokens + 1):
                    on_host.append(seq)
                    budget -= 1
                    i += 1
                else:  # the host is full too: recompute it later
                    self.preempt(seq)
                    preempted = True
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if self._reserve(seq, seq.num_computed_tokens + n):
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
            elif (victim := self._offload_victim()) is not None:
                self._move_to_host(victim, batch, on_host)
            else:  # out of KV: the newest running request waits and is recomputed later
                self.preempt(self.running[-1])
                preempted = True
        if not preempted or not batch.seqs:
            self._admit(batch, budget, on_host)
        batch.seqs += on_host
        batch.num_new_tokens += [1] * len(on_host)
        batch.num_host_seqs = len(on_host)
        return batch

    def commit(self, batch: ScheduledBatch) -> None:
        """Records that the batch ran: its tokens now have KV; prefill progress is cached."""
        counters = self.counters
        counters.num_cpu_attention_tokens += batch.num_host_seqs
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            counters.num_computed_prompt_tokens += max(
                0, min(seq.num_prompt_tokens, start + n) - start
            )
            seq.num_computed_tokens += n
            if n > 1 and self.cache is not None:
                self._cache_prefix(seq)

    def take_counters(self) -> TierCounters:
        """The counters since the last call (the engine adds them to its stats)."""
        counters, self.counters = self.counters, TierCounters()
        if self.copier is not None:
            copied = self.copier.stats
            counters.num_bytes_to_host = copied.num_bytes_to_host
            counters.num_bytes_to_device = copied.num_bytes_to_device
            copied.num_bytes_to_host = copied.num_bytes_to_device = 0
        return counters

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

    def _admit(self, batch: ScheduledBatch, budget: int, on_host: list[Sequence]) -> None:
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
                # NEO: decoding requests make room on the device by moving to the host, so
                # the batch grows past what the device holds
                while verdict == 0 and (victim := self._offload_victim()) is not None:
                    self._move_to_host(victim, batch, on_host)
                    verdict = self._try_admit(seq, budget, None)
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
        node, pages, num_cached, num_device, num_host = None, [], 0, 0, 0
        if self.cache is not None:
            match = self.cache.match_prefix(seq.token_ids[: len(seq) - 1])  # >= 1 token to run
            if lookahead is not None:
                shared = lookahead.match_prefix(seq.token_ids[: len(seq) - 1]).num_tokens
                cached = match.num_tokens + match.num_host_tokens
                if shared - cached >= self.config.min_shared_prefix_to_defer:
                    return None
            num_device = match.num_tokens
            if match.num_host_tokens and self.cache.load_back(match):
                num_host = match.num_tokens - num_device
            node, pages, num_cached = match.last_node, match.pages, match.num_tokens
        n = min(len(seq) - num_cached, budget)
        if node is not None:  # locked first: reserving may evict
            self.cache.inc_lock_ref(node)
        self.pool.inc_ref(pages)
        seq.pages = list(pages)
        if not self._reserve(seq, num_cached + n):
            self.pool.dec_ref(seq.pages)
            seq.pages = []
            if node is not None:
                self.cache.dec_lock_ref(node)
            return 0
        self.counters.num_device_hit_tokens += num_device
        self.counters.num_host_hit_tokens += num_host
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

    def _reserve_host(self, seq: Sequence, num_tokens: int) -> bool:
        """Makes `seq.host_pages` cover `num_tokens` tokens, evicting the host tier if needed."""
        needed = -(-num_tokens // self.page_size) - len(seq.host_pages)
        if needed <= 0:
            return True
        short = needed - self.host.num_free_pages
        if short > 0 and self.cache is not None:
            self.cache.evict_host(short)
        if not self.host.can_allocate(needed):
            return False
        pages = self.host.allocate(needed)
        self.host.zero(pages)
        seq.host_pages.extend(pages)
        return True

    def _offload_victim(self) -> Sequence | None:
        """NEO's rule, simplified: the newest running request that is decoding on the device
        and whose KV (+ its next token) the host can hold moves there."""
        if not self.offload:
            return None
        for seq in reversed(self.running):
            if seq.is_on_host or seq.num_uncomputed_tokens != 1:
                continue
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                continue  # still prefilling
            needed = -(-(seq.num_computed_tokens + 1) // self.page_size)
            short = needed - self.host.num_free_pages
            if short > 0 and self.cache is not None:
                self.cache.evict_host(short)
            return seq if self.host.can_allocate(needed) else None
        return None

    def _move_to_host(self, seq: Sequence, batch: ScheduledBatch, on_host: list[Sequence]) -> None:
        """Copies `seq`'s KV into its own host pages and gives its device pages back (its
        prefix stays in the cache); if this step already scheduled it, it decodes on the host."""
        num_tokens = seq.num_computed_tokens
        host_pages = self.host.allocate(-(-(num_tokens + 1) // self.page_size))
        num_full = -(-num_tokens // self.page_size)
        self.host.zero(host_pages[num_full:])
        self.copier.to_host(seq.pages[:num_full], host_pages[:num_full])
        self._release(seq)
        seq.num_computed_tokens = num_tokens
        seq.host_pages = host_pages
        self.counters.num_offloaded_requests += 1
        if seq in batch.seqs:  # scheduled before on the device: one decode token
            k = batch.seqs.index(seq)
            del batch.seqs[k], batch.num_new_tokens[k]
            on_host.append(seq)

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
        """Gives back a request's pages; its whole computed pages stay in the cache (the host
        copy of a request decoding on the CPU is its own and is freed)."""
        if seq.is_on_host:
            self.host.free(seq.host_pages)
            seq.host_pages, seq.num_computed_tokens = [], 0
            return
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
