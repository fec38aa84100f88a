"""The DataFrame API's embedding and semantic join: `llm_embed(column)` and
`sem_join(left, right, instruction, left_on, right_on)`, the twins of SQL's `llm_embed(text)`
and `a JOIN b ON llm_filter(instruction, {'left': a.x, 'right': b.y})`.

`sem_join` answers on the driver, like `llmudf.spark.sql`: the distinct values of each side,
candidate pairs by embedding similarity (`llmudf.optimizer.blocking`; `blocking='none'`
asks every pair), one `SparkClient` batch of the candidates (through the result cache), and
the pairs answered yes joined back (a broadcast local relation).

>>> from llmudf.spark import sem_join
>>> same = sem_join(movies, listings, "Same movie?", "title", "name")   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.calls.functions import bind_call
from llmudf.connectors.spark.client import SparkClient
from llmudf.connectors.spark.udf import answers_frame, embed_udf
from llmudf.runtime.cache import open_cache
from llmudf.runtime.executor import run_call
from llmudf.runtime.semantic_join import candidate_pairs

__all__ = ["llm_embed", "sem_join"]

_HOWS = {
    "inner": "inner",
    "left": "left",
    "left_outer": "left",
    "semi": "left_semi",
    "left_semi": "left_semi",
}


def llm_embed(column, config: Config | None = None, model: str | None = None):
    """The embedding of a text Column (a name or a Column) as an array<float> Column
    (384 floats with the default all-MiniLM-L6-v2; `model=` another sentence-embedding
    folder).

    >>> df.select(llm_embed("title").alias("v"))                         # doctest: +SKIP
    """
    from pyspark.sql import functions as F

    config = config or Config()
    if model is not None:
        config = replace(config, embed_model=model)
    return embed_udf(config)(F.col(column) if isinstance(column, str) else column)


def sem_join(
    left,
    right,
    instruction: str,
    left_on,
    right_on,
    how: str = "inner",
    names: tuple[str, str] = ("left", "right"),
    config: Config | None = None,
    **options,
):
    """`left` joined with `right` where the model answers yes to `instruction` about the
    pair (`left_on`, `right_on`: a column name or Column of each side, the prompt's fields
    `names`). `how`: inner, left or semi. Options: call options such as blocking='none'
    (every pair), blocking_k=10.

    >>> sem_join(a, b, "Same movie?", "title", "title", how="left")      # doctest: +SKIP
    """
    from pyspark.sql import functions as F

    if how not in _HOWS:
        raise ValueError(f"sem_join: how must be one of {sorted(_HOWS)}, got {how!r}")
    if not isinstance(instruction, str):
        raise TypeError(f"sem_join: the instruction must be a str, got {instruction!r}")
    spec = bind_call("llm_filter", None, options, "sem_join(...)")
    config = config or Config()
    # bound to their DataFrame: the same column name on both sides stays unambiguous
    left_col = left[left_on] if isinstance(left_on, str) else left_on
    right_col = right[right_on] if isinstance(right_on, str) else right_on
    left_keys = left.select(left_col.alias("__llm_l0")).distinct().toArrow()
    right_keys = right.select(right_col.alias("__llm_r0")).distinct().toArrow()
    candidates = candidate_pairs(left_keys, right_keys, spec.config(config))
    fields = pa.table(
        {
            names[0]: left_keys.column(0).take(pa.array(candidates.left)),
            names[1]: right_keys.column(0).take(pa.array(candidates.right)),
        }
    )
    cache = open_cache(config.cache_dir) if config.cache else None
    client = SparkClient(left.sparkSession, config)
    result = run_call(spec, instruction, fields, config, client, cache)
    yes = np.asarray(result.answers.fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    matches = pa.table(
        {
            "__llm_l0": left_keys.column(0).take(pa.array(candidates.left[yes])),
            "__llm_r0": right_keys.column(0).take(pa.array(candidates.right[yes])),
        }
    )
    pairs = F.broadcast(answers_frame(left.sparkSession, matches))
    on_left = left_col.eqNullSafe(F.col("__llm_l0"))
    if _HOWS[how] == "left_semi":
        return left.join(pairs, on=on_left, how="left_semi")
    matched = pairs.join(right, on=F.col("__llm_r0").eqNullSafe(right_col), how="inner")
    return left.join(matched, on=on_left, how=_HOWS[how]).drop("__llm_l0", "__llm_r0")
