"""Consumer throughput: ``flywheel ingest``'s loop vs a bare kafka-python consume loop, same topic, same run.

    .venv/bin/python bench/ingest.py [--events 60000] [--partitions 4] [--rounds 2]

Starts an embedded Tansu broker, produces ``--events`` realistic JSON events (all six types, built from
ShareGPT prompts) once, then, alternating, consumes the whole topic with

- the baseline: a bare ``KafkaConsumer`` in a fresh group that only touches each record's value;
- ours: ``run_ingest`` in a fresh group (decode, pydantic + pandera validation, Parquet lake writes, offset
  commits), finished when every event is durably in the lake.

Both are timed from the first record polled to the last record consumed (baseline) or committed (ours),
so the group-join delay, the same for both, is left out; it is printed separately. Target: ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# This file is bench/ingest.py: keep its folder off sys.path so `import ingest` finds the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from prometheus_client import CollectorRegistry  # noqa: E402

from flywheel.app.stack import ensure_topics, free_port, start_broker  # noqa: E402
from flywheel.app.traffic import example_traffic  # noqa: E402
from flywheel.settings import Settings  # noqa: E402
from ingest.service import run_ingest  # noqa: E402
from pipelines.sharegpt import chat_samples  # noqa: E402


def produce(settings: Settings, n: int) -> int:
    from kafka import KafkaProducer

    producer = KafkaProducer(**settings.kafka.client_config(), acks="all", linger_ms=5, batch_size=256 * 1024)
    nbytes = 0
    for ev in example_traffic(chat_samples(500), n, seed=7):
        value = json.dumps(ev).encode()
        nbytes += len(value)
        producer.send(settings.kafka.topic, key=ev["event_id"].encode(), value=value)
    producer.flush(120)
    producer.close()
    return nbytes


def bare_consume(settings: Settings, n: int) -> tuple[float, float]:
    """(join seconds, consume seconds) of a bare consumer group reading ``n`` records."""
    from kafka import KafkaConsumer

    k = settings.kafka
    consumer = KafkaConsumer(k.topic, **k.client_config(), group_id=f"bare-{uuid.uuid4().hex[:8]}",
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms,
                             max_poll_records=settings.ingest.max_poll_records)
    started = time.perf_counter()
    first = None
    seen = 0
    total_bytes = 0
    while seen < n:
        for recs in consumer.poll(timeout_ms=settings.ingest.poll_timeout_ms).values():
            if first is None:
                first = time.perf_counter()
            for r in recs:
                total_bytes += len(r.value)
            seen += len(recs)
    done = time.perf_counter()
    consumer.close()
    assert first is not None and total_bytes > 0
    return first - started, done - first


def flywheel_consume(settings: Settings, n: int, home: Path) -> tuple[float, float]:
    """(join seconds, consume-to-durable seconds) of ``run_ingest`` in a fresh group and a fresh lake."""
    s = settings.model_copy(deep=True)
    s.kafka.group_id = f"ingest-{uuid.uuid4().hex[:8]}"
    s.lake.uri = (home / f"lake-{s.kafka.group_id}").as_uri()
    registry = CollectorRegistry()
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_ingest(s, stop, registry=registry)
        except BaseException as e:
            errors.append(e)

    started = time.perf_counter()
    t = threading.Thread(target=target)
    t.start()
    first = None
    while True:
        if errors:
            raise errors[0]
        got_in = registry.get_sample_value("flywheel_ingest_records_in_total") or 0
        written = registry.get_sample_value("flywheel_ingest_records_written_total") or 0
        if first is None and got_in > 0:
            first = time.perf_counter()
        if written >= n:
            break
        time.sleep(0.02)
    done = time.perf_counter()
    stop.set()
    t.join(60)
    assert first is not None
    return first - started, done - first


def stage_costs(settings: Settings, n: int, home: Path) -> dict[str, float]:
    """Microseconds per event of each stage of our loop, on the topic's own records, without the broker."""
    from kafka import KafkaConsumer

    from flywheel.storage import LocalStorage
    from ingest.consumer import Record, validate_records
    from ingest.lake import LakeSink
    from ingest.validation import QualityRules

    k = settings.kafka
    consumer = KafkaConsumer(k.topic, **k.client_config(), group_id=None, auto_offset_reset="earliest",
                             enable_auto_commit=False)
    records: list[Record] = []
    while len(records) < n:
        for recs in consumer.poll(timeout_ms=500).values():
            records.extend(Record(r.topic, r.partition, r.offset, r.key, r.value) for r in recs)
    consumer.close()
    t0 = time.perf_counter()
    verdicts = validate_records(records, QualityRules())
    t1 = time.perf_counter()
    sink = LakeSink(LocalStorage(home / "stage-lake"))
    for i in range(0, len(verdicts), 2_000):  # flushes of the size the consumer commits
        for record, event in verdicts[i:i + 2_000]:
            sink.add(event, record.topic, record.partition, record.offset)
        sink.flush()
    t2 = time.perf_counter()
    return {"decode + validate": (t1 - t0) / n * 1e6, "lake sink (Parquet, dedupe, fsync)": (t2 - t1) / n * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        broker = start_broker(free_port(), home / "tansu.log")
        try:
            settings = Settings(home=home, kafka={"bootstrap_servers": broker.bootstrap, "topic": "bench.events",
                                                  "dlq_topic": "bench.dlq", "partitions": args.partitions})
            ensure_topics(settings.kafka)
            t0 = time.perf_counter()
            nbytes = produce(settings, args.events)
            print(f"produced {args.events:,} events ({nbytes / args.events:.0f} B avg) "
                  f"in {time.perf_counter() - t0:.1f}s; {args.partitions} partitions")
            bare, ours = [], []
            for r in range(args.rounds):
                jb, tb = bare_consume(settings, args.events)
                jo, to = flywheel_consume(settings, args.events, home)
                bare.append(args.events / tb)
                ours.append(args.events / to)
                print(f"round {r + 1}: bare {bare[-1]:>9,.0f} ev/s (join {jb:.1f}s)   "
                      f"flywheel ingest {ours[-1]:>9,.0f} ev/s (join {jo:.1f}s)")
            b, o = statistics.median(bare), statistics.median(ours)
            print(f"\nbare kafka-python consume loop : {b:>9,.0f} events/s")
            print(f"flywheel ingest (to durable lake): {o:>9,.0f} events/s")
            print(f"ratio ours / bare              : {o / b:.2f}   (target >= 0.80)")
            print(f"\nper event: bare consume loop {1e6 / b:.1f} us; our stages on top of it:")
            for stage, us in stage_costs(settings, args.events, home).items():
                print(f"  {stage:36s} {us:6.1f} us")
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
