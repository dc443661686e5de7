"""``flywheel status``: the whole stack on one screen, for an operator.

Every probe runs in its own thread with a deadline, so a frozen broker (SIGSTOP), a hung MLflow or a dead API
server shows as "not answering" instead of hanging the command. Probes:

- services: the broker, the HTTP API, the consumer's metrics endpoint, MLflow, Airflow;
- consumer lag per partition (committed offset of the consumer group against the end of the topic);
- events that reached the lake in the last hour, by type (held back ones counted apart);
- the last curated dataset;
- each model's champion and challenger with the gate's last decision on it;
- the next scheduled DAG runs, when Airflow is up.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flywheel.settings import Settings

NOT_ANSWERING = "not answering"


def _within(timeout_s: float, probes: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run the probes at once; a probe still running after ``timeout_s`` reports that it did not answer (its
    daemon thread is left behind: the command's process ends anyway)."""
    results: dict[str, Any] = {}

    def run(name: str, probe: Callable[[], Any]) -> None:
        try:
            results[name] = probe()
        except Exception as e:  # a probe's failure is a fact about the stack, not a crash of the command
            results[name] = {"state": "error", "error": f"{type(e).__name__}: {e}"[:300]}

    threads = {name: threading.Thread(target=run, args=(name, probe), daemon=True, name=f"status-{name}")
               for name, probe in probes.items()}
    for t in threads.values():
        t.start()
    deadline = time.monotonic() + timeout_s
    for name, t in threads.items():
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            results[name] = {"state": NOT_ANSWERING, "error": f"no answer within {timeout_s:.0f}s"}
    return {name: results[name] for name in probes}


def _broker(settings: Settings, timeout_s: float) -> dict[str, Any]:
    from kafka import KafkaConsumer, TopicPartition

    from flywheel.app import stack

    where = settings.kafka.bootstrap_servers
    if stack.uses_embedded_broker(settings) and stack.running_broker(settings) is None:
        return {"state": "stopped", "where": where, "lag": []}
    ms = int(timeout_s * 1000)
    config = {**settings.kafka.client_config(), "request_timeout_ms": max(ms, 1000) + 500}
    consumer = KafkaConsumer(**config, group_id=settings.kafka.group_id, enable_auto_commit=False)
    try:
        partitions = sorted(consumer.partitions_for_topic(settings.kafka.topic) or [])
        tps = [TopicPartition(settings.kafka.topic, p) for p in partitions]
        ends = _end_offsets(consumer, tps, timeout_s)
        lag = []
        for tp in tps:
            committed = consumer.committed(tp)
            end = ends.get(tp)
            lag.append({"partition": tp.partition, "committed": committed, "end": end,
                        "lag": None if end is None else end - (committed or 0)})
        return {"state": "up", "where": where, "topic": settings.kafka.topic, "group": settings.kafka.group_id,
                "lag": lag}
    finally:
        consumer.close(autocommit=False)


def _end_offsets(consumer: Any, tps: list[Any], timeout_s: float) -> dict[Any, int | None]:
    """Each partition's end (high watermark), as fetch responses carry it. (The embedded broker answers the
    ListOffsets request, ``end_offsets()``, with 1 whatever the partition holds, so it is not asked.) The fetch
    starts at each partition's committed offset, so it reads next to nothing."""
    if not tps:
        return {}
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, consumer.committed(tp) or 0)
    deadline = time.monotonic() + timeout_s / 2
    while time.monotonic() < deadline and any(consumer.highwater(tp) is None for tp in tps):
        consumer.poll(timeout_ms=100, max_records=1)
    return {tp: consumer.highwater(tp) for tp in tps}


def _http(url: str, timeout_s: float) -> dict[str, Any]:
    import httpx

    try:
        r = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as e:
        return {"state": "down", "where": url, "error": type(e).__name__}
    return {"state": "up" if r.status_code < 500 else f"HTTP {r.status_code}", "where": url}


