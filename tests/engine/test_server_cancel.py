"""A client that goes away (HTTP stream, HTTP request, Flight exchange) has its requests
aborted in the engine: the engine is idle shortly after, long before the answer would end."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

import pytest

LONG = 480  # tokens: ~4 s of the tiny model on a loaded 2-core machine


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(engine={"device": "cpu", "num_kv_pages": 2048})


def wait_until_running(server, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while server.service.num_running == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)


def assert_idle_soon(server, generated_before: int, timeout: float = 2.0) -> None:
    service = server.service
    deadline = time.monotonic() + timeout
    while service.num_running or service.num_waiting or service.engine.num_unfinished:
        assert time.monotonic() < deadline, "the engine still works for a client that left"
        time.sleep(0.02)
    generated = service.engine_stats()["num_generated_tokens"] - generated_before
    assert generated < LONG  # stopped early: the answer was never finished


def generated(server) -> int:
    return server.service.engine_stats()["num_generated_tokens"]


def post(server, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_http_client_that_hangs_up_is_aborted(server, stream):
    before = generated(server)
    body = {"prompt": "a long answer", "max_tokens": LONG, "ignore_eos": True, "stream": stream}
    with post(server, "/v1/completions", body) as sock:
        if stream:
            received = b""
            while b"data: " not in received:  # tokens are flowing
                received += sock.recv(4096)
        else:
            wait_until_running(server)
    assert_idle_soon(server, before)


def test_openai_stream_closed_early_is_aborted(server):
    import openai

    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="x", max_retries=0
    )
    before = generated(server)
    stream = client.completions.create(
        model=server.model_id,
        prompt="stream then stop",
        max_tokens=LONG,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()
    assert_idle_soon(server, before)


def test_killed_flight_client_is_aborted(server):
    code = f"""
from llmudf.engine.flight_client import FlightEngineClient
from llmudf.engine.sampling import SamplingParams
print("go", flush=True)
FlightEngineClient({server.location!r}).generate(
    ["long answer"], SamplingParams(max_tokens={LONG}, ignore_eos=True))
"""
    before = generated(server)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "go"
        wait_until_running(server)
    finally:
        proc.kill()
        proc.wait()
    assert_idle_soon(server, before)


def test_server_still_answers_after_the_cancellations(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    body = json.dumps({"prompt": "still here", "max_tokens": 3})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["choices"]
