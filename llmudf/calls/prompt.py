"""How an LLM call becomes a prompt: instruction first, then the fields as `name: value` lines.

Every layer renders through this module, so the optimizer measures exactly the text the
engine will see, and a value prints the same way in DuckDB, Spark and pandas.

>>> render_user_message("Is it a comedy?", [("title", "Up"), ("year", 2009)])
'Is it a comedy?\\n\\ntitle: Up\\nyear: 2009'
"""

from __future__ import annotations

import datetime as _dt
import decimal
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SYSTEM_PROMPT = (
    "You are a data analyst. Answer the question about the record below. "
    "Respond with only the answer, no extra words."
)


def format_value(value) -> str | None:
    """Render one field value as text; None (SQL NULL, NaN, NaT) renders as None = missing."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        value = float(value)  # numpy float64 subclasses float but reprs differently
        return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | decimal.Decimal):
        return str(value)
    if isinstance(value, str):
        return value
    if isinstance(value, _dt.datetime):
        return value.isoformat(sep=" ")
    if isinstance(value, _dt.date | _dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return json.dumps({str(k): _jsonable(v) for k, v in value.items()}, ensure_ascii=False)
    if isinstance(value, Sequence | set | frozenset) or _is_array(value):
        return json.dumps([_jsonable(v) for v in value], ensure_ascii=False)
    if hasattr(value, "item") and callable(value.item):  # numpy / pandas scalars
        return format_value(value.item())
    if _is_na(value):
        return None
    return str(value)


def render_fields(fields: Iterable[tuple[str, object]]) -> str:
    """`name: value` lines; NULL fields are left out (documented rule: NULL = missing)."""
    lines = []
    for name, value in fields:
        text = format_value(value)
        if text is not None:
            lines.append(f"{name}: {text}")
    return "\n".join(lines)


def render_user_message(instruction: str, fields: Iterable[tuple[str, object]]) -> str:
    body = render_fields(fields)
    return f"{instruction}\n\n{body}" if body else instruction


def render_template(template: str, values: Mapping[str, object]) -> str:
    """A fixed `{col}` template; NULL renders as the empty string."""
    return template.format_map({k: format_value(v) or "" for k, v in values.items()})


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """The messages of one request, before the model's chat template is applied."""

    user: str
    system: str | None = SYSTEM_PROMPT

    def messages(self) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": self.user})
        return msgs


def _jsonable(value):
    if hasattr(value, "item") and callable(value.item) and not _is_array(value):
        value = value.item()
    text = format_value(value)
    if text is None:
        return None
    if isinstance(value, bool | int | float) and not isinstance(value, decimal.Decimal):
        return value
    return text


def _is_array(value) -> bool:
    return hasattr(value, "__array__") and getattr(value, "ndim", 0) >= 1


def _is_na(value) -> bool:
    try:
        import pandas as pd

        return bool(pd.isna(value))
    except (ImportError, TypeError, ValueError):
        return False
