"""DuckDB: `SELECT llm(...)` optimized as a whole query, with per-chunk UDFs as the fallback.

>>> import llmudf
>>> con = llmudf.connect()                                                  # doctest: +SKIP
>>> con.execute("CREATE TABLE t AS SELECT 'Up' AS title")                   # doctest: +SKIP
>>> con.sql("SELECT llm_filter('Is it animated?', title) FROM t").fetchall()  # doctest: +SKIP
[(True,)]
>>> print(con.explain_llm("SELECT llm('Summarize', title) FROM t"))         # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import sys
import threading

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp

from llmudf.calls.config import Config
from llmudf.calls.functions import FUNCTIONS, FunctionSpec, LLMCallError
from llmudf.optimizer.explain import LLMExplain, explain_call
from llmudf.optimizer.plan import PlanOptions, plan_call
from llmudf.optimizer.reduce_sql import REDUCE_LISTS, has_reduce, rewrite_reduce
from llmudf.optimizer.rewrite import AnswerStep, QueryRewrite, UnsupportedQuery
from llmudf.runtime.cache import open_cache
from llmudf.runtime.chunk_call import bind_chunk
from llmudf.runtime.client import explain_tokenizer, get_client, measured_tokens_per_s
from llmudf.runtime.embed import embed_array, embed_dimension
from llmudf.runtime.executor import CallStats, StatsTable, run_call
from llmudf.runtime.query_driver import CallInput, drive
from llmudf.runtime.reduce_memo import ReduceMemo

_LLM_CALL = re.compile(r"\bllm(_filter|_choice|_score|_json)?\s*\(", re.IGNORECASE)


class LLMRuntime:
    """What the UDFs and the whole-query path of one connection share: config, cache, stats."""

    def __init__(self, config: Config):
        self.config = config
        self.cache = open_cache(config.cache_dir) if config.cache else None
        self.stats: list[CallStats] = []  # of the latest query
        self._lock = threading.Lock()

    def run(self, spec, instruction, fields: pa.Table, num_rows: int | None = None) -> pa.Array:
        config = spec.config(self.config)
        result = run_call(spec, instruction, fields, self.config, get_client(config), self.cache)
        if num_rows is not None:
            result.stats.num_rows = num_rows
        self.record(result.stats)
        return result.answers

    def record(self, stats: CallStats) -> None:
        """Add a call's stats to the latest query's (summed per site over chunks)."""
        with self._lock:
            same = [s for s in self.stats if s.site == stats.site]
            if same:
                same[0].add(stats)
            else:
                self.stats.append(stats)


def register(con: duckdb.DuckDBPyConnection, config: Config | None = None, **options) -> LLMRuntime:
    """Register llm, llm_filter, llm_choice, llm_score, llm_json as vectorized UDFs on a plain
    DuckDB connection (answered chunk by chunk, through the result cache and engine).

    Fields are named by struct keys (`{'title': title}`); bare arguments are named field1, ...

    >>> con = duckdb.connect()                                                  # doctest: +SKIP
    >>> llmudf.register(con, max_tokens=8)                                      # doctest: +SKIP
    >>> con.sql("SELECT llm('Genre?', {'title': 'Up'})").fetchall()             # doctest: +SKIP
    """
    runtime = LLMRuntime(config or Config.from_kwargs(**options))
    for name, function in FUNCTIONS.items():
        con.create_function(
            name,
            _make_udf(runtime, name),
            None,
            function.sql_type,
            type="arrow",
            null_handling="special",
            # deterministic (same arguments, same answer): DuckDB refuses volatile
            # functions in a window's PARTITION BY / ORDER BY; identical calls may share
            # one evaluation, which is what the result cache would give them anyway
            side_effects=False,
        )
    _register_embed(con, runtime)
    _register_reduce(con, runtime)
    return runtime


def _register_embed(con: duckdb.DuckDBPyConnection, runtime: LLMRuntime) -> None:
    """`llm_embed(text) -> FLOAT[d]` (d = 384 for the default model): a fixed-size array, so
    DuckDB's array_cosine_similarity / array_distance take it."""
    config = runtime.config
    dimension = embed_dimension(config.embed_model)

    def udf(values) -> pa.Array:
        return embed_array(values, config, runtime.cache, site="llm_embed")

    con.create_function(
        "llm_embed",
        udf,
        None,  # any type: a non-text argument gets our error, not DuckDB's "no function"
        duckdb.array_type(duckdb.sqltype("FLOAT"), dimension),
        type="arrow",
        null_handling="special",
        side_effects=False,
    )


