import datetime as dt
import random

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmudf.calls.prompt import render_template, render_user_message
from llmudf.optimizer import PlanOptions, plan_call, prefix_hit_rate

Q = "Is this movie suitable for children?"

ALL_OFF = PlanOptions(dedup=False, reorder_fields=False, reorder_rows=False)
SORT_ONLY = PlanOptions(reorder_fields=False)


@st.composite
def tables(draw, max_rows=30, max_fields=4, nulls=True):
    """Small tables with many repeated values (letters from a tiny alphabet)."""
    num_fields = draw(st.integers(1, max_fields))
    num_rows = draw(st.integers(0, max_rows))
    cell = st.sampled_from(["a", "bb", "ccc", "a long shared value"] + ([None] if nulls else []))
    return pd.DataFrame(
        {f"f{c}": [draw(cell) for _ in range(num_rows)] for c in range(num_fields)},
        dtype=object,
    )


def rows_of(df):
    return [dict(zip(df.columns, r, strict=True)) for r in df.itertuples(index=False)]


def assert_plan_answers_every_row(plan, df, instruction=Q):
    assert plan.num_rows == len(df)
    assert len(plan.field_orders) == len(plan.prompts) == len(plan.request_rows)
    for i, row in enumerate(rows_of(df)):
        j = plan.row_to_request[i]
        order = plan.field_orders[j]
        assert sorted(order) == sorted(df.columns)
        assert plan.prompts[j] == render_user_message(instruction, [(n, row[n]) for n in order])


@settings(max_examples=60, deadline=None)
@given(tables())
def test_every_row_maps_to_a_request_with_its_fields(df):
    for options in (PlanOptions(), ALL_OFF, SORT_ONLY, PlanOptions(dedup=False)):
        plan = plan_call(Q, df, options)
        assert_plan_answers_every_row(plan, df)


@settings(max_examples=40, deadline=None)
@given(tables(), st.randoms(use_true_random=False))
def test_plan_is_invariant_to_a_shuffle_of_the_input(df, rnd):
    order = list(range(len(df)))
    rnd.shuffle(order)
    shuffled = df.iloc[order].reset_index(drop=True)
    a, b = plan_call(Q, df), plan_call(Q, shuffled)
    assert a.prompts == b.prompts
    assert a.field_orders == b.field_orders
    assert [a.prompts[j] for j in a.row_to_request[order]] == [
        b.prompts[j] for j in b.row_to_request
    ]


def whole_lines(texts):
    """A tokenizer whose tokens are whole lines, one per character: PHR then counts the
    characters of whole shared lines, GGR's objective (a partly shared line counts 0)."""
    ids = {}
    return [
        [ids.setdefault(line, len(ids)) for line in t.split("\n") for _ in range(len(line) + 1)]
        for t in texts
    ]


@settings(max_examples=80, deadline=None)
@given(tables(max_rows=40))
def test_ggr_shares_at_least_as_much_as_the_given_order(df):
    def phr(options):
        return prefix_hit_rate(plan_call(Q, df, options).prompts, tokenize=whole_lines)

    ggr = phr(PlanOptions(dedup=False))
    assert ggr >= phr(ALL_OFF) - 1e-12
    assert ggr >= phr(PlanOptions(dedup=False, reorder_fields=False)) - 1e-12


def test_dedup_computes_identical_rows_once():
    df = pd.DataFrame({"title": ["Up", "Heat", "Up", "Up"], "year": [2009, 1995, 2009, 2009]})
    plan = plan_call(Q, df)
    assert plan.num_requests == 2
    assert plan.dedup_ratio == 2.0
    assert plan.row_to_request[0] == plan.row_to_request[2] == plan.row_to_request[3]
    assert plan.scatter(["yes", "no"]) == [["yes", "no"][j] for j in plan.row_to_request.tolist()]
    with pytest.raises(ValueError, match="expected 2 answers"):
        plan.scatter(["yes"])
    assert plan_call(Q, df, PlanOptions(dedup=False)).num_requests == 4


def test_ggr_puts_the_shared_field_first():
    df = pd.DataFrame(
        {"actor": ["Ann", "Bob", "Cy", "Dee"], "title": ["Heat", "Heat", "Heat", "Up"]}
    )
    plan = plan_call(Q, df)
    heat = [o for o, p in zip(plan.field_orders, plan.prompts, strict=True) if "Heat" in p]
    assert heat == [("title", "actor")] * 3
    off = plan_call(Q, df, PlanOptions(reorder_fields=False))
    assert set(off.field_orders) == {("actor", "title")}


def test_switching_row_order_off_keeps_first_seen_order():
    df = pd.DataFrame({"x": ["c", "a", "b", "a"]})
    plan = plan_call(Q, df, PlanOptions(reorder_rows=False))
    assert [p[-1] for p in plan.prompts] == ["c", "a", "b"]
    assert plan.row_to_request.tolist() == [0, 1, 2, 1]
    assert [p[-1] for p in plan_call(Q, df).prompts] == ["a", "b", "c"]


def test_functionally_dependent_columns_stay_together():
    rng = random.Random(0)
    ids = [rng.randrange(40) for _ in range(300)]
    df = pd.DataFrame(
        {
            "lang": [["en", "fr"][i % 2] for i in ids],
            "id": ids,
            "actor": [f"actor {rng.randrange(1000)}" for _ in ids],
            "title": [f"Movie number {i}" for i in ids],
        }
    )
    plan = plan_call(Q, df)
    assert ("id", "title") in plan.field_groups
    for order in plan.field_orders:
        assert abs(order.index("id") - order.index("title")) == 1
        assert order[-1] == "actor"
    off = plan_call(Q, df, PlanOptions(detect_dependencies=False))
    assert off.field_groups == ()


