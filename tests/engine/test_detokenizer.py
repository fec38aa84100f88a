"""Incremental detokenization: the same stops and text as decoding everything after each token."""

import random

import pytest

from llmudf.engine.detokenizer import Detokenizer
from llmudf.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def full_decode_stop(decode, ids, stop):
    """The quadratic reference: decode everything after each token, cut at the first stop."""
    for n in range(1, len(ids) + 1):
        text = decode(ids[:n])
        starts = [i for s in stop if (i := text.find(s)) >= 0]
        if starts:
            return n, text[: min(starts)]
    return None, None


def incremental_stop(decode, ids, stop):
    detok = Detokenizer(decode, stop)
    for n, token in enumerate(ids, 1):
        text = detok.append(token)
        if text is not None:
            return n, text
    return None, None


TEXT = "Up (2009) — a café owner's ☕ tale; 🎬 rated 5/5.\nNext: Heat, 1995. Stop here? STOP."
STOPS = [("\n",), ("STOP",), ("é",), ("🎬",), ("5/5", "Heat"), ("ted 5",), ("?", "tale"), ("zz",)]


@pytest.mark.parametrize("stop", STOPS, ids=lambda s: "|".join(s))
def test_stops_where_decoding_everything_stops(tokenizer, stop):
    ids = tokenizer.encode(TEXT)  # one token per byte: characters split across tokens
    expected = full_decode_stop(tokenizer.decode, ids, stop)
    assert incremental_stop(tokenizer.decode, ids, stop) == expected
    if stop != ("zz",):
        assert expected[0] is not None


def test_random_streams_with_special_tokens_and_broken_utf8(tokenizer):
    rng = random.Random(0)
    pieces = [*"ab \n", "é", "☕", "🎬", "<|im_end|>", "ST", "OP"]
    for _ in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        ids = tokenizer.encode(text)
        if rng.random() < 0.3:  # a byte that starts a character never finished
            ids.insert(rng.randrange(len(ids) + 1), tokenizer.encode("é")[0])
        stop = tuple(rng.sample(["STOP", "\n", "b a", "é", "🎬a"], rng.randint(1, 2)))
        assert incremental_stop(tokenizer.decode, ids, stop) == full_decode_stop(
            tokenizer.decode, ids, stop
        )


def test_each_token_decodes_a_short_window(tokenizer):
    lengths = []

    def decode(ids):
        lengths.append(len(ids))
        return tokenizer.decode(ids)

    detok = Detokenizer(decode, ("never",))
    for token in tokenizer.encode("plain ascii text " * 40):
        assert detok.append(token) is None
    assert max(lengths) <= 2  # not the whole answer, as a full decode would be
