"""Acceptance tests of the feedback path against the real Tansu broker (and moto S3 for the lake)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import jsonschema
import pytest

from flywheel.app.stack import free_port
from flywheel.app.traffic import example_traffic
from flywheel.events import json_schema
from flywheel.storage import open_storage
from ingest.consumer import ConsumerMetrics, KafkaDeadLetters, run_consumer, validate_records
from ingest.filters import FilterConfig, screen_event
from ingest.lake import LakeSink
from ingest.sources import open_source
from ingest.validation import QualityRules
from pipelines.sharegpt import chat_samples
from serving.app import create_app
from serving.server import BackgroundServer
from tests.integration.helpers import consumer_thread, lake_rows, produce_raw, read_dlq, wait_for_rows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def samples():
    return chat_samples(300)


def post_all(url: str, secret: str, events: list[dict], *, singles: int, batch: int = 100) -> Counter:
    """POST ``singles`` events one by one (concurrently) and the rest in batches; returns status counts."""
    codes: Counter = Counter()
    headers = {"Authorization": f"Bearer {secret}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        def one(ev):
            path = "/v1/turns" if ev["type"] == "turn" else "/v1/feedback"
            return client.post(path, json=ev).status_code
        with ThreadPoolExecutor(8) as pool:
            codes.update(pool.map(one, events[:singles]))
        for i in range(singles, len(events), batch):
            r = client.post("/v1/feedback/batch", json={"events": events[i : i + batch]})
            codes[r.status_code] += 1
            assert r.json()["rejected"] == []
    return codes


def direct_events(samples, n: int) -> list[bytes]:
    """Records a chat service writes straight to Kafka, checked against the published JSON Schema."""
    validator = jsonschema.Draft202012Validator(json_schema())
    out = []
    for ev in example_traffic(samples, n, seed=99):
        validator.validate(ev)
        out.append(json.dumps(ev).encode())
    return out


@pytest.mark.parametrize("lake_kind", ["file", "s3"])
def test_11000_events_land_exactly_once(request, settings, api_secret, samples, lake_kind):
    if lake_kind == "s3":
        request.getfixturevalue("s3_lake")
    http_events = list(example_traffic(samples, 10_000, seed=1))
    assert set(e["type"] for e in http_events) == {"turn", "thumbs", "regenerate", "correction", "pairwise", "implicit"}
    raw = direct_events(samples, 1_000)
    with consumer_thread(settings), BackgroundServer(create_app(settings), port=free_port()) as srv:
        codes = post_all(srv.url, api_secret, http_events, singles=1_000)
        produce_raw(settings, raw)
        rows = wait_for_rows(settings, 11_000)
    assert codes == Counter({202: 1_000 + 90})
    expected = {e["event_id"] for e in http_events} | {json.loads(r)["event_id"] for r in raw}
    ids = [r["event_id"] for r in rows]
    assert len(expected) == 11_000
    assert set(ids) == expected, "lost or foreign events"
    assert len(ids) == 11_000, "duplicated rows"
    # valid events a consumer-path filter holds (here: one-word corrections) are in the quarantine area instead
    everything = http_events + [json.loads(r) for r in raw]
    should_hold = {e["event_id"] for e in everything
                   if screen_event(e["type"], e["user_id"], e.get("corrected_text"), FilterConfig())}
    assert should_hold and {r["event_id"] for r in rows if r["held"]} == should_hold
    assert settings.lake.uri.startswith("s3://" if lake_kind == "s3" else "file://")


def test_sigkilled_consumer_restarts_and_still_writes_exactly_once(settings, samples, tmp_path):
    settings.ingest.commit_every = 300
    settings.ingest.max_poll_records = 300
    raw = direct_events(samples, 12_000)
    produce_raw(settings, raw)
    env = {**os.environ, "FLYWHEEL_HOME": str(settings.home),
           "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
           "FLYWHEEL_KAFKA__TOPIC": settings.kafka.topic, "FLYWHEEL_KAFKA__DLQ_TOPIC": settings.kafka.dlq_topic,
           "FLYWHEEL_KAFKA__GROUP_ID": settings.kafka.group_id, "FLYWHEEL_INGEST__COMMIT_EVERY": "300",
           "FLYWHEEL_INGEST__MAX_POLL_RECORDS": "300", "FLYWHEEL_INGEST__COMMIT_INTERVAL_S": "0.3"}
    cmd = [sys.executable, "-m", "flywheel.app.cli", "ingest"]
    storage = open_storage(settings.lake.uri, settings.lake)
    kills = 0
    for _attempt in range(2):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        start = len(lake_rows(storage))
        while len(lake_rows(storage)) < start + 1_500 and time.monotonic() < deadline:
            time.sleep(0.05)
        if len(lake_rows(storage)) < 12_000:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        else:  # a fast consumer may finish the stream before the kill: it keeps running until told to stop
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert kills >= 1, "the consumer finished before it could be killed; make the stream longer"
    log = tmp_path / "last-consumer.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([*cmd[:3], "-v", *cmd[3:]], env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        rows = wait_for_rows(settings, 12_000)
        # the lake may be complete before this consumer is even up; it is stopped once it runs (a SIGTERM
        # before the CLI set its handler would kill it, which says nothing about a clean stop)
        deadline = time.monotonic() + 60
        while b"consuming" not in log.read_bytes() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, "SIGTERM must stop the consumer cleanly"
    ids = [r["event_id"] for r in rows]
    assert set(ids) == {json.loads(r)["event_id"] for r in raw}
    assert len(ids) == len(set(ids)) == 12_000


def test_the_end_of_a_backlog_is_handed_over_at_once_and_flushed(settings, samples):
    """A backlog bigger than a batch: the poll that reaches its end returns without waiting out its timeout or
    the batch wait (both long here) and says the source drained, and the consumer loop then makes everything
    durable and commits it at once, instead of after the next, empty, poll."""
    produce_raw(settings, direct_events(samples, 1_000), key=None)
    source = open_source(settings.kafka, poll_timeout_ms=4_000, max_poll_records=100, batch_records=300,
                         batch_wait_ms=3_000, assignment="manual")
    try:
        got, polls, started = [], [], time.monotonic()
        while len(got) < 1_000 and time.monotonic() - started < 30:
            batch = source.poll()
            got += batch
            polls.append((len(batch), source.drained))
        took = time.monotonic() - started
        assert polls[-1][1] and not any(drained for _, drained in polls[:-1]), polls
        assert all(n == 300 for n, _ in polls[:-1]) and polls[-1][0] == 100, polls
        assert len({(r.partition, r.offset) for r in got}) == 1_000
        assert took < 3.0, f"the polls took {took:.1f} s: the last one waited for records that were not there"

        # the loop: a backlog's end is committed before the next poll (which would block for 4 s here)
        produce_raw(settings, direct_events(samples, 400), key=None)
        # librdkafka's fetcher runs meanwhile: give it a fetch (500 ms at most) to see the new high watermarks.
        # A watermark older than the last records only makes `drained` come early (another checkpoint follows).
        time.sleep(1.5)
        commits: list[dict] = []
        stop = threading.Event()
        storage = open_storage(settings.lake.uri, settings.lake)
        t = threading.Thread(target=run_consumer, args=(source, lambda recs: validate_records(recs, QualityRules()),
                                                        LakeSink(storage), KafkaDeadLetters(settings.kafka)),
                             kwargs={"commit_every": 10_000, "commit_interval_s": 60, "stop": stop,
                                     "on_commit": commits.append})
        started = time.monotonic()
        t.start()
        while not commits and time.monotonic() - started < 30:
            time.sleep(0.01)
        took = time.monotonic() - started
        stop.set()
        t.join(30)
        assert sum(commits[0].values()) == 1_400 and len(lake_rows(storage)) == 400
        assert took < 3.0, f"the first commit came after {took:.1f} s"
    finally:
        source.close()


@pytest.mark.parametrize("background", [False, True], ids=["inline-writes", "background-writes"])
def test_a_failed_flush_commits_nothing_and_the_replay_is_exactly_once(settings, samples, kafka_client, background):
    produce_raw(settings, direct_events(samples, 800))
    storage = open_storage(settings.lake.uri, settings.lake)

    class CrashAfterWrite(LakeSink):
        def write(self, buffered):
            super().write(buffered)  # the files are durable ...
            raise OSError("simulated crash before the offset commit")

    source = open_source(settings.kafka, client=kafka_client, poll_timeout_ms=200, max_poll_records=300)
    dlq = KafkaDeadLetters(settings.kafka)
    handle = lambda recs: validate_records(recs, QualityRules())  # noqa: E731
    with pytest.raises(OSError, match="simulated crash"):
        run_consumer(source, handle, CrashAfterWrite(storage), dlq, commit_every=300, commit_interval_s=60,
                     stop=threading.Event(), background_writes=background)
    committed = source.committed([0, 1, 2])
    source.close()
    assert committed == [None, None, None], "offsets were committed although the flush failed"
    written_before_crash = len(lake_rows(storage))
    assert written_before_crash >= 300

    # The replay: a healthy consumer in the same group re-reads everything from the last commit (none).
    metrics = ConsumerMetrics()
    commits: dict[tuple[str, int], int] = {}
    source = open_source(settings.kafka, client=kafka_client, poll_timeout_ms=200, max_poll_records=300)
    stop = threading.Event()
    t = threading.Thread(target=run_consumer, args=(source, handle, LakeSink(storage), dlq),
                         kwargs={"commit_every": 300, "commit_interval_s": 0.3, "stop": stop, "metrics": metrics,
                                 "on_commit": commits.update, "background_writes": background})
    t.start()
    deadline = time.monotonic() + 60
    while sum(commits.values()) < 800 and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    t.join(30)
    source.close()
    dlq.close()
    assert sum(commits.values()) == 800, "the replay did not commit every offset"
    ids = [r["event_id"] for r in lake_rows(storage)]
    assert len(ids) == len(set(ids)) == 800
    skipped_or_rewritten = metrics.duplicates._value.get() + metrics.replayed._value.get()
    assert skipped_or_rewritten == written_before_crash, "the replay must recognise exactly what was written"
    assert metrics.written._value.get() == 800 - written_before_crash


def _sample(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_broker_frozen_for_10s_every_202_lands(settings, api_secret, samples, broker):
    events = list(example_traffic(samples, 1_500, seed=5))
    accepted: list[str] = []
    with consumer_thread(settings), BackgroundServer(create_app(settings), port=free_port()) as srv:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {api_secret}"}, timeout=60) as c:
            def send(chunk):
                for ev in chunk:
                    r = c.post("/v1/turns" if ev["type"] == "turn" else "/v1/feedback", json=ev)
                    if r.status_code == 202:
                        accepted.append(ev["event_id"])
                    else:
                        raise AssertionError(f"{r.status_code}: {r.text}")
            send(events[:300])
            broker.pause()
            paused_at = time.monotonic()
            try:
                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(send, [events[i:i + 150] for i in range(300, 900, 150)]))
                time.sleep(max(0.0, 10 - (time.monotonic() - paused_at)))
            finally:
                broker.resume()
            send(events[900:])
            rows = wait_for_rows(settings, len(accepted), timeout=120)
            metrics = c.get("/metrics").text
    spooled = _sample(metrics, 'flywheel_events_published_total{path="spool"}')
    drained = _sample(metrics, "flywheel_spool_drained_total")
    assert spooled > 0, "the pause should have sent events to the spool"
    assert drained == spooled, "every spooled event is delivered once the broker is back"
    ids = [r["event_id"] for r in rows]
    assert len(accepted) == 1_500
    assert set(ids) == set(accepted) and len(ids) == len(set(ids))


def test_garbage_on_the_topic_goes_to_the_dlq_and_valid_records_still_land(settings, samples):
    valid = direct_events(samples, 50)
    now = datetime.now(UTC)
    good_obj = json.loads(valid[0])
    garbage = {
        "invalid_utf8": b"\xff\xfe\xfd not utf-8",
        "invalid_json": b"this is not json",
        "not_an_object": b'"a string"',
        "unknown_type": json.dumps({**good_obj, "type": "emoji", "event_id": str(uuid.uuid4())}).encode(),
        "schema_violation": json.dumps({**good_obj, "event_id": 42}).encode(),
        "occurred_at_in_future": json.dumps({**good_obj, "event_id": str(uuid.uuid4()),
                                             "occurred_at": (now + timedelta(days=365)).isoformat()}).encode(),
    }
    mixed = valid[:25] + list(garbage.values()) + valid[25:]
    produce_raw(settings, mixed)
    with consumer_thread(settings):
        rows = wait_for_rows(settings, 50, timeout=60)
        dead = read_dlq(settings, len(garbage))
    assert {r["event_id"] for r in rows} == {json.loads(v)["event_id"] for v in valid}
    assert len(rows) == 50
    by_reason = {dict((k, v.decode()) for k, v in d.headers)["dlq.reason"]: d for d in dead}
    assert set(by_reason) == set(garbage)
    for reason, record in by_reason.items():
        headers = dict((k, v.decode()) for k, v in record.headers)
        assert record.value == garbage[reason], "the DLQ keeps the original bytes"
        assert headers["dlq.source.topic"] == settings.kafka.topic
        assert int(headers["dlq.source.offset"]) >= 0 and headers["dlq.detail"]
