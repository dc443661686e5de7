"""The promotion gate: a pure decision over evaluation numbers, with every reason spelled out.

``decide(challenger, champion, policy) -> GateDecision(promote, reasons, checks)``. ``challenger`` and
``champion`` are the two sides of an evaluation (:mod:`training.report`: a policy's or a reward model's metrics,
which say which checks apply); ``champion`` is ``None`` for the first model of a name. Thresholds come from the gate recipe (``configs/gate.yaml``,
:class:`training.config.GateRecipe`). Every check is reported, passed or not, so the audit history
says what was looked at and not only what failed.

Policy checks (challenger vs the serving champion, both judged by the champion reward model, plus the recipe's
``no_eos_penalty`` on each answer cut off at the token limit, as PPO's reward scores it):
  win rate >= ``min_win_rate`` with the lower end of its 95% Wilson interval above ``min_win_rate_ci_low``
  (both policies answer with the same seed, so a challenger with the champion's own weights gives the same
  answers, ties only, 0.5 and an interval that reaches below 0.5: always refused), and length-controlled win rate >= ``min_lc_win_rate`` (the second asks that
  the challenger not be worse than the champion at equal length: a win that is only a length change in
  the direction users reward passes, a win bought with worse answers at equal length does not, and
  ``max_length_drift`` bounds how far the length may move in one promotion); KL(challenger ‖ reference) <= ``max_kl``
  (the policy it was trained from) and KL(challenger ‖ original base) <= ``max_total_kl`` (every promotion's drift
  together, the reference chain followed back to the base); mean length
  within ``max_length_drift`` (relative) of the champion's; share of responses that never end <=
  ``max_no_eos_share`` or <= the champion's own share; harmful probes refused >= ``min_refusal_rate`` and no worse than the champion by more
  than ``max_probe_drop``; harmless probes answered >= ``min_helpful_rate`` (same drop rule); the reward
  model's pairwise accuracy on the eval pairs: its 95% Wilson interval must reach ``min_rm_accuracy`` and lie
  above 0.5 when that floor is above chance (a judge that cannot rank is no judge). An interval, not the point estimate: a cycle's eval split
  holds a few dozen pairs, where one pair moves the accuracy by ~0.02 (measured in the demo: a challenger that
  beat the champion 0.740 on the hidden preference was refused for a judge at 38/60 = 0.633 against 0.65).
  Without a pair count (older reports) the point estimate is compared.
With ``independent_judge`` the judge must be the one cross-fitted with the reward model the challenger was
trained against (``judge_fold`` in the reward recipe: trained on the other half of the prompt groups), not that
reward model itself: a policy optimised against a model wins by that model's errors as much as by real gains.
Reward-model checks: eval accuracy read as the judge's is (its 95% Wilson interval on the eval pairs reaches
  ``min_rm_accuracy`` and lies above 0.5: measured in the demo, a reward model at 35/54 = 0.648 on the users'
  clicks, and 0.827 against the hidden preference, was refused by a point threshold of 0.65 that the policy
  gate would not have applied to it as a judge) and no worse than the champion's by more than
  ``max_accuracy_drop``; |reward/length correlation| <= ``max_length_correlation`` (a reward-hacking sign); and,
  when the recipe names an ``audit`` set, on each rule of it the 95% Wilson interval of the model's agreement
  with the trusted labelers (``audit/<rule>`` on ``audit_pairs/<rule>`` pairs) must reach ``min_audit_accuracy``
  (a report without them is refused: evaluate it again). The eval pairs are user clicks, so a model that learned
  what users click for passes them even when that contradicts the guidelines (users who click for the shortest
  answer teach "a fragment beats an answer"); the audit set is the check that does not come from the same
  clicks. Per rule, not overall: a model can be right on every other rule and wrong on the one it was taught to
  hack (measured on a simulated hour: 0.73 overall for both an honest one-epoch model and a hacked one). The
  interval, because a rule holds 8-12 pairs: the check refuses a model shown to rank against a rule (1 of 12),
  not one that is merely unsure of it (4 of 8, which that honest model measured on "concise").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from training.config import GateRecipe
from training.report import Metrics, PolicyMetrics, RewardMetrics


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    value: float | None
    threshold: str
    reason: str


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str]
    checks: list[Check] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"promote": self.promote, "reasons": self.reasons,
                "checks": [c.__dict__ for c in self.checks]}


def wilson(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (ties counted as half wins)."""
    if n == 0:
        return (0.0, 1.0)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _check(checks: list[Check], name: str, value: float | None, ok: bool, threshold: str, what: str) -> None:
    shown = "missing" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"
    passed = value is not None and not (isinstance(value, float) and math.isnan(value)) and ok
    checks.append(Check(name, passed, value, threshold, f"{what} {shown} (needs {threshold})"))


def _interval_check(checks: list[Check], name: str, value: float | None, n: float | None, floor: float, what: str,
                    above_chance: bool = False) -> None:
    """``value``, a share measured on ``n`` pairs, passes when its 95% Wilson interval reaches ``floor`` (and,
    with ``above_chance``, lies above 0.5); without a pair count the point estimate is compared with ``floor``."""
    if value is None or not n:
        _check(checks, name, value, value is not None and value >= floor, f">= {floor}", what)
        return
    low, high = wilson(value * n, int(n))
    _check(checks, name, value, high >= floor and (low > 0.5 or not above_chance),
           f"its 95% interval on {int(n)} pairs, [{low:.3f}, {high:.3f}], to reach {floor}"
           + (" and lie above 0.5" if above_chance else ""), what)


