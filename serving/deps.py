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
from serving.policy import PolicyHandle
from serving.security import KeyRing, RateLimiter, retry_after_header


@dataclass
class AppState:
    settings: Settings
    keyring: KeyRing
    limiter: RateLimiter
    rules: QualityRules
    registry: CollectorRegistry
    publisher: EventPublisher | None = None
    policy: PolicyHandle | ChampionPolicy | None = None
    extras: dict[str, Any] = field(default_factory=dict)


async def get_state(request: Request) -> AppState:
    return request.app.state.flywheel  # type: ignore[no-any-return]


State = Annotated[AppState, Depends(get_state)]


async def require_key(request: Request, state: State) -> ApiKey:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    key = state.keyring.authenticate(secret.strip()) if scheme.lower() == "bearer" and secret else None
    if key is None:
        raise ApiError(401, "unauthorized", "send a valid API key as 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    wait = state.limiter.acquire(key.name)
    if wait:
        raise ApiError(429, "rate_limited",
                       f"key '{key.name}' is over {state.limiter.rate:g} requests/s; retry after {wait:.2f}s",
                       headers={"Retry-After": retry_after_header(wait)})
    return key


Caller = Annotated[ApiKey, Depends(require_key)]


async def get_publisher(state: State) -> EventPublisher:
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
