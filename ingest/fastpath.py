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

import io
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
_UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
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
# column is only fine when the key was left out. Checked on the raw bytes of those rows only.
_DEFAULTED = {t: [(c.name, f'"{c.name}"'.encode()) for c in cols if not c.required and not c.nullable
                  and c.kind != "literal"] for t, cols in COLUMNS.items()}


@dataclass
class Decoded:
    """One poll, decoded column-wise: ``tables`` hold accepted rows per event type in the lake's schema with
    the Kafka lineage filled in; ``held`` maps a row of those tables to a filter's reason (the quarantine
    area); ``slow`` are the positions (in the poll) that need the per-record path."""

    tables: dict[str, pa.Table] = field(default_factory=dict)
    held: dict[str, list[str | None]] = field(default_factory=dict)
    slow: list[int] = field(default_factory=list)


def _read(values: list[bytes], schema: pa.Schema, unexpected: str) -> pa.Table | None:
    try:
        table = pj.read_json(io.BytesIO(b"\n".join(values)), read_options=pj.ReadOptions(use_threads=False),
                             parse_options=pj.ParseOptions(explicit_schema=schema,
                                                           unexpected_field_behavior=unexpected))
    except (pa.ArrowInvalid, UnicodeDecodeError, ValueError):
        return None
    return table if table.num_rows == len(values) else None  # blank or two objects on a line


def _read_rows(values: list[bytes], rows: list[int], schema: pa.Schema, unexpected: str,
               slow: list[int]) -> tuple[list[int], pa.Table | None]:
    """Read ``rows`` of ``values``; a read that fails is bisected so that only the rows that fail alone go
    to ``slow``. Returns the rows read, in order, and their table."""
    if not rows:
        return [], None
    table = _read([values[i] for i in rows], schema, unexpected)
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


def _ok_string(arr: pa.ChunkedArray, col: Column) -> pa.ChunkedArray:
    ok = pc.is_valid(arr)
    if col.kind == "literal":
        ok = pc.and_(ok, pc.is_in(arr, value_set=pa.array(col.literals, pa.string())))
    elif col.kind == "uuid":
        ok = pc.and_(ok, pc.match_substring_regex(arr, _UUID))
    elif col.kind == "time":
        ok = pc.and_(ok, pc.match_substring_regex(arr, _RFC3339))
    else:
        length = pc.utf8_length(arr)
        if col.min_len is not None:
            ok = pc.and_(ok, pc.greater_equal(length, col.min_len))
        if col.max_len is not None:
            ok = pc.and_(ok, pc.less_equal(length, col.max_len))
        if col.pattern is not None:
            ok = pc.and_(ok, pc.match_substring_regex(arr, col.pattern))
    ok = pc.fill_null(ok, False)
    return pc.or_(ok, pc.is_null(arr)) if col.nullable else ok


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
        good = pc.is_valid(flat)
        for sub, c in (("role", _MSG_ROLE), ("content", _MSG_CONTENT)):
            good = pc.and_(good, _ok_string(pa.chunked_array([pc.struct_field(flat, sub)]), c))
        bad = ~pc.fill_null(good, False).to_numpy(zero_copy_only=False)
        ok[np.unique(parents[bad])] = False
    if col.nullable:
        ok |= ~pc.is_valid(arr).to_numpy(zero_copy_only=False)
    return np.asarray(ok[:n], dtype=bool)


def _accepted(event_type: str, table: pa.Table, raw: list[bytes]) -> np.ndarray:
    """The rows the models would accept: every field constraint and cross-field rule, column-wise."""
    ok = np.ones(table.num_rows, dtype=bool)
    n = table.num_rows
    alike: dict[Column, list[str]] = {}  # columns under the same constraints are checked as one array
    for col in COLUMNS[event_type]:
        if col.kind in ("str", "uuid", "time") or (col.kind == "literal" and (col.required or col.nullable)):
            alike.setdefault(replace(col, name=""), []).append(col.name)
    for col, names in alike.items():
        joined = pa.chunked_array([c for name in names for c in table.column(name).chunks], pa.string())
        ok &= _ok_string(joined, col).to_numpy(zero_copy_only=False).reshape(len(names), n).all(axis=0)
    for col in COLUMNS[event_type]:
        arr = table.column(col.name)
        if col.kind == "messages":
            ok &= _ok_messages(arr, col)
        elif col.kind == "int":
            given = pc.is_valid(arr).to_numpy(zero_copy_only=False)
            ok &= ~given | pc.fill_null(pc.is_in(arr, value_set=pa.array(sorted(SUPPORTED_VERSIONS), pa.int64())),
                                        False).to_numpy(zero_copy_only=False)
    for name, key in _DEFAULTED[event_type]:  # null given explicitly is not the default
        for i in np.flatnonzero(ok & ~pc.is_valid(table.column(name)).to_numpy(zero_copy_only=False)):
            if key in raw[i] or b"\\u" in raw[i]:  # the key, or an escape that may spell it
                ok[i] = False
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


def decode_batch(values: list[bytes | None], topics: list[str], partitions: list[int], offsets: list[int],
                 rules: QualityRules, now: datetime | None = None,
                 screen: Callable[[str, list[str], list[str] | None], list[str | None]] | None = None) -> Decoded:
    """Decode a poll column-wise (see the module docstring). ``screen(type, user_ids, corrected_texts)``
    gives each accepted row's hold reason or ``None`` (``ingest.filters.StreamScreen.screen_rows``)."""
    now = now or datetime.now(UTC)
    out = Decoded()
    candidates: list[int] = []
    for i, v in enumerate(values):
        if v is None or len(v) > MAX_RECORD_BYTES or b"\n" in v or b"\r" in v:
            out.slow.append(i)
        else:
            candidates.append(i)
    raw: list[bytes] = values  # type: ignore[assignment]  # None only at positions in out.slow
    by_type: dict[str, list[int]] = {}
    for i in candidates:  # the type as written; the read below checks it (a wrong guess goes the slow way)
        m = _TYPE_KEY.search(raw[i])
        if m is not None and (t := _TYPE_NAMES.get(m.group(1))) is not None:
            by_type.setdefault(t, []).append(i)
        else:
            out.slow.append(i)
    part = np.asarray(partitions, dtype=np.int32)
    topic_column = pa.array(topics, pa.string())
    offs = np.asarray(offsets, dtype=np.int64)
    for event_type, positions in by_type.items():
        got, table = _read_rows(raw, positions, PARSE_SCHEMAS[event_type], "error", out.slow)
        if table is None:
            continue
        ok = _accepted(event_type, table, [raw[i] for i in got])
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


