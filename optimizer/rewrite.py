"""The whole-query rewrite: the relational part first, each LLM call once per distinct
argument tuple, the answers joined back in.

For each SELECT scope with LLM calls (CTEs and subqueries first): the WHERE conjuncts
without LLM calls filter the rows; then the LLM conjuncts run one at a time, the one with
the fewest distinct argument tuples first, each on the survivors of the previous ones;
then the calls in SELECT / GROUP BY / HAVING / ORDER BY run on the rows that pass the whole
WHERE (and the LIMIT, when it does not depend on an LLM answer: then the final query keeps
only the answered rows, a superset of the LIMIT's rows). Each other call becomes

    LEFT JOIN <answers> AS __llm_i ON __llm_i.__llm_k0 IS NOT DISTINCT FROM <arg0> AND ...
    CASE WHEN __llm_i.__llm_found THEN __llm_i.__llm_answer ELSE <the call> END

so a row the answers miss still gets its answer from the per-chunk UDF: never wrong, only
slower. The SQL stays dialect-neutral (sqlglot); the caller runs it.

>>> rw = QueryRewrite("SELECT llm('Why?', title) FROM t", dialect="duckdb")
>>> [s.label for s in rw.sites], rw.udf_sql()
(['llm #1 in SELECT'], "SELECT LLM('Why?', {'title': title}) FROM t")
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from sqlglot import exp

from llmudf.optimizer.callsite import CallSite, find_call_sites, llm_calls, parse_call

KEY, ANSWER, FOUND, COUNT = "__llm_k", "__llm_answer", "__llm_found", "__llm_n"


class UnsupportedQuery(Exception):
    """The rewrite does not cover this query shape; run it through the per-chunk UDFs."""


# run_sql(sql) -> Arrow table; answer(site, args) -> name of a table with the args' key
# columns plus ANSWER and FOUND, one row per row of args
RunSql = Callable[[str], pa.Table]
Answer = Callable[[CallSite, pa.Table], str]


class QueryRewrite:
    """One query's LLM call sites, and the driver that answers them stage by stage."""

    def __init__(self, sql: str, dialect: str = "duckdb"):
        self.dialect = dialect
        try:
            statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
        except sqlglot.errors.ParseError as exc:
            raise UnsupportedQuery(f"sqlglot cannot parse the query: {exc}") from exc
        if len(statements) != 1:
            raise UnsupportedQuery("only a single statement is rewritten")
        self.tree = statements[0]
        self.sites = find_call_sites(self.tree)
        self._site_of = {id(s.node): s for s in self.sites}

    def udf_sql(self) -> str:
        """The query with canonical calls, for the per-chunk UDF path."""
        return self.tree.sql(self.dialect)

    def run(self, run_sql: RunSql, answer: Answer, assume_pass: bool = False) -> str:
        """Answer every call site; return the final SQL. `assume_pass`: for EXPLAIN, later
        stages see every row an LLM filter would judge (no LLM answers are needed)."""
        if not isinstance(self.tree, exp.Query):
            raise UnsupportedQuery(f"not a query: {self.tree.key.upper()}")
        if any(w.args.get("recursive") for w in self.tree.find_all(exp.With)):
            raise UnsupportedQuery("recursive CTEs are not rewritten")
        for site in self.sites:
            if _over_aggregate(site.node, self._scope_of(site.node)):
                raise UnsupportedQuery(
                    f"{site.label}: an argument is an aggregate (or a grouped LLM answer)"
                )
        self._run_sql, self._answer, self._assume_pass = run_sql, answer, assume_pass
        for scope in _selects_post_order(self.tree):
            if self._direct_calls(scope, scope):
                self._answer_scope(scope)
        return self.tree.sql(self.dialect)

    # ---- one SELECT scope ----------------------------------------------------------------

    def _answer_scope(self, scope: exp.Select) -> None:
        if scope.args.get("from_") is None:
            raise UnsupportedQuery("an LLM call in a SELECT without FROM")
        for node in self._direct_calls(scope, scope):
            clause = self._site(node).clause
            if clause in ("JOIN", "FROM", "LIMIT"):
                raise UnsupportedQuery(f"an LLM call in {clause}")
        _qualify_star(scope)
        conjuncts = _conjuncts(scope)
        done = [i for i, c in enumerate(conjuncts) if not self._direct_calls(scope, c)]
        todo = [i for i in range(len(conjuncts)) if i not in done]
        while todo:
            pick = self._cheapest(scope, todo, done) if len(todo) > 1 else todo[0]
            for node in self._direct_calls(scope, _conjuncts(scope)[pick]):
                self._answer_site(scope, self._site(node), done, pushdown=False)
            todo.remove(pick)
            if not self._assume_pass:
                done.append(pick)
        pushdown = _limit_pushdown_ok(scope, self)
        for node in self._direct_calls(scope, scope):
            self._answer_site(scope, self._site(node), done, pushdown=pushdown)

    def _answer_site(self, scope, site: CallSite, done: list[int], pushdown: bool) -> None:
        fresh = parse_call(site.node, site.index)  # inner calls are lookups by now
        site.instruction, site.fields = fresh.instruction, fresh.fields
        rows = self._rows_query(scope, site.keys, done, pushdown)
        keys = [exp.alias_(exp.column(f"{KEY}{j}"), f"{KEY}{j}") for j in range(len(site.keys))]
        args_sql = exp.select(*keys, exp.alias_(exp.func("COUNT", exp.Star()), COUNT))
        args_sql = args_sql.from_(rows.subquery("__llm_rows"))
        if site.keys:
            args_sql = args_sql.group_by(*[exp.column(f"{KEY}{j}") for j in range(len(keys))])
        site.args_sql = self._with_ctes(scope, args_sql).sql(self.dialect)
        args = self._run_sql(site.args_sql)
        site.num_rows = int(pc.sum(args[COUNT]).as_py() or 0)
        site.num_distinct = args.num_rows if site.num_rows else 0
        site.pushed = self._pushed(scope, done, pushdown)
        if site.num_rows == 0:
            args = args.slice(0, 0)
        table = self._answer(site, args.drop_columns([COUNT]))
        alias = f"__llm_{site.index}"
        conds = [
            exp.NullSafeEQ(this=exp.column(f"{KEY}{j}", alias), expression=key.copy())
            for j, key in enumerate(site.keys)
        ]
        on = exp.and_(*conds) if conds else exp.true()
        scope.append("joins", exp.Join(this=exp.table_(table, alias=alias), side="LEFT", on=on))
        if pushdown:
            # only rows under the LIMIT were answered: keep the answered rows (a superset of
            # the LIMIT's rows), so no row outside it reaches a per-chunk fallback
            scope.where(exp.column(FOUND, alias), copy=False)
            site.node.replace(exp.column(ANSWER, alias))
            return
        found, answer = exp.column(FOUND, alias), exp.column(ANSWER, alias)
        if _is_grouped(scope) and not _in_aggregate(site.node, scope):
            # the call's arguments are group keys, so its answer is one per group
            found, answer = exp.func("ANY_VALUE", found), exp.func("ANY_VALUE", answer)
        lookup = exp.Case(ifs=[exp.If(this=found, true=answer)], default=site.node.copy())
        site.node.replace(lookup)

    def _rows_query(self, scope, keys, done: list[int], pushdown: bool) -> exp.Select:
        """SELECT <keys> FROM <scope's sources> WHERE <done conjuncts> [ORDER BY .. LIMIT ..]."""
        conjuncts = _conjuncts(scope)
        select = exp.select(*[exp.alias_(k.copy(), f"{KEY}{j}") for j, k in enumerate(keys)])
        if not keys:
            select = exp.select(exp.alias_(exp.Literal.number(1), f"{KEY}_none"))
        select.set("from_", scope.args["from_"].copy())
        select.set("joins", [j.copy() for j in scope.args.get("joins") or []])
        if done:
            select = select.where(exp.and_(*[conjuncts[i].copy() for i in sorted(done)]))
        if pushdown:
            for arg in ("order", "limit"):
                if scope.args.get(arg) is not None:
                    select.set(arg, scope.args[arg].copy())
        return select

    def _cheapest(self, scope, todo: list[int], done: list[int]) -> int:
        """The LLM conjunct with the fewest distinct argument tuples on the current rows."""

        def num_distinct(i: int) -> int:
            nodes = self._direct_calls(scope, _conjuncts(scope)[i])
            total = 0
            for node in nodes:
                rows = self._rows_query(scope, self._site(node).keys, done, pushdown=False)
                sql = exp.select(exp.func("COUNT", exp.Star())).from_(
                    rows.distinct().subquery("__llm_rows")
                )
                total += self._run_sql(self._with_ctes(scope, sql).sql(self.dialect))[0][0].as_py()
            return total

        return min(todo, key=lambda i: (num_distinct(i), i))

    def _pushed(self, scope, done: list[int], pushdown: bool) -> list[str]:
        conjuncts = _conjuncts(scope)
        pushed = [f"filter {conjuncts[i].sql(self.dialect)}" for i in sorted(done)]
        sources = [scope.args["from_"].this, *[j.this for j in scope.args.get("joins") or []]]
        names = [s.sql(self.dialect) for s in sources if not s.alias.startswith("__llm_")]
        if len(names) > 1:
            pushed.append("join " + ", ".join(names))
        if pushdown:
            pushed.append(f"limit {scope.args['limit'].expression.sql(self.dialect)}")
        return pushed

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

    # ---- helpers over the AST -------------------------------------------------------------

    def _site(self, node) -> CallSite:
        return self._site_of[id(node)]

    def _scope_of(self, node) -> exp.Select | None:
        return node.find_ancestor(exp.Select)

    def _direct_calls(self, scope, node) -> list[exp.Anonymous]:
        return [n for n in llm_calls(node) if self._scope_of(n) is scope and id(n) in self._site_of]


