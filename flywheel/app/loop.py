"""The steps of the continuous loop as library functions: what the Airflow DAGs and ``flywheel demo`` call.

Each step takes the settings plus times and ids, returns a small JSON-able dict (the ids and URIs the next
step needs and the numbers a data engineer reads in the task log), logs those numbers, and is idempotent
for its inputs: curation of an interval gives the same dataset version; training on a dataset that already
produced a registered version returns that version; evaluating and gating a version that already has a
decision against the same champion returns that decision.

    curate_interval(start, end)            -> {dataset, pairs, feedback_read, held_back_by_reason, agreement…}
    reward_increment(end)                  -> {new_pairs, since, enough}        (short-circuits the RM DAG)
    train_reward_model(end)                -> {dataset, version, metrics}        (window [end - train_window_h, end))
    train_policy(dataset)                  -> {version, reward_model_version, start_policy, metrics}
    evaluate_and_promote(model, version)   -> {promoted, action, reasons, metrics}
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from flywheel.settings import Settings, get_settings
from training.registry import registry_client
from training.tracking import POLICY_MODEL, REWARD_MODEL

log = logging.getLogger(__name__)


class NoRewardModel(ValueError):
    """The policy cannot be trained: no reward model is champion."""


EPOCH = datetime(2020, 1, 1, tzinfo=UTC)


def _when(value: datetime | str) -> datetime:
    dt = datetime.fromisoformat(value) if isinstance(value, str) else value
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def curate_interval(start: datetime | str, end: datetime | str, settings: Settings | None = None, *,
                    with_review: bool = False) -> dict[str, Any]:
    """Curate ``[start, end)`` of the lake into a versioned dataset (same interval + code = same version).
    ``with_review``: the curation run of the interval (the hourly DAG's, the demo's), which also gives its review
    queue the champion reward model's view and routes the pairs that model is least sure of."""
    from pipelines.curation import curate

    settings = settings or get_settings()
    result = curate(settings, _when(start), _when(end), route_review=with_review)
    m = result.manifest
    out = {"dataset": result.version, "uri": result.uri, "start": _when(start).isoformat(), "end": _when(end).isoformat(),
           "pairs": m["files"]["pairs.parquet"]["rows"], "events_read": m["events_read"],
           "feedback_read": m["feedback_read"], "held_at_ingest": m["held_at_ingest"], "held_back": m["held_back"],
           "held_back_by_reason": {k: v for k, v in m["held_back_by_reason"].items() if v},
           "pairs_by_source": m["pairs_by_source"], "agreement": m["agreement"]}
    log.info("curated [%s, %s): dataset %s, %d feedback events read (+%d held at ingest), held back %d %s, "
             "%d pairs %s, agreement %s", out["start"], out["end"], out["dataset"], out["feedback_read"],
             out["held_at_ingest"], out["held_back"], out["held_back_by_reason"], out["pairs"], out["pairs_by_source"],
             out["agreement"])
    if with_review:
        from flywheel.app.review import score_queue

        rv = m["review"]
        out["review"] = {"routed": rv["routed"], "routed_by_route": rv["routed_by_route"], "reviewed": rv["reviewed"],
                         "outcomes": rv["outcomes"], "rejected_by_reason": rv["rejected_by_reason"],
                         "filter_precision": rv["filter_precision"]["precision"],
                         **score_queue(settings, result.version, _when(start), _when(end))}
    return out


def _versions(client: Any, model: str) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return sorted(client.search_model_versions(f"name='{model}'"), key=lambda v: int(v.version))
    except MlflowException:
        return []


def _dataset_end(settings: Settings, dataset_version: str | None) -> datetime | None:
    from pipelines.dataset import open_dataset

    if not dataset_version:
        return None
    try:
        return _when(open_dataset(dataset_version, settings).manifest["interval"]["end"])
    except FileNotFoundError:
        return None


