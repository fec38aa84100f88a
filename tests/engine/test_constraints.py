"""The one constraint interface: choices and JSON schemas compiled from SamplingParams."""

import json

import pytest

from llmudf.engine.choices import ChoiceConstraint, ChoiceTrie
from llmudf.engine.constraints import ConstraintCompiler
from llmudf.engine.params import SamplingParams
from llmudf.engine.tokenizer import Tokenizer


def test_choice_trie():
    trie = ChoiceTrie({"yes": [1, 2], "yesss": [1, 2, 3], "no": [4]})
    assert sorted(trie.root.children) == [1, 4]
    node = trie.root.children[1].children[2]
    assert node.choice == "yes"
    with pytest.raises(ValueError, match="tokenize the same"):
        ChoiceTrie({"a": [1], "b": [1]})
    with pytest.raises(ValueError, match="no tokens"):
        ChoiceTrie.build(["x"], lambda s: [])


def test_choice_constraint_walks_the_trie_and_allows_eos_where_a_choice_ends():
    trie = ChoiceTrie({"yes": [1, 2], "yesss": [1, 2, 3], "no": [4]})
    walk = ChoiceConstraint(trie, eos_token_ids=(0,))
    assert sorted(walk.allowed()) == [1, 4]
    assert (walk.advance(1), walk.answer) == (False, None)
    assert (walk.advance(2), walk.answer) == (False, "yes")
    assert sorted(walk.allowed()) == [0, 3]  # EOS ends "yes", 3 goes on
    assert (walk.advance(3), walk.answer) == (True, "yesss")  # a leaf: complete
    other = ChoiceConstraint(trie, eos_token_ids=(0,))  # each request walks on its own
    assert (other.advance(4), other.answer) == (True, "no")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def test_compiler_gives_each_request_its_own_state_over_one_compiled_trie(tokenizer):
    compiler = ConstraintCompiler(tokenizer)
    params = SamplingParams(choices=["ab", "ac"])
    first, second = compiler.compile(params), compiler.compile(params)
    assert first is not second and first.node is second.node  # one trie, two walks
    (a,) = tokenizer.encode("a")
    assert first.allowed() == [a]
    assert first.advance(a) is False
    assert second.allowed() == [a]  # unmoved by the other walk
    assert compiler.compile(SamplingParams()) is None


def test_compiled_json_constraint_emits_its_skeleton_then_completes(tokenizer):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    constraint = ConstraintCompiler(tokenizer).compile(SamplingParams(json_schema=schema))
    tokens = []
    done = False
    while not done:
        allowed = constraint.allowed()
        token = min(allowed)  # any allowed token keeps the output valid
        tokens.append(token)
        done = constraint.advance(token)
    assert constraint.answer is None  # the answer is the decoded tokens
    assert json.loads(tokenizer.decode(tokens)) in ({"ok": True}, {"ok": False})
