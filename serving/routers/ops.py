"""Health, readiness, metrics and the published event schema."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flywheel.events import json_schema
from ingest.producer import broker_reachable
from serving.deps import State

router = APIRouter(tags=["ops"])
_SCHEMA = json_schema()


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="The broker answers (cached for one second)")
async def readyz(state: State) -> JSONResponse:
    cache = state.extras.setdefault("ready", {"at": 0.0, "ok": False})
    if time.monotonic() - cache["at"] > 1.0:
        cache["ok"] = await run_in_threadpool(broker_reachable, state.settings.kafka, 1.0)
        cache["at"] = time.monotonic()
    pub = state.publisher
    payload: dict[str, Any] = {
        "status": "ready" if cache["ok"] else "unavailable",
        "broker": "reachable" if cache["ok"] else "unreachable",
        "spooling": bool(pub and pub.spooling),
        "spool_bytes": pub.spool.size_bytes if pub else 0,
        "policy": state.policy.version if state.policy else None,
    }
    return JSONResponse(payload, status_code=200 if cache["ok"] else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/schema", summary="JSON Schema of one event (the Kafka record value)")
async def schema() -> dict[str, Any]:
    return _SCHEMA
