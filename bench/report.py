"""The README's results table, generated from the result files of the benchmarks
(bench/results/<name>.json, written by `_common.write_result`), never typed by hand.

    python bench/report.py            # rewrite the table in README.md (between the markers)
    python bench/report.py --print    # print it only
    python bench/report.py --check    # exit 1 if README.md's table is not what the files say

One row per headline number of each result file, with its target (if any) marked met or
not met, and under the table the command, date, commit and machine of each file.
"""

from __future__ import annotations

import argparse
import json
import operator
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR.parent / "README.md"
START, END = "<!-- bench-results:start -->", "<!-- bench-results:end -->"
OPERATORS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt,
             "<": operator.lt}  # fmt: skip


def load_results(folder: Path = RESULTS_DIR) -> list[dict]:
    """Every result file in `folder`, by name; a file that is not a result is an error."""
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        missing = {"name", "headline", "command", "date", "git_commit", "machine"} - set(record)
        if missing:
            raise ValueError(f"{path}: not a benchmark result, missing {sorted(missing)}")
        records.append(record)
    return records


def target_met(value, target: str, headline: dict | None = None) -> bool:
    """Whether `value` meets `target`: "<op> <value>", the value a number, true / false, or
    a product of numbers and other headline metrics ("0.95 * recall_a").

    >>> target_met(True, "== true"), target_met(0.8, ">= 0.85")
    (True, False)
    >>> target_met(0.93, ">= 0.95 * recall_a", {"recall_a": 0.97})
    True
    """
    op, _, wanted = target.strip().partition(" ")
    if op not in OPERATORS:
        raise ValueError(f"target {target!r}: expected '<op> <value>', op one of {list(OPERATORS)}")
    expected = _target_value(wanted.strip(), headline or {}, target)
    if not isinstance(value, bool | int | float):  # e.g. "skipped (...)"
        return False
    return OPERATORS[op](value, expected)


def render_table(records: list[dict]) -> str:
    """The markdown table (and the run details under it) of `records`."""
    if not records:
        return "_No results yet: run the benchmarks (see above), then `python bench/report.py`._"
    lines = ["| benchmark | metric | value | target |", "|---|---|---|---|"]
    for record in records:
        targets = record.get("targets", {})
        for i, (metric, value) in enumerate(record["headline"].items()):
            name = f"`{record['name']}`" if i == 0 else ""
            target = targets.get(metric)
            verdict = ""
            if target is not None:
                met = target_met(value, target, record["headline"])
                verdict = f"{target} " + ("met" if met else "**not met**")
            lines.append(f"| {name} | {metric} | {_format(value)} | {verdict} |")
    lines.append("")
    for record in records:
        lines.append(f"- `{record['name']}`: `{record['command']}`; {_provenance(record)}")
    return "\n".join(lines)


def replace_block(text: str, table: str) -> str:
    """`text` with the part between the START and END markers replaced by `table`."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"README.md has no {START} ... {END} block")
    return text[: start + len(START)] + "\n" + table + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print the table only")
    mode.add_argument("--check", action="store_true", help="exit 1 if README.md is stale")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    table = render_table(load_results(args.results_dir))
    if args.print:
        print(table)
        return 0
    text = args.readme.read_text()
    updated = replace_block(text, table)
    if args.check:
        if updated != text:
            print(f"{args.readme}: results table is stale; run python bench/report.py")
            return 1
        return 0
    if updated != text:
        args.readme.write_text(updated)
    print(f"{args.readme}: results table from {args.results_dir}")
    return 0


def _target_value(text: str, headline: dict, target: str):
    flag = {"true": True, "false": False}.get(text.lower())
    if flag is not None:
        return flag
    product = 1.0
    for factor in text.split("*"):
        factor = factor.strip()
        try:
            product *= float(factor)
        except ValueError:
            if not isinstance(headline.get(factor), int | float):
                raise ValueError(
                    f"target {target!r}: {factor!r} is neither a number nor a numeric headline "
                    "metric"
                ) from None
            product *= headline[factor]
    return product


def _format(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _provenance(record: dict) -> str:
    m = record["machine"]
    where = f"{m.get('cpu', '?')}, {m.get('num_cores', '?')} cores"
    if m.get("gpu"):
        where += f", {m['gpu']}"
    return (
        f"{record['date'][:10]}, commit {record['git_commit'][:7]}"
        + (" (uncommitted changes)" if record["git_commit"].endswith("-dirty") else "")
        + f", {where}"
    )


if __name__ == "__main__":
    sys.exit(main())
