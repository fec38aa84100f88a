"""`Tokenizer`: a HF fast tokenizer plus what the engine needs (chat template, EOS ids, the
string of every token for constrained decoding)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

# end-of-turn / end-of-text tokens of the supported families; those in the vocab stop generation
_END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")


class Tokenizer:
    """Encode, decode and render chat prompts for one model.

    >>> tok = Tokenizer.from_dir(model_dir)                                   # doctest: +SKIP
    >>> text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
    >>> tok.decode(tok.encode(text)) == text                                  # doctest: +SKIP
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
        """Token ids of `text`; chat-templated text already holds its special tokens, so none are
        added by default."""
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

    @cached_property
    def token_strings(self) -> list[str]:
        """The decoded text of every token id (special tokens as ''), for constrained decoding."""
        special = set(self.hf.all_special_ids)
        special.update(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)
        return [
            "" if i in special else self._backend.decode([i], skip_special_tokens=False)
            for i in range(self.vocab_size)
        ]
