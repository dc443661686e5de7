"""The HTTP API against the real broker: auth, limits, field-level errors, durability paths."""

from __future__ import annotations

import json
import uuid

import pytest
from fastapi.testclient import TestClient

from flywheel.events import decode_event
from flywheel.settings import Settings
from serving.app import create_app
from serving.policy import PolicyHandle
from tests.tiny import tiny_causal_lm, tiny_tokenizer

pytestmark = pytest.mark.integration


def thumbs(**kw):
    return {"type": "thumbs", "conversation_id": "c1", "user_id": "u1", "model_version": "v1",
            "response_id": "r1", "value": "up", **kw}


@pytest.fixture
def client(settings: Settings, api_secret: str):
    tok = tiny_tokenizer()
    policy = PolicyHandle(tiny_causal_lm(len(tok)), tok, "tiny@v7")
    with TestClient(create_app(settings, policy=policy)) as c:
        c.headers["Authorization"] = f"Bearer {api_secret}"
        yield c


def consume_all(settings: Settings, n: int):
    from tests.integration.helpers import read_dlq

    settings = settings.model_copy(deep=True)
    settings.kafka.dlq_topic = settings.kafka.topic  # read the main topic with the same helper
    return [decode_event(r.value) for r in read_dlq(settings, n)]


def test_feedback_is_acknowledged_after_the_broker_has_it(client, settings):
    eid = str(uuid.uuid4())
    r = client.post("/v1/feedback", json=thumbs(event_id=eid))
    assert r.status_code == 202, r.text
    assert r.json() == {"event_id": eid, "type": "thumbs", "durable": "broker"}
    [event] = consume_all(settings, 1)
    assert str(event.event_id) == eid and event.occurred_at.tzinfo is not None


