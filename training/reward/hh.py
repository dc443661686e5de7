"""The reward-model recipe on real human preferences: Anthropic HH-RLHF (helpful-base and harmless-base test
splits, read from ``../shared/data/hh-rlhf/``; never copied into the repository).

    flywheel eval-hh [--recipe reward-minilm-hh.yaml] [--data DIR] [--limit N]

Each line holds two full conversations that share everything up to the final Assistant reply. The prompt is
that shared conversation, the responses are the two final replies; rows where chosen == rejected or the
conversations differ earlier are dropped (a handful). Conversations are split 80/20 by a hash of the
prompt (so the same conversation is never on both sides), the recipe trains on the 80% of both subsets
together, and pairwise accuracy is reported per subset on the held-out 20%.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pandas as pd

from flywheel.settings import Settings
from pipelines.text import stable_hash
from training.config import RewardRecipe

DEFAULT_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hh-rlhf"
SUBSETS = ("helpful-base", "harmless-base")
_MARK = "\n\nAssistant:"


def split_conversation(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen reply, rejected reply), or None when the two differ before the final reply."""
    i, j = chosen.rfind(_MARK), rejected.rfind(_MARK)
    if i < 0 or j < 0 or chosen[:i] != rejected[:j]:
        return None
    prompt = chosen[:i].strip()
    c, r = chosen[i + len(_MARK):].strip(), rejected[j + len(_MARK):].strip()
    if not c or not r or c == r:
        return None
    return prompt, c, r


def load_hh(data_dir: str | Path = DEFAULT_DIR, limit: int = 0) -> pd.DataFrame:
    rows: list[dict[str, Any]] = []
    for subset in SUBSETS:
        with gzip.open(Path(data_dir) / f"{subset}-test.jsonl.gz", "rt", encoding="utf-8") as f:
            n = 0
            for line in f:
                rec = json.loads(line)
                parts = split_conversation(rec["chosen"], rec["rejected"])
                if parts is None:
                    continue
                prompt, c, r = parts
                bucket = int(stable_hash(prompt)[:8], 16) % 100
                rows.append({"subset": subset, "prompt": prompt, "chosen": c, "rejected": r, "margin": 0.5,
                             "split": "eval" if bucket < 20 else "train"})
                n += 1
                if limit and n >= limit:
                    break
    return pd.DataFrame(rows)


def evaluate_hh(settings: Settings, recipe: RewardRecipe, data_dir: str | Path = DEFAULT_DIR, limit: int = 0) -> dict[str, Any]:
    from training.reward.train import evaluate, train_reward

    df = load_hh(data_dir, limit)
    train, held = df[df["split"] == "train"].reset_index(drop=True), df[df["split"] == "eval"].reset_index(drop=True)
    res = train_reward(settings, recipe, "", train_pairs=train, eval_pairs=held, register_model=False,
                       experiment="flywheel-reward-hh")
    from training.reward.model import RewardModel

    model = RewardModel.load(res.model_dir)
    per_subset = {s: evaluate(model, held[held["subset"] == s].reset_index(drop=True), recipe.eval_batch_size)
                  for s in SUBSETS}
    import mlflow

    with mlflow.start_run(run_id=res.run_id):
        mlflow.log_metrics({f"hh/{s}/accuracy": m["accuracy"] for s, m in per_subset.items()})
    return {"run_id": res.run_id, "train_pairs": len(train), "heldout_pairs": len(held),
            "accuracy": res.metrics.get("eval/accuracy"),
            **{f"{s}_accuracy": m["accuracy"] for s, m in per_subset.items()},
            **{f"{s}_pairs": int(m["pairs"]) for s, m in per_subset.items()}}
