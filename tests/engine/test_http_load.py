"""Load: 200 concurrent HTTP clients on loopback, half streaming, from two heavy users.
Every request is answered with the in-process engine's answer, no connection is reset, and
while both users wait their VTC service counters stay within the fair-share bound."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from llmudf.engine.config import EngineConfig
from llmudf.engine.engine import Engine
from llmudf.engine.sampling import SamplingParams
from llmudf.engine.server import EngineServer, ServerConfig

ENGINE = {"device": "cpu", "num_kv_pages": 2048}
NUM_CLIENTS = 200
MAX_IN_ENGINE = 8
PROMPTS = [f"<|im_start|>user\nload test {i}<|im_end|>\n<|im_start|>assistant\n" for i in range(10)]
MAX_TOKENS = {"heavy-a": 12, "heavy-b": 4}  # a: long answers; b: short ones


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(engine=ENGINE, max_in_engine=MAX_IN_ENGINE)


@pytest.fixture(scope="module")
def expected(tiny_model_dir) -> dict[tuple[str, int], str]:
    engine = Engine(EngineConfig(model=str(tiny_model_dir), **ENGINE))
    answers = {}
    for max_tokens in set(MAX_TOKENS.values()):
        outs = engine.generate(PROMPTS, SamplingParams(max_tokens=max_tokens))
        answers.update({(p, max_tokens): o.text for p, o in zip(PROMPTS, outs, strict=True)})
    return answers


def ask(port: int, prompt: str, user: str, stream: bool) -> str:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS[user], "user": user, "stream": stream}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    if not stream:
        text = json.loads(resp.read())["choices"][0]["text"]
    else:
        pieces, done = [], False
        for line in resp:
            line = line.decode().strip()
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[len("data: ") :])
                assert "error" not in event, event
                pieces.append(event["choices"][0]["text"])
        assert done, "stream ended without [DONE]"
        text = "".join(pieces)
    conn.close()
    return text


def test_200_concurrent_clients_all_answered_fairly(server, expected):
    service = server.service
    jobs = [
        (PROMPTS[i % len(PROMPTS)], "heavy-a" if i % 2 else "heavy-b", i % 4 < 2)
        for i in range(NUM_CLIENTS)
    ]
    answers: dict[int, str] = {}
    errors: list[BaseException] = []
    gaps: list[float] = []
    start = threading.Barrier(NUM_CLIENTS + 1)

    def client(i: int) -> None:
        prompt, user, stream = jobs[i]
        start.wait()
        try:
            answers[i] = ask(server.http_port, prompt, user, stream)
        except BaseException as exc:  # a reset or a bad answer: reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(NUM_CLIENTS)]
    for t in threads:
        t.start()
    start.wait()
    # while both users are backlogged, VTC keeps their received service close
    while any(t.is_alive() for t in threads):
        depths = service.queue_depths()
        a, b = depths.get("http:heavy-a", (0, 0)), depths.get("http:heavy-b", (0, 0))
        if a[0] and b[0]:
            gaps.append(abs(service.counter("http:heavy-a") - service.counter("http:heavy-b")))
        time.sleep(0.005)
    for t in threads:
        t.join()

    assert not errors, errors[:3]
    assert [answers.get(i) for i in range(NUM_CLIENTS)] == [
        expected[(prompt, MAX_TOKENS[user])] for prompt, user, _ in jobs
    ]
    # VTC's bound: the counters of backlogged clients differ by at most the service of the
    # requests in the engine at once (each at most a prompt plus its weighted answer)
    per_request = max(len(p) for p in PROMPTS) + 2 * max(MAX_TOKENS.values())
    assert gaps, "the two users were never backlogged together"
    assert max(gaps) <= 2 * MAX_IN_ENGINE * per_request, max(gaps)


def test_a_client_over_its_queue_gets_429_with_retry_after(tiny_model_dir):
    config = ServerConfig(
        model=str(tiny_model_dir),
        port=0,
        http_port=0,
        engine=ENGINE,
        max_in_engine=1,
        max_waiting_per_client=2,
    )
    srv = EngineServer(config).start()
    assert srv.service.wait_ready(120)
    try:
        long = {"prompt": "busy", "max_tokens": 200, "ignore_eos": True, "user": "greedy"}
        busy = [srv.service.submit("http:greedy", [long["prompt"]], SamplingParams(**{
            k: long[k] for k in ("max_tokens", "ignore_eos")})) for _ in range(3)]  # fmt: skip
        # one runs, two wait: the client's queue is full
        conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60)
        conn.request(
            "POST", "/v1/completions", json.dumps(long), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 429 and int(resp.getheader("Retry-After")) >= 1
        assert "at most 2 may wait" in body["error"]["message"]
        # another client is still served
        other = {"prompt": "me too", "max_tokens": 2, "user": "polite"}
        conn.request(
            "POST", "/v1/completions", json.dumps(other), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        # a single request larger than any queue is a 400, not a retry
        big = {"prompt": ["a", "b", "c"], "max_tokens": 1, "user": "big"}
        conn.request(
            "POST", "/v1/completions", json.dumps(big), {"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        assert resp.status == 400 and "at most 2 prompts" in resp.read().decode()
        for call in busy:
            srv.service.cancel(call)
    finally:
        srv.shutdown()
