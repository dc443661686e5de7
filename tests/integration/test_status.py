"""`flywheel status` against a running stack (broker, consumer, API), and with the broker frozen (SIGSTOP):
it must say so within its deadline instead of hanging."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from flywheel.app.stack import free_port
from flywheel.app.status import gather, render
from flywheel.app.traffic import example_traffic
from pipelines.sharegpt import chat_samples
from serving.app import create_app
from serving.server import BackgroundServer
from tests.integration.helpers import consumer_thread, flywheel_env, produce_raw, wait_for_rows

pytestmark = pytest.mark.integration


def test_status_shows_services_lag_and_the_lakes_last_hour(settings, api_secret, broker):
    events = list(example_traffic(chat_samples(50), 600, seed=3))
    produce_raw(settings, [json.dumps(e).encode() for e in events[:400]])
    settings.api.port = free_port()
    with consumer_thread(settings), BackgroundServer(create_app(settings), port=settings.api.port):
        wait_for_rows(settings, 400)
        time.sleep(1.5)  # the consumer commits every 0.5 s
        status = gather(settings, timeout_s=5)
        # the consumer stops; 200 more events wait in the topic: lag
    produce_raw(settings, [json.dumps(e).encode() for e in events[400:]])
    after = gather(settings, timeout_s=5)

    assert status["broker"]["state"] == "up" and status["api"]["state"] == "up", (status["broker"], status["api"])
    assert status["airflow"]["state"] == "down" and status["consumer"]["state"] in ("up", "down")
    lag = status["broker"]["lag"]
    assert [p["partition"] for p in lag] == [0, 1, 2]
    assert sum(p["committed"] or 0 for p in lag) == 400 and sum(p["lag"] for p in lag) == 0
    assert sum(p["lag"] for p in after["broker"]["lag"]) == 200  # end offsets are real, not a placeholder
    expected: dict[str, int] = {}
    for e in events[:400]:
        expected[e["type"]] = expected.get(e["type"], 0) + 1
    landed = status["lake"]["last_hour"]
    held = sum(status["lake"]["held_last_hour"].values())
    assert sum(landed.values()) + held == 400 and all(landed[t] <= n for t, n in expected.items())
    assert status["registry"]["models"]["flywheel-policy"]["champion"] is None, status["registry"]  # none registered
    screen = render(status)
    for words in ("broker", "consumer lag", "lake, last hour", "flywheel-policy", "last dataset: none yet"):
        assert words in screen

    # the command itself, for scripts
    out = subprocess.run([sys.executable, "-m", "flywheel.app.cli", "status", "--json"], env=flywheel_env(settings),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sum(p["lag"] for p in json.loads(out.stdout)["broker"]["lag"]) == 200


def test_status_with_the_broker_frozen_says_so_instead_of_hanging(settings, broker):
    broker.pause()
    try:
        started = time.monotonic()
        status = gather(settings, timeout_s=3)
        took = time.monotonic() - started
    finally:
        broker.resume()
    assert took < 6, took
    assert status["broker"]["state"] == "not answering"
    assert status["lake"]["state"] == "up" and status["registry"]["state"] == "empty"  # the rest still reported
    assert "consumer lag: unknown, the broker is not answering" in render(status)
