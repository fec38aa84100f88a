import json
import shutil

import pytest

from llmudf.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tiny_tokenizer_dir)


def test_encode_decode_round_trip(tok):
    for text in ["hello world", "naïve café ☕", "  spaces\tand\nnewlines "]:
        ids = tok.encode(text)
        assert len(ids) == len(text.encode("utf-8"))  # one token per byte
        assert tok.decode(ids) == text
    assert tok.encode_batch(["ab", "c"]) == [tok.encode("ab"), tok.encode("c")]


def test_chat_template_and_special_tokens(tok):
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|>, <|im_end|> are single tokens
    assert tok.decode(ids) == "system\nBe brief.\nuser\nHi\nassistant\n"
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_eos_ids_and_token_strings(tok):
    assert tok.eos_token_ids == (0, 2)  # <|endoftext|> and <|im_end|>
    strings = tok.token_strings
    assert len(strings) == tok.vocab_size == 259
    assert strings[:3] == ["", "", ""]
    assert strings[tok.encode("y")[0]] == "y"
    assert "".join(strings[i] for i in tok.encode("yes no")) == "yes no"


def test_extra_eos_ids_are_added(tiny_tokenizer_dir):
    assert Tokenizer.from_dir(tiny_tokenizer_dir, extra_eos_ids=(7,)).eos_token_ids == (0, 2, 7)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        Tokenizer.from_dir(tmp_path)


def test_no_chat_template_is_a_clear_error(tmp_path, tiny_tokenizer_dir):
    shutil.copytree(tiny_tokenizer_dir, tmp_path / "t")
    (tmp_path / "t" / "chat_template.jinja").unlink(missing_ok=True)
    config_path = tmp_path / "t" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(tmp_path / "t").apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.slow
def test_default_tokenizer_is_cached_with_the_model(default_model_dir):
    assert (default_model_dir / "tokenizer.json").exists()
    tok = Tokenizer.from_dir(default_model_dir)
    assert tok.hf.convert_ids_to_tokens(list(tok.eos_token_ids)) == ["<|endoftext|>", "<|im_end|>"]
    text = tok.apply_chat_template([{"role": "user", "content": "Is Alien a horror movie?"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith(
        "<|im_start|>user\nIs Alien a horror movie?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(text)
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=False) == text
    assert tok.vocab_size == 49152