def _consumer_metrics(settings: Settings, timeout_s: float) -> dict[str, Any]:
    import httpx

    url = f"http://127.0.0.1:{settings.ingest.metrics_port}/metrics"
    try:
        text = httpx.get(url, timeout=timeout_s).text
    except httpx.HTTPError as e:
        return {"state": "down", "where": url, "error": type(e).__name__}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("flywheel_ingest_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            key = name.split("{")[0].removesuffix("_total").removeprefix("flywheel_ingest_")
            totals[key] = totals.get(key, 0.0) + float(value)  # labelled counters: the sum of their series
    return {"state": "up", "where": url, "totals": {k: v for k, v in totals.items()
                                                     if k in ("records_in", "records_written", "dead_lettered",
                                                              "held", "restarts", "commits")}}


def _lake(settings: Settings, now: datetime) -> dict[str, Any]:
    from flywheel.events import EVENT_TYPES
    from flywheel.storage import open_storage
    from ingest.lake import held_reasons, read_events

    storage = open_storage(settings.lake.uri, settings.lake)
    since = now - timedelta(hours=1)
    by_type = {t: len(read_events(storage, t, since)) for t in EVENT_TYPES}
    held = {r: sum(len(read_events(storage, t, since, held=r)) for t in EVENT_TYPES) for r in held_reasons(storage)}
    dataset = None
    keys = [k for k in storage.list("datasets/by-interval/") if k.endswith(".json")]
    if keys:
        latest = max(keys)  # named <start>--<end>: the latest interval sorts last
        version = json.loads(storage.get_bytes(latest))["version"]
        manifest = json.loads(storage.get_bytes(f"datasets/{version}/manifest.json"))
        dataset = {"version": version, "interval": latest.rsplit("/", 1)[-1].removesuffix(".json"),
                   "pairs": manifest.get("files", {}).get("pairs.parquet", {}).get("rows")}
    return {"state": "up", "where": settings.lake.uri, "last_hour": by_type, "held_last_hour": held,
            "last_dataset": dataset}


def _models(settings: Settings) -> dict[str, Any]:
    from training.registry import CHAMPION, AuditLog, alias_version, registry_client
    from training.tracking import POLICY_MODEL, REWARD_MODEL

    uri = settings.mlflow.tracking_uri
    out: dict[str, Any] = {"state": "up", "where": uri, "models": {}}
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        # no registry yet; opening one would create (and migrate) the database: a status must not write
        out["state"] = "empty"
        out["models"] = {m: {"champion": None, "latest": None, "challenger": None, "last_decision": None}
                         for m in (REWARD_MODEL, POLICY_MODEL)}
        return out
    client = registry_client(settings)
    audit = AuditLog.from_settings(settings)
    for model in (REWARD_MODEL, POLICY_MODEL):
        try:
            versions = client.search_model_versions(f"name='{model}'")
        except Exception:  # noqa: BLE001  # not registered yet
            versions = []
        champion = alias_version(client, model, CHAMPION) if versions else None
        latest = max((int(v.version) for v in versions), default=None)
        history = audit.history(model)
        last = history[-1] if history else None
        out["models"][model] = {
            "champion": champion, "latest": None if latest is None else str(latest),
            "challenger": str(latest) if latest is not None and str(latest) != champion else None,
            "last_decision": None if last is None else {"version": last.version, "action": last.action,
                                                        "reasons": last.reasons, "at": last.at}}
    return out


def _airflow(settings: Settings, timeout_s: float) -> dict[str, Any]:
    import httpx

    base = f"http://127.0.0.1:{settings.loop.airflow_port}"
    try:
        health = httpx.get(f"{base}/api/v2/monitor/health", timeout=timeout_s)
    except httpx.HTTPError:
        return {"state": "down", "where": base, "next_runs": []}
    out: dict[str, Any] = {"state": "up" if health.status_code == 200 else f"HTTP {health.status_code}",
                           "where": base, "next_runs": []}
    passwords = settings.home / "airflow" / "simple_auth_manager_passwords.json.generated"
    if passwords.exists():  # the embedded Airflow's admin (flywheel airflow up)
        user, password = next(iter(json.loads(passwords.read_text()).items()))
        token = httpx.post(f"{base}/auth/token", json={"username": user, "password": password}, timeout=timeout_s)
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        dags = httpx.get(f"{base}/api/v2/dags", headers=headers, timeout=timeout_s).json().get("dags", [])
        out["next_runs"] = sorted(({"dag": d["dag_id"], "paused": d.get("is_paused"),
                                    "next_run": d.get("next_dagrun_run_after") or d.get("next_dagrun_logical_date")}
                                   for d in dags), key=lambda d: str(d["next_run"]))
    return out


def gather(settings: Settings, *, timeout_s: float = 5.0, now: datetime | None = None) -> dict[str, Any]:
    """Every probe's result (see the module docstring); never raises, never takes much longer than
    ``timeout_s``."""
    now = now or datetime.now(UTC)
    api = settings.api
    probes: dict[str, Callable[[], Any]] = {
        "broker": lambda: _broker(settings, timeout_s * 0.8),
        "api": lambda: _http(f"http://{api.host}:{api.port}/healthz", timeout_s * 0.8),
        "consumer": lambda: _consumer_metrics(settings, timeout_s * 0.8),
        "lake": lambda: _lake(settings, now),
        "registry": lambda: _models(settings),
        "airflow": lambda: _airflow(settings, timeout_s * 0.8),
    }
    return {"at": now.isoformat(), **_within(timeout_s, probes)}


def render(status: dict[str, Any]) -> str:
    """The plain-text screen of :func:`gather`'s result."""
    lines = [f"flywheel status at {status['at'][:19]}Z", "", "services"]
    for name in ("broker", "api", "consumer", "registry", "airflow", "lake"):
        s = status[name]
        extra = f" ({s['error']})" if s.get("error") else ""
        lines.append(f"  {name:9s} {s['state']:14s} {s.get('where', '')}{extra}")
    broker = status["broker"]
    if broker.get("lag"):
        lines += ["", f"consumer lag ({broker.get('group')} on {broker.get('topic')})",
                  "  partition  committed  end        lag"]
        lines += [f"  {p['partition']:<10} {_s(p['committed']):<10} {_s(p['end']):<10} {_s(p['lag'])}"
                  for p in broker["lag"]]
    elif broker["state"] != "up":
        lines += ["", f"consumer lag: unknown, the broker is {broker['state']}"]
    lake = status["lake"]
    if lake.get("last_hour") is not None:
        counts = ", ".join(f"{t} {n}" for t, n in lake["last_hour"].items() if n) or "none"
        held = ", ".join(f"{r} {n}" for r, n in lake["held_last_hour"].items() if n) or "none"
        lines += ["", f"lake, last hour: {counts}; held back: {held}"]
        ds = lake.get("last_dataset")
        lines.append(f"last dataset: {ds['version']} ({ds['interval']}, {ds['pairs']} pairs)" if ds else
                     "last dataset: none yet")
    reg = status["registry"]
    if reg.get("models"):
        lines += ["", "models"]
        for model, m in reg["models"].items():
            d = m["last_decision"]
            decision = f"last gate decision: v{d['version']} {d['action'].upper()} — {'; '.join(d['reasons'])}" if d \
                else "no gate decision yet"
            lines.append(f"  {model}: champion v{_s(m['champion'])}, challenger v{_s(m['challenger'])}; {decision}")
    air = status["airflow"]
    if air.get("next_runs"):
        lines += ["", "next DAG runs"]
        lines += [f"  {r['dag']:32s} {_s(r['next_run'])}{' (paused)' if r['paused'] else ''}" for r in air["next_runs"]]
    return "\n".join(lines)


def _s(v: Any) -> str:
    return "—" if v is None else str(v)
