"""What a failed Airflow task tells the people watching: one summary, in the task log and (when
``loop.webhook_url`` is set) POSTed as JSON to a webhook (Slack-compatible: the summary is in ``text``)."""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any

from flywheel.settings import Settings, get_settings

log = logging.getLogger("flywheel.app.alerts")


def failure_summary(context: dict[str, Any]) -> dict[str, Any]:
    """The facts of a failed task instance from an Airflow callback context (no Airflow import needed)."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    exc = context.get("exception")
    start = context.get("data_interval_start") or getattr(dag_run, "data_interval_start", None)
    end = context.get("data_interval_end") or getattr(dag_run, "data_interval_end", None)
    summary = {
        "dag_id": getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "run_id": getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None),
        "try_number": getattr(ti, "try_number", None),
        "max_tries": getattr(ti, "max_tries", None),
        "data_interval": [str(start) if start else None, str(end) if end else None],
        "error": f"{type(exc).__name__}: {exc}" if exc is not None else "unknown (no exception in the context)",
        "log_url": getattr(ti, "log_url", None),
    }
    summary["text"] = (f"FLYWHEEL TASK FAILED: {summary['dag_id']}.{summary['task_id']} "
                       f"(run {summary['run_id']}, try {summary['try_number']}, interval "
                       f"{summary['data_interval'][0]} .. {summary['data_interval'][1]}): {summary['error']}")
    return summary


def notify_failure(context: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """Airflow ``on_failure_callback``: log the summary; POST it to the webhook if one is configured. A
    webhook that cannot be reached is logged, never raised (the task already failed for its own reason)."""
    summary = failure_summary(context)
    log.error(summary["text"])
    url = (settings or get_settings()).loop.webhook_url
    if url:
        req = urllib.request.Request(url, data=json.dumps(summary, default=str).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                summary["webhook_status"] = resp.status
        except OSError as e:
            log.error("failure webhook %s unreachable: %s", url, e)
            summary["webhook_status"] = None
    return summary
