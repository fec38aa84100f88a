"""LLM call sites in a SQL AST: parse each call's arguments and put it in canonical form.

Canonical form: `name(instruction, [choices | schema], {'field': expr, ...}, [{options}])`,
so the per-chunk UDF receives the field names inside one struct.

>>> import sqlglot
>>> tree = sqlglot.parse_one("SELECT llm('Why?', title) FROM t", read="duckdb")
>>> [s.label for s in find_call_sites(tree)]
['llm #1 in SELECT']
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from sqlglot import exp

from llmudf.calls.functions import FUNCTIONS, CallSpec, LLMCallError, bind_call, is_options

CLAUSES = {
    "expressions": "SELECT",
    "where": "WHERE",
    "group": "GROUP BY",
    "having": "HAVING",
    "order": "ORDER BY",
    "qualify": "QUALIFY",
    "joins": "JOIN",
    "from_": "FROM",
    "limit": "LIMIT",
}


class NotLiteral(Exception):
    pass


@dataclass(eq=False)
class CallSite:
    """One LLM call in the query; `keys` are its non-constant arguments (instruction, fields)."""

    index: int
    name: str
    clause: str
    node: exp.Expression
    spec: CallSpec
    instruction: str | exp.Expression  # a constant string, or an expression over the rows
    fields: list[tuple[str, object]]  # (name, constant value or exp.Expression)
    const_node: exp.Expression | None = None  # the choices / schema argument

    @property
    def label(self) -> str:
        return f"{self.name} #{self.index} in {self.clause}"

    @property
    def keys(self) -> list[exp.Expression]:
        exprs = [] if isinstance(self.instruction, str) else [self.instruction]
        return exprs + [v for _n, v in self.fields if isinstance(v, exp.Expression)]

    def inputs(self, args: pa.Table) -> tuple[str | list, pa.Table]:
        """(instruction, fields table) from the distinct argument tuples, one column per key in
        `keys` order; constant fields are repeated."""
        columns = iter(args.columns)
        instruction = self.instruction
        if not isinstance(instruction, str):
            instruction = next(columns).to_pylist()
        names, arrays = [], []
        for name, value in self.fields:
            names.append(name)
            if isinstance(value, exp.Expression):  # an expression: the next key column holds it
                arrays.append(next(columns).combine_chunks())
            else:
                arrays.append(pa.array([value] * args.num_rows))
        return instruction, fields_table(names, arrays, args.num_rows)

    def canonical_node(self) -> exp.Anonymous:
        """This call with its fields packed into one named struct (what the UDF receives)."""
        args = [self.node.expressions[0].copy()]
        if self.const_node is not None:
            args.append(self.const_node.copy())
        if self.fields:
            args.append(_struct([(n, _as_expr(v)) for n, v in self.fields]))
        if self.spec.options:
            args.append(_struct([(k, _as_expr(v)) for k, v in self.spec.options]))
        return exp.Anonymous(this=self.name, expressions=args)


def fields_table(names: list[str], arrays: list, num_rows: int) -> pa.Table:
    """The fields of `num_rows` rows; with no fields, a table with no columns that still
    has `num_rows` rows (a call with an instruction only answers every row)."""
    if not arrays:
        return pa.table({"_": pa.nulls(num_rows)}).drop_columns(["_"])
    return pa.Table.from_arrays(arrays, names=names)


def llm_calls(node: exp.Expression) -> list[exp.Anonymous]:
    """LLM calls under `node`, innermost first (post-order)."""
    calls = [n for n in node.find_all(exp.Anonymous) if n.name.lower() in FUNCTIONS]
    return sorted(calls, key=lambda n: -_depth(n))


def find_call_sites(tree: exp.Expression) -> list[CallSite]:
    """Put every LLM call in canonical form (in place) and return its CallSite, in SQL order."""
    index = {id(n): i for i, n in enumerate(call_nodes(tree), 1)}
    for node in llm_calls(tree):  # innermost first: an outer call's args are already canonical
        node.replace(parse_call(node, index[id(node)]).canonical_node())
    return [parse_call(n, i) for i, n in enumerate(call_nodes(tree), 1)]


def call_nodes(tree: exp.Expression) -> list[exp.Anonymous]:
    """LLM calls under `tree` in SQL order (a site's index is its position here, from 1)."""
    return [n for n in tree.find_all(exp.Anonymous, bfs=False) if n.name.lower() in FUNCTIONS]


def parse_call(node: exp.Anonymous, index: int) -> CallSite:
    name = node.name.lower()
    clause = _clause_of(node)
    site = f"{name} #{index} in {clause}" if index else name
    args = list(node.expressions)
    function = FUNCTIONS[name]
    num_before = 2 if function.const_arg else 1
    if len(args) < num_before:
        want = "instruction" + (f", {function.const_arg}" if function.const_arg else "")
        raise LLMCallError(f"{site}: expected ({want}, field, ...), got {len(args)} argument(s)")
    const = None
    if function.const_arg:
        try:
            const = literal_value(args[1])
        except NotLiteral:
            raise LLMCallError(
                f"{site}: {function.const_arg} must be a constant, got {args[1].sql()}"
            ) from None
    rest, options = split_options(args[num_before:], site)
    spec = bind_call(name, const, options, site)
    try:
        instruction = literal_value(args[0])
        if instruction is None:  # a NULL instruction: NULL answers, as for a NULL column
            instruction = args[0]
        elif not isinstance(instruction, str):
            raise LLMCallError(f"{site}: the instruction must be a string, got {args[0].sql()}")
    except NotLiteral:
        instruction = args[0]
    fields = _parse_fields(rest, site)
    const_node = args[1] if function.const_arg else None
    return CallSite(index, name, clause, node, spec, instruction, fields, const_node)


def split_options(rest: list[exp.Expression], site: str) -> tuple[list[exp.Expression], dict]:
    """A call's arguments after the instruction (and its constant) without a trailing
    options struct, and those options ({} when there are none); LLMCallError naming `site`
    for a misspelt or misplaced option (see `is_options`)."""
    if len(rest) >= 2 and _struct_keys(rest[-1]):
        constants = {}
        for key, value in _struct_items(rest[-1]):
            try:
                constants[key] = literal_value(value)
            except NotLiteral:
                continue  # an expression over the rows: not a constant
        if is_options(_struct_keys(rest[-1]), constants, site):
            return list(rest[:-1]), constants
    return list(rest), {}


def _parse_fields(args: list[exp.Expression], site: str) -> list[tuple[str, object]]:
    fields: list[tuple[str, object]] = []
    for i, arg in enumerate(args, 1):
        if _struct_keys(arg):
            pairs = _struct_items(arg)
        elif isinstance(arg, exp.Column) and not isinstance(arg.this, exp.Star):
            pairs = [(arg.name, arg)]
        elif isinstance(arg, exp.Alias):
            pairs = [(arg.alias, arg.this)]
        else:
            raise LLMCallError(
                f"{site}: field #{i} `{arg.sql()}` has no name; pass a column or a struct "
                f"{{'name': expr}}"
            )
        for name, value in pairs:
            try:
                fields.append((name, literal_value(value)))
            except NotLiteral:
                fields.append((name, value))
    names = [n for n, _v in fields]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise LLMCallError(f"{site}: duplicate field name(s) {dupes}")
    return fields


def literal_value(node: exp.Expression):
    """The Python value of a constant expression; NotLiteral otherwise."""
    if isinstance(node, exp.Literal):
        if node.is_string:
            return node.this
        text = node.this
        return float(text) if any(c in text for c in ".eE") else int(text)
    if isinstance(node, exp.Null):
        return None
    if isinstance(node, exp.Boolean):
        return node.this
    if isinstance(node, exp.Neg):
        return -literal_value(node.this)
    if isinstance(node, exp.Paren):
        return literal_value(node.this)
    if isinstance(node, exp.Array):
        return [literal_value(e) for e in node.expressions]
    raise NotLiteral(node.sql())


def _struct_keys(node: exp.Expression) -> list[str]:
    return [k for k, _v in _struct_items(node)] if isinstance(node, exp.Struct) else []


def _struct_items(node: exp.Struct) -> list[tuple[str, exp.Expression]]:
    items = []
    for e in node.expressions:
        if isinstance(e, exp.PropertyEQ | exp.Slice):
            key = e.this.name if isinstance(e.this, exp.Identifier | exp.Column) else e.this.this
            items.append((str(key), e.expression))
        elif isinstance(e, exp.Alias):
            items.append((e.alias, e.this))
        else:
            return []
    return items


def _struct(items: list[tuple[str, exp.Expression]]) -> exp.Struct:
    return exp.Struct(
        expressions=[
            exp.PropertyEQ(this=exp.to_identifier(k, quoted=True), expression=v) for k, v in items
        ]
    )


def _as_expr(value) -> exp.Expression:
    if isinstance(value, exp.Expression):
        return value.copy()
    if isinstance(value, list):
        return exp.Array(expressions=[_as_expr(v) for v in value])
    return exp.convert(value)


def _clause_of(node: exp.Expression) -> str:
    child, parent = node, node.parent
    while parent is not None and not isinstance(parent, exp.Select):
        child, parent = parent, parent.parent
    return CLAUSES.get(child.arg_key, child.arg_key.upper()) if parent is not None else "SELECT"


def _depth(node: exp.Expression) -> int:
    depth = 0
    while node.parent is not None:
        node, depth = node.parent, depth + 1
    return depth
