"""The HTTP API under hostile input: no request, however malformed, is answered 5xx.

Three layers, against the real broker: schemathesis generates requests from the API's own OpenAPI document
(valid and schema-violating, for every operation); hypothesis posts hostile JSON to every POST route (deep
nesting, huge integers, unicode edge cases, lone surrogates as raw escapes, NUL bytes, calendar-edge
timestamps with offsets, wrong types), alone or in one field of an otherwise valid body; and one regression
case per known hostile input, with the precise 4xx it gets. 503 is allowed only as the documented ``unavailable``.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from flywheel.settings import ApiKey, Settings, hash_api_key
from serving.app import create_app
from serving.policy import PolicyHandle
from tests.tiny import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.integration

THUMBS = {"type": "thumbs", "conversation_id": "c1", "user_id": "u1", "model_version": "v1", "response_id": "r1",
          "value": "up"}
TURN = {"conversation_id": "c9", "user_id": "u9", "model_version": "ext@3", "response_id": "r9",
        "messages": [{"role": "user", "content": "hello"}], "response": "hi there"}
CHAT = {"user_id": "u9", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 2, "seed": 1}
# Every POST route with a body that it accepts (promote/rollback name a version the registry lacks: 404).
ROUTES: dict[str, dict[str, Any]] = {
    "/v1/feedback": THUMBS,
    "/v1/turns": TURN,
    "/v1/feedback/batch": {"events": [THUMBS, {**TURN, "type": "turn"}]},
    "/v1/chat": CHAT,
    "/v1/admin/promote": {"version": "1", "force": False},
    "/v1/admin/rollback": {"to": "1", "note": "x"},
    "/v1/admin/reload": {},
}
JSON = {"content-type": "application/json"}
FUZZ_SETTINGS = hypothesis.settings(max_examples=60, derandomize=True, database=None, deadline=None,
                                    suppress_health_check=list(HealthCheck))


def _tiny_app(settings: Settings) -> Any:
    tok = tiny_tokenizer()
    return create_app(settings, policy=PolicyHandle(tiny_causal_lm(len(tok)), tok, "tiny@v7"))


@pytest.fixture
def admin_secret(settings: Settings, api_secret: str) -> str:
    """An admin key beside the ordinary one, so that the admin routes are exercised past their 403."""
    secret = secrets.token_urlsafe(16)
    settings.api.keys = [*settings.api.keys, ApiKey(name="ops", sha256=hash_api_key(secret), admin=True,
                                                         reviewer=True)]
    return secret


@pytest.fixture
def client(settings: Settings, admin_secret: str) -> Iterator[TestClient]:
    with TestClient(_tiny_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {admin_secret}"
        yield c


def assert_handled(r: Any) -> None:
    """Not a server error (503 only as the documented ``unavailable``), and an error body a client can act on."""
    body = r.json()
    assert r.status_code < 500 or (r.status_code == 503 and body.get("error") == "unavailable"), r.text[:2000]
    if r.status_code >= 400:
        assert isinstance(body.get("error"), str) and isinstance(body.get("message"), str) and body["message"]


# -- hostile JSON ----------------------------------------------------------------------------------------

@st.composite
def timestamps(draw: st.DrawFn) -> str:
    """RFC 3339-ish strings at the calendar's edges, with offsets that push them past year 1 or 9999."""
    year = draw(st.sampled_from([1, 2, 1969, 1970, 2038, 9998, 9999]) | st.integers(0, 9999))
    month, day = draw(st.sampled_from([(1, 1), (12, 31), (2, 29), (2, 30), (13, 1), (0, 0)]))
    clock = draw(st.sampled_from(["00:00:00", "23:59:59", "23:59:60", "24:00:00", "12:00:00.999999999"]))
    offset = draw(st.sampled_from(["Z", "z", "+00:00", "-00:00", "+01:00", "-01:00", "+23:59", "-23:59", "+24:00", ""]))
    return json.dumps(f"{year:04d}-{month:02d}-{day:02d}T{clock}{offset}")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)

