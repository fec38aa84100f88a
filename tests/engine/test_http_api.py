"""OpenAI-compatible HTTP: the official `openai` client against our server, and clear errors."""

from __future__ import annotations

import http.client
import json
import threading

import openai
import pytest

from llmudf.engine.config import EngineConfig
from llmudf.engine.engine import Engine
from llmudf.engine.prompts import chat_messages
from llmudf.engine.sampling import SamplingParams

ENGINE = {"device": "cpu", "num_kv_pages": 512}


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(engine=ENGINE)


@pytest.fixture(scope="module")
def local_engine(tiny_model_dir):
    return Engine(EngineConfig(model=str(tiny_model_dir), **ENGINE))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="none", max_retries=0
    )


def test_models_lists_the_served_model(client, server):
    assert [m.id for m in client.models.list().data] == [server.model_id]


def test_completions_equal_in_process(client, server, local_engine):
    prompts = ["<|im_start|>user\nfirst<|im_end|>\n", "<|im_start|>user\nsecond<|im_end|>\n"]
    expected = local_engine.generate(prompts, SamplingParams(max_tokens=5))
    resp = client.completions.create(model=server.model_id, prompt=prompts, max_tokens=5)
    assert [c.text for c in resp.choices] == [o.text for o in expected]
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.prompt_tokens == sum(o.num_prompt_tokens for o in expected)
    assert resp.usage.completion_tokens == sum(o.num_generated_tokens for o in expected)


def test_chat_equals_in_process(client, server, local_engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    expected = local_engine.generate(
        [chat_messages("Hi!", "Be brief.")], SamplingParams(max_tokens=6)
    )
    resp = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=6)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == expected[0].text
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_multi_turn_chat_uses_the_chat_template(client, server, local_engine):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": [{"type": "text", "text": "c"}]},
    ]
    flat = [{**m, "content": "c" if i == 2 else m["content"]} for i, m in enumerate(messages)]
    text = local_engine.tokenizer.apply_chat_template(flat)
    expected = local_engine.generate([text], SamplingParams(max_tokens=4))[0].text
    resp = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=4)
    assert resp.choices[0].message.content == expected


def test_chat_streaming_concatenates_to_the_full_answer(client, server, local_engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = local_engine.generate([chat_messages("Stream me")], params)[0].text
    stream = client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": "Stream me"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(pieces) == expected
    assert len(pieces) > 1  # streamed as tokens came, not in one piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_completion_streaming(client, server, local_engine):
    prompt = "<|im_start|>user\nstream<|im_end|>\n"
    expected = local_engine.generate([prompt], SamplingParams(max_tokens=6))[0].text
    stream = client.completions.create(
        model=server.model_id, prompt=prompt, max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == expected


def test_guided_choice_constrains_the_answer(client, server):
    resp = client.chat.completions.create(
        model=server.model_id,
        messages=[{"role": "user", "content": "Is it good?"}],
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert resp.choices[0].message.content in ("yes", "no")


def raw(server, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    conn.close()
    return resp.status, payload


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("POST", "/v1/completions", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/completions", b"[1, 2]", 400, "request body: Input should be a valid dict"),
        ("POST", "/v1/completions", b'{"prompt": 5}', 400, "prompt: Input should be"),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 9999}', 400, "context of"),
        ("POST", "/v1/completions", b'{"prompt": "x", "n": 3}', 400, "n: Input should be"),
        ("POST", "/v1/completions", b'{"prompt": "x", "temperature": 1e300}', 400, "temperature"),
        ("POST", "/v1/completions", b'{"prompt": "x", "stream_options": "yes"}', 400, "stream_"),
        ("POST", "/v1/completions", b'{"prompt": "x", "stop": ""}', 400, "stop strings"),
        ("POST", "/v1/completions", b'{"prompt": "x", "model": "gpt-9"}', 404, "gpt-9"),
        ("POST", "/v1/completions", b'{"prompt": "' + b"x" * 5000 + b'"}', 400, "prompt"),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "at least 1 item"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "bot"}]}', 400, "role"),
        (
            "POST",
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": 3}]}',
            400,
            "content",
        ),
        ("GET", "/v1/nothing", None, 404, "no route GET /v1/nothing"),
        ("POST", "/v1/models", b"{}", 405, "POST is not allowed on /v1/models"),
    ],
)
def test_bad_requests_get_clear_json_errors_and_server_stays_up(
    client, server, method, path, body, status, message
):
    got_status, payload = raw(server, method, path, body)
    assert got_status == status
    assert message in payload["error"]["message"]
    assert payload["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert client.completions.create(model=server.model_id, prompt="ok", max_tokens=2).choices


def test_health_and_ready(server):
    assert raw(server, "GET", "/health") == (200, {"status": "ok", "error": None})
    status, body = raw(server, "GET", "/ready")
    assert status == 200 and body["ready"] is True


def test_openai_errors_map_to_client_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.completions.create(model="unknown-model", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=client.models.list().data[0].id, prompt="x", temperature=-1)


def test_burst_of_concurrent_http_clients_all_answered(client, server, local_engine):
    prompts = [f"<|im_start|>user\nburst {i}<|im_end|>\n" for i in range(12)]
    expected = [o.text for o in local_engine.generate(prompts, SamplingParams(max_tokens=4))]
    got: dict[int, str] = {}

    def run(i: int) -> None:
        resp = client.completions.create(model=server.model_id, prompt=prompts[i], max_tokens=4)
        got[i] = resp.choices[0].text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got.get(i) for i in range(12)] == expected


