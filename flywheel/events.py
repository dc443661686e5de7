"""The event contract: the only place that defines what a feedback event is.

Everything that produces or consumes events imports this module: the HTTP API, the producer, the consumer,
validation and curation. A chat service that produces straight to Kafka follows the JSON Schema that
:func:`json_schema` returns (``flywheel schema`` writes it, ``GET /v1/schema`` serves it).

Wire format: one UTF-8 JSON object per Kafka record, discriminated by ``type``. Every event carries

- ``event_id``: a UUID chosen by the client. It is the idempotency key: the lake keeps one row per id, so a
  client may retry a send as often as it likes.
- ``schema_version``: the contract version the producer wrote (currently 1).
- ``occurred_at``: when the user acted, an RFC 3339 timestamp *with* an offset; stored in UTC.
- ``model_version``: the version of the model that produced the response the event is about.

On the Kafka path every field without a default is required, ``event_id`` and ``occurred_at`` included,
because a consumer that invented them would break idempotency on replay. The HTTP API stamps a missing
``event_id``/``occurred_at`` before it publishes (``decode_event(..., stamp=...)``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
"""The contract version this code writes. Readers accept exactly the versions in ``SUPPORTED_VERSIONS``."""
SUPPORTED_VERSIONS = frozenset({1})

# Hard limits of the contract. They protect the pipeline from absurd records; the tunable data-quality
# bounds (future timestamps, text lengths the curation accepts) live in ingest.validation.
MAX_RECORD_BYTES = 1_000_000
"""Largest encoded event (one Kafka record value). Kafka's default ``message.max.bytes`` and the producer's
``max.request.size`` are 1 MiB *including* the key, headers and batch framing, so a value above about 1 MB may
never be deliverable; the API refuses it with 413 and the consumer dead-letters it unparsed."""
MAX_JSON_DEPTH = 200
"""Deepest JSON nesting any reader accepts (the bounded parser's own limit; an event needs 4 levels)."""
MAX_ID_CHARS = 128
MAX_TEXT_CHARS = 100_000
MAX_MESSAGES = 200

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[A-Za-z0-9._:@/-]+$")]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
NonEmptyText = Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]

EVENT_TYPES = ("turn", "thumbs", "regenerate", "correction", "pairwise", "implicit", "review")
EventType = Literal["turn", "thumbs", "regenerate", "correction", "pairwise", "implicit", "review"]
REVIEW_DECISIONS = ("accept", "reject", "fix", "skip")
REVIEW_REASONS = ("unclear", "subjective", "manipulation", "harmful", "factually_wrong")


@dataclass(frozen=True)
class Differ:
    """Two fields of one event that must not be equal (a missing optional one differs from anything)."""

    a: str
    b: str

    @property
    def message(self) -> str:
        return f"{self.a} must differ from {self.b}"

    def holds(self, a: Any, b: Any) -> bool:
        return bool(a != b)


@dataclass(frozen=True)
class OnlyWhen:
    """Field ``a`` is given exactly when field ``b`` equals ``value``."""

    a: str
    b: str
    value: str

    @property
    def message(self) -> str:
        return f"{self.a} is required when {self.b} is {self.value!r} and allowed only then"

    def holds(self, a: Any, b: Any) -> bool:
        return bool((b == self.value) == (a is not None))


CROSS_FIELD_RULES: dict[str, tuple[Differ | OnlyWhen, ...]] = {
    "turn": (Differ("parent_response_id", "response_id"),),
    "regenerate": (Differ("new_response_id", "discarded_response_id"),),
    "pairwise": (Differ("response_a_id", "response_b_id"),),
    "review": (OnlyWhen("reason", "decision", "reject"), OnlyWhen("edited_text", "decision", "fix")),
}
"""The rules that relate two fields of one event, as data: the models check them, and so does the consumer's
column-wise fast path (``ingest.fastpath``), so both read the same rules."""


