"""Logging turns and feedback: build the event, check it, make it durable, answer 202.

202 means the event is durable (broker ack or fsynced spool): the client may forget it. 400/413/422 tell the
client what to fix; 503 (spool full) means retry later with the same ``event_id``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, NamedTuple

from fastapi import APIRouter, Request, Response
from pydantic import TypeAdapter, ValidationError

from flywheel.events import (
    CLIENT_TYPES,
    FEEDBACK_TYPES,
    MAX_JSON_DEPTH,
    MAX_RECORD_BYTES,
    ClientEvent,
    EventDecodeError,
    Feedback,
    Turn,
    encode_event,
    field_path,
    stamp_defaults,
    validate_event,
    validate_feedback_json,
)
from flywheel.events import parse_json as parse_bounded_json
from ingest.producer import EventTooLarge
from ingest.spool import SpoolFull
from ingest.validation import check_event
from serving.deps import Caller, Publisher, State
from serving.errors import ApiError, invalid
from serving.openapi import UNAVAILABLE, http_event_schema, json_body

router = APIRouter(prefix="/v1", tags=["events"])

_DOC = "Fields are those of the event contract (GET /v1/schema); event_id and occurred_at may be omitted."
_BATCH_SCHEMA = {"type": "object", "required": ["events"], "properties": {"events": {
    "type": "array", "minItems": 1, "items": http_event_schema(TypeAdapter(ClientEvent)),
    "description": "Turns and feedback events, at most the server's max_batch (1,000 by default; more is 413)."}}}


# How each reason of the bounded parser reaches the client: bytes that are not JSON are the client's syntax
# error (400); JSON past the parser's bounds is well-formed but no event can look like it (422).
_DECODE_ERRORS = {
    "invalid_utf8": (400, "invalid_encoding", "request body is not valid UTF-8"),
    "invalid_json": (400, "malformed_json", "request body is not valid JSON"),
    "too_deep": (422, "json_too_deep", f"request body nests JSON deeper than {MAX_JSON_DEPTH} levels "
                 "(an event needs 4)"),
    "number_too_large": (422, "number_too_large", "request body has an integer of more than 4,300 digits "
                         "(every integer field of the contract fits in 64 bits)"),
}


def parse_json(raw: bytes) -> Any:
    """The request body as a JSON value, parsed with the contract's bounded parser; raises only ApiError."""
    try:
        return parse_bounded_json(raw)
    except EventDecodeError as e:
        status, error, message = _DECODE_ERRORS.get(e.reason, (400, "malformed_json", "request body is not valid JSON"))
        raise ApiError(status, error, f"{message}: {e.detail}") from None


class Checked(NamedTuple):
    """An event that passed every check, with its wire form (encoded once: sized here, published as is)."""

    event: Any
    value: bytes


