import itertools

import numpy as np
import pandas as pd
import pytest

from llmudf.optimizer import SearchTooLarge, exact_optimum, plan_call, prefix_hit_rate
from llmudf.optimizer.exact import exact_orders, upper_bound
from llmudf.optimizer.ggr import ggr_orders, shared_line_chars


def trie_gain(codes, weights, orders):
    """Characters of whole lines shared with any earlier row, by walking a dict trie."""
    seen, total = set(), 0
    for i in range(len(codes)):
        path = ()
        for g in orders[i]:
            path += ((int(g), int(codes[i, g])),)
            if path in seen:
                total += int(weights[g][codes[i, g]])
            seen.add(path)
    return total


def brute_force(codes, weights):
    perms = list(itertools.permutations(range(codes.shape[1])))
    return max(
        trie_gain(codes, weights, np.array(choice))
        for choice in itertools.product(perms, repeat=len(codes))
    )


def random_case(rng, max_rows, max_fields):
    codes = rng.integers(0, 3, (rng.integers(2, max_rows + 1), rng.integers(1, max_fields + 1)))
    codes = np.unique(codes, axis=0)
    weights = tuple(rng.integers(1, 10, 3) for _ in range(codes.shape[1]))
    return codes, weights


def test_exact_equals_brute_force_on_tiny_tables():
    rng = np.random.default_rng(7)
    checked = 0
    while checked < 120:
        codes, weights = random_case(rng, 5, 3)
        if len(list(itertools.permutations(range(codes.shape[1])))) ** len(codes) > 8000:
            continue
        orders, gain = exact_orders(codes, weights)
        assert gain == brute_force(codes, weights)
        assert trie_gain(codes, weights, orders) == gain
        checked += 1


def test_exact_is_never_below_ggr_and_its_orders_achieve_its_value():
    rng = np.random.default_rng(3)
    for _ in range(60):
        codes, weights = random_case(rng, 30, 4)
        orders, gain = exact_orders(codes, weights)
        greedy = ggr_orders(codes, weights)
        assert shared_line_chars(codes, weights, greedy) == trie_gain(codes, weights, greedy)
        assert trie_gain(codes, weights, orders) == gain >= trie_gain(codes, weights, greedy)
        assert upper_bound(codes, weights) >= gain


def test_ggr_equals_the_optimum_on_hand_made_cases():
    # a join: movie fields repeat per cast member; the movie goes first, the actor last
    join = pd.DataFrame(
        {
            "actor": ["Ann", "Bob", "Cy", "Dee", "Ann", "Eve"],
            "title": ["Heat", "Heat", "Heat", "Up", "Up", "Up"],
            "year": [1995, 1995, 1995, 2009, 2009, 2009],
            "lang": ["en"] * 6,
        }
    )
    # nested values: language > country > city
    nested = pd.DataFrame(
        {
            "city": ["Paris", "Lyon", "Rome", "Milan", "Paris", "Nice"],
            "country": ["France", "France", "Italy", "Italy", "France", "France"],
            "lang": ["French", "French", "Italian", "Italian", "French", "French"],
            "id": [1, 2, 3, 4, 5, 6],
        }
    )
    # cross-cutting fields where the longer, rarer value must win
    cross = pd.DataFrame(
        {"a": ["x", "x", "y", "y"], "b": ["a much longer shared value"] * 2 + ["p", "q"]}
    )
    for df in (join, nested, cross):
        ggr, best = plan_call("Q", df), exact_optimum("Q", df)
        assert prefix_hit_rate(ggr.prompts) == pytest.approx(prefix_hit_rate(best.prompts))
    assert plan_call("Q", join).field_orders[0][-1] == "actor"


def test_exact_plan_answers_every_row():
    df = pd.DataFrame({"a": ["x", "x", "y", "x"], "b": [1, 2, 1, 1]})
    plan = exact_optimum("Q", df)
    assert plan.num_requests == 3
    for i, (a, b) in enumerate(zip(df.a, df.b, strict=True)):
        lines = plan.prompts[plan.row_to_request[i]].split("\n\n")[1].splitlines()
        assert sorted(lines) == sorted([f"a: {a}", f"b: {b}"])


def test_search_budget_is_a_clear_error():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(rng.integers(0, 3, (60, 5)), columns=list("abcde"))
    with pytest.raises(SearchTooLarge, match="exact search passed 5 subproblems"):
        exact_optimum("Q", df, max_states=5)
