"""Semantic join on an entity-matching workload with known truth: (a) every pair through the
per-chunk path, against (b) llmudf's semantic join with embedding blocking.

Left: `--rows` movie titles from movies.db. Right: the same titles rewritten (case changed,
a word dropped, the year appended, a leading article moved to the end) plus as many other
titles. (a) would ask the model about all left x right pairs; it runs on a sample and is
scaled up: the sample holds `--sample-true` true pairs and `--sample-false` others, so
recall and the false-positive rate are measured on it, and its time per pair times the
cross product is (a)'s time. (b) runs the whole join. Result cache off; each side has its
own engine. Writes bench/results/join.json.

    python bench/join.py [--rows 300] [--model PATH] [--sample-true 60] [--sample-false 240]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import time

import pyarrow as pa
from _common import write_result

import llmudf
from llmudf.calls.config import Config
from llmudf.runtime.paths import movies_db
from llmudf.runtime.semantic_join import candidate_pairs

QUESTION = "Do these two titles name the same movie?"
ARTICLES = ("The ", "A ", "An ")


def rewrite(title: str, year, rng: random.Random) -> str:
    """One of the edits a second catalogue makes to a title."""
    words = title.split()
    edits = ["case", "year"]
    if len(words) >= 3:
        edits.append("drop")
    if title.startswith(ARTICLES) and len(words) >= 2:
        edits.append("article")
    edit = rng.choice(edits)
    if edit == "case":
        return title.upper() if rng.random() < 0.5 else title.lower()
    if edit == "year":
        return f"{title} ({year})"
    if edit == "drop":
        del words[rng.randrange(1, len(words))]
        return " ".join(words)
    article, rest = title.split(" ", 1)
    return f"{rest}, {article}"


def workload(num_rows: int, seed: int = 0) -> tuple[list[str], list[str], set[tuple[str, str]]]:
    """(left titles, right titles, the true (left, right) pairs)."""
    con = sqlite3.connect(movies_db())
    movies = con.execute(
        "SELECT Title, MIN(Year) FROM omdb WHERE Title IS NOT NULL GROUP BY Title ORDER BY Title"
    ).fetchall()
    rng = random.Random(seed)
    rng.shuffle(movies)
    left_movies, others = movies[:num_rows], movies[num_rows : 2 * num_rows]
    truth = {(t, rewrite(t, y, rng)) for t, y in left_movies}
    right = sorted({r for _l, r in truth} | {t for t, _y in others})
    rng.shuffle(right)
    return [t for t, _y in left_movies], right, truth


def connect(model, left, right, **options):
    con = llmudf.connect(model=model, cache=False, progress=False, **options)
    con.execute("CREATE TABLE l (title VARCHAR)")
    con.executemany("INSERT INTO l VALUES (?)", [[t] for t in left])
    con.execute("CREATE TABLE r (title VARCHAR)")
    con.executemany("INSERT INTO r VALUES (?)", [[t] for t in right])
    return con


JOIN = (
    "SELECT l.title, r.title FROM l JOIN r "
    f"ON llm_filter('{QUESTION}', {{'left': l.title, 'right': r.title}})"
)


def _blocking_recall(left: list[str], right: list[str], truth: set[tuple[str, str]]) -> float:
    """The share of true pairs among the candidates blocking picks: the recall (b) keeps of
    a judge that answers each pair the same whatever else is asked."""
    candidates = candidate_pairs(pa.table({"t": left}), pa.table({"t": right}), Config())
    kept = {(left[i], right[j]) for i, j in zip(candidates.left, candidates.right, strict=True)}
    return len(kept & truth) / len(truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300, help="left titles")
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    parser.add_argument("--sample-true", type=int, default=60, help="(a): true pairs asked")
    parser.add_argument("--sample-false", type=int, default=240, help="(a): other pairs asked")
    args = parser.parse_args()
    left, right, truth = workload(args.rows)
    num_pairs = len(left) * len(right)
    rng = random.Random(1)
    sample_true = rng.sample(sorted(truth), min(args.sample_true, len(truth)))
    sample_false = set()
    while len(sample_false) < args.sample_false:
        pair = (rng.choice(left), rng.choice(right))
        if pair not in truth:
            sample_false.add(pair)
    sample = sample_true + sorted(sample_false)

    # (a) the per-chunk path (today's fallback for a JOIN ... ON llm_filter) on the sample
    naive = connect(args.model, left, right, rewrite=False, engine={"device": "cpu"})
    naive.execute("CREATE TABLE pairs (l VARCHAR, r VARCHAR)")
    naive.executemany("INSERT INTO pairs VALUES (?, ?)", [list(p) for p in sample])
    naive.sql("SELECT llm('warm up', {'x': 1})").fetchall()
    start = time.perf_counter()
    said_yes = set(
        naive.sql(
            f"SELECT l, r FROM pairs WHERE llm_filter('{QUESTION}', {{'left': l, 'right': r}})"
        ).fetchall()
    )
    seconds_sample = time.perf_counter() - start
    naive.close()
    recall_a = sum(p in said_yes for p in sample_true) / len(sample_true)
    false_rate = sum(p in said_yes for p in sample_false) / len(sample_false)
    true_positives_a = recall_a * len(truth)
    false_positives_a = false_rate * (num_pairs - len(truth))
    precision_a = true_positives_a / max(true_positives_a + false_positives_a, 1e-9)
    seconds_a = seconds_sample / len(sample) * num_pairs

    # (b) the semantic join with blocking
    optimized = connect(args.model, left, right, engine={"device": "cpu", "max_num_seqs": 256})
    optimized.sql("SELECT llm('warm up', {'x': 1})").fetchall()
    optimized.sql("SELECT llm_embed('warm up')").fetchall()  # load the embedding model
    explained = optimized.explain_llm(JOIN).sites[0].blocking
    blocking_recall = _blocking_recall(left, right, truth)
    start = time.perf_counter()
    matches = set(optimized.sql(JOIN).fetchall())
    seconds_b = time.perf_counter() - start
    pairs_b = sum(s.num_requests for s in optimized.last_stats)
    optimized.close()
    recall_b = len(matches & truth) / len(truth)
    precision_b = len(matches & truth) / len(matches) if matches else 0.0

    print(f"{len(left)} x {len(right)} titles, {len(truth)} true pairs, {num_pairs:,} pairs")
    print(f"blocking: {explained}; true pairs among the candidates: {blocking_recall:.3f}")
    print(f"{'':4} {'pairs asked':>12} {'seconds':>9} {'precision':>10} {'recall':>7}")
    print(
        f"(a) {num_pairs:>12,} {seconds_a:>9.0f} {precision_a:>10.3f} {recall_a:>7.3f}"
        f"   (sample of {len(sample)} pairs: {seconds_sample:.1f} s, scaled up)"
    )
    print(f"(b) {pairs_b:>12,} {seconds_b:>9.1f} {precision_b:>10.3f} {recall_b:>7.3f}")
    result = {
        "rows": len(left),
        "right_rows": len(right),
        "pairs_a": num_pairs,
        "pairs_b": pairs_b,
        "seconds_a_estimated": round(seconds_a, 1),
        "seconds_a_sample": round(seconds_sample, 2),
        "seconds_b": round(seconds_b, 2),
        "k": explained.k,
        "estimated_recall": round(explained.estimated_recall, 4),
        "blocking_recall": round(blocking_recall, 4),
        "pairs_saved": round(num_pairs / max(pairs_b, 1), 1),
        "speedup": round(seconds_a / seconds_b, 1),
        "recall_a": round(recall_a, 3),
        "recall_b": round(recall_b, 3),
        "precision_a": round(precision_a, 4),
        "precision_b": round(precision_b, 3),
    }
    headline = {k: result[k] for k in ("pairs_saved", "speedup", "recall_a", "recall_b")}
    headline["precision_b"] = result["precision_b"]
    headline["blocking_recall"] = result["blocking_recall"]
    write_result(
        "join",
        result,
        headline=headline,
        targets={"pairs_saved": ">= 20", "recall_b": ">= 0.95 * recall_a"},
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
