"""What the rewrite needs to know about a sqlglot tree: its SELECT scopes, their WHERE
conjuncts and grouping, which query shapes it cannot cover, and the query's parameters.

>>> import sqlglot
>>> tree = sqlglot.parse_one("SELECT a FROM t WHERE x > 1 AND y < 2 GROUP BY a")
>>> [c.sql() for c in conjuncts(tree)], is_grouped(tree)
(['x > 1', 'y < 2'], True)
"""

from __future__ import annotations

from sqlglot import exp

from llmudf.optimizer.callsite import llm_calls


class UnsupportedQuery(Exception):
    """The rewrite does not cover this query shape; run it through the per-chunk UDFs."""


# functions whose values change on every evaluation: answers computed for the rows of one
# stage cannot be joined back to the rows of another
NONDETERMINISTIC = frozenset(
    {
        "RAND",
        "RANDN",
        "UUID",
        "SHUFFLE",
        "MONOTONICALLY_INCREASING_ID",
        "SPARK_PARTITION_ID",
        "INPUT_FILE_NAME",
    }
)


def nondeterministic(tree: exp.Expression) -> str | None:
    """The name of the first non-deterministic function in `tree`, if any."""
    for func in tree.find_all(exp.Func):
        name = (func.name if isinstance(func, exp.Anonymous) else func.sql_name()).upper()
        if name in NONDETERMINISTIC:
            return name
    return None


def conjuncts(scope: exp.Select) -> list[exp.Expression]:
    where = scope.args.get("where")
    if where is None:
        return []
    return list(where.this.flatten()) if isinstance(where.this, exp.And) else [where.this]


def scope_of(node: exp.Expression) -> exp.Select | None:
    return node.find_ancestor(exp.Select)


def selects_post_order(node: exp.Expression):
    """Every SELECT, CTEs first, inner scopes before the scope that uses them."""
    children = sorted(node.iter_expressions(), key=lambda c: c.arg_key != "with_")
    for child in children:
        yield from selects_post_order(child)
    if isinstance(node, exp.Select):
        yield node


def is_grouped(scope: exp.Select) -> bool:
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


def over_aggregate(call: exp.Anonymous, scope: exp.Select | None) -> bool:
    """The call's arguments hold an aggregate of its scope, directly or as the ANY_VALUE an
    inner LLM call on group keys becomes: its answers cannot be joined to the rows."""
    if scope is None or _in_aggregate(call, scope):
        return False
    if any(agg.find_ancestor(exp.Select) is scope for agg in call.find_all(exp.AggFunc)):
        return True
    return is_grouped(scope) and any(inner is not call for inner in llm_calls(call))


def after_grouping(node: exp.Expression, scope: exp.Select) -> bool:
    """In an aggregating scope, evaluated once per group (not per row)."""
    if not is_grouped(scope) or _in_aggregate(node, scope):
        return False
    return _item_of(node, scope).arg_key in ("expressions", "having", "order", "qualify")


def group_keys(group: exp.Group) -> list[exp.Expression]:
    """The expressions of GROUP BY, through ROLLUP / CUBE / GROUPING SETS and tuples."""
    keys = list(group.expressions)
    for arg in ("rollup", "cube", "grouping_sets"):
        for item in group.args.get(arg) or []:
            keys += list(item.expressions) if item.expressions else [item]
    flat = []
    for key in keys:
        if isinstance(key, exp.Paren):
            flat += group_keys(exp.Group(expressions=[key.this]))
        elif isinstance(key, exp.Rollup | exp.Cube | exp.GroupingSets | exp.Tuple):
            flat += group_keys(exp.Group(expressions=list(key.expressions)))
        else:
            flat.append(key)
    return flat


def named_by_group(node: exp.Expression, scope: exp.Select) -> bool:
    """`node` is (inside) a SELECT item that GROUP BY names by alias or position."""
    group = scope.args.get("group")
    item = _item_of(node, scope)
    if group is None or item.arg_key != "expressions":
        return False
    position = str(scope.expressions.index(item) + 1)
    for key in group_keys(group):
        if isinstance(key, exp.Column) and not key.table and key.name == item.alias:
            return True
        if isinstance(key, exp.Literal) and not key.is_string and key.this == position:
            return True
    return False


def outer_references(scope: exp.Select) -> set[str]:
    """Tables of an outer query that the scope's own columns name (a correlated subquery)."""
    names = {s.alias_or_name for s in sources(scope)}
    tables = {c.table for c in scope.find_all(exp.Column) if c.table and scope_of(c) is scope}
    return tables - names


def sources(scope: exp.Select) -> list[exp.Expression]:
    """The FROM source and every joined one."""
    return [scope.args["from_"].this, *[j.this for j in scope.args.get("joins") or []]]


def qualify_star(scope: exp.Select) -> None:
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
    expanded = []
    for e in scope.expressions:
        if isinstance(e, exp.Star):  # one source when there are modifiers: they move along
            expanded += [
                exp.Column(this=e.copy(), table=exp.to_identifier(s.alias_or_name))
                for s in sources(scope)
            ]
        else:
            expanded.append(e)
    scope.set("expressions", expanded)


def limit_pushdown_ok(scope: exp.Select) -> bool:
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


def inline_params(tree: exp.Expression, params) -> None:
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


# ---- private ---------------------------------------------------------------------------------


def name_unaliased_calls(calls, dialect: str) -> None:
    """Alias each call that is an unaliased SELECT item with its SQL text as written
    (`llm('Hi', Title)`), the name the database gives its column, so a rewrite never shows
    its own helper names as column names."""
    for call in calls:
        if isinstance(call.parent, exp.Select) and call.arg_key == "expressions":
            name = call.sql(dialect, normalize_functions=False)
            call.replace(exp.alias_(call.copy(), name, quoted=True))


def _item_of(node: exp.Expression, scope: exp.Select) -> exp.Expression:
    """The scope's child (a SELECT item, the WHERE, ...) that holds `node`."""
    item = node
    while item.parent is not scope:
        item = item.parent
    return item


def _in_aggregate(node: exp.Expression, scope: exp.Select) -> bool:
    """Inside an aggregate's argument or its FILTER (WHERE ...): evaluated per row."""
    parent = node.parent
    while parent is not None and parent is not scope:
        if isinstance(parent, exp.AggFunc | exp.Filter):
            return True
        parent = parent.parent
    return False


def _literal(value) -> exp.Expression:
    """A SQL literal of the type DuckDB gives the same Python value as a parameter."""
    if value is None or isinstance(value, bool | str):
        return exp.convert(value)
    if isinstance(value, int):
        return exp.cast(exp.convert(value), "BIGINT") if abs(value) >= 2**31 else exp.convert(value)
    if isinstance(value, float):
        return exp.cast(exp.Literal.string(repr(value)), "DOUBLE")
    raise UnsupportedQuery(f"a query parameter of type {type(value).__name__}")
