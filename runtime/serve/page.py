"""GET /: the chat page, one static HTML file (static/chat.html) whose inline script talks to this server's own API."""
from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = "static/chat.html"


def _hashes(html: str, tag: str) -> str:
    """CSP sources for each inline <tag>…</tag> block of the page: the SHA-256 of its exact text."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)


def content_security_policy(html: str) -> str:
    """The page's own inline script and style (by hash, so no 'unsafe-inline'), calls to its own origin,
    and nothing else: no other script, no frame, no form posted anywhere, no page framing it."""
    return "; ".join([
        "default-src 'none'",
        f"script-src {_hashes(html, 'script')}",
        f"style-src {_hashes(html, 'style')}",
        "connect-src 'self'",
        "img-src data:",  # the empty favicon, so that the browser does not ask for /favicon.ico
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])


def add_chat_page(app: FastAPI) -> None:
    """GET / answers the chat page. The page holds no secret (the Guard lets it through without the API
    key); it reads the model's name and limits from /v1/models, /health and /tokenize, and chats through
    POST /v1/chat/completions, sending the key that its user types in."""
    html = (files("lmspec.runtime.serve") / PAGE).read_text(encoding="utf-8")
    headers = {"Content-Security-Policy": content_security_policy(html), "X-Content-Type-Options": "nosniff",
               "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(html, headers=headers)
