"""EXPLAIN of an LLM query: per call site, the rows it sees before and after dedup, the
estimated prompt and prefix-cached tokens, the field order chosen, what ran below it, and
the prompt work of three ways to send its prompts (`LLMExplain.plot()` draws them).

>>> import pyarrow as pa
>>> from llmudf.optimizer.plan import plan_call
>>> plan = plan_call("Q", pa.table({"a": ["x", "x", "y"]}))
>>> info = explain_call("llm #1 in SELECT", "Q", plan, pushed=["filter year > 2000"])
>>> info.num_rows, info.num_requests, info.field_order
(3, 2, ('a',))
>>> [(s.name, s.num_prompts, s.computed_units) for s in info.strategies]
[('original order', 3, 8), ('dedup', 2, 8), ('dedup + GGR order', 2, 8)]
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import numpy as np

from llmudf.optimizer.blocking import BlockingSummary
from llmudf.optimizer.metrics import Render, Tokenize, estimate_cost, prefix_hits

STRATEGIES = ("original order", "dedup", "dedup + GGR order")


@dataclass(frozen=True, slots=True)
class StrategyCost:
    """Prompt work of one way to send a call's prompts, with a prefix cache that keeps only
    the previous prompt: the cache under which send order matters (with an unbounded cache,
    any order of the same distinct prompts computes the same units)."""

    name: str  # one of STRATEGIES
    num_prompts: int
    prompt_units: int
    cached_units: int  # shared with the prompt sent just before

    @property
    def computed_units(self) -> int:
        return self.prompt_units - self.cached_units

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_units / self.prompt_units if self.prompt_units else 0.0


@dataclass(frozen=True, slots=True)
class CallSiteExplain:
    site: str  # "llm_filter #1 in WHERE"
    instruction: str
    num_rows: int  # rows the call sees (an upper bound below an earlier LLM filter)
    num_requests: int  # distinct prompts after dedup
    prompt_units: int  # prompt size of the requests, in `unit`s
    cached_units: int  # of which an (unbounded) prefix cache would reuse
    unit: str  # "tokens" (the model's tokenizer, chat template included) or "chars"
    field_order: tuple[str, ...]  # the most common field order of the requests
    pushed: tuple[str, ...]  # filters / joins / limit run before the call
    strategies: tuple[StrategyCost, ...] = ()  # in STRATEGIES order
    # (computed prompt tokens + new tokens) / the engine's measured speed; None before the
    # engine has run (no speed to go by) or when counting characters
    estimated_seconds: float | None = None
    # a semantic join: pairs in the cross product, candidates after blocking, estimated recall
    blocking: BlockingSummary | None = None
    # llm_reduce: groups, rows, and prompts per level of the hierarchy
    hierarchy: str | None = None

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_units / self.prompt_units if self.prompt_units else 0.0

    @property
    def estimate(self) -> str:
        return "unknown" if self.estimated_seconds is None else f"~{self.estimated_seconds:.1f} s"


@dataclass(frozen=True, slots=True)
class LLMExplain:
    """EXPLAIN of one query; `str()` gives a readable report, a notebook shows an HTML table,
    `plot()` draws the units each call site computes per strategy."""

    sql: str  # the rewritten query
    sites: tuple[CallSiteExplain, ...]

    def __str__(self) -> str:
        lines = []
        for s in self.sites:
            lines += [
                f"{s.site}: {s.instruction!r}",
                f"  rows {s.num_rows} -> {s.num_requests} prompts after dedup",
                f"  prompt {s.unit} {s.prompt_units}, prefix-cached {s.cached_units} "
                f"(PHR {s.prefix_hit_rate:.0%})",
                f"  field order: {', '.join(s.field_order) or '(none)'}",
                f"  below the LLM: {'; '.join(s.pushed) or '(nothing)'}",
                f"  estimated time: {s.estimate}",
            ]
            if s.blocking is not None:
                lines.append(f"  semantic join: {s.blocking}")
            if s.hierarchy is not None:
                lines.append(f"  llm_reduce: {s.hierarchy}")
        if self.sql:  # a DataFrame call has no SQL
            lines.append(f"rewritten SQL: {self.sql}")
        return "\n".join(lines)

    def _repr_pretty_(self, printer, cycle: bool) -> None:  # IPython's text display
        printer.text(str(self))

    def _repr_html_(self) -> str:
        sites = [
            (
                s.site,
                s.instruction,
                s.num_rows,
                s.num_requests,
                f"{s.prompt_units:,} {s.unit}",
                f"{s.cached_units:,} {s.unit}",
                f"{s.prefix_hit_rate:.0%}",
                ", ".join(s.field_order) or "(none)",
                "; ".join(s.pushed) or "(nothing)",
                s.estimate,
            )
            for s in self.sites
        ]
        strategies = [
            (
                s.site,
                c.name,
                c.num_prompts,
                f"{c.computed_units:,} {s.unit}",
                f"{c.prefix_hit_rate:.0%}",
            )
            for s in self.sites
            for c in s.strategies
        ]
        parts = [html_table(_SITE_COLUMNS, sites)]
        if strategies:
            parts += [
                "<p>Computed per strategy (a cache of the previous prompt only):</p>",
                html_table(_STRATEGY_COLUMNS, strategies),
            ]
        if self.sql:
            parts.append(
                f"<details><summary>rewritten SQL</summary><pre>{escape(self.sql)}</pre></details>"
            )
        return "\n".join(parts)

    def plot(self):
        """A matplotlib Figure: per call site, the prompt units computed when sending every
        row in its original order, only the distinct prompts, and the distinct prompts in
        GGR order (what llmudf does), each bar labelled with its prefix hit rate.

        >>> con.explain_llm("SELECT llm('Genre?', title) FROM movies").plot()  # doctest: +SKIP
        """
        import matplotlib.pyplot as plt

        sites = [s for s in self.sites if s.strategies]
        if not sites:
            raise ValueError("nothing to plot: the query has no LLM call site")
        fig, axes = plt.subplots(
            1, len(sites), figsize=(1 + 3.6 * len(sites), 3.4), squeeze=False, layout="constrained"
        )
        for ax, site in zip(axes[0], sites, strict=True):
            names = [textwrap.fill(c.name, 10) for c in site.strategies]
            bars = ax.bar(names, [c.computed_units for c in site.strategies], color=_COLORS)
            labels = [f"PHR {c.prefix_hit_rate:.0%}" for c in site.strategies]
            ax.bar_label(bars, labels, padding=2, fontsize="small")
            ax.set_title(textwrap.shorten(site.site, 40), fontsize="medium")
            ax.set_ylabel(f"prompt {site.unit} computed")
            ax.margins(y=0.15)
        # not left open in pyplot: a notebook shows the returned figure once, a script's
        # later plt.show() does not pop it up
        plt.close(fig)
        return fig


def explain_call(
    site: str,
    instruction: str,
    plan,
    pushed=(),
    tokenize: Tokenize | None = None,
    render: Render | None = None,
    num_rows: int | None = None,
    row_counts: Sequence[int] | None = None,
    tokens_per_s: float | None = None,
    new_tokens: int = 0,
    blocking: BlockingSummary | None = None,
) -> CallSiteExplain:
    """EXPLAIN data of one planned call site (`plan`: an optimizer CallPlan); `num_rows`:
    the rows behind the plan's input when that input was already made distinct in SQL, and
    `row_counts[i]` how many of them input row i stands for (for the "original order"
    strategy; their order is unknown then, so it assumes a seeded random order).
    `tokens_per_s`: the engine's measured forward speed, and `new_tokens` the most tokens
    each prompt generates, for the time estimate. `blocking`: a semantic join's pairs."""
    tokenize, render = _once(plan.prompts, tokenize, render)
    cost = estimate_cost(plan, tokenize, render)
    orders = Counter(plan.field_orders)
    order = orders.most_common(1)[0][0] if orders else ()
    if num_rows is None:
        num_rows = plan.num_rows if row_counts is None else int(np.sum(row_counts))
    seconds = None
    if tokens_per_s and cost.unit == "tokens":
        computed = cost.prompt_units - cost.cached_units + plan.num_requests * new_tokens
        seconds = computed / tokens_per_s
    return CallSiteExplain(
        site=site,
        instruction=instruction,
        num_rows=num_rows,
        num_requests=plan.num_requests,
        prompt_units=cost.prompt_units,
        cached_units=cost.cached_units,
        unit=cost.unit,
        field_order=tuple(order),
        pushed=tuple(pushed),
        strategies=strategy_costs(plan, tokenize, render, row_counts),
        estimated_seconds=seconds,
        blocking=blocking,
    )


