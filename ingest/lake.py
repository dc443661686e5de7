"""The event lake: Parquet files partitioned by event type and the hour the user acted.

Layout under the lake root::

    events/type=<type>/dt=YYYY-MM-DD/hour=HH/<file named after the Kafka offsets it covers>.parquet
    quarantine/reason=<reason>/type=<type>/dt=.../hour=.../<same file names>

The quarantine area holds valid events that a consumer-path filter held back (``ingest.filters``), whole
and with the same schema, so a reviewer can audit them and curation can list them with their reason.

Exactly once by ``event_id``. A flush writes one file per lake partition, atomically, named after the Kafka
offset ranges it covers: ``<topic>.p<partition>.o<first>-<last>.parquet`` when the flush holds one Kafka
partition, ``<topic>.k<n>-<digest>.parquet`` when it holds n of them (the digest, of every partition's range,
keeps the name stable for the same ranges). Rows in a file are in (partition, offset) order. Before
writing, rows whose ``event_id`` is already in that lake partition (in any *other* file) are dropped. So:

- a consumer that crashed after the write and before the offset commit replays the same records: their
  ids are already present and nothing new is written. If the replayed ranges are identical (every partition's),
  the file of that name is written again, with the rows it holds plus any the replay adds (never fewer: a row
  a filter would hold back or dead-letter now, with a newer block list or clock, stays where it landed);
- a client that retried a send (the same ``event_id`` twice in the topic) gets one row.

Across hour partitions too. The same ``event_id`` may come back with another ``occurred_at``, and so in another
hour's partition: a client that leaves ``occurred_at`` to the server and retries an hour later does exactly
that. So every flush also records the ids it wrote, with the data file each went to, in the *id index*::

    _index/event_ids/dt=YYYY-MM-DD/hour=HH/<the same flush's file name>.parquet

partitioned by the hour the consumer wrote them (arrival, not ``occurred_at``). The sink keeps the ids of
the last ``dedupe_window_h`` hours of arrivals in memory (loaded from the index when its assignment changes)
and drops a record whose id is there with another data file. The guarantee therefore has two parts:

- the same id within one hour partition of ``occurred_at``: always one row, however late the copy comes
  (the partition's own files are the index; this is what makes a consumer replay exactly-once);
- the same id with a different ``occurred_at`` hour: one row if the copies *arrive* within
  ``dedupe_window_h`` of each other (default 48 h). Retries come within minutes or hours of the first send;
  a window keeps the consumer's memory bounded (about 130 bytes an id, measured: 1.1 GB for 100 events/s
  over 24 h) and the index small. :func:`read_events` also drops duplicate ids within what it reads.

The index is written after the data files of the same flush, so a crash between the two leaves data without
index entries; the offsets were not committed, and the replay writes them: a replayed id found in a lake
partition's files but missing from the index gets its entry (pointing at the file that holds it) in the
replay's index, whether or not the replay's batches have the same boundaries.
Past hours of the index are compacted into one file each and hours older than the window are deleted.

Every event with the same ``conversation_id`` goes to the same Kafka partition (the producer keys by it), so
one consumer owns all copies of an id; the in-memory indexes are reloaded from storage whenever the
consumer's assignment changes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, get_args, get_origin

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import AwareDatetime

from flywheel.events import EVENT_MODELS, EVENT_TYPES, AnyEvent, Message
from flywheel.storage import Storage, parquet_bytes

log = logging.getLogger(__name__)

EVENTS_ROOT = "events"
QUARANTINE_ROOT = "quarantine"
ID_INDEX_ROOT = "_index/event_ids"
ID_INDEX_SCHEMA = pa.schema([pa.field("event_id", pa.string(), nullable=False),
                             pa.field("key", pa.string(), nullable=False)])
LINEAGE_COLUMNS = [("kafka_topic", pa.string()), ("kafka_partition", pa.int32()), ("kafka_offset", pa.int64())]


def _arrow_type(annotation: Any) -> pa.DataType:
    origin = get_origin(annotation)
    if origin is list and get_args(annotation) == (Message,):
        return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    if annotation is int:
        return pa.int64()
    if annotation in (datetime, AwareDatetime):
        return pa.timestamp("us", tz="UTC")
    return pa.string()  # ids, UUIDs, literals and free text


def arrow_schema(event_type: str) -> pa.Schema:
    """The Parquet schema of one event type's table: the contract's fields plus Kafka lineage."""
    model = EVENT_MODELS[event_type]
    fields = []
    for name, info in model.model_fields.items():
        fields.append(pa.field(name, _arrow_type(info.annotation), nullable=not info.is_required() and info.default is None))
    return pa.schema(fields + [pa.field(n, t, nullable=False) for n, t in LINEAGE_COLUMNS])


SCHEMAS = {t: arrow_schema(t) for t in EVENT_TYPES}
# fields stored as the text of a UUID (besides event_id): a review's target_event_id
_UUID_FIELDS = {t: frozenset(n for n, info in EVENT_MODELS[t].model_fields.items()
                             if n != "event_id" and uuid.UUID in (info.annotation, *get_args(info.annotation)))
                for t in EVENT_TYPES}


_PREFIXES: dict[tuple[str | None, str, int, int, int, int], str] = {}


def type_root(event_type: str, held: str | None = None) -> str:
    """Where one event type's files live: the event tables, or the quarantine area for one reason."""
    return f"{QUARANTINE_ROOT}/reason={held}/type={event_type}" if held else f"{EVENTS_ROOT}/type={event_type}"


