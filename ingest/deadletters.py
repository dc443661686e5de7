"""The local dead-letter file: the last resort for a record that no broker will take.

Two writers park records here instead of stopping the records behind them:

- the consumer, when the dead-letter *topic* refused a record after a bounded number of retries
  (``ingest.jsonl``);
- the API's spool drainer, when the broker refused a spooled event for good, e.g. ``MSG_SIZE_TOO_LARGE``
  (``spool.jsonl``).

One JSON object a line: ``parked_at``, ``reason``, ``detail``, ``source`` (topic/partition/offset or spool
segment), ``size``, ``sha256`` and the whole value base64-encoded, so an operator can inspect and replay it
(``flywheel dead-letters`` lists them). Each append is fsynced before the caller moves on. Every park counts in
``flywheel_dead_letters_parked_total`` and logs an ERROR line: both are meant to page someone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParkedRecord:
    parked_at: str
    reason: str
    detail: str
    source: dict[str, Any]
    size: int
    sha256: str
    key: bytes | None
    value: bytes


class LocalDeadLetters:
    """An append-only, fsynced JSON-lines file of records set aside with their reason."""

    def __init__(self, path: str | Path, *, counter: Any = None):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._counter = counter  # a prometheus Counter with a "reason" label, or None

    def park(self, key: bytes | None, value: bytes, reason: str, detail: str, source: dict[str, Any]) -> None:
        line = {
            "parked_at": datetime.now(UTC).isoformat(),
            "reason": reason,
            "detail": detail[:4000],
            "source": source,
            "size": len(value),
            "sha256": hashlib.sha256(value).hexdigest(),
            "key_b64": base64.b64encode(key).decode() if key is not None else None,
            "value_b64": base64.b64encode(value).decode(),
        }
        data = (json.dumps(line) + "\n").encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if self._counter is not None:
            self._counter.labels(reason).inc()
        log.error("parked a record in %s (reason %s, %d bytes, source %s): %s", self.path, reason, len(value),
                  source, detail[:200])


def read_parked(path: str | Path) -> Iterator[ParkedRecord]:
    """The records parked in one file, oldest first (a torn last line from a crash is skipped)."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, "rb") as f:
        for raw in f:
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            yield ParkedRecord(d["parked_at"], d["reason"], d["detail"], d["source"], d["size"], d["sha256"],
                               base64.b64decode(d["key_b64"]) if d.get("key_b64") else None,
                               base64.b64decode(d["value_b64"]))
