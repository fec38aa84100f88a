"""Running `llm_reduce`: every group of a batch answered together, one client batch per
level of the hierarchy.

Level 0 asks, for every group, the prompts of its rows (in content order, packed into as
few prompts as the context allows); a group that fit in one prompt has its answer. The
others go up a level with their parts' answers, which are packed and combined the same way,
until each group has one answer. Identical prompts are asked once, and the result cache
answers those asked before.

The context: the in-process engine's own length; else `engine={'max_model_len': n}`, the
model folder's `max_position_embeddings`, or `DEFAULT_CONTEXT` for an OpenAI-compatible
endpoint. `max_tokens` of it are kept for the answer. Tokens are counted with the model's
tokenizer and chat template (UTF-8 bytes, an overestimate, when there is none).

>>> spec = bind_reduce(site="llm_reduce #1")
>>> groups = [pa.table({"title": ["Up", "Heat"]}), pa.table({"title": ["Alien"]})]
>>> result = run_reduce(spec, "What do they share?", groups, Config(), client)  # doctest: +SKIP
>>> result.answers, result.num_levels                                      # doctest: +SKIP
(['...', '...'], 1)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.calls.functions import CallSpec, LLMCallError
from llmudf.calls.prompt import ChatPrompt
from llmudf.calls.reduce import (
    bind_reduce,
    combine_prompt,
    leaf_prompt,
    part_prompt,
    reduce_spec,
    render_row,
)
from llmudf.optimizer.reduce import order_rows, pack, split_to_fit
from llmudf.runtime.cache import ResultCache
from llmudf.runtime.chunk_call import bind_chunk
from llmudf.runtime.client import EngineClient, explain_tokenizer, get_client
from llmudf.runtime.executor import CallStats, answer_prompts

__all__ = [
    "DEFAULT_CONTEXT",
    "ReduceBatch",
    "ReducePlan",
    "ReduceResult",
    "bind_lists",
    "context_length",
    "group_rows",
    "plan_reduce",
    "reduce_lists",
    "run_reduce",
]

DEFAULT_CONTEXT = 4096  # an OpenAI-compatible endpoint does not say its context length


@dataclass(slots=True)
class ReduceResult:
    answers: list[str | None]  # one per group; None: a NULL instruction or no non-NULL row
    stats: CallStats
    num_levels: int  # client batches: 1 when every group fit in one prompt


def run_reduce(
    spec: CallSpec,
    instruction: str | Sequence[str | None],
    groups: Sequence[pa.Table],
    config: Config,
    client: EngineClient,
    cache: ResultCache | None = None,
    context: int | None = None,
) -> ReduceResult:
    """One answer per group (a table of its rows, one column per field). `instruction`: one
    for all groups or one per group. `context`: the model's context length in tokens
    (default: `context_length`)."""
    start = time.perf_counter()
    config = spec.config(config)
    site = spec.site or spec.function.name
    instructions = [instruction] * len(groups) if isinstance(instruction, str) else instruction
    stats = CallStats(site, num_rows=sum(g.num_rows for g in groups))
    items = {}  # group -> the texts it still has to reduce: rows, then parts' answers
    for g, (text, rows) in enumerate(zip(instructions, groups, strict=True)):
        texts = order_rows(group_rows(rows))
        if text is not None and texts:
            items[g] = texts
    answers: list[str | None] = [None] * len(groups)
    level = 0
    if items:
        context = context or context_length(config, client)
        limit = context - spec.max_new_tokens(config)
        count = _TokenCounter(config)
    while items:
        prompts: dict[str, int] = {}  # prompt -> its position in the batch (asked once)
        asked = {}  # group -> the positions of its prompts
        for g, texts in items.items():
            chunk = _chunks(str(instructions[g]), texts, level, count, limit, context, site)
            asked[g] = [prompts.setdefault(p, len(prompts)) for p in chunk]
        batch = CallStats(site)
        texts = answer_prompts(spec, [ChatPrompt(p) for p in prompts], config, client, cache, batch)
        batch.num_requests = len(prompts)
        stats.add(batch)
        for g, positions in asked.items():
            if len(positions) == 1:
                answers[g] = texts[positions[0]].strip()
                del items[g]
            else:
                items[g] = [texts[p].strip() for p in positions]
        level += 1
    stats.seconds = time.perf_counter() - start
    return ReduceResult(answers, stats, level)


@dataclass(slots=True)
class ReduceBatch:
    """The groups of a UDF chunk, bound: one instruction and one table of rows per group."""

    spec: CallSpec
    instructions: list[str | None]
    groups: list[pa.Table]

    def keys(self) -> list[str]:
        """What each group's answer depends on: instruction, options and rows (in content
        order, so the same for any order of the rows)."""
        options = json.dumps(self.spec.options, default=str)
        return [
            json.dumps([text, options, order_rows(group_rows(rows))])
            for text, rows in zip(self.instructions, self.groups, strict=True)
        ]

    def take(self, positions: list[int]) -> ReduceBatch:
        return ReduceBatch(
            self.spec,
            [self.instructions[i] for i in positions],
            [self.groups[i] for i in positions],
        )


def bind_lists(instructions: pa.Array, lists: pa.Array, site: str) -> ReduceBatch:
    """The groups of a UDF chunk (DuckDB's `list(row(...))`, Spark's `collect_list(struct(...))`):
    one group per row; each list element is a struct whose children are the call's arguments
    after the instruction, read as a per-chunk call's (a struct keeps its keys, a bare value
    is field<i>, a trailing struct of constants may be the options). The options must be the
    same in every group of the chunk."""
    texts = instructions.to_pylist()
    groups, spec = [], None
    for text, rows in zip(texts, lists, strict=True):
        rows = rows.values if rows.is_valid else None
        if rows is None or len(rows) == 0 or text is None:
            groups.append(pa.table({}))
            continue
        args = [pa.array([text] * len(rows), pa.string()), *rows.flatten()]
        call = bind_chunk("llm", args, site)
        if spec is not None and call.spec.options != spec.options:
            raise LLMCallError(f"{site}: the options differ between groups; pass constants")
        spec = call.spec
        groups.append(call.fields)
    spec = reduce_spec(spec) if spec is not None else bind_reduce(site=site)
    return ReduceBatch(spec, texts, groups)


@dataclass(frozen=True, slots=True)
class ReducePlan:
    """What `run_reduce` would ask, for EXPLAIN: the first level exactly, the combines
    estimated with answers of `max_tokens` tokens each."""

    num_groups: int
    num_rows: int
    prompts_per_level: tuple[int, ...]  # () when no group has a row
    prompt_units: int  # the prompts' size, first level exact, combines estimated
    unit: str  # "tokens" (the model's tokenizer and chat template) or "bytes"
    context: int

    def __str__(self) -> str:
        levels = " + ".join(map(str, self.prompts_per_level)) or "0"
        return (
            f"{self.num_groups} groups, {self.num_rows} rows -> {levels} prompts in "
            f"{len(self.prompts_per_level)} level(s) (context {self.context} tokens)"
        )


def plan_reduce(
    spec: CallSpec,
    instruction: str | Sequence[str | None],
    groups: Sequence[pa.Table],
    config: Config,
    client: EngineClient,
    context: int | None = None,
) -> ReducePlan:
    """The prompts `run_reduce` would send, without running the model (nor loading it)."""
    config = spec.config(config)
    site = spec.site or spec.function.name
    instructions = [instruction] * len(groups) if isinstance(instruction, str) else instruction
    context = context or context_length(config, client, load=False)
    answer_tokens = spec.max_new_tokens(config)
    limit = context - answer_tokens
    count = _TokenCounter(config)
    levels: list[int] = []
    units = 0
    for text, rows in zip(instructions, groups, strict=True):
        texts = order_rows(group_rows(rows))
        if text is None or not texts:
            continue
        prompts = _chunks(str(text), texts, 0, count, limit, context, site)
        units += sum(count.prompts(prompts))
        per_level = [len(prompts)]
        overhead = count.prompts([combine_prompt(str(text), [])])[0]
        # an answer in a combine: max_tokens, plus its "Answer of part i:" line
        item = (
            answer_tokens
            + (count.prompts([combine_prompt(str(text), ["", ""])])[0] - overhead) // 2
        )
        while per_level[-1] > 1:
            spans = pack([item] * per_level[-1], overhead, limit)
            if len(spans) == per_level[-1]:
                break  # run_reduce names this error
            units += sum(overhead + item * len(s) for s in spans)
            per_level.append(len(spans))
        levels += [0] * (len(per_level) - len(levels))
        for level, num in enumerate(per_level):
            levels[level] += num
    return ReducePlan(
        sum(1 for g in groups if g.num_rows),
        sum(g.num_rows for g in groups),
        tuple(levels),
        units,
        count.unit,
        context,
    )


def reduce_lists(
    instructions: pa.Array,
    lists: pa.Array,
    config: Config,
    cache: ResultCache | None,
    site: str,
    client_for: Callable[[Config], EngineClient] = get_client,
) -> ReduceResult:
    """Answer the groups of a UDF chunk (see `bind_lists`) together. `client_for(config)`:
    the client of the call's config (options applied)."""
    batch = bind_lists(instructions, lists, site)
    client = client_for(batch.spec.config(config))
    return run_reduce(batch.spec, batch.instructions, batch.groups, config, client, cache)


