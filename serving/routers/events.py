"""Logging turns and feedback: build the event, check it, make it durable, answer 202.

202 means the event is durable (broker ack or fsynced spool): the client may forget it. 400/413/422 tell the
client what to fix; 503 (spool full) means retry later with the same ``event_id``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from flywheel.events import EVENT_TYPES, FEEDBACK_TYPES, stamp_defaults, validate_event
from ingest.spool import SpoolFull
from ingest.validation import check_event
from serving.deps import Caller, Publisher, State
from serving.errors import ApiError, invalid

router = APIRouter(prefix="/v1", tags=["events"])

_DOC = "Fields are those of the event contract (GET /v1/schema); event_id and occurred_at may be omitted."


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, "invalid_encoding", f"request body is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, "malformed_json", f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def build_event(obj: Any, state: State, *, allowed: tuple[str, ...], now: datetime, prefix: tuple[Any, ...] = ()) -> Any:
    """Validate one event object (stamping server-owned defaults) or raise a 422 ApiError."""
    where = "".join(f"[{p}]" if isinstance(p, int) else f"{p}." for p in prefix)
    if not isinstance(obj, dict):
        raise ApiError(422, "validation_failed", f"{where or 'body'}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("type") not in allowed:
        got = obj.get("type")
        msg = "is missing" if got is None else f"is {got!r}"
        raise ApiError(422, "validation_failed", f"{where}type {msg}; expected one of {list(allowed)}",
                       fields=[{"field": f"{where}type", "message": f"expected one of {list(allowed)}"}])
    try:
        event = validate_event(stamp_defaults(obj, now))
    except ValidationError as e:
        raise invalid(e, prefix) from None
    verdict = check_event(event, state.rules, now)
    if verdict is not None:
        reason, message = verdict
        field = "occurred_at" if reason.startswith("occurred_at") else "text"
        raise ApiError(422, reason, f"{where}{message}", fields=[{"field": f"{where}{field}", "message": message}])
    return event


async def publish(publisher: Any, events: list[Any]) -> str:
    try:
        return await publisher.publish_async(events)  # type: ignore[no-any-return]
    except SpoolFull:
        raise ApiError(503, "unavailable", "the broker is unreachable and the local spool is full; "
                       "retry later with the same event_id", headers={"Retry-After": "10"}) from None


def _accepted(event: Any, path: str) -> dict[str, Any]:
    return {"event_id": str(event.event_id), "type": event.type, "durable": path}


@router.post("/feedback", status_code=202, summary="Log one feedback event", description=_DOC)
async def post_feedback(request: Request, _caller: Caller, state: State, publisher: Publisher) -> dict[str, Any]:
    event = build_event(parse_json(await request.body()), state, allowed=FEEDBACK_TYPES, now=datetime.now(UTC))
    return _accepted(event, await publish(publisher, [event]))


@router.post("/turns", status_code=202, summary="Log a turn produced by an external chat service", description=_DOC)
async def post_turn(request: Request, _caller: Caller, state: State, publisher: Publisher) -> dict[str, Any]:
    obj = parse_json(await request.body())
    if isinstance(obj, dict):
        obj.setdefault("type", "turn")
    event = build_event(obj, state, allowed=("turn",), now=datetime.now(UTC))
    return _accepted(event, await publish(publisher, [event]))


@router.post("/feedback/batch", status_code=202, summary="Log up to max_batch events (turns or feedback)",
             description="Body: {\"events\": [...]}. Valid events are accepted even when others are not: the "
             "response lists every rejected index with its errors. 422 only when none is valid.")
async def post_batch(request: Request, _caller: Caller, state: State, publisher: Publisher) -> dict[str, Any]:
    body = parse_json(await request.body())
    items = body.get("events") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        raise ApiError(422, "validation_failed", 'body must be {"events": [ ... ]} with at least one event',
                       fields=[{"field": "events", "message": "expected a non-empty list"}])
    limit = state.settings.api.max_batch
    if len(items) > limit:
        raise ApiError(413, "batch_too_large", f"batch has {len(items)} events; the limit is {limit}",
                       fields=[{"field": "events", "message": f"at most {limit} events"}])
    now = datetime.now(UTC)
    accepted, rejected = [], []
    for i, obj in enumerate(items):
        try:
            accepted.append(build_event(obj, state, allowed=EVENT_TYPES, now=now, prefix=("events", i)))
        except ApiError as e:
            rejected.append({"index": i, "error": e.error, "message": e.message, "fields": e.fields})
    if not accepted:
        raise ApiError(422, "validation_failed", f"none of the {len(items)} events is valid",
                       fields=[f for r in rejected for f in r["fields"]] or None)
    path = await publish(publisher, accepted)
    return {"accepted": len(accepted), "event_ids": [str(e.event_id) for e in accepted],
            "rejected": rejected, "durable": path}
