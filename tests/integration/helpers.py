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
