"""The SQL functions llm / llm_filter / llm_choice / llm_score / llm_json.

Each is `name(instruction, [constant,] field, ..., [options])`: llm_choice takes a list of
choices and llm_json a JSON schema before the fields; a trailing struct literal whose keys
are all call options (`{'max_tokens': 8, 'temperature': 0}`) sets decoding for that call.
A `FunctionSpec` says what a function returns; a `CallSpec` is one bound call site: the
function, its constant argument and options. It builds the decoding parameters and parses
an answer text into the SQL value.

>>> spec = bind_call("llm_filter")
>>> spec.parse("Yes"), spec.decoding(Config())["choices"]
(True, ['yes', 'no'])
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pyarrow as pa

from llmudf.config import OPTION_KEYS, Config


@dataclass(frozen=True, slots=True)
class FunctionSpec:
    name: str
    sql_type: str  # the DuckDB type of the answer
    arrow_type: pa.DataType
    const_arg: str | None  # "choices" / "json_schema": the constant before the fields
    hint: str  # appended to the instruction so the model knows the answer's form


FUNCTIONS = {
    f.name: f
    for f in (
        FunctionSpec("llm", "VARCHAR", pa.string(), None, ""),
        FunctionSpec("llm_filter", "BOOLEAN", pa.bool_(), None, "Answer yes or no."),
        FunctionSpec("llm_choice", "VARCHAR", pa.string(), "choices", "Answer with one of: {}."),
        FunctionSpec(
            "llm_score", "DOUBLE", pa.float64(), None, "Answer with a number from 1 to 5."
        ),
        FunctionSpec("llm_json", "JSON", pa.string(), "json_schema", "Answer in JSON: {}"),
    )
}
SCORE_CHOICES = ("1", "2", "3", "4", "5")


class LLMCallError(ValueError):
    """A bad LLM call (arguments, model, prompt length); the message names the call site."""


@dataclass(frozen=True, slots=True)
class CallSpec:
    """One call site: the function, its constant argument and its per-call options."""

    function: FunctionSpec
    choices: tuple[str, ...] | None = None
    json_schema: str | None = None  # canonical JSON text
    options: tuple[tuple[str, object], ...] = ()
    site: str = ""  # "llm_filter #1" in error messages

    def config(self, base: Config) -> Config:
        return base.with_options(dict(self.options))

    def instruction(self, instruction: str) -> str:
        """The instruction as sent: with a hint on the answer's form for typed functions."""
        hint = self.function.hint
        if self.choices is not None:
            hint = hint.format(", ".join(self.choices))
        elif self.json_schema is not None:
            hint = hint.format(self.json_schema)
        return f"{instruction}\n{hint}" if hint else instruction

    def decoding(self, config: Config) -> dict:
        """Decoding parameters (the result-cache key holds exactly these)."""
        name = self.function.name
        if name in ("llm_filter", "llm_choice", "llm_score"):
            choices = {"llm_filter": ("yes", "no"), "llm_score": SCORE_CHOICES}.get(
                name, self.choices
            )
            return {"max_tokens": 16, "temperature": 0.0, "choices": list(choices)}
        out = {
            "max_tokens": config.max_tokens,
            "temperature": config.temperature,
            "top_p": config.top_p,
            "top_k": config.top_k,
            "seed": config.seed,
        }
        if self.json_schema is not None:
            out["json_schema"] = self.json_schema
        return out

    def parse(self, text: str | None):
        """The answer text as the function's SQL value (None = NULL)."""
        if text is None:
            return None
        name = self.function.name
        if name == "llm":
            return text.strip()
        if name == "llm_filter":
            return text.strip().lower().startswith("y")
        if name == "llm_score":
            match = re.search(r"-?\d+(\.\d+)?", text)
            return float(match.group()) if match else None
        if name == "llm_choice":
            return _closest_choice(text, self.choices)
        return parse_json_answer(text, json.loads(self.json_schema))


def bind_call(name: str, const=None, options: dict | None = None, site: str = "") -> CallSpec:
    """Check a call's constant argument and options; raise LLMCallError naming the site."""
    site = site or name
    function = FUNCTIONS.get(name)
    if function is None:
        raise LLMCallError(f"{site}: unknown LLM function {name!r}; known: {list(FUNCTIONS)}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise LLMCallError(f"{site}: unknown option(s) {unknown}; known: {list(OPTION_KEYS)}")
    try:
        Config().with_options({k: v for k, v in options.items() if k != "model"})
    except (ValueError, TypeError) as exc:
        raise LLMCallError(f"{site}: bad option: {exc}") from exc
    choices = schema = None
    if function.const_arg == "choices":
        choices = _check_choices(const, site)
    elif function.const_arg == "json_schema":
        schema = _check_schema(const, site)
    return CallSpec(function, choices, schema, tuple(sorted(options.items())), site)


def is_options(keys) -> bool:
    """A trailing struct is call options when every key is an option name."""
    keys = list(keys)
    return bool(keys) and all(k in OPTION_KEYS for k in keys)


def parse_json_answer(text: str, schema: dict):
    """The first JSON value in `text` as canonical JSON text, or None if it breaks `schema`."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        value, _end = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    return json.dumps(value, ensure_ascii=False) if validate_json(value, schema) else None


_JSON_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
    "integer": int,
    "number": (int, float),
}


def validate_json(value, schema: dict) -> bool:
    """Checks type, enum, properties, required, items (the subset llm_json documents)."""
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if isinstance(value, bool) and "boolean" not in kinds:
            return False
        if not any(isinstance(value, _JSON_TYPES.get(k, object)) for k in kinds):
            return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, dict):
        if any(key not in value for key in schema.get("required", [])):
            return False
        props = schema.get("properties", {})
        if not all(validate_json(v, props[k]) for k, v in value.items() if k in props):
            return False
    if isinstance(value, list) and "items" in schema:
        return all(validate_json(v, schema["items"]) for v in value)
    return True


def _closest_choice(text: str, choices) -> str:
    clean = text.strip().lower()
    for choice in choices:
        if clean == choice.lower():
            return choice
    for choice in choices:
        if clean.startswith(choice.lower()) or choice.lower().startswith(clean):
            return choice
    return choices[0] if not clean else min(choices, key=lambda c: _edit_distance(c, clean))


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a.lower(), 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _check_choices(const, site: str) -> tuple[str, ...]:
    if not isinstance(const, list | tuple) or not const:
        raise LLMCallError(f"{site}: choices must be a non-empty list of strings, got {const!r}")
    if not all(isinstance(c, str) and c.strip() for c in const):
        raise LLMCallError(f"{site}: every choice must be a non-empty string, got {const!r}")
    if len(set(const)) != len(const):
        raise LLMCallError(f"{site}: choices must be distinct, got {const!r}")
    return tuple(const)


def _check_schema(const, site: str) -> str:
    if isinstance(const, str):
        try:
            const = json.loads(const)
        except json.JSONDecodeError as exc:
            raise LLMCallError(f"{site}: json_schema is not valid JSON: {exc}") from exc
    if not isinstance(const, dict):
        raise LLMCallError(f"{site}: json_schema must be a JSON object, got {const!r}")
    return json.dumps(const, sort_keys=True, separators=(",", ":"))
