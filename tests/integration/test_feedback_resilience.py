"""The feedback path keeps running: poison records, large events, a frozen broker, kill storms, a second
consumer and retries across hours, all against the real Tansu broker on loopback."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from flywheel.app.stack import free_port
from flywheel.app.traffic import example_traffic
from flywheel.storage import open_storage
from ingest.consumer import ConsumerMetrics, KafkaDeadLetters, run_consumer, validate_records
from ingest.deadletters import LocalDeadLetters, read_parked
from ingest.lake import LakeSink
from ingest.service import dead_letter_file
from ingest.sources import open_source
from ingest.spool import Spool
from ingest.validation import QualityRules
from pipelines.sharegpt import chat_samples
from serving.app import create_app
from serving.server import BackgroundServer
from tests.integration.helpers import (
    consumer_thread,
    lake_rows,
    read_dlq,
    start_flywheel,
    wait_for_rows,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def samples():
    return chat_samples(300)


def valid_records(samples, n: int, seed: int = 7) -> list[bytes]:
    return [json.dumps(e).encode() for e in example_traffic(samples, n, seed=seed)]


def produce(settings, values: list[bytes], *, key: bytes | None = b"k") -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(**settings.kafka.client_config(), acks="all", max_request_size=8 * 1024 * 1024)
    for v in values:
        producer.send(settings.kafka.topic, key=key, value=v)
    producer.flush(60)
    producer.close()


def produce_paced(settings, records: list[bytes], *, every: int, pause_s: float) -> None:
    """Produce ``records`` over many keys (so every partition gets some), pausing ``pause_s`` every ``every``."""
    from kafka import KafkaProducer

    producer = KafkaProducer(**settings.kafka.client_config(), acks="all")
    for i, v in enumerate(records):
        producer.send(settings.kafka.topic, key=str(i % 89).encode(), value=v)
        if i % every == every - 1:
            time.sleep(pause_s)
    producer.flush(60)
    producer.close()


def thumbs(**kw) -> dict:
    return {"type": "thumbs", "event_id": str(uuid.uuid4()), "occurred_at": datetime.now(UTC).isoformat(),
            "conversation_id": "c-poison", "user_id": "u1", "model_version": "v1", "response_id": "r1",
            "value": "up", **kw}


def _with_raw_field(obj: dict, name: str, raw: str) -> bytes:
    return (json.dumps(obj)[:-1] + f', "{name}": {raw}}}').encode()


# Each: the record's bytes, and the DLQ reasons it may get. The first seven are the classes an outside tester
# found stopping the consumer for good; the rest are ours.
POISON = {
    "json_nested_5000_deep": (lambda: b"[" * 5000 + b"]" * 5000, {"too_deep"}),
    "field_nested_3000_deep": (lambda: _with_raw_field(thumbs(), "reason", '{"a":' * 3000 + "1" + "}" * 3000),
                               {"too_deep", "schema_violation"}),
    "schema_version_5000_digits": (lambda: _with_raw_field(thumbs(), "schema_version", "9" * 5000),
                                   {"number_too_large", "schema_violation"}),
    "value_5000_digits": (lambda: _with_raw_field({k: v for k, v in thumbs().items() if k != "value"}, "value",
                                                  "9" * 5000), {"number_too_large", "schema_violation"}),
    "occurred_at_year_1_plus_1h": (lambda: json.dumps(thumbs(occurred_at="0001-01-01T00:00:00+01:00")).encode(),
                                   {"schema_violation"}),
    "occurred_at_year_9999_minus_1h": (lambda: json.dumps(thumbs(occurred_at="9999-12-31T23:59:59-01:00")).encode(),
                                       {"schema_violation"}),
    "not_json_1_mib": (lambda: b"\x00garbage" * (1024 * 1024 // 8), {"too_large"}),
    "not_json_4_mib": (lambda: random.Random(1).randbytes(4 * 1024 * 1024), {"too_large"}),
    "valid_json_with_a_950_kb_reason": (lambda: json.dumps(thumbs(type="x" * 950_000)).encode(), {"unknown_type"}),
    "lone_surrogate_and_nul": (lambda: b'{"type": "thumbs", "user_id": "\\ud800\\u0000"}', {"invalid_json"}),
    "nan_and_infinity": (lambda: _with_raw_field(thumbs(), "schema_version", "NaN"), {"invalid_json",
                                                                                      "schema_violation"}),
    "invalid_utf8": (lambda: b'{"type": "thumbs", "user_id": "\xff\xfe"}', {"invalid_utf8"}),
    "tombstone": (lambda: None, {"empty_value"}),
    "schema_version_true": (lambda: json.dumps(thumbs(schema_version=True)).encode(), {"schema_violation"}),
}


@pytest.mark.parametrize("name", list(POISON))
def test_a_poison_record_is_dead_lettered_and_the_partition_moves_on(settings, samples, name):
    make, reasons = POISON[name]
    poison = make()
    before, after = valid_records(samples, 20, seed=1), valid_records(samples, 20, seed=2)
    # one key: the poison and every valid record share a partition, so the valid ones after it must pass it
    produce(settings, before)
    produce(settings, [poison])  # type: ignore[list-item]
    produce(settings, after)
    with consumer_thread(settings):  # re-raises if the consumer died
        rows = wait_for_rows(settings, 40, timeout=60)
        dead = read_dlq(settings, 1, timeout=30)
    assert {r["event_id"] for r in rows} == {json.loads(v)["event_id"] for v in before + after}
    assert len(rows) == 40
    parked = list(read_parked(dead_letter_file(settings, "ingest")))
    assert len(dead) + len(parked) == 1, "the poison record is in the DLQ (or parked locally), once"
    headers = {k: v.decode() for k, v in dead[0].headers} if dead else {"dlq.reason": parked[0].reason}
    assert headers["dlq.reason"] in reasons, headers
    if dead and poison is not None and len(poison) > 900_000:
        assert headers["dlq.truncated"] == "true" and int(headers["dlq.original_size"]) == len(poison)
        assert len(dead[0].value) < len(poison)
    elif dead:
        assert (dead[0].value or None) == poison, "the DLQ keeps the original bytes"


def test_a_dead_letter_the_topic_refuses_is_parked_locally_and_the_partition_moves_on(settings, samples, tmp_path):
    """With truncation switched off, a 1.5 MB poison record is too large for the DLQ topic itself: it is retried
    a bounded number of times, then parked in the local dead-letter file, and the records after it land."""
    produce(settings, [b"x" * 1_500_000, *valid_records(samples, 30)])
    metrics = ConsumerMetrics()
    local = LocalDeadLetters(tmp_path / "parked.jsonl", counter=metrics.dead_letters_parked)
    dlq = KafkaDeadLetters(settings.kafka, local=local, max_value_bytes=10**9, retry_backoff_s=0.1)
    source = open_source(settings.kafka, poll_timeout_ms=200)
    sink = LakeSink(open_storage(settings.lake.uri, settings.lake))
    stop, commits = threading.Event(), {}
    t = threading.Thread(target=run_consumer, args=(source, lambda recs: validate_records(recs, QualityRules()),
                                                    sink, dlq),
                         kwargs={"commit_every": 100, "commit_interval_s": 0.3, "stop": stop, "metrics": metrics,
                                 "on_commit": commits.update})
    t.start()
    try:
        rows = wait_for_rows(settings, 30, timeout=60)
        deadline = time.monotonic() + 30
        while sum(commits.values()) < 31 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(30)
        source.close()
        dlq.close()
    assert len(rows) == 30 and sum(commits.values()) == 31, "every offset, the poison's included, is committed"
    [parked] = list(read_parked(tmp_path / "parked.jsonl"))
    assert parked.reason == "too_large" and parked.size == 1_500_000 and "MessageSizeTooLarge" in parked.detail
    assert parked.value == b"x" * 1_500_000 and parked.source["topic"] == settings.kafka.topic
    assert metrics.dead_letters_parked.labels("too_large")._value.get() == 1


def _load(url: str, secret: str, events: list[dict], rate: float, connections: int = 64
          ) -> list[tuple[float, float, int, str]]:
    """POST ``events`` at ``rate`` per second, open loop, over ``connections`` keep-alive HTTP/1.1 connections;
    returns (due, latency, status, event_id) per request. Latency counts from when the request was *due*, so
    time spent waiting for a free connection counts against the server (no coordinated omission). A plain
    asyncio client: httpx's pool costs O(pending requests) per request and saturated the test's own core."""
    host, port = url.removeprefix("http://").split(":")

    async def run() -> list[tuple[float, float, int, str]]:
        out: list[tuple[float, float, int, str]] = []
        queue: asyncio.Queue[tuple[float, str, bytes, str] | None] = asyncio.Queue()
        t0 = time.perf_counter()

        async def worker() -> None:
            reader, writer = await asyncio.open_connection(host, int(port))
            while (item := await queue.get()) is not None:
                due, path, body, eid = item
                writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {secret}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                             + body)
                await writer.drain()
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                out.append((due - t0, time.perf_counter() - due, status, eid))
            writer.close()

        workers = [asyncio.create_task(worker()) for _ in range(connections)]
        for i, ev in enumerate(events):
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            path = "/v1/turns" if ev["type"] == "turn" else "/v1/feedback"
            queue.put_nowait((due, path, json.dumps(ev).encode(), ev["event_id"]))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
        return out

    return asyncio.run(run())


def _p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def test_a_30s_broker_freeze_under_200_requests_a_second(settings, api_secret, samples, broker, tmp_path):
    """The API and the consumer run as processes, as deployed; the broker is frozen (SIGSTOP) for 30 s while
    200 requests/s arrive. The API spools at once, the consumer survives, every 202 lands exactly once."""
    rate, before_s, freeze_s, after_s = 200, 5.0, 30.0, 10.0
    events = list(example_traffic(samples, int(rate * (before_s + freeze_s + after_s)), seed=11))
    port = free_port()
    api = start_flywheel(settings, "serve", "--no-policy", "--port", str(port), log_path=tmp_path / "api.log",
                         FLYWHEEL_API__KEYS=json.dumps([k.model_dump() for k in settings.api.keys]),
                         FLYWHEEL_API__RATE_PER_S="100000", FLYWHEEL_API__RATE_BURST="100000")
    consumer = start_flywheel(settings, "ingest", log_path=tmp_path / "ingest.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        freeze = threading.Timer(before_s, broker.pause)
        thaw = threading.Timer(before_s + freeze_s, broker.resume)
        freeze.start()
        thaw.start()
        try:
            results = _load(url, api_secret, events, rate)
        finally:
            thaw.cancel()
            broker.resume()
        during = [lat for start, lat, _s, _e in results if before_s <= start < before_s + freeze_s]
        after = [lat for start, lat, _s, _e in results if start >= before_s + freeze_s]
        print(f"\nAPI latency at {rate} req/s: p99 {_p99(during) * 1000:.1f} ms during the {freeze_s:.0f} s freeze "
              f"({len(during)} requests, max {max(during) * 1000:.0f} ms), p99 {_p99(after) * 1000:.1f} ms after")
        accepted = {eid for _s, _l, status, eid in results if status == 202}
        assert [s for _s, _l, s, _e in results if s != 202] == []
        rows = wait_for_rows(settings, len(accepted), timeout=120)
        assert consumer.poll() is None, "the consumer must outlive the freeze"
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        for proc in (api, consumer):
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in (api, consumer)]
    ids = [r["event_id"] for r in rows]
    assert set(ids) == accepted and len(ids) == len(accepted) == len(events)
    assert 'flywheel_events_published_total{path="spool"}' in metrics
    assert codes[1] == 0 and codes[0] in (0, -signal.SIGTERM), codes  # uvicorn re-raises SIGTERM after a clean stop
    assert _p99(during) < 0.050, f"p99 during the freeze {_p99(during) * 1000:.1f} ms"


def test_a_kill_storm_leaves_the_group_consuming_and_the_lake_exact(settings, samples, tmp_path):
    """SIGKILL of `flywheel ingest` at random moments, 12 times while events are produced, restarting it each
    time: within 60 s of the last restart the lake holds exactly what was produced, once."""
    settings.ingest.commit_every, settings.ingest.max_poll_records = 500, 500
    records = valid_records(samples, 12_000, seed=21)
    rng = random.Random(5)

    producer = threading.Thread(target=produce_paced, args=(settings, records), kwargs={"every": 400, "pause_s": 0.5})
    producer.start()
    log_path = tmp_path / "ingest.log"
    storage = open_storage(settings.lake.uri, settings.lake)
    landed_at_kills = []
    for _ in range(12):
        proc = start_flywheel(settings, "ingest", log_path=log_path)
        time.sleep(rng.uniform(1.0, 8.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        landed_at_kills.append(len(lake_rows(storage)))
    producer.join()
    landed_before = len(lake_rows(storage))
    logged = log_path.stat().st_size
    proc = start_flywheel(settings, "-v", "ingest", log_path=log_path)  # -v: it logs when it starts consuming
    restarted = time.monotonic()
    try:
        rows = wait_for_rows(settings, len(records), timeout=60)
        took = time.monotonic() - restarted
        # a graceful stop needs a consumer that has started (its SIGTERM handler installed): on a loaded machine
        # the lake may be complete before the last restart has finished importing
        deadline = time.monotonic() + 60
        while b"consuming " not in log_path.read_bytes()[logged:] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    print(f"\nkill storm: {landed_before} rows before the last restart, all {len(records)} {took:.1f} s after it")
    ids = [r["event_id"] for r in rows]
    # the kills land mid-stream (on a fast machine the lake may be complete before the last restart)
    assert any(0 < n < len(records) for n in landed_at_kills), landed_at_kills
    assert len(set(ids)) == len(records), f"only {len(set(ids))} of {len(records)} within 60 s of the last restart"
    assert len(ids) == len(records), "duplicated rows"
    assert set(ids) == {json.loads(v)["event_id"] for v in records}


def test_a_second_consumer_joins_mid_stream_and_the_revoke_commits(settings, samples, kafka_client):
    records = valid_records(samples, 6_000, seed=31)
    storage = open_storage(settings.lake.uri, settings.lake)

    def member(commit_interval_s: float, flush_when_idle: bool = True) -> tuple[Any, threading.Event, threading.Thread, list[BaseException]]:
        source = open_source(settings.kafka, client=kafka_client, poll_timeout_ms=200, max_poll_records=200)
        dlq, stop, errors = KafkaDeadLetters(settings.kafka), threading.Event(), []

        def target() -> None:
            try:
                run_consumer(source, lambda recs: validate_records(recs, QualityRules()), LakeSink(storage), dlq,
                             commit_every=100_000, commit_interval_s=commit_interval_s, stop=stop,
                             flush_when_idle=flush_when_idle)
            except BaseException as e:
                errors.append(e)
            finally:
                source.close()
                dlq.close()

        t = threading.Thread(target=target, daemon=True)
        t.start()
        return source, stop, t, errors

    # the first member commits only on revoke (and at the end), so it has work in hand when the second joins
    first = member(commit_interval_s=3600, flush_when_idle=False)
    production = threading.Thread(target=produce_paced, args=(settings, records), kwargs={"every": 100, "pause_s": 0.25})
    production.start()
    deadline = time.monotonic() + 60
    while not first[0].assignment() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2)  # the first member is consuming
    second = member(commit_interval_s=0.5)  # joins while the first is consuming: the group rebalances
    try:
        deadline = time.monotonic() + 30
        while not (first[0].revoke_commits and second[0].assignment()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assigned = (first[0].assignment(), second[0].assignment())
        revoked_with = list(first[0].revoke_commits)
        first[1].set()  # the first member leaves; its close hands its partitions over the same way
        first[2].join(30)
        production.join()
        rows = wait_for_rows(settings, len(records), timeout=90)
    finally:
        for _source, stop, t, _errors in (first, second):
            stop.set()
            t.join(30)
    assert first[3] == [] and second[3] == [], "a member failed (e.g. a blocking commit in the rebalance listener)"
    assert revoked_with and sum(revoked_with[0].values()) > 0, \
        "the first member committed its offsets (work in hand) when the rebalance revoked its partitions"
    assert all(assigned), f"both members hold partitions after the rebalance: {assigned}"
    ids = [r["event_id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(records)
    assert set(ids) == {json.loads(v)["event_id"] for v in records}


def test_an_oversized_event_over_http_is_413_and_the_events_after_it_land(settings, api_secret, samples):
    events = list(example_traffic(samples, 40, seed=41))
    # every field within the contract's limits (100,000 characters a text), 1.2 MB in all: over the record limit
    turn = next(e for e in events if e["type"] == "turn")
    big = turn | {"event_id": str(uuid.uuid4()),
                  "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "y" * 30_000}
                               for i in range(40)]}
    with consumer_thread(settings), BackgroundServer(create_app(settings), port=free_port()) as srv:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {api_secret}"}, timeout=30) as c:
            r = c.post("/v1/turns", json=big)
            assert r.status_code == 413, r.text
            assert r.json()["error"] == "event_too_large" and "1000000 bytes" in r.json()["message"]
            codes = [c.post("/v1/turns" if e["type"] == "turn" else "/v1/feedback", json=e).status_code
                     for e in events]
            rows = wait_for_rows(settings, len(events), timeout=60)
    assert codes == [202] * len(events)
    assert {r["event_id"] for r in rows} == {e["event_id"] for e in events}


def test_an_undeliverable_spooled_record_is_set_aside_and_the_records_behind_it_land(settings, api_secret, samples):
    """A spool left behind with a record no broker will take (here 1.2 MB, over the producer's 1 MiB request
    limit) in front of valid ones: the drainer parks it with its reason and delivers the rest."""
    events = list(example_traffic(samples, 30, seed=51))
    spool = Spool(settings.api.spool_dir, settings.api.spool_max_bytes)
    spool.append([(b"c-big", b"z" * 1_200_000)])
    spool.append([(e["conversation_id"].encode(), json.dumps(e).encode()) for e in events])
    spool.close()
    with consumer_thread(settings), BackgroundServer(create_app(settings), port=free_port()):
        rows = wait_for_rows(settings, len(events), timeout=60)
    assert {r["event_id"] for r in rows} == {e["event_id"] for e in events}
    [parked] = list(read_parked(Path(settings.ingest.dead_letter_dir) / "spool.jsonl"))
    assert parked.reason == "MSG_SIZE_TOO_LARGE" and parked.size == 1_200_000
    assert parked.source["spool_segment"].startswith("segment-")
    assert Spool(settings.api.spool_dir, settings.api.spool_max_bytes).is_empty()


def test_the_drainer_backs_off_while_the_broker_is_frozen(settings, broker, monkeypatch):
    from ingest import producer as producer_module
    from ingest.producer import EventPublisher

    probes: list[float] = []
    real = producer_module.broker_reachable
    monkeypatch.setattr(producer_module, "broker_reachable",
                        lambda *a, **kw: probes.append(time.monotonic()) or real(*a, **kw))
    spool = Spool(settings.api.spool_dir, settings.api.spool_max_bytes)
    spool.append([(b"k", json.dumps(thumbs()).encode())])
    publisher = EventPublisher(settings.kafka, spool, drain_interval_s=0.1).start()
    broker.pause()
    try:
        time.sleep(8)
    finally:
        broker.resume()
    deadline = time.monotonic() + 30
    while not spool.is_empty() and time.monotonic() < deadline:
        time.sleep(0.1)
    publisher.close()
    assert spool.is_empty(), "drained once the broker answered again"
    # 0.1 s doubling to 5 s, each probe itself waiting up to 1 s: a handful of probes in 8 s, not thousands
    assert len(probes) <= 12, f"{len(probes)} probes in 8 s: the drainer is spinning"


def test_acks_are_served_on_the_event_loop_that_waits_for_them_and_a_thread_after_it(settings):
    """While requests wait for acks, their event loop serves the producer's delivery reports itself (no GIL
    switch to a report thread and back per request); once no loop waits, the report thread serves a
    blocking send again. Every event is acknowledged by the real broker either way."""
    from flywheel.events import validate_event
    from ingest.producer import ConfluentProducer, EventPublisher

    served_on: list[int] = []
    real = ConfluentProducer.send_many

    def spy(self, topic, records, done):
        def noted(error):
            served_on.append(threading.get_ident())
            done(error)

        return real(self, topic, records, noted)

    publisher = EventPublisher(settings.kafka, Spool(settings.api.spool_dir, settings.api.spool_max_bytes))
    publisher.start(wait_connected_s=10)
    try:
        ConfluentProducer.send_many = spy  # type: ignore[method-assign]
        events = [validate_event(thumbs(conversation_id=f"c{i}")) for i in range(400)]

        async def burst() -> tuple[int, list[str]]:
            await publisher.publish_async(events[:1])  # the producer's first ack (its producer id) out of the way
            served_on.clear()
            return threading.get_ident(), await asyncio.gather(*(publisher.publish_async([e]) for e in events[1:]))

        loop_thread, paths = asyncio.run(burst())
        assert paths == ["broker"] * 399
        on_loop = served_on.count(loop_thread)
        assert on_loop >= 0.9 * len(served_on), f"{len(served_on) - on_loop} of {len(served_on)} acks via the report thread"
        time.sleep(0.1)  # no loop waits any more
        assert publisher.publish([validate_event(thumbs())]) == "broker"
    finally:
        ConfluentProducer.send_many = real  # type: ignore[method-assign]
        publisher.close()


def test_a_frozen_broker_is_noticed_by_a_loop_too_busy_to_tick_on_time(settings, broker):
    """Every tick of a saturated loop is late; the stall check still runs (at most one deadline late), so the
    requests go to the spool instead of waiting for librdkafka's 30 s message timeout."""
    from flywheel.events import validate_event
    from ingest.producer import EventPublisher

    publisher = EventPublisher(settings.kafka, Spool(settings.api.spool_dir, settings.api.spool_max_bytes))
    publisher.start(wait_connected_s=10)

    async def frozen_and_busy() -> tuple[list[str], float]:
        await publisher.publish_async([validate_event(thumbs())])  # warmed up: acks observed
        loop, busy = asyncio.get_running_loop(), [True]

        def hog() -> None:  # 15 ms of work per loop iteration: every 1 ms tick comes over 10 ms late
            time.sleep(0.015)
            if busy[0]:
                loop.call_soon(hog)

        broker.pause()
        loop.call_soon(hog)
        started = time.monotonic()
        try:
            paths = await asyncio.wait_for(asyncio.gather(
                *(publisher.publish_async([validate_event(thumbs(conversation_id=f"c{i}"))]) for i in range(20))), 20)
        finally:
            busy[0] = False
        return paths, time.monotonic() - started

    try:
        paths, took = asyncio.run(frozen_and_busy())
    finally:
        broker.resume()
        publisher.close()
    assert paths == ["spool"] * 20
    assert took < 3, f"the stalled requests waited {took:.1f} s (publish_timeout_s is 0.25 s)"


