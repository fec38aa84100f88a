"""The optimal field order per row for small tables (the paper's OPHR recursion, pruned).

Objective, as in `ggr.py`: characters of whole `name: value\\n` lines shared with an earlier
prompt, i.e. sum over trie nodes of len(line) * (rows - 1). OPHR tries every line v as the
first line of all rows holding it, recursing on those rows without v's field and on the
other rows. Made tractable on a few hundred rows by:
- a field every row of a node holds with one value goes first (never worse: removing a
  line from every path only merges trie nodes);
- rows linked by no shared line are solved apart (components), rows sharing nothing drop;
- memoized subproblems, and branch-and-bound on sum len * (count - 1) as an upper bound.

>>> import pyarrow as pa
>>> t = pa.table({"a": ["x", "x", "y"], "b": ["long", "long", "long"]})
>>> exact_optimum("Q", t).prompts
['Q\\n\\nb: long\\na: x', 'Q\\n\\nb: long\\na: y']
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pyarrow as pa

from llmudf.optimizer.encode import encode, group_fields, to_table
from llmudf.optimizer.ggr import fixed_order, sort_rows
from llmudf.optimizer.plan import CallPlan, assemble_plan, unique_row_map


class SearchTooLarge(RuntimeError):
    """The exact search passed its state budget; use GGR (`plan_call`) on tables this big."""


def exact_optimum(
    instruction: str,
    fields: pa.Table | pa.RecordBatch | pd.DataFrame,
    max_states: int = 200_000,
) -> CallPlan:
    """A deduplicated plan whose field orders share the most characters of whole lines.

    Raises `SearchTooLarge` past `max_states` memoized subproblems.
    """
    table = encode(to_table(fields))
    start = time.perf_counter()
    unique_rows, row_to_unique = unique_row_map(table.codes)
    groups = group_fields(table.take(unique_rows))
    orders, _ = exact_orders(groups.codes, groups.weights, max_states)
    send = sort_rows(groups.codes, orders)
    return assemble_plan(
        instruction, table, groups.members, unique_rows, row_to_unique, orders, send,
        solver_seconds=time.perf_counter() - start,
    )


def exact_orders(
    codes: np.ndarray, weights: tuple[np.ndarray, ...], max_states: int = 200_000
) -> tuple[np.ndarray, int]:
    """(per-row field orders [n, k], the optimal shared characters) for distinct rows."""
    num_rows, num_fields = codes.shape
    solver = _Solver(codes, weights, max_states)
    all_rows = np.arange(num_rows)
    gain = solver.solve(all_rows, (1 << num_fields) - 1)
    position = np.tile(num_fields + np.argsort(fixed_order(codes, weights)), (num_rows, 1))
    solver.assign(all_rows, (1 << num_fields) - 1, 0, position)
    return np.argsort(position, axis=1, kind="stable"), gain


# ---- private helpers -------------------------------------------------------------------


class _Solver:
    def __init__(self, codes: np.ndarray, weights: tuple[np.ndarray, ...], max_states: int):
        self.codes = codes
        self.weights = weights
        self.max_states = max_states
        self.memo: dict[tuple[bytes, int], tuple[int, tuple]] = {}

    def solve(self, rows: np.ndarray, free: int) -> int:
        """Best shared characters for `rows` using fields in bitmask `free`."""
        key = (rows.tobytes(), free)
        if key in self.memo:
            return self.memo[key][0]
        if len(self.memo) >= self.max_states:
            raise SearchTooLarge(
                f"exact search passed {self.max_states} subproblems on {len(rows)} rows; "
                "sample fewer rows or use plan_call (GGR)"
            )
        self.memo[key] = result = self._solve(rows, free)
        return result[0]

    def assign(self, rows: np.ndarray, free: int, depth: int, position: np.ndarray) -> None:
        """Write the optimal first fields of `rows` into position[row, field] = depth."""
        if len(rows) < 2:
            return
        _, decision = self.memo[(rows.tobytes(), free)]
        kind = decision[0]
        if kind == "first":
            _, fields, sub_rows, sub_free = decision
            for i, g in enumerate(fields):
                position[rows, g] = depth + i
            self.assign(sub_rows, sub_free, depth + len(fields), position)
        elif kind == "parts":
            for part_rows, part_free in decision[1]:
                self.assign(part_rows, part_free, depth, position)
        elif kind == "split":
            _, g, holders, rest = decision
            position[holders, g] = depth
            self.assign(holders, free & ~(1 << g), depth + 1, position)
            self.assign(rest, free, depth, position)

    def _solve(self, rows: np.ndarray, free: int) -> tuple[int, tuple]:
        if len(rows) < 2:
            return 0, ("leaf",)
        lines = self._shared_lines(rows, free)
        if not lines:
            return 0, ("leaf",)
        # a line on every row goes first
        common = [g for g, found in lines.items() if len(found[0][1]) == len(rows)]
        if common:
            sub_free = free
            for g in common:
                sub_free &= ~(1 << g)
            gain = sum(lines[g][0][0] for g in common) + self.solve(rows, sub_free)
            return gain, ("first", tuple(common), rows, sub_free)
        parts = _components(rows, [h for g in lines for _, h in lines[g]])
        if len(parts) > 1 or len(parts[0]) < len(rows):
            sub = [(p, free) for p in parts if len(p) > 1]
            return sum(self.solve(p, f) for p, f in sub), ("parts", sub)
        candidates = sorted(
            ((gain, g, holders) for g in lines for gain, holders in lines[g]),
            key=lambda c: -c[0],
        )
        best, decision = -1, ("leaf",)
        for gain, g, holders in candidates:
            rest = np.setdiff1d(rows, holders, assume_unique=True)
            bound = gain + self._bound(holders, free & ~(1 << g)) + self._bound(rest, free)
            if bound <= best:
                continue
            value = gain + self.solve(holders, free & ~(1 << g)) + self.solve(rest, free)
            if value > best:
                best, decision = value, ("split", g, holders, rest)
        return best, decision

    def _shared_lines(self, rows: np.ndarray, free: int) -> dict:
        """field -> [(len * (count - 1), holder rows)] for lines held by >= 2 rows."""
        lines = {}
        for g in range(self.codes.shape[1]):
            if not free >> g & 1:
                continue
            values = self.codes[rows, g]
            uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
            gains = self.weights[g][uniq] * (counts - 1)
            shared = np.flatnonzero(gains > 0)
            if shared.size:
                order = np.argsort(inverse, kind="stable")
                starts = np.concatenate([[0], np.cumsum(counts)])
                lines[g] = [(int(gains[u]), rows[order[starts[u] : starts[u + 1]]])
                            for u in shared]
        return lines

    def _bound(self, rows: np.ndarray, free: int) -> int:
        """Upper bound: every line shared by all its holders at once."""
        if len(rows) < 2:
            return 0
        total = 0
        for g in range(self.codes.shape[1]):
            if free >> g & 1:
                uniq, counts = np.unique(self.codes[rows, g], return_counts=True)
                total += int(np.sum(self.weights[g][uniq] * (counts - 1)))
        return total


def _components(rows: np.ndarray, holder_sets: list[np.ndarray]) -> list[np.ndarray]:
    """Rows linked by a shared line, as sorted arrays; rows in no set are dropped."""
    parent = {int(r): int(r) for r in rows}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    linked = set()
    for holders in holder_sets:
        first = find(int(holders[0]))
        linked.update(holders.tolist())
        for r in holders[1:].tolist():
            root = find(r)
            if root != first:
                parent[root] = first
    parts: dict[int, list[int]] = {}
    for r in sorted(linked):
        parts.setdefault(find(r), []).append(r)
    return [np.asarray(p, np.int64) for p in parts.values()]