def metric(text: str, name: str, labels: str = "") -> float:
    line = next(x for x in text.splitlines() if x.startswith(f"{name}{labels} "))
    return float(line.rsplit(" ", 1)[1])


def test_metrics_count_requests_tokens_and_engine_stats(client, server, caplog):
    def scrape() -> str:
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/plain")
        return resp.read().decode()

    before = scrape()
    with caplog.at_level("INFO", logger="llmudf.server"):
        resp = client.completions.create(model=server.model_id, prompt="count me", max_tokens=3)
    after = scrape()
    usage = resp.usage
    for name, added in [
        ("llmudf_prompt_tokens_total", usage.prompt_tokens),
        ("llmudf_generated_tokens_total", usage.completion_tokens),
        ("llmudf_requests_served_total", 1),
    ]:
        assert metric(after, name) - metric(before, name) == added, name
    path = '{path="/v1/completions",status="200"}'
    assert metric(after, "llmudf_http_requests_total", path) >= 1
    assert metric(after, "llmudf_engine_step_seconds_count") > metric(
        before, "llmudf_engine_step_seconds_count"
    )
    # every numeric engine stat is exported, as are the hit rate and the ready flag
    stats = server.service.engine_stats()
    assert metric(after, "llmudf_engine_num_prompt_tokens") == stats["num_prompt_tokens"]
    assert 0 <= metric(after, "llmudf_prefix_cache_hit_rate") <= 1
    assert metric(after, "llmudf_ready") == 1
    # one structured log line per request, with its tokens
    lines = [json.loads(r.message) for r in caplog.records if r.message.startswith("{")]
    line = next(x for x in lines if x.get("path") == "/v1/completions")
    assert line["status"] == 200 and line["prompt_tokens"] == usage.prompt_tokens
    assert line["request_id"] == resp.id


def test_openapi_schema_describes_the_api(server):
    status, schema = raw(server, "GET", "/openapi.json")
    assert status == 200
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_internal_errors_carry_a_message_never_a_traceback(server, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(server.service, "submit", broken)
    with caplog.at_level("ERROR", logger="llmudf.server"):
        status, payload = raw(server, "POST", "/v1/completions", b'{"prompt": "x"}')
    assert status == 500 and payload["error"]["type"] == "server_error"
    assert "server log" in payload["error"]["message"]
    assert "secret internals" not in json.dumps(payload) and "Traceback" not in json.dumps(payload)
    assert any("secret internals" in r.getMessage() or r.exc_info for r in caplog.records)
