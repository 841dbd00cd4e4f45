"""ASGI middleware around the routes: request ids, access logs and metrics; JSON bodies for
``curl -d``; request body limits."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

from app.errors import envelope

access_log = logging.getLogger("persona_server.access")
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def _send_error(send, status: int, message: str, code: str, headers: list | None = None) -> None:
    body = json.dumps(envelope(message, "invalid_request_error", None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class RequestObserver:
    """Give every request an id (``X-Request-Id``, honoured when safe, echoed), then count and
    time it by route template and write one JSON access-log line.

    The line and the counters are written just before the response's last body message goes
    out, so whoever holds a whole response (a client, a log shipper joining on the request id,
    a test) finds them already there. A request that ends without a complete response is
    recorded when it ends.

    Routes add fields for the log line in ``scope["state"]["log"]`` (tokens, monitor verdicts).
    """

    def __init__(self, app, fastapi_app):
        self.app, self.fastapi_app = app, fastapi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, recorded = time.monotonic(), {"code": 500}, {"done": False}
        given = (_header(scope, b"x-request-id") or b"").decode("latin-1")
        request_id = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        scope["state"]["log"] = {}

        def record() -> None:
            if recorded["done"]:
                return
            recorded["done"] = True
            elapsed = time.monotonic() - start
            route = getattr(scope.get("route"), "path", None) or "other"
            server = getattr(self.fastapi_app.state, "server", None)
            if server is not None:
                server.metrics.requests.labels(route, str(status["code"])).inc()
                server.metrics.request_duration.labels(route).observe(elapsed)
            access_log.info(json.dumps({
                "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "request_id": request_id,
                "method": scope["method"], "route": route, "status": status["code"],
                "latency_s": round(elapsed, 4), **scope["state"]["log"],
            }))

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            record()


class JsonByDefault:
    """Read every request body as JSON, whatever content type the client declared.

    ``curl -d '{...}'`` labels its body ``application/x-www-form-urlencoded``, on POST and on
    ``curl -X PUT`` alike, and other clients send ``text/plain`` or nothing. Every route that takes a
    structured body takes JSON, so any other declared type is replaced by JSON on every method.
    Routes that read raw bytes and look at the type themselves (vector uploads) are ``exempt``:
    ``(method, path prefix)`` pairs.

    Example::

        app.add_middleware(JsonByDefault, exempt=(("PUT", "/v1/vectors/"),))
    """

    def __init__(self, app, exempt: tuple[tuple[str, str], ...] = ()):
        self.app, self.exempt = app, exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not any(
            scope["method"] == method and scope["path"].startswith(prefix) for method, prefix in self.exempt
        ):
            current = (_header(scope, b"content-type") or b"").split(b";")[0].strip().lower()
            if not (current == b"application/json" or current.endswith(b"+json")):
                # In place: the observer outside reads the routed scope afterwards.
                scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [
                    (b"content-type", b"application/json")]
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuse request bodies above a limit with 413.

    A body with a ``Content-Length`` is judged by it. A body without one (``Transfer-Encoding:
    chunked``) is read here, up to the limit, before the route runs: a route parses its body
    itself and would turn any failure inside that read into a 400. Every route that reaches
    this middleware buffers its whole body anyway, so reading it first costs no memory.

    Routes that take large uploads (vectors, screening datasets) are exempt and enforce their
    own limits.
    """

    def __init__(self, app, limit: int, exempt: tuple[tuple[str, str], ...] = ()):
        self.app, self.limit, self.exempt = app, limit, exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or any(
            scope["method"] == method and scope["path"].startswith(prefix) for method, prefix in self.exempt
        ):
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        buffered, size = [], 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._refuse(send)
            if not message.get("more_body", False):
                break

        async def replay():
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        await _send_error(send, 413, f"request body is larger than {self.limit} bytes", "payload_too_large")