_MAX_REDUCE_ARGS = 8


def _register_reduce(con: duckdb.DuckDBPyConnection, runtime: LLMRuntime) -> None:
    """`llm_reduce(instruction, field, ...)`, the aggregate: a temp macro per number of
    arguments collects each group's rows (`list(row(...))`) for `__llm_reduce_lists`
    (`ReduceMemo`). `connect()`'s queries call `__llm_reduce_lists` directly, with their
    fields named (`llmudf.optimizer.reduce_sql`)."""
    runtime.reduce = ReduceMemo(runtime.config, runtime.cache, runtime.record)
    con.create_function(
        REDUCE_LISTS,
        runtime.reduce,
        None,
        "VARCHAR",
        type="arrow",
        null_handling="special",
        side_effects=False,
    )
    overloads = []
    for n in range(1, _MAX_REDUCE_ARGS + 1):
        names = ", ".join(f"a{i}" for i in range(1, n + 1))
        overloads.append(f"(i, {names}) AS {REDUCE_LISTS}(i, list(row({names})))")
    con.execute(f"CREATE OR REPLACE TEMP MACRO llm_reduce{', '.join(overloads)}")


def connect(
    database: str = ":memory:", model: str | None = None, config: Config | None = None, **options
) -> Connection:
    """A DuckDB connection whose `sql()` / `execute()` answer LLM calls as a whole query.

    options: fields of `llmudf.Config` (max_tokens, temperature, cache, progress, ...).

    >>> con = llmudf.connect(model="path/to/model.gguf", max_tokens=16)   # doctest: +SKIP
    """
    if config is None:
        config = Config.from_kwargs(model=model, **options)
    elif model is not None or options:
        raise TypeError("pass either config= or keyword options, not both")
    return Connection(duckdb.connect(database), config)


