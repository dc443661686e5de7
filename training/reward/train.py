"""``flywheel train reward``: Bradley-Terry reward model on a curated dataset's pairs, tracked in MLflow.

    pairs.parquet (train split) -> tokenize once -> AdamW (backbone lr, head lr), linear warm-up then decay
      -> per step: loss, accuracy (logged every ``log_every`` steps)
      -> every ``checkpoint_every`` steps: model + optimizer + scheduler + step + RNG + MLflow run id, atomically
      -> eval split: accuracy, ECE, mean margin, reward/length correlation
      -> saved model logged as an MLflow pyfunc and registered as ``flywheel-reward`` (tagged with dataset)

A killed run started again with the same recipe, dataset and checkpoint directory continues from its last
checkpoint in the same MLflow run and ends at the same step count (the batch order is a function of the
seed and the epoch, so the remaining batches are the ones the first run would have seen).

On a GPU when the recipe's ``device`` allows one; data-parallel under ``torchrun`` (:mod:`training.distributed`):
each rank takes its slice of every batch, gradients are averaged, rank 0 logs, checkpoints and registers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from flywheel.settings import Settings
from pipelines.dataset import open_dataset
from training.config import RewardRecipe
from training.distributed import optimizer_to
from training.distributed import setup as setup_distributed
from training.reward.losses import bt_fit, bt_loss, margin_from_share, reward_eval
from training.reward.model import RewardModel, response_lengths
from training.runs import load_checkpoint, register_challenger, save_checkpoint, tracked_run
from training.tracking import (
    REWARD_MODEL,
    StepProgress,
    download_model,
    use_tracking,
)

log = logging.getLogger(__name__)


@dataclass
class RewardResult:
    run_id: str | None  # None on the ranks > 0 of a distributed run (only rank 0 tracks)
    model_version: str | None
    steps: int
    metrics: dict[str, float]
    model_dir: Path


def batches(n: int, batch_size: int, seed: int, epoch: int, lengths: np.ndarray | None = None,
            group: int = 1) -> list[np.ndarray]:
    """The epoch's batches of row indices, a pure function of (seed, epoch) so that a resumed run sees the
    batches the killed one would have. With ``lengths`` and ``group > 1``, each window of ``group`` batches
    of the shuffled order is sorted by length before it is cut, and the batches are shuffled again: rows of
    similar length share a batch, so less of every forward pass is padding."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if lengths is not None and group > 1:
        window = batch_size * group
        order = np.concatenate([w[np.argsort(-lengths[w], kind="stable")]
                                for w in (order[i:i + window] for i in range(0, n, window))])
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if lengths is not None and group > 1:
        out = [out[j] for j in rng.permutation(len(out))]
    return out


def score(model: RewardModel, prompts: list[str], responses: list[str], batch_size: int = 64,
          states_cache: dict[bytes, torch.Tensor] | None = None, all_heads: bool = False) -> torch.Tensor:
    """``model.score``; with a frozen trunk and ``states_cache``, the trunk runs only on texts not in the cache."""
    if states_cache is None or model.trainable_layers < 0:
        return model.score(prompts, responses, batch_size, all_heads=all_heads)
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            enc = cached_trunk_states(model, model.encode(prompts[i:i + batch_size], responses[i:i + batch_size]),
                                      states_cache, batch_size)
            out.append(model(**{k: v.to(model.head.weight.device) for k, v in enc.items()},
                             all_heads=all_heads).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, model.heads) if all_heads else 0)


def evaluate(model: RewardModel, pairs: pd.DataFrame, batch_size: int = 64,
             states_cache: dict[bytes, torch.Tensor] | None = None) -> dict[str, float]:
    if pairs.empty:
        return {}
    prompts = pairs["prompt"].tolist()
    each_c = score(model, prompts, pairs["chosen"].tolist(), batch_size, states_cache, all_heads=True)
    each_r = score(model, prompts, pairs["rejected"].tolist(), batch_size, states_cache, all_heads=True)
    rc, rr = each_c.mean(1).numpy(), each_r.mean(1).numpy()
    out = reward_eval(rc, rr, pairs["chosen"].str.len().to_numpy(), pairs["rejected"].str.len().to_numpy())
    if model.heads > 1:  # how much the heads disagree on a pair's gap, on average (in reward units)
        out["spread"] = float((each_c - each_r).std(1, unbiased=False).mean())
    return out


