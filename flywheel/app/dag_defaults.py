"""Shared by the DAG files in dags/: default task arguments (owner, retries, failure alert), the Assets, the
one-slot training pool and the run's data end. Imports Airflow's SDK; no I/O at import."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import Asset

from training.tracking import POLICY_MODEL, REWARD_MODEL

START = datetime(2026, 1, 1)
TRAINING_POOL = "flywheel_training"  # one slot: one training task at a time (`flywheel airflow up` creates it)
DATASETS = Asset("flywheel://datasets/hourly", extra={"what": "an hourly curated preference dataset"})
REWARD_CHAMPION = Asset(f"flywheel://models/{REWARD_MODEL}/champion", extra={"what": "a new champion reward model"})
POLICY_CHALLENGER = Asset(f"flywheel://models/{POLICY_MODEL}/challenger", extra={"what": "a new policy challenger"})


def _on_failure(context):  # imported lazily so that parsing the DAG files stays cheap
    from flywheel.app.alerts import notify_failure

    notify_failure(context)


def interval_end() -> str:
    """The end of the data a run is about, inside a task: the interval end of the curation run whose Asset
    event triggered it, else the run's data interval end, else its logical date (``airflow dags test D DATE``).
    Deterministic for a given run, so a re-run trains on the same window."""
    from airflow.sdk import get_current_context

    ctx = get_current_context()
    events = [e for evs in (ctx.get("triggering_asset_events") or {}).values() for e in evs]
    ends = [e.extra["end"] for e in events if (e.extra or {}).get("end")]
    if ends:
        return max(ends)
    when = ctx.get("data_interval_end") or ctx.get("logical_date")
    if when is None:
        raise ValueError("this run has no triggering curation event, data interval or logical date")
    return when.isoformat()


DEFAULT_ARGS = {
    "owner": "ml-platform",
    # FLYWHEEL_DAG_RETRIES=0 for `airflow dags test` runs that must fail fast (the tests of the failure alert)
    "retries": int(os.environ.get("FLYWHEEL_DAG_RETRIES", "2")),
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": True,
    "on_failure_callback": _on_failure,
}
