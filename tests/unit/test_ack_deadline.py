"""The publisher's stall detector: how long a request waits for a broker ack before the breaker opens."""

from __future__ import annotations

import pytest

from ingest.producer import AckDeadline


def test_before_any_ack_the_deadline_is_the_full_timeout() -> None:
    assert AckDeadline(0.04, 0.25).current() == 0.25


def test_steady_fast_acks_bring_the_deadline_down_to_the_floor() -> None:
    deadline = AckDeadline(0.04, 0.25)
    for _ in range(50):
        deadline.observe(0.003)
    assert deadline.current() == pytest.approx(0.04)


def test_a_slow_broker_raises_the_deadline_up_to_the_cap() -> None:
    deadline = AckDeadline(0.04, 0.25)
    for _ in range(50):
        deadline.observe(0.030)
    assert 0.04 < deadline.current() < 0.25 or deadline.current() == pytest.approx(0.04)
    for seconds in (0.01, 0.09) * 30:  # jittery acks widen it (srtt + 4 x deviation)
        deadline.observe(seconds)
    assert 0.2 < deadline.current() <= 0.25
    for _ in range(50):
        deadline.observe(1.0)
    assert deadline.current() == 0.25
