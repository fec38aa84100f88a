"""`llmudf.spark`: the LLM functions in PySpark (see llmudf.connectors.spark).

>>> from llmudf.spark import llm, llm_filter                                  # doctest: +SKIP
>>> df.where(llm_filter("Is it a comedy?", "title")).select(llm("Genre?", "title"))
... # doctest: +SKIP
"""

from llmudf.connectors.spark import (
    SparkClient,
    llm,
    llm_choice,
    llm_embed,
    llm_filter,
    llm_json,
    llm_reduce,
    llm_score,
    register,
    sem_join,
    sql,
)

__all__ = [
    "SparkClient",
    "llm",
    "llm_choice",
    "llm_embed",
    "llm_filter",
    "llm_json",
    "llm_reduce",
    "llm_score",
    "register",
    "sem_join",
    "sql",
]
