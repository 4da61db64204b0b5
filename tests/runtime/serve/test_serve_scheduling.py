"""`lmspec serve`'s scheduling, over HTTP with a model slow enough to watch (context 2,048, 6 layers
of width 256, random weights: a few ms a token): a short request is not queued behind a long one, a
client that gives up (streaming or not) frees its row, --request-timeout stops a request, and SIGTERM
drains: running requests finish within --drain-seconds, those still running after are ended with an
error (a stream: an error event and [DONE]; a waiting call: a 503), and the process exits 0."""
import json
import signal
import threading
import time

import httpx
import pytest

from runtime_helpers import SHARED_DATA, lmspec_main, running_server

# A model trained and exported for these tests alone (~20 s) and generations of seconds: run with -m slow.
pytestmark = pytest.mark.slow

LONG = 1000  # tokens: at least ~3 s on any machine, for a model of this size
LONGEST = 2000  # at least ~7 s


@pytest.fixture(scope="module")
def slow_bundle(tmp_path_factory):
    work = tmp_path_factory.mktemp("slow_bundle")
    out = lmspec_main("train", "specs/tiny.arch", "--set", "context=2048", "--set", "layers=6", "--set", "dim=256",
                      "--set", "heads=8", "--data", SHARED_DATA / "the-verdict.txt", "--out", work / "run",
                      "--steps", 1, "--batch", 1, "--seq", 256, "--no-progress", "--sample-tokens", 0, "--eval-batches", 1)
    assert out.returncode == 0, out.stderr
    out = lmspec_main("export", work / "run", "-o", work / "slow.onnx")
    assert out.returncode == 0, out.stderr
    return work / "slow.onnx"


@pytest.fixture(scope="module")
def server(slow_bundle, tmp_path_factory):
    with running_server(slow_bundle, "--max-batch", 4, "--threads", 1,
                        log_dir=tmp_path_factory.mktemp("serve")) as (url, proc, err):
        yield url
        assert proc.poll() is None and "Traceback" not in err.read_text(), err.read_text()


def health(url):
    return httpx.get(f"{url}/health", timeout=30).json()


def until(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def stream_lines(url, body, lines: list, first: threading.Event, timeout=120):
    with httpx.Client(timeout=timeout) as c, c.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line[len("data: "):])
                first.set()


def test_a_short_request_joins_the_running_batch_and_is_not_queued_behind_a_long_one(server):
    lines, first = [], threading.Event()
    long = threading.Thread(target=stream_lines, args=(server, {"prompt": "I had", "max_tokens": LONG,
                                                                "temperature": 0}, lines, first))
    long.start()
    assert first.wait(60)
    started = time.perf_counter()
    short = httpx.post(f"{server}/v1/completions", json={"prompt": "It was", "max_tokens": 3, "temperature": 0},
                       timeout=60)
    seconds = time.perf_counter() - started
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 3
    still_streaming = long.is_alive() and lines[-1] != "[DONE]"
    long.join()
    assert still_streaming, f"the 3-token request took {seconds:.2f} s and came back after the long one"
    assert lines[-1] == "[DONE]" and json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"


def test_a_client_that_gives_up_frees_its_row_at_the_next_step(server):
    until(lambda: health(server)["running"] == 0)
    before = health(server)["steps"]
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming caller that stops waiting
        httpx.post(f"{server}/v1/completions", json={"prompt": "I had", "max_tokens": LONG}, timeout=0.5)
    until(lambda: health(server)["running"] == 0, seconds=10)
    assert health(server)["steps"] - before < LONG / 2
    def leave_after_the_first_token():
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{server}/v1/completions", json={
                "prompt": "I had", "max_tokens": LONG, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    return

    before = health(server)["steps"]
    leave_after_the_first_token()
    until(lambda: health(server)["running"] == 0, seconds=10)
    assert health(server)["steps"] - before < LONG / 2


def test_request_timeout_stops_a_request_with_a_408_or_an_error_event(slow_bundle, tmp_path):
    with running_server(slow_bundle, "--request-timeout", 1, "--threads", 1, log_dir=tmp_path) as (url, proc, err):
        started = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "I had", "max_tokens": LONG}, timeout=60)
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout", r.text
        assert "limit of 1 s" in r.json()["error"]["message"] and time.perf_counter() - started < LONG * 0.003
        lines, first = [], threading.Event()
        stream_lines(url, {"prompt": "I had", "max_tokens": LONG}, lines, first)
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["error"]["code"] == "request_timeout"
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "I", "max_tokens": 2}, timeout=30).status_code == 200
        assert "Traceback" not in err.read_text()


def test_sigterm_lets_running_requests_finish_then_ends_the_rest_cleanly(slow_bundle, tmp_path):
    with running_server(slow_bundle, "--drain-seconds", 2.5, "--max-tokens", LONGEST, "--threads", 1, log_dir=tmp_path) as (url, proc, err):
        lines, first = [], threading.Event()
        streamed = threading.Thread(target=stream_lines, args=(url, {"prompt": "I had", "max_tokens": LONGEST},
                                                               lines, first))
        streamed.start()
        assert first.wait(60)
        answers = {}

        def ask(name, max_tokens):
            answers[name] = httpx.post(f"{url}/v1/completions", json={"prompt": "It was", "max_tokens": max_tokens},
                                       timeout=60)

        callers = [threading.Thread(target=ask, args=("long", LONGEST)),
                   threading.Thread(target=ask, args=("short", 60))]
        for caller in callers:
            caller.start()
        until(lambda: health(url)["running"] == 3)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for caller in callers:
            caller.join()
        streamed.join()
        assert proc.wait(timeout=30) == 0
        exited = time.monotonic() - signalled

    assert answers["short"].status_code == 200 and answers["short"].json()["usage"]["completion_tokens"] == 60
    long = answers["long"]
    assert long.status_code == 503 and long.json()["error"]["code"] == "server_shutting_down", long.text
    assert lines[-1] == "[DONE]" and json.loads(lines[-2])["error"]["code"] == "server_shutting_down"
    assert 2.5 <= exited < 20
    log = err.read_text()
    assert "Traceback" not in log and "Exception" not in log, log