class Message(BaseModel):
    """One message of the conversation that was shown to the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: Text


def flatten_messages(messages: Any) -> str:
    """A conversation as one text (what curated pairs' ``prompt`` holds and reward models read): the user's
    message alone, or each message as ``role: content``, separated by blank lines."""
    msgs = list(messages)
    if len(msgs) == 1:
        return str(msgs[0]["content"])
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in msgs)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: uuid.UUID = Field(description="Client-chosen UUID; the idempotency key.")
    schema_version: StrictInt = Field(default=SCHEMA_VERSION, description="Contract version; currently 1.")
    occurred_at: AwareDatetime = Field(description="When the user acted; RFC 3339 with an offset.")
    conversation_id: Id
    user_id: Id = Field(description="Pseudonymous user id; never an email or a name.")
    model_version: Id = Field(description="Version of the model that produced the response.")

    def texts(self) -> list[str]:
        """The free-text fields of this event (what length bounds and PII masking apply to)."""
        return []

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v not in SUPPORTED_VERSIONS:
            shown = str(v) if abs(v) < 10**18 else f"with {len(str(abs(v))) if abs(v) < 10**4000 else 'over 4000'} digits"
            raise ValueError(f"unsupported schema_version {shown}; this service reads {sorted(SUPPORTED_VERSIONS)}")
        return v

    @model_validator(mode="after")
    def _cross_field_rules(self) -> _Event:
        for rule in CROSS_FIELD_RULES.get(self.type, ()):  # type: ignore[attr-defined]  # every subclass has one
            if not rule.holds(getattr(self, rule.a), getattr(self, rule.b)):
                raise ValueError(rule.message)
        return self

    @field_validator("occurred_at")
    @classmethod
    def _to_utc(cls, v: datetime) -> datetime:
        try:
            return v.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00:00+01:00 and 9999-12-31T23:59:59-01:00 have no UTC datetime
            raise ValueError("occurred_at lies outside the years 1-9999 once converted to UTC") from None


class Turn(_Event):
    """A chat turn: the messages the model saw and the response it gave."""

    type: Literal["turn"] = "turn"
    response_id: Id
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    response: Text
    parent_response_id: Id | None = Field(
        default=None, description="Set when this turn regenerates an earlier response."
    )

    def texts(self) -> list[str]:
        return [self.response, *(m.content for m in self.messages)]


class Thumbs(_Event):
    """Thumbs up or down on one response."""

    type: Literal["thumbs"] = "thumbs"
    response_id: Id
    value: Literal["up", "down"]
    reason: Annotated[str, Field(max_length=2_000)] | None = None

    def texts(self) -> list[str]:
        return [self.reason] if self.reason else []


class Regenerate(_Event):
    """The user asked for another answer, discarding ``discarded_response_id``."""

    type: Literal["regenerate"] = "regenerate"
    discarded_response_id: Id
    new_response_id: Id | None = Field(default=None, description="The response generated instead, if known.")


class Correction(_Event):
    """The user rewrote the response into what it should have said."""

    type: Literal["correction"] = "correction"
    response_id: Id
    corrected_text: NonEmptyText

    def texts(self) -> list[str]:
        return [self.corrected_text]


class Pairwise(_Event):
    """The user compared two responses to the same prompt; ``tie`` is allowed."""

    type: Literal["pairwise"] = "pairwise"
    response_a_id: Id
    response_b_id: Id
    choice: Literal["a", "b", "tie"]
    model_version_b: Id | None = Field(
        default=None, description="Version that produced response b when it differs from model_version."
    )


class Implicit(_Event):
    """A signal the user gave without rating: copied the answer, continued the chat, or abandoned it."""

    type: Literal["implicit"] = "implicit"
    response_id: Id
    action: Literal["copy", "continue", "abandon"]


class Review(_Event):
    """A reviewer's decision on one item of the review queue (a feedback event routed to review). The chat
    service never sends these: the review endpoints do, for a key with the reviewer role. ``user_id``,
    ``conversation_id`` and ``model_version`` are those of the reviewed feedback (its lineage); ``event_id`` is
    derived from the reviewer, the item and the decision, so sending the same decision again is idempotent."""

    type: Literal["review"] = "review"
    reviewer: Id = Field(description="The reviewer's name (the name of their API key).")
    item_id: Id = Field(description="The review queue item decided on.")
    target_event_id: uuid.UUID = Field(description="The feedback event the item is about.")
    decision: Literal["accept", "reject", "fix", "skip"]
    reason: Literal["unclear", "subjective", "manipulation", "harmful", "factually_wrong"] | None = Field(
        default=None, description="Why it was rejected: required with decision=reject, not allowed otherwise.")
    edited_text: NonEmptyText | None = Field(
        default=None, description="The correction as the reviewer fixed it: required with decision=fix only.")

    def texts(self) -> list[str]:
        return [self.edited_text] if self.edited_text else []


# AnyEvent / AnyFeedback: the types the stages pass around (a validated event is one of these models); Event /
# Feedback: the same unions with the discriminator pydantic validates and documents them by
AnyFeedback = Thumbs | Regenerate | Correction | Pairwise | Implicit
AnyEvent = Turn | AnyFeedback | Review
Event = Annotated[AnyEvent, Field(discriminator="type")]
Feedback = Annotated[AnyFeedback, Field(discriminator="type")]
ClientEvent = Annotated[Turn | AnyFeedback, Field(discriminator="type")]
EVENT_MODELS: dict[str, type[_Event]] = {
    "turn": Turn,
    "thumbs": Thumbs,
    "regenerate": Regenerate,
    "correction": Correction,
    "pairwise": Pairwise,
    "implicit": Implicit,
    "review": Review,
}
FEEDBACK_TYPES = tuple(t for t in EVENT_TYPES if t not in ("turn", "review"))
CLIENT_TYPES = ("turn", *FEEDBACK_TYPES)
"""What the chat service sends (reviews come from the review endpoints only)."""

_event_adapter: TypeAdapter[AnyEvent] = TypeAdapter(Event)
_feedback_adapter: TypeAdapter[AnyFeedback] = TypeAdapter(Feedback)


class EventDecodeError(ValueError):
    """Raised when bytes or a JSON value are not a valid event. ``reason`` is a short machine code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def stamp_defaults(obj: Any, now: datetime | None = None) -> Any:
    """Fill ``event_id`` and ``occurred_at`` when an HTTP client left them out (the server owns them then)."""
    if isinstance(obj, dict):
        obj = dict(obj)
        if obj.get("event_id") is None:
            obj["event_id"] = str(uuid.uuid4())
        if obj.get("occurred_at") is None:
            obj["occurred_at"] = (now or datetime.now(UTC)).isoformat()
    return obj


def validate_event(obj: object, *, feedback_only: bool = False) -> AnyEvent:
    """Validate a decoded JSON value into an event model; raises pydantic's ``ValidationError``."""
    if feedback_only:
        return _feedback_adapter.validate_python(obj)
    return _event_adapter.validate_python(obj)


def validate_feedback_json(data: bytes) -> AnyFeedback:
    """Validate raw JSON bytes as one feedback event in a single pass (pydantic-core parses and validates
    together, no intermediate Python objects); raises pydantic's ``ValidationError`` for anything else,
    including a body that leaves ``event_id`` or ``occurred_at`` to the server."""
    return _feedback_adapter.validate_json(data)


def parse_json(data: bytes, *, max_bytes: int | None = None) -> Any:
    """Parse untrusted JSON with hard bounds; raises :class:`EventDecodeError`, never anything else.

    ``max_bytes`` is checked before a byte is parsed. The parser (pydantic-core's, in Rust) stops at
    :data:`MAX_JSON_DEPTH` levels of nesting and at integers over 4,300 digits with an error instead of
    exhausting the stack or the CPU, rejects NaN/Infinity and lone surrogates, and never recurses in Python.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise EventDecodeError("too_large", f"{len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EventDecodeError("invalid_utf8", f"not UTF-8: {err.reason} at byte {err.start}") from None
    try:
        return pydantic_core.from_json(data, allow_inf_nan=False)
    except ValueError as err:
        message = str(err)
        if message.startswith("recursion limit exceeded"):
            raise EventDecodeError("too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels ({message})") from None
        if message.startswith("number out of range"):
            raise EventDecodeError("number_too_large", f"a JSON number is too large ({message})") from None
        raise EventDecodeError("invalid_json", message) from None


def decode_event(data: bytes, *, max_bytes: int = MAX_RECORD_BYTES) -> AnyEvent:
    """Decode one Kafka record value. Raises :class:`EventDecodeError` with a reason code, and nothing else,
    whatever the bytes: a poison record must become a dead letter, never a crash."""
    if len(data) > max_bytes:  # checked before parsing: a 4 MiB record is not worth a parse
        raise EventDecodeError("too_large", f"record value is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        return _event_adapter.validate_json(data)
    except ValidationError as e:
        first_error = e
    except Exception as e:  # a bug in a validator must not stop the partition: dead-letter the record
        raise EventDecodeError("undecodable", f"{type(e).__name__}: {e}"[:1000]) from None
    # The slow path runs only for bad records: find the most useful reason code.
    obj = parse_json(data)
    if not isinstance(obj, dict):
        raise EventDecodeError("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    if not isinstance(obj.get("type"), str) or obj["type"] not in EVENT_MODELS:  # [] or {} are not hashable
        shown = repr(obj.get("type"))
        shown = shown if len(shown) <= 80 else shown[:80] + f"... ({len(shown)} characters)"
        raise EventDecodeError("unknown_type", f"type={shown}; expected one of {list(EVENT_TYPES)}")
    raise EventDecodeError("schema_violation", format_errors(first_error))


def encode_event(event: _Event) -> bytes:
    """The wire form of an event: compact UTF-8 JSON."""
    return event.model_dump_json(exclude_none=True).encode("utf-8")


def format_errors(e: ValidationError, *, limit: int = 20) -> str:
    """One line per field error, e.g. ``value: Input should be 'up' or 'down'`` (the first ``limit``)."""
    errors = e.errors(include_url=False, include_input=False)
    out = "; ".join(f"{field_path(err['loc'])}: {err['msg']}" for err in errors[:limit])
    return out + (f"; ... {len(errors) - limit} more" if len(errors) > limit else "")


def field_path(loc: tuple[Any, ...]) -> str:
    """``("events", 3, "thumbs", "value")`` -> ``events[3].value``; drops pydantic's union tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in EVENT_MODELS:  # the discriminated-union tag pydantic inserts
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one Kafka record value: any event, discriminated by ``type``."""
    schema = _event_adapter.json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://rlhf-flywheel.dev/schemas/event-v{SCHEMA_VERSION}.json"
    schema["title"] = "rlhf-flywheel event"
    schema["description"] = (__doc__ or "").strip()
    return schema
