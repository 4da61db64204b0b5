"""What stands between the network and a server's routes: the API key, the names a loopback server
answers to, JSON bodies only, a body that must keep arriving, and cross-origin requests only from the
origins allowed. Wraps either server (language model or classifier) as ASGI middleware.

Why each: a key keeps a server on a shared network to its owners (`Authorization: Bearer …`, as the
OpenAI API and its clients do); a web page can POST `text/plain` or a form to any address without a
CORS preflight, so only `application/json` is read; DNS rebinding lets a page reach 127.0.0.1 under
its own name, so a server bound to loopback answers only to loopback names; a client that sends
headers and then trickles its body would hold a request open forever.
"""
from __future__ import annotations

import asyncio
import hmac

from fastapi.responses import JSONResponse

from lmspec.runtime.serve.http_bodies import ApiError

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
# /health for load balancers' and orchestrators' probes, which hold no key; / for the chat page
# (serve/page.py), static and secret-free, which asks its user for the key and sends it on its own calls.
OPEN_PATHS = {"/health", "/"}


class Guard:
    """ASGI middleware refusing, with an OpenAI-style error body, what the server must not run."""

    def __init__(self, app, *, api_key: str | None = None, loopback_only: bool = False,
                 read_timeout: float | None = None):
        self.app, self.api_key, self.loopback_only, self.read_timeout = app, api_key, loopback_only, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope["method"], scope["path"], headers)
        if refusal is not None:
            return await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)
        await self.app(scope, self._timed(receive) if self.read_timeout else receive, send)

    def refusal(self, method: str, path: str, headers: dict[str, str]) -> ApiError | None:
        if self.loopback_only and _hostname(headers.get("host", "")) not in LOOPBACK_NAMES:
            return ApiError(403, f"this server listens on loopback and answers only to localhost, 127.0.0.1 and "
                                 f"[::1], not to Host {headers.get('host', '')!r} (a guard against DNS rebinding)",
                            code="host_not_allowed")
        if self.api_key is not None and path not in OPEN_PATHS:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                return ApiError(401, "a valid API key is required: send the header Authorization: Bearer <key>",
                                code="invalid_api_key")
        if method == "POST":
            kind = headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind != "application/json":
                return ApiError(415, f"the request body must be JSON sent as Content-Type: application/json, not "
                                     f"{kind or 'a body without a Content-Type'}", code="unsupported_media_type")
        return None

    def _timed(self, receive):
        """`receive`, with each part of the body due within read_timeout seconds (408 otherwise); once
        the body is complete, waits are the app's own (a stream listening for the client to leave)."""
        complete = False

        async def timed():
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.read_timeout:g} s",
                               code="request_timeout") from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message
        return timed


def _hostname(host: str) -> str:
    """The name in a Host header, without its port: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def guarded(app, *, api_key: str | None, loopback_only: bool, read_timeout: float | None,
            cors_origins: list[str] | None = None):
    """The app behind the Guard, and, when origins are given, behind CORS for those origins alone
    (outermost, so that a browser's preflight is answered before the key is asked for)."""
    wrapped = Guard(app, api_key=api_key, loopback_only=loopback_only, read_timeout=read_timeout)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware
        wrapped = CORSMiddleware(wrapped, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                                 allow_headers=["authorization", "content-type"])
    return wrapped


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, with the headers of each request due within `seconds` of the connection
    opening or of the previous answer: uvicorn itself waits for them forever, so a client that connects
    and sends nothing, or a header a byte at a time, would hold its connection open without end."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _headers_due = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._headers_due is None and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request's first bytes: its headers are due from now
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the headers are in: the body has read_timeout
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._headers_due = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._headers_due is not None:
                self._headers_due.cancel()
                self._headers_due = None

        def _too_slow(self) -> None:
            self._headers_due = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
