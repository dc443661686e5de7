"""``POST /v1/feedback`` without the framework in the way: the one route a chat service calls per user action.

Through FastAPI a feedback request spent about 70 of its 170 µs on routing, request objects and dependency
resolution (py-spy, ``docs/benchmarks.md``). This pure ASGI middleware answers that one method and path itself,
with the same functions as the route, in the same order: the media type (415), the key and its rate limit
(401, 429), the publisher (503), then the body (:func:`serving.routers.events.accept_feedback`: 400, 413, 422,
503 or 202). Errors get the API's one error body. It sits inside the body-limit and metrics middleware, so
those apply as before (the metrics label is the route's path); anything else goes on to the framework. The
route stays the documented one (OpenAPI) and answers when ``api.hot_path`` is off.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import ClientDisconnect

from serving.deps import AppState, authenticate, check_media_type, running_publisher
from serving.errors import ApiError, error_response
from serving.routers.events import accept_feedback

PATH = "/v1/feedback"
_JSON = (b"content-type", b"application/json")


async def _accepted(send: Any, content: bytes) -> None:
    """The 202, sent as two ASGI messages (a Response object would cost more than the rest of the answer)."""
    await send({"type": "http.response.start", "status": 202,
                "headers": [_JSON, (b"content-length", str(len(content)).encode())]})
    await send({"type": "http.response.body", "body": content})


async def _read_body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


class FeedbackHotPath:
    """Pure ASGI middleware: ``POST /v1/feedback`` answered here, everything else passed on."""

    def __init__(self, app: Any, state: AppState, route: Any):
        self.app, self.state, self.route = app, state, route

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        scope["route"] = self.route
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
            content = await accept_feedback(await _read_body(receive), self.state, publisher)
        except ApiError as e:
            return await error_response(e)(scope, receive, send)
        await _accepted(send, content)
