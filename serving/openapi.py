"""Request bodies for the OpenAPI document, generated from the event contract's pydantic models.

The routes parse their bodies themselves (the contract's bounded JSON parser, then pydantic: 400/422 with field
paths), so FastAPI never sees a body model and each route declares its body with ``openapi_extra=json_body(...)``.
The schemas are inlined: a ``$ref`` into pydantic's ``$defs`` does not resolve inside an OpenAPI document, and
FastAPI puts none of these models under ``components``. The discriminated unions become plain ``oneOf`` (every
member fixes ``type``), because an OpenAPI discriminator without components has nothing to map to.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, TypeAdapter

from flywheel.events import SUPPORTED_VERSIONS

UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"description": (
    "Not now, retry later: the broker is unreachable and the spool full (error `unavailable`, with Retry-After; "
    "retry with the same event_id), or the publisher or the policy is still starting (`not_ready`, "
    "`policy_loading`).")}}
"""The one 5xx a route that publishes may answer, documented in its ``responses``."""
SERVER_OWNED = ("event_id", "occurred_at")
"""Event fields the HTTP API stamps when a client leaves them out."""


def json_body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is ``schema`` as ``application/json``."""
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}


def inline_schema(source: type[BaseModel] | TypeAdapter[Any]) -> dict[str, Any]:
    """The validation-mode JSON Schema of a model or TypeAdapter with every ``$ref`` replaced by its definition."""
    schema = (source.model_json_schema() if isinstance(source, type) else source.json_schema())
    defs = schema.pop("$defs", {})
    return _inline(schema, defs, ())  # type: ignore[no-any-return]


def http_event_schema(adapter: TypeAdapter[Any], *, type_required: bool = True) -> dict[str, Any]:
    """An event union as an HTTP client may send it: ``event_id`` and ``occurred_at`` optional (the server stamps
    them), ``type`` required unless the route supplies it, ``schema_version`` one this service reads."""
    schema = inline_schema(adapter)
    for member in schema.get("oneOf", [schema]):
        required = [f for f in member.get("required", []) if f not in SERVER_OWNED]
        if type_required and "type" not in required:
            required.insert(0, "type")
        member["required"] = required
        member["properties"]["schema_version"]["enum"] = sorted(SUPPORTED_VERSIONS)
        for name in SERVER_OWNED:
            prop = member["properties"][name]
            prop["description"] = f"{prop.get('description', '')} Omit it to let the server stamp one.".lstrip()
    return schema


def _inline(node: Any, defs: dict[str, Any], seen: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline(v, defs, seen) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        name = ref.removeprefix("#/$defs/")
        if name in seen:
            raise ValueError(f"{name} refers to itself; a recursive schema cannot be inlined")
        rest = {k: v for k, v in node.items() if k != "$ref"}
        return {**_inline(defs[name], defs, (*seen, name)), **_inline(rest, defs, seen)}
    out = {k: _inline(v, defs, seen) for k, v in node.items()}
    if "oneOf" in out and isinstance(out.get("discriminator"), dict):
        del out["discriminator"]
    return out