class Connection:
    """A duckdb connection wrapper: LLM queries are rewritten, everything else passes through
    (any other attribute is the underlying connection's). `last_stats`: the CallStats of the
    latest query; `last_fallback`: why it ran per chunk instead (None if rewritten).

    Table names resolve as in DuckDB: catalog tables first, then DataFrames / Arrow tables
    in the caller's scope (DuckDB's replacement scans, looked up in the frame that called
    `sql()` / `execute()`)."""

    def __init__(
        self, con: duckdb.DuckDBPyConnection, config: Config, runtime: LLMRuntime | None = None
    ):
        self.con = con
        self.config = config
        self.runtime = runtime or register(con, config)
        self.last_fallback: str | None = None
        # the caller's (globals, locals) and this query's answer tables, for replacement
        # scans; a relation binds the tables it reads, so they live as long as it does
        self._scope: tuple[dict, dict] = ({}, {})
        self._answers: dict[str, pa.Table] = {}

    @property
    def last_stats(self) -> StatsTable:
        return StatsTable(self.runtime.stats)

    def sql(self, query: str, params=None) -> duckdb.DuckDBPyRelation:
        """Run `query`, answering its LLM calls first; returns a DuckDB relation."""
        return self._query("sql", query, params, _caller_scope())

    def execute(self, query: str, parameters=None) -> Connection:
        """Like duckdb's execute(); fetch with fetchall() / df() / arrow() on the result."""
        self._query("execute", query, parameters, _caller_scope())
        return self

    def query(self, query: str, params=None) -> duckdb.DuckDBPyRelation:
        """DuckDB's alias of `sql()`."""
        return self._query("sql", query, params, _caller_scope())

    def cursor(self) -> Connection:
        """A new llmudf connection to the same database (for another thread), as DuckDB's
        `cursor()`. The functions are registered once per database, so a cursor shares this
        connection's config, result cache and `last_stats`."""
        return Connection(self.con.cursor(), self.config, self.runtime)

    def explain_llm(self, query: str) -> LLMExplain:
        """What the whole-query path would do, without running the LLM (see LLMExplain)."""
        if has_reduce(query):
            query = rewrite_reduce(query, "duckdb")
        rewrite = QueryRewrite(query, "duckdb")
        sites = []
        tokenize, render = explain_tokenizer(self.config)
        options = PlanOptions.from_config(self.config)
        self._scope, self._answers = _caller_scope(), {}

        def plan_only(step: AnswerStep, call: CallInput) -> pa.Array:
            site, instruction = step.site, call.instruction
            if isinstance(instruction, str):
                text = instruction
            else:
                text = next((str(i) for i in instruction if i is not None), "")
            plan = plan_call(site.spec.instruction(text), call.fields, options)
            explained = explain_call(
                site.label,
                text,
                plan,
                step.pushed,
                tokenize,
                render,
                num_rows=call.num_rows,
                row_counts=call.row_counts,
                tokens_per_s=measured_tokens_per_s(self.config),
                new_tokens=site.spec.max_new_tokens(site.spec.config(self.config)),
                blocking=getattr(call, "blocking", None),  # a semantic join's JoinInput
            )
            sites.append(explained)
            nulls = pa.nulls(call.num_tuples, site.spec.function.arrow_type)
            return _duck_answers(site.spec.function, nulls)

        try:
            final = drive(
                rewrite, self._run_sql, plan_only, self._bind, assume_pass=True, config=self.config
            ).sql
            if REDUCE_LISTS in final.lower():  # the groups the query yields, planned
                run = self._duck("sql", final, None).to_arrow_table
                sites += self.runtime.reduce.explain(run)
        finally:
            self._scope, self._answers = ({}, {}), {}
        return LLMExplain(final, tuple(sites))

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str):
        return getattr(self.con, name)

    # ---- the whole-query path --------------------------------------------------------------

    def _query(self, method: str, query: str, params, scope: tuple[dict, dict]):
        self.runtime.stats.clear()
        self.last_fallback = None
        self._scope, self._answers = scope, {}
        try:
            if not _LLM_CALL.search(query) and not has_reduce(query):
                return self._duck(method, query, params)
            statements = _split_statements(query)
            if len(statements) > 1 and params is None:
                for statement in statements[:-1]:
                    self._statement("execute", statement, None)
                    self.con.complete()  # run it to its end, as DuckDB does
                return self._statement(method, statements[-1], None)
            return self._statement(method, query, params)
        finally:
            self._scope, self._answers = ({}, {}), {}

    def _statement(self, method: str, query: str, params):
        """One statement: rewritten when the rewrite covers it, else per chunk."""
        if has_reduce(query):  # llm_reduce: checked, and its groups collected as lists
            query = rewrite_reduce(query, "duckdb")
        try:
            rewrite = QueryRewrite(query, "duckdb", params=params)
        except UnsupportedQuery as exc:
            return self._per_chunk(method, query, params, exc)
        if not rewrite.sites:
            return self._final(method, query, params)
        if not self.config.rewrite:
            return self._per_chunk(method, query, params, "rewrite off")
        try:
            final = drive(rewrite, self._run_sql, self._answer, self._bind, config=self.config).sql
            return self._final(method, final, None)
        except duckdb.InterruptException:
            raise  # the user stopped the query: never run it again per chunk
        except (UnsupportedQuery, duckdb.Error) as exc:
            # the rewrite's own SQL failed, or the user's query is wrong: the per-chunk path
            # tells them apart (it raises the user's error, naming the call site)
            return self._per_chunk(method, query, params, exc)

    def _final(self, method: str, sql: str, params):
        """Run the final SQL; one with llm_reduce answers its groups first, together (its
        query, or the query of its CREATE TABLE AS / INSERT, runs once to collect them)."""
        if REDUCE_LISTS in sql.lower():
            select = _query_of(sql)
            if select is not None:
                run = self._duck("sql", select, params).to_arrow_table
                self.runtime.reduce.prefetch(run)
        return self._duck(method, sql, params)

    def _per_chunk(self, method: str, query: str, params, reason):
        if isinstance(reason, Exception):
            reason = f"{type(reason).__name__}: {reason}"
        self.last_fallback = reason
        try:
            rewrite = QueryRewrite(query, "duckdb")  # canonical calls: fields named
        except UnsupportedQuery:
            return self._duck(method, query, params)
        try:
            return self._duck(method, rewrite.udf_sql(), params)
        except duckdb.BinderException as exc:
            message = str(exc)
            for site in rewrite.sites:
                columns = {c.name for key in site.keys for c in key.find_all(exp.Column)}
                if any(f'"{c}"' in message for c in columns):
                    raise LLMCallError(f"{site.label}: {message}") from exc
            raise

    def _duck(self, method: str, query: str, params):
        """`con.sql` / `con.execute`, called from a frame whose locals are the caller's plus
        this query's answer tables: DuckDB's replacement scans look names up there."""
        globals_, locals_ = self._scope
        namespace = {**locals_, **self._answers, "__llmudf_con": self.con}
        namespace["__llmudf_args"] = (query, params)
        call = {
            "sql": "__llmudf_con.sql(__llmudf_args[0], params=__llmudf_args[1])",
            "execute": "__llmudf_con.execute(*__llmudf_args)",
        }[method]
        return eval(call, globals_, namespace)  # noqa: S307 - a fixed expression

    def _run_sql(self, sql: str) -> pa.Table:
        return self._duck("sql", sql, None).to_arrow_table()

    def _answer(self, step: AnswerStep, call: CallInput) -> pa.Array:
        spec = step.site.spec
        answers = self.runtime.run(spec, call.instruction, call.fields, num_rows=call.num_rows)
        return _duck_answers(spec.function, answers)

    def _bind(self, name: str, table: pa.Table) -> None:
        self._answers[name] = table  # read by the replacement scans of `_duck`


