import uuid
from datetime import UTC, datetime, timedelta

import pytest

from flywheel import events as ev
from ingest.validation import QualityRules, check_batch, check_event

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
RULES = QualityRules(max_future_skew=timedelta(minutes=5), max_age=timedelta(days=30), max_text_chars=100)


def thumbs(at=NOW):
    return ev.validate_event({"type": "thumbs", "event_id": str(uuid.uuid4()), "occurred_at": at.isoformat(),
                              "conversation_id": "c", "user_id": "u", "model_version": "v",
                              "response_id": "r", "value": "up"})


def correction(text):
    return ev.validate_event({"type": "correction", "event_id": str(uuid.uuid4()), "occurred_at": NOW.isoformat(),
                              "conversation_id": "c", "user_id": "u", "model_version": "v",
                              "response_id": "r", "corrected_text": text})


CASES = [
    (thumbs(), None),
    (thumbs(NOW + timedelta(minutes=4)), None),
    (thumbs(NOW + timedelta(days=365)), "occurred_at_in_future"),
    (thumbs(NOW - timedelta(days=31)), "occurred_at_too_old"),
    (correction("x" * 101), "text_too_long"),
    (correction("x" * 100), None),
    (correction("   \n"), "blank_correction"),
]


def test_batch_verdicts_match_the_hand_labelled_table():
    verdicts = check_batch([e for e, _ in CASES], RULES, NOW)
    assert [v[0] if v else None for v in verdicts] == [r for _, r in CASES]
    assert all(v[1] for v in verdicts if v)  # every failure carries a readable message


@pytest.mark.parametrize(("event", "reason"), CASES)
def test_single_event_path_agrees_with_the_batch_path(event, reason):
    verdict = check_event(event, RULES, NOW)
    assert (verdict[0] if verdict else None) == reason


def test_empty_batch():
    assert check_batch([], RULES, NOW) == []
