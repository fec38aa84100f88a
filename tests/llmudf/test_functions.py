import json
from decimal import Decimal

import pytest

from llmudf.calls.config import Config
from llmudf.calls.functions import LLMCallError, bind_call, is_options, parse_json_answer


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


def test_unknown_keyword_option_suggests_the_option():
    # the Spark DataFrame API passes options as keywords: llm("Q", "title", max_token=4)
    with pytest.raises(LLMCallError, match=r"llm\(\.\.\.\): unknown option.*'max_tokens'\?"):
        bind_call("llm", options={"max_token": 4}, site="llm(...)")


SITE = "llm #1 in SELECT"


@pytest.mark.parametrize(
    ("keys", "constants", "expected"),
    [
        (["max_tokens", "seed"], {"max_tokens": 8, "seed": 1}, True),
        (["model"], {"model": "m.gguf"}, True),
        (["title", "year"], {}, False),
        (["title", "year"], {"year": 1999}, False),  # a constant field: not near any option
        (["speed"], {}, False),  # a near miss of seed, but a column
        (["make", "model"], {}, False),  # an option name among fields, but a column
        (["mode", "speed"], {}, False),
    ],
)
def test_trailing_struct_is_options_or_fields(keys, constants, expected):
    assert is_options(keys, constants, SITE) is expected


@pytest.mark.parametrize(
    ("constants", "match"),
    [
        ({"max_token": 4}, r"unknown option 'max_token'; did you mean 'max_tokens'\?"),
        ({"temprature": 0.5}, r"unknown option 'temprature'; did you mean 'temperature'\?"),
        ({"tempreature": 0.5}, r"did you mean 'temperature'\?"),  # 2 edits: a long name
        ({"max-tokens": 4}, r"did you mean 'max_tokens'\?"),
        ({"Max_Tokens": 4}, r"did you mean 'max_tokens'\?"),  # case does not count
        ({"speed": 4}, r"unknown option 'speed'; did you mean 'seed'\?"),
        ({"mdoel": "x"}, r"did you mean 'model'\?"),  # a swap is one edit
        ({"top_n": 4}, r"did you mean 'top_p' or 'top_k'\?"),
        ({"max_tokens": 4, "bogus": 1}, r"mixes call option\(s\) \['max_tokens'\] with .*bogus"),
    ],
)
def test_misspelt_or_mixed_constant_options_are_errors_naming_the_site(constants, match):
    with pytest.raises(LLMCallError, match=rf"^{SITE}: .*{match}"):
        is_options(list(constants), constants, SITE)


def test_a_constant_option_next_to_a_field_column_is_an_error():
    with pytest.raises(LLMCallError, match=r"mixes call option\(s\) \['seed'\] with .*\['title'\]"):
        is_options(["title", "seed"], {"seed": 1}, SITE)


@pytest.mark.parametrize("key", ["temp", "sed_", "models_x", "topics", "maxtok"])
def test_keys_more_than_the_allowed_edits_away_are_fields(key):
    # 1 edit for names under 6 characters, 2 for longer ones
    assert is_options([key], {key: 1}, SITE) is False


def test_options_that_vary_are_errors():
    with pytest.raises(LLMCallError, match=rf"^{SITE}: call options must be constants, not"):
        is_options(["max_tokens", "seed"], {"max_tokens": 4}, SITE)


def test_per_chunk_values_never_make_a_near_miss_an_error():
    # a UDF (DuckDB per chunk, Spark per batch) sees values, not SQL: a column holding one
    # value in a chunk looks constant, so only an all-option struct is read as options
    assert is_options(["speed"], {"speed": 5}, "llm (per chunk)", from_rows=True) is False
    assert is_options(["title", "seed"], {"title": "x", "seed": 5}, "x", from_rows=True) is False
    assert is_options(["max_tokens"], {"max_tokens": 4}, "llm (per batch)", from_rows=True)
    with pytest.raises(LLMCallError, match=r"^llm \(per batch\): call options must be constants"):
        is_options(["max_tokens"], {}, "llm (per batch)", from_rows=True)


def test_per_chunk_option_values_are_normalized():
    # DuckDB hands a UDF 0.5 as DECIMAL and a seed past BIGINT as DECIMAL(38, 0)
    spec = bind_call(
        "llm", options={"temperature": Decimal("0.5"), "seed": Decimal(2**64 - 1)}, site=SITE
    )
    assert dict(spec.options) == {"temperature": 0.5, "seed": 2**64 - 1}
    assert isinstance(dict(spec.options)["seed"], int)
    with pytest.raises(LLMCallError, match=r"bad option: max_tokens .* got Decimal\('4.0'\)"):
        bind_call("llm", options={"max_tokens": Decimal("4.0")}, site=SITE)


def test_config_rejects_unknown_and_bad_values():
    with pytest.raises(TypeError, match="unknown llmudf option"):
        Config.from_kwargs(max_token=3)
    with pytest.raises(ValueError, match="temperature"):
        Config(temperature=-1)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"max_tokens": "abc"}, r"max_tokens must be an integer >= 1, got 'abc'"),
        ({"max_tokens": 2.5}, r"max_tokens must be an integer >= 1, got 2.5"),
        ({"max_tokens": True}, r"max_tokens must be an integer >= 1, got True"),
        ({"max_tokens": None}, r"max_tokens must be an integer >= 1, got None"),
        ({"temperature": float("inf")}, r"temperature must be a finite number >= 0, got inf"),
        ({"temperature": float("nan")}, r"temperature must be a finite number >= 0, got nan"),
        ({"temperature": "0.5"}, r"temperature must be a finite number >= 0, got '0.5'"),
        ({"temperature": False}, r"temperature must be a finite number >= 0, got False"),
        ({"top_p": 0.0}, r"top_p must be a number in \(0, 1\], got 0.0"),
        ({"top_p": float("nan")}, r"top_p must be a number in \(0, 1\], got nan"),
        ({"top_k": -1}, r"top_k must be an integer >= 0 \(0 = off\), got -1"),
        ({"top_k": 2.0}, r"top_k must be an integer >= 0 \(0 = off\), got 2.0"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64 - 1\] or None, got -1"),
        ({"seed": 2**64}, r"seed must be an integer in \[0, 2\*\*64 - 1\] or None"),
        ({"seed": True}, r"seed must be an integer .* got True"),
        ({"model": 3}, r"model must be a model folder, a .gguf file or a model name, got 3"),
    ],
)
def test_config_values_are_checked_with_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        Config(**options)
    with pytest.raises(ValueError, match=match):  # the connection's config, per call
        Config().with_options(options)


def test_config_keeps_numbers_as_int_and_float():
    config = Config(temperature=1, top_p=Decimal("0.5"), seed=2**64 - 1, max_tokens=Decimal(8))
    assert (config.temperature, config.top_p, config.seed, config.max_tokens) == (
        1.0,
        0.5,
        2**64 - 1,
        8,
    )
    assert isinstance(config.temperature, float) and isinstance(config.max_tokens, int)
    assert Config(seed=None).seed is None
