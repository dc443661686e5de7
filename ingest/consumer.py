"""The one consumer loop: Kafka -> validation -> event lake, at-least-once delivery, exactly-once rows.

    poll -> decode (bad bytes -> DLQ with reason) -> validate (pydantic per record, pandera per batch)
         -> screen (consumer-path abuse filters: blocked accounts, harmful or empty corrections)
         -> valid records to the lake sink (held ones to its quarantine area), invalid ones to the DLQ
         -> every ``commit_every`` records or ``commit_interval_s`` seconds:
            flush the sink (durable) -> flush the DLQ producer (acked) -> commit offsets

Offsets are committed only after both flushes returned, so a crash at any point replays records that may
already be in the lake; the sink drops them by ``event_id`` (see ``ingest.lake``). An unexpected exception
(storage down, DLQ not acknowledging) ends the loop *without* committing; the process exits non-zero and
its supervisor restarts it. Bad data never raises: it becomes a dead-letter record whose value is the
original bytes and whose headers carry the reason and the source topic/partition/offset.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram

from flywheel.events import EventDecodeError, decode_event
from flywheel.settings import KafkaSettings
from ingest.validation import QualityRules, check_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int = -1


@dataclass(frozen=True)
class Rejected:
    reason: str
    detail: str


@dataclass(frozen=True)
class Held:
    """A valid event that a consumer-path filter holds back: it goes to the lake's quarantine area."""

    event: Any
    reason: str


Verdict = Any  # an event model, Held, or Rejected
Handler = Callable[[list[Record]], list[tuple[Record, Verdict]]]


class Source(Protocol):
    def poll(self) -> list[Record]: ...
    def commit(self, offsets: dict[tuple[str, int], int]) -> None: ...
    def on_rebalance(self, revoked: Callable[[], None], assigned: Callable[[], None]) -> None: ...


class Sink(Protocol):
    def add(self, event: Any, topic: str, partition: int, offset: int, held: str | None = None) -> None: ...
    def flush(self) -> Any: ...
    def reset_index(self) -> None: ...


