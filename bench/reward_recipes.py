"""Reward-model recipes against the simulated users' hidden preference, on the same curated pairs and machine.

    OMP_NUM_THREADS=2 .venv/bin/python bench/reward_recipes.py DATASET_PAIRS_GLOB [SPEC ...]

``DATASET_PAIRS_GLOB``: the ``pairs.parquet`` of one or more curated datasets (a demo's run directory keeps
them under ``lake/datasets/<version>/``). Each recipe trains on the half of the training pairs that the loop's
reward model learns from (``judge_folds``: the other half trains the judge) and is scored on the other half plus
the eval split (about four times the loop's eval pairs, so the interval is narrower), oriented the way the hidden
preference ranks each pair. A SPEC is ``key=value,key=value`` over ``configs/reward-minilm-demo.yaml`` (the empty
spec ``""`` is the baseline; every other line prints its accuracy minus the baseline's). Frozen-trunk recipes of
the same trunk share their cached states, so only the first pays the trunk's pass.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import pandas as pd  # noqa: E402

from flywheel.app.simulate import FILLERS, HiddenPreference, oriented_by_preference  # noqa: E402
from flywheel.settings import Settings  # noqa: E402
from training.config import RewardRecipe, load_recipe  # noqa: E402
from training.gate import wilson  # noqa: E402
from training.reward.model import RewardModel  # noqa: E402
from training.reward.train import evaluate, judge_folds, score, train_reward  # noqa: E402


def pair_kinds(pairs: pd.DataFrame, pref: HiddenPreference) -> pd.Series:
    """What decides each pair for the hidden preference: ``filler`` (a side has filler phrases), ``fragment`` (a
    side is under its ``min_words``), else ``length`` (the fewer words win)."""
    def kind(chosen: str, rejected: str) -> str:
        if any(f in side for f in FILLERS for side in (chosen, rejected)):
            return "filler"
        return "fragment" if min(len(chosen.split()), len(rejected.split())) < pref.min_words else "length"
    return pd.Series([kind(c, r) for c, r in zip(pairs["chosen"], pairs["rejected"], strict=True)], index=pairs.index)


def main(argv: list[str]) -> None:
    pairs = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(argv[0]))], ignore_index=True)
    train = pairs[pairs["split"] == "train"].reset_index(drop=True)
    fold = judge_folds(train)
    learn = train[~fold].reset_index(drop=True)
    pref = HiddenPreference(min_words=6)
    test, _, _ = oriented_by_preference(pd.concat([train[fold], pairs[pairs["split"] == "eval"]], ignore_index=True), pref)
    kinds = pair_kinds(test, pref)
    print(json.dumps({"test_pairs_by_kind": kinds.value_counts().to_dict()}), flush=True)
    base = load_recipe("reward-minilm-demo.yaml")
    assert isinstance(base, RewardRecipe)
    settings = Settings(home=Path("/tmp/flywheel-bench-reward-recipes"))
    caches: dict[tuple[object, ...], dict[bytes, object]] = {}
    baseline = None
    for spec in argv[1:] or [""]:
        fields = dict(kv.split("=", 1) for kv in spec.split(",")) if spec else {}
        typed = {k: (v == "true") if isinstance(getattr(base, k), bool) else type(getattr(base, k))(v)
                 for k, v in fields.items()}
        recipe = dataclasses.replace(base, judge_fold=False, **typed)
        cache = caches.setdefault((recipe.backbone, recipe.trainable_layers, recipe.max_length, recipe.encoding), {})
        t = time.perf_counter()
        res = train_reward(settings, recipe, "", train_pairs=learn, eval_pairs=test, register_model=False,
                           states_cache=cache)  # type: ignore[arg-type]
        seconds = time.perf_counter() - t
        model = RewardModel.load(res.model_dir)
        states = cache if recipe.trainable_layers >= 0 else None
        acc = evaluate(model, test, 64, states)["accuracy"]  # type: ignore[arg-type]
        rc, rr = (score(model, test["prompt"].tolist(), test[side].tolist(), 64, states).numpy()  # type: ignore[arg-type]
                  for side in ("chosen", "rejected"))
        right = pd.Series((rc > rr) + 0.5 * (rc == rr), index=test.index)
        lo, hi = wilson(acc * len(test), len(test))
        baseline = acc if baseline is None else baseline
        print(json.dumps({"spec": spec or "(reward-minilm-demo)", "train_pairs": len(learn), "test_pairs": len(test),
                          "hidden_preference_accuracy": round(acc, 3), "ci": [round(lo, 3), round(hi, 3)],
                          "minus_baseline": round(acc - baseline, 3), "train_s": round(seconds, 1),
                          "length_weight": round(model.length_weight, 3),
                          "by_kind": right.groupby(kinds).mean().round(3).to_dict()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
