"""llmudf.optimizer: make one LLM call site cheap before it reaches the engine.

Pure functions over Arrow / pandas / numpy (no torch, no engine): dedup identical prompts,
order fields per row and rows (GGR) so consecutive prompts share long prefixes, the exact
optimum for small tables, the prefix-hit-rate metric and the cost estimate for EXPLAIN.

>>> import pyarrow as pa
>>> from llmudf.optimizer import plan_call, prefix_hit_rate
>>> t = pa.table({"id": [1, 2, 3, 4], "lang": ["en", "fr", "en", "fr"]})
>>> plan = plan_call("Translate the id", t)
>>> plan.prompts[0].splitlines()[2:], plan.row_to_request.tolist()
(['lang: en', 'id: 1'], [0, 2, 1, 3])
"""

from llmudf.optimizer.exact import SearchTooLarge, exact_optimum
from llmudf.optimizer.metrics import CostEstimate, estimate_cost, prefix_hit_rate, prefix_hits
from llmudf.optimizer.plan import CallPlan, PlanOptions, plan_call

__all__ = [
    "CallPlan",
    "CostEstimate",
    "PlanOptions",
    "SearchTooLarge",
    "estimate_cost",
    "exact_optimum",
    "plan_call",
    "prefix_hit_rate",
    "prefix_hits",
]
