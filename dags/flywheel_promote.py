"""
### flywheel_promote — evaluate the new policy challenger, run the gate, promote if it passes

Scheduled by the `flywheel://models/flywheel-policy/challenger` Asset (each policy retraining). Can also be
triggered by hand with the conf `{"version": "7"}` to gate a particular version.

The challenger and the champion answer the held-out prompts; the champion reward model judges. The gate
(`FLYWHEEL_LOOP__GATE_RECIPE`) checks the length-controlled win rate, KL to the reference, length drift,
never-ending answers, safety probes and the judge's accuracy; only a pass moves the `champion` alias
(serving follows it). Every decision, with its reasons and metrics, is in the registry history
(`flywheel history`). Idempotent: a version already decided against the same champion is not re-evaluated.

Task log: every metric for both policies and the decision with each reason.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from flywheel.app.dag_defaults import DEFAULT_ARGS, POLICY_CHALLENGER, START


@dag(schedule=[POLICY_CHALLENGER], start_date=START, catchup=False, max_active_runs=1, default_args=DEFAULT_ARGS,
     tags=["flywheel", "promotion"], doc_md=__doc__)
def flywheel_promote():
    @task
    def gate(triggering_asset_events=None, dag_run=None) -> dict:
        from flywheel.app.loop import evaluate_and_promote
        from training.registry import CHALLENGER, POLICY_MODEL, alias_version, registry_client

        conf = (dag_run.conf if dag_run else None) or {}
        events = [e for evs in (triggering_asset_events or {}).values() for e in evs]
        version = conf.get("version") or next((e.extra["version"] for e in reversed(events)
                                               if (e.extra or {}).get("version")), None)
        if version is None:  # a manual run without a version: the current challenger
            from flywheel.settings import get_settings

            version = alias_version(registry_client(get_settings()), POLICY_MODEL, CHALLENGER)
        if version is None:
            raise ValueError("no policy version to gate: no triggering event, no conf 'version', no @challenger")
        return evaluate_and_promote(POLICY_MODEL, str(version))

    gate()


flywheel_promote()
