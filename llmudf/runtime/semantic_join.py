"""Answer a semantic join (`llmudf.optimizer.join.JoinStep`): block the cross product of the
distinct left and right argument tuples down to candidate pairs (embeddings, top-k), ask
the model about the candidates only, keep the pairs it answers yes.

>>> matches, summary = answer_join(step, left, right, answer, Config())  # doctest: +SKIP
>>> print(summary)                                                        # doctest: +SKIP
180,000 pairs in the cross product -> 3,300 asked (top-10 per left value + ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.calls.prompt import format_value
from llmudf.optimizer.blocking import (
    MAX_ALL_PAIRS,
    BlockingSummary,
    Candidates,
    all_pairs,
    block_pairs,
)
from llmudf.optimizer.join import LEFT_KEY, JoinStep
from llmudf.runtime.embed import embed_texts

__all__ = ["JoinInput", "answer_join", "candidate_pairs", "side_texts"]


@dataclass(frozen=True, slots=True)
class JoinInput:
    """The candidate pairs of one semantic join, as the call's argument tuples."""

    instruction: str | list[str | None]
    fields: pa.Table  # one row per candidate pair, left values first within a left value
    row_counts: np.ndarray  # [num_candidates] ones: each pair stands for itself
    blocking: BlockingSummary

    @property
    def num_rows(self) -> int:
        return int(self.row_counts.sum())

    @property
    def num_tuples(self) -> int:
        return len(self.row_counts)


def side_texts(keys: pa.Table) -> list[str]:
    """What each distinct tuple of one side is embedded as: its values, one per line."""
    rows = zip(*[c.to_pylist() for c in keys.columns], strict=True) if keys.num_columns else []
    return ["\n".join(t for v in row if (t := format_value(v)) is not None) for row in rows]


def candidate_pairs(left: pa.Table, right: pa.Table, config: Config) -> Candidates:
    """The pairs to ask: every pair with `config.blocking == "none"`, else blocked by the
    embeddings of `config.embed_model`."""
    if config.blocking == "none":
        return all_pairs(left.num_rows, right.num_rows)
    if left.num_rows * right.num_rows <= MAX_ALL_PAIRS:  # no embeddings needed
        return all_pairs(left.num_rows, right.num_rows, mode="all pairs")
    vectors = embed_texts(side_texts(left) + side_texts(right), config)
    left_vectors, right_vectors = vectors[: left.num_rows], vectors[left.num_rows :]
    return block_pairs(
        left_vectors, right_vectors, k=config.blocking_k, max_all_pairs=MAX_ALL_PAIRS
    )


def answer_join(
    step: JoinStep,
    left: pa.Table,
    right: pa.Table,
    answer,
    config: Config,
    pairs: pa.Table | None = None,
) -> tuple[pa.Table, BlockingSummary]:
    """(the pairs answered yes: `left`'s columns then `right`'s, what blocking did).
    `answer(step, JoinInput) -> pa.Array` gives one boolean per candidate pair. `pairs`:
    the result of `step.pairs_sql`, the candidates when the join has a condition across
    both sides."""
    config = step.site.spec.config(config)  # the call's options: blocking, blocking_k
    if pairs is not None:
        left, right, candidates = _relational_candidates(pairs, left.num_rows, right.num_rows)
    else:
        candidates = candidate_pairs(left, right, config)
    columns, side_columns = [], {"left": iter(left.columns), "right": iter(right.columns)}
    rows = {"left": pa.array(candidates.left), "right": pa.array(candidates.right)}
    for side in step.sides:  # the call's keys, in its field order
        columns.append(next(side_columns[side]).take(rows[side]))
    keys = pa.Table.from_arrays(columns, names=[f"k{i}" for i in range(len(columns))])
    instruction, fields = step.site.inputs(keys)
    ones = np.ones(keys.num_rows, dtype=np.int64)
    answers = answer(step, JoinInput(instruction, fields, ones, candidates.summary))
    yes = np.asarray(answers.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    matches = left.take(pa.array(candidates.left[yes]))
    for name, column in zip(right.column_names, right.columns, strict=True):
        matches = matches.append_column(name, column.take(pa.array(candidates.right[yes])))
    return matches, candidates.summary


def _relational_candidates(pairs: pa.Table, num_left: int, num_right: int):
    """(left keys, right keys, Candidates) of the pairs a relational join condition let
    through, grouped by left value."""
    names = pairs.column_names
    pairs = pairs.sort_by([(n, "ascending") for n in names])
    num_left_keys = sum(n.startswith(LEFT_KEY) for n in names)
    left = pairs.select(names[:num_left_keys])
    right = pairs.select(names[num_left_keys:])
    rows = np.arange(pairs.num_rows, dtype=np.int64)
    summary = BlockingSummary(
        "join condition", num_left, num_right, pairs.num_rows, None, None, 1.0
    )
    return left, right, Candidates(rows, rows, summary)
