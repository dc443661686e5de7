"""Publishing events to Kafka durably: broker ack (acks=all, idempotent producer) or the local spool.

``EventPublisher.publish`` returns only once every event is durable somewhere:

1. normally it sends to the topic and waits for the broker's acknowledgement (``acks=all``);
2. if the broker does not acknowledge in time (down, partitioned, paused), the events are appended to the
   fsynced local spool instead and the publisher switches to *spooling* (the circuit breaker opens): every other request still waiting for an ack is released to the spool at once, and later
   events go straight to the spool without trying the broker, so the topic receives them in the order they
   were accepted and no client waits on a dead broker more than once. "In time" adapts to the broker's own
   ack latency the way TCP's retransmission timer does (RFC 6298: smoothed latency plus four times its
   deviation), between ``min_ack_wait_s`` and ``publish_timeout_s``: on loopback acks take a few ms, so a
   frozen broker is noticed in ``min_ack_wait_s`` rather than the full timeout;
3. a drainer thread probes the broker (a Kafka ApiVersions round trip, with back-off), replays sealed spool
   segments in order when it answers, deletes each segment after all of its records are acknowledged, and
   closes the breaker once the spool is empty;
4. a spooled record the broker refuses for good (``MSG_SIZE_TOO_LARGE`` and other refusals of the record itself)
   is parked in the local dead-letter file with its reason (``flywheel_dead_letters_parked_total``), so it
   never blocks the records behind it; retriable failures are retried with back-off, logged once per outage;
5. only when the spool is full does ``publish`` raise :class:`~ingest.spool.SpoolFull` (the API's 503); an
   event over :data:`~flywheel.events.MAX_RECORD_BYTES` raises :class:`EventTooLarge` (the API's 413) and is
   never spooled.

The client is confluent-kafka (librdkafka): batching and the broker's protocol run in its C threads, outside the
GIL, so a loaded API's event loop is not starved by its own producer, nor the acks by the event loop (with the
pure-Python client, acks that arrived in bursts behind busy request handlers looked like a stalled broker at
32 concurrent requests and opened the breaker under load; measured on the API bench).

A send that timed out may still be delivered later by the Kafka client, and the drainer sends it again:
the topic is at-least-once by design, and the lake keeps one row per ``event_id``.

Records are keyed by ``conversation_id`` so a conversation's events, and every retry of one event, land in
the same partition in order.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flywheel.events import MAX_RECORD_BYTES, encode_event
from flywheel.settings import KafkaSettings
from ingest.deadletters import LocalDeadLetters
from ingest.spool import Spool, read_segment

log = logging.getLogger(__name__)


class PublisherMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.published = Counter("flywheel_events_published_total", "Events made durable, by path",
                                 ["path"], registry=registry)
        self.publish_seconds = Histogram("flywheel_publish_seconds", "Time until events are durable",
                                         buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                                         registry=registry)
        self.spool_bytes = Gauge("flywheel_spool_bytes", "Bytes waiting in the local spool", registry=registry)
        self.drained = Counter("flywheel_spool_drained_total", "Spooled events delivered to the broker",
                               registry=registry)
        self.parked = Counter("flywheel_dead_letters_parked_total",
                              "Spooled events the broker refused for good, parked in the local dead-letter file",
                              ["reason"], registry=registry)
        self.breaker_open = Gauge("flywheel_publish_breaker_open",
                                  "1 while events go straight to the spool (broker not acknowledging)",
                                  registry=registry)


class EventTooLarge(ValueError):
    """An encoded event over the record size limit: no broker would take it (the API's 413)."""


def producer_config(kafka: KafkaSettings, timeout_s: float) -> dict[str, Any]:
    return {
        **kafka.client_config(),
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 1,
        "max_block_ms": int(timeout_s * 1000),
        "retries": 2**31 - 1,
        "reconnect_backoff_max_ms": 1000,
    }


class EventPublisher:
    def __init__(
        self,
        kafka: KafkaSettings,
        spool: Spool,
        *,
        publish_timeout_s: float = 0.25,
        min_ack_wait_s: float = 0.04,
        registry: CollectorRegistry | None = None,
        drain_interval_s: float = 0.5,
        dead_letters: str | None = None,
        max_record_bytes: int = MAX_RECORD_BYTES,
    ):
        self.kafka = kafka
        self.spool = spool
        self.timeout_s = publish_timeout_s
        self.ack_wait = AckDeadline(min(min_ack_wait_s, publish_timeout_s), publish_timeout_s)
        self.max_record_bytes = max_record_bytes
        self.metrics = PublisherMetrics(registry or CollectorRegistry())
        self.local = LocalDeadLetters(dead_letters or spool.dir.parent / "spool-dead-letters.jsonl",
                                      counter=self.metrics.parked)
        # requests awaiting acks -> (when each started, when it gives up): one timer on the loop watches them
        # all (``_tick``), and the breaker releases them
        self._waiting: dict[asyncio.Future[None], tuple[float, float]] = {}
        self._ticks: dict[asyncio.AbstractEventLoop, _Tick] = {}  # per loop with requests waiting
        self._last_ack = 0.0  # perf_counter of the last broker ack seen by publish_async
        # a new producer's first acks wait for its producer id and its connection to the partitions' leader (measured
        # on loopback: 0.2-0.5 s after it was made): until one came back, a request may wait this long
        self._warming = True
        self.first_ack_grace_s = max(publish_timeout_s, 2.0)
        self._producer: Any = None
        self._producer_lock = threading.Lock()
        self._spooling = not spool.is_empty()  # a previous process left events behind
        self._outage_logged = False
        self._state_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Set while a producer exists. Only the drainer thread creates one, after the broker answered a probe, so
        # a request never waits on a connection attempt.
        self._producer_ready = threading.Event()
        self._drain_interval_s = drain_interval_s
        self._drainer = threading.Thread(target=self._drain_loop, name="spool-drainer", daemon=True)
        self._executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="publish")
        self.metrics.spool_bytes.set(spool.size_bytes)
        self.metrics.breaker_open.set(int(self._spooling))
        self._published_to = {path: self.metrics.published.labels(path) for path in ("broker", "spool")}

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self, *, wait_connected_s: float = 0.0) -> EventPublisher:
        """Start the drainer, which connects the producer at once; wait up to ``wait_connected_s`` for that
        (an API starting up: its first requests then go to the broker rather than to the spool)."""
        self._wake.set()
        self._drainer.start()
        if wait_connected_s and not self._producer_ready.wait(wait_connected_s):
            log.warning("the broker is not reachable at start-up; events are spooled until it is")
        return self

    def close(self, drain_timeout_s: float = 5.0) -> None:
        """Stop the drainer; undelivered events stay in the spool for the next process."""
        self._stop.set()
        self._wake.set()
        if self._drainer.is_alive():
            self._drainer.join(drain_timeout_s)
        self._executor.shutdown(wait=True)
        with self._producer_lock:
            if self._producer is not None:
                self._producer.close(timeout=drain_timeout_s)
                self._producer = None
        self.spool.close()

    @property
    def spooling(self) -> bool:
        return self._spooling

    def _get_producer(self) -> Any:
        with self._producer_lock:
            if self._producer is None:
                self._producer = ConfluentProducer(self.kafka, self.timeout_s, self.max_record_bytes)
                self._warming = True
                self._producer_ready.set()
            return self._producer

    # -- publishing -------------------------------------------------------------------------------
    def _encode(self, events: list[Any], encoded: list[bytes] | None = None) -> list[tuple[bytes, bytes]]:
        values = encoded if encoded is not None else [encode_event(e) for e in events]
        records = [(e.conversation_id.encode(), v) for e, v in zip(events, values, strict=True)]
        for (_k, v), e in zip(records, events, strict=True):
            if len(v) > self.max_record_bytes:
                raise EventTooLarge(f"event {e.event_id} is {len(v)} bytes encoded; the limit is "
                                    f"{self.max_record_bytes} bytes")
        return records

    def _open_breaker(self, reason: object) -> None:
        """Send everything to the spool from now on, and release every request still waiting for an ack."""
        with self._state_lock:
            was = self._spooling
            self._spooling = True
        self.metrics.breaker_open.set(1)
        if not was:
            log.warning("broker did not acknowledge in time (%s); spooling until it answers again", reason)
            # Drop the producer: what it still holds is in the spool now (its queue is purged, so nothing it held
            # reaches the topic behind the spool's back later). The drainer makes a fresh producer when the broker
            # answers again.
            with self._producer_lock:
                stale, self._producer = self._producer, None
                self._producer_ready.clear()
            if stale is not None:
                stale.abandon()
        for waiting in list(self._waiting):  # they go to the spool now
            waiting.get_loop().call_soon_threadsafe(_fail, waiting, TimeoutError("breaker open"))

    def publish(self, events: list[Any], encoded: list[bytes] | None = None) -> str:
        """Make ``events`` durable; returns ``"broker"`` or ``"spool"``. Raises ``SpoolFull``, ``EventTooLarge``.
        ``encoded``: the events' wire form when the caller already has it (``encode_event`` of each)."""
        started = time.perf_counter()
        records = self._encode(events, encoded)
        path = "spool"
        if not self._spooling:
            try:
                self._send_and_wait(records, self.first_ack_grace_s if self._warming else self.ack_wait.current())
                self.ack_wait.observe(time.perf_counter() - started)
                self._warming = False
                path = "broker"
            except Exception as e:  # any failure to get acks: fall back to the spool, never drop
                self._open_breaker(e)
        if path == "spool":
            self._spool_records(records)
        self._published_to[path].inc(len(records))
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        return path

    async def publish_async(self, events: list[Any], encoded: list[bytes] | None = None) -> str:
        """``publish`` for the event loop. The common case (broker up, producer ready) hands the records to
        the producer from the loop and awaits the broker's acks without a thread hop; everything else
        (first connection, spooling, a failed send) goes through ``publish`` on a worker thread. A request
        waiting for acks stops waiting as soon as any request opens the breaker."""
        loop = asyncio.get_running_loop()
        producer = self._producer
        if producer is None or self._spooling:
            return await loop.run_in_executor(self._executor, self.publish, events, encoded)
        started = time.perf_counter()
        records = self._encode(events, encoded)
        try:
            await self._await_acks(self._acks(loop, producer, records), started)
            self.ack_wait.observe(time.perf_counter() - started)
        except Exception as e:  # not acknowledged in time: the spool takes it, never drop
            self._open_breaker(e)
            await loop.run_in_executor(self._executor, self._spool_records, records)
            path = "spool"
        else:
            path = "broker"
        self._published_to[path].inc(len(records))
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        return path

    def _acks(self, loop: asyncio.AbstractEventLoop, producer: ConfluentProducer,
              records: list[tuple[bytes, bytes]]) -> asyncio.Future[None]:
        """Send ``records``; one future of the loop, settled when the broker acknowledged all of them (or
        with the first failure). Their reports are served on the loop (``ConfluentProducer.pump``, here and
        on each tick of ``_tick``), so the future is settled directly; a report the producer's own thread
        serves reaches the loop with one wake-up per request, not one per record."""
        acks: asyncio.Future[None] = loop.create_future()

        def settle(error: BaseException | None) -> None:  # on the loop
            if error is not None:
                _fail(acks, error)
                return
            self._last_ack, self._warming = time.perf_counter(), False
            if not acks.done():
                acks.set_result(None)

        on_loop = threading.get_ident()

        def done(error: BaseException | None) -> None:
            if threading.get_ident() == on_loop:
                settle(error)
            else:  # the producer's report thread
                loop.call_soon_threadsafe(settle, error)

        producer.send_many(self.kafka.topic, records, done)
        self._pump(producer)  # the acks of earlier requests that came meanwhile
        return acks

    @staticmethod
    def _pump(producer: ConfluentProducer) -> None:
        try:
            producer.pump()
        except Exception:  # a report's callback failed (its loop closed, say): never this request's send
            log.exception("serving the producer's delivery reports failed")

    async def _await_acks(self, acks: asyncio.Future[None], started: float) -> None:
        """Wait for ``acks`` until the broker looks stalled: no ack from any request for the adaptive deadline
        (a big batch whose acks keep arriving is not a stall), or ``publish_timeout_s`` in all. One timer per
        loop (``_tick``) serves the acks and checks every request of that loop; the breaker opening (any
        request's stall) fails every waiting request at once."""
        budget = self.first_ack_grace_s if self._warming else self.timeout_s
        self._waiting[acks] = (started, started + budget)
        loop = acks.get_loop()
        tick = self._ticks.get(loop)
        if tick is None:
            now = time.perf_counter()
            tick = self._ticks[loop] = _Tick(check_at=now + min(self.ack_wait.current(), budget))
            self._arm_tick(loop, tick, now)
        tick.waiting += 1
        try:
            await acks
        finally:
            tick.waiting -= 1
            self._waiting.pop(acks, None)

    def _arm_tick(self, loop: asyncio.AbstractEventLoop, tick: _Tick, now: float) -> None:
        tick.due = now + _TICK_S
        loop.call_later(_TICK_S, self._tick, loop, tick)

    def _tick(self, loop: asyncio.AbstractEventLoop, tick: _Tick) -> None:
        """While requests wait on ``loop``: serve the producer's delivery reports there, and when a check is
        due, fail each of its requests whose budget is spent or that has seen no ack from the broker for the
        adaptive deadline. (A timer per request, and a report thread handing each ack to the loop, cost more
        than the rest of a request's wait on the loop: measured with ``bench/api.py``.)"""
        if not tick.waiting:
            if self._ticks.get(loop) is tick:
                del self._ticks[loop]
            return
        producer = self._producer
        if producer is not None:
            self._pump(producer)
        now, wait_s = time.perf_counter(), self.ack_wait.current()
        # A tick far behind its time means the loop itself was late (a long callback, a garbage collection):
        # the broker's acks may still be on their way through librdkafka, so the check waits, but never more
        # than one deadline past its time (a saturated loop is late on every tick).
        if now >= tick.check_at and (now - tick.due < 0.01 or now >= tick.check_at + wait_s):
            next_check = wait_s
            for acks, (started, cap) in list(self._waiting.items()):
                if acks.get_loop() is not loop or acks.done():
                    continue
                if now >= cap:
                    _fail(acks, TimeoutError(f"no ack within {cap - started:g} s"))
                elif self._warming:
                    next_check = min(next_check, cap - now)
                elif now - max(self._last_ack, started) >= wait_s:
                    _fail(acks, TimeoutError(f"no ack from the broker for {wait_s * 1000:.0f} ms"))
                else:
                    next_check = min(next_check, cap - now, max(self._last_ack, started) + wait_s - now)
            tick.check_at = now + next_check
        self._arm_tick(loop, tick, now)

    def _spool_records(self, records: list[tuple[bytes, bytes]]) -> None:
        self.spool.append(records)
        self.metrics.spool_bytes.set(self.spool.size_bytes)
        self._wake.set()

    def _send_and_wait(self, records: list[tuple[bytes, bytes]], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        if not self._producer_ready.wait(timeout_s):  # not connected (yet): the drainer is working on it
            raise TimeoutError(f"no broker connection within {timeout_s} s")
        producer = self._producer
        if producer is None:
            raise TimeoutError("the producer was abandoned")
        futures = [producer.send(self.kafka.topic, key=k, value=v) for k, v in records]
        for f in futures:
            f.get(timeout=max(0.0, deadline - time.monotonic()))

    # -- draining ---------------------------------------------------------------------------------
    def _drain_loop(self) -> None:
        backoff = self._drain_interval_s
        while not self._stop.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            if self._stop.is_set():
                return
            if self._producer is None:  # connect here, never on a request's path
                try:
                    if not broker_reachable(self.kafka, timeout_s=1.0):
                        raise ConnectionError("the broker does not answer ApiVersions")
                    self._get_producer()
                except Exception as e:
                    if not self._outage_logged:
                        log.warning("cannot connect to the broker (%s: %s); spooling, retrying with back-off",
                                    type(e).__name__, e)
                        self._outage_logged = True
                    backoff = min(backoff * 2, 5.0)
                    continue
            if self.spool.is_empty():
                if self._spooling and not broker_reachable(self.kafka, timeout_s=1.0):
                    backoff = min(backoff * 2, 5.0)  # keep the breaker open until the broker answers
                    continue
                with self._state_lock:
                    if self.spool.is_empty() and self._spooling:
                        self._spooling = False
                        self.metrics.breaker_open.set(0)
                        log.info("spool drained; publishing to the broker again")
                backoff = self._drain_interval_s
                continue
            try:
                if not broker_reachable(self.kafka, timeout_s=1.0):
                    raise ConnectionError("the broker does not answer ApiVersions")
                self.drain_once()
            except Exception as e:
                if not self._outage_logged:  # once per outage, not once per retry
                    log.warning("spool drain failed (%s: %s); retrying with back-off", type(e).__name__, e)
                    self._outage_logged = True
                backoff = min(backoff * 2, 5.0)
                continue
            if self._outage_logged:
                log.info("spool drain recovered")
                self._outage_logged = False
            backoff = self._drain_interval_s
            self._wake.set()  # re-check at once for appends that raced with the drain

    def drain_once(self) -> int:
        """Deliver every sealed segment in order; returns the number of records sent. A record the broker
        refuses for good is parked in the local dead-letter file; a retriable failure raises (the segment is
        sent again later: at-least-once, the lake keeps one row per id)."""
        sent = 0
        for segment in self.spool.seal():
            records = list(read_segment(segment))
            delivered = self._deliver(records, segment.name) if records else 0
            self.spool.remove(segment)
            sent += delivered
            self.metrics.drained.inc(delivered)
            self.metrics.spool_bytes.set(self.spool.size_bytes)
            if records:
                log.info("drained %d spooled event(s) from %s", delivered, segment.name)
        return sent

    def _deliver(self, records: list[tuple[bytes, bytes]], segment: str) -> int:
        producer = self._get_producer()
        deadline = time.monotonic() + max(self.timeout_s, 10.0)
        outcomes: list[Any] = []
        for k, v in records:
            try:
                outcomes.append(producer.send(self.kafka.topic, key=k, value=v))
            except Exception as e:  # refused before it left the client (e.g. too large)
                outcomes.append(e)
        delivered = 0
        for (k, v), outcome in zip(records, outcomes, strict=True):
            error = outcome if isinstance(outcome, BaseException) else None
            if error is None:
                try:
                    outcome.get(timeout=max(0.0, deadline - time.monotonic()))
                    delivered += 1
                    continue
                except Exception as e:
                    error = e
            if _retriable(error):
                raise error
            reason = error.error.name() if isinstance(error, DeliveryFailed) else type(error).__name__
            self.local.park(k, v, reason, str(error), {"spool_segment": segment})
        return delivered


# how often the loop serves delivery reports while requests wait for acks (a request's own send serves them
# too, so under load they are served far more often)
_TICK_S = 0.001


@dataclass
class _Tick:
    """One event loop's tick: its requests waiting for acks, when the tick is due, when the next check is."""

    check_at: float
    due: float = 0.0
    waiting: int = 0


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class AckDeadline:
    """How long to wait for a broker ack before calling the broker stalled: RFC 6298's retransmission timer
    (smoothed latency + 4 x its mean deviation) over observed ack latencies, kept within [floor_s, cap_s].
    Before any observation it is ``cap_s``. Thread-safe enough: a torn update only skews one estimate."""

    def __init__(self, floor_s: float, cap_s: float):
        self.floor_s, self.cap_s = floor_s, cap_s
        self._srtt: float | None = None
        self._rttvar = 0.0

    def observe(self, seconds: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = seconds, seconds / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - seconds)
            self._srtt = 0.875 * self._srtt + 0.125 * seconds

    def current(self) -> float:
        if self._srtt is None:
            return self.cap_s
        return min(self.cap_s, max(self.floor_s, self._srtt + 4 * self._rttvar))


# -------------------------------------------------------------------------------------------- the client
class SendFuture:
    """One record's delivery, settled by librdkafka's delivery report on the producer's report thread."""

    __slots__ = ("_done", "_error")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: BaseException | None = None

    def _settle(self, error: Any, _message: Any) -> None:  # librdkafka's delivery report
        self._error = None if error is None else DeliveryFailed(error)
        self._done.set()

    def get(self, timeout: float | None = None) -> None:
        if not self._done.wait(timeout):
            raise TimeoutError(f"no delivery report within {timeout} s")
        if self._error is not None:
            raise self._error


class DeliveryFailed(Exception):
    """The broker (or librdkafka) refused a record: ``error`` is librdkafka's ``KafkaError``."""

    def __init__(self, error: Any):
        super().__init__(str(error))
        self.error = error


# refusals of the record itself: sending it again cannot succeed (everything else is retried)
_REFUSED = frozenset({"MSG_SIZE_TOO_LARGE", "_MSG_SIZE_TOO_LARGE", "INVALID_RECORD", "CORRUPT_MESSAGE",
                      "RECORD_LIST_TOO_LARGE", "INVALID_MSG", "UNSUPPORTED_FOR_MESSAGE_FORMAT", "_INVALID_ARG",
                      "TOPIC_AUTHORIZATION_FAILED", "INVALID_TIMESTAMP"})


class ConfluentProducer:
    """An idempotent, ``acks=all`` confluent-kafka producer with the surface the publisher uses: ``send`` ->
    :class:`SendFuture`, ``close``, ``abandon``. librdkafka batches and talks to the broker in its own threads,
    outside the GIL; its delivery reports settle the futures, served by the event loop that waits for them
    (``pump``) or, when none does, by a thread of this class (``poll``)."""

    def __init__(self, kafka: KafkaSettings, timeout_s: float, max_record_bytes: int = MAX_RECORD_BYTES):
        from confluent_kafka import Producer

        self._producer = Producer({
            **kafka.librdkafka_config(logging.getLogger("ingest.librdkafka")),
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 1,
            # a record not acknowledged in this long fails (the publisher stops waiting far sooner: the spool)
            "message.timeout.ms": max(int(timeout_s * 1000), 30_000),
            "message.max.bytes": max_record_bytes + 64 * 1024,  # the record limit is checked before a send
            "reconnect.backoff.max.ms": 1000,
        })
        # the topic's metadata now, not on the first request's path (measured: the first acks took over
        # publish_timeout_s without it, and the breaker opened on a healthy broker)
        meta = self._producer.list_topics(kafka.topic, timeout=max(timeout_s, kafka.request_timeout_ms / 1000))
        topic = meta.topics.get(kafka.topic)
        if topic is None or topic.error is not None or not topic.partitions:
            raise ConnectionError(f"no metadata for topic {kafka.topic!r}: {topic.error if topic else 'missing'}")
        self._stop = threading.Event()
        self._pumped = 0.0
        self._thread = threading.Thread(target=self._serve, name="producer-reports", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if time.perf_counter() - self._pumped < 0.02:  # an event loop serves the reports: keep off the GIL
                time.sleep(0.01)
            else:
                self._producer.poll(0.05)

    def pump(self) -> None:
        """Serve the delivery reports that are in, on the caller's thread (an event loop); while some thread
        pumps, the report thread stands aside, so each report is not a switch of the GIL between threads."""
        self._pumped = time.perf_counter()
        self._producer.poll(0)

    def _produce(self, topic: str, key: bytes, value: bytes, on_delivery: Callable[[Any, Any], None]) -> None:
        try:
            self._producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
        except BufferError:  # librdkafka's queue is full: the broker is not taking records
            raise TimeoutError("the producer's queue is full") from None
        except Exception as e:  # refused before it left the client
            error = e.args[0] if e.args and hasattr(e.args[0], "code") else None
            raise DeliveryFailed(error) if error is not None else e from None

    def send(self, topic: str, key: bytes, value: bytes) -> SendFuture:
        future = SendFuture()
        self._produce(topic, key, value, future._settle)
        return future

    def send_many(self, topic: str, records: list[tuple[bytes, bytes]],
                  done: Callable[[BaseException | None], None]) -> None:
        """Send ``records``; ``done(None)`` once all are acknowledged, or ``done(error)`` on the first failure
        (called once, on whichever thread serves the reports: ``pump``'s or the report thread; or raises here
        when a record is refused before it leaves)."""
        if len(records) == 1:  # the API's common case: its one report settles it
            key, value = records[0]
            self._produce(topic, key, value, lambda error, _message: done(None if error is None else DeliveryFailed(error)))
            return
        lock, state = threading.Lock(), {"left": len(records), "fired": False}

        def report(error: Any, _message: Any) -> None:
            with lock:
                if state["fired"]:
                    return
                state["left"] -= 1
                if error is None and state["left"]:
                    return
                state["fired"] = True
            done(None if error is None else DeliveryFailed(error))

        for key, value in records:
            self._produce(topic, key, value, report)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout``), then stop."""
        self._producer.flush(timeout)
        self._stop.set()
        self._thread.join(timeout)

    def abandon(self) -> None:
        """Stop at once, dropping what is not delivered (its futures fail as purged)."""
        try:
            self._producer.purge(in_queue=True, in_flight=True, blocking=False)
            self._producer.flush(0)
        finally:
            self._stop.set()


def _retriable(error: BaseException) -> bool:
    """Whether sending the same record again can succeed (timeouts, a broker down, a purged queue)."""
    if isinstance(error, DeliveryFailed):
        return error.error.name() not in _REFUSED
    return isinstance(error, TimeoutError | ConnectionError)


def broker_reachable(kafka: KafkaSettings, timeout_s: float = 1.0) -> bool:
    """True if some bootstrap broker answers a Kafka ApiVersions request within ``timeout_s``.

    A TCP connect alone is not enough: a frozen broker still accepts connections. ApiVersions is answered
    before SASL authentication, so this works for every security protocol (TLS is wrapped when set).
    """
    for server in kafka.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            if _api_versions(host.strip("[]"), int(port), kafka, timeout_s):
                return True
        except (OSError, ValueError, struct.error):
            continue
    return False


def _api_versions(host: str, port: int, kafka: KafkaSettings, timeout_s: float) -> bool:
    client_id = b"flywheel-probe"
    correlation_id = 0x0F1F
    header = struct.pack(">hhih", 18, 0, correlation_id, len(client_id)) + client_id
    request = struct.pack(">i", len(header)) + header
    with socket.create_connection((host, port), timeout=timeout_s) as raw:
        sock: socket.socket = raw
        if kafka.security_protocol in ("SSL", "SASL_SSL"):
            ctx = ssl.create_default_context(cafile=kafka.ssl_cafile)
            if kafka.ssl_certfile:
                ctx.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
            sock = ctx.wrap_socket(raw, server_hostname=host)
        sock.settimeout(timeout_s)
        sock.sendall(request)
        head = _recv_exact(sock, 8)
        _size, got = struct.unpack(">ii", head)
        return bool(got == correlation_id)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf
