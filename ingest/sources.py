"""Where the consumer loop's records come from: a Kafka consumer behind the loop's ``Source`` protocol.

Two clients, chosen by ``ingest.client``:

- ``confluent`` (the default): confluent-kafka, librdkafka underneath. Its fetch and record-batch decoding run
  in C threads, outside the GIL, so the loop's thread spends its time on the events, not on the wire format
  (measured on the ingest bench: kafka-python's ``poll`` was about half of the loop's thread).
- ``kafka-python``: the pure-Python client (the consumer's dead-letter producer uses it too).

Both join the consumer group (``assignment="group"``) or take every partition without joining (``"manual"``),
never commit on their own, start from the earliest offset when the group has none, and hand the loop the
same ``Record``s. On a rebalance the records gathered but not yet handled are dropped (nothing of them was
processed or committed) and read again from the committed offsets by whoever owns their partitions now.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from flywheel.settings import KafkaSettings
from ingest.consumer import Offsets, Record

log = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger("ingest.librdkafka")


def open_source(kafka: KafkaSettings, *, client: str = "confluent", **kwargs: Any) -> ConfluentSource | KafkaPythonSource:
    """A source for ``kafka.topic`` with ``client`` (``confluent`` or ``kafka-python``); ``kwargs`` are the
    sources' own (``poll_timeout_ms``, ``max_poll_records``, ``group_id``, ``assignment``, ``batch_records``,
    ``batch_wait_ms``)."""
    if client == "confluent":
        return ConfluentSource(kafka, **kwargs)
    if client == "kafka-python":
        return KafkaPythonSource(kafka, **kwargs)
    raise ValueError(f"unknown Kafka client {client!r}: 'confluent' or 'kafka-python'")


# -------------------------------------------------------------------------------------------- confluent
class ClientFatal(RuntimeError):
    """librdkafka reported an error no restart can fix (authentication, authorisation, a fatal client error)."""


_FATAL_CODES = frozenset({"_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED", "TOPIC_AUTHORIZATION_FAILED",
                          "GROUP_AUTHORIZATION_FAILED", "CLUSTER_AUTHORIZATION_FAILED", "_SSL", "_INVALID_ARG"})


class ConfluentSource:
    """A confluent-kafka consumer with manual commits (see the module's docstring).

    Rebalance callbacks run on the loop's own thread, inside ``consume``: the revoke callback may flush the
    sink and commit synchronously."""

    def __init__(self, kafka: KafkaSettings, *, poll_timeout_ms: int = 500, max_poll_records: int = 2000,
                 group_id: str | None = None, assignment: str = "group", batch_records: int = 0,
                 batch_wait_ms: int = 0):
        from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, TopicPartition

        self._KafkaError, self._TopicPartition, self._no_timestamp = KafkaError, TopicPartition, TIMESTAMP_NOT_AVAILABLE
        self.topic = kafka.topic
        self._timeout_s = kafka.request_timeout_ms / 1000
        self._poll_timeout_s = poll_timeout_ms / 1000
        self._max_poll_records = max_poll_records
        self._batch_records, self._batch_wait_s = max(batch_records, max_poll_records), batch_wait_ms / 1000
        self._rebalanced = False
        # Set by poll: the records it returns end a backlog (see poll). _behind: the last batch was full, so
        # records were waiting at the broker when it returned.
        self.drained = False
        self._behind = False
        # the committed offset of each partition at its assignment (None: asking failed; not asked again)
        self._starts: dict[tuple[str, int], int | None] = {}
        self._fatal: Any = None
        self._revoked: Callable[[], Offsets] = dict
        self._assigned: Callable[[], None] = lambda: None
        self.revoke_commits: list[Offsets] = []  # offsets committed on revoke (for tests and logs)
        # what this member holds, kept by the callbacks: another thread asking must not call into librdkafka
        # while consume() runs (measured: Consumer.assignment() from a second thread hung a rebalance)
        self._holding: frozenset[tuple[str, int]] = frozenset()
        self.consumer = Consumer({
            **kafka.librdkafka_config(_librdkafka_log),  # librdkafka's own lines through logging
            "group.id": group_id or kafka.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": kafka.session_timeout_ms,
            "heartbeat.interval.ms": kafka.heartbeat_interval_ms,
            "max.poll.interval.ms": kafka.max_poll_interval_ms,
            "error_cb": self._on_error,
        })
        if assignment == "manual":
            meta = self.consumer.list_topics(kafka.topic, timeout=self._timeout_s).topics.get(kafka.topic)
            if meta is None or meta.error is not None or not meta.partitions:
                self.consumer.close()
                raise RuntimeError(f"topic {kafka.topic!r} has no partitions (yet)")
            # no offset given: each partition starts at the group's committed offset (or the earliest)
            self.consumer.assign([TopicPartition(kafka.topic, p) for p in sorted(meta.partitions)])
            self._holding = frozenset((kafka.topic, p) for p in meta.partitions)
            return
        self.consumer.subscribe([kafka.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)

    # -- callbacks (librdkafka calls them from consume(), on this thread) ------------------------------
    def _on_error(self, error: Any) -> None:
        name = error.name()
        if error.fatal() or name in _FATAL_CODES:
            self._fatal = error
        else:  # a broker going away, a timed-out request: librdkafka reconnects and retries on its own
            log.debug("Kafka client: %s", error)

    def _on_assign(self, _consumer: Any, partitions: list[Any]) -> None:
        self._rebalanced = True
        self._holding = self._holding | {(p.topic, p.partition) for p in partitions}
        log.info("partitions assigned: %s", sorted((p.topic, p.partition) for p in partitions))
        self._assigned()

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        self._rebalanced = True
        self._holding = self._holding - {(p.topic, p.partition) for p in partitions}
        log.info("partitions revoked: %s", sorted((p.topic, p.partition) for p in partitions))
        offsets = self._revoked()
        if offsets:
            self.commit(offsets)
            self.revoke_commits.append(offsets)
            log.info("committed %s on revoke", offsets)

    def _on_lost(self, _consumer: Any, partitions: list[Any]) -> None:
        self._rebalanced = True
        self._holding = self._holding - {(p.topic, p.partition) for p in partitions}
        # evicted: another member may own these already, so nothing may be committed for them
        log.warning("partitions lost (evicted from the group): %s", sorted((p.topic, p.partition) for p in partitions))

    # -- Source ------------------------------------------------------------------------------------
    def on_rebalance(self, revoked: Callable[[], Offsets], assigned: Callable[[], None]) -> None:
        self._revoked, self._assigned = revoked, assigned

    def poll(self) -> list[Record]:
        """The next records, several fetches gathered into one batch when they come quickly (see
        ``KafkaPythonSource.poll``).

        While a backlog drains (the last batch was full), every partition's position is compared with the
        high watermark of its last fetch (librdkafka keeps both locally): a fetch asks for no more records than
        are waiting, and once none are, the batch returns at once with ``drained`` set, rather than after a
        fetch has waited out its timeout for records that are not there (up to ``poll_timeout_ms`` +
        ``batch_wait_ms`` for the last records of every backlog)."""
        batch: list[Record] = []
        timeout_s, deadline = self._poll_timeout_s, None
        self.drained = False
        while True:
            want = min(self._max_poll_records, self._batch_records - len(batch))
            if self._behind:
                waiting = self._waiting()
                if waiting == 0:
                    self.drained, self._behind = True, False
                    return batch
                if waiting is not None:
                    want = min(want, waiting)
            self._rebalanced = False
            messages = self.consumer.consume(want, timeout_s)
            if self._fatal is not None:
                raise ClientFatal(f"Kafka client: {self._fatal}")
            if self._rebalanced:
                batch, self._behind, self._starts = [], False, {}
                if messages:  # some of them may come after the new assignment began: read them all again
                    self._rewind()
                    messages = []
            for m in messages:
                error = m.error()
                if error is not None:
                    if error.code() == self._KafkaError._PARTITION_EOF:
                        continue
                    if error.name() in _FATAL_CODES:
                        raise ClientFatal(f"Kafka client: {error}")
                    raise RuntimeError(f"Kafka client: {error}")
                kind, ts = m.timestamp()
                # a message without an error always has its topic, partition and offset (the stubs say Optional)
                batch.append(Record(m.topic(), m.partition(), m.offset(), m.key(), m.value(),  # type: ignore[arg-type]
                                    -1 if kind == self._no_timestamp else ts))
            if len(batch) >= self._batch_records:
                self._behind = True
                return batch
            if not messages or not self._batch_wait_s:
                self._behind = False
                return batch
            deadline = deadline or time.monotonic() + self._batch_wait_s
            timeout_s = deadline - time.monotonic()
            if timeout_s <= 0:
                self._behind = False
                return batch

    def _waiting(self) -> int | None:
        """How many records the broker held beyond this consumer's position at the last fetch of each assigned
        partition, from librdkafka's local figures; ``None`` when some partition's are not known. A partition
        that has delivered nothing since its assignment is counted from the offset it started at: its committed
        offset, asked for once per assignment with a short timeout (when that fails, the figure stays unknown
        for the assignment and poll waits as it did without it)."""
        try:
            waiting, starting = 0, []
            for tp in self.consumer.position([self._TopicPartition(t, p) for t, p in sorted(self._holding)]):
                low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                if high < 0:
                    return None
                if tp.offset >= 0:
                    waiting += max(0, high - tp.offset)
                else:
                    starting.append((tp, low, high))
            unknown = [tp for tp, _, _ in starting if (tp.topic, tp.partition) not in self._starts]
            if unknown:
                self._starts.update(dict.fromkeys(((tp.topic, tp.partition) for tp in unknown), None))
                for tp in self.consumer.committed(unknown, timeout=min(self._poll_timeout_s, 1.0)):
                    self._starts[(tp.topic, tp.partition)] = tp.offset
            for tp, low, high in starting:
                start = self._starts[(tp.topic, tp.partition)]
                if start is None:
                    return None
                start = start if start >= 0 else low  # nothing committed: "earliest"
                if start < 0:
                    return None
                waiting += max(0, high - start)
            return waiting
        except Exception:  # noqa: BLE001  (an optimisation: without the figure, poll waits as it did without it)
            return None

    def _rewind(self) -> None:
        """Every assigned partition back to its committed offset (the earliest one where there is none)."""
        from confluent_kafka import OFFSET_BEGINNING

        assigned = self.consumer.assignment()
        if not assigned:
            return
        for tp in self.consumer.committed(assigned, timeout=self._timeout_s):
            tp.offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            self.consumer.seek(tp)

    def commit(self, offsets: Offsets) -> None:
        self.consumer.commit(offsets=[self._TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                             asynchronous=False)

    def assignment(self) -> set[tuple[str, int]]:
        """The partitions this member holds (safe from any thread)."""
        return set(self._holding)

    def committed(self, partitions: list[int]) -> list[int | None]:
        """The group's committed offset of each of ``partitions`` of the topic (``None``: no commit)."""
        tps = self.consumer.committed([self._TopicPartition(self.topic, p) for p in partitions],
                                      timeout=self._timeout_s)
        return [tp.offset if tp.offset >= 0 else None for tp in tps]

    def close(self, timeout_ms: int | None = None) -> None:
        del timeout_ms  # librdkafka's close leaves the group with its own timeouts
        self.consumer.close()


# ------------------------------------------------------------------------------------------ kafka-python
def _offsets_struct(offsets: Offsets) -> dict[Any, Any]:
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    return {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}


class KafkaPythonSource:
    """A kafka-python consumer with manual commits, starting from the earliest offset.

    ``assignment="group"`` (the default) joins the consumer group: partitions are shared between the group's
    members and move on a rebalance. ``"manual"`` assigns every partition of the topic to this one consumer
    and commits under the group id without joining (no rebalances, no group coordination to get stuck):
    for a deployment that runs exactly one consumer. Two manual consumers would both read everything.
    """

    def __init__(self, kafka: KafkaSettings, *, poll_timeout_ms: int = 500, max_poll_records: int = 2000,
                 group_id: str | None = None, assignment: str = "group", batch_records: int = 0,
                 batch_wait_ms: int = 0):
        from kafka import AsyncConsumerRebalanceListener, KafkaConsumer, TopicPartition

        self.topic = kafka.topic
        self._poll_timeout_ms = poll_timeout_ms
        # poll() gathers up to batch_records records, waiting at most batch_wait_ms after the first arrived
        self._batch_records, self._batch_wait_s = max(batch_records, max_poll_records), batch_wait_ms / 1000
        self._rebalanced = False
        self._revoked: Callable[[], Offsets] = dict
        self._assigned: Callable[[], None] = lambda: None
        self.revoke_commits: list[Offsets] = []  # offsets committed on revoke (for tests and logs)
        self.consumer = KafkaConsumer(
            **kafka.client_config(),
            group_id=group_id or kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
            max_poll_interval_ms=kafka.max_poll_interval_ms,
            max_poll_records=max_poll_records,
        )
        if assignment == "manual":
            partitions = self.consumer.partitions_for_topic(kafka.topic)
            if not partitions:
                raise RuntimeError(f"topic {kafka.topic!r} has no partitions (yet)")
            self.consumer.assign([TopicPartition(kafka.topic, p) for p in sorted(partitions)])
            return
        source, consumer = self, self.consumer

        class _Listener(AsyncConsumerRebalanceListener):  # type: ignore[misc]  # kafka-python has no types
            # Runs on kafka-python's IO thread while the loop's thread waits in poll() or close(), so it may
            # touch the sink; it must not call the blocking commit() there, so it awaits commit_async().
            async def on_partitions_revoked(self, revoked: Any) -> None:
                source._rebalanced = True
                log.info("partitions revoked: %s", sorted(revoked))
                offsets = source._revoked()
                if offsets:
                    await consumer.commit_async(_offsets_struct(offsets))
                    source.revoke_commits.append(offsets)
                    log.info("committed %s on revoke", offsets)

            async def on_partitions_assigned(self, assigned: Any) -> None:
                source._rebalanced = True
                log.info("partitions assigned: %s", sorted(assigned))
                source._assigned()

            async def on_partitions_lost(self, lost: Any) -> None:
                source._rebalanced = True
                # evicted: another member may own these already, so nothing may be committed for them
                log.warning("partitions lost (evicted from the group): %s", sorted(lost))

        self.consumer.subscribe([kafka.topic], listener=_Listener())

    def on_rebalance(self, revoked: Callable[[], Offsets], assigned: Callable[[], None]) -> None:
        self._revoked, self._assigned = revoked, assigned

    def poll(self) -> list[Record]:
        """The next records, several fetches gathered into one batch when they come quickly (the column-wise
        decoding costs less per record in larger batches). Records gathered before a rebalance are dropped:
        nothing of them was processed or committed, and whoever owns their partitions now (this consumer
        too) reads them again from the committed offsets."""
        batch: list[Record] = []
        timeout_ms, deadline = self._poll_timeout_ms, None
        while True:
            self._rebalanced = False
            fetched = self.consumer.poll(timeout_ms=timeout_ms, max_records=self._batch_records - len(batch))
            if self._rebalanced:
                batch = []
            batch += [Record(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)
                      for recs in fetched.values() for r in recs]
            if not fetched or len(batch) >= self._batch_records or not self._batch_wait_s:
                return batch
            deadline = deadline or time.monotonic() + self._batch_wait_s
            timeout_ms = int((deadline - time.monotonic()) * 1000)
            if timeout_ms <= 0:
                return batch

    def commit(self, offsets: Offsets) -> None:
        self.consumer.commit(_offsets_struct(offsets))

    def assignment(self) -> set[tuple[str, int]]:
        return {(tp.topic, tp.partition) for tp in self.consumer.assignment()}

    def committed(self, partitions: list[int]) -> list[int | None]:
        """The group's committed offset of each of ``partitions`` of the topic (``None``: no commit)."""
        from kafka import TopicPartition

        return [self.consumer.committed(TopicPartition(self.topic, p)) for p in partitions]

    def close(self, timeout_ms: int | None = None) -> None:
        self.consumer.close(autocommit=False, timeout_ms=timeout_ms)

