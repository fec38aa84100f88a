"""The `llmudf` command: generate, sql, demo (and serve, when the engine server is installed).

llmudf generate                  answer a few prompts about movies, print engine statistics
llmudf sql "SELECT ..." [--db FILE] [--model PATH] [--explain]
llmudf demo [--model PATH]       LLM queries over the bundled movies tables
llmudf demo --save FILE          write the movies tables to a DuckDB file, run nothing

An error prints one line, `llmudf: error: <message>`, and exits 1 (2 for usage errors, 130
on Ctrl-C); `--debug` prints the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
import traceback
from pathlib import Path

import pyarrow as pa

from llmudf import datasets
from llmudf.calls.config import Config
from llmudf.runtime import paths

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
DEFAULT_MODEL_NOTE = (
    "Answers come from the default model, SmolLM2-135M-Instruct: tiny, so it runs anywhere, "
    "but its answers are weak (it tends to answer every row the same way). For real answers "
    "point it at a bigger local model (a Hugging Face folder or a .gguf file): "
    "`llmudf demo --model PATH`, or `llmudf.connect(model=PATH)` in Python."
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 0
    try:
        if args.command == "serve":
            from llmudf.engine import server

            return server.serve_main(args) or 0
        return {"generate": _generate, "sql": _sql, "demo": _demo}[args.command](args)
    except KeyboardInterrupt:
        return _fail(args, "llmudf: interrupted", 130)
    except SystemExit as exc:  # a message from the command itself
        if not isinstance(exc.code, str):
            raise
        return _fail(args, f"llmudf: error: {exc.code}", 1)
    except Exception as exc:
        return _fail(args, f"llmudf: error: {_error_line(exc)}", 1)


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error of the command."""

    def error(self, message: str):
        self.exit(2, f"llmudf: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    # --debug is accepted before or after the subcommand; SUPPRESS keeps a subcommand's
    # missing flag from overwriting the one given before it
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the full traceback of an error",
    )
    parser = _Parser(prog="llmudf", description=__doc__.splitlines()[0], parents=[debug])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="answer demo prompts with the engine, print its stats", parents=[debug]
    )
    gen.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    gen.add_argument("-n", type=int, default=8, help="number of movies")
    sql = sub.add_parser(
        "sql", help="run one SQL query and print the result table", parents=[debug]
    )
    sql.add_argument("query")
    sql.add_argument("--db", default=":memory:", help="DuckDB database file")
    sql.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    sql.add_argument("--no-cache", action="store_true", help="skip the result cache")
    sql.add_argument("--explain", action="store_true", help="print the LLM plan instead")
    demo = sub.add_parser(
        "demo", help="LLM queries over the bundled movies tables", parents=[debug]
    )
    demo.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2)")
    demo.add_argument(
        "--rows",
        type=int,
        default=None,
        help=f"movies loaded per table (default: {DEMO_ROWS} rated ones; all with --save)",
    )
    demo.add_argument(
        "--save", metavar="FILE", help="write the tables omdb, tomatoes to this DuckDB file, exit"
    )
    if importlib.util.find_spec("llmudf.engine.server") is not None:
        from llmudf.engine import server

        server.add_serve_arguments(
            sub.add_parser("serve", help="run the engine server", parents=[debug])
        )
    return parser


def _fail(args, line: str, code: int) -> int:
    if getattr(args, "debug", False):  # absent when not given (SUPPRESS)
        traceback.print_exc()
    else:
        print(line, file=sys.stderr)
    return code


