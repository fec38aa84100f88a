"""`llm_embed` in DuckDB: FLOAT[384] that DuckDB's array functions take, each distinct text
embedded once, the result cache, NULLs and non-text input. A fake embedder (counting what
it is asked) keeps these fast; the slow test runs the real model."""

from __future__ import annotations

import numpy as np
import pytest

import llmudf
from llmudf.calls.functions import LLMCallError


class FakeEmbedder:
    dimension = 384

    def __init__(self):
        self.asked: list[str] = []

    def embed(self, texts):
        self.asked += texts
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for i, text in enumerate(texts):
            out[i, len(text) % self.dimension] = 1.0
        return out


@pytest.fixture
def embedder(monkeypatch):
    fake = FakeEmbedder()
    monkeypatch.setattr("llmudf.engine.embedding.get_embedder", lambda model=None: fake)
    return fake


def test_llm_embed_returns_fixed_size_arrays_for_duckdb_functions(embedder, tmp_path):
    con = llmudf.connect(cache=False)
    rel = con.sql("SELECT llm_embed(t) AS v FROM (VALUES ('Up'), ('Heat'), (NULL), ('Up')) x(t)")
    assert rel.types[0] == "FLOAT[384]"
    vectors = [v for (v,) in rel.fetchall()]
    assert vectors[2] is None and vectors[0] == vectors[3] and vectors[0] != vectors[1]
    assert sorted(embedder.asked) == ["Heat", "Up"]  # each distinct text once, NULL never
    sims = con.sql(
        "SELECT array_cosine_similarity(llm_embed('Up'), llm_embed('Op')), "
        "array_distance(llm_embed('Up'), llm_embed('Heat'))"
    ).fetchall()[0]
    assert sims[0] == pytest.approx(1.0) and sims[1] == pytest.approx(np.sqrt(2))


def test_llm_embed_uses_the_result_cache(embedder, tmp_path):
    query = "SELECT llm_embed(t) FROM (VALUES ('Up'), ('Heat')) x(t)"
    first = llmudf.connect(cache_dir=tmp_path).sql(query).fetchall()
    assert len(embedder.asked) == 2
    again = llmudf.connect(cache_dir=tmp_path).sql(query).fetchall()
    assert again == first and len(embedder.asked) == 2  # both from the cache


def test_llm_embed_of_non_text_is_an_error(embedder):
    con = llmudf.connect(cache=False)
    with pytest.raises(Exception, match="llm_embed: the argument must be text"):
        con.sql("SELECT llm_embed(x) FROM (VALUES (1), (2)) t(x)").fetchall()
    assert not embedder.asked


def test_llm_embed_error_type_is_the_call_error():
    import pyarrow as pa

    from llmudf.calls.config import Config
    from llmudf.runtime.embed import embed_array

    with pytest.raises(LLMCallError, match="got int64"):
        embed_array(pa.array([1, 2]), Config(cache=False))


@pytest.mark.slow
def test_the_real_model_ranks_a_rewritten_title_nearest():
    con = llmudf.connect(cache=False)
    rows = con.sql(
        "SELECT t, array_cosine_similarity(llm_embed('The Matrix'), llm_embed(t)) AS s "
        "FROM (VALUES ('matrix, the (1999)'), ('Heat'), ('Toy Story 2')) x(t) ORDER BY s DESC"
    ).fetchall()
    assert rows[0][0] == "matrix, the (1999)" and rows[0][1] > 0.7 > rows[1][1]
