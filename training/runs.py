"""What every training method shares, written once: the tracked MLflow run, atomic checkpoints, and logging a
trained model as a pyfunc and registering it as the challenger.

A training method is a recipe (``training.config``), a trainer (the math) and a run function that calls these:

    with tracked_run(recipe, kind="reward", run_id=resumed, dataset=ds) as run:   # params, tags, lineage once
        ... train; save_checkpoint(path, {..., "run_id": run.info.run_id}) every N steps ...
        version = register_challenger(REWARD_MODEL, "reward_model", python_model, artifacts, tags, metrics)

A run resumed after a kill (``run_id`` from its checkpoint) continues the same MLflow run and logs nothing twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.config import recipe_dict
from training.registry import CHALLENGER, register_version
from training.tracking import flat_params, log_dict_artifact, pip_requirements


@dataclass(frozen=True)
class PolicyResult:
    """What a policy training run (PPO/RLOO, DPO, KTO) produced. ``run_id`` and ``version`` are None off the main
    rank of a distributed run (only rank 0 tracks) and ``version`` is None when the run registered nothing."""

    kind: str  # ppo | dpo | kto
    run_id: str | None
    version: str | None
    steps: int
    policy_dir: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # PPO: eval/*_before and eval/*_after; DPO/KTO: train_loss

    def as_dict(self) -> dict[str, Any]:
        """Flat and JSON-ready (the CLI prints it; a DAG task passes it on)."""
        return {"kind": self.kind, "run_id": self.run_id, "version": self.version, "steps": self.steps,
                "policy_dir": self.policy_dir, **self.metrics}


@contextmanager
def tracked_run(recipe: Any, *, kind: str, run_id: str | None = None, dataset: Any = None,
                tags: dict[str, str] | None = None, params: dict[str, Any] | None = None,
                main: bool = True) -> Iterator[Any]:
    """The recipe's MLflow run (the active experiment's): a new one named after the recipe, or ``run_id``'s
    resumed. A new run gets the recipe (params and ``recipe.json``), ``params``, the tags ``flywheel.kind``,
    ``flywheel.recipe``, the dataset's version and URI (and its manifest as an artifact) and ``tags``. Off the
    main rank of a distributed run: no run (yields None)."""
    if not main:
        yield None
        return
    import mlflow

    with mlflow.start_run(run_id=run_id, run_name=None if run_id else recipe.name) as run:
        if not run_id:
            mlflow.log_params(flat_params("recipe.", recipe_dict(recipe)))
            if params:
                mlflow.log_params(params)
            all_tags = {"flywheel.kind": kind, "flywheel.recipe": recipe.name}
            if dataset is not None:
                all_tags |= {"flywheel.dataset_version": dataset.version, "flywheel.dataset_uri": dataset.uri}
                log_dict_artifact(dataset.manifest, "dataset_manifest.json")
            mlflow.set_tags(all_tags | (tags or {}))
            log_dict_artifact(recipe_dict(recipe), "recipe.json")
        yield run


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary name, then rename: a kill leaves the last checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | None) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when there is none (a fresh run)."""
    if path is None or not path.exists():
        return None
    state: dict[str, Any] = torch.load(path, weights_only=False, map_location="cpu")
    return state


def register_challenger(model_name: str, artifact: str, python_model: Any, artifacts: dict[str, str],
                     tags: dict[str, str], metrics: dict[str, float]) -> str:
    """Log a trained model to the active run as an MLflow pyfunc and register it as a new version of
    ``model_name`` @challenger, tagged with ``tags`` and the run's metrics; returns the version."""
    import mlflow

    info = mlflow.pyfunc.log_model(name=artifact, python_model=python_model, artifacts=artifacts,
                                   pip_requirements=pip_requirements())
    mv = register_version(info.model_uri, model_name, alias=CHALLENGER,
                          tags={**tags, **{k.replace("/", "_"): f"{v:.4f}" for k, v in metrics.items()}})
    return str(mv.version)