def _error_line(exc: BaseException) -> str:
    """The first line of the message (DuckDB and sqlglot add the query and a caret below
    it); the type name too where the message alone does not say what went wrong."""
    text = _ANSI.sub("", str(exc))
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    module = type(exc).__module__.split(".")[0]
    if line and (isinstance(exc, ValueError | OSError) or module in ("llmudf", "_duckdb")):
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _generate(args) -> int:
    from llmudf.calls.prompt import ChatPrompt, render_user_message
    from llmudf.engine.params import SamplingParams
    from llmudf.runtime.client import get_client

    movies = _read_movies(args.n)["omdb"].to_pylist()
    prompts = [
        ChatPrompt(
            render_user_message(
                "In one short sentence, what is this movie about?",
                [("title", m["Title"]), ("year", m["Year"]), ("genre", m["Genre"])],
            )
        ).messages()
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
    print(
        f"KV tiers: {stats.num_device_hit_tokens} prompt tokens hit on the device, "
        f"{stats.num_host_hit_tokens} loaded back from host memory, "
        f"{stats.num_computed_prompt_tokens} computed; "
        f"{(stats.num_bytes_to_host + stats.num_bytes_to_device) / 2**20:.1f} MiB copied; "
        f"{stats.num_cpu_attention_tokens} decode tokens attended on the CPU"
    )
    return 0


def _sql(args) -> int:
    import llmudf

    is_new = args.db != ":memory:" and not Path(args.db).exists()
    con = llmudf.connect(args.db, model=args.model, cache=not args.no_cache)
    if is_new:
        print(f"llmudf: {args.db} does not exist, creating a new DuckDB database", file=sys.stderr)
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
    if args.save:
        return _save_movies(args.save, args.rows)
    import llmudf
    from llmudf.runtime.client import get_client

    with llmudf.connect(model=args.model) as con:
        datasets.movies(con, DEMO_ROWS if args.rows is None else args.rows, rated_only=True)
        num_rows = con.sql("SELECT COUNT(*) FROM omdb").fetchall()[0][0]
        print(f"Loaded {num_rows} rated movies (tables omdb, tomatoes) from {paths.movies_db()}")
        print(DEFAULT_MODEL_NOTE if args.model is None else f"Model: {args.model}")
        start = time.perf_counter()
        engine = get_client(con.config).engine  # loaded now, so no query's timing includes it
        seconds = time.perf_counter() - start
        print(f"Model loaded on {engine.device} in {seconds:.1f}s (not in the timings below)\n")
        for title, query in DEMO_QUERIES:
            print(f"-- {title}\n{query}\n")
            start = time.perf_counter()
            _print_relation(con.sql(query))
            print(f"({time.perf_counter() - start:.1f}s)")
            _print_stats(con)
            print()
    return 0


def _save_movies(path: str, num_rows: int | None) -> int:
    import duckdb

    with duckdb.connect(path) as con:
        datasets.movies(con, num_rows)
        counts = [con.sql(f"SELECT COUNT(*) FROM {t}").fetchall()[0][0] for t in datasets.TABLES]
    tables = ", ".join(f"{t} ({n} rows)" for t, n in zip(datasets.TABLES, counts, strict=True))
    print(f"Wrote {tables} to {path}")
    return 0


def _read_movies(num_rows: int) -> dict[str, pa.Table]:
    """The first `num_rows` rated movies: what `generate` and the benchmarks read."""
    return datasets.read_movies(num_rows, rated_only=True)


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
    if isinstance(value, bool | int | float | list | dict):  # true / false, structs as JSON
        text = json.dumps(value, default=str)
    else:
        text = str(value)  # strings, dates, decimals
    text = text.replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _print_stats(con) -> None:
    for s in con.last_stats:
        print(
            f"  {s.site}: {s.num_rows} rows -> {s.num_requests} prompts, "
            f"{s.num_cache_hits} from the result cache, {s.num_sent} to the engine; "
            f"{s.num_prompt_tokens} prompt tokens ({s.num_cached_tokens} prefix-cached), "
            f"{s.num_generated_tokens} generated"
            + (f", {s.tokens_per_s:.0f} tokens/s" if s.num_sent else "")
        )
    if con.last_fallback:
        print(f"  (ran per chunk: {con.last_fallback})")


if __name__ == "__main__":
    sys.exit(main())
