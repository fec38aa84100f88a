"""Prefix hit rate (PHR) and the cost estimate EXPLAIN shows.

PHR = sum over prompts of the longest common prefix with any earlier prompt in send order,
divided by the sum of prompt lengths: the share of prompt work a prefix cache large enough
to hold everything could skip. Counted in characters, or in tokens of a given tokenizer;
pass `render` (user message -> the text the engine sees, chat template included) to count
what the engine actually caches.

>>> prefix_hit_rate(["Q\\n\\na: 1", "Q\\n\\na: 2"])  # 6 of 14 characters
0.42857142857142855
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Tokenize = Callable[[list[str]], list[list[int]]]
Render = Callable[[str], str]


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """Prompt work of a plan, in `unit`s ("tokens" with a tokenizer, else "chars")."""

    unit: str
    num_rows: int
    num_requests: int
    prompt_units_without_dedup: int  # one prompt per input row
    prompt_units: int  # one prompt per request
    cached_units: int  # prefix shared with an earlier request (estimate: unbounded cache)

    @property
    def computed_units(self) -> int:
        return self.prompt_units - self.cached_units

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_units / self.prompt_units if self.prompt_units else 0.0

    @property
    def saving(self) -> float:
        """Share of the undeduplicated, uncached prompt work that is skipped."""
        total = self.prompt_units_without_dedup
        return 1.0 - self.computed_units / total if total else 0.0


def prefix_hits(
    prompts: Sequence[str],
    tokenize: Tokenize | None = None,
    render: Render | None = None,
    window: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt: (units shared with an earlier prompt, total units); both [num_prompts].

    `window=None` compares with every earlier prompt (unbounded cache); `window=1` with the
    previous one only, which is what a tiny cache would keep.
    """
    texts = [render(p) for p in prompts] if render is not None else list(prompts)
    seqs = _as_strings(tokenize(texts)) if tokenize is not None else texts
    lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    if window is not None:
        if window < 1:
            raise ValueError(f"window must be >= 1 or None, got {window}")
        hits = [0] * len(seqs)
        for i in range(1, len(seqs)):
            hits[i] = max(_lcp(seqs[i], seqs[j]) for j in range(max(0, i - window), i))
        return np.asarray(hits, np.int64), lengths
    return _hits_any_earlier(seqs), lengths


def prefix_hit_rate(
    prompts: Sequence[str],
    tokenize: Tokenize | None = None,
    render: Render | None = None,
    window: int | None = None,
) -> float:
    """PHR of prompts sent in this order, in characters or (with `tokenize`) tokens.

    >>> prefix_hit_rate(["ab", "ab", "ac"])  # 0 + 2 + 1 of 6
    0.5
    """
    hits, lengths = prefix_hits(prompts, tokenize, render, window)
    total = int(lengths.sum())
    return int(hits.sum()) / total if total else 0.0


def estimate_cost(plan, tokenize: Tokenize | None = None, render: Render | None = None):
    """Prompt units of a `CallPlan` before and after dedup, and those a prefix cache saves.

    >>> import pyarrow as pa
    >>> from llmudf.optimizer import plan_call
    >>> cost = estimate_cost(plan_call("Q", pa.table({"a": ["x", "x", "y"]})))
    >>> cost.prompt_units_without_dedup, cost.prompt_units, cost.cached_units
    (21, 14, 6)
    """
    hits, lengths = prefix_hits(plan.prompts, tokenize, render)
    rows_per_request = np.bincount(plan.row_to_request, minlength=plan.num_requests)
    return CostEstimate(
        unit="tokens" if tokenize is not None else "chars",
        num_rows=plan.num_rows,
        num_requests=plan.num_requests,
        prompt_units_without_dedup=int(np.dot(rows_per_request, lengths)),
        prompt_units=int(lengths.sum()),
        cached_units=int(hits.sum()),
    )


# ---- private helpers -------------------------------------------------------------------


def _as_strings(token_lists: list[list[int]]) -> list[str]:
    """Token ids as code points, so one string LCP routine serves chars and tokens."""
    out = []
    for ids in token_lists:
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= 0x110000):
            raise ValueError(f"token ids must lie in [0, {0x110000}), got {min(ids)}..{max(ids)}")
        out.append("".join(map(chr, ids)))
    return out


def _lcp(a: str, b: str) -> int:
    """Length of the common prefix; binary search over slice compares (C speed)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _hits_any_earlier(seqs: list[str]) -> np.ndarray:
    """max over j < i of LCP(seqs[i], seqs[j]), for all i, in O(n log n) compares.

    In sorted order the best earlier partner is the nearest earlier-sent one on either
    side, and LCP to it is the minimum of the adjacent LCPs in between; a monotonic stack
    finds both (the "previous smaller element" on send time), carrying that minimum.
    """
    n = len(seqs)
    hits = np.zeros(n, np.int64)
    if n < 2:
        return hits
    by_text = sorted(range(n), key=seqs.__getitem__)
    adjacent = [0] + [_lcp(seqs[by_text[p - 1]], seqs[by_text[p]]) for p in range(1, n)]
    for positions in (range(n), range(n - 1, -1, -1)):
        stack: list[list[int]] = []  # [send time, min adjacent LCP up to the next entry]
        prev = None
        for p in positions:
            if stack:
                between = adjacent[max(p, prev)]  # LCP of sorted neighbours p and prev
                stack[-1][1] = min(stack[-1][1], between)
            time = by_text[p]
            while stack and stack[-1][0] > time:
                _, carried = stack.pop()
                if stack:
                    stack[-1][1] = min(stack[-1][1], carried)
            if stack:
                hits[time] = max(hits[time], stack[-1][1])
            stack.append([time, 1 << 62])
            prev = p
    return hits
