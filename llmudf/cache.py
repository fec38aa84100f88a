"""The persistent result cache: answers already computed are never computed again.

One SQLite file in WAL mode (readers never block the writer; several processes may share
it). A key is the SHA-256 of model id + decoding parameters + the rendered prompt; a value
is the raw answer text. Each `put_many` is one transaction, so a crash leaves either all of
a batch's entries or none.

>>> cache = ResultCache(tmp_dir)                               # doctest: +SKIP
>>> key = cache_key("smollm2", {"max_tokens": 8}, ChatPrompt("Hi"))  # doctest: +SKIP
>>> cache.put_many({key: "Hello"}); cache.get_many([key])      # doctest: +SKIP
{'...': 'Hello'}
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from llmudf.paths import result_cache_dir
from llmudf.prompt import ChatPrompt

_SCHEMA = "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, answer TEXT NOT NULL)"
_BATCH = 500  # SQLite caps the number of bound parameters per statement


def cache_key(model_id: str, decoding: dict, prompt: ChatPrompt) -> str:
    payload = [model_id, decoding, prompt.system, prompt.user]
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ResultCache:
    """A key -> answer store in `directory`/results.sqlite (default: the user cache dir)."""

    def __init__(self, directory: str | Path | None = None):
        root = Path(directory) if directory is not None else result_cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "results.sqlite"
        self._lock = threading.Lock()
        self._con = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        with self._lock:
            self._con.execute("PRAGMA journal_mode=WAL")
            self._con.execute("PRAGMA synchronous=NORMAL")
            self._con.execute(_SCHEMA)
            self._con.commit()

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        keys = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        with self._lock:
            for i in range(0, len(keys), _BATCH):
                chunk = keys[i : i + _BATCH]
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT key, answer FROM results WHERE key IN ({marks})"
                found.update(self._con.execute(sql, chunk).fetchall())
        return found

    def put_many(self, entries: dict[str, str]) -> None:
        if not entries:
            return
        with self._lock, self._con:  # one transaction: all entries or none
            self._con.executemany(
                "INSERT OR REPLACE INTO results (key, answer) VALUES (?, ?)", entries.items()
            )

    def clear(self) -> None:
        with self._lock, self._con:
            self._con.execute("DELETE FROM results")

    def __len__(self) -> int:
        with self._lock:
            return self._con.execute("SELECT count(*) FROM results").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._con.close()


_OPEN: dict[Path, ResultCache] = {}
_OPEN_LOCK = threading.Lock()


def open_cache(directory: str | Path | None = None) -> ResultCache:
    """The process-wide ResultCache for `directory` (one SQLite connection per file)."""
    root = Path(directory) if directory is not None else result_cache_dir()
    with _OPEN_LOCK:
        cache = _OPEN.get(root)
        if cache is None:
            cache = _OPEN[root] = ResultCache(root)
        return cache