def test_edge_cases_empty_one_row_one_field_all_equal_all_unique():
    empty = plan_call(Q, pa.table({"a": pa.array([], pa.string())}))
    assert empty.prompts == [] and empty.row_to_request.tolist() == []
    one = plan_call(Q, pd.DataFrame({"a": ["x"], "b": [1]}))
    assert one.prompts == [f"{Q}\n\na: x\nb: 1"] and one.row_to_request.tolist() == [0]
    same = plan_call(Q, pd.DataFrame({"a": ["x"] * 5, "b": [2] * 5}))
    assert same.num_requests == 1 and same.row_to_request.tolist() == [0] * 5
    unique = pd.DataFrame({"a": [f"v{i}" for i in range(20)]})
    plan = plan_call(Q, unique)
    assert plan.num_requests == 20
    assert plan.prompts == sorted(plan.prompts)
    no_fields = plan_call(Q, pa.table({"a": [1, 2]}).select([]))
    assert no_fields.prompts == [Q] and no_fields.row_to_request.tolist() == [0, 0]


def test_nulls_are_left_out_and_distinct_from_empty_text():
    df = pd.DataFrame({"a": ["x", None, "x", ""], "b": [None, None, None, None]}, dtype=object)
    plan = plan_call(Q, df)
    assert_plan_answers_every_row(plan, df)
    assert sorted(plan.prompts) == sorted([f"{Q}\n\na: x", Q, f"{Q}\n\na: "])
    assert plan.num_requests == 3


def test_non_string_types_render_as_prompt_module_renders_them():
    values = {
        "i": pa.array([1, 2, 1], pa.int64()),
        "f": pa.array([1.0, 2.5, 1.0]),
        "d": pa.array([dt.date(2020, 1, 2), None, dt.date(2020, 1, 2)]),
        "ts": pa.array([dt.datetime(2020, 1, 2, 3, 4)] * 3),
        "l": pa.array([[1, 2], [3], [1, 2]]),
        "s": pa.array([{"k": "v"}] * 3),
        "b": pa.array([True, False, True]),
    }
    table = pa.table(values)
    plan = plan_call(Q, table)
    assert plan.num_requests == 2
    df = pd.DataFrame({k: v.to_pylist() for k, v in values.items()})
    assert_plan_answers_every_row(plan, df)
    first = plan.prompts[plan.row_to_request[0]]
    for line in [
        "i: 1",
        "f: 1",
        "d: 2020-01-02",
        "ts: 2020-01-02 03:04:00",
        "l: [1, 2]",
        'k": "v"',
        "b: true",
    ]:
        assert line in first
    # the same values from pandas (numpy scalars, NaN) plan to the same prompts
    assert plan_call(Q, df).prompts == plan.prompts


def test_long_and_unicode_values():
    long = "x" * 5000
    df = pd.DataFrame(
        {"t": ["Amélie 🎬", "Amélie 🎬", "東京物語"], "plot": [long, long + "y", long]}
    )
    plan = plan_call(Q, df)
    assert_plan_answers_every_row(plan, df)
    assert plan.num_requests == 3


def test_fixed_template_gets_dedup_and_row_order_only():
    df = pd.DataFrame({"title": ["Up", "Heat", "Up"], "year": [2009, 1995, 2009], "x": [1, 2, 3]})
    template = "Is {title} ({year}) a comedy?"
    plan = plan_call("ignored", df, PlanOptions(template=template))
    assert plan.prompts == ["Is Heat (1995) a comedy?", "Is Up (2009) a comedy?"]
    assert plan.row_to_request.tolist() == [1, 0, 1]
    assert set(plan.field_orders) == {("title", "year")}
    for i, row in enumerate(rows_of(df)):
        assert plan.prompts[plan.row_to_request[i]] == render_template(template, row)


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['genre'\]"):
        plan_call(Q, pd.DataFrame({"title": ["Up"]}), PlanOptions(template="{genre}"))
    with pytest.raises(ValueError, match="must name a field"):
        plan_call(Q, pd.DataFrame({"title": ["Up"]}), PlanOptions(template="{}"))
    with pytest.raises(TypeError, match="pyarrow.Table or pandas.DataFrame"):
        plan_call(Q, [{"title": "Up"}])
    with pytest.raises(TypeError, match="instruction must be a str"):
        plan_call(None, pd.DataFrame({"title": ["Up"]}))
    with pytest.raises(ValueError, match=r"duplicate field name\(s\) \['a'\]"):
        plan_call(Q, pd.DataFrame([[1, 2]], columns=["a", "a"]))
    with pytest.raises(ValueError, match="max_depth"):
        PlanOptions(max_depth=-1)


def test_request_rows_point_at_an_input_row_of_each_request():
    df = pd.DataFrame({"a": list("xyxzy"), "b": list("11211")})
    plan = plan_call(Q, df)
    assert np.array_equal(plan.row_to_request[plan.request_rows], np.arange(plan.num_requests))


def test_an_all_null_arrow_column_is_left_out_of_every_prompt():
    table = pa.table({"a": pa.array([None, None, None], pa.string()), "b": ["x", "y", "x"]})
    plan = plan_call("Q?", table)
    assert plan.prompts == ["Q?\n\nb: x", "Q?\n\nb: y"]
    assert plan.row_to_request.tolist() == [0, 1, 0]
    assert plan_call("Q?", pa.table({"a": pa.array([None, None], pa.null())})).prompts == ["Q?"]