def _conjuncts(scope: exp.Select) -> list[exp.Expression]:
    where = scope.args.get("where")
    if where is None:
        return []
    return list(where.this.flatten()) if isinstance(where.this, exp.And) else [where.this]


def _is_grouped(scope: exp.Select) -> bool:
    """Aggregated, with explicit keys (GROUP BY ALL makes a bare call a key itself)."""
    group = scope.args.get("group")
    if group is not None and group.args.get("all"):
        return False
    if group is not None or scope.args.get("having") is not None:
        return True
    return any(
        agg.find_ancestor(exp.Select) is scope and not agg.find_ancestor(exp.Window)
        for e in scope.expressions
        for agg in e.find_all(exp.AggFunc)
    )


def _over_aggregate(call: exp.Anonymous, scope: exp.Select | None) -> bool:
    """The call's arguments hold an aggregate of its scope, directly or as the ANY_VALUE an
    inner LLM call on group keys becomes: its answers cannot be joined to the rows."""
    if scope is None or _in_aggregate(call, scope):
        return False
    if any(agg.find_ancestor(exp.Select) is scope for agg in call.find_all(exp.AggFunc)):
        return True
    return _is_grouped(scope) and any(inner is not call for inner in llm_calls(call))


def _in_aggregate(node: exp.Expression, scope: exp.Select) -> bool:
    parent = node.parent
    while parent is not None and parent is not scope:
        if isinstance(parent, exp.AggFunc):
            return True
        parent = parent.parent
    return False


