"""Human review of feedback: the queue each curation run fills, and what the reviewers' decisions mean.

    curation of [start, end) -> items routed to review, each with the reason it was routed:
        correction   a correction that passed the automatic filters (``review.correction_share`` of them)
        held_back    feedback the filters held back (``review.held_back_share``): their precision, measured
        uncertain    a pair where the champion reward model is least certain or disagrees with the users
                     (added by the loop, which owns the reward model: ``flywheel.app.review``)
      -> review/queue/<start>-<end>.<part>.parquet (one file per interval and part: curating again rewrites it)
    reviewers (``/review``) -> ``review`` events -> API -> Kafka -> lake (exactly once, like every event)
    curation reads the decisions made on the interval's feedback up to ``review.lookahead_h`` after it:
        accept / fix   the feedback stays (fix: with the reviewer's text); its pairs are marked ``reviewed``
        reject         the feedback goes to quarantine with reason ``reviewer_rejected:<reason>``
        skip           nothing (the item is offered to another reviewer)

Sampling is by a hash of the event id, so a re-run of curation routes the same items. ``review.double_share``
of the items go to two reviewers: their agreement is Cohen's kappa per pair of reviewers. An item's outcome is
the majority of its reviewers' decisions (accept and fix count as accepting); a tie is ``disputed`` and the
item goes to one more reviewer. Each reviewer's own latest decision on an item is the one that counts.

The held-back sample measures the filters: a reviewer who rejects a held-back event agrees with the filter, one
who accepts it says the filter was wrong. The filters' call stands (the event stays in quarantine); the
measured precision is in the dataset card and on the statistics page.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from flywheel.settings import ReviewSettings
from flywheel.storage import Storage
from ingest.text import stable_hash

QUEUE_ROOT = "review/queue"
ROUTES = ("correction", "held_back", "uncertain")
POSITIVE = ("accept", "fix")  # decisions that keep the feedback

ITEM_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("route", pa.string()), ("route_reason", pa.string()),
    ("target_event_id", pa.string()), ("target_type", pa.string()), ("user_id", pa.string()),
    ("conversation_id", pa.string()), ("model_version", pa.string()),
    ("occurred_at", pa.timestamp("us", tz="UTC")),
    ("messages", pa.string()),  # the conversation the model saw, JSON [{role, content}]
    ("response", pa.string()),  # the model's answer
    ("proposal", pa.string()),  # the user's correction, or the response the user preferred
    ("label", pa.string()),  # what the user did: "correction", "thumbs down", "chose b over a", ...
    ("filter_reasons", pa.string()),  # JSON list: why the filters held it back (held_back items)
    ("model_view", pa.string()),  # JSON: the champion reward model's view, or ""
    ("double", pa.bool_()),  # decided by two reviewers
    ("interval_start", pa.timestamp("us", tz="UTC")), ("interval_end", pa.timestamp("us", tz="UTC")),
])
ITEM_COLUMNS = ITEM_SCHEMA.names


def item_id(target_event_id: str, route: str) -> str:
    return f"rv-{route[:1]}-{stable_hash(f'review:{route}:{target_event_id}')}"


def _sampled(key: str, share: float, salt: str) -> bool:
    """A fixed share of keys, the same on every run (a hash, not a random draw)."""
    return share >= 1.0 or (share > 0 and int(stable_hash(f"{salt}:{key}")[:8], 16) % 10_000 < share * 10_000)


def empty_items() -> pd.DataFrame:
    return ITEM_SCHEMA.empty_table().to_pandas()


def route_items(turns: pd.DataFrame, feedback: pd.DataFrame, quarantine: pd.DataFrame, cfg: ReviewSettings, *,
                start: datetime, end: datetime) -> pd.DataFrame:
    """The items one curation run routes to review (``ITEM_COLUMNS``), corrections first.

    ``turns``: the prepared turns (``pipelines.curation.prepare_turns``); ``feedback``: the interval's unified
    feedback, held-back events included; ``quarantine``: what was held back and why."""
    by_response = turns.drop_duplicates("response_id").set_index("response_id") if not turns.empty else None

    def turn_of(response_id: object) -> pd.Series | None:
        if by_response is None or not isinstance(response_id, str) or response_id not in by_response.index:
            return None
        return by_response.loc[response_id]

    held_reasons: dict[str, list[str]] = {}
    for eid, reason in zip(quarantine["event_id"], quarantine["reason"], strict=True):
        held_reasons.setdefault(str(eid), []).append(str(reason))
    rows: list[dict[str, Any]] = []
    for fb in feedback.itertuples(index=False):
        eid = str(fb.event_id)
        reasons = held_reasons.get(eid)
        if reasons is not None:
            if not _sampled(eid, cfg.held_back_share, "held"):
                continue
            route, why = "held_back", (f"held back by the filters ({', '.join(reasons)}); a {cfg.held_back_share:.0%} "
                                       "sample is reviewed to measure their precision")
        elif fb.type == "correction" and _sampled(eid, cfg.correction_share, "correction"):
            route, why = "correction", (f"a correction that passed the automatic filters ({cfg.correction_share:.0%} "
                                        "of them are reviewed)")
        else:
            continue
        turn, other = turn_of(fb.response_id), turn_of(fb.other_response_id)
        response, proposal, label = _shown(fb, turn, other)
        rows.append({
            "item_id": item_id(eid, route), "route": route, "route_reason": why, "target_event_id": eid,
            "target_type": str(fb.type), "user_id": str(fb.user_id),
            "conversation_id": str(turn["conversation_id"]) if turn is not None else "unknown",
            "model_version": str(turn["model_version"]) if turn is not None else "unknown",
            "occurred_at": fb.occurred_at,
            "messages": str(turn["messages"]) if turn is not None else "[]",
            "response": response, "proposal": proposal, "label": label,
            "filter_reasons": json.dumps(reasons or []), "model_view": "", "double": False,
            "interval_start": start, "interval_end": end})
    items = pd.DataFrame(rows, columns=ITEM_COLUMNS) if rows else empty_items()
    return finish_items(in_route_order(items).head(cfg.max_items), cfg)


def in_route_order(items: pd.DataFrame) -> pd.DataFrame:
    """Corrections first, then the held-back sample, then the uncertain pairs; oldest first within a route."""
    order = items["route"].map({r: i for i, r in enumerate(ROUTES)})
    return items.assign(_o=order).sort_values(["_o", "occurred_at", "item_id"], kind="stable").drop(columns="_o")


def _shown(fb: Any, turn: pd.Series | None, other: pd.Series | None) -> tuple[str, str, str]:
    """(the answer the feedback is against, the one it is for, what the user did) as the reviewer sees them: a
    correction's text over the answer; a pairwise choice's chosen answer over the other; a regeneration's new
    answer over the discarded one; a thumb or an implicit signal on one answer."""
    first = str(turn["response"]) if turn is not None else ""
    second = str(other["response"]) if other is not None else ""
    value = fb.value if isinstance(fb.value, str) else ""
    if fb.type == "correction":
        return first, str(fb.corrected_text) if isinstance(fb.corrected_text, str) else "", "correction"
    if fb.type == "pairwise":
        if value == "b":
            return first, second, "chose b over a"
        if value == "a":
            return second, first, "chose a over b"
        return first, second, "a tie"
    if fb.type == "regenerate":
        return first, second, "regenerated the answer"
    return first, "", f"{fb.type} {value}".strip()


def finish_items(items: pd.DataFrame, cfg: ReviewSettings) -> pd.DataFrame:
    """Mark the share of items two reviewers decide; typed columns, stable order."""
    items = items.reset_index(drop=True).copy()
    items["double"] = [_sampled(i, cfg.double_share, "double") for i in items["item_id"]]
    return pa.Table.from_pandas(items[ITEM_COLUMNS], schema=ITEM_SCHEMA, preserve_index=False).to_pandas()


def queue_key(start: datetime, end: datetime, part: str) -> str:
    return f"{QUEUE_ROOT}/{start:%Y%m%dT%H%M%S}-{end:%Y%m%dT%H%M%S}.{part}.parquet"


def write_queue(storage: Storage, items: pd.DataFrame, *, start: datetime, end: datetime, part: str) -> str:
    """Write (or rewrite: curation may run again) one interval's items of one part (``filters``, ``reward``)."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(items[ITEM_COLUMNS], schema=ITEM_SCHEMA, preserve_index=False), buf)
    key = queue_key(start, end, part)
    storage.put_bytes(key, buf.getvalue())
    return key


