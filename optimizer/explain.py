"""EXPLAIN of an LLM query: per call site, the rows it sees before and after dedup, the
estimated prompt and prefix-cached tokens, the field order chosen, and what ran below it.

>>> import pyarrow as pa
>>> from llmudf.optimizer.plan import plan_call
>>> plan = plan_call("Q", pa.table({"a": ["x", "x", "y"]}))
>>> info = explain_call("llm #1 in SELECT", "Q", plan, pushed=["filter year > 2000"])
>>> info.num_rows, info.num_requests, info.field_order
(3, 2, ('a',))
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from llmudf.optimizer.metrics import Render, Tokenize, estimate_cost


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

    @property
    def prefix_hit_rate(self) -> float:
        return self.cached_units / self.prompt_units if self.prompt_units else 0.0


@dataclass(frozen=True, slots=True)
class LLMExplain:
    """EXPLAIN of one query; `str()` gives a readable report."""

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
            ]
        lines.append(f"rewritten SQL: {self.sql}")
        return "\n".join(lines)


def explain_call(
    site: str,
    instruction: str,
    plan,
    pushed=(),
    tokenize: Tokenize | None = None,
    render: Render | None = None,
    num_rows: int | None = None,
) -> CallSiteExplain:
    """EXPLAIN data of one planned call site (`plan`: an optimizer CallPlan); `num_rows`:
    the rows behind the plan's input when that input was already made distinct in SQL."""
    cost = estimate_cost(plan, tokenize, render)
    orders = Counter(plan.field_orders)
    order = orders.most_common(1)[0][0] if orders else ()
    return CallSiteExplain(
        site=site,
        instruction=instruction,
        num_rows=plan.num_rows if num_rows is None else num_rows,
        num_requests=plan.num_requests,
        prompt_units=cost.prompt_units,
        cached_units=cost.cached_units,
        unit=cost.unit,
        field_order=tuple(order),
        pushed=tuple(pushed),
    )
