"""The whole-query rewrite as a plan: the relational part first, each LLM call once per
distinct argument tuple, the answers joined back in. It runs nothing: a driver
(`llmudf.runtime.query_driver`) runs its steps through a connector and feeds the results back.

For each SELECT scope with LLM calls (CTEs and subqueries first): the WHERE conjuncts
without LLM calls filter the rows; then the LLM conjuncts run one at a time, the one with
the fewest distinct argument tuples first (a `Probe` counts them), each on the survivors of
the previous ones; then the calls in SELECT / GROUP BY / HAVING / ORDER BY run on the rows
that pass the whole WHERE (and the LIMIT, when it does not depend on an LLM answer: then
the final query keeps only the answered rows, a superset of the LIMIT's rows). Each call is
an `AnswerStep`, and in the final query it becomes

    LEFT JOIN <answers> AS __llm_i ON __llm_i.__llm_k0 IS NOT DISTINCT FROM <arg0> AND ...
    CASE WHEN __llm_i.__llm_found THEN __llm_i.__llm_answer
         ELSE <the call, its instruction and fields IF(__llm_i.__llm_found, NULL, arg)> END

so a row the answers miss still gets its answer from the per-chunk UDF: never wrong, only
slower. Found rows pass the UDF NULLs, which it answers as NULL without the model: Spark
evaluates a Python UDF on every row whatever the CASE branch; DuckDB's CASE is lazy, so
there they never reach it. The SQL stays dialect-neutral (sqlglot).

>>> rw = QueryRewrite("SELECT llm('Why?', title) AS a FROM t WHERE year > 2000", dialect="duckdb")
>>> [s.label for s in rw.sites], rw.udf_sql()
(['llm #1 in SELECT'], "SELECT LLM('Why?', {'title': title}) AS a FROM t WHERE year > 2000")
>>> steps = rw.steps()
>>> step = next(steps)
>>> step.site.label, step.pushed
('llm #1 in SELECT', ('filter year > 2000',))
"""

from __future__ import annotations

import itertools
from collections.abc import Generator
from dataclasses import dataclass

import sqlglot
from sqlglot import exp

from llmudf.optimizer.callsite import CallSite, call_nodes, find_call_sites, llm_calls, parse_call
from llmudf.optimizer.join import JoinStep, plan_semantic_joins
from llmudf.optimizer.scopes import (
    UnsupportedQuery,
    after_grouping,
    conjuncts,
    group_keys,
    inline_params,
    limit_pushdown_ok,
    name_unaliased_calls,
    named_by_group,
    nondeterministic,
    outer_references,
    over_aggregate,
    qualify_star,
    scope_of,
    selects_post_order,
    sources,
)

__all__ = [
    "ANSWER",
    "COUNT",
    "FOUND",
    "KEY",
    "AnswerStep",
    "JoinStep",
    "Probe",
    "QueryRewrite",
    "Step",
    "UnsupportedQuery",
]

KEY, ANSWER, FOUND, COUNT = "__llm_k", "__llm_answer", "__llm_found", "__llm_n"
_NUMBERS = itertools.count(1)  # answer-table names unique within the process


@dataclass(frozen=True, slots=True)
class Probe:
    """Count the distinct argument tuples of one call of a pending LLM conjunct, on the rows
    that pass the conjuncts run so far. The driver runs `sql` (one row, one column) and sends
    the count back; the conjunct whose calls have the fewest runs first."""

    sql: str


@dataclass(frozen=True, slots=True)
class AnswerStep:
    """Answer `site` once per distinct argument tuple and bind the answers as `table`.

    `args_sql` returns one row per distinct tuple: the key columns `__llm_k0`, ... (one per
    `site.keys`, in that order) and `__llm_n`, the rows the tuple stands for (a call without
    keys: one row, all rows counted). `table` holds the key columns plus ANSWER and FOUND
    (true); the final SQL and later steps' SQL read it."""

    site: CallSite  # parsed as the call stands now: inner calls are answer lookups
    args_sql: str
    table: str
    pushed: tuple[str, ...]  # what runs below the call: filters, joins, a LIMIT