def read_queue(storage: Storage) -> pd.DataFrame:
    """Every queued item (one row per ``item_id``: an item routed again keeps its latest interval's row)."""
    keys = sorted(k for k in storage.list(f"{QUEUE_ROOT}/") if k.endswith(".parquet"))
    if not keys:
        return empty_items()
    frames = [pq.read_table(io.BytesIO(storage.get_bytes(k))).to_pandas() for k in keys]
    items = pd.concat([f.reindex(columns=ITEM_COLUMNS) for f in frames], ignore_index=True)
    items["label"] = items["label"].fillna("")  # written before items had one
    items = items.sort_values(["interval_start", "interval_end"], kind="stable")
    return items.drop_duplicates("item_id", keep="last").reset_index(drop=True)


# ------------------------------------------------------------------------------------------ decisions
DECISION_COLUMNS = ["event_id", "reviewer", "item_id", "target_event_id", "decision", "reason", "edited_text",
                    "occurred_at"]


def latest_decisions(reviews: pd.DataFrame) -> pd.DataFrame:
    """Each reviewer's latest decision on each item (``DECISION_COLUMNS``), skips included."""
    if reviews.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in DECISION_COLUMNS})
    df = reviews.reindex(columns=DECISION_COLUMNS).copy()
    df["target_event_id"] = df["target_event_id"].astype(str)
    df = df.sort_values(["occurred_at", "event_id"], kind="stable")
    return df.drop_duplicates(["reviewer", "item_id"], keep="last").reset_index(drop=True)


