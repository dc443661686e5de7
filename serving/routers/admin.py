"""Admin endpoints: promote, roll back and reload the served policy; read the registry history.

Every route needs a key with ``admin: true`` (ordinary keys get 403). Promotion goes through the same gate
as ``flywheel promote`` (the version must have been evaluated); ``force: true`` overrides a refusal and is
recorded as a forced promotion with the admin key's name. A refused promotion answers 409 with the gate's
reasons (and is recorded too).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from serving.deps import State, require_role
from serving.errors import ApiError, invalid
from serving.openapi import inline_schema, json_body
from serving.routers.events import parse_json
from training.tracking import MODELS, POLICY_MODEL

router = APIRouter(prefix="/v1/admin", tags=["admin"])


Admin = require_role("admin", "key '{name}' is not an admin key; promote, rollback and reload need a key "
                              "created with `flywheel keys --admin`")


# Registry versions are 32-bit integers in MLflow's store: a longer number would fail its query, not match nothing.
class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(default=POLICY_MODEL, pattern=f"^({'|'.join(re.escape(m) for m in MODELS)})$")
    version: str = Field(pattern=r"^[0-9]+$", max_length=9, description="A registered version number.")
    force: StrictBool = Field(default=False, description="Promote even if the gate refuses (recorded as forced).")
    note: str = Field(default="", max_length=500)


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(default=POLICY_MODEL, pattern=f"^({'|'.join(re.escape(m) for m in MODELS)})$")
    to: str | None = Field(default=None, pattern=r"^[0-9]+$", max_length=9,
                           description="Default: the previous champion.")
    note: str = Field(default="", max_length=500)


async def _parse(request: Request, cls: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        return cls.model_validate(parse_json(raw) if raw.strip() else {})
    except ValidationError as e:
        raise invalid(e) from None


async def _reload(state: State) -> dict[str, str | None] | None:
    policy = state.policy
    if policy is not None and hasattr(policy, "refresh"):
        return await run_in_threadpool(policy.refresh)
    return None


def _registry_call(fn: Any, *args: Any, **kw: Any) -> Any:
    from mlflow.exceptions import MlflowException

    from training.registry import GateError

    try:
        return fn(*args, **kw)
    except GateError as e:
        raise ApiError(409, "not_evaluated", str(e)) from None
    except MlflowException as e:
        raise ApiError(404, "unknown_version", str(e).splitlines()[0]) from None


@router.post("/promote", summary="Run the promotion gate on an evaluated version; move `champion` if it passes",
             openapi_extra=json_body(inline_schema(PromoteRequest)))
async def promote(request: Request, admin: Admin, state: State) -> dict[str, Any]:
    from training.config import load_recipe
    from training.registry import promote as do_promote

    req = await _parse(request, PromoteRequest)
    gate = load_recipe(state.settings.api.gate_recipe)
    record = await run_in_threadpool(_registry_call, do_promote, state.settings, req.model, req.version, gate=gate,
                                     actor=f"api:{admin.name}", force=req.force, note=req.note)
    if record.action == "refuse":
        raise ApiError(409, "gate_refused", f"version {req.version} not promoted: " + "; ".join(record.reasons))
    served = await _reload(state) if req.model == POLICY_MODEL else None
    return {"record": asdict(record), "serving": served}


@router.post("/rollback", summary="Move `champion` back to the previous (or a named) version",
             openapi_extra=json_body(inline_schema(RollbackRequest), required=False))
async def rollback(request: Request, admin: Admin, state: State) -> dict[str, Any]:
    from training.registry import rollback as do_rollback

    req = await _parse(request, RollbackRequest)
    record = await run_in_threadpool(_registry_call, do_rollback, state.settings, req.model, to=req.to,
                                     actor=f"api:{admin.name}", note=req.note)
    served = await _reload(state) if req.model == POLICY_MODEL else None
    return {"record": asdict(record), "serving": served}


@router.post("/reload", summary="Load what the `champion` (and canary `challenger`) aliases point to now")
async def reload(_admin: Admin, state: State) -> dict[str, Any]:
    served = await _reload(state)
    if served is None:
        raise ApiError(409, "not_following_registry",
                       "this API serves a fixed local policy; set FLYWHEEL_API__POLICY_FROM_REGISTRY=true")
    return {"serving": served}


@router.get("/history", summary="Every promotion, refusal and rollback, oldest first")
async def history(_admin: Admin, state: State, model: str | None = None) -> dict[str, Any]:
    from training.registry import AuditLog

    if model is not None and model not in MODELS:
        raise ApiError(422, "validation_failed", f"model must be one of {MODELS}, got {model!r}")
    records = await run_in_threadpool(AuditLog.from_settings(state.settings).history, model)
    return {"records": [asdict(r) for r in records]}