def partition_prefix(event_type: str, occurred_at: datetime, held: str | None = None) -> str:
    ts = occurred_at if occurred_at.tzinfo is UTC else occurred_at.astimezone(UTC)
    key = (held, event_type, ts.year, ts.month, ts.day, ts.hour)
    prefix = _PREFIXES.get(key)
    if prefix is None:  # formatting dominates the per-row cost of a flush, so cache the few hours seen
        if len(_PREFIXES) > 100_000:
            _PREFIXES.clear()
        prefix = _PREFIXES[key] = f"{type_root(event_type, held)}/dt={ts:%Y-%m-%d}/hour={ts:%H}"
    return prefix


def file_name(topic: str, partition: int, first: int, last: int) -> str:
    return f"{topic}.p{partition}.o{first:012d}-{last:012d}.parquet"


def flush_file_name(topic: str, ranges: dict[int, tuple[int, int]]) -> str:
    """The name of a flush's files for one topic: ``ranges`` maps each Kafka partition to the first and last
    offset the flush holds. The same ranges always give the same name, so a replay of them rewrites the
    same files."""
    if len(ranges) == 1:
        ((partition, (first, last)),) = ranges.items()
        return file_name(topic, partition, first, last)
    spec = ",".join(f"{p}:{first}-{last}" for p, (first, last) in sorted(ranges.items()))
    return f"{topic}.k{len(ranges)}-{hashlib.sha256(spec.encode()).hexdigest()[:24]}.parquet"


@dataclass
class FlushStats:
    written: int = 0  # rows new to the lake
    duplicates: int = 0  # rows dropped: their event_id is already in another file (or twice in this batch)
    replayed: int = 0  # rows rewritten in place: a replayed offset range regenerates the same file
    files: list[str] = field(default_factory=list)


