"""Run a `QueryRewrite` plan through a connector: each probe and argument query through
`run_sql`, each call's distinct argument tuples through `answer`, each answer table through
`bind`; the plan gets every result back before it plans the next stage.

The connector supplies three callables, so DuckDB, Spark and EXPLAIN differ only there:

- `run_sql(sql) -> pa.Table`: run a query of the plan (probes, argument queries);
- `answer(step, call) -> pa.Array`: one answer per row of `call.fields`, typed as the
  function's SQL type (EXPLAIN returns NULLs);
- `bind(name, table)`: make `table` readable as `name` by later SQL (a temp view, a
  replacement-scan entry).

>>> from llmudf.optimizer.rewrite import QueryRewrite
>>> done = drive(QueryRewrite("SELECT llm('Why?', title) FROM t"), con.sql, ask, register)
... # doctest: +SKIP
>>> done.sql, [(c.step.site.label, c.num_rows, c.num_distinct) for c in done.calls]
... # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.optimizer.blocking import BlockingSummary
from llmudf.optimizer.rewrite import (
    ANSWER,
    COUNT,
    FOUND,
    AnswerStep,
    JoinStep,
    Probe,
    QueryRewrite,
)
from llmudf.runtime.semantic_join import answer_join

__all__ = ["AnsweredCall", "CallInput", "DrivenQuery", "answer_table", "drive"]


@dataclass(frozen=True, slots=True)
class CallInput:
    """One call site's distinct argument tuples, ready to answer."""

    instruction: str | list[str | None]  # one for all, or one per tuple
    fields: pa.Table  # one column per field (constants repeated), one row per tuple
    row_counts: np.ndarray  # [num_tuples] int64: the rows each tuple stands for

    @property
    def num_rows(self) -> int:
        return int(self.row_counts.sum())

    @property
    def num_tuples(self) -> int:
        return len(self.row_counts)


@dataclass(frozen=True, slots=True)
class AnsweredCall:
    """The result of one AnswerStep."""

    step: AnswerStep | JoinStep
    num_rows: int  # rows the call was answered for (a semantic join: pairs asked)
    num_distinct: int  # distinct argument tuples among them
    blocking: BlockingSummary | None = None  # a semantic join's candidate pairs


@dataclass(frozen=True, slots=True)
class DrivenQuery:
    sql: str  # the final query, reading every bound answer table
    calls: tuple[AnsweredCall, ...]  # in the order they were answered


RunSql = Callable[[str], pa.Table]
Answer = Callable[[AnswerStep, CallInput], pa.Array]
Bind = Callable[[str, pa.Table], None]


def drive(
    rewrite: QueryRewrite,
    run_sql: RunSql,
    answer: Answer,
    bind: Bind,
    assume_pass: bool = False,
    config: Config | None = None,
) -> DrivenQuery:
    """Answer every call site of `rewrite`; return the final SQL and what each call saw.
    Raises UnsupportedQuery for shapes the rewrite does not cover, and whatever the
    callables raise. `assume_pass`: see `QueryRewrite.steps`. `config`: how semantic joins
    block their pairs (blocking, blocking_k, embed_model; default Config()); `answer`
    then gets a `llmudf.runtime.semantic_join.JoinInput` of the candidate pairs."""
    steps = rewrite.steps(assume_pass)
    calls: list[AnsweredCall] = []
    result = None
    while True:
        try:
            step = steps.send(result)
        except StopIteration as stop:
            return DrivenQuery(stop.value, tuple(calls))
        if isinstance(step, Probe):
            result = int(run_sql(step.sql).column(0)[0].as_py() or 0)
            continue
        if isinstance(step, JoinStep):
            left, right = run_sql(step.left_sql), run_sql(step.right_sql)
            pairs = run_sql(step.pairs_sql) if step.pairs_sql else None
            matches, blocking = answer_join(step, left, right, answer, config or Config(), pairs)
            bind(step.table, matches)
            result = AnsweredCall(step, blocking.num_candidates, blocking.num_candidates, blocking)
            calls.append(result)
            continue
        args = run_sql(step.args_sql)
        row_counts = args[COUNT].to_numpy().astype(np.int64)
        if not row_counts.sum():  # no rows; a call without keys still counted them in one
            args, row_counts = args.slice(0, 0), row_counts[:0]
        keys = args.drop_columns([COUNT])
        instruction, fields = step.site.inputs(keys)
        answers = answer(step, CallInput(instruction, fields, row_counts))
        bind(step.table, answer_table(keys, answers))
        result = AnsweredCall(step, int(row_counts.sum()), len(row_counts))
        calls.append(result)


def answer_table(keys: pa.Table, answers: pa.Array) -> pa.Table:
    """`keys` (the argument tuples) with their answers and a FOUND column of trues: what a
    left join on the keys reads (a missing row leaves FOUND NULL)."""
    found = pa.array(np.ones(keys.num_rows, dtype=bool), pa.bool_())
    return keys.append_column(ANSWER, answers).append_column(FOUND, found)
