"""Column-wise decoding of one poll: the common case with no Python object per event.

The contract's pydantic models (``flywheel.events``) are the authority on what a valid event is; they cost
a Python object and a Python call per event. Most records of a healthy topic are plainly valid, so a poll is
first decoded the way a columnar engine would:

    each value's ``type`` found in its bytes -> each type's values joined into newline-delimited JSON -> Arrow's
    C++ JSON reader with that type's exact schema (an unknown field fails the read; ``type`` is checked again)
    -> every field constraint, cross-field rule and data-quality rule checked as a column expression
    -> the rows that pass everything become an Arrow table in the lake's schema

Anything the fast path is not sure of goes to the per-record path (``ingest.consumer.validate_records``),
which gives the exact verdict and reason: a value with a newline in it (it would split the batch), a
timestamp or UUID not in the canonical form, a read that fails (a poison record; the batch is bisected so
that only the failing rows leave), a row that breaks any rule (its dead-letter reason comes from the models).
So the fast path only ever *accepts*, and accepts only rows the models would accept with the same values:
``tests/unit/test_fastpath.py`` fuzzes that property against the models.

The schemas and constraints are derived from the contract's models at import (field types, lengths,
patterns, literals, defaults) and its :data:`flywheel.events.CROSS_FIELD_RULES`; nothing is restated here.
"""

from __future__ import annotations

import re
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, get_args, get_origin

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
from annotated_types import MaxLen, MinLen
from pydantic import AwareDatetime

from flywheel.events import (
    CROSS_FIELD_RULES,
    EVENT_MODELS,
    EVENT_TYPES,
    MAX_RECORD_BYTES,
    SUPPORTED_VERSIONS,
    Differ,
    Message,
)
from ingest.lake import SCHEMAS
from ingest.validation import QualityRules, failing_rows

# Canonical forms only (what every client library writes); anything else takes the per-record path, where
# the models accept the other forms they know (upper-case or brace UUIDs, timestamps with a space, ...).
UUID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_RFC3339 = (r"^(19[7-9][0-9]|2[0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]"
            r"(\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$")
_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


@dataclass(frozen=True)
class Column:
    """One field of one event type, as the contract declares it."""

    name: str
    kind: str  # "str" | "literal" | "uuid" | "time" | "int" | "messages"
    required: bool  # no default: the key must be there and not null
    nullable: bool  # ``None`` is a valid value (an optional field)
    min_len: int | None = None
    max_len: int | None = None
    pattern: str | None = None
    literals: tuple[str, ...] = ()
    free_text: bool = False  # counts toward the data-quality text length (``_Event.texts``)

    @property
    def arrow_type(self) -> pa.DataType:
        return {"int": pa.int64(), "messages": pa.list_(_MESSAGE)}.get(self.kind, pa.string())


def _unwrap(annotation: Any) -> tuple[Any, list[Any], bool]:
    """(base type, constraint metadata, accepts None) of a field annotation."""
    metadata: list[Any] = []
    nullable = False
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(get_args(annotation))
        (annotation,) = args
    if get_origin(annotation) is typing.Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            metadata.extend(getattr(item, "metadata", [item]))
    return annotation, metadata, nullable


def _column(name: str, info: Any) -> Column:
    base, metadata, nullable = _unwrap(info.annotation)
    metadata = [*info.metadata, *metadata]
    min_len = next((m.min_length for m in metadata if isinstance(m, MinLen)), None)
    max_len = next((m.max_length for m in metadata if isinstance(m, MaxLen)), None)
    pattern = next((m.pattern for m in metadata if getattr(m, "pattern", None)), None)
    required = info.is_required()
    if get_origin(base) is typing.Literal:
        return Column(name, "literal", required, nullable, literals=tuple(get_args(base)))
    if base is uuid.UUID:
        return Column(name, "uuid", required, nullable)
    if base in (datetime, AwareDatetime):
        return Column(name, "time", required, nullable)
    if base is int:
        return Column(name, "int", required, nullable)
    if get_origin(base) is list and get_args(base) == (Message,):
        return Column(name, "messages", required, nullable, min_len, max_len, free_text=True)
    if base is str:
        return Column(name, "str", required, nullable, min_len, max_len, pattern, free_text=pattern is None)
    raise TypeError(f"the fast path does not know the field type of {name}: {info.annotation!r}")


COLUMNS: dict[str, list[Column]] = {t: [_column(n, i) for n, i in EVENT_MODELS[t].model_fields.items()]
                                    for t in EVENT_TYPES}
