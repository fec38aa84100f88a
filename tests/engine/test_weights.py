import json
import shutil

import numpy as np
import pytest
import torch

from llmudf.engine.models import tiny_config
from llmudf.engine.weights import _undo_rotary_permute, load_model


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows of Llama models."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model not found: .*nowhere.*config\.json"):
        load_model(tmp_path / "nowhere")


def test_a_file_that_is_not_gguf_is_rejected(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is not a .gguf file"):
        load_model(tmp_path / "model.bin")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json in"):
        load_model(tmp_path)


def test_folder_without_weights(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(
        FileNotFoundError, match=r"no \*\.safetensors weights in .*pytorch_model\.bin"
    ):
        load_model(tmp_path)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
            "unsupported rope scaling 'yarn'",
        ),
        ({"num_key_value_heads": 3}, "not a multiple"),
    ],
)
def test_unsupported_config_names_folder_and_problem(tmp_path, tiny_model_dir, change, match):
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=match) as err:
        load_model(tmp_path / "m")
    assert str(tmp_path / "m") in str(err.value)


def test_missing_or_misshapen_tensor(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_model_dir / "model.safetensors")
    shutil.copytree(tiny_model_dir, tmp_path / "m")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing weights .*layers\.1\.self_attn\.qkv_proj"):
        load_model(tmp_path / "m")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"k_proj.weight' has shape \(3, 64\), expected \(32, 64\)"
    ):
        load_model(tmp_path / "m")


def test_sharded_safetensors_load_the_same_weights(tmp_path, make_tiny_model_dir):
    from transformers import AutoModelForCausalLM

    folder = make_tiny_model_dir("qwen2")
    hf = AutoModelForCausalLM.from_pretrained(folder)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    for f in folder.glob("tokenizer*"):
        shutil.copy(f, tmp_path / f.name)
    whole, _, _ = load_model(folder)
    sharded, _, _ = load_model(tmp_path)
    for (name, a), (_, b) in zip(
        whole.state_dict().items(), sharded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_undo_rotary_permute_inverts_llama_cpp():
    weight = torch.randn(4 * 8, 5)
    for heads in (1, 2, 4):
        assert torch.equal(_undo_rotary_permute(llama_cpp_permute(weight, heads), heads), weight)
    assert not torch.equal(llama_cpp_permute(weight, 4), weight)


def write_gguf(path, hf_folder, tokenizer_dir):
    """A GGUF file as llama.cpp would write it: F32 norms, Q8_0 matrices, permuted q/k rows,
    the tokenizer and chat template in metadata."""
    import gguf
    from safetensors.torch import load_file

    cfg = tiny_config("llama")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + ["ĠĠ"]  # one merge, as BPE needs its result in the vocab
    tokens += [f"<pad{i}>" for i in range(cfg.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i < 3 else 1 for i in range(len(tokens))])
    writer.add_token_merges(["Ġ Ġ"])
    writer.add_eos_token_id(2)
    writer.add_bos_token_id(1)
    writer.add_chat_template(
        json.loads((tokenizer_dir / "tokenizer_config.json").read_text()).get("chat_template")
        or (tokenizer_dir / "chat_template.jinja").read_text()
    )
    names = {v: k for k, v in {**_layer_names(cfg.num_layers), **_global_names()}.items()}
    for name, tensor in load_file(hf_folder / "model.safetensors").items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor = llama_cpp_permute(
                tensor, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
            )
        data = tensor.numpy().astype(np.float32)
        if data.ndim == 2:
            raw = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(
                names[name], raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            writer.add_tensor(names[name], data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _global_names():
    return {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }


def _layer_names(num_layers):
    from llmudf.engine.weights import _GGUF_LAYER_NAMES

    return {
        f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight"
        for i in range(num_layers)
        for g, h in _GGUF_LAYER_NAMES.items()
    }


def test_gguf_is_dequantized_unpermuted_and_cached(
    tmp_path, monkeypatch, tiny_model_dir, tiny_tokenizer_dir
):
    from tests.engine.test_models import PagedSequences, prompts

    monkeypatch.setenv("LLMUDF_CACHE_DIR", str(tmp_path / "cache"))
    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(gguf_path, tiny_model_dir, tiny_tokenizer_dir)
    model, config, tokenizer = load_model(gguf_path)
    assert config.replace(max_position_embeddings=1024, bos_token_id=None) == tiny_config("llama")
    assert len(list((tmp_path / "cache" / "models").glob("tiny-*/model.safetensors"))) == 1
    reference, _, _ = load_model(tiny_model_dir)
    batch = dict(enumerate(prompts()))
    with torch.no_grad():
        ours, ref = PagedSequences(model).step(batch), PagedSequences(reference).step(batch)
    for i in batch:  # Q8_0 rounding only: the q/k rows are back in HF order
        torch.testing.assert_close(ours[i], ref[i], atol=0.15, rtol=0.02)
        assert ours[i].argmax(-1).eq(ref[i].argmax(-1)).float().mean() > 0.9
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert 2 in tokenizer.eos_token_ids
    again, _, _ = load_model(gguf_path)  # from the cache this time
    assert torch.equal(again.embed_tokens.weight, model.embed_tokens.weight)
