"""`llm_reduce(instruction, field, ...)`: the LLM aggregate, one answer per group of rows.

A group's rows enter the prompt as blocks of `name: value` lines (NULL fields left out, a
row of only NULLs left out), sorted by their text, so the prompt depends on the group's
content only, never on the plan or the partitioning. A group too large for one prompt is
answered in parts (`part_prompt`), whose answers are combined (`combine_prompt`), level by
level, until one answer remains.

>>> rows = sorted(render_row([("title", t)]) for t in ["Up", "Heat"])
>>> print(leaf_prompt("What do they share?", rows))
What do they share?
<BLANKLINE>
Rows:
<BLANKLINE>
title: Heat
<BLANKLINE>
title: Up
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import pyarrow as pa

from llmudf.calls.functions import CallSpec, FunctionSpec, bind_call
from llmudf.calls.prompt import render_fields

__all__ = [
    "REDUCE",
    "bind_reduce",
    "combine_prompt",
    "leaf_prompt",
    "part_prompt",
    "reduce_spec",
    "render_row",
]

REDUCE = FunctionSpec("llm_reduce", "VARCHAR", pa.string(), None, "")
_ROWS = "Rows:"
_PART = (
    "These rows are one part of a larger group; answer for them alone: the answers of all "
    "the parts are combined afterwards."
)
_COMBINE = (
    "The group's rows were too many for one prompt, so they were answered in parts. "
    "Combine the answers of the parts below into one answer."
)


def bind_reduce(options: dict | None = None, site: str = "llm_reduce") -> CallSpec:
    """A checked llm_reduce call site: its options are those of `llm` (LLMCallError naming
    `site` for a bad one); it decodes free text, as `llm` does."""
    return reduce_spec(bind_call("llm", None, options, site))


def reduce_spec(spec: CallSpec) -> CallSpec:
    """An `llm` call's spec (options, site) as the spec of an llm_reduce call."""
    return replace(spec, function=REDUCE)


def render_row(fields: Iterable[tuple[str, object]]) -> str:
    """One row as `name: value` lines ('' when every field is NULL)."""
    return render_fields(fields)


def leaf_prompt(instruction: str, rows: list[str]) -> str:
    """The prompt of a group that fits in one: the instruction, then its rows."""
    return f"{instruction}\n\n{_ROWS}\n\n" + "\n\n".join(rows)


def part_prompt(instruction: str, rows: list[str]) -> str:
    """The prompt of one part of a group too large for one prompt."""
    return f"{instruction}\n\n{_PART}\n\n{_ROWS}\n\n" + "\n\n".join(rows)


def combine_prompt(instruction: str, answers: list[str]) -> str:
    """The prompt that combines the answers of consecutive parts (a summary of summaries)."""
    parts = [f"Answer of part {i}:\n{a}" for i, a in enumerate(answers, 1)]
    return f"{instruction}\n\n{_COMBINE}\n\n" + "\n\n".join(parts)
