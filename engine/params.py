"""What a caller hands the engine and gets back: SamplingParams, Output, EngineStats.

Plain dataclasses, no torch: clients that need no model (the Flight and OpenAI clients, a
Spark task) import them without paying for torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

# "stop": EOS, a stop string or token, or a constrained answer completed; "length": max_tokens
# or the model's context reached; "abort": dropped before it finished
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick the next tokens of one request.

    temperature 0 is greedy. top_k 0 means no top-k. `choices` constrains the answer to exactly
    one of the given strings (yes/no filters, classification, 1-5 scores); the output text is
    then the chosen string. `json_schema` (a dict or its JSON text) constrains the answer to a
    JSON object of that schema (subset: see engine/json_schema.py). `truncate_left` overrides
    EngineConfig.prompt_overflow for this request (True: keep the end of a too-long prompt).
    `logprobs` returns the log-probability of each generated token.

    >>> SamplingParams(max_tokens=8).temperature
    0.0
    >>> SamplingParams(choices=["yes", "no"]).choices
    ('yes', 'no')
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    choices: tuple[str, ...] | None = None
    json_schema: str | None = None
    truncate_left: bool | None = None
    logprobs: bool = False

    def __post_init__(self):
        for name in ("stop", "stop_token_ids", "choices"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name} must be a list of strings, not one string {value!r}")
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.choices is not None:
            if not self.choices:
                raise ValueError("choices must hold at least one string")
            if any(not isinstance(c, str) or not c for c in self.choices):
                raise ValueError(f"choices must be non-empty strings, got {self.choices!r}")
            if len(set(self.choices)) != len(self.choices):
                raise ValueError(f"choices must be distinct, got {self.choices!r}")
        if self.json_schema is not None:
            if self.choices is not None:
                raise ValueError("choices and json_schema cannot both be set")
            schema = self.json_schema
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"json_schema is not valid JSON: {exc}") from exc
            if not isinstance(schema, dict):
                raise ValueError(f"json_schema must be a dict, got {type(schema).__name__}")
            # canonical text: hashable, and one compiled plan per schema
            object.__setattr__(self, "json_schema", json.dumps(schema, sort_keys=False))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(slots=True)
class Output:
    """The answer to one request.

    finish_reason: "stop" (EOS, a stop string, or a constrained answer completed), "length"
    (max_tokens or the model's context) or "abort". token_ids are the generated tokens (EOS
    left out).
    """

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int
    logprobs: list[float] | None = None


@dataclass(slots=True)
class EngineStats:
    """Counters since the engine started (or `reset_stats`)."""

    num_requests: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    num_generated_tokens: int = 0
    num_forward_tokens: int = 0  # tokens the model actually ran (recomputation included)
    num_steps: int = 0
    num_preemptions: int = 0
    elapsed_s: float = 0.0  # time spent in step()
    # KV tiers (docs/DESIGN.md "KV tiers"): prompt tokens found on the device / on the host
    # (loaded back, not recomputed), prompt tokens computed (recomputation included), bytes
    # copied each way, requests moved to the host and decode tokens attended on the CPU
    num_device_hit_tokens: int = 0
    num_host_hit_tokens: int = 0
    num_computed_prompt_tokens: int = 0
    num_bytes_to_host: int = 0
    num_bytes_to_device: int = 0
    num_offloaded_requests: int = 0
    num_cpu_attention_tokens: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Prompt + generated tokens served per second of engine time."""
        total = self.num_prompt_tokens + self.num_generated_tokens
        return total / self.elapsed_s if self.elapsed_s else 0.0
