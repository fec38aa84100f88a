"""A pandas or Polars DataFrame or Series as an LLM call sees it: its columns as Arrow (as
SQL would read them), and the answers put back as objects of the same library.

Values reach the prompt as in SQL: NaN / None / pd.NA are NULL, nullable and pyarrow dtypes
keep their values (an Int64 1 stays "1"), categoricals are their values, Polars string
views are strings; an object column Arrow cannot type is rendered value by value.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa

from llmudf.calls.functions import LLMCallError
from llmudf.calls.prompt import format_value
from llmudf.optimizer.callsite import fields_table

__all__ = ["FrameTable", "is_polars", "is_series"]


def is_series(frame) -> bool:
    return isinstance(frame, pd.Series) or (type(frame).__name__ == "Series" and is_polars(frame))


def is_polars(frame) -> bool:
    return type(frame).__module__.partition(".")[0] == "polars"


class FrameTable:
    """A pandas or Polars DataFrame or Series: its columns as Arrow, and answers put back.
    Each library's subclass gives `arrow_column(position)`, `series(values, name, kind)`,
    `take(keep)`, `json_series(values, name, schema)` and `json_frame(columns, properties)`.
    """

    def __init__(self, obj, site: str, columns: list):
        self.obj = obj
        self.site = site
        self.columns = columns  # column labels; a Series: [its name]
        self.num_rows = len(obj)

    @staticmethod
    def of(frame, site: str) -> FrameTable:
        """The table of `frame`; `site` names the call in errors."""
        if isinstance(frame, pd.DataFrame | pd.Series):
            return _PandasTable(frame, site)
        if is_polars(frame) and type(frame).__name__ in ("DataFrame", "Series"):
            return _PolarsTable(frame, site)
        raise TypeError(
            f"{site}: expected a pandas or Polars DataFrame or Series, got {type(frame).__name__}"
        )

    def fields_table(self, fields) -> pa.Table:
        """The fields as an Arrow table (columns named by field), checked."""
        pairs = self._field_pairs(fields)
        names = [name for name, _label in pairs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise LLMCallError(f"{self.site}: field name(s) {repeated} given more than once")
        arrays = [_decoded(self.arrow_column(self._position(label))) for _n, label in pairs]
        return fields_table(names, arrays, self.num_rows)

    def _field_pairs(self, fields) -> list[tuple[str, object]]:
        """[(field name, column label)] for `fields`: None, a label, labels, or a mapping."""
        if self.is_series:
            if fields is not None:
                raise TypeError(f"{self.site}: a Series is its own field; fields= is for frames")
            return [(str(self.columns[0]), self.columns[0])]
        if fields is None:
            return [(str(c), c) for c in self.columns]
        if isinstance(fields, Mapping):
            for key in fields:
                if not isinstance(key, str) or not key:
                    raise LLMCallError(
                        f"{self.site}: a field name must be a non-empty str, got {key!r}"
                    )
            return list(fields.items())
        if isinstance(fields, str) or not isinstance(fields, list | tuple | pd.Index):
            fields = [fields]
        return [(str(label), label) for label in fields]

    def _position(self, label) -> int:
        found = [i for i, c in enumerate(self.columns) if _same_label(c, label)]
        if not found:
            raise LLMCallError(
                f"{self.site}: unknown column {label!r}; columns: {list(self.columns)}"
            )
        if len(found) > 1:
            raise LLMCallError(
                f"{self.site}: column {label!r} appears {len(found)} times; rename the copies"
            )
        return found[0]


class _PandasTable(FrameTable):
    def __init__(self, obj, site: str):
        self.is_series = isinstance(obj, pd.Series)
        if self.is_series and obj.name is None:
            raise LLMCallError(
                f"{site}: the Series has no name, and its name is the field name in the "
                "prompt; name it first, e.g. s.rename('title').llm.map(...)"
            )
        super().__init__(obj, site, [obj.name] if self.is_series else list(obj.columns))

    def arrow_column(self, position: int) -> pa.Array:
        column = self.obj if self.is_series else self.obj.iloc[:, position]
        try:  # NaN / None / pd.NA -> NULL; nullable and categorical dtypes keep their values
            return pa.array(column, from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError):  # mixed objects: their text
            return pa.array([format_value(v) for v in column], pa.string())

    def series(self, values: list, name: str, kind: str):
        dtype = "float64" if kind == "float" else None  # strings: pandas' default dtype
        return pd.Series(values, index=self.obj.index, name=name, dtype=dtype)

    def take(self, keep: np.ndarray):
        return self.obj.iloc[np.flatnonzero(keep)]

    def json_series(self, values: list, name: str, _schema: dict):
        return pd.Series(values, index=self.obj.index, name=name, dtype=object)

    def json_frame(self, columns: dict[str, list], properties: dict):
        return pd.DataFrame(
            {
                name: pd.Series(values, index=self.obj.index, dtype=_pandas_dtype(properties[name]))
                for name, values in columns.items()
            },
            index=self.obj.index,
        )


class _PolarsTable(FrameTable):
    def __init__(self, obj, site: str):
        self.is_series = type(obj).__name__ == "Series"
        if self.is_series and not obj.name:
            raise LLMCallError(
                f"{site}: the Series has no name, and its name is the field name in the "
                "prompt; name it first, e.g. s.alias('title').llm.map(...)"
            )
        super().__init__(obj, site, [obj.name] if self.is_series else list(obj.columns))

    def arrow_column(self, position: int) -> pa.Array:
        column = self.obj if self.is_series else self.obj.to_series(position)
        return column.to_arrow()

    def series(self, values: list, name: str, kind: str):
        import polars as pl

        return pl.Series(name, values, dtype=pl.Float64 if kind == "float" else pl.String)

    def take(self, keep: np.ndarray):
        import polars as pl

        return self.obj.filter(pl.Series(keep))

    def json_series(self, values: list, name: str, schema: dict):
        return _polars_series(name, values, schema)

    def json_frame(self, columns: dict[str, list], properties: dict):
        import polars as pl

        return pl.DataFrame(
            [_polars_series(name, values, properties[name]) for name, values in columns.items()]
        )


def _decoded(array) -> pa.Array:
    """Categoricals as their values, and string views as strings: as SQL sees them."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if pa.types.is_string_view(array.type):
        array = array.cast(pa.large_string())
    return array


