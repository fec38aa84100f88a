"""Constrained decoding to one of a fixed set of strings, through a token trie.

>>> trie = ChoiceTrie({"yes": [5, 6], "no": [7]})
>>> choice = ChoiceConstraint(trie, eos_token_ids=(2,))
>>> sorted(choice.allowed())
[5, 7]
>>> choice.advance(7), choice.answer
(True, 'no')
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


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


class ChoiceConstraint:
    """One request's walk down a ChoiceTrie (the `Constraint` of engine/constraints.py).

    The answer is complete at a leaf, or when EOS is sampled where a choice ends (a choice
    that prefixes another, "1" of "10"); the engine keeps EOS out of the answer's tokens.
    """

    __slots__ = ("node", "eos_token_ids")

    def __init__(self, trie: ChoiceTrie, eos_token_ids: Sequence[int]):
        self.node = trie.root
        self.eos_token_ids = eos_token_ids

    def allowed(self) -> list[int]:
        tokens = list(self.node.children)
        if self.node.choice is not None:
            tokens.extend(self.eos_token_ids)
        return tokens

    def advance(self, token: int) -> bool:
        self.node = self.node.children[token]
        return not self.node.children

    @property
    def answer(self) -> str | None:
        """The choice that ends where the walk is, if one does."""
        return self.node.choice