@dataclass(frozen=True)
class Outcome:
    """What the reviewers decided on one item: ``accept``, ``fix`` (accepted with ``edited_text``), ``reject``
    (with the most given ``reason``) or ``disputed`` (as many against as for); ``votes`` non-skip decisions."""

    decision: str
    reason: str | None
    edited_text: str | None
    votes: int


def outcomes(decisions: pd.DataFrame) -> dict[str, Outcome]:
    """item_id -> its :class:`Outcome`, for items with at least one decision that is not a skip."""
    out: dict[str, Outcome] = {}
    decided = decisions[decisions["decision"] != "skip"]
    for item, g in decided.groupby("item_id", sort=True):
        keep, drop = g[g["decision"].isin(POSITIVE)], g[g["decision"] == "reject"]
        if len(keep) > len(drop):
            fixes = keep[keep["decision"] == "fix"]
            if len(fixes):
                out[str(item)] = Outcome("fix", None, str(fixes["edited_text"].iloc[-1]), len(g))
            else:
                out[str(item)] = Outcome("accept", None, None, len(g))
        elif len(drop) > len(keep):
            reasons = Counter(str(r) for r in drop["reason"])
            reason = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
            out[str(item)] = Outcome("reject", reason, None, len(g))
        else:
            out[str(item)] = Outcome("disputed", None, None, len(g))
    return out


