"""Blocking for a semantic join: which (left, right) pairs are worth asking the model.

Every pair of the cross product is a prompt, so a join of 300 x 600 values is 180,000
prompts. Blocking keeps, for each left value, its `k` nearest right values by the cosine of
their embeddings (top-k, as DeepJoin finds joinable columns), plus every pair whose cosine is
at least `cut`; pairs outside are answered "no match" without the model. A small product
(at most `max_all_pairs` pairs) is asked in full.

How `k` is chosen: the embedding model was trained to give, among a batch of candidates,
the softmax of `SCALE` x cosine as the probability that each one is the match
(all-MiniLM-L6-v2: scale 20, its MultipleNegativesRankingLoss). Read that way, the
probability mass of the kept right values is the chance that a left value's match (if it
has one) is kept; its mean over the left values is the estimated recall. `k` is the
smallest value whose estimated recall reaches `target_recall`, at most `max_k`. The
estimate assumes one match per left value and a model whose similarity ranks matches
high; bench/join.py measures the real recall against known truth.

>>> import numpy as np
>>> left = np.eye(3, dtype=np.float32)
>>> result = block_pairs(left, left, k=1, max_all_pairs=0)
>>> result.left.tolist(), result.right.tolist(), result.summary.num_candidates
([0, 1, 2], [0, 1, 2], 3)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCALE = 20.0  # all-MiniLM-L6-v2's training scale: softmax(20 * cosine) over candidates
CUT = 0.8  # pairs at least this similar are always asked
TARGET_RECALL = 0.98
MAX_K = 50
MAX_ALL_PAIRS = 2000  # a product this small is asked in full
_CHUNK = 1024  # left rows per similarity block: [1024, num_right] float32 at a time


@dataclass(frozen=True, slots=True)
class BlockingSummary:
    """What blocking did to one semantic join (EXPLAIN shows it)."""

    mode: str  # "none" (every pair), "all pairs" (a small product), "top-k", "join condition"
    num_left: int  # distinct left argument tuples
    num_right: int  # distinct right argument tuples
    num_candidates: int  # pairs asked
    k: int | None  # right values kept per left value (top-k); None: all
    cut: float | None  # pairs at least this similar are kept whatever their rank
    estimated_recall: float  # 1.0 when every pair is asked

    @property
    def num_pairs(self) -> int:
        """Pairs in the cross product."""
        return self.num_left * self.num_right

    def __str__(self) -> str:
        head = f"{self.num_pairs:,} pairs in the cross product -> {self.num_candidates:,} asked"
        if self.mode == "top-k":
            return (
                f"{head} (top-{self.k} per left value + pairs with cosine >= {self.cut}), "
                f"estimated recall {self.estimated_recall:.3f}"
            )
        reason = {"none": "blocking off", "all pairs": "small product"}.get(self.mode, self.mode)
        return f"{head} ({reason})"


@dataclass(frozen=True, slots=True)
class Candidates:
    """Candidate pairs, grouped by left value (so prompts that share it are consecutive)."""

    left: np.ndarray  # [num_candidates] int64 row of the left tuples
    right: np.ndarray  # [num_candidates] int64 row of the right tuples
    summary: BlockingSummary


def all_pairs(num_left: int, num_right: int, mode: str = "none") -> Candidates:
    """Every pair, left-major."""
    left = np.repeat(np.arange(num_left, dtype=np.int64), num_right)
    right = np.tile(np.arange(num_right, dtype=np.int64), num_left)
    summary = BlockingSummary(mode, num_left, num_right, len(left), None, None, 1.0)
    return Candidates(left, right, summary)


def block_pairs(
    left: np.ndarray,
    right: np.ndarray,
    k: int | None = None,
    cut: float = CUT,
    target_recall: float = TARGET_RECALL,
    max_k: int = MAX_K,
    max_all_pairs: int = MAX_ALL_PAIRS,
) -> Candidates:
    """Candidate pairs from unit vectors `left` [L, D] and `right` [R, D]: each left row's
    `k` most similar right rows (k=None: chosen, see the module docstring) and every pair
    with cosine >= `cut`."""
    num_left, num_right = len(left), len(right)
    if num_left * num_right <= max_all_pairs or num_right == 0:
        return all_pairs(num_left, num_right, mode="all pairs")
    depth = min(num_right, max(k or 0, max_k))
    top = np.zeros((num_left, depth), dtype=np.int64)  # right rows, most similar first
    mass = np.zeros((num_left, depth), dtype=np.float64)  # softmax mass of each of them
    close: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, num_left, _CHUNK):
        sims = left[start : start + _CHUNK] @ right.T  # [chunk, R]
        rows = np.arange(len(sims))[:, None]
        best = np.argpartition(-sims, depth - 1, axis=1)[:, :depth]
        best = best[rows, np.argsort(-sims[rows, best], axis=1, kind="stable")]
        logits = SCALE * sims
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        top[start : start + len(sims)] = best
        mass[start : start + len(sims)] = probs[rows, best]
        i, j = np.nonzero(sims >= cut)
        close.append((i + start, j))
    recall_at = mass.cumsum(axis=1).mean(axis=0)  # [depth]: estimated recall of top-(k+1)
    if k is None:
        reached = np.nonzero(recall_at >= target_recall)[0]
        k = int(reached[0]) + 1 if len(reached) else depth
    k = min(k, num_right)
    pairs = {(int(i), int(j)) for i, row in enumerate(top[:, :k]) for j in row}
    pairs.update((int(i), int(j)) for ii, jj in close for i, j in zip(ii, jj, strict=True))
    # left-major; within a left value, the order of `top` (most similar first), then the rest
    rank = {(int(i), int(j)): r for i, row in enumerate(top) for r, j in enumerate(row)}
    ordered = sorted(pairs, key=lambda p: (p[0], rank.get(p, depth), p[1]))
    kept = np.zeros((num_left, depth), dtype=bool)
    kept[:, :k] = True
    for i, j in pairs:
        r = rank.get((i, j))
        if r is not None:
            kept[i, r] = True
    estimate = float((mass * kept).sum(axis=1).mean()) if num_left else 1.0
    summary = BlockingSummary("top-k", num_left, num_right, len(ordered), k, cut, estimate)
    array = np.array(ordered, dtype=np.int64).reshape(-1, 2)
    return Candidates(array[:, 0], array[:, 1], summary)
