"""Example traffic as a chat service would send it: turns built from real ShareGPT exchanges and
feedback events of every type about them. Used by the demo, the benchmarks and the end-to-end tests.

This is plain, honest traffic. Simulated users with a hidden preference and adversaries are built on top
of it by the curation work (issue 3).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from pipelines.sharegpt import ChatSample


def _eid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def conversation_events(sample: ChatSample, rng: random.Random, *, now: datetime,
                        model_version: str = "smollm2-135m-instruct@v1") -> list[dict[str, Any]]:
    """One conversation: a turn, maybe a regenerated second turn, and feedback of a random kind (JSON)."""
    user = f"u-{rng.randrange(10_000):05d}"
    conv = f"c-{_eid(rng)[:18]}"
    t = now - timedelta(seconds=rng.uniform(60, 3000))

    def stamp(extra: dict[str, Any], dt: float) -> dict[str, Any]:
        return {"event_id": _eid(rng), "occurred_at": (t + timedelta(seconds=dt)).isoformat(),
                "conversation_id": conv, "user_id": user, "model_version": model_version, **extra}

    messages = [{"role": "user", "content": sample.prompt}]
    r1 = f"r-{_eid(rng)[:23]}"
    events = [stamp({"type": "turn", "response_id": r1, "messages": messages, "response": sample.reply}, 0)]
    kind = rng.choice(["thumbs", "regenerate", "correction", "pairwise", "implicit"])
    if kind == "thumbs":
        events.append(stamp({"type": "thumbs", "response_id": r1, "value": rng.choice(["up", "down"])}, 20))
    elif kind == "correction":
        events.append(stamp({"type": "correction", "response_id": r1,
                             "corrected_text": sample.reply.split("\n")[0][:400] or "Shorter answer."}, 40))
    elif kind == "implicit":
        events.append(stamp({"type": "implicit", "response_id": r1,
                             "action": rng.choice(["copy", "continue", "abandon"])}, 15))
    else:
        r2 = f"r-{_eid(rng)[:23]}"
        short = sample.reply[: max(40, len(sample.reply) // 2)]
        events.append(stamp({"type": "regenerate", "discarded_response_id": r1, "new_response_id": r2}, 10))
        events.append(stamp({"type": "turn", "response_id": r2, "messages": messages, "response": short,
                             "parent_response_id": r1}, 12))
        if kind == "pairwise":
            events.append(stamp({"type": "pairwise", "response_a_id": r1, "response_b_id": r2,
                                 "choice": rng.choice(["a", "b", "tie"])}, 30))
    return events


def example_traffic(samples: list[ChatSample], n_events: int, *, seed: int = 0,
                    now: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Exactly ``n_events`` events, conversation by conversation, cycling through ``samples``."""
    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    produced, i = 0, 0
    while produced < n_events:
        for event in conversation_events(samples[i % len(samples)], rng, now=now):
            if produced == n_events:
                return
            yield event
            produced += 1
        i += 1
