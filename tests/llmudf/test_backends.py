"""`Config(backend=...)`: the same SQL answered in-process, by an llmudf engine server over
Flight, and by an OpenAI-compatible endpoint (our own server's HTTP on loopback) gives the
same answers; bad backend settings are clear errors."""

from __future__ import annotations

import pytest

import llmudf
from llmudf.calls.config import Config
from llmudf.engine.flight_client import FlightEngineClient
from llmudf.engine.server import EngineServer, ServerConfig
from llmudf.runtime.client import InProcessClient, get_client
from llmudf.runtime.openai_client import OpenAIClient

QUERY = (
    "SELECT t, llm('Summarize.', t) AS s, llm_filter('Keep?', t) AS k, "
    "llm_choice('Mood?', ['dark', 'light'], t) AS m "
    "FROM (VALUES ('a film about rain'), ('a film about the sea'), ('a film about rain'), "
    "('war and peace')) v(t) ORDER BY t"
)


@pytest.fixture(scope="module")
def server(tiny_model_path):
    engine = {"device": "cpu", "kv_cache_bytes": 64 << 20}
    config = ServerConfig(model=tiny_model_path, port=0, http_port=0, engine=engine)
    srv = EngineServer(config).start()
    assert srv.service.wait_ready(120), srv.service.load_error
    yield srv
    srv.shutdown()


def answers(config: Config) -> list[tuple]:
    con = llmudf.connect(config=config)
    try:
        return con.sql(QUERY).fetchall()
    finally:
        con.close()


def test_server_and_openai_backends_answer_like_in_process(make_config, server):
    expected = answers(make_config(cache=False))
    assert len({row[1] for row in expected}) > 1  # the answers tell the rows apart

    flight = make_config(cache=False, backend="server", endpoint=server.location)
    assert isinstance(get_client(flight), FlightEngineClient)
    assert answers(flight) == expected

    url = f"http://127.0.0.1:{server.http_port}/v1"
    openai = make_config(cache=False, backend="openai", endpoint=url)
    assert isinstance(get_client(openai), OpenAIClient)
    assert answers(openai) == expected
    # model=None asks the endpoint for its model; connect() takes the options as keywords
    con = llmudf.connect(
        model=None, backend="openai", endpoint=url, cache=False, progress=False, max_tokens=6
    )
    try:
        assert con.sql(QUERY).fetchall() == expected
    finally:
        con.close()


def test_local_is_the_default_backend(make_config):
    assert isinstance(get_client(make_config()), InProcessClient)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"backend": "vllm"}, "backend must be one of"),
        ({"backend": "openai"}, "backend='openai' needs endpoint="),
        ({"backend": "openai", "endpoint": "localhost:8000"}, "base URL"),
        ({"endpoint": "http://127.0.0.1:8000/v1"}, "needs backend='server'.*or backend='openai'"),
        ({"backend": "server", "endpoint": "http://127.0.0.1:1"}, "grpc://host:port"),
        ({"api_key": "k"}, "api_key is the key of an engine server"),
    ],
)
def test_bad_backend_settings_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        Config(**options)
