"""The engine's prompt contract, and how prompts become token ids.

A prompt is one of:
- a chat: a list of messages `[{"role": "system" | "user" | "assistant", "content": str}]`.
  The model's chat template is applied by `Tokenizer.encode_chat`, which keeps special-token
  text inside the content plain text (row data cannot end a turn or forge an answer);
- a str: already chat-templated text, whose special-token text is matched as such;
- token ids: a list of ints.
A batch is a list of prompts, or an Arrow table with a `prompt` column (templated text) or a
`user` column and an optional `system` column (one chat per row, as on the Flight wire).

>>> chat_messages("Is Up a comedy?", system="Be brief.")[0]
{'role': 'system', 'content': 'Be brief.'}
>>> chat_columns(chat_messages("Hi"))
('Hi', None)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Message = dict[str, str]
Chat = list[Message]
Prompt = str | Chat | Sequence[int]
ROLES = ("system", "user", "assistant")


def chat_messages(user: str, system: str | None = None) -> Chat:
    """The chat of one user message after an optional system message (no system message when
    `system` is None or empty)."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return messages


def chat_columns(messages: Chat, index: int = 0) -> tuple[str, str | None]:
    """`(user, system)` of a chat that is one user message after an optional system one: what
    the Flight wire format carries. ValueError for any other chat."""
    check_chat(messages, index)
    roles = [m["role"] for m in messages]
    if roles == ["user"]:
        return messages[0]["content"], None
    if roles == ["system", "user"]:
        return messages[1]["content"], messages[0]["content"]
    raise ValueError(
        f"prompt {index} is a chat with roles {roles}; this transport takes one user message "
        "after an optional system message"
    )


def is_chat(prompt) -> bool:
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str | bytes)
        and len(prompt) > 0
        and isinstance(prompt[0], Mapping)
    )


def check_chat(messages: Chat, index: int = 0) -> None:
    """ValueError naming the prompt when `messages` is not a list of role / content dicts."""
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise ValueError(f"prompt {index}: message {j} needs a role of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"prompt {index}: message {j} needs a str content")


def prompt_list(prompts) -> list[Prompt]:
    """The prompts of a batch, in order: a list as given, or the rows of an Arrow table."""
    import pyarrow as pa

    if isinstance(prompts, pa.Table):
        names = prompts.column_names
        if "prompt" in names:
            return prompts.column("prompt").to_pylist()
        if "user" in names:
            users = prompts.column("user").to_pylist()
            systems = (
                prompts.column("system").to_pylist() if "system" in names else [None] * len(users)
            )
            return [chat_messages(u, s) for u, s in zip(users, systems, strict=True)]
        raise ValueError(
            f"an Arrow table of prompts needs a 'prompt' or 'user' column, got {names}"
        )
    if isinstance(prompts, str) or is_chat(prompts):
        raise TypeError("generate() takes a list of prompts; wrap a single prompt in a list")
    return list(prompts)


def encode_prompts(prompts: list, tokenizer, vocab_size: int) -> list[list[int]]:
    """Token ids of each prompt (chats and texts each encoded in one batch). ValueError for an
    empty prompt or a token id outside `[0, vocab_size)`, TypeError for anything else."""
    out: list[list[int] | None] = [None] * len(prompts)
    chats: dict[int, Chat] = {}
    texts: dict[int, str] = {}
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            texts[i] = p
        elif is_chat(p):
            check_chat(p, i)
            chats[i] = list(p)
        elif getattr(p, "ndim", None) == 1:  # a tensor or array of token ids
            out[i] = _check_token_ids(p.tolist(), i, vocab_size)
        elif isinstance(p, Sequence) and not isinstance(p, bytes):
            out[i] = _check_token_ids(p, i, vocab_size)
        else:
            raise TypeError(
                f"prompt {i} is a {type(p).__name__}; expected str, a chat (a list of message "
                "dicts) or token ids"
            )
    encoded = [
        *zip(chats, tokenizer.encode_chat_batch(list(chats.values())), strict=True),
        *zip(texts, tokenizer.encode_batch(list(texts.values())), strict=True),
    ]
    for i, ids in encoded:
        if not ids:
            raise ValueError(f"prompt {i} is empty after tokenization")
        out[i] = ids
    return out


def _check_token_ids(ids: Sequence, index: int, vocab_size: int) -> list[int]:
    if not ids:
        raise ValueError(f"prompt {index} is empty")
    if not all(isinstance(t, int) or hasattr(t, "__index__") for t in ids):
        raise TypeError(f"prompt {index} holds non-integer token ids")
    ids = [int(t) for t in ids]
    if min(ids) < 0 or max(ids) >= vocab_size:
        raise ValueError(f"prompt {index} has token ids outside the vocabulary [0, {vocab_size})")
    return ids
