"""The consumer's column-wise fast path accepts only what the contract's models accept, with the same values.

The fast path (``ingest.fastpath``) never rejects: what it is unsure of goes to the per-record path. So the
property to hold is one-sided: a row the fast path accepts must be an event the models accept, stored with
exactly the values the per-record path would store, held back for the same reason. Hypothesis mutates valid
events of every type (missing, null, mistyped, unknown, oversized, non-canonical and unicode values, broken
cross-field rules, odd encodings) and checks that, one record at a time and in mixed batches.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.consumer import Held, Record, Rejected, handle_batch, validate_records
from ingest.fastpath import COLUMNS, UUID_PATTERN, canonical_uuids, decode_batch, matches_pattern
from ingest.filters import FilterConfig, StreamScreen
from ingest.lake import events_table
from ingest.validation import QualityRules

NOW = datetime.now(UTC).replace(microsecond=0)
RULES = QualityRules(max_text_chars=300)
SCREEN = StreamScreen(FilterConfig(blocked_users=frozenset({"blocked-user"})))
AT = (NOW - timedelta(minutes=3)).isoformat()
COMMON = {"schema_version": 1, "occurred_at": AT, "conversation_id": "conv-1", "user_id": "user-1",
          "model_version": "policy-v3"}
BASE = {
    "turn": {"type": "turn", "response_id": "r1", "response": "Paris is the capital.",
             "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]},
    "thumbs": {"type": "thumbs", "response_id": "r1", "value": "down", "reason": "too short"},
    "regenerate": {"type": "regenerate", "discarded_response_id": "r1", "new_response_id": "r2"},
    "correction": {"type": "correction", "response_id": "r1",
                   "corrected_text": "Paris is the capital and largest city of France."},
    "pairwise": {"type": "pairwise", "response_a_id": "r1", "response_b_id": "r2", "choice": "a"},
    "implicit": {"type": "implicit", "response_id": "r1", "action": "copy"},
    "review": {"type": "review", "reviewer": "ana", "item_id": "item-1", "target_event_id": str(uuid.uuid4()),
               "decision": "reject", "reason": "harmful"},
}
FIELDS = sorted({c.name for cols in COLUMNS.values() for c in cols} | {"role", "content", "extra"})
ODD_VALUES = [
    None, "", " ", "x" * 129, "x" * 301, "a b", "ÄÖ-ü", "r1", "r2", "r1\n", "\u2028", "😀", "\ud800", "\x00", 1, 0,
    1.0, True, [], {}, "1", 2, "up", "down", "tie", "a", "b", "reject", "fix", "accept", "harmful", "copy",
    "user", "assistant", "bot", "blocked-user", "   ", "kill yourself", "ok",
    "2026-12-02 10:00:00Z", "2026-12-02T10:00:00", "2026-02-30T10:00:00Z", "1969-12-31T23:59:59Z",
    (NOW + timedelta(days=2)).isoformat(), (NOW - timedelta(days=40)).isoformat(),
    NOW.isoformat().replace("+00:00", "Z"), (NOW - timedelta(hours=5)).astimezone().isoformat(),
    (NOW - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S.1234567Z"), 1764669600,
    str(uuid.uuid4()).upper(), uuid.uuid4().hex, "{" + str(uuid.uuid4()) + "}", str(uuid.uuid4()),
    [{"role": "user", "content": "hi"}], [{"role": "user"}], [{"role": "bot", "content": "x"}],
    [{"role": "user", "content": "x", "extra": 1}], [None], [{"role": "user", "content": None}],
    [{"role": "user", "content": "y" * 301}],
    "conv:7@eu/a.b_c-d", "r1 ", "é", "r\u00e91", "r1\t", "0" * 36, "0" * 128, "0" * 129,
    str(uuid.uuid4())[:-1] + "g", str(uuid.uuid4()).replace("-", "")[:32] + "----",
    "-".join([uuid.uuid4().hex[:8], uuid.uuid4().hex[:5], uuid.uuid4().hex[:3], uuid.uuid4().hex[:4],
              uuid.uuid4().hex[:12]]),
]


def event(event_type: str) -> dict[str, object]:
    return {"event_id": str(uuid.uuid4()), **COMMON, **BASE[event_type]}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    ev = event(draw(st.sampled_from(sorted(BASE))))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()) and name in ev:
            del ev[name]
        else:
            ev[name] = draw(st.sampled_from(ODD_VALUES))
    encoding = draw(st.sampled_from(["compact", "spaced", "ascii", "indent", "crlf", "trailing_newline",
                                     "escaped_key", "escaped_value", "dup_key"]))
    if encoding == "compact":
        return json.dumps(ev, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    if encoding == "spaced":
        return json.dumps(ev, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if encoding == "indent":
        return json.dumps(ev, indent=1).encode()
    if encoding == "crlf":
        return json.dumps(ev, indent=1).replace("\n", "\r\n").encode()
    if encoding == "trailing_newline":
        return json.dumps(ev).encode() + b"\n"
    text = json.dumps(ev)
    if encoding == "escaped_value":  # an escape of a letter in a value, not in a key
        text = text.replace('"r1"', '"\\u00721"')
    if encoding == "escaped_key":  # a key spelt with an escape is the same key to every JSON reader
        text = text.replace('"schema_version"', '"schema_versio\\u006e"').replace('"reason"', '"re\\u0061son"')
    if encoding == "dup_key":
        text = text[:-1] + ', "user_id": "user-2"}'
    return text.encode()


def records(values: list[bytes]) -> list[Record]:
    return [Record("events", i % 3, 100 + i, None, v) for i, v in enumerate(values)]


def assert_fast_rows_match_the_models(values: list[bytes]) -> int:
    recs = records(values)
    decoded = decode_batch(values, [r.topic for r in recs], [r.partition for r in recs], [r.offset for r in recs],
                           RULES, NOW, SCREEN.screen_rows)
    reference = dict(zip([r.offset for r in recs], validate_records(recs, RULES, NOW, SCREEN), strict=True))
    accepted = 0
    for event_type, table in decoded.tables.items():
        held = decoded.held.get(event_type) or [None] * table.num_rows
        for row, hold in zip(table.to_pylist(), held, strict=True):
            record, verdict = reference[row["kafka_offset"]]
            assert not isinstance(verdict, Rejected), (record.value, verdict)
            model = verdict.event if isinstance(verdict, Held) else verdict
            assert model.type == event_type
            assert hold == (verdict.reason if isinstance(verdict, Held) else None), record.value
            expected = events_table(event_type, [(model, record.offset)], record.topic, record.partition).to_pylist()[0]
            assert row == expected, record.value
            accepted += 1
    positions = {i for i in decoded.slow}
    assert len(positions) == len(decoded.slow)  # every record is either fast or slow, never both
    assert accepted + len(positions) == len(values)
    return accepted


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_one_record_fast_only_if_the_models_agree(value: bytes) -> None:
    assert_fast_rows_match_the_models([value])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated(), min_size=2, max_size=40))
def test_mixed_batches_fast_only_if_the_models_agree(values: list[bytes]) -> None:
    assert_fast_rows_match_the_models(values)


def test_well_formed_events_of_every_type_take_the_fast_path() -> None:
    values = [json.dumps(event(t)).encode() for t in sorted(BASE) for _ in range(5)]
    assert assert_fast_rows_match_the_models(values) == len(values)


def test_a_poison_record_sends_only_itself_down_the_per_record_path() -> None:
    good = [json.dumps(event(t)).encode() for t in sorted(BASE) for _ in range(20)]
    values = good[:70] + [b'{"type": "thumbs", "event_id": '] + good[70:] + [b"\xff\xfe"]
    recs = records(values)
    decoded = decode_batch(values, [r.topic for r in recs], [r.partition for r in recs], [r.offset for r in recs],
                           RULES, NOW)
    assert decoded.slow == [70, len(values) - 1]
    handled = handle_batch(recs, RULES, NOW, columnar_min=1)
    assert [v.reason for _, v in handled.verdicts] == ["invalid_json", "invalid_utf8"]  # type: ignore[union-attr]
    assert sum(t.num_rows for t in handled.tables.values()) == len(good)


def test_an_explicit_null_is_not_a_default_however_the_key_is_spelt() -> None:
    values = [json.dumps({**event("implicit"), "schema_version": None}).encode(),
              json.dumps({**event("implicit"), "schema_version": None}).replace(
                  '"schema_version"', '"schema_versio\\u006e"').encode()]
    assert assert_fast_rows_match_the_models(values) == 0
    left_out = {k: v for k, v in event("implicit").items() if k != "schema_version"}
    assert assert_fast_rows_match_the_models([json.dumps(left_out).encode()]) == 1  # absent: the default


def test_held_rows_carry_the_filters_reason() -> None:
    blocked = {**event("thumbs"), "user_id": "blocked-user"}
    harmful = {**event("correction"), "corrected_text": "You should kill yourself, the answer is Paris."}
    values = [json.dumps(e).encode() for e in (event("thumbs"), blocked, harmful, event("turn"))]
    recs = records(values)
    handled = handle_batch(recs, RULES, NOW, SCREEN, columnar_min=1)
    assert handled.held["thumbs"] == [None, "blocked_account"]
    assert handled.held["correction"] == ["harmful_correction"]
    assert handled.held["turn"] == [None]


def test_a_small_batch_goes_record_by_record() -> None:
    recs = records([json.dumps(event("thumbs")).encode() for _ in range(3)])
    handled = handle_batch(recs, RULES, NOW)
    assert not handled.tables and len(handled.verdicts) == 3


def test_text_escaped_as_ascii_takes_the_fast_path() -> None:
    texts = ["Café crème", "中文的回答", "emoji 😀 and ÄÖü", "tab\tand\nnewline", "quote \" and back\\slash"]
    values = [json.dumps({**event("correction"), "corrected_text": t + " is the better answer."}).encode()
              for t in texts]
    assert all(b"\\u" in v or b"\\t" in v or b'\\"' in v for v in values)
    assert assert_fast_rows_match_the_models(values) == len(values)


def test_a_line_break_inside_a_value_sends_only_that_value_down_the_per_record_path() -> None:
    good = [json.dumps(event(t)).encode() for t in sorted(BASE) for _ in range(3)]
    broken = [json.dumps(event("thumbs"), indent=1).encode(),
              json.dumps(event("thumbs"), indent=1).replace("\n", "\r\n").encode(),
              json.dumps(event("thumbs")).encode() + b"\r"]
    values = good[:4] + broken[:1] + good[4:10] + broken[1:] + good[10:]
    recs = records(values)
    decoded = decode_batch(values, [r.topic for r in recs], [r.partition for r in recs], [r.offset for r in recs],
                           RULES, NOW)
    assert decoded.slow == [4, 11, 12]
    assert assert_fast_rows_match_the_models(values) == len(good)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("aZ09._:@/- \n\té😀\x00"), max_size=6) | st.none(), max_size=12))
def test_one_class_patterns_are_checked_bytewise_as_the_regex_would(texts: list[str | None]) -> None:
    pattern = next(c.pattern for c in COLUMNS["turn"] if c.pattern)
    column = pa.chunked_array([pa.array(texts[:3], pa.string()), pa.array(texts[3:], pa.string())])
    by_regex = pc.fill_null(pc.match_substring_regex(column, pattern), False).to_numpy(zero_copy_only=False)
    assert matches_pattern(column, pattern).tolist() == by_regex.tolist()
    assert matches_pattern(column.slice(1), pattern).tolist() == by_regex[1:].tolist()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("0af9AFg-"), min_size=35, max_size=37)
                | st.uuids().map(str) | st.none(), max_size=8))
def test_canonical_uuids_are_checked_bytewise_as_the_regex_would(texts: list[str | None]) -> None:
    column = pa.chunked_array([pa.array(texts, pa.string())])
    by_regex = pc.fill_null(pc.match_substring_regex(column, UUID_PATTERN), False).to_numpy(zero_copy_only=False)
    assert canonical_uuids(column).tolist() == by_regex.tolist()