PARSE_SCHEMAS = {t: pa.schema([pa.field(c.name, c.arrow_type) for c in cols]) for t, cols in COLUMNS.items()}
# Inside a JSON string every quote is escaped, so this matches keys only: the first ``"type"`` key and its value.
_TYPE_KEY = re.compile(rb'"type"\s*:\s*"([a-z]{1,20})"')
_TYPE_NAMES = {t.encode(): t for t in PARSE_SCHEMAS}
_MSG_ROLE = _column("role", Message.model_fields["role"])
_MSG_CONTENT = _column("content", Message.model_fields["content"])
# A field with a default other than None (schema_version): JSON null is not the default, so a null in the
# column is only fine when the key was left out. Checked on the batch's raw bytes (``_rows_with_keys``).
_DEFAULTED = {t: [(c.name, f'"{c.name}"'.encode()) for c in cols if not c.required and not c.nullable
                  and c.kind != "literal"] for t, cols in COLUMNS.items()}
_HEX = np.zeros(256, dtype=bool)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = True
_UUID_DASHES = np.array([8, 13, 18, 23])
_UUID_HEX = np.setdiff1d(np.arange(36), _UUID_DASHES)
_CHAR_CLASS = re.compile(r"\^\[([^\]\\]+)\]\+\$")  # ^[...]+$ with no escapes in the class


def _ascii_class(pattern: str) -> np.ndarray | None:
    """For a pattern that is one character class repeated (``^[A-Za-z0-9._-]+$``), the bytes it allows, as a
    lookup table: a value matches if it is not empty and every byte is allowed. Only ASCII bytes are ever
    allowed, so a value with any other character goes to the regex's verdict through the slow path (the
    table can only say no where the regex would say yes, never the other way round). ``None`` for any
    other pattern."""
    m = _CHAR_CLASS.fullmatch(pattern)
    if m is None:
        return None
    klass = re.compile(f"[{m.group(1)}]")
    return np.array([b < 128 and klass.fullmatch(chr(b)) is not None for b in range(256)])


_CLASSES = {c.pattern: _ascii_class(c.pattern) for cols in COLUMNS.values() for c in cols if c.pattern}


