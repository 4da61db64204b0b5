"""The chat page at GET / (serve/page.py, serve/static/chat.html): served with a Content-Security-Policy
that allows its own inline script and style and nothing else, without the API key when the server has
one; and, in a real browser (headless Chromium driven by playwright), a page that shows the model's
name and limits, streams an answer that equals the API's own, keeps the conversation, shows the
server's errors and stops on request. The browser tests skip where /usr/bin/chromium (Debian's
`chromium` package) or playwright is missing; nothing here downloads a browser."""
from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from runtime_helpers import running_server

NAME = "tiny-chat"
KEY = "page-key-93ab"
CHROMIUM = Path("/usr/bin/chromium")
# As root, in a container, with no network to reach: no sandbox, no GPU, nothing fetched in the background.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    with running_server(tiny_bundle, "--name", NAME, "--max-tokens", 128, "--threads", 1,
                        log_dir=tmp_path_factory.mktemp("chat_page")) as (url, proc, err):
        yield url
        assert proc.poll() is None and "Traceback" not in err.read_text(), err.read_text()


@pytest.fixture(scope="module")
def keyed_server(tiny_bundle, tmp_path_factory):
    with running_server(tiny_bundle, "--name", NAME, "--api-key", KEY, "--threads", 1,
                        log_dir=tmp_path_factory.mktemp("chat_page_keyed")) as (url, proc, err):
        yield url
        assert proc.poll() is None and "Traceback" not in err.read_text(), err.read_text()


# ------------------------------------------------------------------------------ over HTTP

def _sha256(text: str) -> str:
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


def test_the_page_is_served_with_a_policy_that_allows_only_its_own_script(server):
    r = httpx.get(f"{server}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    [script] = re.findall(r"<script>(.*?)</script>", r.text, flags=re.S)
    [style] = re.findall(r"<style>(.*?)</style>", r.text, flags=re.S)
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["script-src"] == _sha256(script) and policy["style-src"] == _sha256(style)
    assert policy["frame-ancestors"] == "'none'" and policy["form-action"] == "'none'"
    assert r.headers["x-content-type-options"] == "nosniff"
    # Nothing from elsewhere (the server may have no network), and model output never parsed as HTML.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text)
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "textContent" in script


def test_the_page_needs_no_key_but_the_api_behind_it_does(keyed_server):
    assert httpx.get(f"{keyed_server}/").status_code == 200
    assert httpx.get(f"{keyed_server}/v1/models").status_code == 401
    assert httpx.get(f"{keyed_server}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    port = urlparse(keyed_server).port  # the page is still only served to loopback names on a loopback server
    assert httpx.get(f"{keyed_server}/", headers={"Host": f"rebound.attacker.example:{port}"}).status_code == 403


# ------------------------------------------------------------------------------ in Chromium

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with a fresh profile (the system's: playwright's own browsers are never
    installed), as a playwright BrowserContext."""
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the test extra)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path_factory.mktemp("chromium_profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS)
        context.set_default_timeout(15_000)
        yield context
        context.close()


@pytest.fixture
def page(browser):
    """A new tab, failing the test on a script error or a Content-Security-Policy violation."""
    page = browser.new_page()
    problems = []
    page.on("pageerror", lambda err: problems.append(f"script error: {err}"))
    page.on("console", lambda m: problems.append(m.text) if "Content Security Policy" in m.text else None)
    yield page
    page.close()
    assert not problems, problems


def _open(page, url: str) -> None:
    page.goto(f"{url}/")
    page.wait_for_function("() => document.getElementById('model-name').textContent !== '…'")


# Records every text the answers in the conversation had: each change to their text nodes, with the
# text before it (characterDataOldValue), so that no intermediate state is lost to batching.
WATCH = """() => {
  window.answerStates = [];
  const keep = (records) => { for (const r of records) {
    if (r.type === "characterData" && r.target.parentElement.closest("li.assistant")) {
      window.answerStates.push([r.oldValue, r.target.data]);
    } } };
  window.answerWatcher = new MutationObserver(keep);
  window.answerWatcher.observe(document.getElementById("conversation"),
                               {subtree: true, characterData: true, characterDataOldValue: true});
}"""
STATES = "() => { const w = window.answerWatcher; w.takeRecords(); return window.answerStates; }"


def _send(page, text: str) -> str:
    """Sends a message from the page; its answer, once complete."""
    page.fill("#message", text)
    page.click("#send")  # disables Send until the answer is complete or has failed
    page.wait_for_function("() => !document.getElementById('send').disabled")
    assert page.is_hidden("#error"), page.text_content("#error")
    assert page.get_attribute("#conversation li:last-child", "data-state") == "done"
    return page.text_content("#conversation li:last-child .content")


def _answer_api(url: str, messages: list[dict], **sampling) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": messages, **sampling}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_the_page_streams_an_answer_equal_to_the_apis_and_keeps_the_conversation(server, page):
    _open(page, server)
    assert page.text_content("#model-name") == NAME and page.title() == f"{NAME} · lmspec chat"
    assert page.text_content("#context") == "64 tokens"  # the tiny bundle's context, from /tokenize
    page.click("#settings summary")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "8")  # short: two turns must fit the tiny model's context of 64 characters
    page.evaluate(WATCH)

    answer = _send(page, "Hi")
    first = [{"role": "user", "content": "Hi"}]
    assert answer and answer == _answer_api(server, first, temperature=0, max_tokens=8)
    # Streamed: the text grew delta by delta, through at least two different non-empty states.
    states = page.evaluate(STATES)
    grown = [new for _, new in states]
    assert len(grown) == int(page.get_attribute("#conversation li.assistant", "data-deltas")) >= 2
    assert states[0][0] == "" and all(new.startswith(old) and len(new) > len(old) for old, new in states)
    assert all(states[i][0] == states[i - 1][1] for i in range(1, len(states)))  # one text, growing
    assert len({g for g in grown if g}) >= 2 and grown[-1] == answer
    assert "tokens generated" in page.text_content("#conversation li.assistant .note")

    second = _send(page, "So?")  # the second request carries the whole conversation
    messages = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "So?"}]
    assert second == _answer_api(server, messages, temperature=0, max_tokens=8)
    assert page.locator("#conversation li").count() == 4 and page.is_hidden("#error")


def test_the_page_shows_the_servers_error_and_stops_on_request(server, page):
    _open(page, server)
    page.fill("#message", "Grüße")  # the character-level vocabulary has no ü
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])")
    assert "400: messages[0].content" in page.text_content("#error")
    assert "not in the tokenizer's vocabulary" in page.text_content("#error")
    # The message was not answered: it goes back to the box, and out of the conversation.
    assert page.input_value("#message") == "Grüße" and page.locator("#conversation li").count() == 0

    page.fill("#message", "Hello")
    page.evaluate("() => { document.getElementById('send').click(); document.getElementById('stop').click(); }")
    page.wait_for_selector("#conversation li.assistant[data-state=stopped]")
    assert page.is_hidden("#error") and page.is_enabled("#send") and page.is_disabled("#stop")


def test_the_page_asks_for_the_key_and_keeps_it_in_the_tab_only(keyed_server, page):
    _open(page, keyed_server)  # the name comes from /health, which needs no key
    assert page.text_content("#model-name") == NAME
    assert "401" in page.text_content("#error") and "API key" in page.text_content("#error")
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("() => document.getElementById('context').textContent !== '…'")
    assert page.text_content("#context") == "64 tokens" and page.is_hidden("#error")
    assert page.evaluate("() => [sessionStorage.getItem('lmspec-api-key'), localStorage.length]") == [KEY, 0]
    assert _send(page, "Hello")
