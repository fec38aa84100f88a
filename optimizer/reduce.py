"""Planning `llm_reduce`: the fixed row order of a group, and how its rows (or, a level up,
its parts' answers) are packed into prompts that fit the model's context.

Pure functions over texts and token counts; `llmudf.runtime.reduce` runs the levels.

>>> order_rows(["title: Up", "title: Heat", "", "title: Up"])
['title: Heat', 'title: Up', 'title: Up']
>>> pack([3, 3, 3, 3], overhead=4, limit=10)
[range(0, 2), range(2, 4)]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["order_rows", "pack", "split_to_fit"]


def order_rows(texts: Sequence[str]) -> list[str]:
    """A group's rendered rows in a fixed order derived from their content (sorted by text),
    without the empty ones (rows whose fields are all NULL): the same for any input order,
    plan or partitioning. Equal rows are kept: how often a row occurs is information."""
    return sorted(t for t in texts if t)


def pack(costs: Sequence[int], overhead: int, limit: int) -> list[range]:
    """Consecutive spans of items, each filled greedily while `overhead` + the sum of its
    items' `costs` stays within `limit`; an item that alone passes the limit gets a span of
    its own (the caller decides what that means)."""
    spans, start, used = [], 0, overhead
    for i, cost in enumerate(costs):
        if i > start and used + cost > limit:
            spans.append(range(start, i))
            start, used = i, overhead
        used += cost
    if len(costs) > start:
        spans.append(range(start, len(costs)))
    return spans


def split_to_fit(
    spans: list[range], fits: Callable[[list[range]], list[bool]]
) -> tuple[list[range], list[range]]:
    """Halve every span that `fits` (one answer per span, asked in one call per round)
    rejects until all fit: summing per-item token counts misjudges a few tokens where two
    texts meet. Returns (spans, spans of one item that still do not fit)."""
    while True:
        ok = fits(spans)
        if all(ok):
            return spans, []
        single = [s for s, good in zip(spans, ok, strict=True) if not good and len(s) == 1]
        if single:
            return spans, single
        halved = []
        for span, good in zip(spans, ok, strict=True):
            if good:
                halved.append(span)
            else:
                middle = span.start + len(span) // 2
                halved += [range(span.start, middle), range(middle, span.stop)]
        spans = halved
