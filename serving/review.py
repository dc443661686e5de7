"""The review desk: which queued item a reviewer sees next, and the ``review`` event a decision becomes.

The queue (``pipelines.review``: written by curation) and the decisions already in the lake (``review`` events)
are read from storage at most every ``refresh_s`` seconds; the decisions this process published since are kept
in memory until the lake has them, so a reviewer's progress shows at once although the consumer writes the lake
a few seconds later. A reviewer is offered an item they have not decided yet, that still waits for a reviewer
(one; two for a double item; one more while disputed), and that no other reviewer holds: an item offered is held
for ``lease_s`` seconds, so two reviewers working at once are not shown the same single item.

A decision's ``event_id`` is a UUID derived from the reviewer, the item and the decision itself: sending the same
decision again publishes the same event (with the first ``occurred_at``), which the lake keeps once. A reviewer
who changes their mind sends another decision, another event; the latest counts.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from flywheel.events import Review
from flywheel.settings import Settings
from flywheel.storage import open_storage
from ingest.lake import read_events
from pipelines.review import (
    DECISION_COLUMNS,
    ROUTES,
    empty_items,
    latest_decisions,
    outcomes,
    read_queue,
    review_stats,
    reviewers_needed,
)

_NAMESPACE = uuid.UUID("6f1c2a4e-8d0b-5f7a-9c3e-2b4d6e8f0a1c")


def decision_event_id(reviewer: str, item_id: str, decision: str, reason: str | None, edited: str | None) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, json.dumps([reviewer, item_id, decision, reason, edited]))


class ReviewDesk:
    def __init__(self, settings: Settings, *, refresh_s: float = 5.0, lease_s: float = 600.0):
        self.storage = open_storage(settings.lake.uri, settings.lake)
        self.refresh_s, self.lease_s = refresh_s, lease_s
        self._lock = threading.Lock()
        self._loaded_at = float("-inf")
        self._items = empty_items()
        self._lake = pd.DataFrame(columns=DECISION_COLUMNS)
        self._local: dict[str, dict[str, Any]] = {}  # event_id -> decision row, until the lake has it
        self._leases: dict[str, tuple[str, float]] = {}  # item_id -> (reviewer, until)

    # ------------------------------------------------------------------------------------------ state
    def refresh(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._loaded_at < self.refresh_s:
            return
        items = read_queue(self.storage)
        order = items["route"].map({r: i for i, r in enumerate(ROUTES)})
        items = items.assign(_o=order).sort_values(["_o", "occurred_at", "item_id"], kind="stable") \
            .drop(columns="_o").reset_index(drop=True)
        lake = read_events(self.storage, "review")
        lake = lake.reindex(columns=DECISION_COLUMNS) if len(lake) else pd.DataFrame(columns=DECISION_COLUMNS)
        with self._lock:
            self._items, self._lake, self._loaded_at = items, lake, time.monotonic()
            landed = set(lake["event_id"].astype(str))
            self._local = {k: v for k, v in self._local.items() if k not in landed}

    def decisions(self) -> pd.DataFrame:
        """Every reviewer's latest decision on every item, the lake's and this process's."""
        with self._lock:
            local = pd.DataFrame(list(self._local.values()), columns=DECISION_COLUMNS)
            lake = self._lake
        both = pd.concat([d for d in (lake, local) if len(d)], ignore_index=True) if len(lake) or len(local) \
            else pd.DataFrame(columns=DECISION_COLUMNS)
        if len(both):
            both["occurred_at"] = pd.to_datetime(both["occurred_at"], utc=True)
        return latest_decisions(both.drop_duplicates("event_id", keep="first") if len(both) else both)

    def item(self, item_id: str) -> dict[str, Any] | None:
        self.refresh()
        rows = self._items[self._items["item_id"] == item_id]
        return _public(rows.iloc[0].to_dict()) if len(rows) else None

    def next_item(self, reviewer: str) -> tuple[dict[str, Any] | None, dict[str, int]]:
        """The next item for ``reviewer`` (held for them), or None, and their progress counters."""
        self.refresh()
        decisions = self.decisions()
        mine = set(decisions.loc[decisions["reviewer"] == reviewer, "item_id"])
        real = decisions[decisions["decision"] != "skip"]
        votes = real.groupby("item_id")["reviewer"].nunique().to_dict()
        result = outcomes(decisions)
        now = time.monotonic()
        chosen, waiting = None, 0
        with self._lock:
            self._leases = {k: v for k, v in self._leases.items() if v[1] > now}
            for row in self._items.itertuples(index=False):
                need = reviewers_needed(bool(row.double), result.get(row.item_id))
                if votes.get(row.item_id, 0) >= need:
                    continue
                waiting += 1
                if chosen is not None or row.item_id in mine:
                    continue
                lease = self._leases.get(row.item_id)
                if lease is not None and lease[0] != reviewer and need - votes.get(row.item_id, 0) <= 1:
                    continue
                chosen = row
                self._leases[row.item_id] = (reviewer, now + self.lease_s)
        progress = {"decided_by_you": int((real["reviewer"] == reviewer).sum()), "waiting": waiting,
                    "queued": int(len(self._items))}
        return (_public(chosen._asdict()) if chosen is not None else None), progress

    # ------------------------------------------------------------------------------------------ decide
    def decision_event(self, reviewer: str, item: dict[str, Any], decision: str, reason: str | None,
                       edited_text: str | None) -> tuple[Review, bool]:
        """The ``review`` event of a decision, and whether this exact decision was already made (a repeat: the
        same event, first ``occurred_at`` included)."""
        event_id = decision_event_id(reviewer, item["item_id"], decision, reason, edited_text)
        known = self._local.get(str(event_id))
        if known is None:
            lake = self._lake[self._lake["event_id"].astype(str) == str(event_id)]
            known = lake.iloc[0].to_dict() if len(lake) else None
        occurred_at = pd.Timestamp(known["occurred_at"]).to_pydatetime() if known else datetime.now(UTC)
        event = Review(event_id=event_id, occurred_at=occurred_at, conversation_id=item["conversation_id"],
                       user_id=item["user_id"], model_version=item["model_version"], reviewer=reviewer,
                       item_id=item["item_id"], target_event_id=item["target_event_id"], decision=decision,
                       reason=reason, edited_text=edited_text)
        return event, known is not None

    def record(self, event: Review) -> None:
        """A decision that was published (durable): counted from now on; its item is no longer held."""
        row = {c: getattr(event, c) for c in DECISION_COLUMNS}
        row["event_id"], row["target_event_id"] = str(event.event_id), str(event.target_event_id)
        with self._lock:
            self._local[row["event_id"]] = row
            self._leases.pop(event.item_id, None)

    def stats(self) -> dict[str, Any]:
        self.refresh()
        decisions = self.decisions()
        out = review_stats(self._items, decisions)
        result = outcomes(decisions)
        real = decisions[decisions["decision"] != "skip"]
        votes = real.groupby("item_id")["reviewer"].nunique().to_dict()
        out["waiting"] = int(sum(votes.get(i, 0) < reviewers_needed(bool(d), result.get(i))
                                 for i, d in zip(self._items["item_id"], self._items["double"], strict=True)))
        return out


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """An item as the page shows it (JSON-ready)."""
    out = {k: (v.isoformat() if isinstance(v, datetime | pd.Timestamp) else v) for k, v in row.items()}
    out["messages"] = json.loads(out.get("messages") or "[]")
    out["filter_reasons"] = json.loads(out.get("filter_reasons") or "[]")
    out["model_view"] = json.loads(out["model_view"]) if out.get("model_view") else None
    out["double"] = bool(out.get("double"))
    return out