def group_rows(rows: pa.Table) -> list[str]:
    """The rendered rows of a group's table, in its order."""
    names = rows.column_names
    columns = [rows.column(n).to_pylist() for n in names]
    return [render_row(zip(names, values, strict=True)) for values in zip(*columns, strict=True)]


def context_length(config: Config, client: EngineClient, load: bool = True) -> int:
    """The model's context in tokens: the in-process engine's (built first unless `load` is
    False), else the configured or the model folder's, else DEFAULT_CONTEXT (an
    OpenAI-compatible endpoint)."""
    engine = None
    if hasattr(client, "engine_options"):  # InProcessClient
        engine = client.engine if load else client._engine
    if engine is not None:
        return engine.max_len
    if config.engine.get("max_model_len"):
        return int(config.engine["max_model_len"])
    if config.backend == "openai":
        return DEFAULT_CONTEXT
    try:
        from llmudf.engine.weights import resolve_model_dir

        hf = json.loads((resolve_model_dir(config.model) / "config.json").read_text())
    except (OSError, ValueError):
        return DEFAULT_CONTEXT
    return int(hf.get("max_position_embeddings") or DEFAULT_CONTEXT)


# ---- private ---------------------------------------------------------------------------------


def _chunks(
    instruction: str,
    texts: list[str],
    level: int,
    count: _TokenCounter,
    limit: int,
    context: int,
    site: str,
) -> list[str]:
    """The prompts of one group at `level`: one prompt when its texts fit, else one per
    part (a level up: answers to combine)."""
    if level == 0:
        whole = leaf_prompt(instruction, texts)
        if count.prompts([whole])[0] <= limit:
            return [whole]
        make = part_prompt
    else:
        make = combine_prompt
    overhead = count.prompts([make(instruction, [])])[0]
    costs = count.texts([t + "\n\n" for t in texts])
    spans = pack(costs, overhead, limit)

    def fits(candidates: list[range]) -> list[bool]:
        prompts = [make(instruction, texts[s.start : s.stop]) for s in candidates]
        return [n <= limit for n in count.prompts(prompts)]

    spans, too_long = split_to_fit(spans, fits)
    if too_long:
        what = "a row of a group" if level == 0 else "one part's answer"
        raise LLMCallError(
            f"{site}: {what} does not fit in a prompt: the context of {context} tokens leaves "
            f"{limit} for the prompt once max_tokens are kept for the answer; shorten the "
            "fields, lower max_tokens or use a model with a longer context"
        )
    if level > 0 and len(spans) == len(texts):
        raise LLMCallError(
            f"{site}: the context of {context} tokens holds only one part's answer per prompt "
            "(max_tokens each), so the parts cannot be combined; lower max_tokens or use a "
            "model with a longer context"
        )
    return [make(instruction, texts[s.start : s.stop]) for s in spans]


class _TokenCounter:
    """Token counts with the model's tokenizer: of bare texts, and of prompts as the engine
    sees them (chat template and system message included). Without a tokenizer: UTF-8
    bytes, which no byte-level BPE exceeds."""

    def __init__(self, config: Config):
        self._tokenize, self._render = explain_tokenizer(config)
        self.unit = "tokens" if self._tokenize is not None else "bytes"
        if self._tokenize is None:
            system = ChatPrompt("").system or ""
            self._tokenize = lambda texts: [t.encode() for t in texts]
            self._render = lambda user: f"<|system|>{system}<|user|>{user}<|assistant|>"

    def texts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self._tokenize(texts)] if texts else []

    def prompts(self, users: list[str]) -> list[int]:
        return self.texts([self._render(u) for u in users])
