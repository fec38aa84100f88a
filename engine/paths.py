"""Where the engine finds the default model and keeps its files (no network, ever).

Everything lives under one cache root: `$LLMUDF_CACHE_DIR`, else the user cache dir of
"llmudf" (llmudf's result cache sits beside the engine's folders there).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """The cache root: $LLMUDF_CACHE_DIR (tests point it at a temp dir) or the user cache dir."""
    root = os.environ.get("LLMUDF_CACHE_DIR") or platformdirs.user_cache_dir("llmudf")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_cache_dir() -> Path:
    """Dequantized weights of GGUF models, saved as safetensors so the second load is fast."""
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def servers_dir() -> Path:
    """The state files, locks and logs of this node's engine servers (one per model)."""
    path = cache_dir() / "servers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(name: str) -> Path | None:
    """A package's folder found without importing it (its own imports may be missing).

    >>> package_dir("no_such_package_here") is None
    True
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
