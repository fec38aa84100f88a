"""One request's state inside the engine (Sequence) and what comes back to the caller (Output)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from llmudf.engine.sampling import SamplingParams, TrieNode


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV to be recomputed)
    RUNNING = "running"  # holds KV pages; prefilling (maybe in chunks) or decoding
    FINISHED = "finished"


@dataclass(slots=True)
class Output:
    """The answer to one request.

    finish_reason: "stop" (EOS, a stop string, or a choice completed), "length" (max_tokens or
    the model's context) or "abort". token_ids are the generated tokens (EOS left out).
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int
    logprobs: list[float] | None = None


class Sequence:
    """A request while the engine works on it.

    token_ids = prompt + generated so far. KV exists for the first `num_computed_tokens`;
    `pages` hold it (page i covers tokens [i * page_size, (i + 1) * page_size)). `cache_node`
    is the radix node this sequence keeps locked (its cached prefix). After a preemption the
    KV is gone (or back in the cache) and the whole token list is prefilled again.
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
        "cache_node",
        "cache_len",
        "num_preemptions",
        "generator",
        "trie_node",
        "json_state",
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
        trie_root: TrieNode | None = None,
        json_state=None,
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
        self.cache_node = None  # radix node this sequence has locked
        self.cache_len = 0  # tokens covered by cache_node's path (its pages are in self.pages)
        self.num_preemptions = 0
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator()
            self.generator.manual_seed(params.seed)
        self.trie_node = trie_root  # set when constrained to choices
        self.json_state = json_state  # set when constrained to a JSON schema
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