def reward_increment(end: datetime | str, settings: Settings | None = None) -> dict[str, Any]:
    """Pairs curated since the champion reward model's training data ended (or over the whole training
    window when there is none), and whether they reach ``loop.min_new_pairs``."""
    from training.registry import CHAMPION, alias_version

    settings = settings or get_settings()
    end = _when(end)
    client = registry_client(settings)
    champion = alias_version(client, REWARD_MODEL, CHAMPION)
    trained_until = _dataset_end(settings, client.get_model_version(REWARD_MODEL, champion).tags.get("dataset_version")
                                 if champion else None)
    since = max(trained_until or EPOCH, end - timedelta(hours=settings.loop.train_window_h))
    if since >= end:
        out = {"since": since.isoformat(), "end": end.isoformat(), "new_pairs": 0, "champion": champion,
               "enough": False, "min_new_pairs": settings.loop.min_new_pairs}
    else:
        increment = curate_interval(since, end, settings)
        out = {"since": since.isoformat(), "end": end.isoformat(), "new_pairs": increment["pairs"],
               "increment_dataset": increment["dataset"], "champion": champion,
               "enough": increment["pairs"] >= settings.loop.min_new_pairs, "min_new_pairs": settings.loop.min_new_pairs}
    if settings.review.min_coverage > 0 and since < end:
        from flywheel.app.review import coverage

        out["review_coverage"] = cov = coverage(settings, since, end)
        if not cov["enough"]:
            out["enough"] = False
            log.info("reward model waits for review: %d of %d routed corrections reviewed (%.2f < %.2f)",
                     cov["reviewed"], cov["routed"], cov["coverage"], cov["min_coverage"])
    log.info("reward model %s trained on data up to %s; %d new pairs since (minimum %d): %s", champion, since,
             out["new_pairs"], settings.loop.min_new_pairs, "retrain" if out["enough"] else "skip")
    return out


