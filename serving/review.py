"""The review desk: which queued item a reviewer sees next, and the ``review`` event a decision becomes.

The queue (``pipelines.review``: written by curation) and the decisions already in the lake (``review`` events)
are read from storage at most every ``refresh_s`` seconds; the decisions this process published since are kept
in memory until the lake has them, so a reviewer's progress shows at once although the consumer writes the lake
a few seconds later. A reviewer is offered an item they have not decided yet, that still waits for a reviewer
(one; two for a double item; one more while disputed), and that no other reviewer holds: an item offered is held
for ``lease_s`` seconds, so two reviewers working at once are not shown the same single item.

A decision's ``event_id`` is a UUID derived from the reviewer, the item, the decision and the decision it replaces:
sending the reviewer's latest decision again publishes the same event (with its first ``occurred_at``), which the
lake keeps once. A reviewer who changes their mind sends another decision, another event (going back to an
earlier decision too); the latest counts.
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
    empty_items,
    in_route_order,
    latest_decisions,
    outcomes,
    read_queue,
    review_stats,
    reviewers_needed,
)

_NAMESPACE = uuid.UUID("6f1c2a4e-8d0b-5f7a-9c3e-2b4d6e8f0a1c")


def decision_event_id(reviewer: str, item_id: str, decision: str, reason: str | None, edited: str | None,
                      replaces: str = "") -> uuid.UUID:
    """The id of a decision: the same decision on the same item, replacing the same earlier one, is the same
    event (a retried request after a lost response publishes it again, and the lake keeps it once)."""
    return uuid.uuid5(_NAMESPACE, json.dumps([reviewer, item_id, decision, reason, edited, replaces]))


class ReviewDesk:
    """The review queue as one API process sees it. Holds and not-yet-landed decisions live in this process:
    run the API's review endpoints in one process (as ``flywheel serve`` does), or two reviewers may be shown
    the same single item (each decision still counts, and the item is decided by majority)."""

    def __init__(self, settings: Settings, *, refresh_s: float = 5.0, lease_s: float = 600.0):
        self.storage = open_storage(settings.lake.uri, settings.lake)
        self.refresh_s, self.lease_s = refresh_s, lease_s
        self._lock = threading.Lock()  # the state below
        self._loading = threading.Lock()  # one refresh at a time: an older snapshot never replaces a newer one
        self._loaded_at = float("-inf")
        self._items = empty_items()
        self._lake = pd.DataFrame(columns=DECISION_COLUMNS)
        self._local: dict[str, dict[str, Any]] = {}  # event_id -> decision row, until the lake has it
        self._leases: dict[str, dict[str, float]] = {}  # item_id -> {reviewer: held until}

    # ------------------------------------------------------------------------------------------ state
    def refresh(self, *, force: bool = False) -> None:
        if not force and time.monotonic() - self._loaded_at < self.refresh_s:
            return
        with self._loading:
            if not force and time.monotonic() - self._loaded_at < self.refresh_s:
                return  # another request refreshed while this one waited
            items = in_route_order(read_queue(self.storage)).reset_index(drop=True)
            lake = read_events(self.storage, "review")
            lake = lake.reindex(columns=DECISION_COLUMNS) if len(lake) else pd.DataFrame(columns=DECISION_COLUMNS)
            with self._lock:
                self._items, self._lake, self._loaded_at = items, lake, time.monotonic()
                landed = set(lake["event_id"].astype(str))
                self._local = {k: v for k, v in self._local.items() if k not in landed}

    def _decisions(self) -> pd.DataFrame:
        """Every reviewer's latest decision on every item, the lake's and this process's (hold ``_lock``)."""
        local = pd.DataFrame(list(self._local.values()), columns=DECISION_COLUMNS)
        parts = [d for d in (self._lake, local) if len(d)]
        if not parts:
            return latest_decisions(pd.DataFrame(columns=DECISION_COLUMNS))
        both = pd.concat(parts, ignore_index=True)
        both["occurred_at"] = pd.to_datetime(both["occurred_at"], utc=True)
        return latest_decisions(both.drop_duplicates("event_id", keep="first"))

    def decisions(self) -> pd.DataFrame:
        with self._lock:
            return self._decisions()

    def item(self, item_id: str) -> dict[str, Any] | None:
        self.refresh()
        with self._lock:
            rows = self._items[self._items["item_id"] == item_id]
        return _public(rows.iloc[0].to_dict()) if len(rows) else None

    def next_item(self, reviewer: str) -> tuple[dict[str, Any] | None, dict[str, int]]:
        """The next item for ``reviewer`` (held for them), or None, and their progress counters. An item is
        offered while its votes plus the reviewers holding it are fewer than the reviewers it needs."""
        self.refresh()
        now = time.monotonic()
        chosen, waiting = None, 0
        with self._lock:  # the votes and the holds are read and taken together
            decisions = self._decisions()
            mine = set(decisions.loc[decisions["reviewer"] == reviewer, "item_id"])
            real = decisions[decisions["decision"] != "skip"]
            votes = real.groupby("item_id")["reviewer"].nunique().to_dict()
            result = outcomes(decisions)
            self._leases = {k: held for k, v in self._leases.items()
                            if (held := {r: t for r, t in v.items() if t > now})}
            for row in self._items.itertuples(index=False):
                need = reviewers_needed(bool(row.double), result.get(row.item_id))
                have = votes.get(row.item_id, 0)
                if have >= need:
                    continue
                waiting += 1
                if chosen is not None or row.item_id in mine:
                    continue
                holders = self._leases.get(row.item_id, {})
                if reviewer not in holders and have + len(holders) >= need:
                    continue
                chosen = row
                self._leases.setdefault(row.item_id, {})[reviewer] = now + self.lease_s
            decided = int((real["reviewer"] == reviewer).sum())
            queued = int(len(self._items))
        progress = {"decided_by_you": decided, "waiting": waiting, "queued": queued}
        return (_public(chosen._asdict()) if chosen is not None else None), progress

    # ------------------------------------------------------------------------------------------ decide
    def decision_event(self, reviewer: str, item: dict[str, Any], decision: str, reason: str | None,
                       edited_text: str | None) -> tuple[Review, bool]:
        """The ``review`` event of a decision, and whether it repeats the reviewer's latest decision on the item
        (then it is that very event, its ``occurred_at`` included). A new decision's id is derived from the one it
        replaces, so going back to an earlier decision is a new event too (accept, reject, accept: three)."""
        with self._lock:
            decisions = self._decisions()
            latest = decisions[(decisions["reviewer"] == reviewer) & (decisions["item_id"] == item["item_id"])]
        previous = latest.iloc[0].to_dict() if len(latest) else None
        if previous is not None and (previous["decision"], _none(previous["reason"]),
                                     _none(previous["edited_text"])) == (decision, reason, edited_text):
            event_id = uuid.UUID(str(previous["event_id"]))
            occurred_at = pd.Timestamp(previous["occurred_at"]).to_pydatetime()
        else:
            event_id = decision_event_id(reviewer, item["item_id"], decision, reason, edited_text,
                                         str(previous["event_id"]) if previous is not None else "")
            occurred_at = datetime.now(UTC)
        event = Review(event_id=event_id, occurred_at=occurred_at, conversation_id=item["conversation_id"],
                       user_id=item["user_id"], model_version=item["model_version"], reviewer=reviewer,
                       item_id=item["item_id"], target_event_id=item["target_event_id"], decision=decision,
                       reason=reason, edited_text=edited_text)
        return event, previous is not None and event_id == uuid.UUID(str(previous["event_id"]))

    def record(self, event: Review) -> None:
        """A decision that was published (durable): counted from now on; the reviewer no longer holds its item."""
        row = {c: getattr(event, c) for c in DECISION_COLUMNS}
        row["event_id"], row["target_event_id"] = str(event.event_id), str(event.target_event_id)
        with self._lock:
            self._local[row["event_id"]] = row
            self._leases.get(event.item_id, {}).pop(event.reviewer, None)

    def stats(self) -> dict[str, Any]:
        self.refresh()
        with self._lock:
            decisions, items = self._decisions(), self._items
        out = review_stats(items, decisions)
        result = outcomes(decisions)
        real = decisions[decisions["decision"] != "skip"]
        votes = real.groupby("item_id")["reviewer"].nunique().to_dict()
        out["waiting"] = int(sum(votes.get(i, 0) < reviewers_needed(bool(d), result.get(i))
                                 for i, d in zip(items["item_id"], items["double"], strict=True)))
        return out


def _none(value: Any) -> Any:
    """A missing value read back from Parquet/pandas (None or NaN) as None."""
    return None if value is None or (isinstance(value, float) and value != value) else value


def _public(row: dict[str, Any]) -> dict[str, Any]:
    """An item as the page shows it (JSON-ready)."""
    out = {k: (v.isoformat() if isinstance(v, datetime | pd.Timestamp) else v) for k, v in row.items()}
    out["messages"] = json.loads(out.get("messages") or "[]")
    out["filter_reasons"] = json.loads(out.get("filter_reasons") or "[]")
    out["model_view"] = json.loads(out["model_view"]) if out.get("model_view") else None
    out["double"] = bool(out.get("double"))
    return out