def _pad_right(enc: Any, width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The tokenizer's batch, right-padded to ``width`` columns (input ids with ``pad_id``, the rest with 0)."""
    out = {}
    for k, v in enc.items():
        if v.dim() == 1:  # one number a row (the responses' whole lengths)
            out[k] = v
            continue
        extra = width - v.shape[1]
        out[k] = torch.nn.functional.pad(v, (0, extra), value=pad_id if k == "input_ids" else 0) if extra else v
    return out


def cached_trunk_states(model: RewardModel, enc: dict[str, torch.Tensor], cache: dict[bytes, torch.Tensor],
                        batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``enc`` with its token ids replaced by the frozen trunk's states (``states``, float16). Each distinct
    text (its token ids) goes through the trunk once: rows already in ``cache`` are not computed again, and the
    rest are computed shortest first, so that a batch holds little padding."""
    ids, mask = enc["input_ids"], enc["attention_mask"]
    n_tok = mask.sum(1).tolist()
    keys = [ids[i, :n].numpy().tobytes() for i, n in enumerate(n_tok)]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in cache}.values(), key=lambda i: n_tok[i])
    for j in range(0, len(todo), batch_size):
        rows = todo[j:j + batch_size]
        w = max(n_tok[i] for i in rows)
        states = model.trunk_states({"input_ids": ids[rows, :w], "attention_mask": mask[rows, :w]}, batch_size)
        for r, i in enumerate(rows):
            cache[keys[i]] = states[r, :n_tok[i]].clone()
    out = torch.zeros(*ids.shape, model.backbone.config.hidden_size, dtype=torch.float16)
    for i, k in enumerate(keys):
        out[i, :n_tok[i]] = cache[k]
    return {"states": out, **{k: v for k, v in enc.items() if k != "input_ids"}}


def _splits(settings: Settings, dataset_ref: str, train_pairs: pd.DataFrame | None,
            eval_pairs: pd.DataFrame | None) -> tuple[Any, pd.DataFrame, pd.DataFrame]:
    """(the dataset or None, training pairs, eval pairs): the dataset's splits unless pairs are given."""
    ds = open_dataset(dataset_ref, settings) if dataset_ref else None
    pairs = ds.table("pairs") if ds is not None and (train_pairs is None or eval_pairs is None) else None
    train = train_pairs if train_pairs is not None else pairs[pairs["split"] == "train"].reset_index(drop=True)
    evalp = eval_pairs if eval_pairs is not None else pairs[pairs["split"] == "eval"].reset_index(drop=True)
    if train.empty:
        raise ValueError(f"dataset {dataset_ref}: no training pairs")
    return ds, train, evalp


def _encode_sides(model: RewardModel, train: pd.DataFrame, recipe: RewardRecipe, device: torch.device,
                  states_cache: dict[bytes, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], np.ndarray]:
    """Both sides of every training pair encoded to one width, and each pair's longer side's length (for the
    length-grouped batches). A frozen trunk's states replace the token ids: computed once a text."""
    enc_c = model.encode(train["prompt"].tolist(), train["chosen"].tolist())
    enc_r = model.encode(train["prompt"].tolist(), train["rejected"].tolist())
    width = max(enc_c["input_ids"].shape[1], enc_r["input_ids"].shape[1])  # each side padded to its own longest
    enc_c, enc_r = (_pad_right(e, width, model.tokenizer.pad_token_id) for e in (enc_c, enc_r))
    lengths = torch.maximum(enc_c["attention_mask"].sum(1), enc_r["attention_mask"].sum(1)).numpy()
    if recipe.trainable_layers >= 0:
        model.to(device)
        enc_c, enc_r = (cached_trunk_states(model, e, states_cache, recipe.eval_batch_size) for e in (enc_c, enc_r))
    return enc_c, enc_r, lengths


def _optimizer(model: RewardModel, recipe: RewardRecipe, total: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (the backbone's trained parameters at ``lr``, the head at ``head_lr``), linear warm-up then decay."""
    opt = torch.optim.AdamW([{"params": model.trained_parameters(), "lr": recipe.lr},
                             {"params": list(model.head.parameters()), "lr": recipe.head_lr}],
                            weight_decay=recipe.weight_decay)
    warm = max(1, recipe.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    return opt, sched


def train_reward(settings: Settings, recipe: RewardRecipe, dataset_ref: str, *, checkpoint_dir: str | Path | None = None,
                 train_pairs: pd.DataFrame | None = None, eval_pairs: pd.DataFrame | None = None,
                 register_model: bool = True, experiment: str = REWARD_MODEL,
                 states_cache: dict[bytes, torch.Tensor] | None = None) -> RewardResult:
    """Train, evaluate, log and register. ``train_pairs``/``eval_pairs`` override the dataset's splits (used by
    the HH-RLHF evaluation, which brings its own split); the dataset is still recorded for lineage.
    ``states_cache``: the frozen trunk's states by token ids (a recipe with ``trainable_layers >= 0``), shared
    with the judge trained beside this model so that each text goes through the trunk once."""
    import mlflow

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    dist = setup_distributed(recipe.device)
    torch.manual_seed(recipe.seed)
    random.seed(recipe.seed)
    ds, train, evalp = _splits(settings, dataset_ref, train_pairs, eval_pairs)
    judge = None
    states_cache = {} if states_cache is None else states_cache
    if recipe.judge_fold:  # cross-fitting: the judge learns from one half of the prompt groups, the model the other
        fold = judge_folds(train)
        if fold.all() or not fold.any():
            raise ValueError(f"dataset {dataset_ref}: judge_fold needs training pairs of at least two prompt groups")
        judge = train_reward(settings, dataclasses.replace(recipe, name=f"{recipe.name}-judge", judge_fold=False),
                             dataset_ref, train_pairs=train[fold].reset_index(drop=True), eval_pairs=evalp,
                             register_model=False, experiment=experiment, states_cache=states_cache,
                             checkpoint_dir=Path(checkpoint_dir) / "judge" if checkpoint_dir else None)
        train = train[~fold].reset_index(drop=True)

    val = None
    if recipe.eval_every:
        if dist.active:
            raise ValueError(f"recipe {recipe.name}: early stopping (eval_every) runs on one process, not under torchrun")
        held = prompt_groups_share(train, recipe.validation_share, salt="validation")
        if held.all() or not held.any():
            raise ValueError(f"dataset {dataset_ref}: early stopping needs training pairs of at least two prompt "
                             f"groups (validation_share {recipe.validation_share} of them are held out)")
        val, train = train[held].reset_index(drop=True), train[~held].reset_index(drop=True)

    model = RewardModel.from_backbone(recipe.backbone, recipe.pooling, recipe.max_length, recipe.encoding,
                                      recipe.trainable_layers, recipe.length_feature, recipe.ensemble_heads,
                                      recipe.prompt_keep, recipe.response_keep, recipe.length_unit, recipe.length_curve)
    if dist.active and len(train) < recipe.batch_size:
        raise ValueError(f"{len(train)} training pairs: fewer than one batch of {recipe.batch_size} to share out")
    t0 = time.perf_counter()
    enc_c, enc_r, lengths = _encode_sides(model, train, recipe, dist.device, states_cache)
    trunk_s = time.perf_counter() - t0 if recipe.trainable_layers >= 0 else 0.0
    share = torch.tensor(train["margin"].to_numpy(dtype=np.float32)) if "margin" in train else torch.ones(len(train))
    reviewed = train["reviewed"].to_numpy(dtype=bool) if "reviewed" in train else np.zeros(len(train), dtype=bool)
    weight = torch.tensor(np.where(reviewed, recipe.reviewed_weight, 1.0), dtype=torch.float32) \
        if recipe.reviewed_weight != 1.0 else None
    if recipe.ensemble_heads > 1:  # each head its own bootstrap resample of the pairs, fixed by the seed
        boot = torch.poisson(torch.ones(len(train), recipe.ensemble_heads),
                             generator=torch.Generator().manual_seed(recipe.seed))
        weight = boot if weight is None else weight[:, None] * boot
    elif weight is not None:  # one column: the loss sees [pairs, heads]
        weight = weight[:, None]

    if model.length_feature:  # (a resumed run's checkpoint replaces this start below)
        # the length part of the head starts where the pairs' lengths alone put it (their Bradley-Terry fit on the
        # length features); the backbone then learns what length does not explain
        delta = model.length_features(response_lengths(enc_c)) - model.length_features(response_lengths(enc_r))
        with torch.no_grad():
            model.head.weight[:, -model.length_columns:] = torch.as_tensor(bt_fit(delta.numpy()), dtype=torch.float32)
    per_epoch = math.ceil(len(train) / recipe.batch_size)
    total = recipe.max_steps or per_epoch * recipe.epochs
    opt, sched = _optimizer(model, recipe, total)

    ckpt_path = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    step, run_id = 0, None
    best = EarlyStop()
    state = load_checkpoint(ckpt_path)
    if state is not None:
        model.load_state_dict(state["model"], strict=recipe.trainable_layers < 0)  # a frozen trunk: only what trains
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, run_id = state["step"], state["run_id"]
        best = state.get("early_stop", best)
        torch.set_rng_state(state["torch_rng"])
        log.info("resuming %s from step %d (MLflow run %s)", recipe.name, step, run_id)

    model.to(dist.device)
    optimizer_to(opt, dist.device)  # a resumed optimizer's moments follow the model
    net = dist.wrap(model, find_unused_parameters=True)  # what the update step calls: DistributedDataParallel under torchrun

    if dist.main:
        use_tracking(settings, experiment)
    with tracked_run(recipe, kind="reward", run_id=run_id, dataset=ds, main=dist.main,
                     params={"train_pairs": len(train), "eval_pairs": len(evalp), "total_steps": total}) as run:
        if dist.main and trunk_s:
            mlflow.log_metric("time/trunk_states_s", trunk_s)
        model.train()
        started, seen, window, epoch_batches = time.perf_counter(), 0, [], None
        bar = StepProgress(total, step, f"reward model steps ({recipe.name})", disable=not dist.main)
        while step < total and not best.stopped:
            epoch, i = divmod(step, per_epoch)
            if i == 0 or epoch_batches is None:
                epoch_batches = batches(len(train), recipe.batch_size, recipe.seed, epoch, lengths, recipe.group_by_length)
            full = torch.as_tensor(epoch_batches[i])
            idx = dist.shard(full)
            if len(idx) == 0:  # a last batch smaller than the world: this rank repeats one pair (weight 1/world)
                idx = full[:1]
            batch = {k: torch.cat([enc_c[k][idx], enc_r[k][idx]]) for k in enc_c}
            width = int(batch["attention_mask"].sum(1).max())  # trim the padding this batch does not need
            batch = {k: v[:, :width] if v.dim() > 1 else v for k, v in batch.items()}
            rewards = net(**{k: v.to(dist.device) for k, v in batch.items()}, all_heads=True)  # [2 x pairs, heads]
            rc, rr = rewards[: len(idx)], rewards[len(idx):]
            margin = margin_from_share(share[idx], recipe.margin_scale).to(dist.device)[:, None] \
                if recipe.margin_scale else None
            loss = bt_loss(rc, rr, margin, recipe.centering, weight[idx].to(dist.device) if weight is not None else None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            seen += len(full)
            bar.update(1)
            window.append((loss.detach(), (rc > rr).float().mean().detach()))
            if step % recipe.log_every == 0 or step == total:
                means = dist.mean(torch.stack([torch.stack(w) for w in window]).float().mean(0))
                bar.update(0, loss=float(means[0]), accuracy=float(means[1]))
                if dist.main:
                    mlflow.log_metrics({"train/loss": float(means[0]), "train/accuracy": float(means[1]),
                                        "train/lr": sched.get_last_lr()[0]}, step=step)
                window.clear()
            if val is not None and (step % recipe.eval_every == 0 or step == total):
                accuracy = evaluate(model, val, recipe.eval_batch_size, states_cache)["accuracy"]
                mlflow.log_metric("validation/accuracy", accuracy, step=step)
                best.observe(accuracy, step, model, recipe.patience)
                if best.stopped:
                    log.info("%s: no better validation accuracy in %d evaluations; stopping at step %d, keeping "
                             "step %d's model (%.3f)", recipe.name, recipe.patience, step, best.step, best.accuracy)
            if dist.main and ckpt_path and (step % recipe.checkpoint_every == 0 or step == total or best.stopped):
                save_checkpoint(ckpt_path, {"model": model.trained_state(), "optimizer": opt.state_dict(),
                                             "scheduler": sched.state_dict(), "step": step,
                                             "run_id": run.info.run_id, "torch_rng": torch.get_rng_state(),
                                             "early_stop": best})
        bar.close()
        early: dict[str, float] = {}
        if best.state is not None:  # early stopping: the best evaluated model, not the last one
            model.load_state_dict(best.state, strict=recipe.trainable_layers < 0)
            early = {"validation/best_accuracy": best.accuracy, "train/best_step": float(best.step),
                     "train/stopped_early": float(best.stopped)}
        elapsed = time.perf_counter() - started
        if not dist.main:  # rank 0 evaluates, saves and registers; the others are done
            dist.barrier()
            return RewardResult(None, None, step, {}, Path())
        mlflow.log_metric("train/pairs_per_s", seen / elapsed if elapsed else 0.0, step=step)
        if dist.active:
            mlflow.log_params({"distributed.world_size": dist.world, "distributed.device": dist.device.type})

        # reward statistics on the training pairs: PPO whitens with them
        sample = train.iloc[: min(len(train), 512)]
        scores = score(model, sample["prompt"].tolist() * 2, sample["chosen"].tolist() + sample["rejected"].tolist(),
                       recipe.eval_batch_size, states_cache)
        model.stats = {"mean": float(scores.mean()), "std": float(scores.std().clamp(min=1e-6))}
        metrics = {f"eval/{k}": v for k, v in evaluate(model, evalp, recipe.eval_batch_size, states_cache).items()}
        metrics |= early
        if model.length_feature:
            metrics["train/length_weight"] = model.length_weight
            if model.length_curve:  # the learned curve, at the knots: what length alone adds to a reward
                units = torch.tensor([2.0 ** k for k in range(1, 10)])
                mlflow.log_metrics({f"length/reward_at_{int(n)}": float(r)
                                    for n, r in zip(units, model.length_reward(units), strict=True)}, step=step)
        if metrics:
            mlflow.log_metrics(metrics, step=step)
        model_dir = Path(tempfile.mkdtemp(prefix="reward-")) / "model"
        model.save(model_dir)
        version = None
        if judge is not None:
            metrics |= {f"judge/{k.removeprefix('eval/')}": v for k, v in judge.metrics.items()}
            mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith("judge/")}, step=step)
            mlflow.set_tag("flywheel.judge_run_id", judge.run_id or "")
        if register_model:
            version = log_and_register(model_dir, run.info.run_id, ds.version if ds else "", metrics,
                                       judge_dir=judge.model_dir if judge is not None else None)
        log.info("reward model %s: %d steps, %s, registered version %s", recipe.name, step, metrics, version)
        dist.barrier()
        return RewardResult(run.info.run_id, version, step, metrics, model_dir)


def _pyfunc_class() -> type:
    import mlflow

    class _RewardPyfunc(mlflow.pyfunc.PythonModel):
        """``predict(DataFrame[prompt, response]) -> rewards``."""

        def load_context(self, context: Any) -> None:
            self.model = RewardModel.load(context.artifacts["reward_model"])

        def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> np.ndarray:  # noqa: ARG002
            return self.model.score(model_input["prompt"].tolist(), model_input["response"].tolist()).numpy()

    return _RewardPyfunc


def _group_buckets(pairs: pd.DataFrame, salt: str, buckets: int) -> np.ndarray:
    """Each pair's bucket in ``[0, buckets)`` by a stable hash of its prompt group (``group_id``, else the prompt)
    salted with ``salt``: one prompt's pairs all share a bucket."""
    from ingest.text import stable_hash

    keys = pairs["group_id"] if "group_id" in pairs else pairs["prompt"]
    return np.array([int(stable_hash(f"{salt}:{k}")[:8], 16) % buckets for k in keys.astype(str)], dtype=np.int64)


def prompt_groups_share(pairs: pd.DataFrame, share: float, salt: str) -> np.ndarray:
    """True for the pairs of about ``share`` of the prompt groups, chosen by a hash salted with ``salt``."""
    return _group_buckets(pairs, salt, 10_000) < share * 10_000


def judge_folds(pairs: pd.DataFrame) -> np.ndarray:
    """True for the pairs that train the judge: half of the prompt groups, by a stable hash."""
    return _group_buckets(pairs, "judge", 2) == 1


@dataclass
class EarlyStop:
    """The best validation accuracy so far, its step and trained state, and whether training should stop."""

    accuracy: float = -1.0
    step: int = 0
    state: dict[str, torch.Tensor] | None = None
    bad: int = 0  # evaluations since the best one
    stopped: bool = False

    def observe(self, accuracy: float, step: int, model: RewardModel, patience: int) -> None:
        if accuracy > self.accuracy:
            self.accuracy, self.step, self.bad = accuracy, step, 0
            self.state = {k: v.detach().clone() for k, v in model.trained_state().items()}
        else:
            self.bad += 1
            self.stopped = self.bad >= patience


def log_and_register(model_dir: Path, run_id: str, dataset_version: str, metrics: dict[str, float],
                     judge_dir: Path | None = None) -> str:

    if judge_dir is not None and judge_dir.name != "judge":  # MLflow names the artifact directory after it
        judge_dir = judge_dir.rename(judge_dir.with_name("judge"))
    artifacts = {"reward_model": str(model_dir), **({"judge": str(judge_dir)} if judge_dir is not None else {})}
    return register_challenger(REWARD_MODEL, "reward_model", _pyfunc_class()(), artifacts,
                            {"dataset_version": dataset_version, "run_id": run_id,
                             "judge": "fold" if judge_dir else "none"}, metrics)


def load_registered_reward(uri: str, part: str = "reward_model") -> RewardModel:
    """A reward model from ``models:/flywheel-reward@alias``, ``models:/flywheel-reward/3``, or a local dir
    (either a saved reward model or a downloaded MLflow model). ``part="judge"``: the judge registered with it
    (a recipe with ``judge_fold``); :class:`FileNotFoundError` when it has none."""
    path = Path(uri) if Path(uri).is_dir() else download_model(uri)
    if not (path / "reward.json").exists():  # an MLflow model: the saved directory is under artifacts/
        # MLflow keeps each artifact directory under its own name: the judge's is "judge" (log_and_register)
        found = [d for d in sorted(p.parent for p in path.glob("artifacts/*/reward.json"))
                 if (d.name == "judge") == (part == "judge")]
        if not found:
            raise FileNotFoundError(f"{uri}: no {part.replace('_', ' ')} (reward.json) in {path}")
        path = found[0]
    elif part != "reward_model":
        raise FileNotFoundError(f"{uri}: a saved reward model directory holds no {part}")
    return RewardModel.load(path)