# JSON text (or near-JSON bytes) that parsers, validators and the code after them have choked on.
fragments = st.one_of(
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 1500).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(15, 6000).map(lambda n: "9" * n),
    st.integers(15, 6000).map(lambda n: "-1" + "0" * n),
    st.sampled_from(["1e400", "-1e400", "1e-400", "-0", "1.0", "0.5", str(2**63 - 1), str(2**63), str(2**64),
                     str(-(2**63) - 1), "NaN", "Infinity", "true", "false", "null", "[]", "{}", '""', '" "', '"1"',
                     "[1]", '{"$ref": "#"}', '"\\ud800"', '"\\udfff"', '"x\\ud83d"', '"\\ude00\\ud83d"',
                     '"\\u0000"', '"a\x00b"', '"\\uFEFF"', '"\\u2028\\u2029"', '"\\u202e"', '"e\\u0301"']),
    timestamps(),
    st.builds(lambda s, ascii_only: json.dumps(s, ensure_ascii=ascii_only), st.text(max_size=40), st.booleans()),
    st.integers(1_000, 120_000).map(lambda n: '"' + "\u00e9" * n + '"'),
    json_values.map(json.dumps),
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value a hostile fragment can go: each member, each element, one new key."""
    out = [prefix]
    if isinstance(value, dict):
        out.append((*prefix, "extra_field"))
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _with(value: Any, path: tuple[Any, ...], marker: str) -> Any:
    if not path:
        return marker
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _with(value.get(head), rest, marker)}
    return [_with(v, rest, marker) if i == head else v for i, v in enumerate(value)]


@st.composite
def hostile_bodies(draw: st.DrawFn, template: dict[str, Any]) -> bytes:
    """A valid body with one member replaced by a hostile fragment, or a hostile body outright."""
    kind = draw(st.sampled_from(["field", "field", "field", "whole", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    fragment = draw(fragments)
    if kind == "whole":
        return fragment.encode("utf-8", "surrogatepass")
    path = draw(st.sampled_from(_paths(template)))
    marker = "@@hostile@@"
    text = json.dumps(_with(template, path, marker), ensure_ascii=False)
    return text.replace(json.dumps(marker), fragment).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("path", list(ROUTES))
@FUZZ_SETTINGS
@given(data=st.data())
def test_hostile_json_never_gets_a_5xx(client, path, data):
    body = data.draw(hostile_bodies(ROUTES[path]), label="body")
    assert_handled(client.post(path, content=body, headers=JSON))


# -- the hot path answers exactly as the route does ----------------------------------------------------------

def _comparable(r: Any) -> tuple[int, Any, dict[str, str]]:
    """Status, body (the server-made event id masked) and the headers a client acts on."""
    payload = r.json()
    if r.status_code == 202:
        payload = {**payload, "event_id": "<id>"}
    headers = {k: r.headers[k] for k in ("content-type", "retry-after", "www-authenticate") if k in r.headers}
    return r.status_code, payload, headers


@pytest.fixture
def twin_clients(settings: Settings, admin_secret: str) -> Iterator[tuple[TestClient, TestClient]]:
    """The app with ``api.hot_path`` on and off; limits high enough that timing never tells them apart."""
    settings.api.auth_failure_burst = settings.api.rate_burst = 100_000
    off = settings.model_copy(deep=True)
    off.api.hot_path = False
    with TestClient(_tiny_app(settings)) as fast, TestClient(_tiny_app(off)) as routed:
        for c in (fast, routed):
            c.headers["Authorization"] = f"Bearer {admin_secret}"
        yield fast, routed


_IDS = {"conversation_id": "c1", "user_id": "u1", "model_version": "v1"}
FEEDBACK = [THUMBS, {**_IDS, "type": "regenerate", "discarded_response_id": "r1"},
            {**_IDS, "type": "correction", "response_id": "r1", "corrected_text": "a better answer than that"},
            {**_IDS, "type": "pairwise", "response_a_id": "r1", "response_b_id": "r2", "choice": "tie"},
            {**_IDS, "type": "implicit", "response_id": "r1", "action": "copy"}]


@FUZZ_SETTINGS
@given(data=st.data())
def test_the_feedback_hot_path_answers_every_request_as_the_route_does(twin_clients, data):
    """The same request to both apps (hostile bodies, valid events of every feedback type, wrong or missing keys,
    other media types) gets the same answer: status, body (the server's event id masked), Retry-After and
    WWW-Authenticate; and the metrics count the hot path's requests under the route's path."""
    fast, routed = twin_clients
    kind = data.draw(st.sampled_from(["hostile", "hostile", "valid", "key", "media"]), label="kind")
    headers, body = dict(JSON), json.dumps(THUMBS).encode()
    if kind == "hostile":
        body = data.draw(hostile_bodies(THUMBS), label="body")
    elif kind == "valid":
        body = json.dumps(data.draw(st.sampled_from(FEEDBACK), label="event")).encode()
    elif kind == "key":
        headers["authorization"] = data.draw(st.sampled_from(["", "Bearer", "Bearer nope", "Basic abc", "bearer  x"]))
    else:
        headers["content-type"] = data.draw(st.sampled_from(
            ["text/plain", "application/xml", "application/json; charset=utf-8", "application/problem+json",
             "multipart/form-data; boundary=x", "x" * 200]), label="content-type")
    a = fast.post("/v1/feedback", content=body, headers=headers)
    b = routed.post("/v1/feedback", content=body, headers=headers)
    assert _comparable(a) == _comparable(b), (a.text[:500], b.text[:500])
    assert f'flywheel_http_requests_total{{route="/v1/feedback",status="{a.status_code}"}}' in fast.get("/metrics").text


def test_the_hot_path_limits_sizes_and_answers_failures_as_the_stack_does(twin_clients, settings, monkeypatch):
    """What the layers behind the hot path did for it, it now does itself, the same way: a body over the
    limit (declared, or streamed without a length, before or after the other checks) is a 413, and a failure
    no handler expected is the logged 500 naming its incident; the metrics count both under the route."""
    fast, routed = twin_clients
    limit = settings.api.max_body_bytes
    huge = b'{"type": "thumbs", "reason": "' + b"x" * limit + b'"}'
    cases: list[tuple[bytes | list[bytes], dict[str, str]]] = [
        (huge, dict(JSON)),
        (huge, {**JSON, "content-type": "text/plain", "authorization": "Bearer nope"}),  # 413 before 415 and 401
        ([huge[:1000], huge[1000:]], dict(JSON)),  # streamed in chunks: no Content-Length
    ]
    for content, headers in cases:
        a = fast.post("/v1/feedback", content=content if isinstance(content, bytes) else iter(content),
                      headers=headers)
        b = routed.post("/v1/feedback", content=content if isinstance(content, bytes) else iter(content),
                        headers=headers)
        assert a.status_code == 413 and _comparable(a) == _comparable(b), (a.text[:300], b.text[:300])

    async def broken(*_args: Any) -> str:
        raise RuntimeError("a bug in the publisher")

    monkeypatch.setattr("serving.routers.events.publish", broken)
    a = fast.post("/v1/feedback", content=json.dumps(THUMBS).encode(), headers=JSON)
    # Starlette's error middleware answers, then raises the exception on for the server to log
    routed_quiet = TestClient(routed.app, raise_server_exceptions=False, headers=dict(routed.headers))
    b = routed_quiet.post("/v1/feedback", content=json.dumps(THUMBS).encode(), headers=JSON)
    assert a.status_code == b.status_code == 500
    assert a.json()["error"] == b.json()["error"] == "internal_error" and "incident" in a.json()["message"]
    metrics = fast.get("/metrics").text
    for status in (413, 500):
        assert f'flywheel_http_requests_total{{route="/v1/feedback",status="{status}"}}' in metrics


# -- schemathesis: every operation of the OpenAPI document ------------------------------------------------

# schemathesis.pytest.from_fixture would make one test per operation, but it reads pytest internals that pytest 9
# removed (Function._nodeid); so the schema is loaded in the test and each operation's strategy run by hand.
@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_error(settings, admin_secret, mode):
    from schemathesis.generation import GenerationMode
    from schemathesis.python.asgi import shutdown_lifespans

    auth = {"Authorization": f"Bearer {admin_secret}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", _tiny_app(settings))
    try:
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {f"POST {path}" for path in ROUTES}
        if mode == "negative":  # only an operation that takes input has input that violates its schema
            operations = [op for op in operations if len(op.body) or len(op.query)]
        for operation in operations:

            @hypothesis.settings(FUZZ_SETTINGS, max_examples=20)
            @given(case=operation.as_strategy(GenerationMode(mode)))
            def check(case: Any) -> None:
                r = case.call(headers=auth)
                documented = str(r.status_code) in case.operation.definition.raw.get("responses", {})
                assert r.status_code < 500 or (r.status_code == 503 and documented), \
                    f"{case.method} {case.formatted_path}: {r.status_code} {r.text[:2000]}"
                if r.status_code >= 400:
                    assert r.json()["message"]

            check()
    finally:
        shutdown_lifespans()  # the app's publisher closes before the session's broker goes


def test_openapi_documents_every_request_body_from_the_contract(client):
    import jsonschema

    doc = client.get("/openapi.json").json()
    refs = [v for v in _walk(doc) if isinstance(v, dict) and "$ref" in v]
    for ref in refs:  # every reference resolves inside the document
        name = ref["$ref"].removeprefix("#/components/schemas/")
        assert name in doc["components"]["schemas"], ref
    bodies = {p: op["post"]["requestBody"]["content"]["application/json"]["schema"]
              for p, op in doc["paths"].items() if "post" in op and "requestBody" in op["post"]}
    assert set(bodies) == set(ROUTES) - {"/v1/admin/reload"} | {"/v1/review/items/{item_id}/decision"}
    for path, template in ROUTES.items():
        if path in bodies:
            jsonschema.validate(template, bodies[path])  # the server stamps event_id and occurred_at
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**THUMBS, "value": 3}, bodies["/v1/feedback"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**CHAT, "seed": 2**64}, bodies["/v1/chat"])
    members = bodies["/v1/feedback"]["oneOf"]
    assert {m["properties"]["type"]["const"] for m in members} == {"thumbs", "regenerate", "correction", "pairwise",
                                                                  "implicit"}
    assert all("type" in m["required"] and "event_id" not in m["required"] for m in members)
    assert "503" in doc["paths"]["/v1/feedback"]["post"]["responses"]


def _walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


# -- regressions: the known hostile inputs (most were a 500 before), each with its precise 4xx ----------

def _body(template: dict[str, Any], **raw: str) -> bytes:
    """``template`` as JSON with the members in ``raw`` written as raw JSON text (numbers no encoder would write)."""
    text = json.dumps({**template, **{k: f"@@{k}@@" for k in raw}})
    for k, v in raw.items():
        text = text.replace(f'"@@{k}@@"', v)
    return text.encode()


DEEP = "[" * 5000 + "]" * 5000
DIGITS_4000 = "9" * 4000  # under the parser's 4,300-digit bound: reaches validation
DIGITS_5000 = "9" * 5000  # over it: refused by the parser
BATCH_OF = '{"events": [%s]}'
EARLY, LATE = '"0001-01-01T00:00:00+01:00"', '"9999-12-31T23:59:59-01:00"'


@pytest.mark.parametrize(
    ("path", "body", "status", "error", "field"),
    [
        ("/v1/feedback", DEEP.encode(), 422, "json_too_deep", None),
        ("/v1/feedback", _body(THUMBS, reason=DEEP), 422, "json_too_deep", None),
        ("/v1/turns", _body(TURN, messages=DEEP), 422, "json_too_deep", None),
        ("/v1/feedback/batch", (BATCH_OF % DEEP).encode(), 422, "json_too_deep", None),
        ("/v1/chat", _body(CHAT, messages=DEEP), 422, "json_too_deep", None),
        ("/v1/admin/promote", _body({}, version=DEEP), 422, "json_too_deep", None),
        ("/v1/admin/rollback", DEEP.encode(), 422, "json_too_deep", None),
        ("/v1/feedback", _body(THUMBS, schema_version=DIGITS_4000), 422, "validation_failed", "schema_version"),
        ("/v1/feedback", _body(THUMBS, schema_version=DIGITS_5000), 422, "number_too_large", None),
        ("/v1/feedback", _body(THUMBS, schema_version="true"), 422, "validation_failed", "schema_version"),
        ("/v1/feedback", _body(THUMBS, schema_version='"1"'), 422, "validation_failed", "schema_version"),
        ("/v1/feedback", _body(THUMBS, value=DIGITS_4000), 422, "validation_failed", "value"),
        ("/v1/turns", _body(TURN, schema_version=DIGITS_4000), 422, "validation_failed", "schema_version"),
        ("/v1/feedback/batch", (BATCH_OF % _body(THUMBS, schema_version=DIGITS_4000).decode()).encode(), 422,
         "validation_failed", "events[0].schema_version"),
        ("/v1/chat", _body(CHAT, seed=DIGITS_4000), 422, "validation_failed", "seed"),
        ("/v1/chat", _body(CHAT, seed=str(2**64)), 422, "validation_failed", "seed"),
        ("/v1/chat", _body(CHAT, seed=str(2**63)), 422, "validation_failed", "seed"),
        ("/v1/chat", _body(CHAT, seed="-1"), 422, "validation_failed", "seed"),
        ("/v1/chat", _body(CHAT, seed="true"), 422, "validation_failed", "seed"),
        ("/v1/chat", _body(CHAT, max_new_tokens=DIGITS_4000), 422, "validation_failed", "max_new_tokens"),
        ("/v1/chat", _body(CHAT, max_new_tokens="true"), 422, "validation_failed", "max_new_tokens"),
        ("/v1/chat", _body(CHAT, seed=DIGITS_5000), 422, "number_too_large", None),
        ("/v1/feedback", _body(THUMBS, occurred_at=EARLY), 422, "validation_failed", "occurred_at"),
        ("/v1/feedback", _body(THUMBS, occurred_at=LATE), 422, "validation_failed", "occurred_at"),
        ("/v1/turns", _body(TURN, occurred_at=EARLY), 422, "validation_failed", "occurred_at"),
        ("/v1/turns", _body(TURN, occurred_at=LATE), 422, "validation_failed", "occurred_at"),
        ("/v1/feedback/batch", (BATCH_OF % _body(THUMBS, occurred_at=LATE).decode()).encode(), 422,
         "validation_failed", "events[0].occurred_at"),
        ("/v1/admin/promote", _body({}, version=f'"{DIGITS_5000}"'), 422, "validation_failed", "version"),
        ("/v1/admin/promote", _body({}, version='"1234567890"'), 422, "validation_failed", "version"),
        ("/v1/admin/promote", _body({"version": "1"}, force='"yes"'), 422, "validation_failed", "force"),
        ("/v1/admin/rollback", _body({}, to=f'"{DIGITS_5000}"'), 422, "validation_failed", "to"),
        ("/v1/feedback", _body(THUMBS, user_id='"\\ud800"'), 400, "malformed_json", None),
        ("/v1/feedback", _body(THUMBS, type='"' + "x" * 100_000 + '"'), 422, "validation_failed", "type"),
    ],
    ids=["feedback-deep-body", "feedback-deep-field", "turns-deep", "batch-deep", "chat-deep", "promote-deep",
         "rollback-deep", "schema-version-4000-digits", "schema-version-5000-digits", "schema-version-true",
         "schema-version-string", "value-4000-digits", "turns-schema-version-4000-digits",
         "batch-schema-version-4000-digits", "chat-seed-4000-digits", "chat-seed-2**64", "chat-seed-2**63",
         "chat-seed-negative", "chat-seed-true", "chat-max-new-tokens-4000-digits", "chat-max-new-tokens-true",
         "chat-seed-5000-digits", "feedback-year-1-plus-1h", "feedback-year-9999-minus-1h", "turns-year-1-plus-1h",
         "turns-year-9999-minus-1h", "batch-year-9999-minus-1h", "promote-version-5000-digits",
         "promote-version-10-digits", "promote-force-string", "rollback-to-5000-digits", "lone-surrogate",
         "type-of-100k-chars"],
)
def test_known_hostile_input_gets_a_clear_4xx(client, path, body, status, error, field):
    r = client.post(path, content=body, headers=JSON)
    assert r.status_code == status, r.text[:2000]
    payload = r.json()
    assert payload["error"] == error and payload["message"]
    if status == 422 and error in ("json_too_deep", "number_too_large"):
        assert ("200 levels" if error == "json_too_deep" else "4,300 digits") in payload["message"]
    if field:
        assert field in {f["field"] for f in payload.get("fields", [])}, payload
    assert len(r.content) < 10_000, "the error does not echo the input back"


def test_largest_seed_is_accepted(client):
    r = client.post("/v1/chat", json={**CHAT, "seed": 2**63 - 1})
    assert r.status_code == 200, r.text


def test_event_over_the_record_limit_is_413_and_listed_in_a_batch(client):
    huge = {**TURN, "messages": [{"role": "user", "content": "x" * 30_000}] * 40}  # 1.2 MB: over MAX_RECORD_BYTES
    r = client.post("/v1/turns", json=huge)
    assert r.status_code == 413 and r.json()["error"] == "event_too_large", r.text[:2000]
    assert "1000000 bytes" in r.json()["message"]
    r = client.post("/v1/feedback/batch", json={"events": [{**huge, "type": "turn"}, THUMBS]})
    assert r.status_code == 202, r.text[:2000]
    assert r.json()["accepted"] == 1
    assert [(x["index"], x["error"]) for x in r.json()["rejected"]] == [(0, "event_too_large")]
    assert r.json()["rejected"][0]["message"].startswith("events[0]: ")


def test_feedback_over_the_record_limit_is_413(client, monkeypatch):
    # no feedback event within the contract's text bounds reaches 1 MB; a lower limit shows the route's check
    monkeypatch.setattr("serving.routers.events.MAX_RECORD_BYTES", 200)
    r = client.post("/v1/feedback", json=THUMBS)
    assert r.status_code == 413 and r.json()["error"] == "event_too_large", r.text


# -- Content-Type, failed authentication, the last-resort handler ----------------------------------------

@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml", "application/jsonx",
                                          "json"])
def test_a_body_that_is_not_json_is_415_on_every_post_route(client, content_type):
    for path, template in ROUTES.items():
        r = client.post(path, content=json.dumps(template), headers={"content-type": content_type})
        assert r.status_code == 415, (path, r.text)
        assert r.json()["error"] == "unsupported_media_type" and "application/json" in r.json()["message"]


def test_json_media_types_and_none_are_accepted(client):
    for content_type in [None, "application/json", "Application/JSON; charset=UTF-8", "application/vnd.flywheel+json",
                         "application/merge-patch+json; charset=x"]:
        headers = {"content-type": content_type} if content_type else {}
        r = client.post("/v1/feedback", content=json.dumps(THUMBS).encode(), headers=headers)
        assert r.status_code == 202, (content_type, r.text)


def test_failed_authentications_are_limited_per_address(settings, api_secret):
    wrong, right = {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {api_secret}"}
    with TestClient(_tiny_app(settings)) as c:  # the defaults: 20 failures at once, then 5 a second
        other = TestClient(c.app, client=("10.0.0.9", 4000))  # the same running app, seen from another address
        started = time.monotonic()
        codes = [c.post("/v1/feedback", json=THUMBS, headers=wrong).status_code for _ in range(1000)]
        elapsed = time.monotonic() - started
        assert codes[:20] == [401] * 20 and set(codes) == {401, 429}
        assert codes.count(401) <= 20 + settings.api.auth_failure_rate_per_s * elapsed + 1, (codes.count(401), elapsed)
        assert other.post("/v1/feedback", json=THUMBS, headers=right).status_code == 202, "another address is free"
        time.sleep(1.5 / settings.api.auth_failure_rate_per_s)
        assert c.post("/v1/feedback", json=THUMBS, headers=wrong).status_code == 401, "the budget refills"
    settings.api.auth_failure_burst, settings.api.auth_failure_rate_per_s = 2, 0.01
    with TestClient(_tiny_app(settings)) as c:
        assert [c.post("/v1/feedback", json=THUMBS, headers=wrong).status_code for _ in range(3)] == [401, 401, 429]
        r = c.post("/v1/feedback", json=THUMBS, headers=right)
        assert r.status_code == 429, "a right key from a blocked address tells a guesser nothing"
        assert r.json()["error"] == "too_many_failed_authentications" and int(r.headers["retry-after"]) >= 90


def test_an_unexpected_exception_is_a_json_500_without_the_traceback(settings, api_secret, monkeypatch):
    app = _tiny_app(settings)

    async def boom() -> None:
        raise RuntimeError("secret internals")

    app.add_api_route("/v1/boom", boom, methods=["GET"])
    # a handler on the logger itself: an earlier test (Airflow's logging set-up) may have disabled the
    # module loggers that existed then or stopped their propagation to the root, where caplog listens
    logger = logging.getLogger("serving.errors")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "level", logging.ERROR)
    logger.addHandler(handler)
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            r = c.get("/v1/boom")
    finally:
        logger.removeHandler(handler)
    assert r.status_code == 500 and r.json()["error"] == "internal_error"
    assert "secret internals" not in r.text and "Traceback" not in r.text
    incident = r.json()["message"].rsplit(" ", 1)[-1]
    assert any(incident in rec.getMessage() and rec.exc_info for rec in records)