def test_the_same_event_id_in_different_hours_gives_one_row(settings, api_secret):
    eid = str(uuid.uuid4())
    now = datetime.now(UTC)
    first = thumbs(event_id=eid, occurred_at=(now - timedelta(hours=2)).isoformat())
    retry = thumbs(event_id=eid, occurred_at=now.isoformat())  # e.g. the server stamped it at the retry
    other = thumbs()
    with consumer_thread(settings), BackgroundServer(create_app(settings), port=free_port()) as srv:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {api_secret}"}, timeout=30) as c:
            assert c.post("/v1/feedback", json=first).status_code == 202
            wait_for_rows(settings, 1, timeout=60)
            assert c.post("/v1/feedback", json=retry).status_code == 202
            assert c.post("/v1/feedback", json=other).status_code == 202
            rows = wait_for_rows(settings, 2, timeout=60)
            time.sleep(2 * settings.ingest.commit_interval_s + 1)  # the retry's flush has happened too
            rows = lake_rows(open_storage(settings.lake.uri, settings.lake))
    assert sorted(r["event_id"] for r in rows) == sorted([eid, other["event_id"]])


def test_a_full_spool_disk_is_503_with_retry_after_and_nothing_half_written(settings, api_secret, broker,
                                                                              monkeypatch):
    """Broker frozen and the spool's disk full (ENOSPC on write): the API refuses with 503 + Retry-After
    instead of a 202 it could not keep; once the disk has room again the same event is accepted and lands."""
    import os as os_module

    real_fsync = os_module.fsync
    disk_full = threading.Event()

    def fsync(fd):
        if disk_full.is_set():
            raise OSError(28, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os_module, "fsync", fsync)
    event = thumbs()
    with consumer_thread(settings), BackgroundServer(create_app(settings), port=free_port()) as srv:
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {api_secret}"}, timeout=30) as c:
            broker.pause()
            try:
                disk_full.set()
                r = c.post("/v1/feedback", json=event)
                assert r.status_code == 503, r.text
                assert r.json()["error"] == "unavailable" and "No space" in r.json()["message"]
                assert int(r.headers["retry-after"]) > 0
                disk_full.clear()
                r = c.post("/v1/feedback", json=event)  # the client's retry, same event_id
                assert r.status_code == 202 and r.json()["durable"] == "spool"
            finally:
                broker.resume()
            rows = wait_for_rows(settings, 1, timeout=60)
    assert [r["event_id"] for r in rows] == [event["event_id"]]