def _mask(x: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A boolean Arrow result as a numpy mask, nulls False."""
    return np.asarray(pc.fill_null(x, False).to_numpy(zero_copy_only=False), dtype=bool)


def _bytes_of(arr: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """The UTF-8 bytes of a string column and each row's (start, end) in them, without a copy per row."""
    flat = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if len(flat) == 0:
        return np.zeros(0, np.uint8), np.zeros(1, np.int32)
    offsets = np.frombuffer(flat.buffers()[1], np.int32)[flat.offset:flat.offset + len(flat) + 1]
    data = flat.buffers()[2]
    raw = np.frombuffer(data, np.uint8)[offsets[0]:offsets[-1]] if data is not None else np.zeros(0, np.uint8)
    return raw, offsets - offsets[0]


def matches_pattern(arr: pa.ChunkedArray, pattern: str) -> np.ndarray:
    """Which values match ``pattern`` (nulls: False). A one-class pattern is checked on the column's bytes
    with a lookup table (one pass for the whole column); any other with RE2."""
    lut = _CLASSES.get(pattern)
    if lut is None:
        return _mask(pc.match_substring_regex(arr, pattern))
    raw, offsets = _bytes_of(arr)
    ok = offsets[1:] > offsets[:-1]
    ok[np.searchsorted(offsets, np.flatnonzero(~lut[raw]), side="right") - 1] = False
    return ok


def canonical_uuids(arr: pa.ChunkedArray) -> np.ndarray:
    """Which values are UUIDs in the canonical form (lower-case hex, dashes at 8, 13, 18, 23). A column of
    36-byte values is checked as one 36-column byte matrix; otherwise RE2 decides."""
    raw, offsets = _bytes_of(arr)
    if len(offsets) < 2 or not (np.diff(offsets) == 36).all():
        return _mask(pc.match_substring_regex(arr, UUID_PATTERN))
    grid = raw.reshape(-1, 36)
    return np.asarray((grid[:, _UUID_DASHES] == ord("-")).all(axis=1) & _HEX[grid[:, _UUID_HEX]].all(axis=1), dtype=bool)


def _rows_with_keys(joined: bytes, ends: np.ndarray, key: bytes) -> np.ndarray:
    """The rows of a newline-joined batch (row ``r`` ends at ``ends[r]``) whose bytes may hold the object
    key ``key``: written plainly, or spelt with an escape of an ASCII letter, digit or underscore
    (``\\u0061``; JSON writers escape only other characters, so such an escape is rare and suspect)."""
    flagged = np.zeros(len(ends), dtype=bool)
    pos = joined.find(key)
    while pos >= 0:
        row = int(np.searchsorted(ends, pos, side="right"))
        flagged[row] = True
        pos = joined.find(key, int(ends[row])) if row + 1 < len(ends) else -1
    buf = np.frombuffer(joined, np.uint8)
    slashes = np.flatnonzero(buf[:-5] == ord("\\"))
    if len(slashes):
        escaped = slashes[(buf[slashes + 1] == ord("u")) & (buf[slashes + 2] == ord("0")) & (buf[slashes + 3] == ord("0"))
                          & (buf[slashes + 4] >= ord("3")) & (buf[slashes + 4] <= ord("7"))]
        flagged[np.searchsorted(ends, escaped, side="right")] = True
    return flagged


@dataclass
class Decoded:
    """One poll, decoded column-wise: ``tables`` hold accepted rows per event type in the lake's schema with
    the Kafka lineage filled in; ``held`` maps a row of those tables to a filter's reason (the quarantine
    area); ``slow`` are the positions (in the poll) that need the per-record path."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    held: dict[str, list[str | None]] = field(default_factory=dict)
    slow: list[int] = field(default_factory=list)


def _read(joined: bytes, rows: int, schema: pa.Schema, unexpected: str) -> pa.Table | None:
    """``rows`` values joined by newlines, none of which holds a newline, as one table (``None``: the read
    failed or did not give one row a value)."""
    try:
        table = pj.read_json(pa.BufferReader(joined), read_options=pj.ReadOptions(use_threads=False),
                             parse_options=pj.ParseOptions(explicit_schema=schema,
                                                           unexpected_field_behavior=unexpected))
    except (pa.ArrowInvalid, UnicodeDecodeError, ValueError):
        return None
    return table if table.num_rows == rows else None  # blank or two objects on a line


def _read_rows(values: list[bytes], rows: list[int], schema: pa.Schema, unexpected: str,
               slow: list[int], joined: bytes | None = None) -> tuple[list[int], pa.Table | None]:
    """Read ``rows`` of ``values`` (``joined``: those values already joined by newlines); a read that fails
    is bisected so that only the rows that fail alone go to ``slow``. Returns the rows read, in order, and
    their table."""
    if not rows:
        return [], None
    if joined is None:
        joined = b"\n".join([values[i] for i in rows])
    table = _read(joined, len(rows), schema, unexpected)
    if table is not None:
        return rows, table
    if len(rows) == 1:
        slow.append(rows[0])
        return [], None
    half = len(rows) // 2
    got_a, a = _read_rows(values, rows[:half], schema, unexpected, slow)
    got_b, b = _read_rows(values, rows[half:], schema, unexpected, slow)
    parts = [t for t in (a, b) if t is not None]
    return got_a + got_b, (pa.concat_tables(parts) if parts else None)


def _ok_string(arr: pa.ChunkedArray, col: Column) -> np.ndarray:
    """Which values of a string column meet ``col``'s constraints (a null: only where ``col`` allows it)."""
    valid = _mask(pc.is_valid(arr))
    ok = valid.copy()
    if col.kind == "literal":
        ok &= _mask(pc.is_in(arr, value_set=pa.array(col.literals, pa.string())))
    elif col.kind == "uuid":
        ok &= canonical_uuids(arr)
    elif col.kind == "time":
        ok &= _mask(pc.match_substring_regex(arr, _RFC3339))
    else:
        length = pc.utf8_length(arr)
        if col.min_len is not None:
            ok &= _mask(pc.greater_equal(length, col.min_len))
        if col.max_len is not None:
            ok &= _mask(pc.less_equal(length, col.max_len))
        if col.pattern is not None:
            ok &= matches_pattern(arr, col.pattern)
    return ok | ~valid if col.nullable else ok


def _ok_messages(arr: pa.ChunkedArray, col: Column) -> np.ndarray:
    arr = arr.combine_chunks()
    n = len(arr)
    ok = pc.fill_null(pc.is_valid(arr), False).to_numpy(zero_copy_only=False).copy()
    length = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    if col.min_len is not None:
        ok &= length >= col.min_len
    if col.max_len is not None:
        ok &= length <= col.max_len
    flat = pc.list_flatten(arr)
    if len(flat):
        parents = pc.list_parent_indices(arr).to_numpy(zero_copy_only=False)
        good = pc.is_valid(flat).to_numpy(zero_copy_only=False)
        for sub, c in (("role", _MSG_ROLE), ("content", _MSG_CONTENT)):
            good &= _ok_string(pa.chunked_array([pc.struct_field(flat, sub)]), c)
        bad = ~good
        ok[np.unique(parents[bad])] = False
    if col.nullable:
        ok |= ~pc.is_valid(arr).to_numpy(zero_copy_only=False)
    return np.asarray(ok[:n], dtype=bool)


def _accepted(event_type: str, table: pa.Table, joined: bytes, ends: np.ndarray) -> np.ndarray:
    """The rows the models would accept: every field constraint and cross-field rule, column-wise.
    ``joined``: the rows' values joined by newlines, row ``r`` ending at ``ends[r]``."""
    ok = np.ones(table.num_rows, dtype=bool)
    n = table.num_rows
    alike: dict[Column, list[str]] = {}  # columns under the same constraints are checked as one array
    for col in COLUMNS[event_type]:
        if col.kind in ("str", "uuid", "time") or (col.kind == "literal" and (col.required or col.nullable)):
            alike.setdefault(replace(col, name=""), []).append(col.name)
    for col, names in alike.items():
        stacked = pa.chunked_array([c for name in names for c in table.column(name).chunks], pa.string())
        ok &= _ok_string(stacked, col).reshape(len(names), n).all(axis=0)
    for col in COLUMNS[event_type]:
        arr = table.column(col.name)
        if col.kind == "messages":
            ok &= _ok_messages(arr, col)
        elif col.kind == "int":
            given = pc.is_valid(arr).to_numpy(zero_copy_only=False)
            ok &= ~given | pc.fill_null(pc.is_in(arr, value_set=pa.array(sorted(SUPPORTED_VERSIONS), pa.int64())),
                                        False).to_numpy(zero_copy_only=False)
    for name, key in _DEFAULTED[event_type]:  # null given explicitly is not the default
        missing = ok & ~pc.is_valid(table.column(name)).to_numpy(zero_copy_only=False)
        if missing.any():
            ok &= ~(missing & _rows_with_keys(joined, ends, key))
    for rule in CROSS_FIELD_RULES.get(event_type, ()):
        a, b = table.column(rule.a), table.column(rule.b)
        if isinstance(rule, Differ):
            same = pc.fill_null(pc.equal(a, b), False)
            ok &= ~same.to_numpy(zero_copy_only=False)
        else:
            when = pc.fill_null(pc.equal(b, rule.value), False).to_numpy(zero_copy_only=False)
            ok &= when == pc.is_valid(a).to_numpy(zero_copy_only=False)
    return ok


def _text_chars(event_type: str, table: pa.Table) -> np.ndarray:
    """The longest free-text field of each row (what ``_Event.texts`` returns), in characters."""
    out = np.zeros(table.num_rows, dtype=np.int64)
    for col in COLUMNS[event_type]:
        if not col.free_text:
            continue
        arr = table.column(col.name).combine_chunks()
        if col.kind == "messages":
            flat = pc.list_flatten(arr)
            if len(flat):
                lengths = pc.fill_null(pc.utf8_length(pc.struct_field(flat, "content")), 0).to_numpy(zero_copy_only=False)
                np.maximum.at(out, pc.list_parent_indices(arr).to_numpy(zero_copy_only=False), lengths)
        else:
            out = np.maximum(out, pc.fill_null(pc.utf8_length(arr), 0).to_numpy(zero_copy_only=False))
    return out


def _to_lake(event_type: str, table: pa.Table, timestamps: pa.ChunkedArray, topics: pa.Array,
             partitions: np.ndarray, offsets: np.ndarray) -> pa.Table:
    columns = []
    for f in SCHEMAS[event_type]:
        if f.name == "kafka_topic":
            columns.append(topics.cast(f.type))
        elif f.name == "kafka_partition":
            columns.append(pa.array(partitions, f.type))
        elif f.name == "kafka_offset":
            columns.append(pa.array(offsets, f.type))
        elif f.name == "occurred_at":
            columns.append(timestamps)
        elif f.name == "schema_version":
            columns.append(pc.fill_null(table.column(f.name), EVENT_MODELS[event_type].model_fields[f.name].default))
        else:
            columns.append(table.column(f.name).cast(f.type))
    return pa.Table.from_arrays(columns, schema=SCHEMAS[event_type])


def _joined(values: list[bytes], rows: list[int], slow: list[int]) -> tuple[bytes, list[int]]:
    """``rows`` of ``values`` joined by newlines, for a newline-delimited read; a value that holds a line
    break itself (it would split into two rows) goes to ``slow``, and the rest are returned."""
    joined = b"\n".join([values[i] for i in rows])
    if b"\r" not in joined and np.count_nonzero(np.frombuffer(joined, np.uint8) == ord("\n")) == len(rows) - 1:
        return joined, rows
    broken = {i for i in rows if b"\n" in values[i] or b"\r" in values[i]}
    slow.extend(broken)
    rows = [i for i in rows if i not in broken]
    return b"\n".join([values[i] for i in rows]), rows


def decode_batch(values: list[bytes | None], topics: list[str], partitions: list[int], offsets: list[int],
                 rules: QualityRules, now: datetime | None = None,
                 screen: Callable[[str, list[str], list[str] | None], list[str | None]] | None = None) -> Decoded:
    """Decode a poll column-wise (see the module docstring). ``screen(type, user_ids, corrected_texts)``
    gives each accepted row's hold reason or ``None`` (``ingest.filters.StreamScreen.screen_rows``)."""
    now = now or datetime.now(UTC)
    out = Decoded()
    raw: list[bytes] = values  # type: ignore[assignment]  # None only at positions in out.slow
    candidates: list[int] | range = range(len(values))
    if None in values:
        lengths = np.array([-1 if v is None else len(v) for v in values], dtype=np.int64)
    else:
        lengths = np.fromiter(map(len, raw), np.int64, len(raw))
    if len(values) and (lengths.min() < 0 or lengths.max() > MAX_RECORD_BYTES):
        fits = (lengths >= 0) & (lengths <= MAX_RECORD_BYTES)
        candidates = np.flatnonzero(fits).tolist()
        out.slow.extend(np.flatnonzero(~fits).tolist())
    # The type as written (a wrong guess goes the slow way: the read checks it again); the search is the one
    # step taken per record.
    names = np.array([m.group(1) if (m := _TYPE_KEY.search(raw[i])) is not None else b"" for i in candidates],
                     dtype="S20")
    where = np.asarray(candidates, dtype=np.int64)
    known = np.zeros(len(names), dtype=bool)
    by_type: dict[str, list[int]] = {}
    for name, t in _TYPE_NAMES.items():
        hit = names == name
        if hit.any():
            by_type[t] = where[hit].tolist()
            known |= hit
    out.slow.extend(where[~known].tolist())
    part = np.asarray(partitions, dtype=np.int32)
    topic_column = pa.array(topics, pa.string())
    offs = np.asarray(offsets, dtype=np.int64)
    for event_type, positions in by_type.items():
        joined, positions = _joined(raw, positions, out.slow)
        got, table = _read_rows(raw, positions, PARSE_SCHEMAS[event_type], "error", out.slow, joined)
        if table is None:
            continue
        if got is not positions:  # a row failed to read: the rest are joined again
            joined = b"\n".join([raw[i] for i in got])
        ends = np.cumsum(lengths[got] + 1)
        ok = _accepted(event_type, table, joined, ends)
        ok &= pc.fill_null(pc.equal(table.column("type"), event_type), False).to_numpy(zero_copy_only=False)
        try:  # the pattern makes this all but certain; a failure sends the whole group down the slow path
            timestamps = pc.cast(pc.if_else(pa.array(ok), table.column("occurred_at"), "2000-01-01T00:00:00Z"),
                                 pa.timestamp("us", tz="UTC"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            out.slow.extend(got)
            continue
        quality = {"occurred_at": timestamps.to_pandas(), "text_chars": _text_chars(event_type, table),
                   "blank_correction": np.zeros(table.num_rows, dtype=bool)}
        if event_type == "correction":
            quality["blank_correction"] = np.array([not (t or "").strip()
                                                    for t in table.column("corrected_text").to_pylist()], dtype=bool)
        ok &= ~failing_rows(quality, rules, now)  # a row that breaks a rule: its dead letter comes from the models
        out.slow.extend(g for g, keep in zip(got, ok, strict=True) if not keep)
        keep = np.flatnonzero(ok)
        if not len(keep):
            continue
        picked = table.take(keep)
        positions_kept = np.asarray(got)[keep]
        lake = _to_lake(event_type, picked, timestamps.take(pa.array(keep)), topic_column.take(positions_kept),
                        part[positions_kept], offs[positions_kept])
        out.tables[event_type] = lake
        if screen is not None:
            texts = lake.column("corrected_text").to_pylist() if "corrected_text" in lake.column_names else None
            out.held[event_type] = screen(event_type, lake.column("user_id").to_pylist(), texts)
    out.slow.sort()
    return out


