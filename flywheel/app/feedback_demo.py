"""``flywheel demo-feedback``: the feedback path end to end on the embedded stack.

1. start the embedded stack (Tansu broker, lake directory, MLflow store) under ``Settings.home``;
2. start the consumer and the HTTP API (the policy, SmolLM2-135M-Instruct, loads in the background);
3. send traffic over real HTTP: turns built from ShareGPT exchanges and feedback of every type, a few real
   ``/v1/chat`` replies from the policy, and some deliberately bad requests and records;
4. wait until every accepted event is in the lake and print what landed there.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from flywheel.app import stack
from flywheel.app.traffic import example_traffic
from flywheel.settings import Settings
from flywheel.storage import open_storage
from ingest.lake import count_events, read_events, wait_for_events
from pipelines.sharegpt import chat_samples
from serving.policy import PolicyHandle


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_feedback_demo(settings: Settings, *, events: int = 2_000, chats: int = 3, load_policy: bool = True,
             seed: int = 0) -> dict[str, Any]:
    t0 = time.monotonic()
    _say(f"flywheel demo-feedback: home {settings.home}")
    for k, v in stack.up(settings).items():
        _say(f"  {k:7s} {v}")

    since = datetime.now(UTC) - timedelta(hours=2)  # the traffic's occurred_at lies within the last hour
    ids: set[str] = set()
    sent: Counter[str] = Counter()
    rejected: list[str] = []
    policy_thread = None
    with stack.local_feedback_path(settings, "demo") as (state, client):
        if load_policy and chats:
            def load() -> None:
                state.policy = PolicyHandle.load(settings.api.policy_model, settings.api.policy_version)
            policy_thread = threading.Thread(target=load, name="policy-loader", daemon=True)
            policy_thread.start()
        url = str(client.base_url).rstrip("/")
        _say(f"API on {url} (key 'demo'); consumer group {settings.kafka.group_id}")
        samples = chat_samples(500)
        traffic = list(example_traffic(samples, events, seed=seed))
        _say(f"sending {len(traffic)} events built from {len(samples)} ShareGPT exchanges ...")
        singles, rest = traffic[:200], traffic[200:]
        for ev in singles:
            path = "/v1/turns" if ev["type"] == "turn" else "/v1/feedback"
            r = client.post(path, json=ev)
            r.raise_for_status()
            sent[ev["type"]] += 1
            ids.add(ev["event_id"])
        for i in range(0, len(rest), 250):
            batch = rest[i : i + 250]
            r = client.post("/v1/feedback/batch", json={"events": batch})
            r.raise_for_status()
            sent.update(ev["type"] for ev in batch)
            ids.update(ev["event_id"] for ev in batch)

        bad = [
            ("malformed JSON", client.post("/v1/feedback", content=b'{"type": "thumbs",',
                                           headers={"content-type": "application/json"})),
            ("wrong type", client.post("/v1/feedback", json={"type": "thumbs", "value": 5, "response_id": "r-1"})),
            ("a year ahead", client.post("/v1/feedback", json={**traffic[1], "occurred_at": "2099-01-01T00:00:00Z"})),
            ("no API key", httpx.post(f"{url}/v1/feedback", json=traffic[1])),
        ]
        for what, r in bad:
            rejected.append(f"{what} -> {r.status_code} {r.json().get('message', '')[:90]}")

        if policy_thread is not None:
            _say("waiting for the policy (SmolLM2-135M-Instruct) to load ...")
            policy_thread.join()
            for sample in samples[:chats]:
                r = client.post("/v1/chat", json={"user_id": "u-demo", "max_new_tokens": 48, "seed": seed,
                                                  "messages": [{"role": "user", "content": sample.prompt[:300]}]})
                r.raise_for_status()
                body = r.json()
                sent["turn"] += 1
                ids.add(body["event_id"])
                _say(f"  chat: {sample.prompt[:60]!r}\n     -> [{body['model_version']}] {body['message']['content'][:120]!r}")

        _say("waiting for the consumer to write everything to the lake ...")
        lake = open_storage(settings.lake.uri, settings.lake)
        missing = wait_for_events(lake, ids, since=since)
    counts = count_events(lake)

    _say("\nrejected on purpose (nothing valid was lost):")
    for line in rejected:
        _say(f"  {line}")
    _say(f"\nlake {settings.lake.uri}: rows by event type (one per event_id; a rerun with the same --seed"
         " resends the same event_ids, which the lake keeps once)")
    _say(f"  {'type':12s} {'sent now':>9s} {'in lake':>9s}")
    for t in sorted(set(counts) | set(sent)):
        _say(f"  {t:12s} {sent.get(t, 0):9d} {counts.get(t, 0):9d}")
    ok = not missing
    turns = read_events(lake, "turn")
    if len(turns):
        row = turns.iloc[-1]
        _say(f"\nnewest turn: model_version={row['model_version']} occurred_at={row['occurred_at']}"
             f"\n  prompt:   {json.dumps(row['messages'][0]['content'][:80])}\n  response: {json.dumps(row['response'][:80])}")
    _say(f"\n{'OK' if ok else 'INCOMPLETE'}: {sum(sent.values())} events sent, {len(ids) - len(missing)} of {len(ids)} in the lake, "
         f"{time.monotonic() - t0:.0f}s. The broker keeps running: `flywheel stack down` stops it.")
    return {"sent": dict(sent), "lake": counts, "complete": ok}
