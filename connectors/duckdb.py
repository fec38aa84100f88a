"""DuckDB: `SELECT llm(...)` optimized as a whole query, with per-chunk UDFs as the fallback.

>>> import llmudf
>>> con = llmudf.connect()                                                  # doctest: +SKIP
>>> con.execute("CREATE TABLE t AS SELECT 'Up' AS title")                   # doctest: +SKIP
>>> con.sql("SELECT llm_filter('Is it animated?', title) FROM t").fetchall()  # doctest: +SKIP
[(True,)]
>>> print(con.explain_llm("SELECT llm('Summarize', title) FROM t"))         # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import re
import sys
import threading

import duckdb
import pyarrow as pa
from sqlglot import exp

from llmudf.cache import open_cache
from llmudf.client import get_client
from llmudf.config import Config
from llmudf.executor import CallStats, run_call
from llmudf.functions import FUNCTIONS, LLMCallError, bind_call, is_options
from llmudf.optimizer.callsite import fields_table
from llmudf.optimizer.explain import LLMExplain, explain_call
from llmudf.optimizer.plan import PlanOptions, plan_call
from llmudf.optimizer.rewrite import ANSWER, FOUND, QueryRewrite, UnsupportedQuery

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
        with self._lock:
            same = [s for s in self.stats if s.site == result.stats.site]
            if same:  # the per-chunk path: one CallStats per site, summed over chunks
                same[0].add(result.stats)
            else:
                self.stats.append(result.stats)
        return result.answers


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
    return runtime


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
        self._names = itertools.count(1)
        # the caller's (globals, locals) and this query's answer tables, for replacement
        # scans; a relation binds the tables it reads, so they live as long as it does
        self._scope: tuple[dict, dict] = ({}, {})
        self._answers: dict[str, pa.Table] = {}

    @property
    def last_stats(self) -> list[CallStats]:
        return list(self.runtime.stats)

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
        rewrite = QueryRewrite(query, "duckdb")
        sites = []
        tokenize, render = _tokenizer(self.config)
        self._scope, self._answers = _caller_scope(), {}

        def plan_only(site, args: pa.Table) -> str:
            instruction, fields = site.inputs(args)
            if isinstance(instruction, str):
                text = instruction
            else:
                text = next((str(i) for i in instruction if i is not None), "")
            options = PlanOptions(
                dedup=self.config.dedup,
                reorder_fields=self.config.reorder_fields,
                reorder_rows=self.config.reorder_rows,
            )
            plan = plan_call(site.spec.instruction(text), fields, options)
            sites.append(
                explain_call(
                    site.label, text, plan, site.pushed, tokenize, render, num_rows=site.num_rows
                )
            )
            nulls = pa.nulls(args.num_rows, site.spec.function.arrow_type)
            return self._register_answers(site, args, nulls)

        try:
            final = rewrite.run(self._run_sql, plan_only, assume_pass=True)
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
            if not _LLM_CALL.search(query):
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
        try:
            rewrite = QueryRewrite(query, "duckdb", params=params)
        except UnsupportedQuery as exc:
            return self._per_chunk(method, query, params, exc)
        if not rewrite.sites:
            return self._duck(method, query, params)
        if not self.config.rewrite:
            return self._per_chunk(method, query, params, "rewrite off")
        try:
            final = rewrite.run(self._run_sql, self._answer)
            return self._duck(method, final, None)
        except (UnsupportedQuery, duckdb.Error) as exc:
            # the rewrite's own SQL failed, or the user's query is wrong: the per-chunk path
            # tells them apart (it raises the user's error, naming the call site)
            return self._per_chunk(method, query, params, exc)

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

    def _answer(self, site, args: pa.Table) -> str:
        instruction, fields = site.inputs(args)
        answers = self.runtime.run(site.spec, instruction, fields, num_rows=site.num_rows)
        return self._register_answers(site, args, answers)

    def _register_answers(self, site, args: pa.Table, answers: pa.Array) -> str:
        if site.spec.function.sql_type == "JSON":  # DuckDB reads Arrow's JSON type as JSON
            answers = pa.ExtensionArray.from_storage(pa.json_(), answers)
        table = args.append_column(ANSWER, answers).append_column(
            FOUND, pa.array([True] * args.num_rows, pa.bool_())
        )
        name = f"__llm_answers_{next(self._names)}"
        self._answers[name] = table
        return name


def _make_udf(runtime: LLMRuntime, name: str):
    function = FUNCTIONS[name]

    def udf(*args) -> pa.Array:
        args = [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in args]
        num_rows = len(args[0])
        if num_rows == 0:
            return pa.array([], type=function.arrow_type)
        site = f"{name} (per chunk)"
        rest = list(args[1:])
        const = rest.pop(0)[0].as_py() if function.const_arg and rest else None
        options = {}
        if len(rest) >= 2 and pa.types.is_struct(rest[-1].type):
            keys = [f.name for f in rest[-1].type]
            columns = dict(zip(keys, (c.to_pylist() for c in rest[-1].flatten()), strict=True))
            # a constant here: the same value on every row of the chunk
            constants = {k: c[0] for k, c in columns.items() if len(set(map(repr, c))) == 1}
            if is_options(keys, constants, site, from_rows=True):
                options = constants
                rest.pop()
        spec = bind_call(name, const, options, site)
        instruction = args[0].to_pylist()
        if len(set(instruction)) == 1 and instruction[0] is not None:
            instruction = instruction[0]
        answers = runtime.run(spec, instruction, _fields_table(rest, num_rows))
        if function.sql_type == "JSON":  # DuckDB maps Arrow's JSON extension type to JSON
            return pa.ExtensionArray.from_storage(pa.json_(), answers)
        return answers

    return udf


def _caller_scope() -> tuple[dict, dict]:
    """(globals, locals) of the nearest frame outside llmudf: where the user's DataFrames are."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "llmudf":
        frame = frame.f_back
    if frame is None:
        return {}, {}
    return frame.f_globals, dict(frame.f_locals)


def _split_statements(query: str) -> list[str]:
    """The statements of a query string, split by DuckDB's own parser."""
    try:
        return [s.query for s in duckdb.extract_statements(query)]
    except duckdb.Error:
        return [query]  # DuckDB will name the syntax error when it runs


def _fields_table(args: list[pa.Array], num_rows: int) -> pa.Table:
    names, arrays = [], []
    for i, arg in enumerate(args, 1):
        if pa.types.is_struct(arg.type):
            names += [f.name for f in arg.type]
            arrays += arg.flatten()
        else:
            names.append(f"field{i}")
            arrays.append(arg)
    return fields_table(names, arrays, num_rows)


def _tokenizer(config: Config):
    """(tokenize, render) with the model's tokenizer and chat template, or (None, None)."""
    from llmudf.prompt import ChatPrompt

    try:
        tokenizer = get_client(config).tokenizer
    except Exception:  # no tokenizer without loading a model: EXPLAIN counts characters
        return None, None
    return tokenizer.encode_batch, lambda user: tokenizer.apply_chat_template(
        ChatPrompt(user).messages()
    )