def build_event(obj: Any, state: State, *, allowed: tuple[str, ...], now: datetime,
                prefix: tuple[Any, ...] = ()) -> Checked:
    """Validate one event object (stamping server-owned defaults) or raise an ApiError: 422, or 413 when its
    encoded size is over the record limit."""
    where = f"{field_path(prefix)}." if prefix else ""  # ("events", 3) -> "events[3]."
    if not isinstance(obj, dict):
        raise ApiError(422, "validation_failed", f"{field_path(prefix)}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("type") not in allowed:
        got = obj.get("type")
        shown = repr(got)
        shown = shown if len(shown) <= 80 else shown[:80] + "..."  # never echo a megabyte back
        msg = "is missing" if got is None else f"is {shown}"
        raise ApiError(422, "validation_failed", f"{where}type {msg}; expected one of {list(allowed)}",
                       fields=[{"field": f"{where}type", "message": f"expected one of {list(allowed)}"}])
    try:
        event = validate_event(stamp_defaults(obj, now))
    except ValidationError as e:
        raise invalid(e, prefix) from None
    return checked(event, state, now, prefix)


def checked(event: Any, state: State, now: datetime, prefix: tuple[Any, ...] = ()) -> Checked:
    """A valid event through the data-quality rules and the record size limit (422, 413)."""
    where = f"{field_path(prefix)}." if prefix else ""
    verdict = check_event(event, state.rules, now)
    if verdict is not None:
        reason, message = verdict
        field = "occurred_at" if reason.startswith("occurred_at") else "text"
        raise ApiError(422, reason, f"{where}{message}", fields=[{"field": f"{where}{field}", "message": message}])
    value = encode_event(event)
    if len(value) > MAX_RECORD_BYTES:  # no broker would take it: refuse it here rather than fail it in the publisher
        message = (f"the event is {len(value)} bytes encoded; the limit is {MAX_RECORD_BYTES} bytes; shorten its "
                   "text fields")
        raise ApiError(413, "event_too_large", f"{field_path(prefix)}: {message}" if prefix else message)
    return Checked(event, value)


async def publish(publisher: Any, events: list[Checked]) -> str:
    try:
        return await publisher.publish_async([c.event for c in events],  # type: ignore[no-any-return]
                                             [c.value for c in events])
    except EventTooLarge as e:
        raise ApiError(413, "event_too_large", f"{e}; shorten its text fields") from None
    except SpoolFull:
        raise ApiError(503, "unavailable", "the broker is unreachable and the local spool is full; "
                       "retry later with the same event_id", headers={"Retry-After": "10"}) from None
    except OSError as e:  # the spool's disk failed (full, read-only): nothing was accepted
        raise ApiError(503, "unavailable", f"the broker is unreachable and the local spool cannot be written "
                       f"({e.strerror or e}); retry later with the same event_id",
                       headers={"Retry-After": "10"}) from None


def accepted_body(event: Any, path: str) -> bytes:
    """``{"event_id", "type", "durable"}``, written directly (a UUID, a type name and a path name need no
    escaping): the hot path does not build a dict for FastAPI to encode."""
    return f'{{"event_id":"{event.event_id}","type":"{event.type}","durable":"{path}"}}'.encode()


def _accepted(content: bytes) -> Response:
    return Response(content, status_code=202, media_type="application/json")


async def accept_feedback(raw: bytes, state: State, publisher: Any) -> bytes:
    """``POST /v1/feedback`` once the caller is authenticated: the 202 body, or an ApiError (the route below
    and ``serving.hot_path`` both answer with this)."""
    now = datetime.now(UTC)
    try:  # the common body (the client set event_id and occurred_at): parsed and validated in one pass
        event = checked(validate_feedback_json(raw), state, now)
    except (ValidationError, ValueError):  # anything else takes the path that explains what is wrong
        event = build_event(parse_json(raw), state, allowed=FEEDBACK_TYPES, now=now)
    return accepted_body(event.event, await publish(publisher, [event]))


_ACCEPTED = {202: {"description": "Durable (broker ack or fsynced spool)", "content": {"application/json": {
    "schema": {"type": "object", "required": ["event_id", "type", "durable"], "properties": {
        "event_id": {"type": "string", "format": "uuid"}, "type": {"type": "string"},
        "durable": {"type": "string", "enum": ["broker", "spool"]}}}}}}}


@router.post("/feedback", status_code=202, summary="Log one feedback event", description=_DOC,
             responses=UNAVAILABLE | _ACCEPTED, openapi_extra=json_body(http_event_schema(TypeAdapter(Feedback))))
async def post_feedback(request: Request, _caller: Caller, state: State, publisher: Publisher) -> Response:
    return _accepted(await accept_feedback(await request.body(), state, publisher))


@router.post("/turns", status_code=202, summary="Log a turn produced by an external chat service", description=_DOC,
             responses=UNAVAILABLE | _ACCEPTED,
             openapi_extra=json_body(http_event_schema(TypeAdapter(Turn), type_required=False)))
async def post_turn(request: Request, _caller: Caller, state: State, publisher: Publisher) -> Response:
    obj = parse_json(await request.body())
    if isinstance(obj, dict):
        obj.setdefault("type", "turn")
    event = build_event(obj, state, allowed=("turn",), now=datetime.now(UTC))
    return _accepted(accepted_body(event.event, await publish(publisher, [event])))


@router.post("/feedback/batch", status_code=202, summary="Log up to max_batch events (turns or feedback)",
             description="Body: {\"events\": [...]}. Valid events are accepted even when others are not: the "
             "response lists every rejected index with its errors. 422 only when none is valid.",
             responses=UNAVAILABLE, openapi_extra=json_body(_BATCH_SCHEMA))
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
            accepted.append(build_event(obj, state, allowed=CLIENT_TYPES, now=now, prefix=("events", i)))
        except ApiError as e:
            rejected.append({"index": i, "error": e.error, "message": e.message, "fields": e.fields})
    if not accepted:
        raise ApiError(422, "validation_failed", f"none of the {len(items)} events is valid",
                       fields=[f for r in rejected for f in r["fields"]] or None)
    path = await publish(publisher, accepted)
    return {"accepted": len(accepted), "event_ids": [str(e.event.event_id) for e in accepted],
            "rejected": rejected, "durable": path}
