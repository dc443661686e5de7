"""Publishing events to Kafka durably: broker ack (acks=all, idempotent producer) or the local spool.

``EventPublisher.publish`` returns only once every event is durable somewhere:

1. normally it sends to the topic and waits for the broker's acknowledgement (``acks=all``);
2. if the broker does not acknowledge within ``publish_timeout_s`` (down, partitioned, paused), the events
   are appended to the fsynced local spool instead and the publisher switches to *spooling*: later events
   go to the spool too, so the topic receives them in the order they were accepted;
3. a drainer thread probes the broker, replays sealed spool segments in order when it answers, deletes each
   segment after all of its records are acknowledged, and leaves spooling once the spool is empty;
4. only when the spool is full does ``publish`` raise :class:`~ingest.spool.SpoolFull` (the API's 503).

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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flywheel.events import encode_event
from flywheel.settings import KafkaSettings
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
        publish_timeout_s: float = 2.0,
        registry: CollectorRegistry | None = None,
        drain_interval_s: float = 0.5,
    ):
        self.kafka = kafka
        self.spool = spool
        self.timeout_s = publish_timeout_s
        self.metrics = PublisherMetrics(registry or CollectorRegistry())
        self._producer: Any = None
        self._producer_lock = threading.Lock()
        self._spooling = not spool.is_empty()  # a previous process left events behind
        self._state_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._drain_interval_s = drain_interval_s
        self._drainer = threading.Thread(target=self._drain_loop, name="spool-drainer", daemon=True)
        self._executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="publish")
        self.metrics.spool_bytes.set(spool.size_bytes)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> EventPublisher:
        self._drainer.start()
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
                from kafka import KafkaProducer

                self._producer = KafkaProducer(**producer_config(self.kafka, self.timeout_s))
            return self._producer

    # -- publishing -------------------------------------------------------------------------------
    def publish(self, events: list[Any]) -> str:
        """Make ``events`` durable; returns ``"broker"`` or ``"spool"``. Raises ``SpoolFull``."""
        started = time.perf_counter()
        records = [(e.conversation_id.encode(), encode_event(e)) for e in events]
        path = "spool"
        if not self._spooling:
            try:
                self._send_and_wait(records, self.timeout_s)
                path = "broker"
            except Exception as e:  # any failure to get acks: fall back to the spool, never drop
                log.warning("broker did not acknowledge %d event(s) (%s); spooling", len(records), e)
                with self._state_lock:
                    self._spooling = True
        if path == "spool":
            self._spool_records(records)
        self.metrics.published.labels(path).inc(len(records))
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        return path

    async def publish_async(self, events: list[Any]) -> str:
        """``publish`` for the event loop. The common case (broker up, producer ready) hands the records to
        the producer from the loop and awaits the broker's acks without a thread hop; everything else
        (first connection, spooling, a failed send) goes through ``publish`` on a worker thread."""
        loop = asyncio.get_running_loop()
        producer = self._producer
        if producer is None or self._spooling:
            return await loop.run_in_executor(self._executor, self.publish, events)
        started = time.perf_counter()
        records = [(e.conversation_id.encode(), encode_event(e)) for e in events]
        try:
            acks = [self._ack_future(loop, producer.send(self.kafka.topic, key=k, value=v)) for k, v in records]
            await asyncio.wait_for(asyncio.gather(*acks), self.timeout_s)
        except Exception as e:  # not acknowledged in time: the spool takes it, never drop
            log.warning("broker did not acknowledge %d event(s) (%s); spooling", len(records), e)
            with self._state_lock:
                self._spooling = True
            await loop.run_in_executor(self._executor, self._spool_records, records)
            path = "spool"
        else:
            path = "broker"
        self.metrics.published.labels(path).inc(len(records))
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        return path

    @staticmethod
    def _ack_future(loop: asyncio.AbstractEventLoop, record_future: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any = None, error: BaseException | None = None) -> None:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)

        record_future.add_callback(lambda md: loop.call_soon_threadsafe(settle, md))
        record_future.add_errback(lambda exc: loop.call_soon_threadsafe(settle, None, exc))
        return fut

    def _spool_records(self, records: list[tuple[bytes, bytes]]) -> None:
        self.spool.append(records)
        self.metrics.spool_bytes.set(self.spool.size_bytes)
        self._wake.set()

    def _send_and_wait(self, records: list[tuple[bytes, bytes]], timeout_s: float) -> None:
        producer = self._get_producer()
        deadline = time.monotonic() + timeout_s
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
            if self.spool.is_empty():
                with self._state_lock:
                    if self.spool.is_empty():
                        self._spooling = False
                continue
            if not broker_reachable(self.kafka, timeout_s=1.0):
                backoff = min(backoff * 2, 5.0)
                continue
            try:
                self.drain_once()
                backoff = self._drain_interval_s
            except Exception as e:
                log.warning("spool drain failed (%s); will retry", e)
                backoff = min(backoff * 2, 5.0)
            self._wake.set()  # re-check for appends that raced with the drain

    def drain_once(self) -> int:
        """Deliver every sealed segment in order; returns the number of records sent."""
        sent = 0
        for segment in self.spool.seal():
            records = list(read_segment(segment))
            if records:
                self._send_and_wait(records, max(self.timeout_s, 10.0))
            self.spool.remove(segment)
            sent += len(records)
            self.metrics.drained.inc(len(records))
            self.metrics.spool_bytes.set(self.spool.size_bytes)
            if sent:
                log.info("drained %d spooled event(s) from %s", len(records), segment.name)
        return sent


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
        return got == correlation_id


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf
