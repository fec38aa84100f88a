"""`llm_embed`: texts to unit vectors, each distinct text embedded once and kept in the result
cache (keyed by the embedding model's weights and the text), like every other call.

>>> vectors = embed_texts(["Up", "Heat", "Up"], Config())            # doctest: +SKIP
>>> vectors.shape                                                    # doctest: +SKIP
(3, 384)
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.calls.functions import LLMCallError
from llmudf.calls.prompt import ChatPrompt
from llmudf.engine.embedding import DEFAULT_EMBED_MODEL, default_model_zip, embed_dimension
from llmudf.runtime.cache import ResultCache, cache_key, open_cache
from llmudf.runtime.paths import weights_id

__all__ = ["embed_array", "embed_dimension", "embed_model_id", "embed_texts"]

_DECODING = {"embedding": "mean-pooled, L2-normalised, float32"}  # the cache key's "decoding"


def embed_model_id(model: str | None) -> str:
    """What cache keys name an embedding model by: its name and its weight files' stamps."""
    if model is None or model == DEFAULT_EMBED_MODEL:
        stat = default_model_zip().stat()
        return f"{DEFAULT_EMBED_MODEL}|model.zip:{stat.st_size}:{stat.st_mtime_ns}"
    return "embed:" + weights_id(str(Path(model).expanduser()))


def embed_texts(texts: list[str], config: Config, cache: ResultCache | None = None) -> np.ndarray:
    """[len(texts), dimension] float32 unit vectors of `texts` (no NULLs): each distinct
    text once, answers in `cache` (default: the config's, when `config.cache`) not
    recomputed."""
    from llmudf.engine.embedding import get_embedder

    if cache is None and config.cache:
        cache = open_cache(config.cache_dir)
    distinct = list(dict.fromkeys(texts))
    vectors: dict[str, np.ndarray] = {}
    keys = {}
    if cache is not None and distinct:
        model_id = embed_model_id(config.embed_model)
        keys = {t: cache_key(model_id, _DECODING, ChatPrompt(t)) for t in distinct}
        known = cache.get_many(list(keys.values()))
        for text, key in keys.items():
            if key in known:
                vectors[text] = _decode(known[key])
    todo = [t for t in distinct if t not in vectors]
    if todo:
        computed = get_embedder(config.embed_model).embed(todo)
        vectors.update(zip(todo, computed, strict=True))
        if cache is not None:
            cache.put_many({keys[t]: _encode(v) for t, v in zip(todo, computed, strict=True)})
    dimension = embed_dimension(config.embed_model)
    out = np.zeros((len(texts), dimension), dtype=np.float32)
    for i, text in enumerate(texts):
        out[i] = vectors[text]
    return out


def embed_array(
    values: pa.Array, config: Config, cache: ResultCache | None = None, site: str = "llm_embed"
) -> pa.FixedSizeListArray:
    """One embedding per value (a fixed-size list of float32; NULL for a NULL value).
    LLMCallError naming `site` for a value that is not text."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)) and not (
        pa.types.is_null(values.type)
    ):
        raise LLMCallError(
            f"{site}: the argument must be text (VARCHAR), got {values.type}; cast it "
            "first, e.g. llm_embed(CAST(x AS VARCHAR))"
        )
    dimension = embed_dimension(config.embed_model)
    texts = values.to_pylist()
    present = [i for i, t in enumerate(texts) if t is not None]
    vectors = np.zeros((len(texts), dimension), dtype=np.float32)
    if present:
        vectors[present] = embed_texts([texts[i] for i in present], config, cache)
    flat = pa.array(vectors.reshape(-1), pa.float32())
    mask = pa.array([t is None for t in texts], pa.bool_())
    return pa.FixedSizeListArray.from_arrays(flat, dimension, mask=mask)


def _encode(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)
