"""Consumer throughput: ``flywheel ingest``'s loop vs a bare kafka-python consume loop and vs a quixstreams
pipeline doing the same work, same topic, same run.

    .venv/bin/python bench/ingest.py [--events 60000] [--partitions 4] [--rounds 2] [--no-peer]

Starts an embedded Tansu broker, produces ``--events`` realistic JSON events (all six types, built from
ShareGPT prompts) once, then, alternating, consumes the whole topic with

- the baseline: a bare kafka-python ``KafkaConsumer`` in a fresh group that only touches each record's value
  (also printed, not a target: the same bare loop with confluent-kafka, the client ``flywheel ingest`` uses
  by default);
- ours: ``run_ingest`` in a fresh group (decode and validate column-wise, the models for what the fast path
  is unsure of, Parquet lake writes, offset commits), finished when every event is durably in the lake.

- the peer: a quixstreams ``Application`` (confluent-kafka underneath) in a fresh group that decodes and validates
  each record with the same event contract and writes Parquet with its ``LocalFileSink``, committing as it goes
  (``bench/peers/quix_ingest.py``, run in its own virtual environment under ``.bench-venvs/``, created on the
  first run: quixstreams pins pydantic and confluent-kafka versions the project does not use).

All are timed from the first record polled to the last record consumed (baseline) or committed (ours, the
peer), so the group-join delay is left out; it is printed separately. Targets: ours >= 0.5x the bare loop and
>= 1.5x the peer; event -> lake latency at a steady 1,000 events/s: p99 <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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


def bare_confluent_consume(settings: Settings, n: int) -> tuple[float, float]:
    """(join seconds, consume seconds) of a bare confluent-kafka consumer group reading ``n`` records: the
    limit of the client our loop uses by default (``ingest.client``)."""
    from confluent_kafka import Consumer

    k = settings.kafka
    consumer = Consumer({"bootstrap.servers": k.bootstrap_servers, "group.id": f"bare-ck-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest",
                         "session.timeout.ms": k.session_timeout_ms, "heartbeat.interval.ms": k.heartbeat_interval_ms})
    consumer.subscribe([k.topic])
    started = time.perf_counter()
    first = None
    seen = total_bytes = 0
    while seen < n:
        messages = consumer.consume(settings.ingest.max_poll_records, settings.ingest.poll_timeout_ms / 1000)
        if messages and first is None:
            first = time.perf_counter()
        for m in messages:
            if m.error() is None:
                total_bytes += len(m.value() or b"")
                seen += 1
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


ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = ROOT / ".bench-venvs" / "quixstreams"
PEER_PACKAGES = ["quixstreams==3.28.1", "pyarrow"]


def peer_python() -> Path:
    """The quixstreams environment's interpreter, created (about a minute, from PyPI) when missing."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEER_VENV} for the quixstreams peer ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *PEER_PACKAGES], check=True)
    return python


def peer_consume(settings: Settings, n: int, home: Path) -> tuple[float, float]:
    """(join seconds, consume-to-committed seconds) of the quixstreams pipeline in a fresh group."""
    out = home / f"quix_{uuid.uuid4().hex[:8]}"  # its sink takes letters, digits, dots and underscores only
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(peer_python()), str(ROOT / "bench" / "peers" / "quix_ingest.py"),
                        settings.kafka.bootstrap_servers, settings.kafka.topic, str(n), str(out)],
                       capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"the quixstreams peer failed: {r.stderr[-3000:]}")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if result["events"] < n:
        raise RuntimeError(f"the quixstreams peer read {result['events']} of {n} records")
    return result["join_s"], result["seconds"]


