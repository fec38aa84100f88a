"""A call site's field table as integer codes: what the solvers work on.

Every cell is rendered once per distinct value through `llmudf.calls.prompt.format_value`, so two
cells share a code exactly when they render to the same text, and code order is text order
(sorting rows by codes sorts them by rendered text). Columns that determine each other
(functional dependencies both ways, e.g. a movie id and its title) are merged into one
*field group* that the solvers move as a unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from llmudf.calls.prompt import format_value

NULL = -1  # code of a NULL cell; its `name: value` line is left out of the prompt


@dataclass(frozen=True, slots=True)
class EncodedTable:
    """Rows as codes. `codes[i, c]` indexes `texts[c]`, or is NULL."""

    names: tuple[str, ...]
    codes: np.ndarray  # [num_rows, num_columns] int64
    texts: tuple[np.ndarray, ...]  # per column: object array, code -> rendered text

    @property
    def num_rows(self) -> int:
        return self.codes.shape[0]

    def line_lengths(self, column: int) -> np.ndarray:
        """Characters of `name: value\\n` per code of `column`; [num_codes] int64."""
        name_len = len(self.names[column]) + 3
        return np.fromiter((name_len + len(t) for t in self.texts[column]), np.int64)

    def take(self, rows: np.ndarray) -> EncodedTable:
        return EncodedTable(self.names, self.codes[rows], self.texts)

    def cell_text(self, row: int, column: int) -> str | None:
        code = self.codes[row, column]
        return None if code == NULL else self.texts[column][code]


@dataclass(frozen=True, slots=True)
class FieldGroups:
    """Columns merged by functional dependency; the unit the solvers order.

    `members[g]` are the column indices of group g in their given order; `codes[i, g]` is the
    group's code in row i (lexicographic over its members' codes); `weights[g][code]` is the
    characters of the group's lines (NULL members count 0).
    """

    members: tuple[tuple[int, ...], ...]
    codes: np.ndarray  # [num_rows, num_groups] int64, >= 0
    weights: tuple[np.ndarray, ...]


def to_table(fields: pa.Table | pa.RecordBatch | pd.DataFrame) -> pa.Table | pd.DataFrame:
    """Check the input type and column names; return it unchanged (or as a Table)."""
    if isinstance(fields, pa.RecordBatch):
        fields = pa.Table.from_batches([fields])
    if not isinstance(fields, pa.Table | pd.DataFrame):
        raise TypeError(
            f"fields must be a pyarrow.Table or pandas.DataFrame, got {type(fields).__name__}"
        )
    names = (
        [str(n) for n in fields.columns]
        if isinstance(fields, pd.DataFrame)
        else fields.column_names
    )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate field name(s) {dupes}")
    if any(n == "" for n in names):
        raise ValueError("a field has an empty name; every field needs a name")
    return fields


def encode(fields: pa.Table | pa.RecordBatch | pd.DataFrame) -> EncodedTable:
    """Render and factorize each column; O(num_rows) per column plus one render per value."""
    fields = to_table(fields)
    if isinstance(fields, pd.DataFrame):
        names = tuple(str(n) for n in fields.columns)
        columns = [fields[c] for c in fields.columns]
        num_rows = len(fields)
    else:
        names = tuple(fields.column_names)
        columns = list(fields.columns)
        num_rows = fields.num_rows
    codes = np.empty((num_rows, len(names)), np.int64)
    texts = []
    for c, column in enumerate(columns):
        codes[:, c], column_texts = _encode_column(column)
        texts.append(column_texts)
    return EncodedTable(names, codes, tuple(texts))


def group_fields(table: EncodedTable, detect_dependencies: bool = True) -> FieldGroups:
    """Merge columns that determine each other (one-to-one on this table) into groups."""
    num_columns = len(table.names)
    parent = list(range(num_columns))
    if detect_dependencies and table.num_rows > 1:
        num_distinct = [len(pd.unique(table.codes[:, c])) for c in range(num_columns)]
        for a in range(num_columns):
            for b in range(a + 1, num_columns):
                if parent[b] != b or num_distinct[a] != num_distinct[b]:
                    continue
                span = int(table.codes[:, b].max()) + 2  # codes start at NULL = -1
                pairs = (table.codes[:, a] + 1) * span + table.codes[:, b] + 1
                if len(pd.unique(pairs)) == num_distinct[a]:
                    parent[b] = parent[a]
    members = {}
    for c in range(num_columns):
        members.setdefault(parent[c], []).append(c)
    groups = tuple(tuple(m) for m in members.values())
    codes = np.empty((table.num_rows, len(groups)), np.int64)
    weights = []
    for g, cols in enumerate(groups):
        if len(cols) == 1:  # codes are already in text order; NULL (-1) becomes 0
            present = np.unique(table.codes[:, cols[0]])
            codes[:, g] = np.searchsorted(present, table.codes[:, cols[0]])
            uniq = present[:, None]
        else:  # lexicographic over the members, so code order stays text order
            uniq, inverse = np.unique(table.codes[:, list(cols)], axis=0, return_inverse=True)
            codes[:, g] = inverse.reshape(-1)
        weight = np.zeros(len(uniq), np.int64)
        for k, c in enumerate(cols):
            lengths = table.line_lengths(c)
            present = uniq[:, k] != NULL
            weight[present] += lengths[uniq[present, k]]
        weights.append(weight)
    return FieldGroups(groups, codes, tuple(weights))


def factorize_rows(codes: np.ndarray) -> tuple[np.ndarray, int]:
    """Row ids [n] int64 in order of first appearance, and how many distinct rows.

    One hash factorization per column (combining the ids so far with the next column),
    O(n * k); sorting rows with np.unique(axis=0) is several times slower.
    """
    num_rows = codes.shape[0]
    ids = np.zeros(num_rows, np.int64)
    num_ids = 1 if num_rows else 0
    for c in range(codes.shape[1]):
        span = int(codes[:, c].max()) + 2 if num_rows else 1  # codes start at NULL = -1
        ids, uniq = pd.factorize(ids * span + codes[:, c] + 1)
        num_ids = len(uniq)
    return ids.astype(np.int64), num_ids


# ---- private helpers -------------------------------------------------------------------


def _encode_column(column) -> tuple[np.ndarray, np.ndarray]:
    """codes [n] int64 (NULL = -1) and the sorted distinct rendered texts."""
    raw_codes, values = _factorize_raw(column)
    if len(values) == 0:  # an all-NULL (or empty) column
        return np.full(len(raw_codes), NULL, np.int64), np.array([], dtype=object)
    rendered = [format_value(v) for v in values]
    is_null = np.fromiter((t is None for t in rendered), bool, len(rendered))
    # distinct raw values may render the same (1 and 1.0): factorize the text again
    text_codes, texts = pd.factorize(
        np.array([t if t is not None else "" for t in rendered], dtype=object), sort=True
    )
    text_codes = np.where(is_null, NULL, text_codes).astype(np.int64)
    codes = np.where(raw_codes < 0, NULL, text_codes[np.maximum(raw_codes, 0)])
    used = np.unique(codes[codes != NULL])
    # drop texts only NULL-rendering values produced (keeps codes dense and sorted)
    remap = np.full(len(texts) + 1, NULL, np.int64)
    remap[used] = np.arange(len(used))
    codes = np.where(codes == NULL, NULL, remap[codes])
    return codes, np.asarray(texts, dtype=object)[used]


def _factorize_raw(column) -> tuple[np.ndarray, list]:
    """Codes of distinct raw values (-1 = NULL) and those values as Python objects."""
    if isinstance(column, pd.Series):
        try:
            column = pa.chunked_array([pa.array(column, from_pandas=True)])
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return _factorize_python(list(column))
    if isinstance(column, pa.Array):
        column = pa.chunked_array([column])
    if pa.types.is_dictionary(column.type):  # a DuckDB ENUM, a pandas categorical
        column = column.cast(column.type.value_type)
    try:
        encoded = column.combine_chunks().dictionary_encode()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        return _factorize_python(column.to_pylist())
    codes = encoded.indices.cast(pa.int64()).fill_null(-1).to_numpy(zero_copy_only=False)
    return codes, encoded.dictionary.to_pylist()


def _factorize_python(values: list) -> tuple[np.ndarray, list]:
    """Nested values (lists, structs, mixed objects): key them by their rendered text."""
    rendered = [format_value(v) for v in values]
    keys = np.array([t if t is not None else "" for t in rendered], dtype=object)
    codes, uniq = pd.factorize(keys)
    codes = np.where([t is None for t in rendered], -1, codes).astype(np.int64)
    return codes, list(uniq)
