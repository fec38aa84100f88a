"""Planning llm_reduce: content order, packing into prompts, and the SQL form."""

import random

import pytest

from llmudf.calls.functions import LLMCallError
from llmudf.optimizer.reduce import order_rows, pack, split_to_fit
from llmudf.optimizer.reduce_sql import rewrite_reduce


def test_order_is_the_same_for_any_input_order():
    rows = [f"title: movie {i % 7}" for i in range(30)] + ["", ""]
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert order_rows(shuffled) == order_rows(rows) == sorted(r for r in rows if r)


@pytest.mark.parametrize("seed", range(5))
def test_pack_fills_spans_within_the_limit(seed):
    rng = random.Random(seed)
    costs = [rng.randint(1, 30) for _ in range(200)]
    spans = pack(costs, overhead=20, limit=100)
    assert [i for s in spans for i in s] == list(range(200))  # consecutive, each item once
    assert all(20 + sum(costs[i] for i in s) <= 100 for s in spans)
    # greedy: the next item would not have fit in the span before it
    assert all(
        20 + sum(costs[i] for i in a) + costs[b.start] > 100
        for a, b in zip(spans[:-1], spans[1:], strict=True)
    )


def test_an_item_past_the_limit_gets_its_own_span():
    assert pack([5, 500, 5], overhead=10, limit=100) == [range(0, 1), range(1, 2), range(2, 3)]


def test_split_to_fit_halves_rejected_spans():
    limit = 10

    def fits(spans):
        return [len(s) * 3 <= limit for s in spans]  # the real cost: 3 per item

    spans, too_long = split_to_fit([range(0, 8)], fits)
    assert too_long == [] and [i for s in spans for i in s] == list(range(8))
    assert all(len(s) <= 3 for s in spans)
    _spans, too_long = split_to_fit([range(0, 1)], lambda spans: [False] * len(spans))
    assert too_long == [range(0, 1)]


def test_spark_sql_collects_named_structs():
    sql = "SELECT g, llm_reduce('Q', title, named_struct('plot', plot)) FROM t GROUP BY g"
    assert rewrite_reduce(sql, "spark") == (
        "SELECT g, __LLM_REDUCE_LISTS('Q', COLLECT_LIST(STRUCT(STRUCT(title AS `title`) AS `a1`, "
        "STRUCT(plot AS plot) AS `a2`))) AS `llm_reduce('Q', title, STRUCT(plot AS plot))` "
        "FROM t GROUP BY g"
    )


def test_queries_without_reduce_are_unchanged():
    sql = "select  llm('Q', title) from t"
    assert rewrite_reduce(sql) == sql


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT a FROM t JOIN u ON llm_reduce('Q', x) = 'y'", "cannot be in JOIN"),
        ("SELECT g FROM t GROUP BY g, llm_reduce('Q', x)", "cannot be in GROUP BY"),
        ("SELECT max(llm_reduce('Q', x)) FROM t", "nested in another aggregate"),
        ("SELECT g, upper(x), llm_reduce('Q', x) FROM t", "selects g, x row by row"),
    ],
)
def test_misplaced_reduce_is_an_error(sql, message):
    with pytest.raises(LLMCallError, match=f"llm_reduce #1: .*{message}"):
        rewrite_reduce(sql)


def test_row_columns_inside_aggregates_and_subqueries_are_fine():
    sql = "SELECT count(x), (SELECT max(y) FROM u), llm_reduce('Q', x) FROM t"
    assert "__LLM_REDUCE_LISTS" in rewrite_reduce(sql)


def test_a_misspelt_option_is_an_error_as_for_every_call():
    """The same option check as llm's: a near miss is named, real options pass."""
    sql = "SELECT g, llm_reduce('Q', title, {'max_token': 3}) FROM t GROUP BY g"
    with pytest.raises(LLMCallError, match="llm_reduce #1: unknown option 'max_token'.*max_tokens"):
        rewrite_reduce(sql)
    assert "__LLM_REDUCE_LISTS" in rewrite_reduce(sql.replace("max_token", "max_tokens"))
