"""EXPLAIN's per-strategy prompt work (original order / dedup / dedup + GGR order), its
HTML table and its matplotlib plot."""

import matplotlib
import numpy as np
import pyarrow as pa
import pytest

from llmudf.optimizer.explain import STRATEGIES, LLMExplain, explain_call
from llmudf.optimizer.metrics import prefix_hits
from llmudf.optimizer.plan import plan_call

matplotlib.use("Agg")

# duplicates spread out, and genres whose prompts share long prefixes once grouped
FIELDS = pa.table(
    {
        "genre": ["Crime drama", "Animated comedy"] * 6 + ["Crime drama", "Western"],
        "title": ["Heat", "Up", "Se7en", "Cars", "Heat", "Up", "Fargo", "Coco"]
        + ["Heat", "Up", "Se7en", "Cars", "Heat", "Rango"],
    }
)


def _window1(prompts, tokenize=None, render=None) -> tuple[int, int]:
    hits, lengths = prefix_hits(prompts, tokenize, render, window=1)
    return int(lengths.sum()), int(hits.sum())


def _byte_tokenize(texts):
    return [list(t.encode()) for t in texts]


@pytest.mark.parametrize("tokenize, render", [(None, None), (_byte_tokenize, "<s>{}</s>".format)])
def test_strategies_match_prefix_hits_of_each_send_order(tokenize, render):
    plan = plan_call("Which genre is this movie?", FIELDS)
    info = explain_call("llm #1 in SELECT", "Q", plan, tokenize=tokenize, render=render)
    per_row = [plan.prompts[j] for j in plan.row_to_request.tolist()]
    orders = (per_row, list(dict.fromkeys(per_row)), plan.prompts)
    assert [s.name for s in info.strategies] == list(STRATEGIES)
    for strategy, prompts in zip(info.strategies, orders, strict=True):
        expected = _window1(prompts, tokenize, render)
        assert (strategy.prompt_units, strategy.cached_units) == expected
        assert strategy.num_prompts == len(prompts)
    original, dedup, ggr = (s.computed_units for s in info.strategies)
    assert original > dedup > ggr > 0
    phr = [s.prefix_hit_rate for s in info.strategies]
    assert phr[2] > phr[1]


def test_row_counts_stand_for_rows_made_distinct_in_sql():
    distinct = pa.table({"title": ["Heat", "Up", "Cars"]})
    plan = plan_call("Q", distinct)
    info = explain_call("s", "Q", plan, row_counts=[3, 1, 2])
    original, dedup, ggr = info.strategies
    row_lengths = [len(plan.prompts[j]) for j in plan.row_to_request.tolist()]
    assert info.num_rows == original.num_prompts == 6
    assert original.prompt_units == int(np.dot([3, 1, 2], row_lengths))
    assert dedup.num_prompts == ggr.num_prompts == 3
    assert original.computed_units >= dedup.computed_units >= ggr.computed_units
    with pytest.raises(ValueError, match="row_counts"):
        explain_call("s", "Q", plan, row_counts=[1, 2])


def test_an_empty_call_site_costs_nothing():
    info = explain_call("s", "Q", plan_call("Q", FIELDS.slice(0, 0)))
    assert [(s.num_prompts, s.prompt_units, s.cached_units) for s in info.strategies] == [
        (0, 0, 0)
    ] * 3


def test_plot_draws_the_computed_units_and_hit_rates_of_each_site():
    from matplotlib.figure import Figure

    first = explain_call("llm #1 in SELECT", "Q", plan_call("Genre?", FIELDS))
    second = explain_call("llm_filter #2 in WHERE", "F", plan_call("Old?", FIELDS.select([1])))
    fig = LLMExplain("SELECT 1", (first, second)).plot()
    assert isinstance(fig, Figure)
    assert not matplotlib.pyplot.get_fignums()  # returned, not left open in pyplot
    assert len(fig.axes) == 2
    for ax, site in zip(fig.axes, (first, second), strict=True):
        heights = [bar.get_height() for bar in ax.patches]
        assert heights == [s.computed_units for s in site.strategies]
        labels = [t.get_text() for t in ax.texts]
        assert labels == [f"PHR {s.prefix_hit_rate:.0%}" for s in site.strategies]
        assert ax.get_title() == site.site and "chars" in ax.get_ylabel()
    assert np.all(np.diff([b.get_height() for b in fig.axes[0].patches]) < 0)
    with pytest.raises(ValueError, match="no LLM call site"):
        LLMExplain("SELECT 1", ()).plot()


def test_html_shows_the_numbers_escaped():
    fields = pa.table({"title": ["<b>Heat</b>"] * 1200 + ["Up"]})
    info = explain_call("llm #1 in <SELECT>", "Is it <i>good</i>?", plan_call("Q", fields))
    html = LLMExplain("SELECT '<x>' AS a", (info,))._repr_html_()
    assert "<b>" not in html and "<i>" not in html and "<SELECT>" not in html
    assert "&lt;i&gt;good&lt;/i&gt;" in html and "llm #1 in &lt;SELECT&gt;" in html
    assert "&lt;x&gt;" in html
    assert "<td>1,201</td><td>2</td>" in html  # rows, prompts after dedup
    assert f"<td>{info.prompt_units:,} chars</td><td>{info.cached_units:,} chars</td>" in html
    assert f"<td>{info.prefix_hit_rate:.0%}</td>" in html
    original = info.strategies[0]
    assert f"<td>{original.name}</td><td>1,201</td><td>{original.computed_units:,} chars" in html