def strategy_costs(
    plan,
    tokenize: Tokenize | None = None,
    render: Render | None = None,
    row_counts: Sequence[int] | None = None,
) -> tuple[StrategyCost, ...]:
    """Units of the STRATEGIES for one plan, counted as `prefix_hits(..., window=1)` does:
    (1) every input row's prompt, in input order; (2) the distinct prompts, in order of first
    appearance; (3) the plan's requests in send order (dedup + GGR order by default).
    All three use the plan's prompt texts (so its field order)."""
    tokenize, render = _once(plan.prompts, tokenize, render)
    texts = list(dict.fromkeys(plan.prompts))
    index = {t: i for i, t in enumerate(texts)}
    text_of_request = np.fromiter((index[p] for p in plan.prompts), np.int64, plan.num_requests)
    per_row = text_of_request[plan.row_to_request[_input_rows(plan.num_rows, row_counts)]]
    first_seen = np.sort(np.unique(per_row, return_index=True)[1])
    sequences = (per_row, per_row[first_seen], text_of_request)
    lengths, cached = _consecutive_hits(texts, sequences, tokenize, render)
    return tuple(
        StrategyCost(name, len(seq), int(lengths[seq].sum()), cached(seq))
        for name, seq in zip(STRATEGIES, sequences, strict=True)
    )


