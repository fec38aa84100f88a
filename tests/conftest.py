"""Shared fixtures: an isolated result cache, and tiny random-init HF model folders
(config.json + model.safetensors + tokenizer files), loadable by
`llmudf.engine.weights.load_model` and by transformers.

Fixtures:
- `tiny_tokenizer_dir`: a byte-level tokenizer (ids 0-2 `<|endoftext|>`, `<|im_start|>`,
  `<|im_end|>`, then the 256 bytes; ChatML chat template; EOS `<|im_end|>` = 2). One token per
  byte, so a prompt of n ASCII characters is n tokens.
- `make_tiny_model_dir(family="llama", seed=0, **overrides) -> Path`: a HF folder of the tiny
  config `tiny_config(family, **overrides)` with random weights (seeded), saved by transformers
  `save_pretrained`; cached per arguments for the session.
- `tiny_model_dir`: `make_tiny_model_dir("llama")`.
- `default_model_dir` (use only in `@pytest.mark.slow` tests): the cached HF folder of the
  default SmolLM2-135M-Instruct model (converted from its GGUF on first use).
- `tiny_model_path` (str), `make_config(**overrides) -> llmudf.Config`, `tiny_config`: the
  public-face tests' tiny model (seed 1) behind a Config with its own result cache.
"""

import os

# before anything imports torch: see llmudf/__init__.py
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# before anything imports triton (transformers may): the Triton kernels' tests run them in the
# interpreter, on CPU, and triton reads this once, when its own functions are defined
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from llmudf.calls.config import Config  # noqa: E402
from llmudf.engine.models import tiny_config as tiny_model_config  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(ByteLevel.alphabet()))}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(SPECIALS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )
    hf.save_pretrained(folder)


def write_tiny_model(
    folder: Path, family: str, seed: int, tokenizer_dir: Path, **overrides
) -> None:
    """Save a transformers model of the tiny config with random weights large enough that every
    parameter (norm weights and biases included) changes the logits."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = tiny_model_config(family, **overrides)
    hf_dict = cfg.to_hf()
    hf_config = AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def make_tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    made: dict[tuple, Path] = {}

    def make(family: str = "llama", seed: int = 0, **overrides) -> Path:
        key = (family, seed, repr(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny_{family}")
            write_tiny_model(folder, family, seed, tiny_tokenizer_dir, **overrides)
            made[key] = folder
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_tiny_model_dir) -> Path:
    return make_tiny_model_dir("llama")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from llmudf.engine.weights import resolve_model_dir

    return resolve_model_dir(None)


@pytest.fixture(autouse=True, scope="session")
def _isolated_result_cache(tmp_path_factory):
    """Each test run gets its own LLM result cache; the dequantized-model cache is shared, so
    only the first run on a machine pays for converting the default model's GGUF."""
    if "LLMUDF_RESULT_CACHE_DIR" not in os.environ:
        os.environ["LLMUDF_RESULT_CACHE_DIR"] = str(tmp_path_factory.mktemp("results"))
    yield


@pytest.fixture(scope="session")
def tiny_model_path(make_tiny_model_dir) -> str:
    """The public-face tests' tiny llama (seed 1: its answers vary from row to row)."""
    return str(make_tiny_model_dir("llama", seed=1))


@pytest.fixture
def make_config(tiny_model_path, tmp_path):
    """`make_config(**overrides) -> Config` on the tiny model: CPU, its own result cache, no
    progress bar."""

    def make(**overrides) -> Config:
        options = {
            "model": tiny_model_path,
            "engine": {"device": "cpu", "kv_cache_bytes": 64 << 20},
            "cache_dir": str(tmp_path / "results"),
            "progress": False,
            "max_tokens": 6,
        }
        return Config(**{**options, **overrides})

    return make


@pytest.fixture
def tiny_config(make_config) -> Config:
    return make_config()
