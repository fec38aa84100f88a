"""all-MiniLM-L6-v2 from its wheel (engine/embedding.py) against transformers' own output of
the same model, mean-pooled by hand, one text at a time (no padding)."""

from __future__ import annotations

import numpy as np
import pytest

from llmudf.engine.embedding import (
    DEFAULT_DIMENSION,
    embed_dimension,
    get_embedder,
    resolve_embed_dir,
)

TEXTS = [
    "The Matrix",
    "matrix, the (1999)",
    "A long, rambling plot summary about a hacker who learns that the world is a simulation "
    "and joins a rebellion against the machines that built it.",
    "",
    "Heat",
]


@pytest.mark.slow
def test_embeddings_match_the_transformers_reference():
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_embed_dir(None)
    assert (folder / "model.safetensors").exists() and resolve_embed_dir(None) == folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    expected = []
    with torch.no_grad():
        for text in TEXTS:
            batch = tokenizer(text, return_tensors="pt")
            hidden = model(**batch).last_hidden_state[0]  # [S, H]
            mean = hidden.mean(0)
            expected.append((mean / mean.norm()).numpy())
    embedder = get_embedder()
    got = embedder.embed(TEXTS)  # batched: padded to the longest, then pooled over the mask
    assert got.shape == (len(TEXTS), DEFAULT_DIMENSION) == (5, embed_dimension(None))
    np.testing.assert_allclose(got, np.stack(expected), atol=2e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    sims = got @ got.T
    assert sims[0, 1] > 0.7 > sims[0, 4]  # the same movie, rewritten; another movie


def test_a_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="sentence-embedding folder"):
        resolve_embed_dir(tmp_path / "nothing")
