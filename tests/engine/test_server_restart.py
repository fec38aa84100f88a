"""The node's engine server: started on first use, shared, replaced when killed mid-call."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from llmudf.engine.config import EngineConfig
from llmudf.engine.engine import Engine
from llmudf.engine.flight_client import FlightEngineClient
from llmudf.engine.node import EngineServerError, node_server
from llmudf.engine.prompts import chat_messages
from llmudf.engine.sampling import SamplingParams

PARAMS = SamplingParams(max_tokens=48, ignore_eos=True)
ENGINE = {"device": "cpu", "num_kv_pages": 512, "max_num_seqs": 4}


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMUDF_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LLMUDF_SERVER_IDLE_TIMEOUT", "120")
    started: list[int] = []
    yield started
    for pid in started:  # servers this test started, by pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_killed_server_mid_query_is_replaced_and_the_answers_are_complete(
    tiny_model_dir, isolated_cache
):
    # enough work that the kill lands mid-query (4 sequences at a time, 16 rounds of 48 tokens)
    prompts = [chat_messages(f"Question {i} about a film.") for i in range(64)]
    local = Engine(EngineConfig(model=str(tiny_model_dir), **ENGINE))
    expected = [o.text for o in local.generate(prompts, PARAMS)]

    first = node_server(str(tiny_model_dir), ENGINE, timeout=300)
    isolated_cache.append(first["pid"])
    client = FlightEngineClient(model=str(tiny_model_dir), engine=ENGINE, client_id="victim")
    assert client.location == first["location"]
    # a second client of the same model and settings shares the same server
    assert (
        FlightEngineClient(model=str(tiny_model_dir), engine=ENGINE).location == first["location"]
    )

    results: list = []
    worker = threading.Thread(target=lambda: results.extend(client.generate(prompts, PARAMS)))
    worker.start()
    deadline = time.monotonic() + 120
    while client.action("stats")["num_served"] < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(first["pid"], signal.SIGKILL)
    worker.join(timeout=300)

    state_files = list((Path(os.environ["LLMUDF_CACHE_DIR"]) / "servers").glob("*.json"))
    second = json.loads(state_files[0].read_text())
    isolated_cache.append(second["pid"])
    assert second["pid"] != first["pid"]
    assert [o.text for o in results] == expected  # nothing lost, nothing duplicated


def test_dead_explicit_server_is_a_clear_error(tiny_model_dir, isolated_cache):
    state = node_server(str(tiny_model_dir), ENGINE, timeout=300)
    isolated_cache.append(state["pid"])
    client = FlightEngineClient(state["location"])
    assert len(client.generate([chat_messages("hi")], SamplingParams(max_tokens=2))) == 1
    os.kill(state["pid"], signal.SIGKILL)
    time.sleep(0.2)
    with pytest.raises(EngineServerError, match="not answering.*llmudf serve"):
        client.generate([chat_messages("hi")], SamplingParams(max_tokens=2))


def test_server_that_cannot_start_says_why(tmp_path, isolated_cache):
    with pytest.raises(EngineServerError, match="exited with code.*log"):
        node_server(str(tmp_path / "no-such-model"), {"device": "cpu"}, timeout=120)