def _make_udf(runtime: LLMRuntime, name: str):
    function = FUNCTIONS[name]

    def udf(*args) -> pa.Array:
        args = [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in args]
        if len(args[0]) == 0:
            return pa.array([], type=function.arrow_type)
        call = bind_chunk(name, args, f"{name} (per chunk)")
        answers = runtime.run(call.spec, call.instruction, call.fields)
        return _duck_answers(function, answers)

    return udf


_NAMESPACE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "llmudf_namespace", default=None
)


@contextlib.contextmanager
def using_namespace(namespace: dict):
    """Resolve table names in `namespace` (e.g. a notebook's `ipython.user_ns`) instead of
    the caller's frame, for queries run inside this block: for callers such as IPython
    magics, whose frame is not where the user's DataFrames are.

    >>> with using_namespace({"df": df}):                               # doctest: +SKIP
    ...     con.sql("SELECT * FROM df")
    """
    token = _NAMESPACE.set(namespace)
    try:
        yield
    finally:
        _NAMESPACE.reset(token)


def _caller_scope() -> tuple[dict, dict]:
    """(globals, locals) of the nearest frame outside llmudf: where the user's DataFrames are
    (or the namespace of an enclosing `using_namespace`)."""
    namespace = _NAMESPACE.get()
    if namespace is not None:
        return namespace, {}
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "llmudf":
        frame = frame.f_back
    if frame is None:
        return {}, {}
    return frame.f_globals, dict(frame.f_locals)


def _query_of(sql: str) -> str | None:
    """The query that yields a statement's rows: itself, or that of a CREATE TABLE AS /
    INSERT ... SELECT; None for anything else."""
    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
    except sqlglot.errors.ParseError:
        return None
    if isinstance(tree, exp.Create | exp.Insert) and tree.args.get("kind") != "VIEW":
        tree = tree.expression
    return tree.sql("duckdb") if isinstance(tree, exp.Query) else None


def _split_statements(query: str) -> list[str]:
    """The statements of a query string, split by DuckDB's own parser."""
    try:
        return [s.query for s in duckdb.extract_statements(query)]
    except duckdb.Error:
        return [query]  # DuckDB will name the syntax error when it runs


def _duck_answers(function: FunctionSpec, answers: pa.Array) -> pa.Array:
    """Answers as DuckDB reads them: the JSON function's as Arrow's JSON type (DuckDB's JSON)."""
    if function.sql_type == "JSON":
        return pa.ExtensionArray.from_storage(pa.json_(), answers)
    return answers
