"""``POST /v1/chat``: answer with the current policy and log the turn it produced."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from flywheel.events import Id, Message, Turn, encode_event
from serving.champion import ChampionPolicy
from serving.deps import Caller, Policy, Publisher, State
from serving.errors import ApiError, invalid
from serving.generation_pool import Overloaded
from serving.openapi import UNAVAILABLE, inline_schema, json_body
from serving.policy import PolicyHandle
from serving.routers.events import Checked, parse_json, publish
from serving.security import retry_after_header

router = APIRouter(prefix="/v1", tags=["chat"])
MAX_TOKEN_CHARS = 100
"""No token of a real tokenizer is longer (SmolLM2's longest, a run of spaces, is 81 characters)."""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    messages: list[Message] = Field(min_length=1, max_length=200)
    conversation_id: Id | None = Field(default=None, description="Omit to start a new conversation.")
    parent_response_id: Id | None = Field(default=None, description="Set when regenerating that response.")
    max_new_tokens: StrictInt | None = Field(default=None, ge=1, le=1024)
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1,
                                   description="Sampling seed, for reproducible simulations.")


async def prompt_tokens(policy: PolicyHandle | ChampionPolicy, messages: list[dict[str, str]], limit: int) -> int:
    """The prompt's length in tokens after the chat template; 422 ``prompt_too_long`` above ``limit``. Counted
    on a worker thread (the tokenizer releases the GIL), never waiting on a generation; a prompt longer than
    ``limit`` tokens could hold even at the longest token is refused uncounted."""
    chars = sum(len(m["content"]) for m in messages)
    if chars > limit * MAX_TOKEN_CHARS:
        raise ApiError(422, "prompt_too_long", f"the prompt is {chars} characters, more than {limit} tokens "
                       f"(max_prompt_tokens) can hold; shorten it or drop earlier messages",
                       fields=[{"field": "messages", "message": f"over {limit} tokens"}])
    tokens = await run_in_threadpool(policy.prompt_tokens, messages)
    if tokens > limit:
        raise ApiError(422, "prompt_too_long", f"the prompt is {tokens} tokens after the chat template, over the "
                       f"limit of {limit} (max_prompt_tokens); shorten it or drop earlier messages",
                       fields=[{"field": "messages", "message": f"{tokens} tokens, over {limit}"}])
    return tokens


CHAT_UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"description": UNAVAILABLE[503]["description"] + (
    " Or the model is busy: the generation queue is full, or the chat waited chat_timeout_s without starting "
    "(`overloaded`).")}}


# The body is parsed like every other route's (400 for bytes that are not UTF-8 JSON, 422 with field paths),
# so the schema is declared for the OpenAPI document rather than taken as a FastAPI body parameter.
@router.post("/chat", summary="Generate a reply with the current policy and log the turn",
             responses=CHAT_UNAVAILABLE, openapi_extra=json_body(inline_schema(ChatRequest)))
async def chat(request: Request, _caller: Caller, state: State, policy: Policy, publisher: Publisher) -> dict[str, Any]:
    try:
        req = ChatRequest.model_validate(parse_json(await request.body()))
    except ValidationError as e:
        raise invalid(e) from None
    messages = [m.model_dump() for m in req.messages]
    max_new = req.max_new_tokens or state.settings.api.max_new_tokens
    # the model is chosen on arrival, as before the queue: a chat accepted before a promotion or rollback is
    # answered by the version that was serving then, however long it waits for the model
    handle = policy.pick()
    tokens = await prompt_tokens(handle, messages, state.settings.api.max_prompt_tokens)
    if state.generation is None:
        raise ApiError(503, "not_ready", "the generation worker is not running")
    try:
        reply = await state.generation.run(
            lambda between: handle.generate(messages, max_new, seed=req.seed, between=between),
            tokens=tokens + max_new)
    except Overloaded as e:
        raise ApiError(503, "overloaded", str(e),
                       headers={"Retry-After": retry_after_header(e.retry_after_s)}) from None
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
    durable = await publish(publisher, [Checked(turn, encode_event(turn))])
    return {
        "conversation_id": turn.conversation_id,
        "response_id": turn.response_id,
        "model_version": turn.model_version,
        "message": {"role": "assistant", "content": reply.text},
        "finished": reply.finished,
        "event_id": str(turn.event_id),
        "durable": durable,
    }
