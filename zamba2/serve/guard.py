"""ASGI middleware in front of every endpoint: request ids, request-body limits, one error shape, counting.

    request id     the client's X-Request-Id when it is short and plain, else a new "req-<hex>"; sent back on
                   every response, named in 500 messages and in the server log lines of that request
    Content-Type   a POST body is JSON: a Content-Type other than application/json (or *+json) is a 415; none
                   at all is accepted (curl --data-binary, httpx content=)
    body size      a Content-Length past --max-request-bytes is a 413 before any byte of the body is read; a
                   chunked body is counted as it arrives and refused (413) once it passes the limit
    body timeout   each chunk of a body must arrive within --body-timeout seconds, else 408: a slow client
                   cannot hold a handler forever (slow headers are cut by connections.py)
    errors         whatever a handler raises past the APIError handlers becomes a 500 in OpenAI's shape with a
                   generic message and the request id, the traceback goes to the log; a client that leaves
                   mid-upload is logged at debug level and counted as 499, never as a 500
    counting       zamba2_requests_total{endpoint, status}

Error bodies are written with ensure_ascii, so no string can make the error itself fail to encode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from typing import Any

from starlette.requests import ClientDisconnect

from zamba2.serve.metrics import ServerMetrics
from zamba2.serve.protocol import APIError

log = logging.getLogger("zamba2.serve")

_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
GENERIC_500 = "The server had an error while processing your request (request id {}); the details are in its log."


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


def error_message(status: int, message: str, *, code: str | None = None, type: str = "invalid_request_error",
                  request_id: str | None = None, close: bool = False) -> tuple[dict[str, Any], bytes]:  # fmt: skip
    """An http.response.start message and the JSON body of an OpenAI-shaped error."""
    body = json.dumps(APIError(status, message, code=code, type=type).body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if request_id is not None:
        headers.append((b"x-request-id", request_id.encode()))
    if close:  # the body was not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    return {"type": "http.response.start", "status": status, "headers": headers}, body


def request_id(scope: dict[str, Any]) -> str:
    """The request id of an ASGI scope that went through Guard (a new one otherwise)."""
    return scope.get("state", {}).get("request_id") or "req-" + uuid.uuid4().hex[:24]


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class Guard:
    def __init__(self, app, metrics: ServerMetrics, endpoints: set[str], max_body: int, body_timeout: float) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints
        self.max_body, self.body_timeout = max_body, body_timeout

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client_id = _header(scope, b"x-request-id")
        rid = client_id if client_id and _CLIENT_ID.match(client_id) else "req-" + uuid.uuid4().hex[:24]
        scope.setdefault("state", {})["request_id"] = rid
        status = [0]  # 0 until the response starts

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        async def refuse(code: int, message: str, kind: str, error_type: str = "invalid_request_error") -> None:
            start, body = error_message(code, message, code=kind, type=error_type, close=True)
            await send_with_id(start)
            await send({"type": "http.response.body", "body": body})

        try:
            refusal = self._check_headers(scope)
            if refusal is not None:
                await refuse(*refusal)
                return
            await self.app(scope, self._limited(receive), send_with_id)
        except _TooLarge:
            if not status[0]:
                await refuse(413, self._too_large(None), "request_too_large")
        except _TooSlow:
            if not status[0]:
                await refuse(408, f"the request body did not arrive within {self.body_timeout:g} s (--body-timeout)",
                             "request_timeout")  # fmt: skip
        except ClientDisconnect:
            log.debug("request %s: the client disconnected before its body was read", rid)
            status[0] = status[0] or 499
        except Exception:
            log.exception("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"))
            if not status[0]:
                await refuse(500, GENERIC_500.format(rid), "internal_error", "server_error")
        finally:
            path = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.requests.labels(path, str(status[0] or 499)).inc()

    def _too_large(self, size: int | None) -> str:
        what = f"is {size} bytes" if size is not None else "is larger than that"
        return f"the request body {what}; this server accepts at most {self.max_body} bytes (--max-request-bytes)"

    def _check_headers(self, scope) -> tuple[int, str, str] | None:
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return None
        kind = _header(scope, b"content-type")
        if kind is not None:
            media = kind.split(";", 1)[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                return 415, f"Content-Type must be application/json, got {kind[:100]!r}", "unsupported_media_type"
        length = _header(scope, b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_body:
            return 413, self._too_large(int(length)), "request_too_large"
        return None

    def _limited(self, receive):
        """receive() that enforces the body limit and the per-chunk timeout until the body is complete."""
        seen = 0
        complete = False

        async def limited():
            nonlocal seen, complete
            if complete:  # after the body only the disconnect comes: waiting for it has no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                raise _TooSlow from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _TooLarge
                complete = not message.get("more_body", False)
            return message

        return limited
