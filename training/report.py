"""The evaluation report: what ``flywheel evaluate`` measured, typed, and the JSON it is logged as.

``Evaluation`` is one challenger against the champion; its ``challenger`` and ``champion`` sides are
:class:`PolicyMetrics` (a policy: win rate and its interval, length-controlled win rate, KL, lengths, probes, the
judge's accuracy) or :class:`RewardMetrics` (a reward model: accuracy on the eval pairs, calibration, the
reward/length correlation, agreement with the trusted labelers per audit rule). The gate
(:func:`training.gate.decide`) reads these fields, and the kind of the sides says which checks apply.

On the wire (``evaluation.json``, the MLflow metrics ``challenger/<name>``, the registry's audit records) a side
is a flat JSON object, as it always was: ``{"win_rate": 0.62, ...}`` or ``{"accuracy": 0.8, "audit/concise":
0.75, "audit_pairs/concise": 8, ...}``. :meth:`Evaluation.from_dict` reads that layout back (keys a report does
not have are None; keys this version does not know are ignored, so older and newer reports both read), and
:meth:`Evaluation.as_dict` writes it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from training.tracking import REWARD_MODEL

Kind = Literal["policy", "reward"]


def _number(value: Any) -> float | None:
    """A finite float, or None for a missing, non-numeric or NaN value (JSON has no NaN; older reports wrote null)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(value) else float(value)


def _scalars(cls: type) -> list[str]:
    """The names of a metrics class's plain numbers (its ``float | None`` fields)."""
    return [f.name for f in dataclasses.fields(cls) if f.type == "float | None"]


def _flat(obj: Any) -> dict[str, float]:
    """The numbers that were measured (a None is left out, as a report always did)."""
    return {name: v for name in _scalars(type(obj)) if (v := getattr(obj, name)) is not None}


@dataclass(frozen=True)
class PolicyMetrics:
    """One policy's side of an evaluation. The comparisons (``win_rate`` ... ``length_change``, the judge's
    ``rm_accuracy``) are filled on the challenger's side only; ``kl_base`` is the drift budget's KL to the
    original base model (the challenger's ``kl`` when its reference is that base)."""

    reward_mean: float | None = None
    kl: float | None = None
    kl_base: float | None = None
    length_mean: float | None = None
    no_eos_share: float | None = None
    refusal_rate: float | None = None
    helpful_rate: float | None = None
    win_rate: float | None = None
    win_rate_ci_low: float | None = None
    win_rate_ci_high: float | None = None
    lc_win_rate: float | None = None
    length_coef: float | None = None
    length_change: float | None = None
    rm_accuracy: float | None = None
    rm_pairs: float | None = None
    judge_independent: float | None = None  # 1.0: a judge cross-fitted apart from the challenger's reward

    kind: Kind = field(default="policy", init=False, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyMetrics:
        return cls(**{name: _number(data.get(name)) for name in _scalars(cls)})

    def as_dict(self) -> dict[str, float]:
        return _flat(self)


@dataclass(frozen=True)
class RewardMetrics:
    """One reward model's side of an evaluation: on the eval pairs, and per rule of the audit set (the share of
    the rule's pairs ranked as the trusted labelers did, and how many pairs that is)."""

    accuracy: float | None = None
    pairs: float | None = None
    ece: float | None = None
    mean_margin: float | None = None
    length_corr: float | None = None
    audit_accuracy: float | None = None
    audit_pairs: float | None = None
    audit: dict[str, float] = field(default_factory=dict)  # rule -> agreement
    audit_rule_pairs: dict[str, float] = field(default_factory=dict)  # rule -> pairs

    kind: Kind = field(default="reward", init=False, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RewardMetrics:
        plain = {name: _number(data.get(name)) for name in _scalars(cls)}
        by_rule: dict[str, dict[str, float]] = {"audit/": {}, "audit_pairs/": {}}
        for key, value in data.items():
            for prefix, rules in by_rule.items():
                if key.startswith(prefix) and (number := _number(value)) is not None:
                    rules[key.removeprefix(prefix)] = number
        return cls(**plain, audit=by_rule["audit/"], audit_rule_pairs=by_rule["audit_pairs/"])

    def as_dict(self) -> dict[str, float]:
        return (_flat(self) | {f"audit/{r}": v for r, v in self.audit.items()}
                | {f"audit_pairs/{r}": v for r, v in self.audit_rule_pairs.items()})


Metrics = PolicyMetrics | RewardMetrics


@dataclass(frozen=True)
class PolicyAnswers:
    """Every held-out prompt with both policies' answers (and their lengths in tokens)."""

    prompts: list[str]
    challenger: list[str]
    champion: list[str]
    challenger_tokens: list[int]
    champion_tokens: list[int]


@dataclass(frozen=True)
class Evaluation:
    """A registered challenger version against the champion version of the same model (``champion_version``
    None: the first model of its name, compared with nothing). The policy fields (``judge`` ... ``answers``) are
    empty for a reward model; ``run_id`` is the MLflow run the report was logged in."""

    model: str
    challenger_version: str
    champion_version: str | None
    dataset_version: str
    challenger: Metrics
    champion: Metrics | None = None
    run_id: str | None = None
    judge: str | None = None
    reference: str | None = None
    base: str | None = None
    prompts: int = 0
    samples: list[dict[str, Any]] = field(default_factory=list)
    answers: PolicyAnswers | None = None

    @property
    def kind(self) -> Kind:
        return self.challenger.kind

    @property
    def has_champion(self) -> bool:
        """Whether the challenger was compared with a champion other than itself."""
        return self.champion_version not in (None, self.challenger_version)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model, "kind": self.kind, "challenger_version": self.challenger_version,
            "champion_version": self.champion_version, "dataset_version": self.dataset_version,
            "challenger": self.challenger.as_dict(),
            "champion": self.champion.as_dict() if self.champion is not None else None}
        if self.kind == "reward":
            out["pairs"] = self.challenger.as_dict().get("pairs")
        else:
            out |= {"judge": self.judge, "reference": self.reference, "base": self.base, "prompts": self.prompts,
                    "samples": self.samples,
                    "answers": dataclasses.asdict(self.answers) if self.answers is not None else None}
        if self.run_id is not None:
            out["run_id"] = self.run_id
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        reward = data.get("kind", "reward" if data.get("model") == REWARD_MODEL else "policy") == "reward"
        side: type[PolicyMetrics] | type[RewardMetrics] = RewardMetrics if reward else PolicyMetrics
        champion = data.get("champion")
        answers = data.get("answers")
        return cls(
            model=str(data["model"]), challenger_version=str(data["challenger_version"]),
            champion_version=None if data.get("champion_version") is None else str(data["champion_version"]),
            dataset_version=str(data.get("dataset_version", "")),
            challenger=side.from_dict(data["challenger"]),
            champion=side.from_dict(champion) if champion is not None else None,
            run_id=data.get("run_id"), judge=data.get("judge"), reference=data.get("reference"),
            base=data.get("base"), prompts=int(data.get("prompts") or 0), samples=list(data.get("samples") or []),
            answers=PolicyAnswers(**answers) if answers else None)
