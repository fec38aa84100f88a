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
            _inline_params(self.tree, params)
        self.sites = find_call_sites(self.tree)
        self._site_of = {id(s.node): s for s in self.sites}

    def udf_sql(self) -> str:
        """The query with canonical calls, for the per-chunk UDF path."""
        return self.tree.sql(self.dialect)

    def run(self, run_sql: RunSql, answer: Answer, assume_pass: bool = False) -> str:
        """Answer every call site; return the final SQL. `assume_pass`: for EXPLAIN, later
        stages see every row an LLM filter would judge (no LLM answers are needed)."""
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
        for site in self.sites:
            if _over_aggregate(site.node, self._scope_of(site.node)):
                raise UnsupportedQuery(
                    f"{site.label}: an argument is an aggregate (or a grouped LLM answer)"
                )
        self._run_sql, self._answer, self._assume_pass = run_sql, answer, assume_pass
        self._answered: dict[int, dict[str, tuple[exp.Expression, CallSite]]] = {}
        for scope in _selects_post_order(self.tree):
            if self._direct_calls(scope, scope):
                self._answer_scope(scope)
        return self.tree.sql(self.dialect)

    # ---- one SELECT scope ----------------------------------------------------------------

    def _answer_scope(self, scope: exp.Select) -> None:
        if scope.args.get("from_") is None:  # SELECT without FROM: over one row
            one = exp.select(exp.alias_(exp.Literal.number(1), f"{KEY}_one"))
            scope.set("from_", exp.From(this=one.subquery("__llm_one")))
        for node in self._direct_calls(scope, scope):
            clause = self._site(node).clause
            if clause in ("JOIN", "FROM", "LIMIT"):
                raise UnsupportedQuery(f"an LLM call in {clause}")
        outer = _outer_references(scope)
        if outer:
            raise UnsupportedQuery(
                f"an LLM call in a correlated subquery (it reads {', '.join(sorted(outer))} "
                "of the outer query)"
            )
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
        call_sql = site.node.sql(self.dialect)
        answered = self._answered.setdefault(id(scope), {})
        if call_sql in answered:
            # the same call on the same (or fewer) rows: one answer table, and one
            # expression, so that GROUP BY <call> and SELECT <call> stay the same key
            lookup, other = answered[call_sql]
            site.num_rows, site.num_distinct, site.pushed = 0, 0, other.pushed
            site.args_sql = other.args_sql
            self._replace_call(scope, site, lookup.copy())
            return
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
            lookup = exp.column(ANSWER, alias)
        else:
            found, answer = exp.column(FOUND, alias), exp.column(ANSWER, alias)
            lookup = exp.Case(ifs=[exp.If(this=found, true=answer)], default=site.node.copy())
        answered[call_sql] = (lookup.copy(), site)
        self._replace_call(scope, site, lookup)

    def _replace_call(self, scope: exp.Select, site: CallSite, lookup: exp.Expression) -> None:
        """Put the answer lookup in place of the call. In an aggregating scope a call after
        the GROUP BY (SELECT, HAVING, ORDER BY, QUALIFY) that is not a group key itself has
        group keys as arguments, so its answer is one per group: ANY_VALUE of it."""
        if _after_grouping(site.node, scope) and not self._is_group_key(site, scope):
            lookup = exp.func("ANY_VALUE", lookup)
        site.node.replace(lookup)

    def _is_group_key(self, site: CallSite, scope: exp.Select) -> bool:
        """The call is (inside) a SELECT item that GROUP BY names by alias or position, or a
        GROUP BY key is the same call (or its answer lookup)."""
        group = scope.args.get("group")
        if group is None:
            return False
        keys = _group_keys(group)
        item = site.node
        while item.parent is not scope:
            item = item.parent
        if item.arg_key == "expressions":
            position = str(scope.expressions.index(item) + 1)
            for key in keys:
                if isinstance(key, exp.Column) and not key.table and key.name == item.alias:
                    return True
                if isinstance(key, exp.Literal) and not key.is_string and key.this == position:
                    return True
        call_sql = site.node.sql(self.dialect)
        for key in keys:
            if isinstance(key, exp.Case) and key.args.get("default") is not None:
                key = key.args["default"]
            if key.sql(self.dialect) == call_sql:
                return True
        return False

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
    """Inside an aggregate's argument or its FILTER (WHERE ...): evaluated per row."""
    parent = node.parent
    while parent is not None and parent is not scope:
        if isinstance(parent, exp.AggFunc | exp.Filter):
            return True
        parent = parent.parent
    return False


