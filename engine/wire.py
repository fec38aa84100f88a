"""The Arrow Flight wire format of the engine server, shared by the server and its client.

`DoExchange`:
- descriptor command: JSON `{"client_id": str, "params": {SamplingParams fields}}`;
- the client streams request batches (`REQUEST_SCHEMA`: `id`, `user`, `system`; or `id`,
  `prompt` for already-templated text), then closes its side;
- the server streams answer batches (`ANSWER_SCHEMA`) as requests finish, in finish order.

Actions: `health`, `ready`, `stats` (JSON bodies). Malformed input is `pa.ArrowInvalid`
naming the problem; the servicer sends its message back (never a traceback).

Auth: a server started with an API key wants the header `authorization: Bearer <key>` on
every call (`call_options`); clients take the key from `$LLMUDF_API_KEY` by default.

>>> client_id, params = decode_command(encode_command("me", {"max_tokens": 4}))
>>> client_id, params.max_tokens
('me', 4)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict

import pyarrow as pa
import pyarrow.flight as flight

from llmudf.engine.params import SamplingParams
from llmudf.engine.prompts import chat_columns, chat_messages, is_chat

# per row exactly one of user (a chat message, with an optional system) or prompt (templated)
REQUEST_SCHEMA = pa.schema(
    [("id", pa.int64()), ("user", pa.string()), ("system", pa.string()), ("prompt", pa.string())]
)
ANSWER_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("finish_reason", pa.string()),
        ("num_prompt_tokens", pa.int32()),
        ("num_cached_tokens", pa.int32()),
        ("num_generated_tokens", pa.int32()),
        ("logprobs", pa.list_(pa.float64())),
        ("error", pa.string()),  # non-null: this request got no answer, and why
    ]
)
API_KEY_ENV = "LLMUDF_API_KEY"
ACTIONS = {
    "health": "is the engine loop alive",
    "ready": "is the model loaded and the server accepting work",
    "stats": "queue lengths and requests served",
}


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def call_options(api_key: str | None, timeout: float | None = None) -> flight.FlightCallOptions:
    """Call options that carry `api_key` (if any) as a bearer token."""
    headers = [(b"authorization", f"Bearer {api_key}".encode())] if api_key else None
    return flight.FlightCallOptions(timeout=timeout, headers=headers)


def encode_command(client_id: str, params) -> bytes:
    """The descriptor command; `params` is a SamplingParams or a dict of its fields."""
    fields = params if isinstance(params, dict) else asdict(params)
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return json.dumps({"client_id": client_id, "params": fields}).encode()


def decode_command(command: bytes) -> tuple[str, SamplingParams]:
    try:
        cmd = json.loads(command or b"{}")
        client_id = str(cmd.get("client_id") or "anonymous")
        params = SamplingParams(**(cmd.get("params") or {}))
    except (ValueError, TypeError, AttributeError) as exc:
        raise pa.ArrowInvalid(f"bad request command: {exc}") from exc
    return client_id, params


def encode_requests(todo: list[tuple[int, object]]) -> pa.Table:
    """The request table of `(id, prompt)` pairs; a prompt is a chat of one user message after
    an optional system one (engine/prompts.py) or templated text."""
    users, systems, texts = [], [], []
    for i, prompt in todo:
        if is_chat(prompt):
            user, system = chat_columns(prompt, i)
            users.append(user)
            systems.append(system)
            texts.append(None)
        elif isinstance(prompt, str):
            users.append(None)
            systems.append(None)
            texts.append(prompt)
        else:
            raise TypeError(
                f"prompt {i} is a {type(prompt).__name__}; the engine server takes a chat "
                "(a list of message dicts) or a str"
            )
    ids = [i for i, _ in todo]
    return pa.table(
        {"id": ids, "user": users, "system": systems, "prompt": texts}, schema=REQUEST_SCHEMA
    )


def read_requests(reader) -> tuple[list[int], list]:
    """The ids and prompts (chats or templated text) of everything `reader` streams."""
    try:
        table = reader.read_all()
    except pa.ArrowException as exc:
        raise pa.ArrowInvalid(f"bad request batch: {exc}") from exc
    names = table.column_names
    if "id" not in names or not ({"user", "prompt"} & set(names)):
        raise pa.ArrowInvalid(
            "bad request batch: need an id column and a user (chat, optional system) or "
            f"prompt (templated text) column; got columns {names}"
        )
    try:
        ids = table.column("id").cast(pa.int64()).to_pylist()
        column = lambda name: (
            table.column(name).cast(pa.string()).to_pylist() if name in names else None
        )
        users, systems, texts = column("user"), column("system"), column("prompt")
    except pa.ArrowException as exc:
        raise pa.ArrowInvalid(f"bad request batch: {exc}") from exc
    if any(i is None for i in ids) or len(set(ids)) != len(ids):
        raise pa.ArrowInvalid("bad request batch: ids must be non-null and distinct")
    prompts = []
    for row in range(len(ids)):
        user = users[row] if users else None
        text = texts[row] if texts else None
        if (user is None) == (text is None):
            raise pa.ArrowInvalid(
                f"bad request batch: row {row} (id {ids[row]}) needs exactly one of user, prompt"
            )
        system = systems[row] if systems else None
        prompts.append(text if user is None else chat_messages(user, system))
    return ids, prompts


def encode_answers(results, ids: list[int]) -> pa.RecordBatch:
    """One answer row per service Result (`index` into `ids`; `output` or `error`)."""
    outs = [r.output for r in results]
    col = lambda name, default: [getattr(o, name) if o is not None else default for o in outs]
    return pa.RecordBatch.from_pydict(
        {
            "id": [ids[r.index] for r in results],
            "text": col("text", None),
            "token_ids": [list(o.token_ids) if o is not None else None for o in outs],
            "finish_reason": col("finish_reason", None),
            "num_prompt_tokens": col("num_prompt_tokens", 0),
            "num_cached_tokens": col("num_cached_tokens", 0),
            "num_generated_tokens": col("num_generated_tokens", 0),
            "logprobs": col("logprobs", None),
            "error": [r.error for r in results],
        },
        schema=ANSWER_SCHEMA,
    )


def decode_action(results) -> dict:
    """The JSON body of an action's (single) result."""
    return json.loads(list(results)[0].body.to_pybytes())
