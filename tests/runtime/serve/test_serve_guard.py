"""The server's safe defaults: an API key when one is set, JSON bodies only, only loopback names on a
loopback server, cross-origin calls only from the origins allowed, and a body that must keep arriving."""
from __future__ import annotations

import os
import socket
import time
from urllib.parse import urlparse

import httpx
import pytest
from runtime_helpers import running_server

KEY = "test-key-5f1c"
ALLOWED = "https://app.example"


@pytest.fixture(scope="module")
def guarded_server(tiny_bundle, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("LMSPEC_API_KEY", KEY)  # the key from the environment, as the README shows
    with running_server(tiny_bundle, "--name", "tiny", "--cors-origin", ALLOWED, "--read-timeout", "1",
                        "--threads", 1, log_dir=tmp_path_factory.mktemp("guarded")) as (url, proc, err):
        yield url
        assert proc.poll() is None and "Traceback" not in err.read_text(), err.read_text()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and set(error) == {"message", "type", "param", "code"}
    return error["message"]


def test_the_key_is_required_everywhere_but_health_and_the_chat_page(guarded_server):
    ask = {"prompt": "I had", "max_tokens": 3}
    assert httpx.get(f"{guarded_server}/health").status_code == 200  # probes hold no key
    assert httpx.get(f"{guarded_server}/").status_code == 200  # the page asks for the key, and sends it
    assert "Authorization: Bearer" in _error(httpx.post(f"{guarded_server}/v1/completions", json=ask), 401,
                                             "invalid_api_key")
    for wrong in ("Bearer not-the-key", f"Basic {KEY}", KEY):
        _error(httpx.get(f"{guarded_server}/v1/models", headers={"Authorization": wrong}), 401, "invalid_api_key")
    good = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{guarded_server}/v1/completions", json=ask, headers=good, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]

    import openai  # the official client sends the key it is given
    assert openai.OpenAI(base_url=f"{guarded_server}/v1", api_key=KEY).models.list().data[0].id == "tiny"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{guarded_server}/v1", api_key="wrong", max_retries=0).models.list()


def test_only_json_bodies_are_read(guarded_server):
    good = {"Authorization": f"Bearer {KEY}"}
    for headers, body in (({"content-type": "text/plain"}, '{"prompt": "I"}'),  # what a page may send unasked
                          ({"content-type": "application/x-www-form-urlencoded"}, "prompt=I"),
                          ({}, b'{"prompt": "I"}')):
        r = httpx.post(f"{guarded_server}/v1/completions", content=body, headers={**good, **headers})
        assert "Content-Type: application/json" in _error(r, 415, "unsupported_media_type")
    r = httpx.post(f"{guarded_server}/v1/completions", content=b'{"prompt": "I", "max_tokens": 1}',
                   headers={**good, "content-type": "application/json; charset=utf-8"}, timeout=60)
    assert r.status_code == 200


def test_a_loopback_server_answers_only_to_loopback_names(guarded_server):
    port = urlparse(guarded_server).port
    good = {"Authorization": f"Bearer {KEY}"}
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost"):
        assert httpx.get(f"{guarded_server}/v1/models", headers={**good, "Host": host}).status_code == 200
    r = httpx.get(f"{guarded_server}/v1/models", headers={**good, "Host": f"rebound.attacker.example:{port}"})
    assert "DNS rebinding" in _error(r, 403, "host_not_allowed")


def test_cross_origin_calls_only_from_allowed_origins(guarded_server):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(f"{guarded_server}/v1/completions", headers={"Origin": ALLOWED, **preflight})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    r = httpx.options(f"{guarded_server}/v1/completions", headers={"Origin": "https://other.example", **preflight})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{guarded_server}/v1/models", headers={"Origin": "https://other.example",
                                                         "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # the browser hides it


def _whole_response(s: socket.socket) -> str:
    """One HTTP response read from the socket: its head, then as many bytes as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        assert chunk, f"the server closed the connection after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), b"0"))
    while len(body) < length and (chunk := s.recv(4096)):
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_a_body_that_stops_arriving_is_a_408_and_headers_that_do_not_arrive_close(guarded_server):
    url = urlparse(guarded_server)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\": ".encode())
        started = time.monotonic()
        answer = _whole_response(s)
    assert answer.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in answer
    assert time.monotonic() - started < 10
    for trickle in (b"GET /health HTTP/1.1\r\nHost: loc", b""):  # headers a byte at a time, or nothing at all
        with socket.create_connection((url.hostname, url.port), timeout=30) as s:
            s.sendall(trickle)
            started = time.monotonic()
            assert s.recv(4096) == b""  # closed: uvicorn alone would wait for the headers forever
            assert time.monotonic() - started < 10
    assert httpx.get(f"{guarded_server}/health").status_code == 200  # and it keeps serving


def test_bad_guard_options_are_usage_errors(tiny_bundle):
    from runtime_helpers import lmspec_cli
    for args, words in ((["--read-timeout", "0"], "argument --read-timeout: must be a finite number > 0, got 0"),
                        (["--cors-origin", "app.example"], "an origin is a scheme and a host")):
        out = lmspec_cli("serve", str(tiny_bundle), *args, env={**os.environ, "LMSPEC_API_KEY": ""})
        assert out.returncode == 2 and words in out.stderr, out.stderr
