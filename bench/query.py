"""LLM queries over the movies tables: the naive per-chunk UDF path against llmudf's
whole-query path, side by side in one process, result cache off.

naive: per-chunk UDFs, original row order, no dedup (the engine's prefix cache stays on, as
in any modern engine). optimized: the rewrite (filters / LIMIT below the LLM, LLM filters one
after another) + dedup + row reordering. Each path gets its own engine, so neither warms the
other's prefix cache.

    python bench/query.py [--rows 300] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import time

import llmudf
from llmudf.cli import _read_movies

KIDS = "Is a movie with this rating suitable for young children?"
# Questions about categorical columns, the common case the paper's benchmark also covers:
# many rows, far fewer distinct prompts (300 top movies: 59 countries, 36 languages, 6 ratings).
QUERIES = {
    "filter": "SELECT Title, Year FROM omdb "
    "WHERE llm_filter('Is this country in Europe?', Country)",
    "projection": "SELECT Title, llm('Which continent is this country in? Answer in one word.', "
    "Country, {'max_tokens': 4}) AS continent FROM omdb",
    "multi": "SELECT o.Title FROM omdb o JOIN tomatoes t ON o.ID = t.ID "
    "WHERE llm_filter('Is this movie in English?', o.Language) "
    f"AND llm_filter('{KIDS}', o.Rating)",
    "agg": "SELECT Rating, AVG(llm_score('How family-friendly is a movie with this rating, in "
    "this language?', Rating, Language)) AS score, COUNT(*) AS n FROM omdb GROUP BY Rating",
}


def _connect(tables, model, **options):
    con = llmudf.connect(model=model, cache=False, progress=False, **options)
    for name, table in tables.items():
        con.register(f"{name}_arrow", table)
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM {name}_arrow")
    return con


def _run(con, sql):
    start = time.perf_counter()
    rows = con.sql(sql).fetchall()
    seconds = time.perf_counter() - start
    stats = con.last_stats
    prompt = sum(s.num_prompt_tokens for s in stats)
    return {
        "rows": sorted(map(repr, rows)),
        "seconds": seconds,
        "sent": sum(s.num_sent for s in stats),
        "phr": sum(s.num_cached_tokens for s in stats) / prompt if prompt else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300, help="movies per table")
    parser.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    args = parser.parse_args()
    tables = _read_movies(args.rows)
    naive = _connect(
        tables, args.model, rewrite=False, dedup=False, reorder_rows=False, engine={"device": "cpu"}
    )
    optimized = _connect(tables, args.model, engine={"device": "cpu", "max_num_seqs": 256})
    _run(naive, "SELECT llm('warm up', {'x': 1}) FROM omdb LIMIT 1")  # load both models
    _run(optimized, "SELECT llm('warm up', {'x': 1}) FROM omdb LIMIT 1")
    result, identical = {"rows": args.rows}, True
    print(f"{'query':<11} {'naive s':>8} {'opt s':>8} {'speedup':>8} {'sent':>11} {'PHR':>11}")
    for name, sql in QUERIES.items():
        a, b = _run(naive, sql), _run(optimized, sql)
        speedup = a["seconds"] / b["seconds"]
        identical &= a["rows"] == b["rows"]
        result[f"speedup_{name}"] = round(speedup, 2)
        result[f"phr_{name}"] = [round(a["phr"], 3), round(b["phr"], 3)]
        result[f"sent_{name}"] = [a["sent"], b["sent"]]
        print(
            f"{name:<11} {a['seconds']:8.1f} {b['seconds']:8.1f} {speedup:7.2f}x "
            f"{a['sent']:>5}/{b['sent']:<5} {a['phr']:.2f}/{b['phr']:.2f}"
            f"{'' if a['rows'] == b['rows'] else '  ANSWERS DIFFER'}"
        )
    result["identical"] = identical
    naive.close()
    optimized.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
