"""Pure ASGI middleware (no per-request task overhead): request size limit and request metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

Scope = dict[str, Any]


class BodyTooLarge(Exception):
    pass


async def send_body(send: Any, status: int, data: bytes) -> None:
    """A whole JSON answer as two ASGI messages (no Response object)."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def send_json(send: Any, status: int, payload: dict[str, Any]) -> None:
    await send_body(send, status, json.dumps(payload).encode())


def body_too_large(max_bytes: int) -> dict[str, str]:
    """The 413 body of a request over the size limit."""
    return {"error": "body_too_large",
            "message": f"request body exceeds {max_bytes} bytes; split it into smaller requests"}


def declared_too_large(scope: Scope, max_bytes: int) -> bool:
    """Whether the request's Content-Length alone puts it over ``max_bytes``."""
    for name, value in scope.get("headers", []):
        if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
            return True
    return False


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: at once from Content-Length, or as soon as a streamed body passes it."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if declared_too_large(scope, self.max_bytes):
            return await send_json(send, 413, body_too_large(self.max_bytes))
        seen = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await send_json(send, 413, body_too_large(self.max_bytes))


class HttpMetrics:
    """Requests by route and status, and their latency by route (``/metrics``)."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("flywheel_http_requests_total", "HTTP requests", ["route", "status"],
                                registry=registry)
        self.latency = Histogram("flywheel_http_request_seconds", "HTTP request latency", ["route"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10),
                                 registry=registry)

        # label lookups cost more than the counting itself: each (route, status) child is looked up once
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    def observe(self, route: str, status: int, seconds: float) -> None:
        children = self._children.get((route, status))
        if children is None:
            children = self._children[(route, status)] = (self.requests.labels(route, str(status)),
                                                           self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)


class MetricsMiddleware:
    def __init__(self, app: Any, metrics: HttpMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def tracking_send(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = scope.get("route")
            self.metrics.observe(getattr(route, "path", "unmatched"), status, time.perf_counter() - started)