class DeadLetterSink(Protocol):
    def send(self, record: Record, reason: str, detail: str) -> None: ...
    def flush(self) -> None: ...


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = registry or CollectorRegistry()
        self.registry = r
        self.records_in = Counter("flywheel_ingest_records_in_total", "Records polled", registry=r)
        self.written = Counter("flywheel_ingest_records_written_total", "Rows written to the lake", registry=r)
        self.duplicates = Counter("flywheel_ingest_duplicates_dropped_total",
                                  "Records dropped because their event_id is already in the lake", registry=r)
        self.replayed = Counter("flywheel_ingest_replayed_total",
                                "Rows rewritten in place after an offset replay (same file, not duplicated)",
                                registry=r)
        self.held = Counter("flywheel_ingest_held_total", "Valid events held back by a consumer-path filter",
                            ["reason"], registry=r)
        self.dead_lettered = Counter("flywheel_ingest_dead_lettered_total", "Records sent to the DLQ",
                                     ["reason"], registry=r)
        self.commit_latency = Histogram("flywheel_ingest_commit_seconds",
                                        "Flush sink + flush DLQ + commit offsets",
                                        buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.commits = Counter("flywheel_ingest_commits_total", "Offset commits", registry=r)


def validate_records(records: list[Record], rules: QualityRules, now: datetime | None = None,
                     screen: Callable[[Any], str | None] | None = None) -> list[tuple[Record, Verdict]]:
    """Decode and validate one poll's records; ``screen`` (see ``ingest.filters.StreamScreen``) gives the
    reason a valid event is held back, or ``None``. Never raises on bad data."""
    out: list[tuple[Record, Verdict]] = []
    decoded: list[tuple[int, Any]] = []
    for record in records:
        if record.value is None:
            out.append((record, Rejected("empty_value", "record has no value (tombstone)")))
            continue
        try:
            event = decode_event(record.value)
        except EventDecodeError as e:
            out.append((record, Rejected(e.reason, e.detail)))
            continue
        decoded.append((len(out), event))
        out.append((record, event))
    verdicts = check_batch([e for _, e in decoded], rules, now or datetime.now(UTC))
    for (i, event), verdict in zip(decoded, verdicts, strict=True):
        if verdict is not None:
            out[i] = (out[i][0], Rejected(*verdict))
        elif screen is not None and (reason := screen(event)) is not None:
            out[i] = (out[i][0], Held(event, reason))
    return out


def run_consumer(
    source: Source,
    handle: Handler,
    sink: Sink,
    dlq: DeadLetterSink,
    *,
    commit_every: int,
    commit_interval_s: float,
    stop: threading.Event,
    metrics: ConsumerMetrics | None = None,
    on_commit: Callable[[dict[tuple[str, int], int]], None] | None = None,
) -> None:
    """Run until ``stop`` is set; then flush and commit what was processed."""
    m = metrics or ConsumerMetrics()
    pending: dict[tuple[str, int], int] = {}  # (topic, partition) -> next offset to consume
    since_commit = 0
    last_commit = time.monotonic()

    def checkpoint() -> None:
        nonlocal since_commit, last_commit
        if not pending:
            return
        started = time.perf_counter()
        stats = sink.flush()
        dlq.flush()
        source.commit(dict(pending))
        m.commit_latency.observe(time.perf_counter() - started)
        m.commits.inc()
        if stats is not None:
            m.written.inc(stats.written)
            m.duplicates.inc(stats.duplicates)
            m.replayed.inc(stats.replayed)
        if on_commit:
            on_commit(dict(pending))
        pending.clear()
        since_commit, last_commit = 0, time.monotonic()

    source.on_rebalance(revoked=checkpoint, assigned=sink.reset_index)
    try:
        while not stop.is_set():
            records = source.poll()
            m.records_in.inc(len(records))
            for record, verdict in handle(records):
                if isinstance(verdict, Rejected):
                    dlq.send(record, verdict.reason, verdict.detail)
                    m.dead_lettered.labels(verdict.reason).inc()
                elif isinstance(verdict, Held):
                    sink.add(verdict.event, record.topic, record.partition, record.offset, held=verdict.reason)
                    m.held.labels(verdict.reason).inc()
                else:
                    sink.add(verdict, record.topic, record.partition, record.offset)
                pending[(record.topic, record.partition)] = record.offset + 1
            since_commit += len(records)
            if since_commit >= commit_every or time.monotonic() - last_commit >= commit_interval_s:
                checkpoint()
        checkpoint()
    except BaseException:
        # After a failure nothing may be committed, not even by the revoke that closing the consumer
        # triggers: the records since the last commit are replayed by whoever owns the partitions next.
        source.on_rebalance(revoked=lambda: None, assigned=lambda: None)
        raise


class KafkaSource:
    """A kafka-python consumer in a group, manual commits, starting from the earliest offset."""

    def __init__(self, kafka: KafkaSettings, *, poll_timeout_ms: int = 500, max_poll_records: int = 2000,
                 group_id: str | None = None):
        from kafka import ConsumerRebalanceListener, KafkaConsumer

        self._poll_timeout_ms = poll_timeout_ms
        self._revoked: Callable[[], None] = lambda: None
        self._assigned: Callable[[], None] = lambda: None
        self.consumer = KafkaConsumer(
            **kafka.client_config(),
            group_id=group_id or kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
            max_poll_records=max_poll_records,
        )
        source = self

        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked: Any) -> None:
                log.info("partitions revoked: %s", sorted(revoked))
                source._revoked()

            def on_partitions_assigned(self, assigned: Any) -> None:
                log.info("partitions assigned: %s", sorted(assigned))
                source._assigned()

        self.consumer.subscribe([kafka.topic], listener=_Listener())

    def on_rebalance(self, revoked: Callable[[], None], assigned: Callable[[], None]) -> None:
        self._revoked, self._assigned = revoked, assigned

    def poll(self) -> list[Record]:
        batches = self.consumer.poll(timeout_ms=self._poll_timeout_ms)
        return [
            Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
            for recs in batches.values()
            for r in recs
        ]

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        from kafka import TopicPartition
        from kafka.structs import OffsetAndMetadata

        self.consumer.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})

    def close(self) -> None:
        self.consumer.close(autocommit=False)


class KafkaDeadLetters:
    """Dead-letter producer: the original bytes as the value, the reason and source in headers."""

    def __init__(self, kafka: KafkaSettings, *, producer: Any = None):
        from kafka import KafkaProducer

        from ingest.producer import producer_config

        self.topic = kafka.dlq_topic
        self._producer = producer or KafkaProducer(**producer_config(kafka, timeout_s=10.0))
        self._futures: list[Any] = []

    def send(self, record: Record, reason: str, detail: str) -> None:
        headers = [
            ("dlq.reason", reason.encode()),
            ("dlq.detail", detail[:4000].encode("utf-8", "replace")),
            ("dlq.source.topic", record.topic.encode()),
            ("dlq.source.partition", str(record.partition).encode()),
            ("dlq.source.offset", str(record.offset).encode()),
            ("dlq.failed_at", datetime.now(UTC).isoformat().encode()),
        ]
        self._futures.append(self._producer.send(self.topic, key=record.key, value=record.value or b"",
                                                 headers=headers))

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until every dead letter is acknowledged; raises if any was not."""
        if not self._futures:
            return
        self._producer.flush(timeout=timeout_s)
        futures, self._futures = self._futures, []
        for f in futures:
            f.get(timeout=0)

    def close(self) -> None:
        self._producer.close(timeout=5)


def dead_letter_headers(headers: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    """Decode a DLQ record's headers into a dict (for tools and tests that read the DLQ)."""
    return {k: v.decode("utf-8", "replace") for k, v in headers}
