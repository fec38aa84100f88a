"""The optimal field order per row for small tables (the paper's OPHR recursion, pruned).

Objective, as in `ggr.py`: characters of whole `name: value\\n` lines shared with an earlier
prompt, i.e. sum over trie nodes of len(line) * (rows - 1). OPHR tries every line v as the
first line of all rows holding it, recursing on those rows without v's field and on the
other rows (checked against brute force over all per-row orders in the tests). Pruned by:
- a field every row of a node holds with one value goes first (never worse: removing a
  line from every path only merges trie nodes);
- rows linked by no shared line are solved apart (components), rows sharing nothing drop;
- memoized subproblems; branch and bound from GGR's value, with `upper_bound` and
  sum len * (count - 1) as bounds.
Still exponential: a few dozen rows of cross-cutting fields (year, genre, country), more
when fields nest. Past that, `upper_bound` bounds the optimum instead.

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
from llmudf.optimizer.ggr import best_orders, fixed_order, shared_line_chars, sort_rows
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
        instruction,
        table,
        groups.members,
        unique_rows,
        row_to_unique,
        orders,
        send,
        solver_seconds=time.perf_counter() - start,
    )


def exact_orders(
    codes: np.ndarray, weights: tuple[np.ndarray, ...], max_states: int = 200_000
) -> tuple[np.ndarray, int]:
    """(per-row field orders [n, k], the optimal shared characters) for distinct rows."""
    num_rows, num_fields = codes.shape
    solver = _Solver(codes, weights, max_states)
    all_rows = np.arange(num_rows)
    greedy = shared_line_chars(codes, weights, best_orders(codes, weights))
    gain = solver.solve(all_rows, (1 << num_fields) - 1, greedy - 1)
    position = np.tile(num_fields + np.argsort(fixed_order(codes, weights)), (num_rows, 1))
    solver.assign(all_rows, (1 << num_fields) - 1, 0, position)
    return np.argsort(position, axis=1, kind="stable"), gain


def upper_bound(codes: np.ndarray, weights: tuple[np.ndarray, ...]) -> int:
    """An upper bound on the optimal shared characters of distinct rows (any table size)."""
    if codes.shape[0] < 2:
        return 0
    solver = _Solver(codes, weights, max_states=1)
    return solver.chain_bound(np.arange(codes.shape[0]), (1 << codes.shape[1]) - 1)


# ---- private helpers -------------------------------------------------------------------


class _Solver:
    """Branch and bound; `solve(rows, free, floor)` is exact when it returns more than
    `floor`, else an upper bound <= floor (memoized as such, like a transposition table)."""

    def __init__(self, codes: np.ndarray, weights: tuple[np.ndarray, ...], max_states: int):
        self.codes = codes
        self.weights = weights
        self.max_states = max_states
        self.memo: dict[tuple[bytes, int], tuple[int, bool, tuple]] = {}

    def solve(self, rows: np.ndarray, free: int, floor: int = -1) -> int:
        """Best shared characters for `rows` (sorted) using the fields in bitmask `free`."""
        key = (rows.tobytes(), free)
        known = self.memo.get(key)
        if known is not None and (known[1] or known[0] <= floor):
            return known[0]
        if len(self.memo) >= self.max_states:
            raise SearchTooLarge(
                f"exact search passed {self.max_states} subproblems on {len(rows)} rows; "
                "sample fewer rows or use plan_call (GGR)"
            )
        if floor >= 0 and len(rows) > 2:
            bound = self.chain_bound(rows, free)
            if bound <= floor:
                self.memo[key] = (bound, False, ("leaf",))
                return bound
        value, decision = self._solve(rows, free, floor)
        self.memo[key] = (value, value > floor, decision)
        return value

    def assign(self, rows: np.ndarray, free: int, depth: int, position: np.ndarray) -> None:
        """Write the optimal first fields of `rows` into position[row, field] = depth."""
        if len(rows) < 2:
            return
        decision = self.memo[(rows.tobytes(), free)][2]
        kind = decision[0]
        if kind == "first":
            _, fields, sub_free = decision
            for i, g in enumerate(fields):
                position[rows, g] = depth + i
            self.assign(rows, sub_free, depth + len(fields), position)
        elif kind == "parts":
            for part in decision[1]:
                self.assign(part, free, depth, position)
        elif kind == "split":
            _, g, holders, rest = decision
            position[holders, g] = depth
            self.assign(holders, free & ~(1 << g), depth + 1, position)
            self.assign(rest, free, depth, position)

    def _solve(self, rows: np.ndarray, free: int, floor: int) -> tuple[int, tuple]:
        lines = self._shared_lines(rows, free) if len(rows) > 1 else {}
        if not lines:
            return 0, ("leaf",)
        common = [g for g, found in lines.items() if len(found[0][1]) == len(rows)]
        if common:  # a line on every row goes first
            sub_free = free
            for g in common:
                sub_free &= ~(1 << g)
            gain = sum(lines[g][0][0] for g in common)
            return gain + self.solve(rows, sub_free, floor - gain), ("first", common, sub_free)
        parts = _components(rows, [h for g in lines for _, h in lines[g]])
        if len(parts) > 1 or len(parts[0]) < len(rows):
            parts = [p for p in parts if len(p) > 1]
            bounds = [self._bound(p, free) for p in parts]
            total = 0
            for i, part in enumerate(parts):
                others = total + sum(bounds[i + 1 :])
                total += self.solve(part, free, floor - others)
            return total, ("parts", parts)
        candidates = [(gain, g, h) for g in lines for gain, h in lines[g]]
        candidates.sort(key=lambda c: -c[0])
        best, decision = floor, ("leaf",)
        for gain, g, holders in candidates:
            sub_free = free & ~(1 << g)
            rest = np.setdiff1d(rows, holders, assume_unique=True)
            rest_bound = self._bound(rest, free)
            if gain + self._bound(holders, sub_free) + rest_bound <= best:
                continue
            need = best - gain - rest_bound
            value = self.solve(holders, sub_free, need)
            if value <= need:
                continue
            value += gain
            value += self.solve(rest, free, best - value)
            if value > best:
                best, decision = value, ("split", g, holders, rest)
        return best, decision

    def _shared_lines(self, rows: np.ndarray, free: int) -> dict:
        """field -> [(len * (count - 1), holder rows)] for lines held by >= 2 rows."""
        lines = {}
        for g in range(self.codes.shape[1]):
            if not free >> g & 1:
                continue
            uniq, inverse, counts = np.unique(
                self.codes[rows, g], return_inverse=True, return_counts=True
            )
            gains = self.weights[g][uniq] * (counts - 1)
            shared = np.flatnonzero(gains > 0)
            if shared.size:
                order = np.argsort(inverse, kind="stable")
                starts = np.concatenate([[0], np.cumsum(counts)])
                lines[g] = [(int(gains[u]), rows[order[starts[u] : starts[u + 1]]]) for u in shared]
        return lines

    def chain_bound(self, rows: np.ndarray, free: int) -> int:
        """Upper bound from each row's best chain of lines.

        The total is sum over rows of sum over the nodes on its path of len * (1 - 1/count);
        a node's count is at most the rows agreeing with this row on the path's fields so
        far, so a DP over subsets S of free fields (agree[r, S]) bounds each row.
        """
        fields = [g for g in range(self.codes.shape[1]) if free >> g & 1]
        num_rows, num_sets = len(rows), 1 << len(fields)
        weight = np.stack([self.weights[g][self.codes[rows, g]] for g in fields], axis=1)
        group = np.zeros((num_rows, num_sets), np.int64)  # id of rows agreeing on S
        share = np.zeros((num_rows, num_sets))  # 1 - 1/agree[r, S]
        best = np.zeros((num_rows, num_sets))
        for subset in range(1, num_sets):
            top = subset.bit_length() - 1
            keys = group[:, subset ^ (1 << top)] * (num_rows + 1) + self._local(rows, fields[top])
            group[:, subset], _ = pd.factorize(keys)
            share[:, subset] = 1.0 - 1.0 / np.bincount(group[:, subset])[group[:, subset]]
            for j in range(len(fields)):
                if subset >> j & 1:
                    chain = best[:, subset ^ (1 << j)] + weight[:, j] * share[:, subset]
                    np.maximum(best[:, subset], chain, out=best[:, subset])
        return int(best[:, -1].sum() + 1e-6)

    def _local(self, rows: np.ndarray, g: int) -> np.ndarray:
        return pd.factorize(self.codes[rows, g])[0]

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
