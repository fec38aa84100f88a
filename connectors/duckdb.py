"""DuckDB: `SELECT llm(...)` optimized as a whole query, with per-chunk UDFs as the fallback.

>>> import llmudf
>>> con = llmudf.connect()                                                  # doctest: +SKIP
>>> con.execute("CREATE TABLE t AS SELECT 'Up' AS title")                   # doctest: +SKIP
>>> con.sql("SELECT llm_filter('Is it animated?', title) FROM t").fetchall()  # doctest: +SKIP
[(True,)]
>>> print(con.explain_llm("SELECT llm('Summarize', title) FROM t"))         # doctest: +SKIP
"""

from __future__ import annotations

import collections
import itertools
import re
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

KEEP_ANSWER_TABLES = 16  # queries whose answer tables stay registered
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
            side_effects=True,  # never constant-folded or shared between call sites
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
    latest query; `last_fallback`: why it ran per chunk instead (None if rewritten)."""

    def __init__(self, con: duckdb.DuckDBPyConnection, config: Config):
        self.con = con
        self.config = config
        self.runtime = register(con, config)
        self.last_fallback: str | None = None
        self._names = itertools.count(1)
        # answer tables of recent queries; a lazy relation may still read them
        self._tables: collections.deque[list[str]] = collections.deque()

    @property
    def last_stats(self) -> list[CallStats]:
        return list(self.runtime.stats)

    def sql(self, query: str, params=None) -> duckdb.DuckDBPyRelation:
        """Run `query`, answering its LLM calls first; returns a DuckDB relation."""
        if not _LLM_CALL.search(query):
            return self.con.sql(query, params=params)
        final, rewrite = self._prepare(query, has_params=params is not None)
        return self._bind(lambda: self.con.sql(final, params=params), rewrite)

    def execute(self, query: str, parameters=None) -> Connection:
        """Like duckdb's execute(); fetch with fetchall() / df() / arrow() on the result."""
        if not _LLM_CALL.search(query):
            self.con.execute(query, parameters)
            return self
        final, rewrite = self._prepare(query, has_params=parameters is not None)
        self._bind(lambda: self.con.execute(final, parameters), rewrite)
        return self

    def explain_llm(self, query: str) -> LLMExplain:
        """What the whole-query path would do, without running the LLM (see LLMExplain)."""
        rewrite = QueryRewrite(query, "duckdb")
        sites = []
        tokenize, render = _tokenizer(self.config)
        self._tables.append([])

        def plan_only(site, args: pa.Table) -> str:
            instruction, fields = site.inputs(args)
            text = instruction if isinstance(instruction, str) else str(instruction[0])
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

        final = rewrite.run(self._run_sql, plan_only, assume_pass=True)
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

    def _prepare(self, query: str, has_params: bool) -> tuple[str, QueryRewrite | None]:
        self.runtime.stats.clear()
        self._tables.append([])
        while len(self._tables) > KEEP_ANSWER_TABLES:
            for name in reversed(self._tables.popleft()):  # a JSON view before its table
                self.con.execute(f"DROP VIEW IF EXISTS {name}")
        try:
            rewrite = QueryRewrite(query, "duckdb")
        except UnsupportedQuery as exc:
            self.last_fallback = str(exc)
            return query, None
        if not rewrite.sites:
            self.last_fallback = None
            return query, None
        if not self.config.rewrite or has_params:
            self.last_fallback = "rewrite off" if not self.config.rewrite else "query parameters"
            return rewrite.udf_sql(), rewrite
        try:
            final = rewrite.run(self._run_sql, self._answer)
            self.last_fallback = None
            return final, rewrite
        except (UnsupportedQuery, duckdb.Error) as exc:
            self.last_fallback = f"{type(exc).__name__}: {exc}"
            return QueryRewrite(query, "duckdb").udf_sql(), rewrite

    def _run_sql(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()

    def _answer(self, site, args: pa.Table) -> str:
        instruction, fields = site.inputs(args)
        answers = self.runtime.run(site.spec, instruction, fields, num_rows=site.num_rows)
        return self._register_answers(site, args, answers)

    def _register_answers(self, site, args: pa.Table, answers: pa.Array) -> str:
        table = args.append_column(ANSWER, answers).append_column(
            FOUND, pa.array([True] * args.num_rows, pa.bool_())
        )
        name = f"__llm_answers_{next(self._names)}"
        if site.spec.function.sql_type == "JSON":
            self.con.register(f"{name}_raw", table)
            self._tables[-1].append(f"{name}_raw")
            self.con.execute(
                f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * REPLACE "
                f"(CAST({ANSWER} AS JSON) AS {ANSWER}) FROM {name}_raw"
            )
            self._tables[-1].append(name)
        else:
            self.con.register(name, table)
            self._tables[-1].append(name)
        return name

    def _bind(self, run, rewrite: QueryRewrite | None):
        """Run the final query; a binder error about a call's column names that call."""
        try:
            return run()
        except duckdb.BinderException as exc:
            message = str(exc)
            for site in rewrite.sites if rewrite else []:
                columns = {c.name for key in site.keys for c in key.find_all(exp.Column)}
                if any(f'"{c}"' in message for c in columns):
                    raise LLMCallError(f"{site.label}: {message}") from exc
            raise


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
            if is_options(keys):
                options = rest.pop()[0].as_py()
        spec = bind_call(name, const, options, site)
        instruction = args[0].to_pylist()
        if len(set(instruction)) == 1 and instruction[0] is not None:
            instruction = instruction[0]
        answers = runtime.run(spec, instruction, _fields_table(rest, num_rows))
        if function.sql_type == "JSON":  # DuckDB maps Arrow's JSON extension type to JSON
            return pa.ExtensionArray.from_storage(pa.json_(), answers)
        return answers

    return udf


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
