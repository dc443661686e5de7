"""``POST /v1/chat``: answer with the current policy and log the turn it produced."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flywheel.events import Id, Message, Turn
from serving.deps import Caller, Policy, Publisher, State
from serving.errors import invalid
from serving.routers.events import parse_json, publish

router = APIRouter(prefix="/v1", tags=["chat"])


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    messages: list[Message] = Field(min_length=1, max_length=200)
    conversation_id: Id | None = Field(default=None, description="Omit to start a new conversation.")
    parent_response_id: Id | None = Field(default=None, description="Set when regenerating that response.")
    max_new_tokens: int | None = Field(default=None, ge=1, le=1024)
    seed: int | None = Field(default=None, description="Sampling seed, for reproducible simulations.")


# The body is parsed like every other route's (400 for bytes that are not UTF-8 JSON, 422 with field paths),
# so the schema is declared for the OpenAPI document rather than taken as a FastAPI body parameter.
@router.post("/chat", summary="Generate a reply with the current policy and log the turn",
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
async def chat(request: Request, _caller: Caller, state: State, policy: Policy, publisher: Publisher) -> dict[str, Any]:
    try:
        req = ChatRequest.model_validate(parse_json(await request.body()))
    except ValidationError as e:
        raise invalid(e) from None
    messages = [m.model_dump() for m in req.messages]
    max_new = req.max_new_tokens or state.settings.api.max_new_tokens
    reply = await run_in_threadpool(policy.generate, messages, max_new, seed=req.seed)
    turn = Turn(
        event_id=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        conversation_id=req.conversation_id or f"c-{uuid.uuid4().hex[:16]}",
        user_id=req.user_id,
        model_version=reply.model_version,
        response_id=f"r-{uuid.uuid4().hex}",
        messages=req.messages,
        response=reply.text,
        parent_response_id=req.parent_response_id,
    )
    durable = await publish(publisher, [turn])
    return {
        "conversation_id": turn.conversation_id,
        "response_id": turn.response_id,
        "model_version": turn.model_version,
        "message": {"role": "assistant", "content": reply.text},
        "finished": reply.finished,
        "event_id": str(turn.event_id),
        "durable": durable,
    }
