"""Data-quality rules checked after pydantic has validated each record's types.

The contract (``flywheel.events``) says what a well-formed event is. These rules say what the pipeline is
willing to learn from: ``occurred_at`` neither ahead of the clock (beyond a skew allowance) nor older than
the retention window, text within the length bounds curation accepts, and no blank corrections.

Each rule is defined once, as a predicate that works on a scalar and on a pandas Series or array alike. The
consumer checks a whole poll column by column (``failing_rows`` on the fast path's Arrow columns,
``check_batch`` on the models of the records that took the per-record path); the API evaluates the same
predicates on a single event, so a client hears about a bad timestamp as a 422 instead of a dead letter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from flywheel.events import AnyEvent
from flywheel.settings import IngestSettings


@dataclass(frozen=True)
class QualityRules:
    max_future_skew: timedelta = timedelta(minutes=5)
    max_age: timedelta = timedelta(days=30)
    max_text_chars: int = 32_000

    @classmethod
    def from_settings(cls, s: IngestSettings) -> QualityRules:
        return cls(timedelta(seconds=s.max_future_skew_s), timedelta(days=s.max_age_days), s.max_text_chars)


class Clock(NamedTuple):
    """The instant rules are checked at, with the bounds on ``occurred_at`` it gives."""

    now: datetime
    latest: datetime  # now + max_future_skew
    earliest: datetime  # now - max_age


@dataclass(frozen=True)
class Rule:
    reason: str  # the reason code written to the dead-letter record / the 422
    column: str
    passes: Callable[[Any, Clock], Any]  # (scalar, clock) -> bool, (Series, clock) -> bool Series
    explain: Callable[[Clock], str]  # the message, built only for events that break the rule


@functools.cache
def _rules(q: QualityRules) -> tuple[Rule, ...]:
    """The rules, built once per configuration (the API checks them on every request); the clock comes with
    each check."""
    return (
        Rule("occurred_at_in_future", "occurred_at", lambda v, c: v <= c.latest,
             lambda c: f"occurred_at is more than {q.max_future_skew} ahead of the server clock ({c.now.isoformat()})"),
        Rule("occurred_at_too_old", "occurred_at", lambda v, c: v >= c.earliest,
             lambda c: f"occurred_at is older than the retention window of {q.max_age}"),
        Rule("text_too_long", "text_chars", lambda v, c: v <= q.max_text_chars,
             lambda c: f"a text field is longer than {q.max_text_chars} characters"),
        Rule("blank_correction", "blank_correction", lambda v, c: not v if isinstance(v, bool) else np.logical_not(v),
             lambda c: "corrected_text is only whitespace"),
    )


def _clock(q: QualityRules, now: datetime) -> Clock:
    return Clock(now, now + q.max_future_skew, now - q.max_age)


def _row(event: AnyEvent) -> dict[str, Any]:
    return {
        "occurred_at": event.occurred_at,
        "text_chars": max(map(len, event.texts()), default=0),
        "blank_correction": event.type == "correction" and not event.corrected_text.strip(),
    }


Verdict = tuple[str, str] | None
"""``None`` when an event passes, else ``(reason_code, message)`` of the first rule it breaks."""


def check_event(event: AnyEvent, rules: QualityRules, now: datetime | None = None) -> Verdict:
    """The rules for one event, evaluated in plain Python (the API's hot path)."""
    row, clock = _row(event), _clock(rules, now or datetime.now(UTC))
    for rule in _rules(rules):
        if not rule.passes(row[rule.column], clock):
            return rule.reason, rule.explain(clock)
    return None


def check_batch(events: list[AnyEvent], rules: QualityRules, now: datetime | None = None) -> list[Verdict]:
    """The rules for a micro-batch of models, column by column; one verdict per event, in order."""
    if not events:
        return []
    rows = [_row(e) for e in events]
    columns = {
        "occurred_at": pd.Series(pd.DatetimeIndex([r["occurred_at"] for r in rows]).tz_convert("UTC")),
        "text_chars": np.fromiter((r["text_chars"] for r in rows), dtype=np.int64, count=len(rows)),
        "blank_correction": np.fromiter((r["blank_correction"] for r in rows), dtype=bool, count=len(rows)),
    }
    verdicts: list[Verdict] = [None] * len(events)
    clock = _clock(rules, now or datetime.now(UTC))
    for rule, failed in _failures(columns, rules, clock):
        for i in np.flatnonzero(failed):
            if verdicts[i] is None:  # rules are checked in order: keep the first one an event breaks
                verdicts[i] = (rule.reason, rule.explain(clock))
    return verdicts


def failing_rows(columns: dict[str, Any], rules: QualityRules, now: datetime | None = None) -> np.ndarray:
    """Which rows break any rule, given the rules' columns (``occurred_at`` as a tz-aware pandas Series,
    ``text_chars`` and ``blank_correction`` as arrays): the consumer's column-wise fast path."""
    out = np.zeros(len(columns["text_chars"]), dtype=bool)
    for _rule, failed in _failures(columns, rules, _clock(rules, now or datetime.now(UTC))):
        out |= failed
    return out


def _failures(columns: dict[str, Any], rules: QualityRules, clock: Clock) -> list[tuple[Rule, np.ndarray]]:
    return [(rule, ~np.asarray(rule.passes(columns[rule.column], clock), dtype=bool)) for rule in _rules(rules)]