def html_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """An HTML table of escaped cells; ints get thousands separators."""

    def cell(value) -> str:
        text = (
            f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        )
        return escape(text)

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---- private helpers -------------------------------------------------------------------

_COLORS = ("#9e9e9e", "#6a9fd4", "#2e7d32")  # one per strategy
_SITE_COLUMNS = (
    "call site",
    "instruction",
    "rows",
    "prompts after dedup",
    "prompt (estimate)",
    "prefix-cached",
    "prefix hit rate",
    "field order",
    "below the LLM",
    "estimated time",
)
_STRATEGY_COLUMNS = ("call site", "strategy", "prompts", "computed", "prefix hit rate")


def _input_rows(num_rows: int, row_counts: Sequence[int] | None) -> np.ndarray:
    """The plan's input rows as the table held them: each once, in order; or, for an input
    made distinct in SQL, row i `row_counts[i]` times in a seeded random order."""
    if row_counts is None:
        return np.arange(num_rows)
    counts = np.asarray(row_counts, np.int64)
    if counts.shape != (num_rows,) or (counts < 0).any():
        raise ValueError(f"row_counts must be {num_rows} counts >= 0, got {counts.shape}")
    return np.random.default_rng(0).permutation(np.repeat(np.arange(num_rows), counts))


def _once(prompts: list[str], tokenize: Tokenize | None, render: Render | None):
    """(tokenize, render) that look up each distinct prompt's text and tokens, computed once
    (the chat template and the tokenizer are most of EXPLAIN's time)."""
    texts = list(dict.fromkeys(prompts))
    if render is not None:
        render = dict(zip(texts, map(render, texts), strict=True)).__getitem__
    if tokenize is not None:
        rendered = list(map(render, texts)) if render is not None else texts
        ids = dict(zip(rendered, tokenize(rendered), strict=True))

        def tokenize_once(batch: list[str]) -> list[list[int]]:
            return [ids[t] for t in batch]

        return tokenize_once, render
    return None, render


def _consecutive_hits(texts: list[str], sequences, tokenize, render):
    """(units per text: [num_texts], sequence -> units each prompt shares with the one sent
    before it). Each distinct pair of neighbours is measured once, by `prefix_hits` over
    the pair."""
    num_texts = len(texts)
    rendered = list(map(render, texts)) if render is not None else texts
    pairs = np.unique(np.concatenate([s[:-1] * num_texts + s[1:] for s in sequences]))
    pair_texts = [rendered[i] for p in pairs.tolist() for i in divmod(p, num_texts)]
    hits, lengths = prefix_hits(rendered + pair_texts, tokenize, window=1)
    pair_hits = hits[num_texts + 1 :: 2]  # the second prompt of each pair, after the first

    def cached(seq: np.ndarray) -> int:
        if len(seq) < 2:
            return 0
        return int(pair_hits[np.searchsorted(pairs, seq[:-1] * num_texts + seq[1:])].sum())

    return lengths[:num_texts], cached
