"""Simulated reviewers for the demo: people with a stated error rate, working the review queue through the real
HTTP endpoints (``GET /v1/review/next``, ``POST /v1/review/items/<id>/decision``) with reviewer keys.

A reviewer knows what the simulation knows: an event from an adversary is rejected (with the reason that fits
its kind: a harmful correction ``harmful``, a vote flipper's ``unclear``, the rest ``manipulation``), an honest
user's feedback is accepted, and a pair routed because the reward model was unsure is accepted when the hidden
preference agrees with the user's choice (else rejected as ``subjective``). With probability ``error_rate`` a
reviewer gets it wrong: accepts what they should reject, or rejects as ``unclear`` what they should accept.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

_REASON_BY_KIND = {"harmful": "harmful", "flipper": "unclear"}


@dataclass(frozen=True)
class SimReviewer:
    name: str
    secret: str
    error_rate: float = 0.1


def right_call(item: dict[str, Any], truth: dict[str, Any], preference: Any | None) -> tuple[str, str | None]:
    """(decision, reason) a reviewer who makes no mistake gives ``item``."""
    kind = truth["adversarial_events"].get(item["target_event_id"])
    if kind is not None:
        return "reject", _REASON_BY_KIND.get(kind, "manipulation")
    if item["route"] == "uncertain" and preference is not None:
        agrees = preference.score(item["proposal"]) >= preference.score(item["response"])
        return ("accept", None) if agrees else ("reject", "subjective")
    return "accept", None


def work_queue(client: Any, reviewers: list[SimReviewer], truth: dict[str, Any], preference: Any | None, *,
               seed: int = 0, max_decisions: int = 2_000) -> dict[str, Any]:
    """The reviewers take turns on the queue until none is offered an item. Returns what they did: decisions by
    reviewer, wrong calls, and the ids of the review events the API accepted (to wait for in the lake)."""
    rng = random.Random(seed)
    active = list(reviewers)
    event_ids: list[str] = []
    made: Counter[str] = Counter()
    wrong: Counter[str] = Counter()
    while active and len(event_ids) < max_decisions:
        for reviewer in list(active):
            headers = {"Authorization": f"Bearer {reviewer.secret}"}
            r = client.get("/v1/review/next", headers=headers)
            r.raise_for_status()
            item = r.json()["item"]
            if item is None:
                active.remove(reviewer)
                continue
            decision, reason = right_call(item, truth, preference)
            if rng.random() < reviewer.error_rate:
                wrong[reviewer.name] += 1
                decision, reason = ("accept", None) if decision == "reject" else ("reject", "unclear")
            r = client.post(f"/v1/review/items/{item['item_id']}/decision", headers=headers,
                            json={"decision": decision} | ({"reason": reason} if reason else {}))
            r.raise_for_status()
            event_ids.append(r.json()["event_id"])
            made[reviewer.name] += 1
    return {"decisions": dict(made), "wrong_calls": dict(wrong), "event_ids": event_ids,
            "error_rates": {r.name: r.error_rate for r in reviewers}}
