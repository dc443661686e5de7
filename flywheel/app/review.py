"""The loop's part of human review: the champion reward model's view of each queued item, the pairs it is least
sure of (active learning), and how much of the routed feedback reviewers have covered.

Curation (``pipelines.review``) routes corrections and a sample of what the filters held back; it does not know
the reward model (the stages sit below training). After an interval is curated, :func:`score_queue` adds

- to every item of the interval, the champion's probability that the user's choice is the better answer
  (``sigmoid(r(proposal) - r(response))``, Bradley-Terry, as the reward model was trained);
- the ``uncertain`` part of the queue: of the interval's pairs that come from one feedback event, half of
  ``review.uncertain_pairs`` where that probability is nearest 0.5 (the model cannot tell) and half where it is
  lowest (the model disagrees most with the user's label).

:func:`coverage` is what the reward DAG waits on when ``review.min_coverage`` is set.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timedelta
from typing import Any

import pandas as pd

from flywheel.settings import Settings

log = logging.getLogger(__name__)


def _feedback_ids(storage: Any, start: datetime, end: datetime) -> dict[str, str]:
    from ingest.lake import read_events
    from pipelines.curation import FEEDBACK_TYPES

    out: dict[str, str] = {}
    for t in FEEDBACK_TYPES:
        df = read_events(storage, t, start, end)
        out.update(dict.fromkeys(df["event_id"].astype(str), t))
    return out


def score_queue(settings: Settings, dataset: str, start: datetime, end: datetime) -> dict[str, Any]:
    """Give the interval's queued items the champion reward model's view and route its uncertain pairs. Without a
    champion reward model: nothing to add (the items say so on the page)."""
    from flywheel.storage import open_storage
    from pipelines.dataset import open_dataset
    from pipelines.review import ITEM_COLUMNS, finish_items, item_id, read_queue, write_queue
    from training.registry import CHAMPION, alias_version, registry_client
    from training.reward.train import load_registered_reward, score
    from training.tracking import REWARD_MODEL

    version = alias_version(registry_client(settings), REWARD_MODEL, CHAMPION)
    if version is None:
        return {"scored": 0, "uncertain": 0, "reward_model": None}
    model = load_registered_reward(f"models:/{REWARD_MODEL}/{version}")
    label = f"{REWARD_MODEL}/{version}"
    storage = open_storage(settings.lake.uri, settings.lake)

    def p_user(prompts: list[str], preferred: list[str], other: list[str]) -> list[float]:
        if not prompts:
            return []
        gap = (score(model, prompts, preferred) - score(model, prompts, other)).tolist()
        return [1 / (1 + math.exp(-g)) for g in gap]

    queue = read_queue(storage)
    mine = queue[(queue["interval_start"] == start) & (queue["interval_end"] == end) & (queue["route"] != "uncertain")]
    mine = mine.reset_index(drop=True)
    both = mine[(mine["proposal"].str.len() > 0) & (mine["response"].str.len() > 0)]
    views = p_user([_prompt(m) for m in both["messages"]], both["proposal"].tolist(), both["response"].tolist())
    mine.loc[both.index, "model_view"] = [json.dumps({"model": label, "p_user": round(p, 4)}) for p in views]
    write_queue(storage, mine[ITEM_COLUMNS], start=start, end=end, part="filters")

    uncertain = queue[(queue["interval_start"] == start) & (queue["interval_end"] == end)
                      & (queue["route"] == "uncertain")]
    # the run routes at most review.max_items, corrections and the held-back sample first
    want = min(settings.review.uncertain_pairs, max(0, settings.review.max_items - len(mine)))
    pairs = open_dataset(dataset, settings).table("pairs") if want and uncertain.empty else None
    if pairs is not None and len(pairs):  # routed once per interval: a re-run keeps what reviewers may have decided
        kinds = _feedback_ids(storage, start, end)
        single = [[i for i in ids if i in kinds] for ids in pairs["event_ids"]]
        keep = pd.Series([len(x) == 1 for x in single], index=pairs.index)
        pairs = pairs.loc[keep].assign(target=[x[0] for x in single if len(x) == 1])
        pairs = pairs[~pairs["target"].isin(set(queue["target_event_id"]))].reset_index(drop=True)
        pairs["p"] = p_user(pairs["prompt"].tolist(), pairs["chosen"].tolist(), pairs["rejected"].tolist())
        closest = pairs.assign(d=(pairs["p"] - 0.5).abs()).sort_values(["d", "pair_id"]).head(want - want // 2)
        against = pairs[~pairs["pair_id"].isin(closest["pair_id"])].sort_values(["p", "pair_id"]).head(want // 2)
        rows = []
        for note, part in (("the reward model is least certain", closest), ("the reward model disagrees most "
                                                                                "with the user's label", against)):
            for p in part.itertuples(index=False):
                rows.append({"item_id": item_id(p.target, "uncertain"), "route": "uncertain",
                             "route_reason": f"{note}: P(the user's choice is better) = {p.p:.3f}",
                             "target_event_id": p.target, "target_type": kinds[p.target], "user_id": "unknown",
                             "conversation_id": "unknown", "model_version": "unknown", "occurred_at": start,
                             "messages": json.dumps([{"role": "user", "content": p.prompt}]),
                             "response": p.rejected, "proposal": p.chosen, "label": f"preferred this answer ({p.source})",
                             "filter_reasons": "[]",
                             "model_view": json.dumps({"model": label, "p_user": round(p.p, 4), "note": note}),
                             "double": False, "interval_start": start, "interval_end": end})
        uncertain = finish_items(pd.DataFrame(rows, columns=ITEM_COLUMNS), settings.review) if rows else uncertain
        _lineage(storage, uncertain, start, end)
        write_queue(storage, uncertain, start=start, end=end, part="reward")
    log.info("review queue of [%s, %s): %d items scored by %s, %d uncertain pairs routed", start, end, len(views),
             label, len(uncertain))
    return {"scored": len(views), "uncertain": len(uncertain), "reward_model": label}


def _prompt(messages: str) -> str:
    from flywheel.events import flatten_messages

    return flatten_messages(json.loads(messages)) if messages else ""


def _lineage(storage: Any, items: pd.DataFrame, start: datetime, end: datetime) -> None:
    """The user, conversation, model version and time of each item's feedback event (a review event carries
    them), read from the lake."""
    if items.empty:
        return
    from ingest.lake import read_events

    for t in set(items["target_type"]):
        df = read_events(storage, t, start, end).set_index("event_id")
        for col in ("user_id", "conversation_id", "model_version", "occurred_at"):
            mask = items["target_type"] == t
            found = items.loc[mask, "target_event_id"].map(df[col])
            items.loc[mask, col] = found.fillna(start if col == "occurred_at" else "unknown").to_numpy()


def coverage(settings: Settings, start: datetime, end: datetime) -> dict[str, Any]:
    """Share of the corrections routed to review in ``[start, end)`` that reviewers have decided."""
    from flywheel.storage import open_storage
    from ingest.lake import read_events
    from pipelines.review import latest_decisions, outcomes, read_queue

    storage = open_storage(settings.lake.uri, settings.lake)
    queue = read_queue(storage)
    routed = queue[(queue["route"] == "correction") & (queue["occurred_at"] >= pd.Timestamp(start))
                   & (queue["occurred_at"] < pd.Timestamp(end))]
    reviews = read_events(storage, "review", start, end + timedelta(hours=settings.review.lookahead_h))
    decided = outcomes(latest_decisions(reviews))
    done = sum(i in decided and decided[i].decision != "disputed" for i in routed["item_id"])
    share = done / len(routed) if len(routed) else 1.0
    return {"routed": int(len(routed)), "reviewed": int(done), "coverage": round(share, 4),
            "min_coverage": settings.review.min_coverage, "enough": share >= settings.review.min_coverage}
