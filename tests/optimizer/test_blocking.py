"""Blocking for the semantic join (optimizer/blocking.py): which pairs are asked."""

import numpy as np
import pytest

from llmudf.optimizer.blocking import all_pairs, block_pairs


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def vectors():
    rng = np.random.default_rng(0)
    left = unit(rng.normal(size=(40, 16)))
    right = unit(
        np.concatenate([left + 0.3 * rng.normal(size=left.shape), rng.normal(size=(60, 16))])
    )
    return left, right


def test_small_products_ask_every_pair(vectors):
    left, right = vectors
    got = block_pairs(left[:3], right[:5])
    assert got.summary.mode == "all pairs" and got.summary.num_candidates == 15
    assert got.summary.estimated_recall == 1.0
    none = all_pairs(3, 5)
    assert none.left.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert none.right.tolist() == list(range(5)) * 3


def test_top_k_keeps_each_left_values_nearest_and_groups_by_left(vectors):
    left, right = vectors
    got = block_pairs(left, right, k=4, cut=1.1, max_all_pairs=0)
    assert got.summary.k == 4 and got.summary.num_candidates == 4 * len(left)
    assert np.all(np.diff(got.left) >= 0)  # pairs that share a left value are consecutive
    sims = left @ right.T
    for i in range(len(left)):
        kept = got.right[got.left == i]
        assert set(kept) == set(np.argsort(-sims[i])[:4])
        assert list(kept) == sorted(kept, key=lambda j: -sims[i, j])  # nearest first


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.7])
def test_blocking_never_loses_a_pair_above_the_cut(vectors, cut):
    left, right = vectors
    got = block_pairs(left, right, k=1, cut=cut, max_all_pairs=0)
    kept = set(zip(got.left.tolist(), got.right.tolist(), strict=True))
    above = {(int(i), int(j)) for i, j in zip(*np.nonzero(left @ right.T >= cut), strict=True)}
    assert above and above <= kept
    assert len(kept) == got.summary.num_candidates == len(got.left)


def test_k_is_chosen_to_reach_the_target_recall_estimate(vectors):
    left, right = vectors
    loose = block_pairs(left, right, target_recall=0.5, max_all_pairs=0)
    tight = block_pairs(left, right, target_recall=0.999, max_all_pairs=0)
    assert loose.summary.k < tight.summary.k
    assert loose.summary.estimated_recall >= 0.5
    assert tight.summary.estimated_recall > loose.summary.estimated_recall
    # the matches planted in `right` (row i of left ~ row i of right) are nearest
    kept = set(zip(tight.left.tolist(), tight.right.tolist(), strict=True))
    assert {(i, i) for i in range(len(left))} <= kept
    assert "estimated recall" in str(tight.summary)