def _group_keys(group: exp.Group) -> list[exp.Expression]:
    """The expressions of GROUP BY, through ROLLUP / CUBE / GROUPING SETS and tuples."""
    keys = list(group.expressions)
    for arg in ("rollup", "cube", "grouping_sets"):
        for item in group.args.get(arg) or []:
            keys += list(item.expressions) if item.expressions else [item]
    flat = []
    for key in keys:
        if isinstance(key, exp.Paren):
            flat += _group_keys(exp.Group(expressions=[key.this]))
        elif isinstance(key, exp.Rollup | exp.Cube | exp.GroupingSets | exp.Tuple):
            flat += _group_keys(exp.Group(expressions=list(key.expressions)))
        else:
            flat.append(key)
    return flat


def _after_grouping(node: exp.Expression, scope: exp.Select) -> bool:
    """In an aggregating scope, evaluated once per group (not per row)."""
    if not _is_grouped(scope) or _in_aggregate(node, scope):
        return False
    item = node
    while item.parent is not scope:
        item = item.parent
    return item.arg_key in ("expressions", "having", "order", "qualify")


def _inline_params(tree: exp.Expression, params) -> None:
    """Replace `?`, `$1` and `$name` by the literal values of `params`."""
    placeholders = list(tree.find_all(exp.Placeholder))
    named = isinstance(params, dict)
    values = params if named else list(params)
    unnamed = [p for p in placeholders if p.this is None]
    if unnamed and (named or len(unnamed) != len(values)):
        raise UnsupportedQuery(f"{len(unnamed)} `?` parameter(s) for {len(values)} value(s)")
    position = iter(range(len(unnamed)))
    for node in placeholders:
        if node.this is None:
            value = values[next(position)]
        elif named:
            if str(node.this) not in values:
                raise UnsupportedQuery(f"no value for parameter ${node.this}")
            value = values[str(node.this)]
        else:
            index = int(node.this) - 1 if str(node.this).isdigit() else -1
            if not 0 <= index < len(values):
                raise UnsupportedQuery(f"no value for parameter ${node.this}")
            value = values[index]
        node.replace(_literal(value))


def _literal(value) -> exp.Expression:
    """A SQL literal of the type DuckDB gives the same Python value as a parameter."""
    if value is None or isinstance(value, bool | str):
        return exp.convert(value)
    if isinstance(value, int):
        return exp.cast(exp.convert(value), "BIGINT") if abs(value) >= 2**31 else exp.convert(value)
    if isinstance(value, float):
        return exp.cast(exp.Literal.string(repr(value)), "DOUBLE")
    raise UnsupportedQuery(f"a query parameter of type {type(value).__name__}")


def _selects_post_order(node: exp.Expression):
    """Every SELECT, CTEs first, inner scopes before the scope that uses them."""
    children = sorted(node.iter_expressions(), key=lambda c: c.arg_key != "with_")
    for child in children:
        yield from _selects_post_order(child)
    if isinstance(node, exp.Select):
        yield node


def _outer_references(scope: exp.Select) -> set[str]:
    """Tables of an outer query that the scope's own columns name (a correlated subquery)."""
    sources = [scope.args["from_"].this, *[j.this for j in scope.args.get("joins") or []]]
    names = {s.alias_or_name for s in sources}
    tables = {c.table for c in scope.find_all(exp.Column) if c.table and _scope_of(c) is scope}
    return tables - names


def _scope_of(node: exp.Expression) -> exp.Select | None:
    return node.find_ancestor(exp.Select)


def _qualify_star(scope: exp.Select) -> None:
    """`SELECT *` would also return the answer columns: spell out each source's star."""
    stars = [e for e in scope.expressions if isinstance(e, exp.Star)]
    if not stars:
        return
    joins = scope.args.get("joins") or []
    modifiers = ("except_", "replace", "rename", "ilike")
    if joins and any(s.args.get(k) for s in stars for k in modifiers):
        raise UnsupportedQuery("SELECT * with EXCLUDE / REPLACE over a join next to an LLM call")
    if any(j.args.get("using") or j.args.get("kind") == "NATURAL" for j in joins):
        raise UnsupportedQuery("SELECT * over a USING / NATURAL join next to an LLM call")
    sources = [scope.args["from_"].this, *[j.this for j in joins]]
    expanded = []
    for e in scope.expressions:
        if isinstance(e, exp.Star):  # one source when there are modifiers: they move along
            expanded += [
                exp.Column(this=e.copy(), table=exp.to_identifier(s.alias_or_name)) for s in sources
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
