"""The API key: without it every HTTP endpoint but /health is 401 and every Flight call is
refused; with it everything works; a non-loopback bind without a key refuses to start."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys

import openai
import pytest

from llmudf.engine.flight_client import FlightEngineClient
from llmudf.engine.node import EngineServerError
from llmudf.engine.prompts import chat_messages
from llmudf.engine.sampling import SamplingParams
from llmudf.engine.server import ServerConfig

KEY = "s3cret-key"
ENDPOINTS = [
    ("GET", "/ready", None),
    ("GET", "/metrics", None),
    ("GET", "/v1/models", None),
    ("GET", "/openapi.json", None),
    ("POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 2}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}'),
]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(engine={"device": "cpu", "num_kv_pages": 256}, api_key=KEY)


def call(server, method, path, body, key: str | None) -> tuple[int, dict | str]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read().decode()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
@pytest.mark.parametrize("key", [None, "wrong", KEY[:-1]])
def test_every_endpoint_but_health_needs_the_key(server, method, path, body, key):
    status, payload = call(server, method, path, body, key)
    assert status == 401
    assert "API key" in payload["error"]["message"]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_with_the_key_everything_works(server, method, path, body):
    assert call(server, method, path, body, KEY)[0] == 200


def test_health_needs_no_key(server):
    assert call(server, "GET", "/health", None, None) == (200, {"status": "ok", "error": None})


def test_openai_client_with_and_without_the_key(server):
    url = f"http://127.0.0.1:{server.http_port}/v1"
    good = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
    assert good.completions.create(model=server.model_id, prompt="x", max_tokens=2).choices
    bad = openai.OpenAI(base_url=url, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        bad.models.list()


def test_flight_needs_the_key(server, monkeypatch):
    monkeypatch.delenv("LLMUDF_API_KEY", raising=False)
    prompts, params = [chat_messages("hi")], SamplingParams(max_tokens=2)
    with pytest.raises(EngineServerError, match="refused the API key.*LLMUDF_API_KEY"):
        FlightEngineClient(server.location).generate(prompts, params)
    with pytest.raises(EngineServerError, match="refused the API key"):
        FlightEngineClient(server.location, api_key="wrong").action("stats")
    assert len(FlightEngineClient(server.location, api_key=KEY).generate(prompts, params)) == 1
    monkeypatch.setenv("LLMUDF_API_KEY", KEY)  # how Spark tasks and node servers get it
    assert FlightEngineClient(server.location).action("ready")["ready"] is True


def test_a_config_carries_the_key_to_the_server(server, monkeypatch):
    """`llmudf.connect(backend='server', endpoint=..., api_key=...)`: the SQL side's client
    (and a Spark task's, which gets the same config) sends the config's key."""
    from llmudf.calls.config import Config
    from llmudf.runtime.client import get_client

    monkeypatch.delenv("LLMUDF_API_KEY", raising=False)
    prompts, params = [chat_messages("hi")], SamplingParams(max_tokens=2)
    good = Config(backend="server", endpoint=server.location, api_key=KEY)
    assert len(get_client(good).generate(prompts, params)) == 1
    bad = Config(backend="server", endpoint=server.location, api_key="wrong")
    with pytest.raises(EngineServerError, match="refused the API key"):
        get_client(bad).generate(prompts, params)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "example.com"])
def test_non_loopback_bind_without_a_key_refuses(host):
    with pytest.raises(ValueError, match="without an API key.*--insecure"):
        ServerConfig(port=0, host=host)
    with pytest.warns(UserWarning, match="without an API key"):
        ServerConfig(port=0, host=host, insecure=True)
    assert ServerConfig(port=0, host=host, api_key=KEY).api_key == KEY


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_bind_needs_no_key(host):
    assert ServerConfig(port=0, host=host).api_key is None


def test_serve_cli_refuses_a_public_bind_without_a_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LLMUDF_API_KEY"}
    cmd = [sys.executable, "-m", "llmudf.engine.server", "--host", "0.0.0.0", "--port", "0"]
    cmd += ["--model", str(tmp_path / "unused")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "refusing to serve on 0.0.0.0 without an API key" in proc.stderr
