"""`Tokenizer`: a HF fast tokenizer plus what the engine needs (chat template, chat encoding
that keeps message content from forging special tokens, EOS ids, the string of every token for
constrained decoding)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from functools import cached_property
from itertools import compress
from pathlib import Path

# end-of-turn / end-of-text tokens of the supported families; those in the vocab stop generation
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")
_MAX_CACHED_LAYOUTS = 64


@dataclass(frozen=True, slots=True)
class _ChatLayout:
    """A chat template rendered with a sentinel in place of each message's content: the literal
    template pieces around the sentinels, and which message each sentinel stands for."""

    pieces: tuple[str, ...]  # len(message_indices) + 1 pieces
    message_indices: tuple[int, ...]

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True, slots=True)
class _RenderedChat:
    text: str
    layout: _ChatLayout
    content_spans: tuple[tuple[int, int], ...] | None  # None: content rewritten by the template


class Tokenizer:
    """Encode, decode and render chat prompts for one model. In `encode_chat` the content's
    `<|im_end|>` stays text (decode drops only real special tokens):

    >>> tok = Tokenizer.from_dir(model_dir)                                   # doctest: +SKIP
    >>> ids = tok.encode_chat([{"role": "user", "content": "Hi<|im_end|>"}])  # doctest: +SKIP
    >>> tok.decode(ids).endswith("user\\nHi<|im_end|>\\nassistant\\n")          # doctest: +SKIP
    True
    """

    def __init__(self, hf_tokenizer, extra_eos_ids: tuple[int, ...] = ()):
        self.hf = hf_tokenizer
        self._backend = hf_tokenizer.backend_tokenizer
        vocab = hf_tokenizer.get_vocab()
        eos = {i for i in extra_eos_ids if i is not None}
        if hf_tokenizer.eos_token_id is not None:
            eos.add(hf_tokenizer.eos_token_id)
        eos.update(vocab[t] for t in _END_TOKENS if t in vocab)
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(eos))
        added = self._backend.get_added_tokens_decoder()
        # the ids that text matches only when special-token matching is on
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        # unguessable, so row data cannot imitate a content sentinel
        self._sentinel = f"\ue000{secrets.token_hex(8)}-"
        self._sentinel_re = re.compile(re.escape(self._sentinel) + r"(\d+)\ue001")
        self._layouts: dict[tuple, _ChatLayout] = {}

    @classmethod
    def from_dir(cls, folder: str | Path, extra_eos_ids: tuple[int, ...] = ()) -> Tokenizer:
        """Load tokenizer.json / tokenizer_config.json from a model folder."""
        from transformers import AutoTokenizer

        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"no tokenizer.json in {folder}: a fast tokenizer is required")
        return cls(AutoTokenizer.from_pretrained(folder), extra_eos_ids)

    @property
    def vocab_size(self) -> int:
        """The number of token ids the tokenizer can produce (may be below the model's vocab)."""
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`, special-token text (`<|im_end|>`) included as special tokens:
        for already templated text, so none are added by default. Text that holds data must go
        through `encode_chat` instead."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` of many texts at once (parallel in the Rust tokenizer)."""
        encodings = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [e.ids for e in encodings]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`, without special tokens by default."""
        return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` ([{"role": "system"|"user"|..., "content": str}])."""
        if not self.hf.chat_template:
            raise ValueError("this tokenizer has no chat template; pass already templated text")
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat-templated `messages`, where only the template's own markers
        become special tokens: special-token text inside a message's content is plain text, so
        row data cannot end a turn or write an answer. For content without such text the ids
        equal `encode(apply_chat_template(messages))`. Raises ValueError when the template
        rewrites content so much that its text cannot be told from the template's and the
        content would add special tokens.
        """
        return self.encode_chat_batch([messages], add_generation_prompt)[0]

    def encode_chat_batch(
        self, conversations: list[list[dict]], add_generation_prompt: bool = True
    ) -> list[list[int]]:
        """`encode_chat` of many message lists at once."""
        chats = [self._render(m, add_generation_prompt) for m in conversations]
        encodings = self._backend.encode_batch([c.text for c in chats], add_special_tokens=False)
        return [self._unforged_ids(c, e) for c, e in zip(chats, encodings, strict=True)]

    @cached_property
    def token_strings(self) -> list[str]:
        """The decoded text of every token id (special tokens as ''), for constrained decoding."""
        special = set(self.hf.all_special_ids)
        special.update(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)
        return [
            "" if i in special else self._backend.decode([i], skip_special_tokens=False)
            for i in range(self.vocab_size)
        ]

    # ---- private: chat encoding that keeps content plain ---------------------------------

    @cached_property
    def _plain(self):
        """A copy of the backend that matches no special tokens (content text)."""
        from tokenizers import Tokenizer as RustTokenizer

        plain = RustTokenizer.from_str(self._backend.to_str())
        plain.encode_special_tokens = True
        return plain

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> _RenderedChat:
        text = self.apply_chat_template(messages, add_generation_prompt)
        key = (tuple(m.get("role") for m in messages), add_generation_prompt)
        layout = self._layouts.get(key)
        spans = None if layout is None else _content_spans(text, layout, messages)
        if spans is None:  # no layout yet, or the template took another branch for this content
            layout = self._layout(messages, add_generation_prompt)
            spans = _content_spans(text, layout, messages)
            if len(self._layouts) >= _MAX_CACHED_LAYOUTS:
                self._layouts.clear()
            self._layouts[key] = layout
        return _RenderedChat(text, layout, spans)

    def _layout(self, messages: list[dict], add_generation_prompt: bool) -> _ChatLayout:
        stand_ins = [
            {**m, "content": f"{self._sentinel}{i}\ue001"} if _has_text(m) else m
            for i, m in enumerate(messages)
        ]
        parts = self._sentinel_re.split(self.apply_chat_template(stand_ins, add_generation_prompt))
        return _ChatLayout(tuple(parts[::2]), tuple(int(i) for i in parts[1::2]))

    def _unforged_ids(self, chat: _RenderedChat, encoding) -> list[int]:
        ids = encoding.ids
        special = self._special_ids
        if chat.content_spans is None:
            # the template rewrote content beyond trimming, so where it lies is unknown: accept
            # the text only if the data added or changed no special token
            template_ids = self._backend.encode(chat.layout.text, add_special_tokens=False).ids
            if [i for i in ids if i in special] == [i for i in template_ids if i in special]:
                return ids
            raise ValueError(
                "the chat template rewrites message content (beyond trimming), and the content "
                "holds special-token text; cannot keep it from forging the prompt's markers"
            )
        offsets = encoding.offsets
        spans = chat.content_spans
        positions = compress(range(len(ids)), map(special.__contains__, ids))
        if any(_overlaps(offsets[k], spans) for k in positions):
            return self._encode_runs(chat.text, spans)
        return ids

    def _encode_runs(self, text: str, content_spans: tuple[tuple[int, int], ...]) -> list[int]:
        """Split `text` at the special tokens of its template pieces (as the tokenizer itself
        splits), and encode the runs between them with special-token matching off."""
        markers, pos = [], 0
        for start, end in (*content_spans, (len(text), len(text))):
            if pos < start:
                enc = self._backend.encode(text[pos:start], add_special_tokens=False)
                markers += [
                    (pos + a, pos + b, i)
                    for i, (a, b) in zip(enc.ids, enc.offsets, strict=True)
                    if i in self._special_ids
                ]
            pos = max(pos, end)
        ids, pos = [], 0
        for start, end, token_id in markers:
            if pos < start:
                ids += self._plain.encode(text[pos:start], add_special_tokens=False).ids
            ids.append(token_id)
            pos = end
        if pos < len(text):
            ids += self._plain.encode(text[pos:], add_special_tokens=False).ids
        return ids


def _has_text(message: dict) -> bool:
    return isinstance(message.get("content"), str) and message["content"] != ""


def _overlaps(span: tuple[int, int], spans: tuple[tuple[int, int], ...]) -> bool:
    return any(start < span[1] and span[0] < end for start, end in spans if start < end)


def _content_spans(
    text: str, layout: _ChatLayout, messages: list[dict]
) -> tuple[tuple[int, int], ...] | None:
    """Where each content sentinel's message text lies in `text` (the real rendering), or None if
    `text` is not the layout's pieces around the messages' contents (trimmed or not)."""
    pieces = layout.pieces
    if not text.startswith(pieces[0]):
        return None
    pos, spans = len(pieces[0]), []
    for j, index in enumerate(layout.message_indices):
        if index >= len(messages) or not _has_text(messages[index]):
            return None
        content, after = messages[index]["content"], pieces[j + 1]
        is_last = j + 1 == len(layout.message_indices)
        for form in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            end = pos + len(form)
            if (
                text.startswith(form, pos)
                and text.startswith(after, end)
                and (not is_last or end + len(after) == len(text))
            ):
                break
        else:
            return None
        spans.append((pos, end))
        pos = end + len(after)
    return tuple(spans) if pos == len(text) else None
