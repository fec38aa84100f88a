"""llmudf's openai backend against our own OpenAI-compatible server: same answers as
in-process, bounded retries with backoff, a clear error when the endpoint is down."""

from __future__ import annotations

import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmudf.calls.prompt import ChatPrompt
from llmudf.engine.config import EngineConfig
from llmudf.engine.engine import Engine
from llmudf.engine.sampling import SamplingParams
from llmudf.engine.server import EngineServer, ServerConfig
from llmudf.runtime.openai_client import EndpointError, OpenAIClient

ENGINE = {"device": "cpu", "num_kv_pages": 512}


@pytest.fixture(scope="module")
def tiny_model(make_tiny_model_dir) -> str:
    return str(make_tiny_model_dir("llama", seed=0))


@pytest.fixture(scope="module")
def server(tiny_model):
    config = ServerConfig(model=tiny_model, port=0, http_port=0, engine=ENGINE)
    srv = EngineServer(config).start()
    assert srv.service.wait_ready(120), srv.service.load_error
    yield srv
    srv.shutdown()


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/v1"


def test_backend_answers_equal_in_process(server, tiny_model):
    prompts = [ChatPrompt(f"Rate movie {i}.") for i in range(6)] + [ChatPrompt("x", system=None)]
    prompts = [p.messages() for p in prompts]
    params = SamplingParams(max_tokens=6)
    local = Engine(EngineConfig(model=tiny_model, **ENGINE))
    expected = local.generate(prompts, params)
    done, arrived = [], {}
    backend = OpenAIClient(url(server.http_port), model=server.model_id, max_concurrency=3)
    got = backend.generate(prompts, params, progress=done.append, on_output=arrived.__setitem__)
    assert [o.text for o in got] == [o.text for o in expected]
    assert [o.num_prompt_tokens for o in got] == [o.num_prompt_tokens for o in expected]
    assert [o.num_generated_tokens for o in got] == [o.num_generated_tokens for o in expected]
    assert sum(done) == len(prompts)
    assert [arrived[i] for i in range(len(prompts))] == got
    choice = backend.generate(prompts[:2], SamplingParams(choices=["yes", "no"]))
    assert [o.text for o in choice] == [
        o.text for o in local.generate(prompts[:2], SamplingParams(choices=["yes", "no"]))
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_down_is_a_clear_error_after_bounded_retries():
    backend = OpenAIClient(url(free_port()), model="m", max_retries=2, backoff=0.01, timeout=5)
    with pytest.raises(EndpointError, match="failed 3 times.*is it up"):
        backend.generate([ChatPrompt("hi").messages()], SamplingParams())
    assert backend.num_retries == 2


class FlakyProxy(BaseHTTPRequestHandler):
    """Answers the first `num_failures` requests with 503, then forwards to the real server."""

    upstream: str
    num_failures: int
    num_seen = 0

    def log_message(self, *args):
        pass

    def do_POST(self):
        cls = type(self)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        cls.num_seen += 1
        if cls.num_seen <= cls.num_failures:
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            data = b'{"error": {"message": "warming up", "type": "server_error"}}'
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        req = urllib.request.Request(
            self.upstream + self.path, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            data = resp.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_transient_5xx_is_retried_with_backoff(server):
    handler = type(
        "Flaky",
        (FlakyProxy,),
        {"upstream": f"http://127.0.0.1:{server.http_port}", "num_failures": 2, "num_seen": 0},
    )
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        backend = OpenAIClient(
            f"http://127.0.0.1:{proxy.server_address[1]}/v1",
            model=server.model_id,
            max_retries=3,
            backoff=0.01,
            max_concurrency=1,
        )
        direct = OpenAIClient(url(server.http_port), model=server.model_id)
        prompt = [ChatPrompt("retry me").messages()]
        assert backend.generate(prompt, SamplingParams(max_tokens=4))[0].text == (
            direct.generate(prompt, SamplingParams(max_tokens=4))[0].text
        )
        assert backend.num_retries == 2
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_client_errors_are_not_retried(server):
    backend = OpenAIClient(url(server.http_port), model="not-the-model", backoff=0.01)
    with pytest.raises(EndpointError, match="rejected the request \\(404\\).*not-the-model"):
        backend.generate([ChatPrompt("hi").messages()], SamplingParams())
    assert backend.num_retries == 0


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="base_url"):
        OpenAIClient("localhost:8000", model="m")
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAIClient("http://127.0.0.1:1/v1", model="m", max_concurrency=0)
