"""
### flywheel_policy — retrain the policy after a new champion reward model, or daily

Scheduled by the `flywheel://models/flywheel-reward/champion` Asset **or** daily at 03:00 UTC.

1. **dataset** — curates the training window (`FLYWHEEL_LOOP__TRAIN_WINDOW_H` hours up to the run's end);
   idempotent, so a re-run gets the same dataset version.
2. **train** (pool `flywheel_training`) — the policy recipe (`FLYWHEEL_LOOP__POLICY_RECIPE`: PPO with LoRA by
   default; DPO/KTO by recipe) starting from the serving champion, rewarded by the champion reward model;
   registered as `flywheel-policy@challenger`. Emits `flywheel://models/flywheel-policy/challenger`, which
   schedules `flywheel_promote`. Skipped (with the reason in the log) while no reward model has passed its gate:
   a policy is never trained against a reward model the gate refused.

Task logs: dataset version and pairs, reward model version, start policy, held-out reward and KL before and
after, the registered version.
"""

from __future__ import annotations

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task

from flywheel.app.dag_defaults import (
    DEFAULT_ARGS,
    POLICY_CHALLENGER,
    REWARD_CHAMPION,
    START,
    TRAINING_POOL,
    interval_end,
)


@dag(schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * *", timezone="UTC"),
                                  assets=[REWARD_CHAMPION]),
     start_date=START, catchup=False, max_active_runs=1, default_args=DEFAULT_ARGS,
     tags=["flywheel", "training", "policy"], doc_md=__doc__)
def flywheel_policy():
    @task
    def dataset() -> dict:
        from flywheel.app.loop import latest_dataset

        return latest_dataset(interval_end())

    @task(pool=TRAINING_POOL, outlets=[POLICY_CHALLENGER])
    def train(data: dict, outlet_events=None) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from flywheel.app.loop import NoRewardModel, train_policy

        try:
            result = train_policy(data["dataset"])
        except NoRewardModel as e:  # nothing to retry: wait for a reward model to pass its gate
            raise AirflowSkipException(str(e)) from e
        outlet_events[POLICY_CHALLENGER].extra = {"version": result["version"], "dataset": data["dataset"]}
        return result

    train(dataset())


flywheel_policy()
