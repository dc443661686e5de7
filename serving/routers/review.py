"""Human review: the reviewer's page, the queue's statistics page, and their JSON endpoints.

Pages (``GET /review``, ``GET /review/stats``) are static HTML with their script inline: nothing is fetched from
another host, and they hold no data until the reviewer signs in with a key (kept in the tab's session storage).
Every ``/v1/review`` endpoint needs a key with the reviewer role (``flywheel keys --reviewer``): others get 403.
A decision is published as a ``review`` event, API -> Kafka -> lake, like every other event: 202 once durable.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.events import MAX_TEXT_CHARS, encode_event
from ingest.validation import check_event
from serving.deps import Publisher, State, require_role
from serving.errors import ApiError, invalid
from serving.openapi import UNAVAILABLE, inline_schema, json_body
from serving.review import ReviewDesk
from serving.routers.events import Checked, parse_json, publish

router = APIRouter(tags=["review"])


Reviewer = require_role("reviewer", "key '{name}' does not have the reviewer role; review needs a key created "
                                    "with `flywheel keys --reviewer`")


class DecisionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["accept", "reject", "fix", "skip"]
    reason: Literal["unclear", "subjective", "manipulation", "harmful", "factually_wrong"] | None = Field(
        default=None, description="Required with reject, not allowed otherwise.")
    edited_text: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS,
                                    description="The corrected text as fixed: required with fix, and only then.")


def desk(state: State) -> ReviewDesk:
    found = state.extras.get("review_desk")
    if found is None:
        found = state.extras["review_desk"] = ReviewDesk(state.settings)
    return found  # type: ignore[no-any-return]


def _page(name: str) -> HTMLResponse:
    html = files("serving").joinpath("static", name).read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                       "style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'",
                                       "Cache-Control": "no-store"})


@router.get("/review", include_in_schema=False)
async def review_page() -> HTMLResponse:
    return _page("review.html")


@router.get("/review/stats", include_in_schema=False)
async def review_stats_page() -> HTMLResponse:
    return _page("review-stats.html")


@router.get("/v1/review/next", summary="The next queued item for this reviewer (held for them a while)")
async def next_item(reviewer: Reviewer, state: State) -> dict[str, Any]:
    item, progress = await run_in_threadpool(desk(state).next_item, reviewer.name)
    return {"item": item, "progress": progress, "reviewer": reviewer.name}


@router.get("/v1/review/items/{item_id}", summary="One queued item")
async def get_item(item_id: str, _reviewer: Reviewer, state: State) -> dict[str, Any]:
    item = await run_in_threadpool(desk(state).item, item_id)
    if item is None:
        raise ApiError(404, "not_found", f"no review item {item_id[:80]!r} in the queue")
    return item


@router.post("/v1/review/items/{item_id}/decision", status_code=202, responses=UNAVAILABLE,
             summary="Accept, reject (with a reason), fix or skip an item: published as a review event",
             openapi_extra=json_body(inline_schema(DecisionRequest)))
async def decide(item_id: str, request: Request, reviewer: Reviewer, state: State,
                 publisher: Publisher) -> dict[str, Any]:
    review_desk = desk(state)
    item = await run_in_threadpool(review_desk.item, item_id)
    if item is None:
        raise ApiError(404, "not_found", f"no review item {item_id[:80]!r} in the queue")
    try:
        body = DecisionRequest.model_validate(parse_json(await request.body()))
    except ValidationError as e:
        raise invalid(e) from None
    if (body.decision == "reject") != (body.reason is not None):
        raise ApiError(422, "validation_failed", "reason is required with decision 'reject' and allowed only then",
                       fields=[{"field": "reason", "message": "one of unclear, subjective, manipulation, harmful, "
                                "factually_wrong, with reject only"}])
    if (body.decision == "fix") != (body.edited_text is not None):
        raise ApiError(422, "validation_failed", "edited_text is required with decision 'fix' and allowed only then",
                       fields=[{"field": "edited_text", "message": "the corrected text, with fix only"}])
    if body.edited_text is not None and not body.edited_text.strip():
        raise ApiError(422, "validation_failed", "edited_text is blank: send the correction as it should read",
                       fields=[{"field": "edited_text", "message": "not blank"}])
    if body.decision == "fix" and item["target_type"] != "correction":
        raise ApiError(422, "validation_failed", f"only a correction's text can be fixed; this item is a "
                       f"{item['target_type']} event: accept, reject or skip it",
                       fields=[{"field": "decision", "message": "fix applies to corrections only"}])
    try:
        event, repeated = review_desk.decision_event(reviewer.name, item, body.decision, body.reason, body.edited_text)
    except ValidationError as e:
        raise invalid(e) from None
    verdict = check_event(event, state.rules, datetime.now(UTC))  # what the consumer would dead-letter
    if verdict is not None:
        raise ApiError(422, verdict[0], verdict[1], fields=[{"field": "edited_text", "message": verdict[1]}])
    durable = await publish(publisher, [Checked(event, encode_event(event))])
    review_desk.record(event)
    return {"event_id": str(event.event_id), "item_id": item_id, "decision": body.decision, "repeated": repeated,
            "durable": durable}


@router.get("/v1/review/stats", summary="The queue's state and each reviewer's numbers (kappa per pair)")
async def stats(_reviewer: Reviewer, state: State) -> dict[str, Any]:
    return await run_in_threadpool(desk(state).stats)