def _selects_post_order(node: exp.Expression):
    """Every SELECT, CTEs first, inner scopes before the scope that uses them."""
    children = sorted(node.iter_expressions(), key=lambda c: c.arg_key != "with_")
    for child in children:
        yield from _selects_post_order(child)
    if isinstance(node, exp.Select):
        yield node


def _qualify_star(scope: exp.Select) -> None:
    """`SELECT *` would also return the answer columns: spell out each source's star."""
    stars = [e for e in scope.expressions if isinstance(e, exp.Star)]
    if not stars:
        return
    joins = scope.args.get("joins") or []
    if any(s.args.get(k) for s in stars for k in ("except", "replace", "rename")):
        raise UnsupportedQuery("SELECT * with EXCLUDE / REPLACE next to an LLM call")
    if any(j.args.get("using") or j.args.get("kind") == "NATURAL" for j in joins):
        raise UnsupportedQuery("SELECT * over a USING / NATURAL join next to an LLM call")
    sources = [scope.args["from_"].this, *[j.this for j in joins]]
    expanded = []
    for e in scope.expressions:
        if isinstance(e, exp.Star):
            expanded += [
                exp.Column(this=exp.Star(), table=exp.to_identifier(s.alias_or_name))
                for s in sources
            ]
        else:
            expanded.append(e)
    scope.set("expressions", expanded)


def _limit_pushdown_ok(scope: exp.Select, rewrite: QueryRewrite) -> bool:
    """LIMIT can run below the SELECT's calls when it does not depend on an answer."""
    if scope.args.get("limit") is None:
        return False
    if any(scope.args.get(a) for a in ("offset", "group", "having", "distinct", "qualify")):
        return False
    if any(e.find(exp.AggFunc, exp.Window) for e in scope.expressions):
        return False
    order = scope.args.get("order")
    if order is None:
        return True
    aliases = {e.alias for e in scope.expressions if isinstance(e, exp.Alias)}
    for o in order.expressions:
        if llm_calls(o) or isinstance(o.this, exp.Literal):
            return False
        if any(c.name in aliases and not c.table for c in o.find_all(exp.Column)):
            return False
    return True
