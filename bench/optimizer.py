"""Optimizer benchmark on movies.db: prefix hit rate of the original order, the default plan
(row order), GGR and the optimum, dedup ratio and solver time, side by side in one process.

    python bench/optimizer.py [--samples 5] [--sample-rows 200]

Tables: (1) movies with 8 fields; (2) one row per (movie, cast member), from splitting `Cast`,
with the actor as the first field (`llm(q, actor, title, ...)`): the adversarial order, where
the unique field comes first and hides the movie fields' repeats from a fixed field order;
(3) the same rows in the order a user would write (`llm(q, title, ..., actor)`: title
first, the cast member last). Each table's prompts in three plans: "original" (row and field
order as given, no dedup), "default" (what `llmudf.Config()` does: dedup + row order, fields
as written) and "ggr" (also field reordering, off by default: `Config(reorder_fields=True)`).
PHR counts the rendered prompt (system prompt, chat template, instruction, fields) in tokens
of the default model's tokenizer when it loads, else characters; "PHR chars" is the same in
characters, "prev-only" compares each prompt with the previous one only (a one-entry cache:
row order matters), "user msg" counts the user message alone (instruction + fields, no
system prompt or template) in characters.

The optimum on 200-row samples: the exact search (`exact_optimum`) finishes only on small or
nested samples; where it passes its budget, the per-row chain upper bound stands in for the
optimum, so the reported ratio is then a lower bound on GGR / optimum. Exact ratios on
20-row samples, where the search always finishes, are reported beside it.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
from _common import write_result

from llmudf.calls.config import Config
from llmudf.calls.prompt import ChatPrompt
from llmudf.optimizer import PlanOptions, plan_call, prefix_hit_rate
from llmudf.optimizer.encode import encode, group_fields
from llmudf.optimizer.exact import SearchTooLarge, exact_orders, upper_bound
from llmudf.optimizer.ggr import GGRConfig, best_orders, ggr_orders, shared_line_chars
from llmudf.optimizer.plan import unique_row_map
from llmudf.runtime import paths

INSTRUCTION = "Is this movie suitable for young children? Answer yes or no."
MOVIE_FIELDS = ["title", "year", "genre", "director", "writer", "language", "country", "rating"]
ORIGINAL = PlanOptions(dedup=False, reorder_fields=False, reorder_rows=False)
DEFAULT = PlanOptions.from_config(Config())  # what a user gets without asking
PLANS = {"original": ORIGINAL, "default": DEFAULT, "ggr": PlanOptions()}


def load_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    con = sqlite3.connect(paths.movies_db())
    df = pd.read_sql(
        "SELECT Title AS title, Year AS year, Genre AS genre, Director AS director, "
        "Writer AS writer, Language AS language, Country AS country, Rating AS rating, "
        "[Cast] AS cast_list FROM omdb ORDER BY ID",
        con,
    )
    movies = df[MOVIE_FIELDS]
    cast = df.assign(actor=df["cast_list"].str.split(", ")).explode("actor")
    cast = cast[cast["actor"].notna() & (cast["actor"] != "")]
    cast = cast.reset_index(drop=True)
    return movies, cast[["actor", *MOVIE_FIELDS]], cast[[*MOVIE_FIELDS, "actor"]]


def load_renderer():
    """(render, tokenize, unit): the default model's chat template and tokenizer, or chars."""
    try:
        from llmudf.engine.tokenizer import Tokenizer
        from llmudf.engine.weights import resolve_model_dir

        tok = Tokenizer.from_dir(resolve_model_dir(None))
    except Exception as err:  # noqa: BLE001 -- any failure means: measure characters
        print(f"tokenizer unavailable ({err}); PHR in characters of the user message")
        return None, None, "chars"
    head, tail = tok.apply_chat_template(ChatPrompt("\x00").messages()).split("\x00")
    check = ChatPrompt(f"{INSTRUCTION}\n\nt: x")
    assert tok.apply_chat_template(check.messages()) == head + check.user + tail
    return (lambda user: head + user + tail), tok.encode_batch, "tokens"


