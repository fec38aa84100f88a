"""The whole tiny model on the Triton kernels (CPU, Triton interpreter): the same greedy tokens
as the torch path; batch-, plan- and cache-invariant in deterministic mode; decode steps
padded to a CUDA-graph bucket (run eagerly here) give the same tokens; kernel selection."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # also set by tests/conftest.py

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton", reason="the Triton kernels need the triton package")
if not triton.knobs.runtime.interpret:
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

from llmudf.engine.config import EngineConfig  # noqa: E402
from llmudf.engine.cuda_graphs import DecodeGraphs  # noqa: E402
from llmudf.engine.engine import Engine  # noqa: E402
from llmudf.engine.models import build_model, tiny_config  # noqa: E402
from llmudf.engine.sampling import SamplingParams  # noqa: E402
from llmudf.engine.weights import check_fits, load_model  # noqa: E402
from llmudf.kernels import TORCH_KERNELS, select_kernels  # noqa: E402
from llmudf.kernels.select import triton_kernels  # noqa: E402

# small tiles and splits, so that a 40-token prompt crosses pages, query tiles and splits
TRITON = triton_kernels(
    deterministic=True, split_size=32, rows_per_tile=32, block_n=16, matmul_tiles=(64, 64, 64, 4, 1)
)
GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


def prompts():
    """Token-id prompts behind a shared 24-token prefix (the tiny tokenizer has 259 ids)."""
    shared = list(range(40, 64))
    return [shared + [70 + i, 80 + 2 * i, 90 + i * i % 7] * (1 + i) for i in range(3)]


def make_engine(model, tokenizer, **cfg):
    cfg = {"device": "cpu", "num_kv_pages": 64, "page_size": 4, **cfg}
    return Engine(EngineConfig(**cfg), model=model, tokenizer=tokenizer)


def tokens(outputs):
    return [o.token_ids for o in outputs]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    torch_model, _, tokenizer = load_model(tiny_model_dir)
    triton_model, _, _ = load_model(tiny_model_dir, kernels=TRITON)
    return torch_model, triton_model, tokenizer


@pytest.fixture(scope="module")
def expected(models):
    """The torch path's greedy tokens."""
    torch_model, _, tokenizer = models
    return tokens(make_engine(torch_model, tokenizer).generate(prompts(), GREEDY))


def test_triton_path_matches_the_torch_path(models, expected):
    torch_model, triton_model, tokenizer = models
    assert triton_model.ops is TRITON and torch_model.ops is TORCH_KERNELS
    cached = make_engine(triton_model, tokenizer).generate(prompts(), GREEDY)
    assert tokens(cached) == expected
    assert sum(o.num_cached_tokens for o in cached) > 0  # the shared prefix was reused


@pytest.mark.slow
def test_triton_answers_do_not_depend_on_batch_or_cache(models, expected):
    _, triton_model, tokenizer = models
    alone = make_engine(triton_model, tokenizer, enable_prefix_cache=False, max_num_seqs=1)
    assert tokens(alone.generate(prompts(), GREEDY)) == expected


def test_decode_steps_padded_to_a_graph_bucket(models, expected):
    _, triton_model, tokenizer = models
    engine = make_engine(triton_model, tokenizer)
    # the CUDA-graph path (static buffers, padding rows of length 0 and slot -1), run eagerly
    graphs = DecodeGraphs(
        triton_model, engine.pool.kv_caches, 4, 256, 8, torch.device("cpu"), False
    )
    engine.runner._graphs = graphs
    assert graphs.buckets == [1, 2, 4, 8]
    calls = []
    run = graphs.run
    graphs.run = lambda *args: calls.append(len(args[0])) or run(*args)
    assert tokens(engine.generate(prompts(), GREEDY)) == expected
    assert calls and set(calls) <= {1, 2, 3}  # decode steps went through the padded path


def test_kernel_selection_is_made_once_per_model():
    assert select_kernels("cpu") is TORCH_KERNELS
    assert select_kernels("cpu", "torch", deterministic=False) is TORCH_KERNELS
    assert select_kernels("cpu", "triton").name == "triton"  # the interpreter is on here
    assert not select_kernels("cpu", "triton", deterministic=False).deterministic
    with pytest.raises(ValueError, match="kernels must be one of"):
        select_kernels("cpu", "cuda")
    with pytest.raises(ValueError, match="kernels must be 'auto', 'torch' or 'triton'"):
        EngineConfig(device="cpu", kernels="fast")
    with pytest.raises(ValueError, match="cannot be captured"):
        DecodeGraphs(build_model(tiny_config()), [], 4, 64, 8, torch.device("cpu"), False)


def test_a_model_too_big_for_the_gpu_is_a_clear_error(monkeypatch):
    import llmudf.engine.weights as weights

    monkeypatch.setattr(weights, "free_device_memory", lambda device: 10 << 30)
    big = tiny_config(hidden_size=4096, intermediate_size=14336, num_layers=32, vocab_size=128256)
    big = big.replace(num_heads=32, num_kv_heads=8, head_dim=128)
    with pytest.raises(MemoryError, match=r"needs 15\.0 GiB .* has 10\.0 GiB free"):
        check_fits(big, torch.device("cuda"), torch.bfloat16)
    check_fits(big, torch.device("cpu"), torch.bfloat16)  # host memory is not checked


def test_loads_straight_into_the_target_dtype(tiny_model_dir, models):
    model, _, _ = load_model(tiny_model_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = models[0]
    for (name, ours), (_, ref) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        assert torch.equal(ours, ref.to(torch.bfloat16)), name
