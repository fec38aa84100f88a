"""One LLM call site -> a plan: unique requests in send order, field order of each, row map.

>>> import pyarrow as pa
>>> t = pa.table({"title": ["Up", "Up", "Heat", "Cars"],
...               "genre": ["Kids", "Kids", "Crime", "Kids"]})
>>> plan = plan_call("Is it a comedy?", t)
>>> plan.num_requests, plan.row_to_request.tolist()
(3, [2, 2, 0, 1])
>>> plan.prompts[2]
'Is it a comedy?\\n\\ngenre: Kids\\ntitle: Up'
"""

from __future__ import annotations

import string
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from llmudf.calls.prompt import render_template, render_user_message
from llmudf.optimizer.encode import EncodedTable, encode, factorize_rows, group_fields, to_table
from llmudf.optimizer.ggr import GGRConfig, best_orders, sort_rows


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """What `plan_call` may do; each optimization can be switched off on its own.

    `template` is a fixed prompt with `{col}` placeholders: dedup and row order still apply,
    field order does not (the template fixes it). `max_depth` / `min_gain` are GGR's stop
    thresholds: levels of per-row field choice, and the fewest shared characters a value
    must save to be put first.
    """

    dedup: bool = True
    reorder_fields: bool = True
    reorder_rows: bool = True
    template: str | None = None
    max_depth: int = 16
    min_gain: int = 1
    detect_dependencies: bool = True

    def __post_init__(self):
        if self.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {self.max_depth}")
        if self.min_gain < 1:
            raise ValueError(f"min_gain must be >= 1 character, got {self.min_gain}")
        if self.template is not None and not isinstance(self.template, str):
            raise TypeError(f"template must be a str, got {type(self.template).__name__}")

    @classmethod
    def from_config(cls, config) -> PlanOptions:
        """The switches a caller's config sets: anything with `dedup`, `reorder_fields` and
        `reorder_rows` (a `llmudf.Config`, which the optimizer does not import)."""
        return cls(
            dedup=config.dedup,
            reorder_fields=config.reorder_fields,
            reorder_rows=config.reorder_rows,
        )


@dataclass(frozen=True, slots=True)
class CallPlan:
    """The requests of one call site. `row_to_request[i]` is the request answering input row i.

    Request j is `prompts[j]` (the user message: instruction, then fields in
    `field_orders[j]`; NULL fields are left out), made from input row `request_rows[j]`.
    """

    prompts: list[str]
    field_orders: list[tuple[str, ...]]
    row_to_request: np.ndarray  # [num_rows] int64
    request_rows: np.ndarray  # [num_requests] int64: one input row per request
    solver_seconds: float = 0.0
    field_groups: tuple[tuple[str, ...], ...] = field(default=())  # columns kept together

    @property
    def num_rows(self) -> int:
        return len(self.row_to_request)

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def dedup_ratio(self) -> float:
        """Input rows per request (1.0 = nothing saved)."""
        return self.num_rows / self.num_requests if self.num_requests else 1.0

    def scatter(self, answers: list) -> list:
        """Answers per request (in send order) -> answers per input row."""
        if len(answers) != self.num_requests:
            raise ValueError(f"expected {self.num_requests} answers, got {len(answers)}")
        return [answers[j] for j in self.row_to_request.tolist()]


def plan_call(
    instruction: str,
    fields: pa.Table | pa.RecordBatch | pd.DataFrame,
    options: PlanOptions = PlanOptions(),
) -> CallPlan:
    """Dedup, order fields (GGR) and rows so consecutive prompts share long prefixes.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"id": [1, 2, 3], "lang": ["en", "en", "fr"]})
    >>> [p.splitlines()[2] for p in plan_call("Q?", df).prompts]
    ['lang: en', 'lang: en', 'lang: fr']
    """
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    fields = to_table(fields)
    if options.template is not None:
        fields = _template_columns(fields, options.template)
    table = encode(fields)
    start = time.perf_counter()
    unique_rows, row_to_unique = unique_row_map(table.codes, options.dedup)
    may_reorder = options.reorder_fields and options.template is None
    groups = group_fields(table.take(unique_rows), options.detect_dependencies and may_reorder)
    if may_reorder:
        config = GGRConfig(max_depth=options.max_depth, min_gain=options.min_gain)
        orders = best_orders(groups.codes, groups.weights, config)
    else:
        orders = np.tile(np.arange(len(groups.members)), (len(unique_rows), 1))
    send = sort_rows(groups.codes, orders) if options.reorder_rows else np.arange(len(orders))
    solver_seconds = time.perf_counter() - start
    return assemble_plan(
        instruction,
        table,
        groups.members,
        unique_rows,
        row_to_unique,
        orders,
        send,
        options.template,
        solver_seconds,
    )


def unique_row_map(codes: np.ndarray, dedup: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(first input row of each distinct row, in first-seen order; input row -> distinct)."""
    num_rows = codes.shape[0]
    if not dedup or num_rows == 0:
        return np.arange(num_rows), np.arange(num_rows)
    ids, _ = factorize_rows(codes)
    return np.unique(ids, return_index=True)[1], ids  # ids count up in first-seen order


def assemble_plan(
    instruction: str,
    table: EncodedTable,
    members: tuple[tuple[int, ...], ...],
    unique_rows: np.ndarray,
    row_to_unique: np.ndarray,
    orders: np.ndarray,
    send: np.ndarray,
    template: str | None = None,
    solver_seconds: float = 0.0,
) -> CallPlan:
    """Render the requests: distinct row send[j] (field groups in orders[send[j]]) is request j."""
    names = table.names
    texts = [[*t.tolist(), None] for t in table.texts]  # code -1 (NULL) -> None
    request_rows = unique_rows[send]
    cells = table.codes[request_rows].tolist()
    order_of, _ = factorize_rows(orders[send])
    distinct_orders = orders[send][np.unique(order_of, return_index=True)[1]]
    column_orders = [tuple(c for g in o for c in members[g]) for o in distinct_orders.tolist()]
    name_orders = [tuple(names[c] for c in o) for o in column_orders]
    field_orders, prompts = [], []
    for j, row in enumerate(cells):
        k = int(order_of[j])
        field_orders.append(name_orders[k])
        if template is not None:
            values = {names[c]: texts[c][row[c]] for c in range(len(names))}
            prompts.append(render_template(template, values))
        else:
            pairs = [(names[c], texts[c][row[c]]) for c in column_orders[k]]
            prompts.append(render_user_message(instruction, pairs))
    position = np.empty(len(send), np.int64)
    position[send] = np.arange(len(send))
    return CallPlan(
        prompts=prompts,
        field_orders=field_orders,
        row_to_request=position[row_to_unique],
        request_rows=request_rows.astype(np.int64),
        solver_seconds=solver_seconds,
        field_groups=tuple(tuple(names[c] for c in m) for m in members if len(m) > 1),
    )


def _template_columns(fields, template: str):
    """The columns a `{col}` template names, in order of first use; unknown names fail."""
    used = []
    for _text, name, _spec, _conv in string.Formatter().parse(template):
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(f"template placeholders must name a field, got {{{name}}}")
        if name not in used:
            used.append(name)
    columns = (
        [str(c) for c in fields.columns]
        if isinstance(fields, pd.DataFrame)
        else list(fields.column_names)
    )
    missing = [n for n in used if n not in columns]
    if missing:
        raise ValueError(f"template names unknown field(s) {missing}; fields are {columns}")
    return fields[used] if isinstance(fields, pd.DataFrame) else fields.select(used)
