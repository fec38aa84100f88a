"""The semantic join: `a JOIN b ON llm_filter('Same movie?', {'left': a.title, 'right': b.title})`
planned as an operator instead of one model call per pair of the cross product.

A `JoinStep` asks the driver for the distinct left and right argument tuples (each side's
own filters run first: the ON conjuncts and WHERE conjuncts that read only that side), for
the candidate pairs among them (`llmudf.optimizer.blocking`), for the model's answer on each
candidate, and to bind the pairs it answered yes as `table` (columns `__llm_l0`, ... and
`__llm_r0`, ...). In the final query the right source becomes a nested join with that table,

    a JOIN (b JOIN <table> AS __llm_m<i> ON __llm_m<i>.__llm_r0 IS NOT DISTINCT FROM b.title)
      ON <the other ON conjuncts> AND __llm_m<i>.__llm_l0 IS NOT DISTINCT FROM a.title

which keeps the join's kind (INNER, LEFT, SEMI) and its row multiplicity: each matching
pair once. A pair the plan did not ask (blocked out, or a value the source did not hold when
the plan read it) does not match.

Covered: INNER / LEFT [OUTER] / SEMI joins whose ON is a conjunction with one `llm_filter`
call whose instruction is a constant and whose fields each read one side (qualified
columns). An LLM call under OR (or NOT) in a join condition is an error; other shapes run
per chunk (UnsupportedQuery).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlglot
from sqlglot import exp

from llmudf.calls.functions import LLMCallError
from llmudf.optimizer.callsite import CallSite, llm_calls
from llmudf.optimizer.scopes import UnsupportedQuery, conjuncts, sources

__all__ = ["LEFT_KEY", "RIGHT_KEY", "JoinStep", "plan_semantic_joins"]

LEFT_KEY, RIGHT_KEY = "__llm_l", "__llm_r"
_KINDS = {  # (side, kind) -> how
    (None, None): "inner",
    (None, "INNER"): "inner",
    ("LEFT", None): "left",
    ("LEFT", "OUTER"): "left",
    (None, "SEMI"): "semi",
    ("LEFT", "SEMI"): "semi",
}


@dataclass(frozen=True, slots=True)
class JoinStep:
    """Answer the semantic join `site` and bind its matching pairs as `table`.

    `left_sql` / `right_sql` give each side's distinct argument tuples (columns
    `__llm_l<i>` / `__llm_r<j>`); `sides[n]` says which side `site.keys[n]` reads ("left" or
    "right"); `table`: the pairs answered yes, left columns then right columns."""

    site: CallSite
    left_sql: str
    right_sql: str
    sides: tuple[str, ...]
    table: str
    how: str  # "inner", "left", "semi"
    pushed: tuple[str, ...]  # what ran below the call: each side's filters, blocking
    # the pairs a condition across both sides (`a.id = b.id AND llm_filter(...)`) lets
    # through, left keys then right keys: then they are the candidates, not blocking's
    pairs_sql: str | None = None


def plan_semantic_joins(plan, scope: exp.Select):
    """Yield a JoinStep for each join of `scope` with an LLM call in its ON, and replace the
    call by the lookup of its answers (after the step is answered). `plan`: the rewrite's
    `_Plan` (its dialect, call-site index, answer-table names, CTEs)."""
    names = [s.alias_or_name for s in sources(scope)]  # before a nested join hides one
    for join in list(scope.args.get("joins") or []):
        on = join.args.get("on")
        calls = plan._direct_calls(scope, on) if on is not None else []
        if calls:
            yield from _semantic_join(plan, scope, join, calls, names)


def _semantic_join(plan, scope: exp.Select, join: exp.Join, calls: list, names: list[str]):
    dialect = plan.dialect
    site: CallSite = plan._site(calls[0])
    on_parts = (
        list(join.args["on"].flatten())
        if isinstance(join.args["on"], exp.And)
        else [join.args["on"]]
    )
    for call in calls:
        if _under_or(call, join):
            raise LLMCallError(
                f"{plan._site(call).label}: an LLM call under OR / NOT in a join condition "
                "cannot be planned as a semantic join (each pair would need the model); "
                "write the condition as AND of the LLM call and other conditions"
            )
    call_parts = [p for p in on_parts if llm_calls(p)]
    if len(calls) > 1 or len(call_parts) != 1 or call_parts[0] is not calls[0]:
        raise UnsupportedQuery(f"{site.label}: a JOIN condition other than AND of one llm_filter")
    if site.name != "llm_filter":
        raise UnsupportedQuery(f"{site.label}: only llm_filter is planned as a semantic join")
    if not isinstance(site.instruction, str):
        raise UnsupportedQuery(f"{site.label}: the instruction of a semantic join is not constant")
    how = _KINDS.get((join.args.get("side"), join.args.get("kind")))
    if how is None:
        raise UnsupportedQuery(
            f"{site.label}: a {join.args.get('side')} {join.args.get('kind')} "
            "JOIN is not planned as a semantic join"
        )

    joins = scope.args["joins"]
    position = joins.index(join)
    right = join.this
    right_name = names[position + 1]
    left_names = set(names[: position + 1])
    sides = tuple(_side(key, left_names, right_name, site) for key in site.keys)
    if "left" not in sides or "right" not in sides:
        raise UnsupportedQuery(f"{site.label}: a semantic join needs fields from both sides")

    # each side's own filters: ON conjuncts (any kind of join) and WHERE conjuncts without
    # LLM calls (the right side's only for an inner join: a LEFT join keeps NULL rows)
    filters = {"left": [], "right": []}
    rest = [part for part in on_parts if part is not calls[0]]  # stay in the ON, too
    for part in rest:
        side = _tables_side(part, left_names, right_name)
        if side:
            filters[side].append(part)
    for part in conjuncts(scope):
        side = _tables_side(part, left_names, right_name)
        if llm_calls(part) or side is None or (side == "right" and how != "inner"):
            continue
        filters[side].append(part)

    keys = {"left": [], "right": []}
    for key, side in zip(site.keys, sides, strict=True):
        keys[side].append(key)
    left_rows = exp.select(
        *[exp.alias_(k.copy(), f"{LEFT_KEY}{i}") for i, k in enumerate(keys["left"])]
    ).distinct()
    left_rows.set("from_", scope.args["from_"].copy())
    left_rows.set("joins", [j.copy() for j in joins[:position]])
    right_rows = exp.select(
        *[exp.alias_(k.copy(), f"{RIGHT_KEY}{j}") for j, k in enumerate(keys["right"])]
    ).distinct()
    right_rows = right_rows.from_(right.copy())
    for side, rows in (("left", left_rows), ("right", right_rows)):
        if filters[side]:
            rows.where(exp.and_(*[f.copy() for f in filters[side]]), copy=False)
    table = f"{plan._tables}_{site.index}"
    pushed = tuple(
        f"{side} side: filter {f.sql(dialect)}" for side in ("left", "right") for f in filters[side]
    )
    across = [part for part in rest if _tables_side(part, left_names, right_name) is None]
    pairs_sql = None
    if across:  # the relational join runs first: its pairs are the candidates
        pairs = exp.select(
            *[exp.alias_(k.copy(), f"{LEFT_KEY}{i}") for i, k in enumerate(keys["left"])],
            *[exp.alias_(k.copy(), f"{RIGHT_KEY}{j}") for j, k in enumerate(keys["right"])],
        ).distinct()
        pairs.set("from_", scope.args["from_"].copy())
        on = exp.and_(*[c.copy() for c in across])
        pairs.set(
            "joins", [j.copy() for j in joins[:position]] + [exp.Join(this=right.copy(), on=on)]
        )
        if filters["left"] or filters["right"]:
            pairs.where(
                exp.and_(*[f.copy() for f in filters["left"] + filters["right"]]), copy=False
            )
        pairs_sql = plan._with_ctes(scope, pairs).sql(dialect)
        pushed += (f"join {on.sql(dialect)} before the LLM",)
    yield JoinStep(
        site,
        plan._with_ctes(scope, left_rows).sql(dialect),
        plan._with_ctes(scope, right_rows).sql(dialect),
        sides,
        table,
        how,
        pushed,
        pairs_sql,
    )

    alias = f"__llm_m{site.index}"
    inner_on = exp.and_(
        *[
            exp.NullSafeEQ(this=exp.column(f"{RIGHT_KEY}{j}", alias), expression=k.copy())
            for j, k in enumerate(keys["right"])
        ]
    )
    nested = (
        sqlglot.parse_one(
            f"SELECT 1 FROM __x JOIN ({right.sql(dialect)} JOIN {table} AS {alias} "
            f"ON {inner_on.sql(dialect)}) ON TRUE",
            read=dialect,
        )
        .args["joins"][0]
        .this
    )
    outer_on = rest + [
        exp.NullSafeEQ(this=exp.column(f"{LEFT_KEY}{i}", alias), expression=k.copy())
        for i, k in enumerate(keys["left"])
    ]
    join.set("this", nested)
    join.set("on", exp.and_(*[c.copy() for c in outer_on]))


def _under_or(call: exp.Expression, join: exp.Join) -> bool:
    node = call.parent
    while node is not None and node is not join:
        if isinstance(node, exp.Or | exp.Not | exp.Xor):
            return True
        node = node.parent
    return False


def _side(key: exp.Expression, left_names: set[str], right_name: str, site: CallSite) -> str:
    columns = list(key.find_all(exp.Column))
    if any(not c.table for c in columns):
        raise UnsupportedQuery(
            f"{site.label}: qualify the columns of a semantic join's fields (a.title, b.title)"
        )
    side = _tables_side(key, left_names, right_name)
    if side is None:
        raise UnsupportedQuery(f"{site.label}: a field of a semantic join reads both sides")
    return side


def _tables_side(node: exp.Expression, left_names: set[str], right_name: str) -> str | None:
    """ "left" / "right" when every column of `node` is qualified with that side's tables,
    else None (both sides, unqualified columns, no columns, a subquery)."""
    if node.find(exp.Subquery, exp.Select):
        return None
    tables = {c.table for c in node.find_all(exp.Column)}
    if not tables or "" in tables:
        return None
    if tables <= left_names:
        return "left"
    return "right" if tables == {right_name} else None
