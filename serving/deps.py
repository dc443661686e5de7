"""What routes depend on: the app's state, the authenticated caller, the publisher and the policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from prometheus_client import CollectorRegistry

from flywheel.settings import ApiKey, Settings
from ingest.producer import EventPublisher
from ingest.validation import QualityRules
from serving.champion import ChampionPolicy
from serving.errors import ApiError
from serving.generation_pool import GenerationPool
from serving.policy import PolicyHandle
from serving.security import KeyRing, RateLimiter, retry_after_header


@dataclass
class AppState:
    settings: Settings
    keyring: KeyRing
    limiter: RateLimiter
    auth_failures: RateLimiter  # per client address: a failed authentication takes a token
    rules: QualityRules
    registry: CollectorRegistry
    publisher: EventPublisher | None = None
    policy: PolicyHandle | ChampionPolicy | None = None
    generation: GenerationPool | None = None  # runs /v1/chat generations; started with the app
    extras: dict[str, Any] = field(default_factory=dict)


async def get_state(request: Request) -> AppState:
    return request.app.state.flywheel  # type: ignore[no-any-return]


State = Annotated[AppState, Depends(get_state)]


def authenticate(state: AppState, address: str, header: str) -> ApiKey:
    """The key an ``Authorization`` header names, within its rate limit, or an ApiError (401, 429)."""
    # An address over its failure budget is refused before its key is looked at: were a right key still let
    # through, 429 against 2xx would tell a guesser when it had guessed right, at full speed.
    wait = state.auth_failures.wait_s(address)
    if wait:
        raise ApiError(429, "too_many_failed_authentications",
                       f"too many failed authentications from {address}; retry after {wait:.2f}s",
                       headers={"Retry-After": retry_after_header(wait)})
    scheme, _, secret = header.partition(" ")
    key = state.keyring.authenticate(secret.strip()) if scheme.lower() == "bearer" and secret else None
    if key is None:
        state.auth_failures.acquire(address)
        raise ApiError(401, "unauthorized", "send a valid API key as 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    wait = state.limiter.acquire(key.name)
    if wait:
        raise ApiError(429, "rate_limited",
                       f"key '{key.name}' is over {state.limiter.rate:g} requests/s; retry after {wait:.2f}s",
                       headers={"Retry-After": retry_after_header(wait)})
    return key


async def require_key(request: Request, state: State) -> ApiKey:
    return authenticate(state, request.client.host if request.client else "unknown",
                        request.headers.get("authorization", ""))


Caller = Annotated[ApiKey, Depends(require_key)]


def require_role(role: str, refusal: str) -> Any:
    """The dependency for routes only keys with ``role`` (an ``ApiKey`` flag: ``admin``, ``reviewer``) may call;
    any other key gets 403 with ``refusal`` (``{name}``: the key's name)."""

    async def check(caller: Caller) -> ApiKey:
        if not getattr(caller, role):
            raise ApiError(403, "forbidden", refusal.format(name=caller.name))
        return caller

    return Annotated[ApiKey, Depends(check)]


def is_json_media_type(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, with any parameters (a charset, say)."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def require_json_body(request: Request) -> None:
    check_media_type(request.method, request.headers.get("content-type"))


def check_media_type(method: str, content_type: str | None) -> None:
    """415 for a request body declared as anything but JSON. Without a Content-Type the body is read as JSON."""
    if method in ("POST", "PUT", "PATCH") and content_type is not None and not is_json_media_type(content_type):
        shown = content_type if len(content_type) <= 80 else content_type[:80] + "..."
        raise ApiError(415, "unsupported_media_type",
                       f"send the body as application/json (Content-Type: application/json), not {shown!r}")


async def get_publisher(state: State) -> EventPublisher:
    return running_publisher(state)


def running_publisher(state: AppState) -> EventPublisher:
    if state.publisher is None:
        raise ApiError(503, "not_ready", "the event publisher is not running")
    return state.publisher


Publisher = Annotated[EventPublisher, Depends(get_publisher)]


async def get_policy(state: State) -> PolicyHandle | ChampionPolicy:
    if state.policy is None:
        raise ApiError(503, "policy_loading", "the policy model is still loading; retry in a few seconds",
                       headers={"Retry-After": "5"})
    return state.policy


Policy = Annotated[PolicyHandle | ChampionPolicy, Depends(get_policy)]
