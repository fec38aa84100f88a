"""Constrained decoding behind one interface, and compiling SamplingParams into it.

A `Constraint` is one request's state: the tokens the next step may take, advancing on the
sampled token, and whether the answer is complete. The model runner masks the logits with
`allowed()`; the engine calls `advance(token)` and finishes the request when it returns True.
Neither knows which kind of constraint it holds. Compiled pieces (a choice trie, a JSON plan)
are cached per engine, since a query sends the same constraint with every prompt.
"""

from __future__ import annotations

import json
from typing import Protocol

from llmudf.engine.choices import ChoiceConstraint, ChoiceTrie
from llmudf.engine.json_schema import JsonPlan, JsonState
from llmudf.engine.params import SamplingParams


class Constraint(Protocol):
    def allowed(self) -> list[int]:
        """The token ids the next step may take."""

    def advance(self, token: int) -> bool:
        """Takes the sampled token; True when the answer is complete."""

    @property
    def answer(self) -> str | None:
        """The answer's text when the constraint fixes it (a choice); None: decode the tokens."""


class ConstraintCompiler:
    """Makes each request's Constraint from its SamplingParams (None when unconstrained).

    >>> compiler = ConstraintCompiler(tokenizer)                             # doctest: +SKIP
    >>> compiler.compile(SamplingParams(choices=["yes", "no"])).allowed()  # doctest: +SKIP
    [9891, 2152]
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._tries: dict[tuple[str, ...], ChoiceTrie] = {}
        self._json_plans: dict[str, JsonPlan] = {}

    def compile(self, params: SamplingParams) -> Constraint | None:
        if params.choices is not None:
            trie = self._tries.get(params.choices)
            if trie is None:
                encode = self.tokenizer.encode
                trie = self._tries[params.choices] = ChoiceTrie.build(params.choices, encode)
            return ChoiceConstraint(trie, self.tokenizer.eos_token_ids)
        if params.json_schema is not None:
            plan = self._json_plans.get(params.json_schema)
            if plan is None:
                tok = self.tokenizer
                plan = JsonPlan.build(json.loads(params.json_schema), tok.encode, tok.token_strings)
                self._json_plans[params.json_schema] = plan
            return JsonState(plan)
        return None