def test_missing_or_wrong_key_is_401_and_metrics_count_it(client):
    r = client.post("/v1/feedback", json=thumbs(), headers={"Authorization": ""})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = client.post("/v1/feedback", json=thumbs(), headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and "API key" in r.json()["message"]
    assert 'flywheel_http_requests_total{route="/v1/feedback",status="401"} 2.0' in client.get("/metrics").text


def test_rate_limit_is_429_with_retry_after(settings, api_secret):
    settings.api.rate_per_s, settings.api.rate_burst = 1.0, 2
    with TestClient(create_app(settings)) as c:
        c.headers["Authorization"] = f"Bearer {api_secret}"
        codes = [c.post("/v1/feedback", json=thumbs()).status_code for _ in range(3)]
        assert codes == [202, 202, 429]
        r = c.post("/v1/feedback", json=thumbs())
        assert r.headers["retry-after"] == "1" and r.json()["error"] == "rate_limited"


def test_ten_megabyte_body_is_413(client):
    big = json.dumps(thumbs(reason="x" * (10 * 1024 * 1024))).encode()
    r = client.post("/v1/feedback", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds" in r.json()["message"]


def test_chunked_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(10):
            yield b"x" * (1024 * 1024)
    r = client.post("/v1/feedback", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


@pytest.mark.parametrize(
    ("body", "status", "error", "field"),
    [
        (b'{"type": "thumbs",', 400, "malformed_json", None),
        (b'{"type": "thumbs", "user_id": "\xff\xfe"}', 400, "invalid_encoding", None),
        (b"[1, 2, 3]", 422, "validation_failed", None),
        (json.dumps(thumbs(value=3)).encode(), 422, "validation_failed", "value"),
        (json.dumps({k: v for k, v in thumbs().items() if k != "user_id"}).encode(), 422, "validation_failed", "user_id"),
        (json.dumps(thumbs(type="emoji")).encode(), 422, "validation_failed", "type"),
        (json.dumps(thumbs(type="turn")).encode(), 422, "validation_failed", "type"),
        (json.dumps(thumbs(occurred_at="2027-11-22T00:00:00Z")).encode(), 422, "occurred_at_in_future", "occurred_at"),
        (json.dumps(thumbs(occurred_at="2026-11-22T00:00:00")).encode(), 422, "validation_failed", "occurred_at"),
        (json.dumps(thumbs(event_id="123")).encode(), 422, "validation_failed", "event_id"),
    ],
    ids=["truncated-json", "invalid-utf8", "not-an-object", "wrong-type", "missing-field", "unknown-type",
         "turn-on-feedback-route", "year-in-future", "naive-timestamp", "bad-uuid"],
)
def test_garbage_gets_a_clear_4xx(client, settings, body, status, error, field):
    r = client.post("/v1/feedback", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    payload = r.json()
    assert payload["error"] == error and payload["message"]
    if field:
        assert field in {f["field"] for f in payload.get("fields", [])} or field in payload["message"]


TURN = {"conversation_id": "c9", "user_id": "u9", "model_version": "ext@3", "response_id": "r9",
        "messages": [{"role": "user", "content": "hello"}], "response": "hi there"}
CHAT = {"user_id": "u9", "messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 3}


@pytest.mark.parametrize(
    ("path", "body", "status", "error", "field"),
    [
        ("/v1/turns", b'{"type": "turn",', 400, "malformed_json", None),
        ("/v1/turns", b'{"response": "\xff"}', 400, "invalid_encoding", None),
        ("/v1/turns", json.dumps({**TURN, "messages": "hello"}).encode(), 422, "validation_failed", "messages"),
        ("/v1/turns", json.dumps({k: v for k, v in TURN.items() if k != "response"}).encode(), 422,
         "validation_failed", "response"),
        ("/v1/turns", json.dumps(thumbs()).encode(), 422, "validation_failed", "type"),
        ("/v1/turns", json.dumps({**TURN, "occurred_at": "2099-01-01T00:00:00Z"}).encode(), 422,
         "occurred_at_in_future", "occurred_at"),
        ("/v1/chat", b"not json", 400, "malformed_json", None),
        ("/v1/chat", b'{"user_id": "\xff"}', 400, "invalid_encoding", None),
        ("/v1/chat", json.dumps({**CHAT, "messages": [{"role": "robot", "content": "x"}]}).encode(), 422,
         "validation_failed", "messages"),
        ("/v1/chat", json.dumps({**CHAT, "max_new_tokens": "many"}).encode(), 422, "validation_failed",
         "max_new_tokens"),
        ("/v1/chat", json.dumps({k: v for k, v in CHAT.items() if k != "user_id"}).encode(), 422,
         "validation_failed", "user_id"),
    ],
    ids=["turns-truncated", "turns-invalid-utf8", "turns-wrong-type", "turns-missing-field", "turns-feedback-type",
         "turns-future", "chat-not-json", "chat-invalid-utf8", "chat-bad-role", "chat-wrong-type",
         "chat-missing-field"],
)
def test_garbage_on_turns_and_chat_gets_a_clear_4xx_and_valid_turns_still_land(client, settings, path, body, status,
                                                                                 error, field):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    payload = r.json()
    assert payload["error"] == error and payload["message"]
    if field:
        assert field in {f["field"].split(".")[0].split("[")[0] for f in payload.get("fields", [])} \
            or field in payload["message"]
    assert client.post("/v1/turns", json=TURN).status_code == 202
    got = consume_all(settings, 1)
    assert [e.response_id for e in got] == ["r9"], "only the valid turn reached the topic"


def test_batch_accepts_the_valid_events_and_lists_the_rest(client, settings):
    good = [thumbs(event_id=str(uuid.uuid4())) for _ in range(3)]
    items = [good[0], thumbs(value="meh"), good[1], "garbage", good[2],
             thumbs(occurred_at="2099-01-01T00:00:00Z")]
    r = client.post("/v1/feedback/batch", json={"events": items})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 3 and body["event_ids"] == [g["event_id"] for g in good]
    assert [(x["index"], x["error"]) for x in body["rejected"]] == [
        (1, "validation_failed"), (3, "validation_failed"), (5, "occurred_at_in_future")]
    assert body["rejected"][0]["fields"][0]["field"] == "events[1].value"
    got = consume_all(settings, 3)
    assert sorted(str(e.event_id) for e in got) == sorted(g["event_id"] for g in good)


def test_batch_limits(client, settings):
    assert client.post("/v1/feedback/batch", json={"events": []}).status_code == 422
    assert client.post("/v1/feedback/batch", json={"events": ["x", 1]}).status_code == 422
    too_many = [thumbs()] * (settings.api.max_batch + 1)
    r = client.post("/v1/feedback/batch", json={"events": too_many})
    assert r.status_code == 413 and str(settings.api.max_batch) in r.json()["message"]


def test_turns_and_chat_are_logged_with_the_model_version(client, settings):
    turn = {"conversation_id": "c9", "user_id": "u9", "model_version": "ext@3", "response_id": "r9",
            "messages": [{"role": "user", "content": "hello"}], "response": "hi there"}
    assert client.post("/v1/turns", json=turn).status_code == 202
    r = client.post("/v1/chat", json={"user_id": "u9", "messages": [{"role": "user", "content": "what is the capital of france"}],
                                      "max_new_tokens": 5, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == "tiny@v7" and body["response_id"].startswith("r-")
    got = {e.response_id: e for e in consume_all(settings, 2)}
    assert got["r9"].model_version == "ext@3"
    assert got[body["response_id"]].model_version == "tiny@v7"
    assert got[body["response_id"]].response == body["message"]["content"]
    r = client.post("/v1/chat", json={"user_id": "u9", "messages": []})
    assert r.status_code == 422 and r.json()["fields"][0]["field"] == "messages"


def test_framework_errors_use_the_same_error_body(client):
    r = client.get("/v1/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "not_found", "message": "Not Found"}
    r = client.get("/v1/feedback")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


def test_ops_endpoints(client, broker):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["broker"] == "reachable"
    schema = client.get("/v1/schema").json()
    assert schema["discriminator"]["propertyName"] == "type"
    assert "flywheel_events_published_total" in client.get("/metrics").text


def test_readyz_is_503_while_the_broker_is_frozen(client, broker):
    broker.pause()
    try:
        client.app.state.flywheel.extras.clear()
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["broker"] == "unreachable"
    finally:
        broker.resume()


def test_admin_routes_answer_garbage_with_a_clear_422_and_change_nothing(settings, api_secret):
    import secrets as _secrets

    from flywheel.settings import ApiKey, hash_api_key
    from training.registry import AuditLog

    admin = _secrets.token_urlsafe(16)
    settings.api.keys = [*settings.api.keys, ApiKey(name="ops", sha256=hash_api_key(admin), admin=True)]
    with TestClient(create_app(settings)) as c:
        h = {"Authorization": f"Bearer {admin}"}
        r = c.post("/v1/admin/promote", headers=h, content=b"\xff\xfe not json")
        assert r.status_code == 400, r.text
        r = c.post("/v1/admin/promote", headers=h, json={"version": "three", "colour": "red"})
        assert r.status_code == 422 and {f["field"] for f in r.json()["fields"]} == {"version", "colour"}
        r = c.post("/v1/admin/rollback", headers=h, json={"model": "some-other-model"})
        assert r.status_code == 422 and r.json()["fields"][0]["field"] == "model"
        r = c.get("/v1/admin/history", headers=h, params={"model": "nope"})
        assert r.status_code == 422 and "must be one of" in r.json()["message"]
        r = c.post("/v1/admin/reload", headers=h)
        assert r.status_code == 409 and "POLICY_FROM_REGISTRY" in r.json()["message"]
    assert AuditLog.from_settings(settings).history() == []  # nothing was recorded
