"""The one consumer loop: Kafka -> validation -> event lake, at-least-once delivery, exactly-once rows.

    poll -> decode + validate column-wise (``ingest.fastpath``: Arrow, no object per event); the records it is
            not sure of -> the contract's models one by one (bad bytes -> DLQ with the reason)
         -> screen (consumer-path abuse filters: blocked accounts, harmful or empty corrections)
         -> valid records to the lake sink (held ones to its quarantine area), invalid ones to the DLQ
         -> every ``commit_every`` records or ``commit_interval_s`` seconds:
            flush the sink (durable) -> flush the DLQ producer (acked) -> commit offsets
            (``flywheel ingest`` writes the sink's buffer on a writer thread while the loop decodes the next
            records, and commits once that write returned: ``background_writes``)

Offsets are committed only after both flushes returned, so a crash at any point replays records that may
already be in the lake; the sink drops them by ``event_id`` (see ``ingest.lake``). An unexpected exception
(storage down, broker unreachable) ends the loop *without* committing; ``ingest.service`` restarts it with
back-off and the records since the last commit are replayed.

Bad data never raises: whatever a record's bytes, it becomes a dead-letter record whose value is the original
bytes (a truncated copy with its size and SHA-256 when it is too large for the dead-letter topic) and whose
headers carry the reason and the source topic/partition/offset. A dead letter the topic refuses is retried a
bounded number of times and then parked in the local dead-letter file (``ingest.deadletters``): a record can
never stop its partition.

On a rebalance the partitions being revoked are handed over cleanly: the source's revoke callback flushes the
sink and the DLQ and commits before the group moves on (the sources: ``ingest.sources``).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol, runtime_checkable

import pyarrow as pa
from prometheus_client import CollectorRegistry, Counter, Histogram

from flywheel.events import AnyEvent, EventDecodeError, decode_event
from flywheel.settings import KafkaSettings
from ingest.deadletters import LocalDeadLetters
from ingest.fastpath import decode_batch
from ingest.filters import StreamScreen
from ingest.validation import QualityRules, check_batch, check_event

log = logging.getLogger(__name__)


class Record(NamedTuple):
    """One Kafka record (a named tuple: the consumer makes one per record, at a third of a frozen dataclass's cost)."""

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

    event: AnyEvent
    reason: str


Verdict = AnyEvent | Held | Rejected


@dataclass
class Handled:
    """What a handler made of one poll: per-record verdicts, and rows accepted column-wise (``tables``, one
    per event type in the lake's schema; ``held[type][i]`` is row i's hold reason or ``None``)."""

    verdicts: list[tuple[Record, Verdict]]
    tables: dict[str, pa.Table] = field(default_factory=dict)
    held: dict[str, list[str | None]] = field(default_factory=dict)


Handler = Callable[[list[Record]], "Handled | list[tuple[Record, Verdict]]"]


Offsets = dict[tuple[str, int], int]
"""(topic, partition) -> the next offset to consume."""


class Source(Protocol):
    def poll(self) -> list[Record]: ...
    def commit(self, offsets: Offsets) -> None: ...
    def on_rebalance(self, revoked: Callable[[], Offsets], assigned: Callable[[], None]) -> None:
        """``revoked`` makes everything processed durable and returns the offsets the source must commit
        before it gives its partitions up; ``assigned`` runs after a new assignment."""
        ...


@runtime_checkable
class Sink(Protocol):
    def add(self, event: AnyEvent, topic: str, partition: int, offset: int, held: str | None = None) -> None: ...
    def add_table(self, event_type: str, table: pa.Table, held: list[str | None] | None = None) -> None: ...
    def flush(self) -> Any: ...
    def reset_index(self) -> None: ...


@runtime_checkable
class DetachableSink(Sink, Protocol):
    """A sink whose buffer can be written on another thread (``run_consumer(background_writes=True)``)."""

    def detach(self) -> Any: ...
    def write(self, buffered: Any) -> Any: ...


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
        self.dead_letters_parked = Counter("flywheel_dead_letters_parked_total",
                                           "Dead letters the DLQ topic refused, parked in the local dead-letter file",
                                           ["reason"], registry=r)
        self.restarts = Counter("flywheel_ingest_restarts_total",
                                "Consumer restarts after a broker, storage or rebalance error", ["error"], registry=r)
        self.commit_latency = Histogram("flywheel_ingest_commit_seconds",
                                        "Flush sink + flush DLQ + commit offsets",
                                        buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.commits = Counter("flywheel_ingest_commits_total", "Offset commits", registry=r)


def validate_records(records: list[Record], rules: QualityRules, now: datetime | None = None,
                     screen: Callable[[AnyEvent], str | None] | None = None) -> list[tuple[Record, Verdict]]:
    """Decode and validate one poll's records; ``screen`` (see ``ingest.filters.StreamScreen``) gives the
    reason a valid event is held back, or ``None``. Never raises on bad data."""
    out: list[tuple[Record, Verdict]] = []
    decoded: list[tuple[int, AnyEvent]] = []
    now = now or datetime.now(UTC)
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
    try:
        verdicts = check_batch([e for _, e in decoded], rules, now)
    except Exception:  # one odd event must not fail the batch: judge each alone (below)
        log.exception("batch validation failed; validating the %d events one by one", len(decoded))
        verdicts = [_check_one(e, rules, now) for _, e in decoded]
    for (i, event), verdict in zip(decoded, verdicts, strict=True):
        if verdict is not None:
            out[i] = (out[i][0], Rejected(*verdict))
        elif screen is not None:
            try:
                reason = screen(event)
            except Exception as e:  # a filter bug dead-letters the record instead of stopping the partition
                out[i] = (out[i][0], Rejected("screen_failed", f"{type(e).__name__}: {e}"[:1000]))
                continue
            if reason is not None:
                out[i] = (out[i][0], Held(event, reason))
    return out


COLUMNAR_MIN_RECORDS = 1_000
"""Below this many records a batch is decoded record by record: the column-wise path costs a few
milliseconds per event type and batch whatever the batch's size (``bench/ingest.py`` prints both)."""


def handle_batch(records: list[Record], rules: QualityRules, now: datetime | None = None,
                 screen: StreamScreen | None = None, *, columnar_min: int = COLUMNAR_MIN_RECORDS) -> Handled:
    """The consumer's handler: a poll decoded column-wise (``ingest.fastpath``); the records the fast path is
    not sure of (bad ones, unusual forms) get :func:`validate_records` and its exact verdicts. A small batch
    (light traffic) goes record by record."""
    if len(records) < columnar_min:
        return Handled(validate_records(records, rules, now, screen))
    decoded = decode_batch([r.value for r in records], [r.topic for r in records], [r.partition for r in records],
                           [r.offset for r in records], rules, now, screen.screen_rows if screen else None)
    slow = validate_records([records[i] for i in decoded.slow], rules, now, screen) if decoded.slow else []
    return Handled(slow, decoded.tables, decoded.held)


def _check_one(event: AnyEvent, rules: QualityRules, now: datetime) -> tuple[str, str] | None:
    try:
        return check_event(event, rules, now)
    except Exception as e:
        return "validation_failed", f"{type(e).__name__}: {e}"[:1000]


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
    flush_when_idle: bool = True,
    background_writes: bool = False,
) -> None:
    """Run until ``stop`` is set; then flush and commit what was processed.

    The sink is flushed and the offsets committed after ``commit_every`` records, after ``commit_interval_s``,
    and (``flush_when_idle``) as soon as a poll comes back empty or the source says its batch ended a backlog
    (``source.drained``, where the source can tell): the consumer has caught up with the topic, so nothing is
    gained by holding what it has (measured: the last records of a burst otherwise waited up to
    ``commit_interval_s`` to land).

    ``background_writes`` (a sink with ``detach`` and ``write``, such as ``ingest.lake.LakeSink``): the
    checkpoints that ``commit_every`` and ``commit_interval_s`` call hand the sink's buffer to a writer thread
    and go on polling; the offsets it covers are committed once that write returned (and the DLQ was flushed),
    at the next loop turn that finds it done. One write is in flight at most, so writes and commits keep their
    order. A rebalance, an empty or drained poll and ``stop`` wait for it and flush the rest in place; an error waits for
    it too (so no writer outlives the loop) and commits nothing."""
    m = metrics or ConsumerMetrics()
    detachable: DetachableSink | None = None
    if background_writes:
        if not isinstance(sink, DetachableSink):
            raise TypeError(f"background_writes needs a sink with detach() and write(); {type(sink).__name__} has not")
        detachable = sink
    pending: Offsets = {}
    since_commit = 0
    last_commit = time.monotonic()
    writer = ThreadPoolExecutor(1, thread_name_prefix="lake-writer") if detachable is not None else None
    in_flight: tuple[Future[Any], Offsets, float] | None = None  # (the write, the offsets it covers, started)

    def count(stats: Any) -> None:
        if stats is not None:
            m.written.inc(stats.written)
            m.duplicates.inc(stats.duplicates)
            m.replayed.inc(stats.replayed)

    def settle() -> tuple[Offsets, float] | None:
        """Wait for the write in flight (raising its error): the offsets it made durable, and when it began;
        ``None`` when no write is in flight."""
        nonlocal in_flight
        if in_flight is None:
            return None
        future, offsets, started = in_flight
        in_flight = None
        count(future.result())
        return offsets, started

    def mark() -> Offsets:
        nonlocal since_commit, last_commit
        offsets = dict(pending)
        pending.clear()
        since_commit, last_commit = 0, time.monotonic()
        return offsets

    def make_durable() -> Offsets:
        """Everything processed so far: the write in flight finished, the rest flushed, the DLQ flushed; the
        offsets that are now safe to commit."""
        settled = settle()
        offsets = settled[0] if settled else {}
        if pending:
            count(sink.flush())
            offsets.update(mark())
        if offsets:
            dlq.flush()
        return offsets

    def commit_written(settled: tuple[Offsets, float] | None) -> None:
        """Commit what a settled background write made durable, once the DLQ is flushed too."""
        if settled:
            dlq.flush()  # every dead letter sent so far, those of the records the write covers among them
            commit(*settled)

    def commit(offsets: Offsets, started: float) -> None:
        source.commit(offsets)
        m.commit_latency.observe(time.perf_counter() - started)
        m.commits.inc()
        if on_commit:
            on_commit(offsets)

    def checkpoint(*, wait: bool) -> None:
        nonlocal in_flight
        started = time.perf_counter()
        if writer is None or detachable is None or wait:
            offsets = make_durable()
            if offsets:
                commit(offsets, started)
            return
        settled = settle()
        if pending:  # the next write starts before the previous one's commit
            in_flight = (writer.submit(detachable.write, detachable.detach()), mark(), started)
        commit_written(settled)

    def handover() -> Offsets:  # partitions revoked: the source commits what this returns
        offsets = make_durable()
        if offsets and on_commit:
            on_commit(offsets)
        return offsets

    source.on_rebalance(revoked=handover, assigned=sink.reset_index)
    try:
        while not stop.is_set():
            if in_flight is not None and in_flight[0].done():
                commit_written(settle())
            records = source.poll()
            m.records_in.inc(len(records))
            handled = handle(records)
            if isinstance(handled, list):  # a per-record handler (validate_records)
                handled = Handled(handled)
            for event_type, table in handled.tables.items():
                held = handled.held.get(event_type)
                sink.add_table(event_type, table, held)
                for reason in filter(None, held or ()):
                    m.held.labels(reason).inc()
            for record, verdict in handled.verdicts:
                if isinstance(verdict, Rejected):
                    dlq.send(record, verdict.reason, verdict.detail)
                    m.dead_lettered.labels(verdict.reason).inc()
                elif isinstance(verdict, Held):
                    sink.add(verdict.event, record.topic, record.partition, record.offset, held=verdict.reason)
                    m.held.labels(verdict.reason).inc()
                else:
                    sink.add(verdict, record.topic, record.partition, record.offset)
            for record in records:
                pending[(record.topic, record.partition)] = record.offset + 1
            since_commit += len(records)
            if flush_when_idle and (not records or getattr(source, "drained", False)):
                checkpoint(wait=True)
            elif since_commit >= commit_every or time.monotonic() - last_commit >= commit_interval_s:
                checkpoint(wait=False)
        checkpoint(wait=True)
    except BaseException:
        # After a failure nothing may be committed, not even by the revoke that closing the consumer
        # triggers: the records since the last commit are replayed by whoever owns the partitions next.
        source.on_rebalance(revoked=dict, assigned=lambda: None)
        raise
    finally:
        if writer is not None:  # a write in flight finishes (or fails) before the sink may be dropped
            writer.shutdown(wait=True)


class KafkaDeadLetters:
    """Dead-letter producer: the original bytes as the value, the reason and source in headers.

    A value over ``max_value_bytes`` (the broker would refuse it) is replaced by its first
    ``truncate_to_bytes`` bytes, with ``dlq.truncated``, ``dlq.original_size`` and ``dlq.original_sha256``
    headers. A dead letter the topic does not acknowledge is sent again, ``attempts`` times in all with
    back-off, then parked in ``local`` (the local dead-letter file) so that the partition moves on.
    """

    def __init__(self, kafka: KafkaSettings, *, producer: Any = None, local: LocalDeadLetters | None = None,
                 max_value_bytes: int = 900_000, truncate_to_bytes: int = 64 * 1024, attempts: int = 3,
                 retry_backoff_s: float = 0.5, flush_timeout_s: float = 10.0):
        from kafka import KafkaProducer

        from ingest.producer import producer_config

        self.topic = kafka.dlq_topic
        self._producer = producer or KafkaProducer(**producer_config(kafka, timeout_s=flush_timeout_s))
        self.local = local
        self.max_value_bytes, self.truncate_to_bytes = max_value_bytes, truncate_to_bytes
        self.attempts, self.retry_backoff_s, self.flush_timeout_s = attempts, retry_backoff_s, flush_timeout_s
        # (record, reason, detail, value, headers, future or the exception send() raised)
        self._pending: list[tuple[Record, str, str, bytes, list[tuple[str, bytes]], Any]] = []

    def send(self, record: Record, reason: str, detail: str) -> None:
        value = record.value or b""
        headers = [
            ("dlq.reason", reason[:200].encode()),
            ("dlq.detail", detail[:4000].encode("utf-8", "replace")),
            ("dlq.source.topic", record.topic.encode()),
            ("dlq.source.partition", str(record.partition).encode()),
            ("dlq.source.offset", str(record.offset).encode()),
            ("dlq.failed_at", datetime.now(UTC).isoformat().encode()),
        ]
        if len(value) > self.max_value_bytes:
            headers += [("dlq.truncated", b"true"), ("dlq.original_size", str(len(value)).encode()),
                        ("dlq.original_sha256", hashlib.sha256(value).hexdigest().encode())]
            value = value[: self.truncate_to_bytes]
        self._pending.append((record, reason, detail, value, headers, self._send(record.key, value, headers)))

    def _send(self, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        try:
            return self._producer.send(self.topic, key=key, value=value, headers=headers)
        except Exception as e:  # refused before it left (too large, buffer full): retried or parked by flush
            return e

    def flush(self) -> None:
        """Return once every dead letter is acknowledged by the topic or parked locally."""
        for attempt in range(1, self.attempts + 1):
            if not self._pending:
                return
            try:
                self._producer.flush(timeout=self.flush_timeout_s)
            except Exception as e:  # not all acknowledged in time: find out which below
                log.warning("DLQ flush did not complete (%s: %s)", type(e).__name__, e)
            failed = []
            for item in self._pending:
                outcome = item[5]
                error: BaseException | None = outcome if isinstance(outcome, BaseException) else None
                if error is None:
                    try:
                        outcome.get(timeout=0)
                    except Exception as e:
                        error = e
                if error is not None:
                    failed.append((item, error))
            self._pending = []
            if not failed:
                return
            if attempt == self.attempts:
                for (record, reason, detail, _value, _headers, _f), error in failed:
                    self._park(record, reason, detail, error)
                return
            log.warning("the DLQ refused %d dead letter(s) (%s); attempt %d of %d", len(failed), failed[0][1],
                        attempt + 1, self.attempts)
            time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            self._pending = [(r, reason, d, v, h, self._send(r.key, v, h)) for (r, reason, d, v, h, _f), _e in failed]

    def _park(self, record: Record, reason: str, detail: str, error: BaseException) -> None:
        if self.local is None:
            raise RuntimeError(f"the DLQ refused a dead letter and no local dead-letter file is set: {error}")
        self.local.park(record.key, record.value or b"", reason,
                        f"{detail[:2000]} | DLQ refused it: {type(error).__name__}: {error}",
                        {"topic": record.topic, "partition": record.partition, "offset": record.offset})

    def close(self) -> None:
        self._producer.close(timeout=5)


def dead_letter_headers(headers: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    """Decode a DLQ record's headers into a dict (for tools and tests that read the DLQ)."""
    return {k: v.decode("utf-8", "replace") for k, v in headers}
