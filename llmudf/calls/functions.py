"""The SQL functions llm / llm_filter / llm_choice / llm_score / llm_json.

Each is `name(instruction, [constant,] field, ..., [options])`: llm_choice takes a list of
choices and llm_json a JSON schema before the fields; a trailing struct literal whose keys
are all call options (`{'max_tokens': 8, 'temperature': 0}`) sets decoding for that call
(`is_options` decides, and names a misspelt or misplaced option).
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pyarrow as pa

from llmudf.calls.config import OPTION_KEYS, Config


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

    def max_new_tokens(self, config: Config) -> int:
        """The most tokens one answer generates (a choice: its first token decides it)."""
        decoding = self.decoding(config)
        return 1 if "choices" in decoding else decoding["max_tokens"]

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
        hints = "".join(_did_you_mean(k) for k in unknown)
        raise LLMCallError(
            f"{site}: unknown option(s) {unknown}; known: {list(OPTION_KEYS)}{hints}"
        )
    if "model" in options and options["model"] is None:
        raise LLMCallError(f"{site}: bad option: model must be a model path or name, got None")
    try:
        checked = Config().with_options(options)
    except (ValueError, TypeError) as exc:
        raise LLMCallError(f"{site}: bad option: {exc}") from exc
    options = {k: getattr(checked, k) for k in options}  # 0.5, not Decimal('0.5')
    choices = schema = None
    if function.const_arg == "choices":
        choices = _check_choices(const, site)
    elif function.const_arg == "json_schema":
        schema = _check_schema(const, site)
    return CallSpec(function, choices, schema, tuple(sorted(options.items())), site)


def is_options(
    keys: Iterable[str], constants: Mapping[str, object], site: str, from_rows: bool = False
) -> bool:
    """Whether a call's last argument, a struct after at least one field, is its options
    (True) or a field struct (False); LLMCallError naming `site` when it looks like a
    misspelt or misplaced option. `constants`: the keys whose value is a constant, with that
    value.

    Options: every key is an option name, every value a constant. An error: a key that is an
    option name, or a near miss of one (`max_token`, `Seed`; see `_near_options`), holds a
    constant in a struct that is not all options. Anything else is a field struct, so
    `{'speed': speed}` and `{'make': make, 'model': model}` (columns) stay fields.
    `from_rows`: `constants` were read off the values (a per-chunk UDF: the same value on
    every row). A column can hold one value in a chunk (always, in a chunk of one row), so
    there a near miss or a mix is read as fields, never an error that depends on the data.

    >>> is_options(["max_tokens", "seed"], {"max_tokens": 8, "seed": 1}, "llm #1 in SELECT")
    True
    >>> is_options(["title", "speed"], {}, "llm #1 in SELECT")
    False
    """
    keys = list(keys)
    named = [k for k in keys if k in OPTION_KEYS]
    if named and len(named) == len(keys):
        varying = [k for k in keys if k not in constants]
        if varying:
            raise LLMCallError(
                f"{site}: call options must be constants, not {varying}; to pass a column "
                "of that name as a field, pass the column itself or rename the key"
            )
        return True
    if from_rows:
        return False
    for key in keys:
        if key in constants and key not in OPTION_KEYS and _near_options(key):
            raise LLMCallError(
                f"{site}: unknown option {key!r}{_did_you_mean(key)} (a constant field of "
                "that name: put its struct before the other fields)"
            )
    mixed = [k for k in named if k in constants]
    if mixed:
        others = [k for k in keys if k not in OPTION_KEYS]
        raise LLMCallError(
            f"{site}: the last struct mixes call option(s) {mixed} with other keys {others}; "
            "pass the options in a struct of their own after the fields, e.g. "
            "{'max_tokens': 8}"
        )
    return False


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


def _near_options(key: str) -> list[str]:
    """The option names closest to `key` (a near miss: not equal, and at most 2 edits away
    from a name of 6+ characters, 1 from a shorter one; case does not count)."""
    distances = {name: _edit_distance(key, name) for name in OPTION_KEYS if name != key}
    near = {name: d for name, d in distances.items() if d <= (2 if len(name) >= 6 else 1)}
    return [name for name, d in near.items() if d == min(near.values())]


def _did_you_mean(key: str) -> str:
    names = _near_options(key)
    return f"; did you mean {' or '.join(map(repr, names))}?" if names else ""


def _edit_distance(a: str, b: str) -> int:
    """Case-blind Damerau-Levenshtein distance (optimal string alignment: a swap of two
    neighbouring characters is one edit)."""
    a, b = a.lower(), b.lower()
    rows = [list(range(len(b) + 1))]
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (ca != cb)))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


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
