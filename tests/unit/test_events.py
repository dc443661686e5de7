import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import jsonschema
import pytest
from pydantic import ValidationError

from flywheel import events as ev

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def base(**kw):
    return {"event_id": str(uuid.uuid4()), "occurred_at": NOW.isoformat(), "conversation_id": "c1",
            "user_id": "u1", "model_version": "v1", **kw}


EXAMPLES = [
    base(type="turn", response_id="r1", messages=[{"role": "user", "content": "hi"}], response="hello"),
    base(type="turn", response_id="r2", messages=[{"role": "user", "content": "hi"}], response="yo",
         parent_response_id="r1"),
    base(type="thumbs", response_id="r1", value="down", reason="wrong"),
    base(type="regenerate", discarded_response_id="r1", new_response_id="r2"),
    base(type="correction", response_id="r1", corrected_text="Better."),
    base(type="pairwise", response_a_id="r1", response_b_id="r2", choice="tie"),
    base(type="implicit", response_id="r1", action="copy"),
    base(type="review", reviewer="ana", item_id="rv-c-0123", target_event_id=str(uuid.uuid4()), decision="reject",
         reason="unclear"),
    base(type="review", reviewer="ana", item_id="rv-c-0123", target_event_id=str(uuid.uuid4()), decision="fix",
         edited_text="Paris."),
]


def test_every_type_of_the_contract_has_an_example():
    assert {e["type"] for e in EXAMPLES} == set(ev.EVENT_TYPES)


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: o["type"])
def test_every_type_is_written_to_the_lake_and_read_back(obj, tmp_path):
    """A valid event the lake cannot write would stop the consumer (it restarts and replays it forever)."""
    from flywheel.storage import open_storage
    from ingest.lake import LakeSink, read_events

    storage = open_storage(tmp_path.as_uri())
    sink = LakeSink(storage)
    event = ev.validate_event(obj)
    sink.add(event, "t", 0, 7)
    assert sink.flush().written == 1
    row = read_events(storage, event.type).iloc[0]
    assert row["event_id"] == str(event.event_id) and row["kafka_offset"] == 7
    for name in ("target_event_id", "reason", "edited_text", "response_id"):
        if getattr(event, name, None) is not None:
            assert row[name] == str(getattr(event, name))


@pytest.mark.parametrize("change, message", [
    ({"decision": "reject", "reason": None}, "reason is required"),
    ({"decision": "accept", "reason": "unclear"}, "reason is required"),
    ({"decision": "fix", "reason": None}, "edited_text is required"),
    ({"decision": "skip", "reason": None, "edited_text": "x"}, "edited_text is required"),
])
def test_a_review_needs_a_reason_to_reject_and_a_text_to_fix(change, message):
    obj = {**EXAMPLES[-2], **change}
    with pytest.raises(ValidationError, match=message):
        ev.validate_event(obj)


def test_the_http_feedback_contract_does_not_include_reviews():
    assert "review" not in ev.FEEDBACK_TYPES and "review" not in ev.CLIENT_TYPES
    assert "review" in ev.EVENT_TYPES


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: o["type"])
def test_every_type_round_trips_through_the_wire_format(obj):
    event = ev.validate_event(obj)
    assert ev.decode_event(ev.encode_event(event)) == event
    assert event.schema_version == ev.SCHEMA_VERSION


@pytest.mark.parametrize("obj", EXAMPLES, ids=lambda o: o["type"])
def test_json_schema_accepts_what_the_models_accept(obj):
    jsonschema.validate(json.loads(ev.encode_event(ev.validate_event(obj))), ev.json_schema())


def test_json_schema_rejects_a_record_without_event_id():
    obj = {k: v for k, v in EXAMPLES[2].items() if k != "event_id"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(obj, ev.json_schema())


def test_occurred_at_is_normalised_to_utc_and_must_carry_an_offset():
    paris = datetime(2026, 11, 22, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    event = ev.validate_event({**EXAMPLES[2], "occurred_at": paris.isoformat()})
    assert event.occurred_at == NOW and event.occurred_at.tzinfo == UTC
    with pytest.raises(ValidationError, match="timezone"):
        ev.validate_event({**EXAMPLES[2], "occurred_at": "2026-11-22T12:00:00"})


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"value": "sideways"}, "value"),
        ({"schema_version": 99}, "unsupported schema_version"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
        ({"event_id": "not-a-uuid"}, "event_id"),
        ({"user_id": "has spaces"}, "user_id"),
    ],
)
def test_invalid_fields_are_named(change, fragment):
    with pytest.raises(ValidationError) as info:
        ev.validate_event({**EXAMPLES[2], **change})
    assert fragment in str(info.value)


def test_cross_field_rules():
    with pytest.raises(ValidationError, match="must differ"):
        ev.validate_event({**EXAMPLES[5], "response_b_id": "r1"})
    with pytest.raises(ValidationError, match="must differ"):
        ev.validate_event({**EXAMPLES[1], "parent_response_id": "r2"})
    with pytest.raises(ValidationError, match="must differ"):
        ev.validate_event({**EXAMPLES[3], "new_response_id": "r1"})


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe\x00garbage", "invalid_utf8"),
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'{"type": "emoji_reaction"}', "unknown_type"),
        (b'{"type": ["thumbs"]}', "unknown_type"),  # not hashable: must not crash the consumer
        (b'{"type": {"a": 1}}', "unknown_type"),
        (json.dumps({**EXAMPLES[2], "value": 1}).encode(), "schema_violation"),
    ],
)
def test_decode_gives_a_reason_code(raw, reason):
    with pytest.raises(ev.EventDecodeError) as info:
        ev.decode_event(raw)
    assert info.value.reason == reason and info.value.detail


def test_stamp_defaults_fills_only_what_is_missing():
    obj = {k: v for k, v in EXAMPLES[2].items() if k not in ("event_id", "occurred_at")}
    stamped = ev.stamp_defaults(obj, NOW)
    assert uuid.UUID(stamped["event_id"]) and stamped["occurred_at"] == NOW.isoformat()
    kept = ev.stamp_defaults(EXAMPLES[2], NOW)
    assert kept["event_id"] == EXAMPLES[2]["event_id"]


def test_field_path_reads_like_json():
    assert ev.field_path(("events", 3, "thumbs", "value")) == "events[3].value"
    assert ev.field_path(()) == "body"
