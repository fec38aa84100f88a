import json

import pytest

from llmudf.config import Config
from llmudf.functions import LLMCallError, bind_call, is_options, parse_json_answer


def test_typed_functions_decode_constrained_choices():
    assert bind_call("llm_filter").decoding(Config())["choices"] == ["yes", "no"]
    assert bind_call("llm_score").decoding(Config())["choices"] == ["1", "2", "3", "4", "5"]
    spec = bind_call("llm_choice", ["pos", "neg"])
    assert spec.decoding(Config())["choices"] == ["pos", "neg"]
    assert spec.instruction("Tone?") == "Tone?\nAnswer with one of: pos, neg."


def test_free_text_decoding_follows_config_and_call_options():
    spec = bind_call("llm", options={"max_tokens": 5, "temperature": 0.5})
    decoding = spec.decoding(spec.config(Config(max_tokens=30)))
    assert (decoding["max_tokens"], decoding["temperature"]) == (5, 0.5)
    assert bind_call("llm").instruction("Why?") == "Why?"


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("llm_filter", " Yes", True),
        ("llm_filter", "no", False),
        ("llm_score", "4", 4.0),
        ("llm_score", "none", None),
        ("llm", "  Paris \n", "Paris"),
    ],
)
def test_answers_parse_into_sql_values(name, text, value):
    assert bind_call(name).parse(text) == value


def test_choice_answer_is_always_one_of_the_choices():
    spec = bind_call("llm_choice", ["positive", "negative"])
    assert spec.parse("negative") == "negative"
    assert spec.parse("Positive!") == "positive"
    assert spec.parse("negatve") == "negative"


def test_json_answers_are_validated_against_the_schema():
    schema = {"type": "object", "properties": {"year": {"type": "integer"}}, "required": ["year"]}
    spec = bind_call("llm_json", json.dumps(schema))
    assert spec.parse('Sure: {"year": 2009}') == '{"year": 2009}'
    assert spec.parse('{"year": "2009"}') is None
    assert spec.parse('{"title": "Up"}') is None
    assert parse_json_answer("no json here", schema) is None


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("llm_choice", []), "non-empty list"),
        (("llm_choice", ["a", "a"]), "distinct"),
        (("llm_choice", "a"), "non-empty list"),
        (("llm_json", "{not json"), "not valid JSON"),
        (("llm_json", "[1]"), "JSON object"),
        (("llm_nope",), "unknown LLM function"),
    ],
)
def test_bad_constants_are_clear_errors_naming_the_site(args, match):
    with pytest.raises(LLMCallError, match=match) as info:
        bind_call(*args, site="llm_x #3 in SELECT")
    assert "llm_x #3 in SELECT" in str(info.value)


def test_bad_options_are_clear_errors():
    with pytest.raises(LLMCallError, match="unknown option"):
        bind_call("llm", options={"colour": 1})
    with pytest.raises(LLMCallError, match="max_tokens"):
        bind_call("llm", options={"max_tokens": 0})
    assert is_options(["max_tokens", "seed"]) and not is_options(["title"])


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(TypeError, match="unknown llmudf option"):
        Config.from_kwargs(max_token=3)
    with pytest.raises(ValueError, match="temperature"):
        Config(temperature=-1)
