"""MLflow wiring shared by the trainers: the tracking URI from settings, one experiment per model, the
registry by alias (never stages)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from flywheel import progress
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


class StepProgress:
    """A training loop's progress, reported through :mod:`flywheel.progress` (the CLI draws the bar; nothing is
    printed here, so task logs and tests stay clean). ``disable`` silences it (ranks > 0)."""

    def __init__(self, total: int, initial: int, task: str, *, disable: bool = False):
        self.task, self.total, self.done, self.disable = task, total, initial, disable
        self.metrics: dict[str, float] = {}
        self._report()

    def update(self, n: int = 1, **metrics: float) -> None:
        self.done += n
        self.metrics.update(metrics)
        self._report()

    def _report(self) -> None:
        if not self.disable:
            progress.report(self.task, self.done, self.total, **self.metrics)

    def close(self) -> None:
        """Nothing to release (kept so that a loop reads like one over a bar)."""
