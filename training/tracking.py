"""MLflow wiring shared by the trainers: the tracking URI from settings, one experiment per model, the
registry by alias (never stages)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from flywheel.settings import Settings

# the registered models (and the MLflow experiment each one's runs are logged to)
REWARD_MODEL = "flywheel-reward"
POLICY_MODEL = "flywheel-policy"
MODELS = (POLICY_MODEL, REWARD_MODEL)


def use_tracking(settings: Settings, experiment: str) -> str:
    """Point MLflow at the settings' tracking store; create ``experiment`` with the settings' artifact root."""
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = mlflow.create_experiment(experiment, artifact_location=f"{settings.mlflow.artifact_uri.rstrip('/')}/{experiment}")
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def log_dict_artifact(data: dict[str, Any], name: str) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        mlflow.log_artifact(str(p))


def flat_params(prefix: str, data: dict[str, Any]) -> dict[str, str]:
    """Params for ``mlflow.log_params`` (values as strings, 6,000 characters at most)."""
    return {f"{prefix}{k}": str(v)[:6000] for k, v in data.items()}


def pip_requirements() -> list[str]:
    """What a logged model needs; given explicitly so MLflow does not infer it (~10 s per log)."""
    from importlib.metadata import version

    return [f"torch=={version('torch')}", f"transformers=={version('transformers')}", f"mlflow=={version('mlflow')}"]


def download_model(uri: str) -> Path:
    """The local directory of a logged MLflow model: ``models:/name@alias``, ``models:/name/3``, ``models:/m-…``."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


def progress_bar(total: int, initial: int, desc: str, unit: str, disable: bool = False) -> Any:
    """A tqdm bar for a training loop: shown on a terminal, silent in task logs and tests (and on ranks > 0)."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable or not sys.stderr.isatty(), leave=False,
                dynamic_ncols=True)
