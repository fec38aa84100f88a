"""The per-call-site execution core, shared by every connector and by the per-chunk UDFs:
optimizer plan -> result-cache lookup -> one engine batch -> cache fill -> parse -> fan out.

>>> import pyarrow as pa
>>> spec = bind_call("llm_filter")
>>> rows = pa.table({"title": ["Up", "Up", "Heat"]})
>>> client = get_client(Config())                                  # doctest: +SKIP
>>> result = run_call(spec, "Is it animated?", rows, Config(), client)  # doctest: +SKIP
>>> result.answers.to_pylist(), result.stats.num_requests          # doctest: +SKIP
([True, True, False], 2)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from llmudf.calls.config import Config
from llmudf.calls.functions import CallSpec, LLMCallError, bind_call
from llmudf.calls.prompt import ChatPrompt
from llmudf.optimizer.explain import html_table
from llmudf.optimizer.plan import PlanOptions, plan_call
from llmudf.runtime.cache import ResultCache, cache_key
from llmudf.runtime.client import EngineClient
from llmudf.runtime.progress import BatchProgress

__all__ = ["CallResult", "CallStats", "StatsTable", "answer_prompts", "bind_call", "run_call"]


@dataclass(slots=True)
class CallStats:
    """What one call site cost: rows in, prompts after dedup, cache hits, engine tokens."""

    site: str
    num_rows: int = 0
    num_requests: int = 0  # distinct prompts after dedup
    num_cache_hits: int = 0
    num_sent: int = 0  # prompts the engine answered
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache
    num_generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        tokens = self.num_prompt_tokens + self.num_generated_tokens
        return tokens / self.seconds if self.seconds else 0.0

    def add(self, other: CallStats) -> None:
        for name in self.__slots__[1:]:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class StatsTable(list):
    """The CallStats of one query (a list), shown in a notebook as an HTML table."""

    _COLUMNS = (
        "call site",
        "rows",
        "prompts after dedup",
        "cache hits",
        "prompts sent",
        "prompt tokens",
        "prefix-cached tokens",
        "generated tokens",
        "seconds",
    )

    def _repr_html_(self) -> str:
        rows = [
            (
                s.site,
                s.num_rows,
                s.num_requests,
                s.num_cache_hits,
                s.num_sent,
                s.num_prompt_tokens,
                s.num_cached_tokens,
                s.num_generated_tokens,
                f"{s.seconds:.2f}",
            )
            for s in self
        ]
        return html_table(self._COLUMNS, rows)


@dataclass(slots=True)
class CallResult:
    answers: pa.Array  # one per input row, typed as the function's SQL type
    stats: CallStats


def run_call(
    spec: CallSpec,
    instruction: str | Sequence[str | None],
    fields: pa.Table,
    config: Config,
    client: EngineClient,
    cache: ResultCache | None = None,
) -> CallResult:
    """Answer one call site for every row of `fields` (columns = field names).

    `instruction` is one string, or one per row (a NULL instruction gives a NULL answer).
    Identical prompts are answered once (unless `config.dedup` is off); answers in `cache`
    are not computed again; the rest go to `client` as one batch.
    """
    start = time.perf_counter()
    config = spec.config(config)
    num_rows = fields.num_rows
    stats = CallStats(spec.site or spec.function.name, num_rows=num_rows)
    options = PlanOptions.from_config(config)
    decoding = spec.decoding(config)
    prompts: list[ChatPrompt] = []
    row_to_prompt = [-1] * num_rows  # -1: NULL answer
    for text, rows in _group_by_instruction(instruction, num_rows).items():
        group = fields if len(rows) == num_rows else fields.take(pa.array(rows, pa.int64()))
        plan = plan_call(spec.instruction(text), group, options)
        offset = len(prompts)
        prompts += [ChatPrompt(p) for p in plan.prompts]
        for row, request in zip(rows, plan.row_to_request.tolist(), strict=True):
            row_to_prompt[row] = offset + request
    stats.num_requests = len(prompts)
    texts = _answer(spec, prompts, decoding, config, client, cache, stats)
    parsed = [spec.parse(t) for t in texts]  # once per unique prompt, then fanned out
    values = [parsed[j] if j >= 0 else None for j in row_to_prompt]
    stats.seconds = time.perf_counter() - start
    return CallResult(pa.array(values, type=spec.function.arrow_type), stats)


def answer_prompts(
    spec: CallSpec,
    prompts: list[ChatPrompt],
    config: Config,
    client: EngineClient,
    cache: ResultCache | None,
    stats: CallStats,
) -> list[str]:
    """The raw answer text of each of `prompts`, decoded as `spec` says: from `cache`, the
    rest as one `client` batch (filling `stats`). For callers that build their own prompts
    (llm_reduce)."""
    config = spec.config(config)
    return _answer(spec, prompts, spec.decoding(config), config, client, cache, stats)


def _answer(spec, prompts, decoding, config, client, cache, stats) -> list[str]:
    """The answer text of each prompt: from the cache, else from one engine batch. If the
    batch fails or is interrupted, the answers it finished first go into the cache (so a
    re-run sends only the rest) and the exception propagates: KeyboardInterrupt as itself,
    any other error as an LLMCallError."""
    keys = []
    if cache is not None:
        model_id = client.model_id  # stats the weight files: once per batch
        keys = [cache_key(model_id, decoding, p) for p in prompts]
    known = cache.get_many(keys) if cache is not None else {}
    texts: list[str | None] = [known.get(k) for k in keys] if keys else [None] * len(prompts)
    todo = [i for i, t in enumerate(texts) if t is None]
    stats.num_cache_hits = len(prompts) - len(todo)
    stats.num_sent = len(todo)
    if not todo:
        return texts
    params = _sampling_params(decoding)
    finished = {}  # position in todo -> Output, as they come
    with BatchProgress(
        stats.site, stats.num_rows, len(prompts), stats.num_cache_hits, config.progress
    ) as bar:
        try:
            outputs = client.generate(
                [prompts[i].messages() for i in todo],
                params,
                progress=bar.advance,
                on_output=finished.__setitem__,
            )
        except BaseException as exc:
            if cache is not None:
                cache.put_many({keys[todo[j]]: out.text for j, out in finished.items()})
            if isinstance(exc, LLMCallError) or not isinstance(exc, Exception):
                raise  # KeyboardInterrupt, SystemExit: as they are
            # model load, prompt over the context length, dead server
            raise LLMCallError(f"{stats.site}: {type(exc).__name__}: {exc}") from exc
        for out in outputs:
            stats.num_prompt_tokens += out.num_prompt_tokens
            stats.num_cached_tokens += out.num_cached_tokens
            stats.num_generated_tokens += out.num_generated_tokens
        bar.finish(stats.num_prompt_tokens + stats.num_generated_tokens)
    for i, out in zip(todo, outputs, strict=True):
        texts[i] = out.text
    if cache is not None:
        cache.put_many({keys[i]: texts[i] for i in todo})
    return texts


def _sampling_params(decoding: dict):
    from llmudf.engine.json_schema import check_schema
    from llmudf.engine.params import SamplingParams

    kwargs = dict(decoding)
    schema = kwargs.get("json_schema")
    if schema is not None:
        # the engine constrains flat object schemas; richer ones (nested objects, arrays)
        # generate freely and are validated afterwards (an invalid answer is NULL)
        try:
            check_schema(json.loads(schema))
        except ValueError:
            del kwargs["json_schema"]
    return SamplingParams(**kwargs)


def _group_by_instruction(instruction, num_rows: int) -> dict[str, list[int]]:
    if isinstance(instruction, str):
        return {instruction: list(range(num_rows))}
    groups: dict[str, list[int]] = {}
    for row, text in enumerate(instruction):
        if text is not None:
            groups.setdefault(str(text), []).append(row)
    return groups