def phr_table(name, df, render, tokenize, unit) -> dict:
    rows = {}
    for label, options in PLANS.items():
        plan = plan_call(INSTRUCTION, df, options)
        rows[label] = {
            "phr": prefix_hit_rate(plan.prompts, tokenize, render),
            "phr_chars": prefix_hit_rate(plan.prompts, render=render),
            "phr_prev_only": prefix_hit_rate(plan.prompts, render=render, window=1),
            "phr_user": prefix_hit_rate(plan.prompts),
            "requests": plan.num_requests,
            "solver_s": plan.solver_seconds,
        }
    base = rows["original"]["phr"]
    print(f"\n== {name}: {len(df)} rows x {df.shape[1]} fields, PHR in {unit} ==")
    print(
        f"{'order':<10}{'PHR':>8}{'PHR chars':>11}{'prev-only':>11}{'user msg':>10}"
        f"{'requests':>10}{'x orig':>8}"
    )
    for label, r in rows.items():
        print(
            f"{label:<10}{r['phr']:>8.3f}{r['phr_chars']:>11.3f}{r['phr_prev_only']:>11.3f}"
            f"{r['phr_user']:>10.3f}{r['requests']:>10}{r['phr'] / base:>8.2f}"
        )
    print(
        f"dedup ratio {len(df) / rows['ggr']['requests']:.3f}; "
        f"GGR plan solver {rows['ggr']['solver_s']:.3f} s on the full table"
    )
    return rows


def optimum_ratios(df, render, num_samples, sample_rows, max_states) -> dict:
    """Worst GGR / optimum over samples: fields only, and rendered prompt (chars)."""
    head = (
        len(render(f"{INSTRUCTION}\n\n\x00").split("\x00")[0]) if render else (len(INSTRUCTION) + 2)
    )
    worst_fields, worst_rendered, num_exact = 1.0, 1.0, 0
    for seed in range(num_samples):
        sample = df.sample(sample_rows, random_state=seed)
        table = encode(pa.Table.from_pandas(sample, preserve_index=False))
        unique, _ = unique_row_map(table.codes)
        groups = group_fields(table.take(unique))
        greedy = shared_line_chars(
            groups.codes, groups.weights, best_orders(groups.codes, groups.weights)
        )
        try:
            _, best = exact_orders(groups.codes, groups.weights, max_states)
            num_exact += 1
        except SearchTooLarge:
            best = upper_bound(groups.codes, groups.weights)
        shared_head = head * (len(unique) - 1)
        worst_fields = min(worst_fields, greedy / best if best else 1.0)
        worst_rendered = min(worst_rendered, (shared_head + greedy) / (shared_head + best))
    return {
        "fields": worst_fields,
        "rendered": worst_rendered,
        "exact": num_exact,
        "samples": num_samples,
    }


def versus_paper_score(df: pd.DataFrame) -> float:
    """Shared whole-line characters of our plan's orders over GGR with the paper's len**2
    score alone (ours tries len and len**2 and the given order, and keeps the best)."""
    table = encode(pa.Table.from_pandas(df, preserve_index=False))
    unique, _ = unique_row_map(table.codes)
    groups = group_fields(table.take(unique))
    ours = best_orders(groups.codes, groups.weights)
    paper = ggr_orders(groups.codes, groups.weights, GGRConfig(score_power=2.0))
    return shared_line_chars(groups.codes, groups.weights, ours) / shared_line_chars(
        groups.codes, groups.weights, paper
    )