def freshness(settings: Settings, home: Path, rate: int = 1_000, seconds: float = 20.0) -> tuple[float, float]:
    """(p50, p99) seconds from the send of an event to its row in the lake, at a steady ``rate`` events/s into
    a running ``flywheel ingest`` (its default commit settings). The lake is watched every 50 ms."""
    import io

    import pyarrow.parquet as pq
    from kafka import KafkaProducer

    from flywheel.storage import LocalStorage

    s = settings.model_copy(deep=True)
    s.kafka.topic, s.kafka.group_id = f"fresh.{uuid.uuid4().hex[:6]}", f"fresh-{uuid.uuid4().hex[:6]}"
    s.lake.uri = (home / f"lake-{s.kafka.group_id}").as_uri()
    ensure_topics(s.kafka)
    events = list(example_traffic(chat_samples(500), int(rate * seconds), seed=11))
    stop = threading.Event()
    consumer = threading.Thread(target=run_ingest, args=(s, stop), kwargs={"registry": CollectorRegistry()})
    consumer.start()
    producer = KafkaProducer(**s.kafka.client_config(), acks="all", linger_ms=5)
    sent: dict[str, float] = {}
    landed: dict[str, float] = {}
    storage = LocalStorage(home / f"lake-{s.kafka.group_id}")
    seen_files: set[str] = set()

    def watch() -> None:
        while not stop.is_set() or len(landed) < len(events):
            now = time.perf_counter()
            for key in storage.list(""):  # the event tables and the quarantine area (held events land there)
                if key.endswith(".parquet") and not key.startswith("_index/") and key not in seen_files:
                    seen_files.add(key)
                    for eid in pq.read_table(io.BytesIO(storage.get_bytes(key)), columns=["event_id"]).column(0).to_pylist():
                        landed.setdefault(eid, now)
            if time.perf_counter() - t_end > 60:
                return
            time.sleep(0.05)

    time.sleep(5)  # the consumer joins its group before the load starts
    t_end = time.perf_counter() + seconds + 60
    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    for i, ev in enumerate(events):
        due = start + i / rate
        while time.perf_counter() < due:
            time.sleep(0.0005)
        sent[ev["event_id"]] = time.perf_counter()
        producer.send(s.kafka.topic, key=ev["event_id"].encode(), value=json.dumps(ev).encode())
    producer.flush(30)
    producer.close()
    deadline = time.perf_counter() + 60
    while len(landed) < len(events) and time.perf_counter() < deadline:
        time.sleep(0.1)
    stop.set()
    consumer.join(60)
    watcher.join(70)
    lags = sorted(landed[e] - sent[e] for e in sent if e in landed)
    if len(lags) < len(events):
        raise RuntimeError(f"{len(events) - len(lags)} of {len(events)} events never reached the lake")
    return lags[len(lags) // 2], lags[int(len(lags) * 0.99)]


def stage_costs(settings: Settings, n: int, home: Path) -> dict[str, float]:
    """Microseconds per event of each stage of our loop, on the topic's own records, without the broker."""
    from kafka import KafkaConsumer

    from flywheel.storage import LocalStorage
    from ingest.consumer import Record, handle_batch
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
    step = settings.ingest.batch_records  # the batches the consumer gathers under load
    t0 = time.perf_counter()
    polls = [handle_batch(records[i:i + step], QualityRules()) for i in range(0, len(records), step)]
    t1 = time.perf_counter()
    sink = LakeSink(LocalStorage(home / "stage-lake"))
    every = max(1, settings.ingest.commit_every // step)
    for i in range(0, len(polls), every):  # flushes of the size the consumer commits under load
        for handled in polls[i:i + every]:
            for event_type, table in handled.tables.items():
                sink.add_table(event_type, table)
            for record, event in handled.verdicts:
                sink.add(event, record.topic, record.partition, record.offset)  # type: ignore[arg-type]
        sink.flush()
    t2 = time.perf_counter()
    return {"decode + validate": (t1 - t0) / n * 1e6, "lake sink (Parquet, dedupe, fsync)": (t2 - t1) / n * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=60_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true", help="skip the quixstreams peer (needs PyPI on first run)")
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
            bare, bare_ck, ours, peer = [], [], [], []
            for r in range(args.rounds):
                jb, tb = bare_consume(settings, args.events)
                _, tc = bare_confluent_consume(settings, args.events)
                jo, to = flywheel_consume(settings, args.events, home)
                bare.append(args.events / tb)
                bare_ck.append(args.events / tc)
                ours.append(args.events / to)
                line = (f"round {r + 1}: bare {bare[-1]:>9,.0f} ev/s (join {jb:.1f}s)   bare confluent "
                        f"{bare_ck[-1]:>9,.0f} ev/s   flywheel ingest {ours[-1]:>9,.0f} ev/s (join {jo:.1f}s)")
                if not args.no_peer:
                    jp, tp = peer_consume(settings, args.events, home)
                    peer.append(args.events / tp)
                    line += f"   quixstreams {peer[-1]:>9,.0f} ev/s (join {jp:.1f}s)"
                print(line, flush=True)
            b, o = statistics.median(bare), statistics.median(ours)
            print(f"\nbare kafka-python consume loop   : {b:>9,.0f} events/s")
            print(f"bare confluent-kafka consume loop: {statistics.median(bare_ck):>9,.0f} events/s   "
                  f"(our client's own limit)")
            if peer:
                print(f"quixstreams pipeline (the peer)  : {statistics.median(peer):>9,.0f} events/s")
            print(f"flywheel ingest (to durable lake): {o:>9,.0f} events/s")
            print(f"ratio ours / bare                : {o / b:.2f}   (target >= 0.5)")
            if peer:
                print(f"ratio ours / quixstreams         : {o / statistics.median(peer):.2f}   (target >= 1.5)")
            p50, p99 = freshness(settings, home)
            print(f"event -> lake at a steady 1,000 events/s: p50 {p50:.2f}s, p99 {p99:.2f}s   (target p99 <= 5 s)")
            print(f"\nper event: bare consume loop {1e6 / b:.1f} us; our stages on top of it:")
            for stage, us in stage_costs(settings, args.events, home).items():
                print(f"  {stage:36s} {us:6.1f} us")
        finally:
            broker.stop()


if __name__ == "__main__":
    main()
