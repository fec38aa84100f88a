"""Greedy group reordering (GGR), vectorized: a field order per row, and a row order.

The engine caches the rendered prompt by prefix, and a prompt's fields are whole
`name: value\\n` lines, so what two prompts share past the instruction is their run of equal
leading lines. Over all prompts that is a trie of lines, worth
sum over trie nodes of len(line) * (rows through the node - 1) characters, whatever the row
order. GGR builds that trie top-down: in each node it takes the line with the largest
len * (count - 1) among the node's rows, puts it first for every row holding it, and repeats
on the node's other rows with recounted values (the paper's recursion on "rows without v").
Lines that every row of a node holds go first (OPHR's optimum does the same).

All nodes of one depth are solved together on code arrays. In a round, every row points at
its best line; a line all of whose holders point at it is accepted at once -- exactly the
line sequential GGR would take for those rows, since the rows' other lines rank lower and
only lose count as rows leave. The node's remaining rows are recounted in the next round.
Cost per round: one hash factorization of [rows, fields] keys, O(n * k).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd


@dataclass(frozen=True, slots=True)
class GGRConfig:
    max_depth: int = 16  # levels of per-row field choice; deeper fields use the fixed order
    min_gain: int = 1  # characters a line must save (len * (count - 1)) to be put first
    max_rounds: int = 64  # per depth; past it, rows keep their best line even if others left
    # lines rank by len**power * (count - 1): 1 = characters saved now; the paper's 2 favours
    # long lines, a rough look-ahead that often pays on bigger tables (plan_call tries both)
    score_power: float = 1.0

    def __post_init__(self):
        if self.max_depth < 0 or self.min_gain < 1 or self.max_rounds < 1 or self.score_power <= 0:
            raise ValueError(f"GGRConfig needs max_depth >= 0, min_gain, max_rounds >= 1: {self}")


def ggr_orders(
    codes: np.ndarray, weights: tuple[np.ndarray, ...], config: GGRConfig = GGRConfig()
) -> np.ndarray:
    """Per-row field order. codes: [n, k] (distinct rows); weights[g]: [codes of g] chars.

    Returns [n, k] int64: row i sends field orders[i, 0] first. Fields past the greedy
    levels follow `fixed_order`.

    >>> codes = np.array([[0, 0], [1, 0], [2, 1]])
    >>> ggr_orders(codes, (np.array([5, 5, 5]), np.array([9, 9]))).tolist()
    [[1, 0], [1, 0], [1, 0]]
    """
    num_rows, num_fields = codes.shape
    cell_weight = _cell_weights(codes, weights)
    # position of each field in each row's order; unchosen fields rank after chosen ones
    position = np.tile(num_fields + np.argsort(fixed_order(codes, weights)), (num_rows, 1))
    node = np.zeros(num_rows, np.int64)
    active = np.arange(num_rows) if num_rows > 1 else np.zeros(0, np.int64)
    span = int(codes.max()) + 1 if codes.size else 1
    for depth in range(min(config.max_depth, num_fields)):
        if active.size == 0:
            break
        chosen, hint = _choose_level(
            node[active],
            codes[active],
            cell_weight[active],
            position[active] < num_fields,
            span,
            config,
        )
        alone = (chosen < 0) & (hint >= 0)
        position[active[alone], hint[alone]] = depth
        rows, fields = active[chosen >= 0], chosen[chosen >= 0]
        position[rows, fields] = depth
        keys = (node[rows] * num_fields + fields) * span + codes[rows, fields]
        node[rows], _ = pd.factorize(keys)
        active = rows[np.bincount(node[rows])[node[rows]] >= 2]
    return np.argsort(position, axis=1, kind="stable")


def best_orders(
    codes: np.ndarray, weights: tuple[np.ndarray, ...], config: GGRConfig = GGRConfig()
) -> np.ndarray:
    """GGR ranked by characters saved, GGR with the paper's len**2 score, or the given order:
    whichever shares the most whole lines. Greedy can lose to either (it commits to one line
    at a time); one more solve buys "never worse than the given order"."""
    candidates = [
        ggr_orders(codes, weights, replace(config, score_power=power)) for power in (1.0, 2.0)
    ]
    candidates.append(np.tile(np.arange(codes.shape[1]), (codes.shape[0], 1)))
    shared = [shared_line_chars(codes, weights, c) for c in candidates]
    return candidates[int(np.argmax(shared))]  # ties keep the earlier candidate


def fixed_order(codes: np.ndarray, weights: tuple[np.ndarray, ...]) -> np.ndarray:
    """Fields by how many characters they could share table-wide (sum len * (count-1))."""
    num_fields = codes.shape[1]
    score = np.zeros(num_fields)
    for g in range(num_fields):
        counts = np.bincount(codes[:, g], minlength=len(weights[g]))
        score[g] = float(np.sum(weights[g] * np.maximum(counts - 1, 0)))
    return np.lexsort((np.arange(num_fields), -score))


def sort_rows(codes: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """Row permutation that walks the trie depth-first: sort by (field, code) in row order."""
    num_rows, num_fields = codes.shape
    if num_rows == 0:
        return np.zeros(0, np.int64)
    keys = []
    for p in range(num_fields):
        keys += [orders[:, p], codes[np.arange(num_rows), orders[:, p]]]
    return np.lexsort(keys[::-1]) if keys else np.arange(num_rows)


def shared_line_chars(
    codes: np.ndarray, weights: tuple[np.ndarray, ...], orders: np.ndarray
) -> int:
    """The objective: characters of whole lines shared with an earlier row (any row order)."""
    num_rows, num_fields = codes.shape
    if num_rows < 2 or num_fields == 0:
        return 0
    perm = sort_rows(codes, orders)
    fields = orders[perm]
    cells = codes[perm[:, None], fields]
    same = (fields[1:] == fields[:-1]) & (cells[1:] == cells[:-1])
    shared = np.cumprod(same, axis=1).astype(bool)  # leading equal lines, vs previous row
    cell_weight = np.stack([weights[g][codes[:, g]] for g in range(num_fields)], axis=1)
    line_weight = cell_weight[perm[1:, None], fields[1:]]
    return int(line_weight[shared].sum())


# ---- private helpers -------------------------------------------------------------------


def _cell_weights(codes: np.ndarray, weights: tuple[np.ndarray, ...]) -> np.ndarray:
    if codes.shape[1] == 0:
        return np.zeros(codes.shape, np.int64)
    return np.stack([weights[g][codes[:, g]] for g in range(codes.shape[1])], axis=1)


def _choose_level(node, codes, cell_weight, used, span, config) -> np.ndarray:
    """The first free field of each row at this depth (-1 where no line is worth sharing),
    and the field a row with none should still send next (`_node_top_field`)."""
    num_rows, num_fields = codes.shape
    chosen = np.full(num_rows, -1, np.int64)
    pending = np.arange(num_rows)
    for round_index in range(config.max_rounds):
        keys = (node[pending, None] * num_fields + np.arange(num_fields)) * span + codes[pending]
        ids, uniq = pd.factorize(keys.ravel())
        counts = np.bincount(ids)
        key_score = np.zeros(len(uniq), np.int64)
        weight = cell_weight[pending].ravel()
        key_score[ids] = weight * (counts[ids] - 1)
        key_score[ids[used[pending].ravel()]] = 0
        valid_key = key_score >= config.min_gain
        # a line on every pending row of its node goes first: never worse (it only merges
        # trie nodes), and it stops a big sub-group from splitting a line all rows share
        cell_ids = ids.reshape(-1, num_fields)
        priority = key_score.astype(np.float64)
        if config.score_power != 1.0:
            key_weight = np.zeros(len(uniq))
            key_weight[ids] = weight
            priority *= key_weight ** (config.score_power - 1.0)
        node_size = np.bincount(node[pending])[node[pending]]
        common = ids[(counts[ids] == np.repeat(node_size, num_fields)) & valid_key[ids]]
        priority[common] += 2.0**60
        # one total order of lines (priority desc, then key) that every holder agrees on
        rank = np.empty(len(uniq), np.int64)
        rank[np.lexsort((uniq, -priority))] = np.arange(len(uniq))
        best_field = np.argmin(rank[cell_ids], axis=1)
        best_key = cell_ids[np.arange(len(pending)), best_field]
        valid = valid_key[best_key]
        if round_index == 0:
            hint = _node_top_field(node, cell_ids, rank, valid_key, uniq, span)
        votes = np.bincount(best_key[valid], minlength=len(uniq))
        settled = votes[best_key] == counts[best_key]
        if round_index == config.max_rounds - 1:
            settled[:] = True
        accept = valid & settled
        chosen[pending[accept]] = best_field[accept]
        pending = pending[valid & ~settled]
        if pending.size == 0:
            break
    return chosen, hint


def _node_top_field(node, cell_ids, rank, valid_key, uniq, span) -> np.ndarray:
    """Per row, the field of its node's best line (-1 if none). A row that shares no line
    still sends that field next, so it shares `name: ` and any common start of the value
    with its neighbours in send order."""
    num_fields = cell_ids.shape[1]
    never = len(rank)
    row_best = np.where(valid_key[cell_ids], rank[cell_ids], never).min(axis=1)
    node_best = np.full(int(node.max()) + 1, never)
    np.minimum.at(node_best, node, row_best)
    key_of_rank = np.empty_like(rank)
    key_of_rank[rank] = np.arange(len(rank))
    best = node_best[node]
    top = np.full(len(node), -1, np.int64)
    has = best < never
    top[has] = (uniq[key_of_rank[best[has]]] // span) % num_fields
    return top
