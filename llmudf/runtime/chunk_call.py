"""The arguments of one per-chunk UDF call (a DuckDB chunk, a Spark Arrow batch), read the
same way for every engine: the instruction column, the constant argument (choices or a JSON
schema) when the function has one, the field columns (a struct keeps its keys, a bare column
is named field1, field2, ... by its position), and, after at least one field, a struct of
per-call options (see `llmudf.calls.functions.is_options`).

>>> import pyarrow as pa
>>> call = bind_chunk("llm", [pa.array(["Why?"]), pa.array(["Up"])], "llm (per chunk)")
>>> call.instruction, call.fields.column_names
('Why?', ['field1'])
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from llmudf.calls.functions import FUNCTIONS, CallSpec, bind_call, is_options
from llmudf.optimizer.callsite import fields_table

__all__ = ["ChunkCall", "bind_chunk"]


@dataclass(frozen=True, slots=True)
class ChunkCall:
    spec: CallSpec
    instruction: str | list[str | None]  # one for the chunk, or one per row
    fields: pa.Table  # one column per field, one row per row of the chunk


def bind_chunk(name: str, args: list[pa.Array], site: str) -> ChunkCall:
    """Check and split the argument columns of a chunk of `name` calls (at least one row)."""
    function = FUNCTIONS[name]
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
    return ChunkCall(spec, instruction, _fields(rest, len(args[0])))


def _fields(args: list[pa.Array], num_rows: int) -> pa.Table:
    names, arrays = [], []
    for i, arg in enumerate(args, 1):
        if pa.types.is_struct(arg.type):
            names += [f.name for f in arg.type]
            arrays += arg.flatten()
        else:
            names.append(f"field{i}")
            arrays.append(arg)
    return fields_table(names, arrays, num_rows)