Step = Probe | AnswerStep | JoinStep


class QueryRewrite:
    """One query's LLM call sites in canonical form, and the plan that answers them."""

    def __init__(self, sql: str, dialect: str = "duckdb", params=None):
        """`params`: the query's parameter values (a sequence for `?` / `$1`, a mapping for
        `$name`), put into the query as literals so every stage can run it."""
        self.dialect = dialect
        try:
            statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
        except sqlglot.errors.ParseError as exc:
            raise UnsupportedQuery(f"sqlglot cannot parse the query: {exc}") from exc
        if len(statements) != 1:
            raise UnsupportedQuery("only a single statement is rewritten")
        self.tree = statements[0]
        if params is not None:
            inline_params(self.tree, params)
        name_unaliased_calls(llm_calls(self.tree), dialect)
        self.sites = find_call_sites(self.tree)  # the tree is canonical from here on

    def udf_sql(self) -> str:
        """The query with canonical calls, for the per-chunk UDF path."""
        return self.tree.sql(self.dialect)

    def steps(self, assume_pass: bool = False) -> Generator[Step, object, str]:
        """The plan, stage by stage: yields `Probe`, `JoinStep` and `AnswerStep`s in the
        order they must run; send each Probe its count (an int) and each other step anything
        once its table is bound. Returns the final SQL. Raises UnsupportedQuery for a shape
        it does not cover: here, before any step, for what the whole query shows; when the
        plan reaches it, for a scope's own (a JOIN condition that is no semantic join, a
        correlated subquery). `assume_pass`: for EXPLAIN, later stages see every row an LLM
        filter would judge."""
        self._check()
        return _Plan(self, assume_pass).run()

    def _check(self) -> None:
        query = self.tree
        if isinstance(query, exp.Insert) or (
            isinstance(query, exp.Create) and query.args.get("kind") == "TABLE"
        ):  # INSERT ... SELECT, CTAS (a view must not hold this query's answer tables)
            query = query.expression
        if isinstance(self.tree, exp.Create) and self.tree.args.get("kind") == "VIEW":
            raise UnsupportedQuery("CREATE VIEW: a view keeps its calls, answered when read")
        if not isinstance(query, exp.Query):
            raise UnsupportedQuery(f"not a query: {self.tree.key.upper()}")
        if self.tree.find(exp.Placeholder, exp.Parameter):
            raise UnsupportedQuery("query parameters without values")
        if any(w.args.get("recursive") for w in self.tree.find_all(exp.With)):
            raise UnsupportedQuery("recursive CTEs are not rewritten")
        name = nondeterministic(self.tree)
        if name:
            raise UnsupportedQuery(f"{name}() differs between the stages' runs of the rows")
        for site in self.sites:
            if over_aggregate(site.node, scope_of(site.node)):
                raise UnsupportedQuery(
                    f"{site.label}: an argument is an aggregate (or a grouped LLM answer)"
                )


