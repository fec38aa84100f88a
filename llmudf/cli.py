"""The `llmudf` command: generate, sql, demo (and serve, when the engine server is installed).

llmudf generate                  answer a few prompts about movies, print engine statistics
llmudf sql "SELECT ..." [--db FILE] [--model PATH]
llmudf demo                      LLM queries over the bundled movies tables
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sqlite3
import sys
import time

import pyarrow as pa

from llmudf import paths
from llmudf.config import Config

DEMO_ROWS = 60
DEMO_QUERIES = [
    (
        "Which recent movies suit young children? (llm_filter in WHERE)",
        "SELECT Title, Genre, Rating FROM omdb WHERE Year >= 2000 "
        "AND llm_filter('Is a movie of this genre and rating suitable for young children?', "
        "Genre, Rating) ORDER BY Title LIMIT 10",
    ),
    (
        "The mood of each genre (llm_choice in SELECT, deduplicated)",
        "SELECT Genre, llm_choice('Which mood fits movies of this genre best?', "
        "['dark', 'tense', 'funny', 'uplifting'], Genre) AS mood, COUNT(*) AS movies "
        "FROM omdb GROUP BY Genre ORDER BY movies DESC, Genre LIMIT 8",
    ),
    (
        "Average family-friendliness by rating (AVG of llm_score)",
        "SELECT o.Rating, AVG(llm_score('How family-friendly is this, from 1 to 5?', "
        "o.Rating, o.Genre)) AS score, COUNT(*) AS movies FROM omdb o JOIN tomatoes t "
        "ON o.ID = t.ID WHERE o.Rating IN ('G', 'PG', 'PG-13', 'R') GROUP BY o.Rating "
        "ORDER BY score DESC",
    ),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmudf", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="answer demo prompts with the engine, print its stats")
    gen.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    gen.add_argument("-n", type=int, default=8, help="number of movies")
    sql = sub.add_parser("sql", help="run one SQL query and print the result table")
    sql.add_argument("query")
    sql.add_argument("--db", default=":memory:", help="DuckDB database file")
    sql.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    sql.add_argument("--no-cache", action="store_true", help="skip the result cache")
    sql.add_argument("--explain", action="store_true", help="print the LLM plan instead")
    demo = sub.add_parser("demo", help="LLM queries over the bundled movies tables")
    demo.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    demo.add_argument("--rows", type=int, default=DEMO_ROWS, help="movies loaded per table")
    if importlib.util.find_spec("llmudf.engine.server") is not None:
        from llmudf.engine import server

        server.add_serve_arguments(sub.add_parser("serve", help="run the engine server"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        from llmudf.engine import server

        return server.serve_main(args) or 0
    return {"generate": _generate, "sql": _sql, "demo": _demo}[args.command](args)


def _generate(args) -> int:
    from llmudf.client import get_client
    from llmudf.engine.sampling import SamplingParams
    from llmudf.prompt import ChatPrompt, render_user_message

    movies = _read_movies(args.n)["omdb"].to_pylist()
    prompts = [
        ChatPrompt(
            render_user_message(
                "In one short sentence, what is this movie about?",
                [("title", m["Title"]), ("year", m["Year"]), ("genre", m["Genre"])],
            )
        )
        for m in movies
    ]
    client = get_client(Config(model=args.model))
    engine = client.engine
    start = time.perf_counter()
    outputs = engine.generate(prompts, SamplingParams(max_tokens=24))
    seconds = time.perf_counter() - start
    for movie, out in zip(movies, outputs, strict=True):
        print(f"{movie['Title']} ({movie['Year']}): {out.text.strip()}")
    stats = engine.stats
    print(
        f"\n{len(outputs)} prompts in {seconds:.1f}s: {stats.num_prompt_tokens} prompt tokens "
        f"({stats.num_cached_tokens} from the prefix cache, PHR {stats.prefix_hit_rate:.0%}), "
        f"{stats.num_generated_tokens} generated, {stats.tokens_per_s:.0f} tokens/s"
    )
    return 0


def _sql(args) -> int:
    import llmudf

    con = llmudf.connect(args.db, model=args.model, cache=not args.no_cache)
    try:
        if args.explain:
            print(con.explain_llm(args.query))
            return 0
        _print_relation(con.sql(args.query))
        _print_stats(con)
    finally:
        con.close()
    return 0


def _demo(args) -> int:
    import llmudf

    con = llmudf.connect(model=args.model)
    for name, table in _read_movies(args.rows).items():
        con.register(f"{name}_arrow", table)
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM {name}_arrow")
    print(f"Loaded {args.rows} movies (omdb, tomatoes) from {paths.movies_db()}\n")
    for title, query in DEMO_QUERIES:
        print(f"-- {title}\n{query}\n")
        start = time.perf_counter()
        _print_relation(con.sql(query))
        print(f"({time.perf_counter() - start:.1f}s)")
        _print_stats(con)
        print()
    con.close()
    return 0


def _read_movies(num_rows: int) -> dict[str, pa.Table]:
    """The `num_rows` most-voted rated movies of movies.db (read with sqlite3, so no DuckDB
    extension is downloaded)."""
    with sqlite3.connect(paths.movies_db()) as db:
        top = "SELECT ID FROM omdb WHERE Rating IS NOT NULL ORDER BY imdbVotes DESC, ID LIMIT ?"
        ids = [r[0] for r in db.execute(top, (num_rows,))]
        marks = ",".join("?" * len(ids))
        tables = {}
        for name in ("omdb", "tomatoes"):
            cursor = db.execute(f"SELECT * FROM {name} WHERE ID IN ({marks}) ORDER BY ID", ids)
            columns = [c[0] for c in cursor.description]
            rows = cursor.fetchall()
            tables[name] = pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)})
    return tables


def _print_relation(relation) -> None:
    if relation is None:
        return
    table = relation.to_arrow_table()
    names = table.column_names
    rows = [[_cell(v) for v in row.values()] for row in table.to_pylist()]
    widths = [max([len(n), *(len(r[i]) for r in rows)]) for i, n in enumerate(names)]
    print(" | ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _cell(value) -> str:
    if value is None:
        return "NULL"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _print_stats(con) -> None:
    for s in con.last_stats:
        print(
            f"  {s.site}: {s.num_rows} rows -> {s.num_requests} prompts, "
            f"{s.num_cache_hits} from the result cache, {s.num_sent} to the engine; "
            f"{s.num_prompt_tokens} prompt tokens ({s.num_cached_tokens} prefix-cached), "
            f"{s.num_generated_tokens} generated, {s.tokens_per_s:.0f} tokens/s"
        )
    if con.last_fallback:
        print(f"  (ran per chunk: {con.last_fallback})")


if __name__ == "__main__":
    sys.exit(main())