def _hour_floor(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def id_index_prefix(hour: datetime) -> str:
    return f"{ID_INDEX_ROOT}/dt={hour:%Y-%m-%d}/hour={hour:%H}"


Pending = tuple[AnyEvent, str, int, int, "str | None"]
"""An event buffered one by one: (event, Kafka topic, partition, offset, hold reason)."""


@dataclass
class Buffered:
    """What a sink holds between flushes: events added one by one, and tables added column-wise."""

    events: list[Pending] = field(default_factory=list)
    tables: list[tuple[str, str | None, pa.Table]] = field(default_factory=list)  # (event type, hold reason, rows)

    def __len__(self) -> int:
        return len(self.events) + sum(int(t.num_rows) for _, _, t in self.tables)


def _event_tables(events: list[Pending]) -> list[tuple[str, str | None, pa.Table]]:
    """Events buffered one by one, as tables (one per event type, hold reason and Kafka partition)."""
    grouped: dict[tuple[str, str | None, str, int], list[tuple[AnyEvent, int]]] = defaultdict(list)
    for event, topic, partition, offset, held in events:
        grouped[(event.type, held, topic, partition)].append((event, offset))
    return [(t, held, events_table(t, rows, topic, partition)) for (t, held, topic, partition), rows in grouped.items()]


class LakeSink:
    """Buffers validated events and writes them to the lake, exactly once by ``event_id``."""

    def __init__(self, storage: Storage, *, index_partitions: int = 256, dedupe_window_h: float = 48.0,
                 clock: Any = None):
        self.storage = storage
        self._buffer = Buffered()
        # lake partition prefix -> {event_id: file name}; LRU-bounded, reloaded from storage on a miss.
        self._index: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._index_partitions = index_partitions
        # the id index of the last dedupe_window_h hours of arrivals: event_id -> data file key
        self.dedupe_window = timedelta(hours=dedupe_window_h)
        self._recent: dict[str, str] | None = None  # None = not loaded yet
        self._recent_by_hour: dict[datetime, list[str]] = {}
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()

    def add(self, event: AnyEvent, topic: str, partition: int, offset: int, held: str | None = None) -> None:
        """Buffer one event; ``held`` (a filter's reason code) sends it to the quarantine area."""
        self._buffer.events.append((event, topic, partition, offset, held))

    def add_table(self, event_type: str, table: pa.Table, held: list[str | None] | None = None) -> None:
        """Buffer many events of one type at once: ``table`` in the lake's schema (``SCHEMAS[event_type]``,
        Kafka lineage included); ``held[i]``, when given, is row i's hold reason or ``None``."""
        if held is None or not any(held):
            self._buffer.tables.append((event_type, None, table))
            return
        by_reason: dict[str | None, list[int]] = defaultdict(list)
        for i, reason in enumerate(held):
            by_reason[reason].append(i)
        for reason, rows in by_reason.items():
            self._buffer.tables.append((event_type, reason, table.take(pa.array(rows, pa.int64()))))

    def __len__(self) -> int:
        return len(self._buffer)

    def reset_index(self) -> None:
        """Forget cached ids (call when the consumer's partition assignment changes)."""
        with self._lock:
            self._index.clear()
            self._recent, self._recent_by_hour = None, {}

    def _ids_in(self, prefix: str) -> dict[str, str]:
        ids = self._index.get(prefix)
        if ids is None:
            ids = {}
            for key in self.storage.list(prefix + "/"):
                name = key.rsplit("/", 1)[-1]
                if not name.endswith(".parquet"):
                    continue
                table = pq.read_table(io.BytesIO(self.storage.get_bytes(key)), columns=["event_id"])
                for eid in table.column("event_id").to_pylist():
                    ids.setdefault(eid, name)
            self._index[prefix] = ids
            while len(self._index) > self._index_partitions:
                self._index.popitem(last=False)
        self._index.move_to_end(prefix)
        return ids

    def _recent_ids(self, now_hour: datetime) -> dict[str, str]:
        """The id index of the window, loaded on first use; hours that left the window are dropped."""
        if self._recent is None:
            self._recent, self._recent_by_hour = {}, {}
            hour = _hour_floor(now_hour - self.dedupe_window)
            while hour <= now_hour:
                for key in self.storage.list(id_index_prefix(hour) + "/"):
                    if key.endswith(".parquet"):
                        table = pq.read_table(io.BytesIO(self.storage.get_bytes(key)))
                        ids = table.column("event_id").to_pylist()
                        canonical: dict[str, str] = {}  # one str per data file, not one per row
                        for eid, data_key in zip(ids, table.column("key").to_pylist(), strict=True):
                            self._recent.setdefault(eid, canonical.setdefault(data_key, data_key))
                        self._recent_by_hour.setdefault(hour, []).extend(ids)
                hour += timedelta(hours=1)
        cutoff = now_hour - self.dedupe_window
        for hour in [h for h in self._recent_by_hour if h < cutoff]:
            for eid in self._recent_by_hour.pop(hour):
                self._recent.pop(eid, None)
        return self._recent

    def flush(self) -> FlushStats:
        """Write everything buffered; returns once every file is durable. Raises on any storage error,
        keeping the buffer, so the caller must not commit offsets."""
        stats = self.write(self._buffer)
        self._buffer = Buffered()
        return stats

    def detach(self) -> Buffered:
        """Hand over what is buffered (for :meth:`write` on another thread) and start an empty buffer."""
        buffered, self._buffer = self._buffer, Buffered()
        return buffered

    def write(self, buffered: Buffered) -> FlushStats:
        """Write ``buffered`` (a :meth:`detach`-ed buffer) to the lake, durably; :meth:`flush` without the
        buffer swap. Safe on another thread than the one that adds events: writes are serialised, and only
        they touch the id indexes (a caller that wants offsets committed in order writes one buffer at a
        time, in the order it detached them)."""
        stats = FlushStats()
        if not buffered.events and not buffered.tables:
            return stats
        with self._lock:
            now_hour = _hour_floor(self._clock())
            if self._recent is not None and now_hour not in self._recent_by_hour:
                self._maintain_index(now_hour)
            recent = self._recent_ids(now_hour)
            # topic -> lake partition prefix -> slices of rows; (topic, partition) -> the offsets it covers
            groups: dict[str, dict[str, list[pa.Table]]] = {}
            bounds: dict[str, dict[int, tuple[int, int]]] = {}
            for event_type, held, table in [*_event_tables(buffered.events), *buffered.tables]:
                for (topic, partition, hour), part in _split(table):
                    prefix = partition_prefix(event_type, hour, held)
                    groups.setdefault(topic, {}).setdefault(prefix, []).append(part)
                    lo, hi = (v.as_py() for v in pc.min_max(part.column("kafka_offset")).values())
                    first, last = bounds.setdefault(topic, {}).get(partition, (lo, hi))
                    bounds[topic][partition] = (min(first, lo), max(last, hi))
            seen: dict[str, str] = {}  # ids kept by this flush (or found in the lake) -> their data file key
            files: list[tuple[str, bytes]] = []  # data files, written together (before their index entries)
            index_files: list[tuple[str, bytes]] = []
            for topic, by_prefix in groups.items():
                name = flush_file_name(topic, bounds[topic])
                written: dict[str, str] = {}  # this flush's index entries: id -> data file key
                for prefix, parts in sorted(by_prefix.items()):
                    table = _in_offset_order(pa.concat_tables(parts))
                    existing = self._ids_in(prefix)
                    key = f"{prefix}/{name}"
                    keep, kept_ids, replayed = self._dedupe(table.column("event_id").to_pylist(), prefix, key,
                                                            seen, recent, existing, stats, written)
                    if not kept_ids:
                        continue
                    rows = table.filter(keep) if not keep.all() else table
                    if replayed:  # the same ranges again: the file keeps every row it has (see the module's doc)
                        rows = self._with_rows_of(key, rows)
                    files.append((key, parquet_bytes(rows)))
                    existing.update(dict.fromkeys(kept_ids, name))
                    written.update(dict.fromkeys(kept_ids, key))
                    stats.written += len(kept_ids) - replayed
                    stats.replayed += replayed
                    stats.files.append(key)
                if written:  # after the data files: an index entry always points at a durable file
                    index_table = pa.Table.from_arrays(
                        [pa.array(list(written), pa.string()), pa.array(list(written.values()), pa.string())],
                        schema=ID_INDEX_SCHEMA)
                    index_files.append((f"{id_index_prefix(now_hour)}/{name}", parquet_bytes(index_table)))
            try:
                self.storage.put_many(files)  # every data file durable ...
                self.storage.put_many(index_files)  # ... before an index entry may point at one
            except BaseException:
                # the flush failed: forget the ids noted as written (the buffer stays; a retry writes them again)
                for prefix in {k.rsplit("/", 1)[0] for k, _ in files}:
                    self._index.pop(prefix, None)
                raise
            new_ids = list(seen.keys() - recent.keys())
            recent.update(seen)
            self._recent_by_hour.setdefault(now_hour, []).extend(new_ids)
        return stats

    def _with_rows_of(self, key: str, rows: pa.Table) -> pa.Table:
        """``rows`` together with the rows data file ``key`` already holds (one row per id, in offset order)."""
        held = pq.read_table(io.BytesIO(self.storage.get_bytes(key)), schema=rows.schema)
        added = rows.filter(pc.invert(pc.is_in(rows.column("event_id"), value_set=held.column("event_id"))))
        return _in_offset_order(pa.concat_tables([held, added]))

    @staticmethod
    def _dedupe(ids: list[str], prefix: str, key: str, seen: dict[str, str], recent: dict[str, str],
                existing: dict[str, str], stats: FlushStats, index: dict[str, str]) -> tuple[np.ndarray, list[str], int]:
        """Which of ``ids`` (rows bound for data file ``key``) to write: not twice in this flush (``seen``),
        not already in another file of the lake (``recent``, the window's index, or ``existing``, the
        lake partition's). An id already in ``key`` itself is a replayed offset range, written again. An id
        found in the lake partition's files but not in the index (a crash between a flush's data and its index)
        gets an entry in ``index``. Returns the rows to keep, their ids and how many of them were replayed."""
        if (len(set(ids)) == len(ids) and seen.keys().isdisjoint(ids) and recent.keys().isdisjoint(ids)
                and existing.keys().isdisjoint(ids)):  # the usual case, every id new: no loop per row
            seen.update(dict.fromkeys(ids, key))
            return np.ones(len(ids), dtype=bool), ids, 0
        keep = np.zeros(len(ids), dtype=bool)
        kept_ids, replayed = [], 0
        for i, eid in enumerate(ids):
            if eid in seen:  # twice in this flush
                stats.duplicates += 1
                continue
            prior = recent.get(eid)
            if prior is None and eid in existing:
                prior = f"{prefix}/{existing[eid]}"
                if prior != key:  # in the lake but not in the index: this flush's index records it
                    index[eid] = prior
            if prior is not None and prior != key:  # already in the lake, in another file
                seen[eid] = prior
                stats.duplicates += 1
                continue
            if prior is not None:  # a replayed offset range: the same file is written again
                replayed += 1
            seen[eid] = key
            kept_ids.append(eid)
            keep[i] = True
        return keep, kept_ids, replayed

    def _maintain_index(self, now_hour: datetime) -> None:
        """Once an hour: compact the id index of past hours into one file each, delete hours outside the
        window. Hours that may still get files (this one and the previous) are left alone."""
        try:
            for key in self.storage.list(ID_INDEX_ROOT + "/"):
                m = re.search(r"dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/", key)
                if m and datetime.fromisoformat(f"{m.group(1)}T{m.group(2)}:00:00+00:00") < (
                        now_hour - self.dedupe_window - timedelta(hours=1)):
                    self.storage.delete(key)
            for hour in sorted(h for h in self._recent_by_hour if h < now_hour - timedelta(hours=1)):
                keys = [k for k in self.storage.list(id_index_prefix(hour) + "/") if k.endswith(".parquet")]
                if len(keys) > 1:
                    tables = [pq.read_table(io.BytesIO(self.storage.get_bytes(k))) for k in keys]
                    self.storage.put_bytes(f"{id_index_prefix(hour)}/compacted-{uuid.uuid4().hex}.parquet",
                                           parquet_bytes(pa.concat_tables(tables)))
                    for k in keys:
                        self.storage.delete(k)
        except Exception as e:  # housekeeping: never a reason to stop ingestion
            log.warning("id index maintenance failed (%s: %s); will retry next hour", type(e).__name__, e)


def events_table(event_type: str, rows: list[tuple[AnyEvent, int]], topic: str, partition: int) -> pa.Table:
    """Column by column from the models' attributes: about 3x faster than ``model_dump`` + ``from_pylist``."""
    schema = SCHEMAS[event_type]
    events = [event for event, _ in rows]
    columns = []
    for f in schema:
        if f.name == "kafka_topic":
            columns.append(pa.array([topic] * len(rows), f.type))
        elif f.name == "kafka_partition":
            columns.append(pa.array([partition] * len(rows), f.type))
        elif f.name == "kafka_offset":
            columns.append(pa.array([offset for _, offset in rows], f.type))
        elif f.name == "event_id":
            columns.append(pa.array([str(e.event_id) for e in events], f.type))
        elif f.name in _UUID_FIELDS[event_type]:
            columns.append(pa.array([None if (v := getattr(e, f.name)) is None else str(v) for e in events], f.type))
        elif pa.types.is_list(f.type):  # prompt messages
            columns.append(pa.array([[{"role": m.role, "content": m.content} for m in getattr(e, f.name)]
                                     for e in events], f.type))
        else:
            columns.append(pa.array([getattr(e, f.name) for e in events], f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _in_offset_order(table: pa.Table) -> pa.Table:
    """Rows by (Kafka partition, offset): one order for the same records however they were buffered."""
    partitions = table.column("kafka_partition").to_numpy()
    offsets = table.column("kafka_offset").to_numpy()
    if len(offsets) < 2:
        return table
    step_p, step_o = np.diff(partitions), np.diff(offsets)
    if ((step_p > 0) | ((step_p == 0) & (step_o > 0))).all():  # already in order (the usual case)
        return table
    return table.take(np.lexsort((offsets, partitions)))


def _split(table: pa.Table) -> list[tuple[tuple[str, int, datetime], pa.Table]]:
    """A table's rows by (Kafka topic, Kafka partition, hour of ``occurred_at``)."""
    if table.num_rows == 0:
        return []
    hours = pc.floor_temporal(table.column("occurred_at"), unit="hour").combine_chunks().dictionary_encode()
    topics = table.column("kafka_topic").combine_chunks().dictionary_encode()
    partitions = table.column("kafka_partition").to_numpy()
    keys = (topics.indices.to_numpy().astype(np.int64) * (1 << 20) + partitions.astype(np.int64)) * (1 << 20)
    keys += hours.indices.to_numpy()
    unique, inverse = np.unique(keys, return_inverse=True)
    out = []
    for code in range(len(unique)):
        rows = np.flatnonzero(inverse == code)
        first = int(rows[0])
        hour = hours.dictionary[hours.indices[first].as_py()].as_py()
        out.append(((topics.dictionary[topics.indices[first].as_py()].as_py(), int(partitions[first]), hour),
                    table.take(pa.array(rows))))
    return out


def _in_range(path: str, start: datetime | None, end: datetime | None) -> bool:
    m = re.search(r"dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/", path)
    if not m:
        return False
    hour = datetime.fromisoformat(f"{m.group(1)}T{m.group(2)}:00:00+00:00")
    return (start is None or hour >= start.replace(minute=0, second=0, microsecond=0)) and (end is None or hour < end)


def list_files(storage: Storage, event_type: str, start: datetime | None = None, end: datetime | None = None,
               *, held: str | None = None) -> list[str]:
    """Lake files of one event type (in the quarantine area for reason ``held``) whose hour partition
    overlaps ``[start, end)``."""
    keys = storage.list(f"{type_root(event_type, held)}/")
    return [k for k in keys if k.endswith(".parquet") and _in_range(k, start, end)]


def held_reasons(storage: Storage) -> list[str]:
    """The reasons that have a quarantine area in this lake (one listing of the area's top level)."""
    return sorted({m.group(1) for k in storage.list(f"{QUARANTINE_ROOT}/")
                   if (m := re.match(rf"{QUARANTINE_ROOT}/reason=([^/]+)/", k))})


def read_events(
    storage: Storage, event_type: str, start: datetime | None = None, end: datetime | None = None,
    *, held: str | None = None,
) -> pd.DataFrame:
    """All events of one type in ``[start, end)`` (by ``occurred_at``), one row per ``event_id``; with
    ``held``, the ones the consumer held back for that reason."""
    tables = [pq.read_table(io.BytesIO(storage.get_bytes(k)), schema=SCHEMAS[event_type])
              for k in list_files(storage, event_type, start, end, held=held)]
    table = pa.concat_tables(tables) if tables else SCHEMAS[event_type].empty_table()
    df = table.to_pandas()
    if start is not None:
        df = df[df["occurred_at"] >= pd.Timestamp(start)]
    if end is not None:
        df = df[df["occurred_at"] < pd.Timestamp(end)]
    df = df.sort_values(["occurred_at", "kafka_partition", "kafka_offset"], kind="stable")
    return df.drop_duplicates("event_id", keep="first").reset_index(drop=True)


def count_events(storage: Storage) -> dict[str, int]:
    """Rows per event type (after dropping duplicate ids) across the whole lake, held-back ones included."""
    reasons = held_reasons(storage)
    return {t: len(read_events(storage, t)) + sum(len(read_events(storage, t, held=r)) for r in reasons)
            for t in EVENT_TYPES}


def wait_for_events(storage: Storage, event_ids: set[str], *, since: datetime | None = None,
                    timeout: float = 120.0, poll_s: float = 1.0) -> set[str]:
    """Wait until every id in ``event_ids`` (events that occurred at or after ``since``) is in the lake
    (in the event tables or the quarantine area);
    returns the ids still missing when ``timeout`` ran out (empty when all landed)."""
    deadline = time.monotonic() + timeout
    while True:
        landed: set[str] = set()
        for held in [None, *held_reasons(storage)]:
            for t in EVENT_TYPES:
                landed.update(read_events(storage, t, since, held=held)["event_id"])
        missing = event_ids - landed
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(poll_s)
