"""The loop's part of review, on a real lake and a real MLflow registry: the champion reward model's view of
each queued item, the pairs it is least sure of routed as ``uncertain``, and the coverage the reward DAG reads."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd

from flywheel.settings import Settings
from flywheel.storage import open_storage
from pipelines.dataset import open_dataset
from pipelines.review import read_queue
from tests.tiny import tiny_encoder_dir, write_events_to_lake

NOW = datetime(2026, 11, 20, 10, 50, tzinfo=UTC)  # the simulated traffic spans [09:55, ~10:55)
START, END = NOW - timedelta(hours=2), NOW + timedelta(hours=1)


def test_the_hourly_curation_scores_the_queue_and_routes_the_pairs_the_reward_model_is_unsure_of(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from flywheel.app import loop
    from flywheel.app.review import coverage
    from flywheel.app.simulate import SimConfig, simulate_events
    from pipelines.curation import curate
    from pipelines.sharegpt import chat_samples
    from training.reward.model import RewardModel
    from training.reward.train import log_and_register
    from training.tracking import use_tracking

    settings = Settings(home=tmp_path / "home")
    sim = simulate_events(chat_samples(60), SimConfig(users=40, seed=1, prompts=40), now=NOW)
    write_events_to_lake(settings, sim.events)
    storage = open_storage(settings.lake.uri, settings.lake)

    # no reward model is champion yet: corrections and the held-back sample only, without a model's view
    first = loop.curate_interval(START, END, settings, with_review=True)["review"]
    assert first["reward_model"] is None and first["routed_by_route"]["uncertain"] == 0
    assert first["routed_by_route"]["correction"] > 0 and first["routed_by_route"]["held_back"] > 0
    assert (read_queue(storage)["model_view"] == "").all()

    RewardModel.from_backbone(tiny_encoder_dir(tmp_path / "rm-bb"), max_length=64).save(tmp_path / "rm")
    use_tracking(settings, "flywheel-reward")
    with mlflow.start_run() as run:
        version = log_and_register(tmp_path / "rm", run.info.run_id, "0123456789abcdef", {})
    MlflowClient(settings.mlflow.tracking_uri).set_registered_model_alias("flywheel-reward", "champion", version)

    out = loop.curate_interval(START, END, settings, with_review=True)["review"]
    assert out["reward_model"] == f"flywheel-reward/{version}" and out["uncertain"] == settings.review.uncertain_pairs
    queue = read_queue(storage)
    uncertain = queue[queue["route"] == "uncertain"]
    views = [json.loads(v) for v in uncertain["model_view"]]
    assert all(v["model"] == f"flywheel-reward/{version}" and 0 <= v["p_user"] <= 1 for v in views)
    # half the least certain (p nearest 0.5), half the most against the user's label (lowest p)
    least = [v["p_user"] for v in views if v["note"] == "the reward model is least certain"]
    against = [v["p_user"] for v in views if v["note"].startswith("the reward model disagrees")]
    assert len(least) == len(against) == settings.review.uncertain_pairs // 2
    assert max(abs(p - 0.5) for p in least) <= min(abs(p - 0.5) for p in against) or max(against) <= min(least)
    # each targets one real feedback event, whose lineage a review event carries
    events = {e["event_id"]: e for e in sim.events}
    for item in uncertain.itertuples():
        assert events[item.target_event_id]["type"] == item.target_type
        assert item.user_id == events[item.target_event_id]["user_id"] != "unknown"
    scored = queue[(queue["route"] == "correction") & (queue["response"] != "")]
    assert len(scored) and (scored["model_view"] != "").all()
    # curation again (another DAG, a re-run) keeps the model's view
    curate(settings, START, END)
    again = read_queue(storage).set_index("item_id")
    assert (again.loc[scored["item_id"], "model_view"] == scored.set_index("item_id")["model_view"]).all()

    # nothing reviewed yet: a reward DAG that waits for half of the corrections waits
    settings.review.min_coverage = 0.5
    cov = coverage(settings, START, END)
    assert cov["routed"] == first["routed_by_route"]["correction"] and cov["reviewed"] == 0 and not cov["enough"]
    # the loop's step run again (a retry, a backfill): the same uncertain items, not 20 others
    loop.curate_interval(START, END, settings, with_review=True)
    rerun = read_queue(storage)
    assert set(rerun.loc[rerun["route"] == "uncertain", "item_id"]) == set(uncertain["item_id"])
    # an hour without feedback, a reward model champion: nothing to score, no failure
    empty = loop.curate_interval(START - timedelta(hours=10), START - timedelta(hours=9), settings, with_review=True)
    assert empty["review"]["uncertain"] == 0 and empty["review"]["scored"] == 0

    # a reviewer rejects an uncertain pair: the training window's curation (which routes nothing itself) honours it
    item = uncertain.iloc[0]
    review = {"type": "review", "event_id": str(uuid.uuid4()), "occurred_at": (END + timedelta(hours=1)).isoformat(),
              "conversation_id": item["conversation_id"], "user_id": item["user_id"],
              "model_version": item["model_version"], "reviewer": "ana", "item_id": item["item_id"],
              "target_event_id": item["target_event_id"], "decision": "reject", "reason": "subjective"}
    assert write_events_to_lake(settings, [review], topic="reviews") == 1
    window = loop.curate_interval(END - timedelta(hours=settings.loop.train_window_h), END, settings)
    ds = open_dataset(window["dataset"], settings)
    assert ds.table("quarantine").set_index("event_id").loc[item["target_event_id"], "reason"] == \
        "reviewer_rejected:subjective"
    assert not any(item["target_event_id"] in ids for ids in ds.table("pairs")["event_ids"])

    settings.loop.min_new_pairs = 0
    increment = loop.reward_increment(END, settings)
    assert not increment["enough"] and increment["review_coverage"]["coverage"] == 0.0
    assert pd.Timestamp(START) <= queue["occurred_at"].min()
