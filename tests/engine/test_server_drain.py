"""`llmudf serve` stopping: SIGTERM drains (a short stream finishes, a long one ends with an
error event, a new request gets 503, exit code 0); kill -9 mid-stream gives the OpenAI client
a clear error."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest

DRAIN_S = 0.5


def start_server(model_dir, tmp_path, *extra) -> tuple[subprocess.Popen, dict]:
    state_path = tmp_path / "state.json"
    cmd = [sys.executable, "-m", "llmudf.engine.server", "--model", str(model_dir)]
    cmd += ["--port", "0", "--http-port", "0", "--device", "cpu", "--state-file", str(state_path)]
    cmd += ["--engine-json", json.dumps({"num_kv_pages": 2048}), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        if state_path.exists():
            state = json.loads(state_path.read_text())
            try:
                if get(state["http_port"], "/ready")[0] == 200:
                    return proc, state
            except OSError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("llmudf serve did not become ready")


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def stream_events(port: int, max_tokens: int, first_token: threading.Event, out: list) -> None:
    body = {"prompt": "drain me", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    for line in resp:
        line = line.decode().strip()
        if line.startswith("data: "):
            out.append(line[len("data: ") :])
            first_token.set()


def test_sigterm_drains_streams_and_refuses_new_work(tiny_model_dir, tmp_path):
    proc, state = start_server(tiny_model_dir, tmp_path, "--drain-timeout", str(DRAIN_S))
    port = state["http_port"]
    try:
        short, long_ = [], []
        started = [threading.Event(), threading.Event()]
        threads = [
            threading.Thread(target=stream_events, args=(port, 4, started[0], short)),
            threading.Thread(target=stream_events, args=(port, 480, started[1], long_)),
        ]
        for t in threads:
            t.start()
        assert all(e.wait(60) for e in started)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        body = json.dumps({"prompt": "too late", "max_tokens": 2})
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        late = json.loads(resp.read())
        assert resp.status == 503 and "shutting down" in late["error"]["message"]
        assert resp.getheader("Retry-After")
        for t in threads:
            t.join(60)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    # the short stream finished in the drain: all its tokens, a finish reason, [DONE]
    events = [json.loads(e) for e in short[:-1]]
    assert short[-1] == "[DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
    # the long one was cut at the drain timeout, with an error event saying so
    assert long_[-1] == "[DONE]"
    error = json.loads(long_[-2])["error"]
    assert error["code"] == "503" and error["type"] == "server_error"
    assert "shut down" in error["message"]


def test_killed_server_mid_stream_is_a_clear_client_error(tiny_model_dir, tmp_path):
    proc, state = start_server(tiny_model_dir, tmp_path)
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{state['http_port']}/v1", api_key="x", max_retries=0
        )
        stream = client.completions.create(
            model=state["model"],
            prompt="killed",
            max_tokens=480,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        next(chunks)
        proc.kill()
        with pytest.raises(openai.APIError, match="(?i)connection|incomplete|peer|closed"):
            for _ in chunks:
                pass
    finally:
        proc.kill()
        proc.wait()
