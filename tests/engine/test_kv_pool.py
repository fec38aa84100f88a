import pytest
import torch

from llmudf.engine.config import EngineConfig
from llmudf.engine.kv_pool import KVPool, KVShape

SHAPE = KVShape(num_layers=3, num_kv_heads=2, head_dim=8, page_size=4)


def test_pages_are_preallocated_per_layer():
    pool = KVPool(SHAPE, 10, dtype=torch.float32)
    assert len(pool.k_caches) == len(pool.v_caches) == 3
    assert pool.k_caches[0].shape == (10, 4, 2, 8)
    assert pool.kv_caches[2][1] is pool.v_caches[2]


def test_allocate_free_and_refcounts():
    pool = KVPool(SHAPE, 4)
    pages = pool.allocate(3)
    assert sorted(pages) == [0, 1, 2] and pool.num_free_pages == 1
    assert not pool.can_allocate(2)
    pool.inc_ref(pages[:1])
    assert pool.dec_ref(pages) == 2  # page 0 is still referenced once
    assert pool.ref_count(pages[0]) == 1
    assert pool.dec_ref(pages[:1]) == 1
    assert pool.num_free_pages == 4
    with pytest.raises(RuntimeError, match="already free"):
        pool.dec_ref(pages[:1])
    with pytest.raises(RuntimeError, match="is free"):
        pool.inc_ref([3])
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.allocate(5)


def test_sized_from_a_byte_budget():
    per_page = 2 * 3 * 4 * 2 * 8 * 4  # K and V, layers, page, heads, dim, fp32 bytes
    assert SHAPE.bytes_per_page(torch.float32) == per_page
    assert SHAPE.bytes_per_page(torch.bfloat16) == per_page // 2
    assert KVPool.from_budget(SHAPE, 7 * per_page + 5).num_pages == 7
    with pytest.raises(ValueError, match="holds no page"):
        KVPool.from_budget(SHAPE, per_page - 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(page_size=0), "page_size"),
        (dict(kv_cache_fraction=1.5), "kv_cache_fraction"),
        (dict(kv_cache_bytes=0), "kv_cache_bytes"),
        (dict(num_kv_pages=0), "num_kv_pages"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(prompt_overflow="drop"), "prompt_overflow"),
        (dict(schedule_policy="random"), "schedule_policy"),
        (dict(dtype="int8"), "dtype"),
        (dict(device="gpu"), "device"),
    ],
)
def test_engine_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(**kwargs)


def test_engine_config_resolves_auto_device_and_dtype():
    cfg = EngineConfig()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert cfg.torch_device.type == expected
    assert cfg.torch_dtype == (torch.bfloat16 if expected == "cuda" else torch.float32)
    assert EngineConfig(device="cpu", dtype="bfloat16").torch_dtype == torch.bfloat16


def test_a_before_layer_hook_runs_as_each_layers_caches_are_taken():
    pool = KVPool(SHAPE, 2)
    plain = pool.kv_caches
    assert isinstance(plain, list) and plain[1][0] is pool.k_caches[1]
    taken = []
    pool.before_layer = taken.append
    caches = pool.kv_caches  # taken once, like the model runner does
    for layer, (k, v) in enumerate(caches):
        assert taken == list(range(layer + 1))  # waited for right before its use
        assert k is pool.k_caches[layer] and v is pool.v_caches[layer]
    assert len(caches) == 3 and caches[-1][1] is pool.v_caches[2] and taken[-1] == 2
    with pytest.raises(IndexError):
        caches[3]