def solver_scaling(cast: pd.DataFrame) -> dict:
    """GGR solver seconds on n rows x 8 fields of table 2 (best of 3)."""
    fields = cast[["actor", *MOVIE_FIELDS[:-1]]]
    out = {}
    for n in (7_500, 15_000, 30_000, 60_000, 120_000):
        table = pa.Table.from_pandas(fields.sample(n, random_state=0), preserve_index=False)
        out[n] = min(plan_call(INSTRUCTION, table).solver_seconds for _ in range(3))
    print("\n== GGR solver time, table 2 sample x 8 fields ==")
    for n, s in out.items():
        print(
            f"{n:>8} rows {s:8.3f} s   ({s / out[7_500]:.2f}x the 7.5k time, "
            f"{n / 7_500:.0f}x the rows)"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--sample-rows", type=int, default=200)
    parser.add_argument("--max-states", type=int, default=2_000)
    parser.add_argument("--results-dir", type=Path, default=None, help="default bench/results")
    args = parser.parse_args()
    movies, cast, cast_user = load_tables()
    render, tokenize, unit = load_renderer()
    t1 = phr_table("table 1: movies", movies, render, tokenize, unit)
    t2 = phr_table("table 2: movie x cast member, actor first", cast, render, tokenize, unit)
    t3 = phr_table("table 3: movie x cast member, title first", cast_user, render, tokenize, unit)
    print(f"\n== GGR vs optimum: worst of {args.samples} samples ==")
    ratios = {}
    for name, df in (("movies", movies), ("cast", cast)):
        for rows, budget in ((20, 200_000), (args.sample_rows, args.max_states)):
            start = time.perf_counter()
            r = optimum_ratios(df, render, args.samples, rows, budget)
            ratios[(name, rows)] = r
            kind = "exact" if r["exact"] == r["samples"] else f"{r['exact']} exact, rest bound"
            print(
                f"{name:<7}{rows:>4} rows: GGR/opt fields {r['fields']:.3f}, rendered prompt "
                f"{r['rendered']:.3f} ({kind}; {time.perf_counter() - start:.1f} s)"
            )
    paper = {name: versus_paper_score(df) for name, df in (("movies", movies), ("cast", cast))}
    print(
        f"\nshared line chars, len*(count-1) score over the paper's len**2*(count-1): "
        f"movies {paper['movies']:.3f}x, cast {paper['cast']:.3f}x"
    )
    scaling = solver_scaling(cast)
    big = [ratios[("movies", args.sample_rows)], ratios[("cast", args.sample_rows)]]
    small = [ratios[("movies", 20)], ratios[("cast", 20)]]
    tables = {"movies": t1, "cast_actor_first": t2, "cast_title_first": t3}
    result = {
        "phr_unit": unit,
        "default_plan": {
            "dedup": DEFAULT.dedup,
            "reorder_rows": DEFAULT.reorder_rows,
            "reorder_fields": DEFAULT.reorder_fields,
        },
        "phr": {
            name: {plan: round(row["phr"], 4) for plan, row in t.items()}
            for name, t in tables.items()
        },
        "phr_user_message_chars": {
            name: {plan: round(row["phr_user"], 4) for plan, row in t.items()}
            for name, t in tables.items()
        },
        "requests": {name: {p: r["requests"] for p, r in t.items()} for name, t in tables.items()},
        "ggr_over_optimum": round(min(r["rendered"] for r in big), 4),
        "ggr_over_optimum_is_lower_bound": any(r["exact"] < r["samples"] for r in big),
        "ggr_over_optimum_fields_only": round(min(r["fields"] for r in big), 4),
        "ggr_over_optimum_exact_20rows_fields_only": round(min(r["fields"] for r in small), 4),
        "dedup_ratio_cast": round(len(cast) / t2["ggr"]["requests"], 4),
        "ggr_over_paper_score_movies": round(paper["movies"], 4),
        "ggr_over_paper_score_cast": round(paper["cast"], 4),
        "solver_s_30k": round(scaling[30_000], 4),
        "solver_s_120k_over_30k": round(scaling[120_000] / scaling[30_000], 3),
        "solver_s_full_cast": round(t2["ggr"]["solver_s"], 3),
    }
    headline = {
        f"phr_{name}_{plan}": result["phr"][name][plan]
        for name in ("cast_title_first", "cast_actor_first", "movies")
        for plan in ("original", "default", "ggr")
    }
    headline |= {
        k: result[k] for k in ("ggr_over_optimum", "solver_s_30k", "solver_s_120k_over_30k")
    }
    print(json.dumps(headline))
    write_result("optimizer", result, headline=headline, results_dir=args.results_dir)


if __name__ == "__main__":
    main()
