"""The persistent result cache: answers already computed are never computed again.

One SQLite file in WAL mode (readers never block the writer; several processes may share
it). A key is the SHA-256 of model id + decoding parameters + the rendered prompt; a value
is the raw answer text. Each `put_many` is one transaction, so a crash leaves either all of
a batch's entries or none.

Faults never fail a query. A corrupt file, found at open, read or write time, is moved aside
(`results.sqlite.corrupt-<time>`, with its -wal/-shm files) and a fresh cache started; an
unwritable one is still read where it can be, and writes are skipped. Each warns once with a
`CacheWarning` that names the file.

>>> cache = ResultCache(tmp_dir)                               # doctest: +SKIP
>>> key = cache_key("smollm2", {"max_tokens": 8}, ChatPrompt("Hi"))  # doctest: +SKIP
>>> cache.put_many({key: "Hello"}); cache.get_many([key])      # doctest: +SKIP
{'...': 'Hello'}
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from llmudf.calls.prompt import ChatPrompt
from llmudf.runtime.paths import result_cache_dir

_SCHEMA = "CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, answer TEXT NOT NULL)"
_COLUMNS = ["key", "answer"]
_INSERT = "INSERT OR REPLACE INTO results (key, answer) VALUES (?, ?)"
_BATCH = 500  # SQLite caps the number of bound parameters per statement

# Errors are classified by SQLite's primary code, or by message when there is none (an
# exception raised by a wrapper, or in a test).
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_CORRUPT_WORDS = ("malformed", "not a database", "corrupt", "no such table", "no such column")
_UNWRITABLE_CODES = {
    sqlite3.SQLITE_READONLY,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_PERM,
}
_UNWRITABLE_WORDS = ("readonly", "read-only", "unable to open", "disk is full", "i/o error")
_TURN_OFF = "Pass cache=False to llmudf.connect() or Config to turn the result cache off."


class CacheWarning(UserWarning):
    """The result cache is corrupt or unwritable; the query runs on with less caching."""


class _NotACache(sqlite3.DatabaseError):
    """The path opens, but holds no result cache (a directory, or the wrong table)."""


def cache_key(model_id: str, decoding: dict, prompt: ChatPrompt) -> str:
    payload = [model_id, decoding, prompt.system, prompt.user]
    text = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ResultCache:
    """A key -> answer store in `directory`/results.sqlite (default: the user cache dir)."""

    def __init__(self, directory: str | Path | None = None):
        root = Path(directory) if directory is not None else result_cache_dir()
        self.path = root / "results.sqlite"
        self._lock = threading.Lock()
        self._con: sqlite3.Connection | None = None  # None: no usable file, run uncached
        self._file_id: tuple[int, int] | None = None  # (st_dev, st_ino) that _con opened
        self._is_writable = True
        with self._lock:
            self._open()

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        keys = list(dict.fromkeys(keys))
        with self._lock:
            return self._read(lambda con: _select(con, keys), default={})

    def put_many(self, entries: dict[str, str]) -> None:
        """Store all `entries` or none; a failure warns and never raises."""
        if not entries:
            return
        with self._lock:
            self._write(lambda con: con.executemany(_INSERT, entries.items()))

    def clear(self) -> None:
        with self._lock:
            self._write(lambda con: con.execute("DELETE FROM results"))

    def __len__(self) -> int:
        count = "SELECT count(*) FROM results"
        with self._lock:
            return self._read(lambda con: con.execute(count).fetchone()[0], default=0)

    def close(self) -> None:
        with self._lock:
            self._close()

    # -- private: opening the file, and what each fault does ------------------------------

    def _open(self) -> None:
        """Open read-write, moving a corrupt file aside first; else open read-only."""
        error = self._try_connect()
        if error is not None and _is_corrupt(error):
            if not self._move_aside(error):
                return
            error = self._try_connect()
        if error is None:
            return
        self._is_writable = False
        self._con = self._connect_read_only()
        if self._con is None:
            self._warn(f"cannot be opened ({error}); running uncached")
        else:
            self._warn(f"is not writable ({error}); cached answers are served, new ones not kept")

    def _try_connect(self) -> Exception | None:
        try:
            self._con = self._connect()
        except (sqlite3.Error, OSError) as err:
            return err
        return None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not self.path.is_file():
            raise _NotACache("it is not a file")
        con = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute(_SCHEMA)
            con.commit()
            _check_schema(con)
        except sqlite3.Error:
            con.close()
            raise
        self._file_id = _file_id(self.path)
        return con

    def _connect_read_only(self) -> sqlite3.Connection | None:
        # Plain mode=ro needs the -shm file of a WAL database, which SQLite cannot create in a
        # read-only directory; immutable=1 reads the main file without it.
        uri = self.path.absolute().as_uri()
        for flags in ("mode=ro", "mode=ro&immutable=1"):
            con = None
            try:
                con = sqlite3.connect(f"{uri}?{flags}", uri=True, check_same_thread=False)
                _check_schema(con)
                return con
            except sqlite3.Error:
                if con is not None:
                    con.close()
        return None

    def _read(self, query: Callable[[sqlite3.Connection], object], default):
        try:
            return query(self._con) if self._con is not None else default
        except sqlite3.Error as err:
            if not (self._is_writable and _is_corrupt(err)):
                return self._skip_read(err, default)
            self._replace_corrupt(err)
        try:  # the fresh file, which another process may have filled already
            return query(self._con) if self._con is not None else default
        except sqlite3.Error as err:
            return self._skip_read(err, default)

    def _write(self, statement: Callable[[sqlite3.Connection], object]) -> None:
        try:
            self._transact(statement)
            return
        except sqlite3.Error as err:
            if not _is_corrupt(err):
                self._skip_write(err)
                return
            self._replace_corrupt(err)
        try:  # into the fresh file: keep the answers just computed
            self._transact(statement)
        except sqlite3.Error as err:
            self._skip_write(err)

    def _transact(self, statement: Callable[[sqlite3.Connection], object]) -> None:
        if self._con is not None and self._is_writable:
            with self._con:  # one transaction: all entries or none
                statement(self._con)

    def _skip_read(self, err: sqlite3.Error, default):
        self._warn(f"could not be read ({err}); these answers are computed afresh")
        return default

    def _skip_write(self, err: sqlite3.Error) -> None:
        if _is_unwritable(err):
            self._is_writable = False  # warn once; later writes are skipped quietly
            self._warn(f"is not writable ({err}); new answers are not kept, cached ones served")
        else:
            self._warn(f"could not store a batch ({err}); the query's answers are unaffected")

    def _replace_corrupt(self, err: sqlite3.Error) -> None:
        file_id = self._file_id
        self._close()
        if _file_id(self.path) != file_id:
            self._warn(f"was corrupt ({err}); another process moved it aside, using the new file")
        elif not self._move_aside(err):
            return
        self._open()

    def _move_aside(self, err: Exception) -> bool:
        aside = _aside_path(self.path)
        try:
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{self.path}{suffix}").rename(f"{aside}{suffix}")
        except OSError as why:
            self._warn(f"is corrupt ({err}) and cannot be moved aside ({why}); running uncached")
            return False
        self._warn(f"was corrupt ({err}); moved it aside to {aside} and started a fresh cache")
        return True

    def _close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def _warn(self, what: str) -> None:
        message = f"llmudf result cache {self.path.absolute()} {what}. {_TURN_OFF}"
        warnings.warn(message, CacheWarning, stacklevel=2)


def _select(con: sqlite3.Connection, keys: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for i in range(0, len(keys), _BATCH):
        chunk = keys[i : i + _BATCH]
        marks = ",".join("?" * len(chunk))
        sql = f"SELECT key, answer FROM results WHERE key IN ({marks})"
        found.update(con.execute(sql, chunk).fetchall())
    return found


def _check_schema(con: sqlite3.Connection) -> None:
    columns = [row[1] for row in con.execute("PRAGMA table_info(results)")]
    if columns != _COLUMNS:
        raise _NotACache(f"its results table has columns {columns}, not {_COLUMNS}")


def _is_corrupt(err: Exception) -> bool:
    return isinstance(err, _NotACache) or _matches(err, _CORRUPT_CODES, _CORRUPT_WORDS)


def _is_unwritable(err: Exception) -> bool:
    return _matches(err, _UNWRITABLE_CODES, _UNWRITABLE_WORDS)


def _matches(err: Exception, codes: set[int], words: tuple[str, ...]) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in codes:  # extended code -> primary code
        return True
    return any(word in str(err).lower() for word in words)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _aside_path(path: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    names = (f"{path.name}.corrupt-{stamp}" + (f"-{n}" if n else "") for n in itertools.count())
    return next(aside for aside in map(path.with_name, names) if not aside.exists())


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
