"""One request's state inside the engine: a Sequence, until it becomes an Output."""

from __future__ import annotations

import enum

import torch

from llmudf.engine.constraints import Constraint
from llmudf.engine.detokenizer import Detokenizer
from llmudf.engine.params import Output, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV to be recomputed)
    RUNNING = "running"  # holds KV pages; prefilling (maybe in chunks) or decoding
    FINISHED = "finished"


class Sequence:
    """A request while the engine works on it.

    token_ids = prompt + generated so far. KV exists for the first `num_computed_tokens`;
    `pages` hold it (page i covers tokens [i * page_size, (i + 1) * page_size)). `cache_node`
    is the radix node this sequence keeps locked (its cached prefix). After a preemption the
    KV is gone (or back in the cache) and the whole token list is prefilled again.

    With CPU attention offload, a decoding sequence may move its KV to the host pool
    (`host_pages`, its own copy; `pages` is then empty): its decode attention runs on the CPU
    until it finishes.

    A sampled token in `end_token_ids` finishes the request and is left out of its tokens.
    `constraint` (choices, JSON) limits and finishes the answer; else `detokenizer` (set when
    there are stop strings) watches the text for them.
    """

    __slots__ = (
        "request_id",
        "arrival",
        "params",
        "status",
        "token_ids",
        "num_prompt_tokens",
        "num_computed_tokens",
        "num_cached_tokens",
        "pages",
        "host_pages",
        "cache_node",
        "cache_len",
        "num_preemptions",
        "generator",
        "end_token_ids",
        "constraint",
        "detokenizer",
        "logprobs",
        "finish_reason",
        "text",
        "max_len",
    )

    def __init__(
        self,
        request_id: str,
        arrival: int,
        prompt_ids: list[int],
        params: SamplingParams,
        max_len: int,
        end_token_ids: frozenset[int] = frozenset(),
        constraint: Constraint | None = None,
        detokenizer: Detokenizer | None = None,
    ):
        self.request_id = request_id
        self.arrival = arrival
        self.params = params
        self.status = SequenceStatus.WAITING
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.pages: list[int] = []
        self.host_pages: list[int] = []
        self.cache_node = None  # radix node this sequence has locked
        self.cache_len = 0  # tokens covered by cache_node's path (its pages are in self.pages)
        self.num_preemptions = 0
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed)
        self.end_token_ids = end_token_ids
        self.constraint = constraint
        self.detokenizer = detokenizer
        self.logprobs: list[float] | None = [] if params.logprobs else None
        self.finish_reason: str | None = None
        self.text = ""
        # prompt + generated never exceeds this (the model's context)
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_on_host(self) -> bool:
        """Its KV lives in the host pool and its decode attention runs on the CPU."""
        return bool(self.host_pages)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def to_output(self) -> Output:
        return Output(
            request_id=self.request_id,
            text=self.text,
            token_ids=self.generated_ids,
            finish_reason=self.finish_reason or "abort",
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens,
            num_generated_tokens=self.num_generated_tokens,
            logprobs=self.logprobs,
        )
