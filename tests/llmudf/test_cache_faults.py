"""A corrupt or unwritable result cache warns, names its file, and never fails or loses a
query's answers (issue #10)."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import pyarrow as pa
import pytest

from llmudf.calls.functions import bind_call
from llmudf.runtime.cache import CacheWarning, ResultCache
from llmudf.runtime.client import get_client
from llmudf.runtime.executor import run_call

ANSWERS = {f"k{i}": f"answer {i} " + "x" * 1000 for i in range(300)}  # ~80 leaf pages
READ_ONLY = "attempt to write a readonly database"


@pytest.fixture
def full_cache(tmp_path) -> Path:
    """A closed cache file (checkpointed: no -wal) holding ANSWERS."""
    cache = ResultCache(tmp_path)
    cache.put_many(ANSWERS)
    cache.close()
    return tmp_path / "results.sqlite"


def only_warning(record, path: Path, says: str) -> str:
    messages = [str(w.message) for w in record if issubclass(w.category, CacheWarning)]
    assert len(messages) == 1, messages
    assert str(path) in messages[0] and "cache=False" in messages[0] and says in messages[0]
    return messages[0]


def asides(path: Path) -> list[Path]:
    """The corrupt files moved aside from `path`, without their -wal/-shm siblings."""
    moved = path.parent.glob(f"{path.name}.corrupt-*")
    return sorted(p for p in moved if not p.name.endswith(("-wal", "-shm")))


def make_garbage(path: Path) -> None:
    path.write_bytes(b"not a database " * 100)


def make_truncated(path: Path) -> None:
    ResultCache(path.parent).close()
    with open(path, "r+b") as f:
        f.truncate(50)  # half of SQLite's 100-byte header


def make_directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("kept")
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").write_text(f"stale {suffix}")


def make_wrong_schema(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE results (id INTEGER, payload BLOB)")
    con.commit()
    con.close()


@pytest.mark.parametrize(
    "corrupt", [make_garbage, make_truncated, make_directory, make_wrong_schema]
)
def test_a_corrupt_file_at_open_is_moved_aside_and_a_fresh_cache_started(tmp_path, corrupt):
    path = tmp_path / "results.sqlite"
    corrupt(path)
    with pytest.warns(CacheWarning) as record:
        cache = ResultCache(tmp_path)
    message = only_warning(record, path, "moved it aside")
    [aside] = asides(path)
    assert str(aside) in message
    if corrupt is make_garbage:
        assert aside.read_bytes() == b"not a database " * 100
    if corrupt is make_directory:
        assert (aside / "inside").read_text() == "kept"
        assert Path(f"{aside}-wal").read_text() == "stale -wal"
        assert Path(f"{aside}-shm").read_text() == "stale -shm"
    cache.put_many({"a": "1"})
    assert path.is_file() and ResultCache(tmp_path).get_many(["a"]) == {"a": "1"}


def test_a_zero_length_file_is_an_empty_cache(tmp_path):
    (tmp_path / "results.sqlite").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = ResultCache(tmp_path)
        cache.put_many({"a": "1"})
        assert cache.get_many(["a"]) == {"a": "1"} and asides(cache.path) == []


@pytest.mark.parametrize(
    "damage", ["open(path, 'r+b').write(b'garbage' * 100_000)", "os.truncate(path, 100_000)"]
)
def test_a_file_corrupted_between_two_queries_by_another_process(full_cache, damage):
    cache = ResultCache(full_cache.parent)
    assert cache.get_many(["k0"]) == {"k0": ANSWERS["k0"]}  # query 1
    size = full_cache.stat().st_size
    code = f"import os; path = {str(full_cache)!r}; {damage}"
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.warns(CacheWarning) as record:
        assert cache.get_many(["k299"]) == {}  # query 2 misses, so it recomputes
    only_warning(record, full_cache, "moved it aside")
    assert asides(full_cache)[0].stat().st_size in (100_000, max(size, 700_000))
    cache.put_many({"k299": "recomputed"})
    assert ResultCache(full_cache.parent).get_many(["k299"]) == {"k299": "recomputed"}


def test_a_second_process_on_the_corrupt_file_follows_the_first_to_the_fresh_one(full_cache):
    first, second = ResultCache(full_cache.parent), ResultCache(full_cache.parent)
    assert first.get_many(["k0"]) == second.get_many(["k0"]) == {"k0": ANSWERS["k0"]}
    full_cache.write_bytes(b"garbage" * 100_000)  # in place: both connections see it
    with pytest.warns(CacheWarning, match="moved it aside"):
        assert first.get_many(["k299"]) == {}
    first.put_many({"k299": "recomputed"})
    with pytest.warns(CacheWarning) as record:
        assert second.get_many(["k299", "k1"]) == {"k299": "recomputed"}
    only_warning(record, full_cache, "another process moved it aside")
    [aside] = asides(full_cache)
    assert Path(f"{aside}-wal").exists()  # its siblings went with it


class _FailingWrites(sqlite3.Connection):
    error = sqlite3.OperationalError(READ_ONLY)

    def executemany(self, sql, rows):
        raise self.error


def fail_writes(monkeypatch, error: sqlite3.Error, times: int = 1_000) -> None:
    """The next `times` connections raise `error` on every batch write."""
    real_connect = sqlite3.connect
    left = [times]

    def connect(*args, **kwargs):
        left[0] -= 1
        if left[0] < 0:
            return real_connect(*args, **kwargs)
        return real_connect(*args, factory=_FailingWrites, **kwargs)

    monkeypatch.setattr(_FailingWrites, "error", error)
    monkeypatch.setattr(sqlite3, "connect", connect)


def test_corruption_found_at_write_time_keeps_the_batch_in_a_fresh_file(full_cache, monkeypatch):
    fail_writes(monkeypatch, sqlite3.DatabaseError("database disk image is malformed"), times=1)
    cache = ResultCache(full_cache.parent)
    with pytest.warns(CacheWarning) as record:
        cache.put_many({"new": "just computed"})
    only_warning(record, full_cache, "moved it aside")
    assert len(asides(full_cache)) == 1
    assert ResultCache(full_cache.parent).get_many(["new", "k0"]) == {"new": "just computed"}


@pytest.mark.parametrize("error", [READ_ONLY, "database or disk is full"])
def test_an_unwritable_cache_warns_once_and_still_serves_reads(full_cache, monkeypatch, error):
    fail_writes(monkeypatch, sqlite3.OperationalError(error))
    cache = ResultCache(full_cache.parent)
    with pytest.warns(CacheWarning) as record:
        cache.put_many({"new": "1"})
    only_warning(record, full_cache, error)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.put_many({"newer": "2"})  # skipped quietly: warned once already
        assert cache.get_many(ANSWERS) == ANSWERS
    monkeypatch.undo()
    assert ResultCache(full_cache.parent).get_many(["new", "newer", "k1"]) == {"k1": ANSWERS["k1"]}


def test_a_cache_that_only_opens_read_only_serves_every_answer(full_cache, monkeypatch):
    real_connect = sqlite3.connect

    def connect(database, *args, uri=False, **kwargs):
        if not uri:  # a read-write open; the cache's mode=ro URI fallback really is read-only
            raise sqlite3.OperationalError(READ_ONLY)
        return real_connect(database, *args, uri=uri, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    with pytest.warns(CacheWarning) as record:
        cache = ResultCache(full_cache.parent)
    only_warning(record, full_cache, "not writable")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get_many(ANSWERS) == ANSWERS and len(cache) == len(ANSWERS)
        cache.put_many({"new": "1"})
    monkeypatch.undo()
    assert ResultCache(full_cache.parent).get_many(["new"]) == {}


def test_a_corrupt_file_that_cannot_be_moved_aside_runs_uncached(tmp_path, monkeypatch):
    path = tmp_path / "results.sqlite"
    make_garbage(path)

    def refuse(self, target):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.warns(CacheWarning) as record:
        cache = ResultCache(tmp_path)
    only_warning(record, path, "cannot be moved aside")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.put_many({"a": "1"})
        assert cache.get_many(["a"]) == {} and len(cache) == 0
    assert path.read_bytes() == b"not a database " * 100 and asides(path) == []


def test_a_read_only_directory_serves_a_full_cache(full_cache):
    """A real read-only dir: root is stripped of its permission override by `setpriv`."""
    argv = [sys.executable, "-c", READ_ONLY_SCRIPT, str(full_cache.parent)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root's file-permission override")
        argv = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", *argv]
    full_cache.parent.chmod(0o555)
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    finally:
        full_cache.parent.chmod(0o755)
    if out.returncode != 0 and out.stderr.startswith("setpriv"):
        pytest.skip(f"setpriv cannot drop capabilities here: {out.stderr}")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["served"] == len(ANSWERS) and result["after_put"] == len(ANSWERS)
    [message] = result["warnings"]
    assert str(full_cache) in message and "not writable" in message and "cache=False" in message
    assert sorted(os.listdir(full_cache.parent)) == ["results.sqlite"]


READ_ONLY_SCRIPT = """
import json, sys, warnings
from llmudf.runtime.cache import ResultCache
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    cache = ResultCache(sys.argv[1])
    served = len(cache.get_many(f"k{i}" for i in range(300)))
    cache.put_many({"new": "1"})
    after_put = len(cache)
print(json.dumps({"served": served, "after_put": after_put,
                  "warnings": [str(w.message) for w in record]}))
"""


def test_a_query_over_a_corrupted_cache_returns_the_same_answers(tiny_config, tmp_path):
    spec, client = bind_call("llm_filter"), get_client(tiny_config)
    rows = pa.table({"title": ["Up", "Heat", "Up", "Alien"]})
    cache = ResultCache(tmp_path)
    first = run_call(spec, "Keep?", rows, tiny_config, client, cache)
    cache.close()
    (tmp_path / "results.sqlite").write_bytes(b"\x00garbage" * 64)
    with pytest.warns(CacheWarning, match="moved it aside"):
        cache = ResultCache(tmp_path)
    again = run_call(spec, "Keep?", rows, tiny_config, client, cache)
    assert again.answers.equals(first.answers) and again.stats.num_sent == 3
    third = run_call(spec, "Keep?", rows, tiny_config, client, cache)
    assert third.answers.equals(first.answers) and third.stats.num_cache_hits == 3