def test_manual_assignment_consumes_every_partition_and_resumes_from_its_commits(settings, samples, kafka_client):
    """FLYWHEEL_INGEST__ASSIGNMENT=manual: one consumer takes every partition without joining the group and
    commits under the group id; a restart starts from those commits."""
    from kafka import KafkaConsumer, TopicPartition

    settings.ingest.assignment, settings.ingest.client = "manual", kafka_client
    first, second = valid_records(samples, 300, seed=61), valid_records(samples, 300, seed=62)
    for i, v in enumerate(first):
        produce(settings, [v], key=str(i % 7).encode())
    with consumer_thread(settings):
        assert len(wait_for_rows(settings, 300, timeout=60)) == 300
    probe = KafkaConsumer(**settings.kafka.client_config(), group_id=settings.kafka.group_id,
                          enable_auto_commit=False)
    committed = sum(probe.committed(TopicPartition(settings.kafka.topic, p)) or 0 for p in range(3))
    probe.close()
    assert committed == 300, "every offset is committed under the group id"
    produce(settings, second)
    from prometheus_client import CollectorRegistry

    from ingest.service import run_ingest

    registry, stop = CollectorRegistry(), threading.Event()
    t = threading.Thread(target=run_ingest, args=(settings, stop), kwargs={"registry": registry}, daemon=True)
    t.start()
    try:
        rows = wait_for_rows(settings, 600, timeout=60)
    finally:
        stop.set()
        t.join(30)
    assert len(rows) == len({r["event_id"] for r in rows}) == 600
    assert registry.get_sample_value("flywheel_ingest_records_in_total") == 300, "resumed from the commits"