def train_reward_model(end: datetime | str, settings: Settings | None = None, *,
                       overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Curate the training window ending at ``end`` and train the reward recipe on it; registered as
    ``flywheel-reward@challenger``. A dataset + recipe that already produced a version returns it."""
    from training.config import RewardRecipe, load_recipe, recipe_dict
    from training.reward.train import train_reward

    settings = settings or get_settings()
    end = _when(end)
    data = curate_interval(end - timedelta(hours=settings.loop.train_window_h), end, settings)
    recipe = load_recipe(settings.loop.reward_recipe, overrides)
    if not isinstance(recipe, RewardRecipe):
        raise ValueError(f"{settings.loop.reward_recipe}: not a reward recipe")
    existing = _trained_on(settings, REWARD_MODEL, data["dataset"], recipe.name)
    if existing:
        log.info("reward model version %s was already trained on dataset %s with %s", existing.version,
                 data["dataset"], recipe.name)
        return {"dataset": data["dataset"], "version": str(existing.version), "reused": True,
                "metrics": {k: float(v) for k, v in existing.tags.items() if k.startswith("eval_") and k != "eval_run_id"}}
    if data["pairs"] == 0:
        raise ValueError(f"dataset {data['dataset']} ([{data['start']}, {data['end']})) has no pairs to train on")
    res = train_reward(settings, recipe, data["dataset"])
    _tag(settings, REWARD_MODEL, res.model_version, {"recipe": recipe.name})
    log.info("reward model version %s on dataset %s (%d pairs): %s (recipe %s)", res.model_version,
             data["dataset"], data["pairs"], res.metrics, recipe_dict(recipe))
    return {"dataset": data["dataset"], "version": res.model_version, "reused": False, "run_id": res.run_id,
            "metrics": res.metrics, "pairs": data["pairs"]}


def _trained_on(settings: Settings, model: str, dataset: str, recipe: str, **tags: str) -> Any:
    for mv in reversed(_versions(registry_client(settings), model)):
        t = mv.tags
        if t.get("dataset_version") == dataset and t.get("recipe") == recipe and all(t.get(k) == v for k, v in tags.items()):
            return mv
    return None


def _tag(settings: Settings, model: str, version: str | None, tags: dict[str, str]) -> None:
    from training.registry import tag_version

    if version:
        tag_version(registry_client(settings), model, version, tags)


def train_policy(dataset: str, settings: Settings | None = None, *, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """PPO (or DPO/KTO by recipe) on ``dataset`` with the champion reward model, starting from the serving
    champion policy (``loop.policy_from_champion``); registered as ``flywheel-policy@challenger``."""
    from training.config import PPORecipe, PreferenceOptRecipe, load_recipe
    from training.registry import CHALLENGER, CHAMPION, alias_version, bootstrap_policy

    settings = settings or get_settings()
    client = registry_client(settings)
    champion_policy = alias_version(client, POLICY_MODEL, CHAMPION) or bootstrap_policy(settings)
    rm = alias_version(client, REWARD_MODEL, CHAMPION)
    if rm is None:
        challenger = alias_version(client, REWARD_MODEL, CHALLENGER)
        why = ("no reward model is registered: train one first (flywheel train reward)" if challenger is None else
               f"no reward model has passed the gate (version {challenger} is only a challenger): a policy is "
               "trained against an approved reward model only (flywheel evaluate/promote --model flywheel-reward)")
        raise NoRewardModel(why)
    extra: dict[str, Any] = {}
    if settings.loop.policy_from_champion:
        extra["policy"] = f"models:/{POLICY_MODEL}/{champion_policy}"
    recipe = load_recipe(settings.loop.policy_recipe, {**extra, **(overrides or {})})
    if isinstance(recipe, PPORecipe) and "reward_model" not in (overrides or {}):
        recipe = dataclasses.replace(recipe, reward_model=f"models:/{REWARD_MODEL}/{rm}")
    tags = {"reward_model_version": str(rm) if isinstance(recipe, PPORecipe) else "none",
            "start_policy": recipe.policy}
    existing = _trained_on(settings, POLICY_MODEL, dataset, recipe.name, **tags)
    if existing:
        log.info("policy version %s was already trained on dataset %s with %s", existing.version, dataset, recipe.name)
        return {"dataset": dataset, "version": str(existing.version), "reused": True, **tags}
    if isinstance(recipe, PPORecipe):
        from training.policy.ppo import train_ppo

        res = train_ppo(settings, recipe, dataset)
    elif isinstance(recipe, PreferenceOptRecipe):
        from training.policy.prefopt import train_preference_opt

        res = train_preference_opt(settings, recipe, dataset)
    else:
        raise ValueError(f"{settings.loop.policy_recipe}: not a policy recipe")
    _tag(settings, POLICY_MODEL, res.version, {"recipe": recipe.name, "start_policy": recipe.policy})
    log.info("policy version %s (%s from %s, reward model %s) on dataset %s: %s", res.version, recipe.name,
             recipe.policy, tags["reward_model_version"], dataset, res.metrics)
    return {"dataset": dataset, "version": res.version, "reused": False, "run_id": res.run_id,
            "metrics": res.metrics, **tags}


def evaluate_and_promote(model: str, version: str, settings: Settings | None = None, *, dataset: str | None = None,
                         actor: str = "flywheel-loop", prompts: list[str] | None = None,
                         cache: dict[str, Any] | None = None, with_report: bool = False) -> dict[str, Any]:
    """Evaluate ``version`` against the champion, run the gate, promote if it passes; every decision is in
    the registry history. A version already decided against the same champion is not evaluated again.
    ``prompts``/``cache`` go to :func:`training.evaluation.evaluate_challenger`; ``with_report`` adds the
    whole evaluation report (with every answer) under ``report``."""
    from training.config import GateRecipe, load_recipe
    from training.evaluation import evaluate_challenger
    from training.registry import CHAMPION, AuditLog, alias_version, promote

    settings = settings or get_settings()
    version = str(version)
    gate = load_recipe(settings.loop.gate_recipe)
    if not isinstance(gate, GateRecipe):
        raise ValueError(f"{settings.loop.gate_recipe}: not a gate recipe")
    client = registry_client(settings)
    champion = alias_version(client, model, CHAMPION)
    for rec in reversed(AuditLog.from_settings(settings).history(model)):
        if rec.version == version and rec.action in ("promote", "refuse", "force") and \
                (rec.previous == champion or rec.champion == champion):
            log.info("%s version %s was already decided (%s): %s", model, version, rec.action, rec.reasons)
            return {"model": model, "version": version, "promoted": rec.action != "refuse", "action": rec.action,
                    "reasons": rec.reasons, "champion": rec.champion, "reused": True}
    report = evaluate_challenger(settings, model, version, dataset=dataset, recipe=gate, prompts=prompts, cache=cache)
    record = promote(settings, model, version, gate=gate, actor=actor)
    log.info("%s version %s vs champion %s: %s — %s", model, version, champion, record.action.upper(),
             "; ".join(record.reasons))
    champion_metrics = report.champion.as_dict() if report.champion is not None else None
    log.info("challenger %s", report.challenger.as_dict())
    log.info("champion   %s", champion_metrics)
    return {"model": model, "version": version, "promoted": record.action == "promote", "action": record.action,
            "reasons": record.reasons, "champion": record.champion, "eval_run_id": report.run_id,
            "challenger_metrics": report.challenger.as_dict(), "champion_metrics": champion_metrics, "reused": False,
            **({"report": report.as_dict()} if with_report else {})}


def latest_dataset(end: datetime | str, settings: Settings | None = None) -> dict[str, Any]:
    """The policy's training data: the training window ending at ``end`` (curated, idempotent)."""
    settings = settings or get_settings()
    end = _when(end)
    return curate_interval(end - timedelta(hours=settings.loop.train_window_h), end, settings)