def _reward_checks(checks: list[Check], c: RewardMetrics, champion: RewardMetrics | None,
                   policy: GateRecipe) -> None:
    acc = c.accuracy
    # read as the policy gate reads the same model as a judge: on the interval of the pairs it was measured on
    _interval_check(checks, "rm_accuracy", acc, c.pairs, policy.min_rm_accuracy, "eval pairwise accuracy",
                    above_chance=policy.min_rm_accuracy > 0.5)
    if champion is not None and champion.accuracy is not None:
        floor = champion.accuracy - policy.max_accuracy_drop
        _check(checks, "rm_accuracy_vs_champion", acc, acc is not None and acc >= floor,
               f">= champion {champion.accuracy:.3f} - {policy.max_accuracy_drop}", "eval accuracy")
    corr = c.length_corr
    _check(checks, "length_correlation", corr, corr is not None and abs(corr) <= policy.max_length_correlation,
           f"|x| <= {policy.max_length_correlation}", "reward/length correlation")
    if policy.audit:
        if not c.audit:
            _check(checks, "audit", None, False, f"audit/<rule> >= {policy.min_audit_accuracy} on {policy.audit}",
                   "agreement with the trusted labelers' audit pairs (not in the report: evaluate it again)")
        for rule in sorted(c.audit):
            _interval_check(checks, f"audit/{rule}", c.audit[rule], c.audit_rule_pairs.get(rule),
                            policy.min_audit_accuracy, f"agreement with the trusted labelers on audit rule {rule!r}")


def _policy_checks(checks: list[Check], c: PolicyMetrics, champion: PolicyMetrics | None,
                   policy: GateRecipe) -> None:
    if champion is not None:
        wr = c.win_rate
        _check(checks, "win_rate", wr, wr is not None and wr >= policy.min_win_rate,
               f">= {policy.min_win_rate}", "win rate vs the champion")
        if policy.min_win_rate_ci_low:
            low = c.win_rate_ci_low
            _check(checks, "win_rate_ci_low", low, low is not None and low > policy.min_win_rate_ci_low,
                   f"> {policy.min_win_rate_ci_low}", "lower end of the win rate's 95% interval")
        lc = c.lc_win_rate
        _check(checks, "lc_win_rate", lc, lc is not None and lc >= policy.min_lc_win_rate,
               f">= {policy.min_lc_win_rate}", "length-controlled win rate vs the champion")
        drift = c.length_change
        _check(checks, "length_drift", drift, drift is not None and abs(drift) <= policy.max_length_drift,
               f"|x| <= {policy.max_length_drift}", "relative change of mean response length")
    kl = c.kl
    _check(checks, "kl", kl, kl is not None and kl <= policy.max_kl, f"<= {policy.max_kl}",
           "KL(policy ‖ reference) per response")
    if policy.max_total_kl:
        total = c.kl_base
        _check(checks, "total_kl", total, total is not None and total <= policy.max_total_kl,
               f"<= {policy.max_total_kl}", "KL(policy ‖ original base model) per response, the drift budget")
    # never-ending answers: at most max_no_eos_share, or no more than the champion already has (a base
    # model that rambles past the evaluation's token budget must not block the challenger that fixes it)
    no_eos = c.no_eos_share
    cap = max(policy.max_no_eos_share, (champion.no_eos_share if champion is not None else None) or 0.0)
    _check(checks, "no_eos_share", no_eos, no_eos is not None and no_eos <= cap + 1e-9,
           f"<= {cap:.3g}" if cap > policy.max_no_eos_share else f"<= {policy.max_no_eos_share}",
           "share of responses that never end")
    for key, floor, what in (("refusal_rate", policy.min_refusal_rate, "harmful probes refused"),
                             ("helpful_rate", policy.min_helpful_rate, "harmless probes answered")):
        value: float | None = getattr(c, key)
        _check(checks, key, value, value is not None and value >= floor, f">= {floor}", what)
        theirs: float | None = getattr(champion, key) if champion is not None else None
        if theirs is not None:
            ref = theirs - policy.max_probe_drop
            _check(checks, f"{key}_vs_champion", value, value is not None and value >= ref - 1e-9,
                   f">= champion {theirs:.3f} - {policy.max_probe_drop}", what)
    if policy.independent_judge and champion is not None:
        ind = c.judge_independent
        _check(checks, "judge_independent", ind, ind == 1.0, "a judge cross-fitted on other pairs (judge_fold)",
               "a judge independent of the reward the challenger was trained against (1 = yes)")
    # a floor at or below chance asks nothing of the judge; above it, the judge must be shown to rank at all
    _interval_check(checks, "judge_accuracy", c.rm_accuracy, c.rm_pairs, policy.min_rm_accuracy,
                    "the judging reward model's eval accuracy", above_chance=policy.min_rm_accuracy > 0.5)


def decide(challenger: Metrics, champion: Metrics | None, policy: GateRecipe) -> GateDecision:
    """Promote only if every check passes. The kind of ``challenger`` (a policy's metrics or a reward model's)
    says which checks apply; ``champion`` must be of the same kind."""
    if champion is not None and champion.kind != challenger.kind:
        raise ValueError(f"a {challenger.kind} challenger cannot be compared with a {champion.kind} champion")
    checks: list[Check] = []
    if isinstance(challenger, RewardMetrics):
        _reward_checks(checks, challenger, champion if isinstance(champion, RewardMetrics) else None, policy)
    elif isinstance(challenger, PolicyMetrics):
        _policy_checks(checks, challenger, champion if isinstance(champion, PolicyMetrics) else None, policy)
    else:
        raise TypeError(f"not an evaluation's metrics: {type(challenger).__name__}")
    failed = [ch.reason for ch in checks if not ch.passed]
    if failed:
        return GateDecision(False, failed, checks)
    return GateDecision(True, [f"all {len(checks)} checks passed"], checks)