class _Plan:
    """One run of the plan over its own copy of the canonical tree, in which each answered
    call is replaced by its answer lookup."""

    def __init__(self, rewrite: QueryRewrite, assume_pass: bool):
        self.dialect = rewrite.dialect
        self.assume_pass = assume_pass
        self.tree = rewrite.tree.copy()
        nodes = call_nodes(self.tree)
        self._index = {id(n): s.index for n, s in zip(nodes, rewrite.sites, strict=True)}
        self._tables = f"__llm_answers_{next(_NUMBERS)}"
        # per scope: the SQL of each call answered there -> its lookup
        self._answered: dict[int, dict[str, exp.Expression]] = {}

    def run(self) -> Generator[Step, object, str]:
        for scope in selects_post_order(self.tree):
            if self._direct_calls(scope, scope):
                yield from self._scope(scope)
        return self.tree.sql(self.dialect)

    def _scope(self, scope: exp.Select):
        if scope.args.get("from_") is None:  # SELECT without FROM: over one row
            one = exp.select(exp.alias_(exp.Literal.number(1), f"{KEY}_one"))
            scope.set("from_", exp.From(this=one.subquery("__llm_one")))
        for node in self._direct_calls(scope, scope):
            clause = self._site(node).clause
            if clause in ("FROM", "LIMIT"):
                raise UnsupportedQuery(f"an LLM call in {clause}")
        outer = outer_references(scope)
        if outer:
            raise UnsupportedQuery(
                f"an LLM call in a correlated subquery (it reads {', '.join(sorted(outer))} "
                "of the outer query)"
            )
        qualify_star(scope)
        yield from plan_semantic_joins(self, scope)  # calls in JOIN ... ON (optimizer/join.py)
        done = [i for i, c in enumerate(conjuncts(scope)) if not self._direct_calls(scope, c)]
        todo = [i for i in range(len(conjuncts(scope))) if i not in done]
        while todo:
            pick = (yield from self._cheapest(scope, todo, done)) if len(todo) > 1 else todo[0]
            for node in self._direct_calls(scope, conjuncts(scope)[pick]):
                yield from self._answer(scope, node, done, pushdown=False)
            todo.remove(pick)
            if not self.assume_pass:
                done.append(pick)
        pushdown = limit_pushdown_ok(scope)
        for node in self._direct_calls(scope, scope):
            yield from self._answer(scope, node, done, pushdown=pushdown)

    def _answer(self, scope: exp.Select, node, done: list[int], pushdown: bool):
        site = self._site(node)
        call_sql = node.sql(self.dialect)
        answered = self._answered.setdefault(id(scope), {})
        if call_sql in answered:
            # the same call on the same (or fewer) rows: one answer table, and one
            # expression, so that GROUP BY <call> and SELECT <call> stay the same key
            self._replace_call(scope, node, answered[call_sql].copy())
            return
        keys = [exp.column(f"{KEY}{j}") for j in range(len(site.keys))]
        args = exp.select(*[exp.alias_(k, k.name) for k in keys])
        args = args.select(exp.alias_(exp.func("COUNT", exp.Star()), COUNT))
        args = args.from_(self._rows(scope, site.keys, done, pushdown).subquery("__llm_rows"))
        if keys:
            args = args.group_by(*[k.copy() for k in keys])
        table = f"{self._tables}_{site.index}"
        args_sql = self._with_ctes(scope, args).sql(self.dialect)
        yield AnswerStep(site, args_sql, table, self._pushed(scope, done, pushdown))

        alias = f"__llm_{site.index}"
        conds = [
            exp.NullSafeEQ(this=exp.column(f"{KEY}{j}", alias), expression=key.copy())
            for j, key in enumerate(site.keys)
        ]
        on = exp.and_(*conds) if conds else exp.true()
        scope.append("joins", exp.Join(this=exp.table_(table, alias=alias), side="LEFT", on=on))
        found, answer = exp.column(FOUND, alias), exp.column(ANSWER, alias)
        if pushdown:
            # only rows under the LIMIT were answered: keep the answered rows (a superset of
            # the LIMIT's rows), so no row outside it reaches a per-chunk fallback
            scope.where(found, copy=False)
            lookup = answer
        else:
            miss = _misses_only(node.copy(), found)
            lookup = exp.Case(ifs=[exp.If(this=found.copy(), true=answer)], default=miss)
        answered[call_sql] = lookup.copy()
        self._replace_call(scope, node, lookup)

    def _replace_call(self, scope: exp.Select, node, lookup: exp.Expression) -> None:
        """Put the answer lookup in place of the call. In an aggregating scope a call after
        the GROUP BY (SELECT, HAVING, ORDER BY, QUALIFY) that is not a group key itself has
        group keys as arguments, so its answer is one per group: ANY_VALUE of it."""
        if after_grouping(node, scope) and not self._is_group_key(scope, node, lookup):
            lookup = exp.func("ANY_VALUE", lookup)
        node.replace(lookup)

    def _is_group_key(self, scope: exp.Select, node, lookup: exp.Expression) -> bool:
        """GROUP BY names the call's SELECT item, or a GROUP BY key is the same call (or,
        answered first, its lookup)."""
        group = scope.args.get("group")
        if group is None:
            return False
        if named_by_group(node, scope):
            return True
        forms = {node.sql(self.dialect), lookup.sql(self.dialect)}
        return any(key.sql(self.dialect) in forms for key in group_keys(group))

    def _cheapest(self, scope: exp.Select, todo: list[int], done: list[int]):
        """The pending LLM conjunct whose calls have the fewest distinct argument tuples."""
        counts = {}
        for i in todo:
            counts[i] = 0
            for node in self._direct_calls(scope, conjuncts(scope)[i]):
                rows = self._rows(scope, self._site(node).keys, done, pushdown=False)
                sql = exp.select(exp.func("COUNT", exp.Star()))
                sql = sql.from_(rows.distinct().subquery("__llm_rows"))
                counts[i] += yield Probe(self._with_ctes(scope, sql).sql(self.dialect))
        return min(todo, key=lambda i: (counts[i], i))

    def _rows(self, scope: exp.Select, keys, done: list[int], pushdown: bool) -> exp.Select:
        """SELECT <keys> FROM <scope's sources> WHERE <done conjuncts> [ORDER BY .. LIMIT ..]."""
        select = exp.select(*[exp.alias_(k.copy(), f"{KEY}{j}") for j, k in enumerate(keys)])
        if not keys:
            select = exp.select(exp.alias_(exp.Literal.number(1), f"{KEY}_none"))
        select.set("from_", scope.args["from_"].copy())
        select.set("joins", [j.copy() for j in scope.args.get("joins") or []])
        if done:
            where = conjuncts(scope)
            select = select.where(exp.and_(*[where[i].copy() for i in sorted(done)]))
        if pushdown:
            for arg in ("order", "limit"):
                if scope.args.get(arg) is not None:
                    select.set(arg, scope.args[arg].copy())
        return select

    def _pushed(self, scope: exp.Select, done: list[int], pushdown: bool) -> tuple[str, ...]:
        where = conjuncts(scope)
        pushed = [f"filter {where[i].sql(self.dialect)}" for i in sorted(done)]
        names = [s.sql(self.dialect) for s in sources(scope) if not s.alias.startswith("__llm_")]
        if len(names) > 1:
            pushed.append("join " + ", ".join(names))
        if pushdown:
            pushed.append(f"limit {scope.args['limit'].expression.sql(self.dialect)}")
        return tuple(pushed)

    def _with_ctes(self, scope: exp.Select, query: exp.Select) -> exp.Select:
        """`query` with the CTEs visible from `scope`, outermost first."""
        ctes = []
        node = scope
        while node is not None:
            with_ = node.args.get("with_")
            if with_ is not None:
                ctes = [c.copy() for c in with_.expressions] + ctes
            node = node.parent
        if ctes:
            query.set("with_", exp.With(expressions=ctes))
        return query

    def _site(self, node) -> CallSite:
        return parse_call(node, self._index[id(node)])

    def _direct_calls(self, scope, node) -> list[exp.Anonymous]:
        """The original calls under `node` that belong to `scope`, innermost first (not the
        copies inside answer lookups)."""
        return [n for n in llm_calls(node) if scope_of(n) is scope and id(n) in self._index]


def _misses_only(call: exp.Anonymous, found: exp.Column) -> exp.Anonymous:
    """`call` with its instruction and non-constant arguments NULL where the answer was
    found: a NULL instruction is a NULL answer, so the per-chunk UDF asks the model only
    for the tuples the answers miss (the source changed since the plan read it)."""
    for i, arg in enumerate(call.expressions):
        if i == 0 or arg.find(exp.Column) is not None:  # the instruction, and any fields
            arg.replace(exp.If(this=found.copy(), true=exp.null(), false=arg.copy()))
    return call
