"""Constrained decoding to a JSON object of a fixed schema (a practical subset).

Supported: `{"type": "object", "properties": {name: spec, ...}}` where each spec is
`{"type": "string" | "number" | "integer" | "boolean"}` or `{"enum": [...]}`. Every property
is emitted, in schema order. The skeleton (`{"name": `, `, "next": `, `}`) is forced token by
token; each value is constrained: an enum or boolean through a ChoiceTrie, a string to tokens
without quotes, backslashes or control characters until a closing quote, a number to digit
tokens (and one decimal point for "number"; no sign or exponent) until the next skeleton
token.

>>> plan = JsonPlan.build({"type": "object", "properties": {"ok": {"type": "boolean"}}},
...                       encode, token_strings)                      # doctest: +SKIP
>>> state = JsonState(plan)                                           # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from llmudf.engine.choices import ChoiceTrie, TrieNode

MAX_STRING_TOKENS = 64
MAX_NUMBER_TOKENS = 8
_SCALARS = ("string", "number", "integer", "boolean")
_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]*\.[0-9]+")  # the one decimal point, digits after it


@dataclass(slots=True)
class _Literal:
    tokens: list[int]


@dataclass(slots=True)
class _Choice:
    trie: ChoiceTrie


@dataclass(slots=True)
class _String:
    pass


@dataclass(slots=True)
class _Number:
    integer: bool


class JsonPlan:
    """The schema compiled against one tokenizer: skeleton literals and value slots in order,
    plus the token sets strings and numbers may use."""

    def __init__(
        self, pieces, string_tokens, close_quote, digit_tokens, decimal_tokens, token_strings
    ):
        self.pieces = pieces
        self.string_tokens = string_tokens
        self.close_quote = close_quote
        self.digit_tokens = digit_tokens
        self.decimal_tokens = decimal_tokens
        # JSON numbers have no leading zeros: a number starts with "0" alone or a non-zero digit
        self.zero_tokens = [i for i in digit_tokens if token_strings[i] == "0"]
        self.first_digit_tokens = [i for i in digit_tokens if token_strings[i][0] != "0"]
        self.first_digit_tokens += self.zero_tokens
        self.dot_tokens = [i for i in decimal_tokens if token_strings[i][0] == "."]

    @classmethod
    def build(
        cls, schema: dict, encode: Callable[[str], list[int]], token_strings: list[str]
    ) -> JsonPlan:
        properties = check_schema(schema)
        pieces: list = []
        text = "{"
        for i, (name, spec) in enumerate(properties.items()):
            text += ("" if i == 0 else ", ") + json.dumps(name) + ": "
            kind = spec.get("type")
            if "enum" in spec or kind == "boolean":
                values = spec.get("enum", [True, False])
                pieces.append(_Literal(encode(text)))
                pieces.append(_Choice(ChoiceTrie.build([json.dumps(v) for v in values], encode)))
                text = ""
            elif kind == "string":
                pieces.append(_Literal(encode(text + '"')))
                pieces.append(_String())
                text = ""
            else:
                pieces.append(_Literal(encode(text)))
                pieces.append(_Number(integer=kind == "integer"))
                text = ""
        pieces.append(_Literal(encode(text + "}")))
        quote = encode('"')
        if len(quote) != 1:
            raise ValueError("this tokenizer has no single token for '\"'; JSON strings need one")
        safe = [i for i, s in enumerate(token_strings) if s and _is_safe_string_piece(s)]
        digits = [i for i, s in enumerate(token_strings) if s and _DIGITS.fullmatch(s)]
        decimals = [i for i, s in enumerate(token_strings) if _DECIMAL.fullmatch(s)]
        return cls(pieces, safe + quote, quote[0], digits, decimals, token_strings)


class JsonState:
    """Where one request is in its JSON plan (the `Constraint` of engine/constraints.py).
    `allowed()` lists the tokens it may take next; `advance(token)` takes one and returns
    True when the object is complete; the answer is the decoded tokens (`answer` is None)."""

    answer = None

    __slots__ = ("plan", "index", "offset", "node", "count", "seen_dot", "is_zero")

    def __init__(self, plan: JsonPlan):
        self.plan = plan
        self.index = 0  # current piece
        self.offset = 0  # tokens of the current literal emitted
        self.node: TrieNode | None = None  # position in the current choice trie
        self.count = 0  # tokens emitted in the current string / number
        self.seen_dot = False
        self.is_zero = False  # the number so far is exactly "0"

    def allowed(self) -> list[int]:
        piece = self.plan.pieces[self.index]
        if isinstance(piece, _Literal):
            return [piece.tokens[self.offset]]
        if isinstance(piece, _Choice):
            node = self.node or piece.trie.root
            if node.choice is not None:  # a value that prefixes another (1 vs 10) may end here
                return [*node.children, self.plan.pieces[self.index + 1].tokens[0]]
            return list(node.children)
        if isinstance(piece, _String):
            if self.count >= MAX_STRING_TOKENS:
                return [self.plan.close_quote]
            return self.plan.string_tokens
        digits = self.plan.digit_tokens
        if self.count == 0:
            return self.plan.first_digit_tokens
        follow = self.plan.pieces[self.index + 1].tokens[0]
        if self.count >= MAX_NUMBER_TOKENS:
            return [follow]
        if self.is_zero:
            return [follow] if piece.integer else [*self.plan.dot_tokens, follow]
        if piece.integer or self.seen_dot:
            return [*digits, follow]
        return [*digits, *self.plan.decimal_tokens, follow]

    def advance(self, token: int) -> bool:
        piece = self.plan.pieces[self.index]
        if isinstance(piece, _Literal):
            self.offset += 1
            if self.offset == len(piece.tokens):
                return self._next()
            return False
        if isinstance(piece, _Choice):
            node = self.node or piece.trie.root
            if token not in node.children:  # the value ended; this token starts the next literal
                self._next()
                return self.advance(token)
            self.node = node.children[token]
            return self._next() if not self.node.children else False
        if isinstance(piece, _String):
            self.count += 1
            return self._next() if token == self.plan.close_quote else False
        if self.count > 0 and token == self.plan.pieces[self.index + 1].tokens[0]:
            self._next()  # the number ended; this token was the next literal's first
            return self.advance(token)
        self.is_zero = self.count == 0 and token in self.plan.zero_tokens
        self.count += 1
        self.seen_dot = self.seen_dot or token in self.plan.decimal_tokens
        return False

    def _next(self) -> bool:
        self.index += 1
        self.offset, self.node, self.count = 0, None, 0
        self.seen_dot = self.is_zero = False
        return self.index == len(self.plan.pieces)


def _is_safe_string_piece(s: str) -> bool:
    return '"' not in s and "\\" not in s and all(ord(c) >= 0x20 for c in s)


def check_schema(schema) -> dict:
    """The schema's properties if the constraint supports it; ValueError saying why if not."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ValueError('json_schema must be an object schema: {"type": "object", ...}')
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        raise ValueError("json_schema needs at least one property under 'properties'")
    for name, spec in properties.items():
        if not isinstance(spec, dict):
            raise ValueError(f"json_schema property {name!r} must be a schema object")
        if "enum" in spec:
            if not isinstance(spec["enum"], list) or not spec["enum"]:
                raise ValueError(f"json_schema property {name!r}: enum must be a non-empty list")
        elif spec.get("type") not in _SCALARS:
            raise ValueError(
                f"json_schema property {name!r} has unsupported type {spec.get('type')!r}; "
                f"supported: {list(_SCALARS)} or enum"
            )
    return properties
