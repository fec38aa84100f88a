"""The semantic join in DuckDB (`JOIN ... ON llm_filter(...)`), answered by the hash oracle
(tests/connectors/conftest.py). With blocking off it must equal today's per-chunk fallback;
with blocking on it asks only the candidate pairs. Embeddings are a fake here (a hash of
the text's lowercase words), so these tests load no model."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import llmudf
from llmudf.calls.functions import LLMCallError

LEFT = ["Heat", "Up", None, "Up", "The Matrix", "Alien", "Brazil"]
RIGHT = ["heat (1995)", "UP", "Alien", "Matrix, The", "Solaris", None, "Jaws"]
ASK = "llm_filter('Same movie?', {'left': a.title, 'right': b.title}, {'blocking': 'none'})"


def fake_vectors(texts, config, cache=None) -> np.ndarray:
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().replace(",", " ").replace("(", " ").split():
            out[i, int(hashlib.sha256(word.encode()).hexdigest(), 16) % 64] += 1
    out += 1e-3  # an empty text still has a direction
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(autouse=True)
def fake_embeddings(monkeypatch):
    monkeypatch.setattr("llmudf.runtime.semantic_join.embed_texts", fake_vectors)


def make(**options):
    con = llmudf.connect(cache=False, progress=False, **options)
    con.execute("CREATE TABLE a (id INTEGER, title VARCHAR, year INTEGER)")
    con.executemany(
        "INSERT INTO a VALUES (?, ?, ?)", [[i, t, 1990 + i] for i, t in enumerate(LEFT)]
    )
    con.execute("CREATE TABLE b (id INTEGER, title VARCHAR, year INTEGER)")
    con.executemany(
        "INSERT INTO b VALUES (?, ?, ?)", [[10 + j, t, 1990 + j] for j, t in enumerate(RIGHT)]
    )
    return con


QUERIES = {
    "inner": f"SELECT a.id, b.id FROM a JOIN b ON {ASK}",
    "left": f"SELECT a.id, b.id FROM a LEFT JOIN b ON {ASK}",
    "semi": f"SELECT a.id FROM a SEMI JOIN b ON {ASK}",
    "star + filters": f"SELECT * FROM a JOIN b ON b.year > 1991 AND {ASK} AND a.id <> b.id - 10 "
    "WHERE a.year < 1996",
    "left + on filter": f"SELECT a.id, b.id FROM a LEFT JOIN b ON a.year > 1992 AND {ASK}",
    "struct swapped": "SELECT a.id, b.id FROM a JOIN b ON "
    "llm_filter('Same movie?', {'right': b.title, 'left': a.title}, {'blocking': 'none'})",
    "three tables": f"SELECT a.id, b.id, c.id FROM a JOIN b ON {ASK} JOIN a AS c ON c.id = a.id",
    "two joins": f"SELECT a.id, b.id, c.id FROM a JOIN b ON {ASK} JOIN b AS c ON "
    "llm_filter('Same movie?', {'left': b.title, 'right': c.title}, {'blocking': 'none'})",
    "equi + llm": f"SELECT a.id, b.id FROM a LEFT JOIN b ON a.year = b.year - 1 AND {ASK}",
    "grouped": f"SELECT b.title, count(*) FROM a JOIN b ON {ASK} GROUP BY ALL",
}


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_blocking_none_equals_the_per_chunk_fallback(hash_oracle, name):
    query = QUERIES[name] + " ORDER BY ALL"
    optimized, fallback = make(), make(rewrite=False)
    got = optimized.sql(query).fetchall()
    assert optimized.last_fallback is None
    asked = list(hash_oracle.calls)
    if name != "two joins":  # two call sites may ask the same pair (result cache off)
        assert len({c.user for c in asked}) == len(asked)  # each pair asked once
    expected = fallback.sql(query).fetchall()
    assert fallback.last_fallback == "rewrite off"
    assert got == expected and got  # and the oracle said yes to some pairs
    if name in ("inner", "left"):
        assert len([b for _a, b in got if b is not None]) < len(LEFT) * len(RIGHT)  # and no


def test_each_distinct_pair_is_asked_once_in_left_major_order(hash_oracle):
    con = make()
    con.sql(QUERIES["inner"]).fetchall()
    pairs = [
        (
            c.user.split("left: ")[1].split("\n")[0] if "left: " in c.user else None,
            c.user.split("right: ")[1].split("\n")[0] if "right: " in c.user else None,
        )
        for c in hash_oracle.calls
    ]
    distinct_left = len(set(LEFT)) * len(set(RIGHT))
    assert len(pairs) == distinct_left == con.last_stats[0].num_requests
    firsts = [p[0] for p in pairs]
    runs = [f for i, f in enumerate(firsts) if i == 0 or firsts[i - 1] != f]
    assert len(runs) == len(set(firsts))  # pairs that share a left value are consecutive


def test_blocking_asks_only_candidates_and_explain_says_so(hash_oracle):
    con = make()
    query = (
        "SELECT a.id, b.id FROM a JOIN b ON llm_filter('Same movie?', "
        "{'left': a.title, 'right': b.title}, {'blocking_k': 1}) ORDER BY ALL"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("llmudf.runtime.semantic_join.MAX_ALL_PAIRS", 0)
        explained = con.explain_llm(query)
        assert not hash_oracle.calls  # EXPLAIN asks no model
        summary = explained.sites[0].blocking
        assert summary.num_pairs == len(set(LEFT)) * len(set(RIGHT)) == 42
        assert summary.mode == "top-k" and summary.k == 1
        assert 6 <= summary.num_candidates < summary.num_pairs
        assert "pairs in the cross product" in str(explained)
        got = con.sql(query).fetchall()
    assert len(hash_oracle.calls) == summary.num_candidates
    full = make().sql(query.replace("'blocking_k': 1", "'blocking': 'none'")).fetchall()
    assert set(got) <= set(full)  # blocking only drops pairs, never adds one


def test_a_condition_across_both_sides_runs_before_the_model(hash_oracle, monkeypatch):
    monkeypatch.setattr("llmudf.runtime.semantic_join.MAX_ALL_PAIRS", 0)  # blocking would run
    con = make()
    query = (
        "SELECT a.id, b.id FROM a JOIN b ON a.year = b.year AND "
        "llm_filter('Same movie?', {'left': a.title, 'right': b.title}) ORDER BY ALL"
    )
    explained = con.explain_llm(query)
    summary = explained.sites[0].blocking
    assert summary.mode == "join condition" and summary.num_candidates == 7  # same year
    assert "join a.year = b.year before the LLM" in explained.sites[0].pushed
    got = con.sql(query).fetchall()
    assert len(hash_oracle.calls) == 7
    assert got == make(rewrite=False).sql(query).fetchall()


def test_an_llm_call_under_or_in_a_join_condition_is_an_error(hash_oracle):
    con = make()
    with pytest.raises(LLMCallError, match="OR / NOT in a join condition"):
        con.sql(
            "SELECT * FROM a JOIN b ON a.id = b.id OR "
            "llm_filter('Same?', {'left': a.title, 'right': b.title})"
        )
    assert not hash_oracle.calls


def test_other_join_shapes_run_per_chunk(hash_oracle):
    con = make()
    query = "SELECT a.id, b.id FROM a FULL JOIN b ON " + ASK + " ORDER BY ALL"
    got = con.sql(query).fetchall()
    assert "FULL" in con.last_fallback
    assert got == make(rewrite=False).sql(query).fetchall()


def test_bad_blocking_options_name_the_call():
    con = make()
    with pytest.raises(LLMCallError, match="blocking must be one of"):
        con.sql(
            "SELECT * FROM a JOIN b ON llm_filter('Same?', "
            "{'left': a.title, 'right': b.title}, {'blocking': 'fast'})"
        )
