"""Malformed transport against the HTTP API, on raw sockets: bad Content-Length, truncated
and stalled bodies, slow headers, wrong content types, huge bodies, invalid UTF-8, foreign
origins. Each gets an HTTP error or a closed connection within the timeouts, never a hang or
a crash, and the server answers a well-formed request afterwards."""

from __future__ import annotations

import json
import socket
import time

import pytest

READ_TIMEOUT = 1.0
MAX_BODY = 64 << 10
GOOD = b'{"prompt": "ok", "max_tokens": 2}'
FORM = "application/x-www-form-urlencoded"


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(
        engine={"device": "cpu", "num_kv_pages": 512},
        read_timeout=READ_TIMEOUT,
        max_body_bytes=MAX_BODY,
    )


def request_bytes(path: str, body: bytes, headers: dict | None = None) -> bytes:
    head = {"Host": "127.0.0.1", "Content-Type": "application/json"}
    head.update({"Content-Length": str(len(body))} | (headers or {}))
    lines = [f"POST {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def exchange(server, data: bytes, *, then_close: bool = False, timeout: float = 10.0):
    """Send `data`, read until the server closes or a full response is in; (status, body)."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=timeout) as sock:
        sock.sendall(data)
        if then_close:
            sock.shutdown(socket.SHUT_WR)
        return read_response(sock)


def read_response(sock) -> tuple[int | None, dict | None]:
    buf = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
        head, sep, body = buf.partition(b"\r\n\r\n")
        if sep:
            length = next(
                (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(
                    b"content-length:")),
                None,
            )  # fmt: skip
            if length is not None and len(body) >= length:
                break
    if not buf:
        return None, None
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


def assert_still_serving(server) -> None:
    status, body = exchange(server, request_bytes("/v1/completions", GOOD))
    assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (request_bytes("/v1/completions", GOOD, {"Content-Length": "abc"}), 400),
        (request_bytes("/v1/completions", GOOD, {"Content-Length": "-1"}), 400),
        (request_bytes("/v1/completions", GOOD, {"Content-Type": "text/plain"}), 415),
        (request_bytes("/v1/completions", GOOD, {"Content-Type": FORM}), 415),
        (request_bytes("/v1/completions", b'{"prompt": "\xff\xfe"}'), 400),
        (request_bytes("/v1/completions", b"\xc3\x28"), 400),
        (request_bytes("/v1/completions", GOOD, {"Content-Length": str(MAX_BODY + 1)}), 413),
        (request_bytes("/v1/completions", b'{"prompt": "' + b"x" * MAX_BODY + b'"}'), 413),
        (request_bytes("/v1/completions", GOOD, {"Origin": "https://evil.example"}), 403),
        (b"GARBAGE / NOTHTTP\r\n\r\n", 400),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % (MAX_BODY + 10)
         + b"a" * (MAX_BODY + 10) + b"\r\n0\r\n\r\n", 413),
    ],
    ids=["length-abc", "length-negative", "text-plain", "form", "bad-utf8-string",
         "bad-utf8-body", "declared-too-big", "too-big", "foreign-origin", "not-http",
         "chunked-too-big"],
)  # fmt: skip
def test_malformed_requests_get_an_http_error(server, data, status):
    got, body = exchange(server, data)
    assert got == status
    if body is not None:
        assert "Traceback" not in json.dumps(body) and body["error"]["message"]
    assert_still_serving(server)


def test_text_plain_post_from_a_web_page_is_refused(server):
    # what a page's fetch(..., {mode: "no-cors"}) sends: a "simple" request with no preflight
    data = request_bytes(
        "/v1/completions",
        GOOD,
        {"Content-Type": "text/plain", "Origin": "http://attacker.example:8080"},
    )
    assert exchange(server, data)[0] == 403


def test_post_without_content_type_is_read_as_json(server):
    assert (
        exchange(server, request_bytes("/v1/completions", GOOD, {"Content-Type": None}))[0] == 200
    )


def test_same_origin_request_is_served(server):
    host = f"127.0.0.1:{server.http_port}"
    data = request_bytes("/v1/completions", GOOD, {"Host": host, "Origin": f"http://{host}"})
    assert exchange(server, data)[0] == 200


@pytest.mark.parametrize("short_by", [1, len(GOOD)])
def test_body_shorter_than_content_length_times_out(server, short_by):
    data = request_bytes("/v1/completions", GOOD, {"Content-Length": str(len(GOOD) + short_by)})
    start = time.monotonic()
    status, body = exchange(server, data)
    assert status == 408 and "stalled" in body["error"]["message"]
    assert time.monotonic() - start < READ_TIMEOUT + 3
    assert_still_serving(server)


def test_truncated_body_then_hang_up(server):
    data = request_bytes("/v1/completions", GOOD, {"Content-Length": str(len(GOOD) + 50)})
    status, _ = exchange(server, data, then_close=True)
    assert status in (None, 400)  # closed, or told why; never a hung handler
    assert_still_serving(server)


def test_slow_headers_are_cut_off(server):
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=15) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        assert read_response(sock) == (None, None)
    assert time.monotonic() - start < READ_TIMEOUT + 3
    assert_still_serving(server)


def test_slow_but_steady_body_is_served(server):
    data = request_bytes("/v1/completions", GOOD)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=15) as sock:
        head, body = data[: -len(GOOD)], data[-len(GOOD) :]
        sock.sendall(head)
        for i in range(0, len(body), 8):  # each piece well inside the read timeout
            time.sleep(READ_TIMEOUT / 4)
            sock.sendall(body[i : i + 8])
        status, answer = read_response(sock)
    assert status == 200 and answer["choices"]


def test_fifty_connections_at_once_none_reset(server):
    socks = [
        socket.create_connection(("127.0.0.1", server.http_port), timeout=60) for _ in range(50)
    ]
    try:
        for sock in socks:
            sock.sendall(request_bytes("/v1/completions", GOOD))
        statuses = [read_response(sock)[0] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [200] * 50
