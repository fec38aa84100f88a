"""Fuzzing the HTTP API from its own OpenAPI schema (schemathesis): for every operation, a
bounded number of generated requests, valid and invalid; no 5xx, no dropped connection, every
answer matches the schema, and the server answers a well-formed request afterwards."""

from __future__ import annotations

import json

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

KEY = "fuzz-key"
EXAMPLES_PER_OPERATION = 60


@pytest.fixture(scope="module")
def server(start_server):
    # a short context keeps every generated answer short
    engine = {"device": "cpu", "num_kv_pages": 2048, "max_model_len": 48}
    return start_server(engine=engine, api_key=KEY)


def operations(server) -> list:
    url = f"http://127.0.0.1:{server.http_port}"
    schema = schemathesis.openapi.from_url(
        f"{url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}
    )
    schema.config.update(base_url=url, headers={"Authorization": f"Bearer {KEY}"})
    return [result.ok() for result in schema.get_all_operations()]


def test_fuzzed_requests_never_break_the_server(server):
    ops = operations(server)
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    statuses: dict[str, set[int]] = {}
    for op in ops:
        fuzz(op, statuses)()
    assert all(s < 500 for codes in statuses.values() for s in codes), statuses
    # the fuzzing reached the model, not only the validation errors
    assert 200 in statuses["/v1/completions"] and 400 in statuses["/v1/completions"], statuses


def fuzz(op, statuses: dict):
    """A hypothesis test of `op` (valid and invalid requests) recording the statuses seen."""

    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)

    @given(case=st.one_of(*(op.as_strategy(mode) for mode in modes)))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples on every run: CI failures reproduce
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        # a schema-valid prompt may still be too long for the context: a 400, not a bug
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance], timeout=60)
        statuses.setdefault(op.path, set()).add(response.status_code)

    return run


def test_server_answers_after_fuzzing(server):
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=KEY, max_retries=0
    )
    resp = client.chat.completions.create(
        model=server.model_id, messages=[{"role": "user", "content": "still ok?"}], max_tokens=3
    )
    assert resp.choices[0].message.role == "assistant"
    assert server.service.num_running == 0 and server.service.num_waiting == 0
    assert json.loads(resp.model_dump_json())["usage"]["completion_tokens"] >= 1
