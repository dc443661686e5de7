"""
### flywheel_reward — retrain the reward model when enough new pairs have arrived

Scheduled by the `flywheel://datasets/hourly` Asset (each hourly curation). Steps:

1. **increment** — pairs curated since the champion reward model's training data ended; the run stops here
   (short-circuit, not a failure) below `FLYWHEEL_LOOP__MIN_NEW_PAIRS`.
2. **train** (pool `flywheel_training`) — curates the training window (`FLYWHEEL_LOOP__TRAIN_WINDOW_H` hours
   up to the interval end) and trains the reward recipe (`FLYWHEEL_LOOP__REWARD_RECIPE`); registered as
   `flywheel-reward@challenger`. A dataset that already produced a version is not trained again.
3. **gate** — evaluates the challenger against the champion on the eval pairs, runs the gate, promotes only
   if it passes. Emits `flywheel://models/flywheel-reward/champion` (which schedules `flywheel_policy`) when
   a new reward model became champion.

Task logs: new pairs vs the minimum, dataset version and size, accuracy / ECE / margin / length correlation,
the gate's decision and every reason.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from flywheel.app.dag_defaults import (
    DATASETS,
    DEFAULT_ARGS,
    REWARD_CHAMPION,
    START,
    TRAINING_POOL,
    interval_end,
)


@dag(schedule=[DATASETS], start_date=START, catchup=False, max_active_runs=1, default_args=DEFAULT_ARGS,
     tags=["flywheel", "training", "reward-model"], doc_md=__doc__)
def flywheel_reward():
    @task.short_circuit
    def increment() -> bool:
        from flywheel.app.loop import reward_increment

        return reward_increment(interval_end())["enough"]

    @task(pool=TRAINING_POOL)
    def train() -> dict:
        from flywheel.app.loop import train_reward_model

        return train_reward_model(interval_end())

    @task(outlets=[REWARD_CHAMPION])
    def gate(trained: dict) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from flywheel.app.loop import evaluate_and_promote
        from training.tracking import REWARD_MODEL

        decision = evaluate_and_promote(REWARD_MODEL, trained["version"], dataset=trained["dataset"])
        if not decision["promoted"]:  # nothing new downstream: skip, so the Asset event is not emitted
            raise AirflowSkipException("not promoted: " + "; ".join(decision["reasons"]))
        return decision

    trained = train()
    increment() >> trained  # below the minimum, the short-circuit skips training and the gate
    gate(trained)


flywheel_reward()
