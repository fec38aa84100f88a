import pyarrow as pa

from llmudf.optimizer.explain import LLMExplain, explain_call
from llmudf.optimizer.plan import PlanOptions, plan_call


def test_explain_counts_rows_requests_and_shared_prefix():
    fields = pa.table({"genre": ["Crime", "Crime", "Drama", "Crime"], "year": [1, 1, 2, 3]})
    plan = plan_call("Q", fields)
    info = explain_call("llm #1 in SELECT", "Q", plan, pushed=["filter a > 1"], num_rows=9)
    assert (info.num_rows, info.num_requests, info.unit) == (9, 3, "chars")
    assert info.field_order == ("genre", "year")
    assert info.prompt_units == sum(len(p) for p in plan.prompts)
    assert 0 < info.cached_units < info.prompt_units
    report = str(LLMExplain("SELECT 1", (info,)))
    assert "rows 9 -> 3 prompts after dedup" in report and "filter a > 1" in report


def test_explain_without_dedup_counts_every_row():
    fields = pa.table({"genre": ["Crime", "Crime"]})
    info = explain_call("s", "Q", plan_call("Q", fields, PlanOptions(dedup=False)))
    assert (info.num_rows, info.num_requests) == (2, 2)
    assert info.cached_units == len(plan_call("Q", fields).prompts[0])  # the 2nd is all cached
