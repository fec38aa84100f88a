"""Sampling: SamplingParams, the batched sampler, and constrained decoding to fixed choices.

Greedy rows take an argmax over the whole batch at once; sampled rows are scaled, top-k /
top-p filtered in one sort, and drawn by the exponential race (argmax p / E, E ~ Exp(1)) so
that a seeded request draws its noise from its own torch.Generator and gets the same answer
whatever batch it runs in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


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
class TrieNode:
    children: dict[int, TrieNode] = field(default_factory=dict)
    choice: str | None = None  # set when a choice ends here


class ChoiceTrie:
    """A token trie over the tokenizations of a fixed set of choices.

    Decoding walks it: at each step only the children of the current node may be sampled; a
    node where a choice ends also allows EOS, and a leaf finishes the request.

    >>> trie = ChoiceTrie({"yes": [5, 6], "no": [7]})
    >>> sorted(trie.root.children)
    [5, 7]
    """

    def __init__(self, choice_tokens: dict[str, Sequence[int]]):
        self.root = TrieNode()
        for choice, tokens in choice_tokens.items():
            if not tokens:
                raise ValueError(f"choice {choice!r} tokenizes to no tokens")
            node = self.root
            for tok in tokens:
                node = node.children.setdefault(int(tok), TrieNode())
            if node.choice is not None:
                raise ValueError(f"choices {node.choice!r} and {choice!r} tokenize the same")
            node.choice = choice

    @classmethod
    def build(cls, choices: Sequence[str], encode: Callable[[str], list[int]]) -> ChoiceTrie:
        return cls({c: encode(c) for c in choices})


def allowed_tokens(node: TrieNode, eos_token_ids: Sequence[int]) -> list[int]:
    tokens = list(node.children)
    if node.choice is not None:
        tokens.extend(eos_token_ids)
    return tokens


class Sampler:
    """Picks one token per row of a logits batch.

    `sample(logits [N, V] float32, params, generators, allowed)` where `allowed[i]` is None or
    the token ids row i may take. Returns (token ids [N] int64, chosen logprobs [N] or None).
    """

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        allowed: Sequence[list[int] | None],
        want_logprobs: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self._apply_constraints(logits, allowed)
        next_tokens = logits.argmax(dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            drawn = self._draw(
                logits[rows],
                [params[i] for i in sampled_rows],
                [generators[i] for i in sampled_rows],
            )
            next_tokens[rows] = drawn
        logprobs = None
        if want_logprobs:
            logprobs = torch.log_softmax(logits, dim=-1).gather(1, next_tokens[:, None])[:, 0]
        return next_tokens, logprobs

    @staticmethod
    def _apply_constraints(
        logits: torch.Tensor, allowed: Sequence[list[int] | None]
    ) -> torch.Tensor:
        rows = [i for i, a in enumerate(allowed) if a is not None]
        if not rows:
            return logits
        mask = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool)
        for j, i in enumerate(rows):
            mask[j, allowed[i]] = True
        mask = mask.to(logits.device)
        row_index = torch.tensor(rows, device=logits.device)
        logits = logits.clone()
        logits[row_index] = logits[row_index].masked_fill(~mask, float("-inf"))
        return logits

    @staticmethod
    def _draw(
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        # logits: [M, V] of the non-greedy rows
        device = logits.device
        temps = torch.tensor([p.temperature for p in params], device=device)
        logits = logits / temps[:, None]
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[1]
            ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=device)
            ranks = torch.arange(vocab, device=device)[None, :]
            drop = ranks >= ks[:, None]
            probs = sorted_logits.softmax(dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always the first token)
            mass_before = probs.cumsum(dim=-1) - probs
            drop |= mass_before >= torch.tensor(top_p, device=device)[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for i, gen in enumerate(generators):
            if gen is not None:  # seeded: a CPU generator, so every device draws the same
                row = torch.empty(probs.shape[1], dtype=probs.dtype).exponential_(generator=gen)
                noise[i] = row.to(probs.device)
        return (probs / noise).argmax(dim=-1)
