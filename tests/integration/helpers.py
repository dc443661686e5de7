"""Helpers for the end-to-end tests: run the consumer, read the lake back, read the DLQ."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow.parquet as pq

from flywheel.events import EVENT_TYPES
from flywheel.settings import Settings
from flywheel.storage import Storage, open_storage
from ingest.lake import held_reasons, list_files
from ingest.service import run_ingest


@contextmanager
def consumer_thread(settings: Settings) -> Iterator[threading.Event]:
    stop = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_ingest(settings, stop)
        except BaseException as e:  # surface consumer crashes in the test
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    try:
        yield stop
    finally:
        stop.set()
        t.join(30)
    if errors:
        raise errors[0]


def lake_rows(storage: Storage) -> list[dict[str, Any]]:
    """Every physical row in the lake (no de-duplication), with its type and, for events a consumer-path
    filter held back (written to the quarantine area), the reason."""
    rows = []
    for held in [None, *held_reasons(storage)]:
        for t in EVENT_TYPES:
            for key in list_files(storage, t, held=held):
                table = pq.read_table(io.BytesIO(storage.get_bytes(key)), columns=["event_id", "type"])
                rows.extend({**r, "held": held} for r in table.to_pylist())
    return rows


def wait_for_rows(settings: Settings, n: int, timeout: float = 120.0) -> list[dict[str, Any]]:
    storage = open_storage(settings.lake.uri, settings.lake)
    deadline = time.monotonic() + timeout
    rows = lake_rows(storage)
    while len({r["event_id"] for r in rows}) < n and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = lake_rows(storage)
    return rows


def read_dlq(settings: Settings, n: int, timeout: float = 30.0) -> list[Any]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(settings.kafka.dlq_topic, **settings.kafka.client_config(),
                             auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            for recs in consumer.poll(300).values():
                out.extend(recs)
    finally:
        consumer.close()
    return out


def produce_raw(settings: Settings, values: list[bytes], key: bytes | None = b"k") -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(**settings.kafka.client_config(), acks="all")
    for v in values:
        producer.send(settings.kafka.topic, key=key, value=v)
    producer.flush(30)
    producer.close()


def flywheel_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that points a ``flywheel`` subprocess at this test's broker, topics, group and home."""
    import os

    return {**os.environ, "FLYWHEEL_HOME": str(settings.home),
            "FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "FLYWHEEL_KAFKA__TOPIC": settings.kafka.topic, "FLYWHEEL_KAFKA__DLQ_TOPIC": settings.kafka.dlq_topic,
            "FLYWHEEL_KAFKA__GROUP_ID": settings.kafka.group_id, "FLYWHEEL_LAKE__URI": settings.lake.uri,
            "FLYWHEEL_INGEST__COMMIT_INTERVAL_S": str(settings.ingest.commit_interval_s),
            "FLYWHEEL_INGEST__COMMIT_EVERY": str(settings.ingest.commit_every),
            "FLYWHEEL_INGEST__MAX_POLL_RECORDS": str(settings.ingest.max_poll_records), **extra}


def start_flywheel(settings: Settings, *args: str, log_path: Any = None, **extra: str) -> Any:
    """``python -m flywheel.app.cli <args>`` as a subprocess of this test (stdout/stderr to ``log_path``)."""
    import subprocess
    import sys

    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    return subprocess.Popen([sys.executable, "-m", "flywheel.app.cli", *args], env=flywheel_env(settings, **extra),
                            stdout=out, stderr=subprocess.STDOUT)
