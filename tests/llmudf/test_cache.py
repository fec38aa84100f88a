import subprocess
import sys

import pytest

from llmudf.calls.prompt import ChatPrompt
from llmudf.runtime.cache import CacheWarning, ResultCache, cache_key


def test_key_covers_model_decoding_and_prompt():
    base = cache_key("m", {"max_tokens": 8}, ChatPrompt("Q"))
    assert base == cache_key("m", {"max_tokens": 8}, ChatPrompt("Q"))
    assert base != cache_key("m2", {"max_tokens": 8}, ChatPrompt("Q"))
    assert base != cache_key("m", {"max_tokens": 9}, ChatPrompt("Q"))
    assert base != cache_key("m", {"max_tokens": 8}, ChatPrompt("Q "))
    assert base != cache_key("m", {"max_tokens": 8}, ChatPrompt("Q", system=None))


def test_put_get_clear(tmp_path):
    cache = ResultCache(tmp_path)
    cache.put_many({f"k{i}": f"v{i}" for i in range(1200)})  # more than one SQL batch
    assert len(cache) == 1200
    got = cache.get_many(["k0", "k1199", "missing"])
    assert got == {"k0": "v0", "k1199": "v1199"}
    cache.clear()
    assert len(cache) == 0 and cache.get_many(["k0"]) == {}


def test_a_failed_batch_leaves_no_entry(tmp_path):
    cache = ResultCache(tmp_path)
    with pytest.warns(CacheWarning, match="NOT NULL"):
        cache.put_many({"a": "1", "b": None})  # the second entry fails mid-transaction
    assert cache.get_many(["a", "b"]) == {}


def test_entries_are_shared_across_processes(tmp_path):
    ResultCache(tmp_path).put_many({"here": "parent"})
    code = (
        "import sys; from llmudf.runtime.cache import ResultCache; c = ResultCache(sys.argv[1]); "
        "print(c.get_many(['here'])['here']); c.put_many({'there': 'child'})"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "parent"
    assert ResultCache(tmp_path).get_many(["there"]) == {"there": "child"}


def test_two_processes_writing_at_once_lose_no_batch(tmp_path):
    ResultCache(tmp_path)  # both writers open an existing WAL file
    code = (
        "import sys; from llmudf.runtime.cache import ResultCache; c = ResultCache(sys.argv[1]); "
        "[c.put_many({f'{sys.argv[2]}{b}-{i}': 'x' * 100 for i in range(50)}) for b in range(40)]"
    )
    writers = [
        subprocess.Popen([sys.executable, "-W", "error", "-c", code, str(tmp_path), name])
        for name in ("p", "q")
    ]
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    cache = ResultCache(tmp_path)
    assert len(cache) == 2 * 40 * 50
    assert cache.get_many(["p39-49", "q0-0"]) == {"p39-49": "x" * 100, "q0-0": "x" * 100}


def test_replacing_the_weights_at_the_same_path_changes_the_model_id(tmp_path):
    import os

    from llmudf.runtime.paths import weights_id

    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 10)
    before = weights_id(str(tmp_path))
    assert before == weights_id(str(tmp_path)) and before.startswith(str(tmp_path))
    weights.write_bytes(b"b" * 11)
    os.utime(weights, ns=(1, 1))
    assert weights_id(str(tmp_path)) != before
    assert weights_id(None).startswith("smollm2|SmolLM2")  # the default GGUF is stamped too
