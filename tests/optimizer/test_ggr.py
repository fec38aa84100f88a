import numpy as np
import pandas as pd
import pytest

from llmudf.optimizer import PlanOptions, plan_call, prefix_hit_rate
from llmudf.optimizer.ggr import (
    GGRConfig,
    best_orders,
    fixed_order,
    ggr_orders,
    shared_line_chars,
    sort_rows,
)


def join_table(num_movies, rng):
    """One row per (movie, cast member), movie fields repeated as in a real join."""
    rows = []
    for m in range(num_movies):
        lang = ["English", "French", "Japanese"][rng.integers(3)]
        for _ in range(rng.integers(1, 8)):
            rows.append(
                (
                    f"Actor {rng.integers(400)}",
                    f"Movie title {m}",
                    int(1950 + m % 70),
                    lang,
                    ["PG", "R"][m % 2],
                )
            )
    return pd.DataFrame(rows, columns=["actor", "title", "year", "language", "rating"])


def test_ggr_beats_the_given_order_on_a_join():
    df = join_table(300, np.random.default_rng(0))
    ggr = prefix_hit_rate(plan_call("Q", df).prompts)
    original = prefix_hit_rate(plan_call("Q", df, PlanOptions(reorder_fields=False)).prompts)
    assert ggr > 2 * original
    assert ggr > 0.6


def test_rows_are_sent_depth_first():
    df = join_table(50, np.random.default_rng(1))
    plan = plan_call("Q", df)
    # in depth-first order, the previous prompt is always the best earlier match
    assert prefix_hit_rate(plan.prompts, window=1) == pytest.approx(prefix_hit_rate(plan.prompts))


def test_depth_and_gain_thresholds_fall_back_to_the_fixed_order():
    df = join_table(40, np.random.default_rng(2))
    flat = plan_call("Q", df, PlanOptions(max_depth=0))
    assert len(set(flat.field_orders)) == 1
    huge = plan_call("Q", df, PlanOptions(min_gain=10**9))
    assert set(huge.field_orders) == set(flat.field_orders)
    full = plan_call("Q", df)
    assert prefix_hit_rate(full.prompts) >= prefix_hit_rate(flat.prompts)


def test_fixed_order_ranks_fields_by_shareable_characters():
    codes = np.array([[0, 0, 0], [1, 0, 0], [2, 1, 0]])
    weights = (np.array([50, 50, 50]), np.array([3, 3]), np.array([4]))
    # field 2 shares 4 * 2, field 1 shares 3 * 1, field 0 nothing
    assert fixed_order(codes, weights).tolist() == [2, 1, 0]


def test_round_limit_keeps_orders_valid():
    rng = np.random.default_rng(5)
    codes = np.unique(rng.integers(0, 4, (300, 4)), axis=0)
    weights = tuple(rng.integers(1, 20, 4) for _ in range(4))
    for config in (GGRConfig(), GGRConfig(max_rounds=1)):
        orders = ggr_orders(codes, weights, config)
        assert (np.sort(orders, axis=1) == np.arange(4)).all()
    assert shared_line_chars(codes, weights, ggr_orders(codes, weights)) >= shared_line_chars(
        codes, weights, np.tile(np.arange(4), (len(codes), 1))
    )
    best = shared_line_chars(codes, weights, best_orders(codes, weights))
    for power in (1.0, 2.0):
        greedy = ggr_orders(codes, weights, GGRConfig(score_power=power))
        assert best >= shared_line_chars(codes, weights, greedy)
    perm = sort_rows(codes, orders)
    assert sorted(perm.tolist()) == list(range(len(codes)))


def test_solver_time_grows_about_linearly():
    df = join_table(3000, np.random.default_rng(6))
    small = df.iloc[: len(df) // 4]
    times = {}
    for name, table in (("small", small), ("large", df)):
        times[name] = min(plan_call("Q", table).solver_seconds for _ in range(3))
    # 4x the rows: n log n allows ~5x; 12x leaves room for a loaded machine
    assert times["large"] < 12 * times["small"]
