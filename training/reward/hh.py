"""The reward-model recipe on real human preferences: Anthropic HH-RLHF (helpful-base and harmless-base test
splits, read from ``../shared/data/hh-rlhf/``; never copied into the repository).

    flywheel eval-hh [--recipe reward-minilm-hh.yaml] [--data DIR] [--limit N] [--eval-file F ...]

Each line holds two full conversations that share everything up to the final Assistant reply. The prompt is
that shared conversation, the responses are the two final replies; rows where chosen == rejected or the
conversations differ earlier are dropped (a handful). Conversations are split 80/20 by a hash of the
prompt (so the same conversation is never on both sides), the recipe trains on the 80% of both subsets
together, and pairwise accuracy (95% Wilson interval) and ECE are reported on the held-out 20%, per subset and by
the replies' length ratio. ``--eval-file F`` (repeatable) scores a JSONL file of ``{prompt, chosen, rejected}``
pairs with the trained model too: generalisation to anyone's own data.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flywheel.settings import Settings
from ingest.text import stable_hash
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


def load_eval_file(path: str | Path) -> pd.DataFrame:
    """Pairs from a JSONL file of ``{"prompt", "chosen", "rejected"}`` objects (an HH-style ``\n\nHuman: …
    \n\nAssistant:`` prompt or plain text; blank lines skipped). A line that is not such an object is an error
    naming the file and the line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
                raise ValueError(f"{path}:{n}: expected an object with string fields prompt, chosen and rejected")
            rows.append({"prompt": rec["prompt"].strip(), "chosen": rec["chosen"].strip(), "rejected": rec["rejected"].strip()})
    if not rows:
        raise ValueError(f"{path}: no pairs")
    return pd.DataFrame(rows)


def accuracy_report(rc: np.ndarray, rr: np.ndarray) -> dict[str, float]:
    """Pairwise accuracy (ties count half) with its 95% Wilson interval, and the ECE of sigmoid(r_c - r_r)."""
    from training.gate import wilson
    from training.reward.losses import expected_calibration_error, pairwise_accuracy

    acc = pairwise_accuracy(rc, rr)
    lo, hi = wilson(acc * len(rc), len(rc)) if len(rc) else (float("nan"), float("nan"))
    return {"accuracy": acc, "ci_low": lo, "ci_high": hi, "pairs": len(rc), "ece": expected_calibration_error(rc, rr)}


# the chosen reply's length relative to the rejected one's (words): does the model just prefer one length?
LENGTH_BUCKETS = (("chosen shorter (< 0.8x)", 0.0, 0.8), ("similar (0.8-1.25x)", 0.8, 1.25),
                  ("chosen longer (> 1.25x)", 1.25, float("inf")))


def by_length_difference(pairs: pd.DataFrame, rc: np.ndarray, rr: np.ndarray) -> dict[str, dict[str, float]]:
    ratio = (pairs["chosen"].str.split().str.len().clip(lower=1) / pairs["rejected"].str.split().str.len().clip(lower=1)).to_numpy()
    out = {}
    for name, lo, hi in LENGTH_BUCKETS:
        sel = (ratio >= lo) & (ratio < hi)
        if sel.any():
            out[name] = accuracy_report(rc[sel], rr[sel])
    return out


def evaluate_hh(settings: Settings, recipe: RewardRecipe, data_dir: str | Path = DEFAULT_DIR, limit: int = 0,
                eval_files: list[str | Path] | None = None) -> dict[str, Any]:
    """Train ``recipe`` on the 80% of HH-RLHF, then report on the held-out 20%: accuracy with its 95% interval and
    ECE, per subset and by the replies' length ratio, and the same for each of ``eval_files`` (read before
    training: a bad file fails fast); wall-clock seconds of training and of scoring."""
    import time

    from training.reward.model import RewardModel
    from training.reward.train import score, train_reward

    extra = {str(f): load_eval_file(f) for f in eval_files or []}
    df = load_hh(data_dir, limit)
    train, held = df[df["split"] == "train"].reset_index(drop=True), df[df["split"] == "eval"].reset_index(drop=True)
    cache: dict[bytes, Any] = {}  # a frozen trunk's states: the held-out texts are not run through it twice
    t0 = time.perf_counter()
    res = train_reward(settings, recipe, "", train_pairs=train, eval_pairs=held, register_model=False,
                       experiment="flywheel-reward-hh", states_cache=cache)
    trained = time.perf_counter() - t0
    model = RewardModel.load(res.model_dir)

    def scores(pairs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        prompts = pairs["prompt"].tolist()
        return (score(model, prompts, pairs["chosen"].tolist(), recipe.eval_batch_size, cache).numpy(),
                score(model, prompts, pairs["rejected"].tolist(), recipe.eval_batch_size, cache).numpy())

    t1 = time.perf_counter()
    rc, rr = scores(held)
    report: dict[str, Any] = {
        "recipe": recipe.name, "run_id": res.run_id, "train_pairs": len(train), "heldout_pairs": len(held),
        **accuracy_report(rc, rr),
        "subsets": {s: accuracy_report(rc[(held["subset"] == s).to_numpy()], rr[(held["subset"] == s).to_numpy()])
                    for s in SUBSETS},
        "by_length_ratio": by_length_difference(held, rc, rr),
        "eval_files": {name: accuracy_report(*scores(pairs)) for name, pairs in extra.items()},
    }
    report["seconds"] = {"train": round(trained, 1), "score": round(time.perf_counter() - t1, 1)}
    import mlflow

    with mlflow.start_run(run_id=res.run_id):
        mlflow.log_metrics({"hh/accuracy": report["accuracy"], "hh/ci_low": report["ci_low"], "hh/ece": report["ece"],
                            "time/train_s": trained,
                            **{f"hh/{s}/accuracy": m["accuracy"] for s, m in report["subsets"].items()}})
    return report