def _same_label(column, label) -> bool:
    try:
        return bool(column == label)
    except (TypeError, ValueError):  # e.g. a tuple label against an array-like
        return False


_ARROW_SCALARS = {
    "string": pa.string(),
    "integer": pa.int64(),
    "number": pa.float64(),
    "boolean": pa.bool_(),
}
_PANDAS_DTYPES = {"integer": "Int64", "number": "Float64", "boolean": "boolean"}


def _arrow_type(schema: dict) -> pa.DataType | None:
    """The Arrow type a JSON schema fixes, or None if it leaves some type open."""
    kind = schema.get("type")
    if kind is None and schema.get("enum") and all(isinstance(v, str) for v in schema["enum"]):
        return pa.string()
    if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"]:
        members = [(name, _arrow_type(s)) for name, s in schema["properties"].items()]
        return None if any(t is None for _n, t in members) else pa.struct(members)
    if kind == "array" and isinstance(schema.get("items"), dict):
        item = _arrow_type(schema["items"])
        return None if item is None else pa.list_(item)
    return _ARROW_SCALARS.get(kind) if isinstance(kind, str) else None


def _pandas_dtype(schema: dict):
    """A nullable dtype for a flat property; strings take pandas' default, the rest object."""
    kind = schema.get("type")
    if isinstance(kind, str) and kind in _PANDAS_DTYPES:
        return _PANDAS_DTYPES[kind]
    return None if _arrow_type(schema) == pa.string() else object


def _polars_series(name: str, values: list, schema: dict):
    import polars as pl

    arrow_type = _arrow_type(schema)
    if arrow_type is None:
        return pl.Series(name, values, dtype=pl.Object)
    return pl.from_arrow(pa.array(values, arrow_type)).alias(name)
