"""
### flywheel_curate — hourly curation of the feedback lake

Every hour, curates the **previous hour's** lake partitions (the run's data interval) into a versioned
preference dataset: validation, abuse filters (blocked accounts, bots, brigading, flip-flopping, harmful or
unrelated corrections), pairing rules, agreement statistics, PII masking, eval split.

- **Idempotent:** the same interval (and code) always gives the same dataset version; a re-run overwrites
  the same files. Safe to clear and re-run.
- **Task log:** feedback events read, held back by reason, pairs by source, agreement (percent and
  Krippendorff's alpha), the dataset version and URI.
- **Emits** the `flywheel://datasets/hourly` Asset, which schedules `flywheel_reward`.
"""

from __future__ import annotations

from airflow.sdk import CronDataIntervalTimetable, dag, task

from flywheel.app.dag_defaults import DATASETS, DEFAULT_ARGS, START


@dag(schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),  # runs at h+1 for [h, h+1)
     start_date=START, catchup=False, max_active_runs=1, default_args=DEFAULT_ARGS,
     tags=["flywheel", "curation"], doc_md=__doc__)
def flywheel_curate():
    @task(outlets=[DATASETS])
    def curate(data_interval_start=None, data_interval_end=None, outlet_events=None) -> dict:
        from flywheel.app.loop import curate_interval

        result = curate_interval(data_interval_start, data_interval_end, with_review=True)
        outlet_events[DATASETS].extra = {"dataset": result["dataset"], "end": result["end"], "pairs": result["pairs"]}
        return result

    curate()


flywheel_curate()
