"""`llm_reduce` in SQL: checked where it stands, then written as a list aggregate that a
scalar UDF answers a chunk of groups at a time.

    llm_reduce('Summarize.', title, {'plot': plot}, {'max_tokens': 64})
    -> __llm_reduce_lists('Summarize.', ARRAY_AGG({'a1': {'title': title},
                                                  'a2': {'plot': plot},
                                                  'a3': {'max_tokens': 64}}))

The engine's own aggregation collects each group's rows (DuckDB `ARRAY_AGG`, Spark
`COLLECT_LIST`), whatever the plan; `__llm_reduce_lists` gets one list per group and answers
all the groups of its chunk together (`llmudf.runtime.reduce`), in an order derived from the
rows' content. A bare column becomes a struct of one field named after it, as `llm`'s
canonical form names its fields; each struct element of the list is one argument.

An unaliased call keeps its column name (the call as written), as it would unrewritten.

>>> print(rewrite_reduce("SELECT g, llm_reduce('Sum up.', title) AS s FROM t GROUP BY g"))
SELECT g, __LLM_REDUCE_LISTS('Sum up.', ARRAY_AGG({'a1': {'title': title}})) AS s FROM t GROUP BY g
"""

from __future__ import annotations

import re

import sqlglot
from sqlglot import exp

from llmudf.calls.functions import LLMCallError
from llmudf.optimizer.callsite import split_options
from llmudf.optimizer.scopes import name_unaliased_calls

__all__ = ["REDUCE_LISTS", "has_reduce", "rewrite_reduce"]

REDUCE_NAME = "llm_reduce"
REDUCE_LISTS = "__llm_reduce_lists"
_CALL = re.compile(r"\bllm_reduce\s*\(", re.IGNORECASE)
_CLAUSES = {
    "where": "WHERE",
    "joins": "JOIN",
    "group": "GROUP BY",
    "from_": "FROM",
    "limit": "LIMIT",
}


def has_reduce(sql: str) -> bool:
    return bool(_CALL.search(sql))


def rewrite_reduce(sql: str, dialect: str = "duckdb") -> str:
    """`sql` with every llm_reduce call as a list aggregate (see the module); LLMCallError
    naming the call for one that is not an aggregate of its SELECT. SQL sqlglot cannot
    parse is returned as it is (the database names the syntax error)."""
    try:
        tree = sqlglot.parse_one(sql, read=dialect)
    except sqlglot.errors.ParseError:
        return sql
    calls = [n for n in tree.find_all(exp.Anonymous, bfs=False) if n.name.lower() == REDUCE_NAME]
    if not calls:
        return sql
    for index, node in enumerate(calls, 1):
        _check(node, f"{REDUCE_NAME} #{index}")
        split_options(node.expressions[1:], f"{REDUCE_NAME} #{index}")  # flags near misses
    name_unaliased_calls(calls, dialect)
    calls = [n for n in tree.find_all(exp.Anonymous, bfs=False) if n.name.lower() == REDUCE_NAME]
    for index, node in enumerate(calls, 1):
        node.replace(_as_lists(node, f"{REDUCE_NAME} #{index}"))
    return tree.sql(dialect)


# ---- private ---------------------------------------------------------------------------------


def _check(node: exp.Anonymous, label: str) -> None:
    """An aggregate of its SELECT: not in WHERE / JOIN / GROUP BY, not windowed, not
    nested in another aggregate, and, without GROUP BY, not next to row-level columns."""
    scope = node.find_ancestor(exp.Select)
    if scope is None:
        raise LLMCallError(f"{label}: llm_reduce is an aggregate; use it in a SELECT")
    item = node
    while item.parent is not scope:
        if isinstance(item.parent, exp.Window):
            raise LLMCallError(
                f"{label}: llm_reduce is an aggregate, not a window function; reduce per "
                "group with GROUP BY instead of OVER (...)"
            )
        if isinstance(item.parent, exp.AggFunc) or _is_reduce(item.parent):
            raise LLMCallError(f"{label}: llm_reduce cannot be nested in another aggregate")
        item = item.parent
    clause = _CLAUSES.get(item.arg_key)
    if clause is not None:
        hint = "; filter groups with HAVING" if clause == "WHERE" else ""
        raise LLMCallError(
            f"{label}: llm_reduce is an aggregate: it answers once per group of rows, so it "
            f"cannot be in {clause}{hint}"
        )
    args = node.expressions
    if len(args) < 2:
        raise LLMCallError(
            f"{label}: expected llm_reduce(instruction, field, ...), got {len(args)} argument(s)"
        )
    if scope.args.get("group") is None:
        row_level = sorted(
            {c.sql() for e in scope.expressions for c in _row_level_columns(e, scope)}
        )
        if row_level:
            raise LLMCallError(
                f"{label}: llm_reduce reduces the rows of each group, but the query has no "
                f"GROUP BY and also selects {', '.join(row_level)} row by row; add GROUP BY "
                f"{', '.join(row_level)} to answer per group (without GROUP BY, the whole "
                "table is one group)"
            )


def _row_level_columns(node: exp.Expression, scope: exp.Select) -> list[exp.Column]:
    """Columns of `scope` under `node` outside any aggregate or window."""
    columns = []
    for column in node.find_all(exp.Column):
        parent, inside = column.parent, False
        while parent is not None and parent is not scope:
            if isinstance(parent, exp.AggFunc | exp.Window | exp.Subquery) or _is_reduce(parent):
                inside = True
                break
            parent = parent.parent
        if not inside and column.find_ancestor(exp.Select) is scope:
            columns.append(column)
    return columns


def _as_lists(node: exp.Anonymous, label: str) -> exp.Expression:
    instruction, *args = node.expressions
    element = []
    for i, arg in enumerate(args, 1):
        if isinstance(arg, exp.Struct):
            value = arg.copy()
        elif isinstance(arg, exp.Column) and not isinstance(arg.this, exp.Star):
            value = _struct([(arg.name, arg.copy())])
        elif isinstance(arg, exp.Alias):
            value = _struct([(arg.alias, arg.this.copy())])
        else:
            raise LLMCallError(
                f"{label}: field #{i} `{arg.sql()}` has no name; pass a column or a struct "
                "{'name': expr}"
            )
        element.append((f"a{i}", value))
    rows = exp.ArrayAgg(this=_struct(element))
    return exp.Anonymous(this=REDUCE_LISTS, expressions=[instruction.copy(), rows])


def _struct(items: list[tuple[str, exp.Expression]]) -> exp.Struct:
    return exp.Struct(
        expressions=[
            exp.PropertyEQ(this=exp.to_identifier(k, quoted=True), expression=v) for k, v in items
        ]
    )


def _is_reduce(node: exp.Expression) -> bool:
    return isinstance(node, exp.Anonymous) and node.name.lower() in (REDUCE_NAME, REDUCE_LISTS)
