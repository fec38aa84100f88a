"""`df.llm.reduce(...)`: the LLM aggregate over a pandas or Polars DataFrame, as SQL's
`llm_reduce(...) ... GROUP BY by`: one answer per group, the rows of a group in an order
derived from their content, every group in one engine batch per level of the hierarchy
(`llmudf.runtime.reduce`).

>>> df.llm.reduce("What do these movies share?", ["title"], by="genre")      # doctest: +SKIP
genre
Comedy    ...
Drama     ...
Name: llm_reduce, dtype: object
"""

from __future__ import annotations

import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.calls.functions import LLMCallError
from llmudf.calls.reduce import bind_reduce
from llmudf.frame import get_config
from llmudf.frame_tables import FrameTable, is_polars, is_series
from llmudf.runtime.cache import open_cache
from llmudf.runtime.client import get_client
from llmudf.runtime.reduce import run_reduce

__all__ = ["llm_reduce"]


def llm_reduce(
    frame, instruction: str, fields=None, by=None, *, config: Config | None = None, **options
):
    """One answer per group of rows. `fields`: column names, {field name: column}, or None
    for every column but `by`; `by`: a column or columns to group by, or None for the whole
    frame as one group (then the answer is a str). pandas: a Series indexed by the group
    keys (NULL keys are a group, as in SQL); Polars: a DataFrame of the keys and `llm_reduce`.

    >>> llm_reduce(movies, "What do they share?", ["title"], by="genre")       # doctest: +SKIP
    """
    site = "df.llm.reduce"
    if is_series(frame):
        raise TypeError(f"{site}: reduce a DataFrame's rows; got a Series")
    if not isinstance(instruction, str):
        raise LLMCallError(f"{site}: the instruction must be a str, got {instruction!r}")
    config = get_config() if config is None else config
    if not isinstance(config, Config):
        raise TypeError(f"{site}: config must be a llmudf.Config, got {type(config).__name__}")
    spec = bind_reduce(options, site)
    table = FrameTable.of(frame, site)
    keys = [] if by is None else [by] if isinstance(by, str) else list(by)
    if fields is None:
        fields = [c for c in table.columns if c not in keys]
    rows = table.fields_table(fields)
    if not keys:
        groups, labels = [rows], [()]
    else:
        key_table = table.fields_table(keys)
        members: dict[tuple, list[int]] = {}
        columns = [c.to_pylist() for c in key_table.columns]
        for row, key in enumerate(zip(*columns, strict=True)):
            members.setdefault(key, []).append(row)
        labels = _sorted(members)
        groups = [rows.take(pa.array(members[k], pa.int64())) for k in labels]
    cache = open_cache(config.cache_dir) if config.cache else None
    client = get_client(spec.config(config))
    answers = run_reduce(spec, instruction, groups, config, client, cache).answers
    if not keys:
        return answers[0]
    if is_polars(frame):
        import polars as pl

        data = {str(k): [label[i] for label in labels] for i, k in enumerate(keys)}
        return pl.DataFrame({**data, "llm_reduce": answers})
    import pandas as pd

    if len(keys) == 1:
        index = pd.Index([label[0] for label in labels], name=keys[0])
    else:
        index = pd.MultiIndex.from_tuples(labels, names=keys)
    return pd.Series(answers, index=index, name="llm_reduce", dtype=object)


def _sorted(keys) -> list[tuple]:
    """Group keys sorted (NULLs last), as pandas' groupby orders them."""
    try:
        return sorted(keys, key=lambda k: tuple((v is None, v) for v in k))
    except TypeError:  # keys of mixed types: first-appearance order
        return list(keys)