def reviewers_needed(double: bool, outcome: Outcome | None) -> int:
    """How many reviewers an item waits for: one, two for a double item, one more while it is disputed."""
    need = 2 if double else 1
    if outcome is not None and outcome.decision == "disputed":
        need = max(need, outcome.votes + 1)
    return need


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two raters over the same items: ``(p_o - p_e) / (1 - p_e)``; NaN when chance agreement
    is total (both gave one and the same label to every item) or there is no item."""
    n = len(a)
    if n == 0 or n != len(b):
        return math.nan
    p_o = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    p_e = sum(ca[k] * cb[k] for k in ca) / (n * n)
    return math.nan if p_e == 1.0 else (p_o - p_e) / (1 - p_e)


def _label(decision: str) -> str:
    return "accept" if decision in POSITIVE else decision


def _rounded(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


SESSION_GAP_S = 1800.0


def _per_hour(times: pd.Series) -> float | None:
    """Decisions an hour of active reviewing: the time between consecutive decisions, a gap over half an hour
    counted as a break (not as work); None with fewer than two decisions."""
    t = pd.to_datetime(times, utc=True).sort_values()
    if len(t) < 2:
        return None
    gaps = t.diff().dt.total_seconds().iloc[1:].clip(upper=SESSION_GAP_S)
    active_h = float(gaps[gaps < SESSION_GAP_S].sum()) / 3600
    return round((len(t) - 1) / active_h, 1) if active_h > 0 else None


def review_stats(items: pd.DataFrame, decisions: pd.DataFrame) -> dict[str, Any]:
    """The review section of the dataset card and the statistics page: what was routed and reviewed, what was
    rejected and why, the filters' precision on the held-back sample, and each reviewer's numbers with Cohen's
    kappa (accept or reject) for every pair of reviewers that decided the same items."""
    decided = decisions[decisions["item_id"].isin(items["item_id"])] if len(items) else decisions.iloc[0:0]
    result = outcomes(decided)
    route_of = dict(zip(items["item_id"], items["route"], strict=True))
    counts = Counter(o.decision for o in result.values())
    rejected = Counter(o.reason for o in result.values() if o.decision == "reject")
    held = [i for i, r in route_of.items() if r == "held_back" and i in result and result[i].decision != "disputed"]
    confirmed = sum(result[i].decision == "reject" for i in held)
    by_filter: dict[str, list[int]] = {}
    reasons_of = dict(zip(items["item_id"], items["filter_reasons"], strict=True))
    for i in held:
        for reason in json.loads(reasons_of[i]):
            by_filter.setdefault(reason, [0, 0])
            by_filter[reason][0] += result[i].decision == "reject"
            by_filter[reason][1] += 1
    per_reviewer: dict[str, dict[str, Any]] = {}
    for name, g in decided.groupby("reviewer", sort=True):
        real = g[g["decision"] != "skip"]
        per_reviewer[str(name)] = {
            "decided": int(len(real)), "skipped": int(len(g) - len(real)),
            "acceptance_rate": _rounded(float(real["decision"].isin(POSITIVE).mean())) if len(real) else None,
            "rejected_by_reason": {str(k): int(v) for k, v in real["reason"].dropna().value_counts().sort_index().items()},
            "per_hour": _per_hour(real["occurred_at"])}
    pairs = []
    real = decided[decided["decision"] != "skip"]
    by_item = {str(k): dict(zip(g["reviewer"], g["decision"], strict=True)) for k, g in real.groupby("item_id")}
    names = sorted(per_reviewer)
    for x in range(len(names)):
        for y in range(x + 1, len(names)):
            a, b = names[x], names[y]
            both = [v for v in by_item.values() if a in v and b in v]
            if both:
                kappa = cohen_kappa([_label(v[a]) for v in both], [_label(v[b]) for v in both])
                agree = sum(_label(v[a]) == _label(v[b]) for v in both) / len(both)
                pairs.append({"reviewers": [a, b], "items": len(both), "kappa": _rounded(kappa),
                              "agreement": round(agree, 4)})
    return {
        "routed": int(len(items)),
        "routed_by_route": {r: int((items["route"] == r).sum()) for r in ROUTES},
        "double": int(items["double"].sum()) if len(items) else 0,
        "reviewed": sum(counts[d] for d in ("accept", "fix", "reject")),
        "outcomes": {d: int(counts[d]) for d in ("accept", "fix", "reject", "disputed")},
        "rejected_by_reason": {str(k): int(v) for k, v in sorted(rejected.items())},
        "filter_precision": {"reviewed": len(held), "confirmed": confirmed,
                             "precision": round(confirmed / len(held), 4) if held else None,
                             "by_filter": {k: {"reviewed": v[1], "precision": round(v[0] / v[1], 4)}
                                           for k, v in sorted(by_filter.items())}},
        "reviewers": per_reviewer,
        "kappa": pairs,
    }
