"""The hash oracle: a deterministic fake model for connector tests that compare query paths.

`hash_oracle` (fixture): a `HashClient` that every `get_client` call of the test returns. Its
answer is a function of a hash of the prompt's user text and the decoding parameters, so two
query plans that send the same prompts get the same answers, and answers vary from row to row:
- with `choices`: one of them (filters mix yes and no, scores spread over 1..5);
- with a `json_schema` (flat object): a valid object of that schema;
- otherwise free text `ans-<6 hex>` (shorter for max_tokens < 4).
`calls` records every (user text, params, answer) it was asked, in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from dataclasses import dataclass

import pytest

from llmudf.engine.params import Output


@dataclass(frozen=True, slots=True)
class OracleCall:
    user: str
    choices: tuple[str, ...] | None
    json_schema: str | None
    max_tokens: int
    answer: str

    @property
    def prompt_key(self) -> tuple:
        """What makes two requests the same request (the prompt and how it is decoded)."""
        return (self.user, self.choices, self.json_schema, self.max_tokens)


class HashClient:
    """An EngineClient whose answers are a hash of the prompt and the decoding parameters."""

    def __init__(self):
        self.calls: list[OracleCall] = []
        self.num_batches = 0

    @property
    def model_id(self) -> str:
        return "hash-oracle"

    def generate(self, prompts, params, progress=None, on_output=None) -> list[Output]:
        self.num_batches += 1
        outputs = []
        for i, chat in enumerate(prompts):
            user = chat[-1]["content"]  # a chat: [system,] user
            text = answer(user, params)
            self.calls.append(
                OracleCall(user, params.choices, params.json_schema, params.max_tokens, text)
            )
            token_ids = list(text.encode())
            outputs.append(
                Output(
                    request_id=f"oracle-{self.num_batches}-{i}",
                    text=text,
                    token_ids=token_ids,
                    finish_reason="stop",
                    num_prompt_tokens=len(user.encode()),
                    num_cached_tokens=0,
                    num_generated_tokens=len(token_ids),
                )
            )
            if on_output is not None:
                on_output(i, outputs[-1])
            if progress is not None:
                progress(1)
        return outputs


def answer(user: str, params) -> str:
    decoding = [params.choices, params.json_schema, params.max_tokens, params.temperature]
    key = json.dumps([user, *decoding, params.seed], default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()
    if params.choices:
        return params.choices[int(digest[:8], 16) % len(params.choices)]
    if params.json_schema is not None:
        return json.dumps(_json_object(json.loads(params.json_schema), digest))
    if params.max_tokens < 4:
        return digest[: 2 * params.max_tokens]
    return f"ans-{digest[:6]}"


def _json_object(schema: dict, digest: str) -> dict:
    value = {}
    for i, (name, spec) in enumerate(schema.get("properties", {}).items()):
        bits = int(digest[4 * i : 4 * i + 4] or "0", 16)
        kind = spec.get("type")
        if "enum" in spec:
            value[name] = spec["enum"][bits % len(spec["enum"])]
        elif kind == "boolean":
            value[name] = bool(bits % 2)
        elif kind == "integer":
            value[name] = bits % 10
        elif kind == "number":
            value[name] = (bits % 100) / 4
        else:
            value[name] = f"s-{digest[4 * i : 4 * i + 4]}"
    return value


@pytest.fixture
def hash_oracle(monkeypatch) -> HashClient:
    client = HashClient()
    monkeypatch.setattr("llmudf.runtime.client._new_client", lambda config: client)
    monkeypatch.setattr("llmudf.runtime.client._CLIENTS", {})
    return client


@pytest.fixture(scope="module")
def local_spark(tmp_path_factory):
    """local_spark(master, shuffle_partitions): a local SparkSession for the module, with an
    isolated llmudf cache dir (node servers are found there; the executors inherit it). After
    the module: Spark stopped, the node servers it started killed, the setting restored."""
    if os.environ.get("CI"):
        import pyspark  # noqa: F401  (in CI a missing extra fails the tests, never skips them)
    else:
        pytest.importorskip("pyspark")
    from pyspark.sql import SparkSession

    root = tmp_path_factory.mktemp("spark")
    saved = os.environ.get("LLMUDF_CACHE_DIR")
    os.environ["LLMUDF_CACHE_DIR"] = str(root / "cache")
    sessions = []

    def start(master: str, shuffle_partitions: int):
        builder = SparkSession.builder.master(master).appName("llmudf-tests")
        builder = builder.config("spark.ui.enabled", "false")
        spark = builder.config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        sessions.append(spark.getOrCreate())
        return sessions[-1]

    yield start
    for spark in sessions:
        spark.stop()
    for state in (root / "cache" / "servers").glob("*.json"):
        with contextlib.suppress(ProcessLookupError, ValueError, KeyError):
            os.kill(json.loads(state.read_text())["pid"], signal.SIGKILL)  # servers we started
    if saved is None:
        os.environ.pop("LLMUDF_CACHE_DIR", None)
    else:
        os.environ["LLMUDF_CACHE_DIR"] = saved
