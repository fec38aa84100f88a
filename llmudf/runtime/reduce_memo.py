"""`ReduceMemo`: the `__llm_reduce_lists` UDF of an engine that hands an aggregate's groups
over in several chunks (DuckDB: one per thread's partition), with every group of a query
still answered in one client batch per level.

Before the query runs for real, `prefetch(run)` runs it once with the UDF only collecting
the groups it is handed (answering NULL), answers them all together (`run_reduce`) and keeps
the answers; the real run then reads them. A group it does not find (the source changed
since) is answered with its chunk. `explain(run)` plans the collected groups instead
(`plan_reduce`), without the model.

>>> memo = ReduceMemo(config, cache, record=stats.append)                  # doctest: +SKIP
>>> con.create_function("__llm_reduce_lists", memo, ...)                      # doctest: +SKIP
>>> memo.prefetch(lambda: con.sql(query).fetchall())                          # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.optimizer.explain import CallSiteExplain
from llmudf.runtime.cache import ResultCache
from llmudf.runtime.client import get_client
from llmudf.runtime.executor import CallStats
from llmudf.runtime.reduce import ReduceBatch, bind_lists, plan_reduce, run_reduce

__all__ = ["ReduceMemo"]


class ReduceMemo:
    """`__llm_reduce_lists(instruction, rows)`: a callable over Arrow arrays, one answer per
    group; `record(stats)` receives the CallStats of each batch it answers."""

    def __init__(
        self, config: Config, cache: ResultCache | None, record: Callable[[CallStats], None]
    ):
        self.config = config
        self.cache = cache
        self.record = record
        self._collected: list[ReduceBatch] | None = None  # while collecting
        self._answers: dict[str, str | None] = {}  # ReduceBatch.keys() -> answer
        self._lock = threading.Lock()

    def __call__(self, instructions, lists) -> pa.Array:
        instructions, lists = (
            a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
            for a in (instructions, lists)
        )
        if len(lists) == 0:
            return pa.array([], pa.string())
        batch = bind_lists(instructions, lists, "llm_reduce")
        with self._lock:
            if self._collected is not None:
                self._collected.append(batch)
                return pa.nulls(len(lists), pa.string())
            keys = batch.keys()
            known = {k: self._answers[k] for k in keys if k in self._answers}
        todo = [i for i, k in enumerate(keys) if k not in known]
        if todo:
            known.update(self._answer(batch.take(todo)))
        return pa.array([known[k] for k in keys], pa.string())

    def prefetch(self, run: Callable[[], object]) -> None:
        """Answer the groups that `run()` (the query, run to its end) hands this UDF."""
        batches = self._collect(run)
        with self._lock:
            self._answers = {}
        for batch in batches:
            answers = self._answer(batch)
            with self._lock:
                self._answers.update(answers)

    def explain(self, run: Callable[[], object]) -> list[CallSiteExplain]:
        """What answering the groups `run()` hands this UDF would ask (no model is run)."""
        sites = []
        for batch in self._collect(run):
            client = get_client(batch.spec.config(self.config))
            plan = plan_reduce(batch.spec, batch.instructions, batch.groups, self.config, client)
            fields = next((g.column_names for g in batch.groups if g.num_rows), [])
            sites.append(
                CallSiteExplain(
                    site="llm_reduce",
                    instruction=next((t for t in batch.instructions if t is not None), ""),
                    num_rows=plan.num_rows,
                    num_requests=sum(plan.prompts_per_level),
                    prompt_units=plan.prompt_units,
                    cached_units=0,
                    unit=plan.unit,
                    field_order=tuple(fields),
                    pushed=(),
                    hierarchy=str(plan),
                )
            )
        return sites

    # ---- private -------------------------------------------------------------------------

    def _collect(self, run: Callable[[], object]) -> list[ReduceBatch]:
        """The groups `run()` hands this UDF (answered NULL meanwhile), one ReduceBatch per
        set of options."""
        with self._lock:
            self._collected = []
        try:
            run()
        finally:
            with self._lock:
                collected, self._collected = self._collected, None
        by_options: dict[tuple, list[ReduceBatch]] = {}
        for batch in collected:
            by_options.setdefault(batch.spec.options, []).append(batch)
        return [
            ReduceBatch(
                batches[0].spec,
                [t for b in batches for t in b.instructions],
                [g for b in batches for g in b.groups],
            )
            for batches in by_options.values()
        ]

    def _answer(self, batch: ReduceBatch) -> dict[str, str | None]:
        spec = batch.spec
        client = get_client(spec.config(self.config))
        result = run_reduce(spec, batch.instructions, batch.groups, self.config, client, self.cache)
        self.record(result.stats)
        return dict(zip(batch.keys(), result.answers, strict=True))
