"""``POST /v1/feedback`` without the framework in the way: the one route a chat service calls per user action.

Through FastAPI a feedback request spent about 70 of its 170 µs on routing, request objects and dependency
resolution, and each middleware layer (Starlette's error handler, the body limit, the metrics) wraps every
request's ``receive`` and ``send`` once more (py-spy, ``docs/benchmarks.md``). This pure ASGI application sits
in front of the whole stack and answers that one method and path itself, doing what those layers would do
in the order they would do it:

1. a declared ``Content-Length`` over ``api.max_body_bytes``: 413 (the body-limit middleware's answer);
2. the route's own functions, in the route's order: the media type (415), the key and its rate limit
   (401, 429), the publisher (503), then the body (:func:`serving.routers.events.accept_feedback`: 400, 413,
   422, 503 or 202), read with the same size limit (413 as soon as a streamed body passes it);
3. any other exception: the API's last-resort answer (:func:`serving.errors.unhandled_response`: 499 for a
   client that hung up, else a logged 500 naming its incident), unless the answer had already begun;
4. the request counted and timed under the route's path (:class:`serving.middleware.HttpMetrics`).

Errors get the API's one error body. Anything else goes on to the framework. The route stays the documented
one (OpenAPI) and answers when ``api.hot_path`` is off; ``tests/integration/test_api_fuzz.py`` holds the two
to the same answers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.requests import ClientDisconnect

from serving.deps import AppState, authenticate, check_media_type, running_publisher
from serving.errors import ApiError, error_response, unhandled_response
from serving.middleware import (
    BodyTooLarge,
    HttpMetrics,
    body_too_large,
    declared_too_large,
    send_body,
    send_json,
)
from serving.routers.events import accept_feedback

log = logging.getLogger(__name__)

PATH = "/v1/feedback"


async def _read_body(receive: Any, max_bytes: int) -> bytes:
    chunks, seen = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > max_bytes:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


class FeedbackHotPath:
    """Pure ASGI application in front of the API's stack: ``POST /v1/feedback`` answered here, everything
    else passed on to ``app``."""

    def __init__(self, app: Any, state: AppState, route: Any, *, max_body_bytes: int, metrics: HttpMetrics):
        self.app, self.state, self.route = app, state, route
        self.max_body_bytes, self.metrics = max_body_bytes, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        scope["route"] = self.route
        started, status, began = time.perf_counter(), 500, False

        async def tracking_send(message: Any) -> None:
            nonlocal status, began
            if message["type"] == "http.response.start":
                status, began = message["status"], True
            await send(message)

        try:
            await self._answer(scope, receive, tracking_send)
        except Exception as e:
            if began:  # the answer began: nothing more can be said (the server closes the connection)
                log.error("unhandled %s on POST %s after the answer began", type(e).__name__, PATH, exc_info=e)
                raise
            await unhandled_response("POST", PATH, e)(scope, receive, tracking_send)
        finally:
            self.metrics.observe(PATH, status, time.perf_counter() - started)

    async def _answer(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if declared_too_large(scope, self.max_body_bytes):
            return await send_json(send, 413, body_too_large(self.max_body_bytes))
        content_type = authorization = None
        for name, value in scope["headers"]:  # the first of each, as Starlette's Headers.get
            if name == b"authorization" and authorization is None:
                authorization = value.decode("latin-1")
            elif name == b"content-type" and content_type is None:
                content_type = value.decode("latin-1")
        client = scope.get("client")
        try:
            check_media_type("POST", content_type)
            authenticate(self.state, client[0] if client else "unknown", authorization or "")
            publisher = running_publisher(self.state)
            content = await accept_feedback(await _read_body(receive, self.max_body_bytes), self.state, publisher)
        except ApiError as e:
            return await error_response(e)(scope, receive, send)
        except BodyTooLarge:
            return await send_json(send, 413, body_too_large(self.max_body_bytes))
        await send_body(send, 202, content)  # a Response object would cost more than the rest of the answer
