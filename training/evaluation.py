"""``flywheel evaluate``: a challenger against the serving champion, with the numbers the gate decides on.

Policy (``flywheel-policy``), on the held-out prompts (the eval split of a curated dataset):

- both policies answer every prompt (sampled, fixed seed); the judge (the champion reward model) scores both
  answers; **win rate** = share of prompts where the challenger's answer scores higher (ties count half), with
  a 95% Wilson interval;
- **length-controlled win rate**, in the manner of AlpacaEval-LC: a logistic model
  ``P(win) = σ(θ0 + θ1 · tanh(Δlen / sd(Δlen)))`` is fitted to the outcomes and the win rate is reported with
  the length term removed, ``σ(θ0)`` (a challenger that only got longer or shorter does not win by it);
- **KL(policy ‖ reference)** per response (k3 estimator summed over the response tokens, on the policy's own
  samples, both distributions at the sampling temperature), the reference being the base model the policy was trained from (its ``reference`` tag);
- mean response length (tokens) and its relative change, the share of responses that never end;
- the judge's pairwise accuracy on the dataset's eval pairs;
- the fixed probe set (``configs/probes/safety.yaml``): harmful requests refused, harmless ones answered.

Reward model (``flywheel-reward``): challenger and champion on the same eval pairs (accuracy, ECE, margin,
reward/length correlation), and on the audit set (``configs/probes/audit.yaml``): pairs trusted labelers wrote
from the answer guidelines, grouped by rule; ``audit/<rule>`` is the share of a rule's pairs where the model
ranks the labelers' choice higher. Eval pairs come from user clicks, so a reward model that learned what users
click for scores well on them even when that contradicts the guidelines; the audit set is where it shows.

The report is logged to MLflow (experiment ``flywheel-evaluation``: metrics, ``evaluation.json``, a sample
of answers) and the challenger version is tagged ``eval_run_id`` so that ``flywheel promote`` can find it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flywheel import progress
from flywheel.settings import Settings
from training.config import GateRecipe, resolve_recipe_path
from training.gate import wilson
from training.report import Evaluation, PolicyAnswers, PolicyMetrics, RewardMetrics
from training.tracking import POLICY_MODEL, REWARD_MODEL, log_dict_artifact, use_tracking

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Probes:
    harmful: list[str]
    harmless: list[str]
    patterns: list[re.Pattern[str]]

    @classmethod
    def load(cls, path: str | Path) -> Probes:
        import yaml

        data = yaml.safe_load(resolve_recipe_path(path).read_text())
        return cls(list(data["harmful"]), list(data["harmless"]),
                   [re.compile(p, re.IGNORECASE) for p in data["refusal_patterns"]])

    def is_refusal(self, text: str) -> bool:
        head = text[:200]
        return any(p.search(head) for p in self.patterns)


@dataclass(frozen=True)
class AuditSet:
    """Preference pairs written by trusted labelers, each checking one rule of the answer guidelines."""

    pairs: list[dict[str, str]]

    @classmethod
    def load(cls, path: str | Path) -> AuditSet:
        import yaml

        data = yaml.safe_load(resolve_recipe_path(path).read_text())
        pairs = data.get("pairs") if isinstance(data, dict) else None
        if not pairs:
            raise ValueError(f"audit set {path}: no pairs")
        for i, p in enumerate(pairs):
            missing = {"rule", "prompt", "chosen", "rejected"} - set(p)
            if missing:
                raise ValueError(f"audit set {path}: pair {i} lacks {sorted(missing)}")
        return cls([{k: str(p[k]) for k in ("rule", "prompt", "chosen", "rejected")} for p in pairs])

    def rules(self) -> list[str]:
        return sorted({p["rule"] for p in self.pairs})

    def score(self, model: Any) -> dict[str, float]:
        """``audit/<rule>``: share of the rule's pairs the model ranks as the labelers did (ties count half) and
        ``audit_pairs/<rule>`` their number; ``audit_accuracy`` over all pairs; ``audit_pairs``."""
        prompts = [p["prompt"] for p in self.pairs]
        chosen = model.score(prompts, [p["chosen"] for p in self.pairs]).numpy()
        rejected = model.score(prompts, [p["rejected"] for p in self.pairs]).numpy()
        agree = (chosen > rejected) + 0.5 * (chosen == rejected)
        rule_of = np.array([p["rule"] for p in self.pairs])
        out: dict[str, float] = {}
        for r in self.rules():
            out |= {f"audit/{r}": float(agree[rule_of == r].mean()), f"audit_pairs/{r}": float((rule_of == r).sum())}
        return out | {"audit_accuracy": float(agree.mean()), "audit_pairs": float(len(agree))}


def length_controlled_win_rate(outcome: np.ndarray, length_diff: np.ndarray, l2: float = 0.3,
                               iters: int = 50) -> tuple[float, float]:
    """(σ(θ0), θ1) of ``P(win) = σ(θ0 + θ1 · tanh(Δlen / sd))`` fitted by Newton's method on the (possibly
    fractional) outcomes, with a ridge penalty ``l2`` (on a dozen prompts an unpenalised fit can
    separate and report 0.99); σ(θ0) is the win rate at equal length."""
    y = np.asarray(outcome, dtype=float)
    d = np.asarray(length_diff, dtype=float)
    sd = d.std()
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(x), x], 1)
    theta = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ theta))
        grad = X.T @ (p - y) + l2 * theta
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(1 / (1 + np.exp(-theta[0]))), float(theta[1])


@dataclass
class Answers:
    texts: list[str]
    lengths: np.ndarray  # tokens, up to and including EOS
    finished: np.ndarray
    kl: np.ndarray  # per response, vs the reference
    kl_base: np.ndarray | None = None  # per response, vs the original base model (when asked for)


def answer(lm: Any, tok: Any, ref: Any | None, prompts: list[str], recipe: GateRecipe, batch: int = 50,
           base: Any | None = None) -> Answers:
    """Sampled answers (seeded), with each one's KL to ``ref`` (0 when ``ref`` is None) and, given ``base``, to
    it as well (``kl_base``), in the prompts' order.
    Prompts of similar length share a batch; the policy's log-probabilities come from its own generation, the
    reference's from one forward pass over the responses."""
    from training.generation import (
        logprob_temperature,
        response_logits_to_keep,
        sample,
        shortest_first,
        token_logprobs,
    )
    from training.policy.ppo_math import kl_k3

    state = torch.get_rng_state()
    torch.manual_seed(recipe.seed)
    order = shortest_first(tok, prompts, recipe.max_prompt_tokens)
    texts: list[str] = []
    lengths, finished, kls, base_kls = [], [], [], []
    temperature = logprob_temperature(recipe.temperature)

    def kl_to(model: Any, ro: Any) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                           logits_to_keep=response_logits_to_keep(ro.input_ids, ro.prompt_len)).logits
        return (kl_k3(ro.logprobs, token_logprobs(logits, ro.input_ids, ro.prompt_len, temperature)) * ro.mask).sum(1)

    for i in range(0, len(order), batch):
        progress.report("gate answers", i, len(order))
        ro = sample(lm, tok, [prompts[j] for j in order[i:i + batch]], max_new_tokens=recipe.max_new_tokens,
                    temperature=recipe.temperature, greedy=recipe.temperature <= 0,
                    max_prompt_tokens=recipe.max_prompt_tokens, with_logprobs=ref is not None or base is not None)
        texts += ro.texts
        lengths.append(ro.mask.sum(1))
        finished.append(ro.finished)
        kls.append(kl_to(ref, ro) if ref is not None else torch.zeros(len(ro.texts)))
        if base is not None:
            base_kls.append(kl_to(base, ro))
    torch.set_rng_state(state)
    back = np.argsort(order)  # position in generation order of each prompt
    progress.report("gate answers", len(order), len(order))
    return Answers([texts[k] for k in back], torch.cat(lengths).numpy()[back], torch.cat(finished).numpy()[back],
                   torch.cat(kls).numpy()[back], torch.cat(base_kls).numpy()[back] if base is not None else None)


def judge_scores(judge: Any, prompts: list[str], ans: Answers, recipe: GateRecipe) -> np.ndarray:
    """The judge's score of each answer as a user gets it: the reward model's, plus the recipe's
    ``no_eos_penalty`` when the answer was cut off at ``max_new_tokens`` (PPO's reward adds the same penalty;
    a reward model reads a cut-off answer as if it were whole, so alone it cannot see a policy learn to finish)."""
    return judge.score(prompts, ans.texts).numpy() + recipe.no_eos_penalty * (1 - ans.finished.astype(float))


def policy_stats(ans: Answers, rewards: np.ndarray, probe_refusals: tuple[float, float]) -> PolicyMetrics:
    return PolicyMetrics(reward_mean=float(rewards.mean()), kl=float(ans.kl.mean()),
                         length_mean=float(ans.lengths.mean()), no_eos_share=float(1 - ans.finished.mean()),
                         refusal_rate=probe_refusals[0], helpful_rate=probe_refusals[1])


@dataclass(frozen=True)
class PolicyComparison:
    """Both policies on the same held-out prompts: the metrics of each side, 20 sample answers with their
    rewards, and every answer."""

    prompts: int
    challenger: PolicyMetrics
    champion: PolicyMetrics
    samples: list[dict[str, Any]]
    answers: PolicyAnswers


def probe(lm: Any, tok: Any, probes: Probes, recipe: GateRecipe) -> tuple[float, float]:
    """(share of harmful probes refused, share of harmless probes answered), answered at the recipe's
    ``probe_temperature`` (greedy by default: with a dozen probes a side, one sampled answer a probe makes a
    pass rate move by 1/12 between two runs of the same model, which is as much as the gate's drop rule allows)."""
    if recipe.probe_temperature is not None:
        recipe = dataclasses.replace(recipe, temperature=recipe.probe_temperature)
    texts = answer(lm, tok, None, probes.harmful + probes.harmless, recipe).texts  # one batch: one decoding loop
    harmful, harmless = texts[:len(probes.harmful)], texts[len(probes.harmful):]
    return (float(np.mean([probes.is_refusal(t) for t in harmful])),
            float(np.mean([not probes.is_refusal(t) for t in harmless])))


def _answers_and_probes(model: tuple[Any, Any], ref: Any | None, prompts: list[str], recipe: GateRecipe,
                        probes: Probes, cache: dict[str, Any] | None, key: str | None,
                        base: Any | None = None) -> tuple[Answers, tuple[float, float]]:
    """A policy's answers and probe rates, from ``cache[key]`` when an identical evaluation was already run
    (same version, prompts and sampling settings: the sampling is seeded, so the answers are too). A cached
    side keeps the KL measured then, against the reference of that evaluation."""
    import hashlib
    import json

    full_key = None
    if cache is not None and key is not None:
        spec = json.dumps([key, prompts, recipe.max_new_tokens, recipe.max_prompt_tokens, recipe.temperature,
                           recipe.seed, recipe.probes, recipe.probe_temperature])
        full_key = hashlib.sha256(spec.encode()).hexdigest()
        hit = cache.get(full_key)
        if hit is not None and (base is None or hit[0].kl_base is not None):
            return hit
    out = (answer(*model, ref, prompts, recipe, base=base), probe(*model, probes, recipe))
    if full_key is not None:
        cache[full_key] = out
    return out


def compare_policies(challenger: tuple[Any, Any], champion: tuple[Any, Any], reference: tuple[Any, Any] | None,
                     judge: Any, prompts: list[str], recipe: GateRecipe, probes: Probes,
                     eval_pairs: Any | None = None, *, cache: dict[str, Any] | None = None,
                     keys: tuple[str, str] | None = None, champion_is_reference: bool = False,
                     base: tuple[Any, Any] | None = None) -> PolicyComparison:
    """A challenger policy against the champion (models and tokenizers given): both sides' metrics and answers.
    ``cache`` with ``keys`` (an identity for each side, e.g. its registered version) reuses answers.
    ``champion_is_reference``: the champion is the reference model itself (the base policy, v1), so its KL is
    0 by definition and the reference's forward pass over its answers is skipped (as long as generating them).
    ``base``: the original base model when it is not ``reference`` (the challenger's ``kl_base``, the drift
    budget); without it the challenger's ``kl_base`` is its ``kl``."""
    from training.generation import fit_prompts, flatten_prompt
    from training.reward.train import evaluate as rm_evaluate

    ref = reference[0] if reference is not None else None
    k_ch, k_cp = keys or (None, None)
    a_ch, probes_ch = _answers_and_probes(challenger, ref, prompts, recipe, probes, cache, k_ch,
                                          base=base[0] if base is not None else None)
    a_cp, probes_cp = _answers_and_probes(champion, None if champion_is_reference else ref, prompts, recipe, probes,
                                          cache, k_cp)
    # judged on the prompt the policies read (cut to max_prompt_tokens)
    seen = [flatten_prompt(p) for p in fit_prompts(challenger[1], prompts, recipe.max_prompt_tokens)]
    r_ch, r_cp = judge_scores(judge, seen, a_ch, recipe), judge_scores(judge, seen, a_cp, recipe)
    outcome = (r_ch > r_cp).astype(float) + 0.5 * (r_ch == r_cp)
    n = len(prompts)
    low, high = wilson(float(outcome.sum()), n)
    lc, length_coef = length_controlled_win_rate(outcome, a_ch.lengths - a_cp.lengths)
    ch = policy_stats(a_ch, r_ch, probes_ch)
    cp = policy_stats(a_cp, r_cp, probes_cp)
    rm_eval = rm_evaluate(judge, eval_pairs) if eval_pairs is not None and len(eval_pairs) else {}
    ch = dataclasses.replace(
        ch, kl_base=float(a_ch.kl_base.mean()) if base is not None and a_ch.kl_base is not None else ch.kl,
        win_rate=float(outcome.mean()), win_rate_ci_low=low, win_rate_ci_high=high, lc_win_rate=lc,
        length_coef=length_coef, length_change=float(a_ch.lengths.mean()) / max(float(a_cp.lengths.mean()), 1e-9) - 1,
        rm_accuracy=rm_eval.get("accuracy"), rm_pairs=rm_eval.get("pairs"))
    samples = [{"prompt": p, "challenger": a, "champion": b, "reward_challenger": float(x), "reward_champion": float(y)}
               for p, a, b, x, y in list(zip(prompts, a_ch.texts, a_cp.texts, r_ch, r_cp, strict=True))[:20]]
    answers = PolicyAnswers(prompts=list(prompts), challenger=a_ch.texts, champion=a_cp.texts,
                            challenger_tokens=a_ch.lengths.tolist(), champion_tokens=a_cp.lengths.tolist())
    return PolicyComparison(n, ch, cp, samples, answers)


def compare_reward_models(challenger: Any, champion: Any | None, eval_pairs: Any,
                          audit: AuditSet | None = None) -> tuple[RewardMetrics, RewardMetrics | None]:
    """Both reward models on the eval pairs and, given ``audit``, on the audit set (``audit/<rule>``)."""
    from training.reward.train import evaluate as rm_evaluate

    def side(model: Any) -> RewardMetrics:
        return RewardMetrics.from_dict(rm_evaluate(model, eval_pairs) | (audit.score(model) if audit is not None else {}))

    return side(challenger), side(champion) if champion is not None else None


def pick_judge(client: Any, recipe: GateRecipe, trained_against: str | None) -> tuple[Any, str, bool]:
    """(judge, its label, whether it is independent of the challenger's reward). The judge registered with the
    reward model version the challenger was trained against (cross-fitted on the other half of the prompt
    groups: ``judge_fold``) when there is one; else the recipe's ``judge`` (or, before any reward model is
    champion, @challenger), which may be the very model the policy was optimised against."""
    from training.registry import CHALLENGER, CHAMPION, alias_version
    from training.reward.train import load_registered_reward

    if trained_against and trained_against.isdigit():
        try:
            judge = load_registered_reward(f"models:/{REWARD_MODEL}/{trained_against}", part="judge")
            return judge, f"{REWARD_MODEL}/{trained_against} (its cross-fitted judge)", True
        except FileNotFoundError:
            pass
    uri = recipe.judge
    if alias_version(client, REWARD_MODEL, CHAMPION) is None:  # no champion reward model yet
        uri = f"models:/{REWARD_MODEL}@{CHALLENGER}"
    version = uri if "@" not in uri else alias_version(client, REWARD_MODEL, uri.rsplit("@", 1)[1])
    return load_registered_reward(uri), f"{REWARD_MODEL}/{version}", False


def original_base(client: Any, model: str, reference: str) -> str:
    """Follow registered versions' ``reference`` tags (each version names the policy it was trained from) back to
    the base model: ``models:/flywheel-policy/3`` -> ``models:/flywheel-policy/2`` -> ``smollm2``."""
    seen: set[str] = set()
    prefix = f"models:/{model}/"
    while reference.startswith(prefix) and reference not in seen:
        seen.add(reference)
        parent = client.get_model_version(model, reference.removeprefix(prefix)).tags.get("reference")
        if not parent:
            break
        reference = parent
    return reference


def evaluate_challenger(settings: Settings, model: str, challenger: str, *, dataset: str | None = None,
                        recipe: GateRecipe | None = None, prompts: list[str] | None = None,
                        cache: dict[str, Any] | None = None) -> Evaluation:
    """Evaluate registered version ``challenger`` of ``model`` against its champion; log and tag the result.
    Policies answer ``prompts`` when given (a fixed held-out prompt set), else the dataset's eval prompts;
    ``cache`` (a dict kept by the caller) reuses the answers of a version already evaluated the same way."""
    import mlflow
    from mlflow import MlflowClient

    from pipelines.dataset import open_dataset, split_prompts
    from training.generation import load_causal_lm, pointer_base, registered_policy_dir
    from training.registry import CHAMPION, alias_version, tag_version
    from training.reward.train import load_registered_reward

    recipe = recipe or GateRecipe()
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    use_tracking(settings, "flywheel-evaluation")
    client = MlflowClient(settings.mlflow.tracking_uri)
    challenger = str(challenger)
    mv = client.get_model_version(model, challenger)
    champion = alias_version(client, model, CHAMPION)
    dataset = dataset or mv.tags.get("dataset_version")
    if not dataset:
        raise ValueError(f"{model} version {challenger} names no dataset: pass --dataset")
    ds = open_dataset(dataset, settings)
    pairs = ds.table("pairs")
    eval_pairs = pairs[pairs["split"] == "eval"].reset_index(drop=True)
    report: Evaluation
    if model == REWARD_MODEL:
        rm_champion = load_registered_reward(f"models:/{model}/{champion}") if champion and champion != challenger else None
        audit = AuditSet.load(recipe.audit) if recipe.audit else None
        ch_rm, cp_rm = compare_reward_models(load_registered_reward(f"models:/{model}/{challenger}"), rm_champion,
                                             eval_pairs, audit)
        report = Evaluation(model, challenger, champion, ds.version, ch_rm, cp_rm)
    elif model == POLICY_MODEL:
        judge, judge_label, independent = pick_judge(client, recipe, mv.tags.get("reward_model_version"))
        ch = load_causal_lm(str(registered_policy_dir(f"models:/{model}/{challenger}")))
        cp_dir = registered_policy_dir(f"models:/{model}/{champion}") if champion else None
        cp = load_causal_lm(str(cp_dir)) if cp_dir is not None else ch
        reference = recipe.reference or mv.tags.get("reference") or "smollm2"
        champion_is_reference = cp_dir is not None and pointer_base(cp_dir) == reference
        ref = load_causal_lm(reference)
        root = original_base(client, model, reference)
        base = load_causal_lm(root) if root != reference and recipe.max_total_kl else None
        prompts = list(prompts) if prompts is not None else split_prompts(ds, "eval", recipe.eval_prompts, recipe.seed)
        if not prompts:
            raise ValueError(f"dataset {ds.version} has no eval prompts")
        keys = (f"{model}/{challenger}", f"{model}/{champion}")
        comp = compare_policies(ch, cp, ref, judge, prompts, recipe, Probes.load(recipe.probes), eval_pairs,
                                cache=cache, keys=keys, champion_is_reference=champion_is_reference, base=base)
        report = Evaluation(model, challenger, champion, ds.version,
                            dataclasses.replace(comp.challenger, judge_independent=float(independent)),
                            comp.champion, judge=judge_label, reference=reference, base=root, prompts=comp.prompts,
                            samples=comp.samples, answers=comp.answers)
    else:
        raise ValueError(f"model must be {POLICY_MODEL} or {REWARD_MODEL}, got {model!r}")
    # measurements only: the gate decides once, when training.registry.promote reads this evaluation
    with mlflow.start_run(run_name=f"evaluate-{model}-{challenger}") as run:
        mlflow.set_tags({"flywheel.kind": "evaluation", "flywheel.model": model,
                         "flywheel.challenger_version": challenger, "flywheel.champion_version": str(champion),
                         "flywheel.dataset_version": ds.version})
        for side, values in (("challenger", report.challenger), ("champion", report.champion)):
            if values is not None:
                mlflow.log_metrics({f"{side}/{k}": v for k, v in values.as_dict().items() if math.isfinite(v)})
        report = dataclasses.replace(report, run_id=run.info.run_id)
        log_dict_artifact(report.as_dict(), "evaluation.json")
    tag_version(client, model, challenger, {"eval_run_id": run.info.run_id})
    log.info("evaluated %s/%s vs %s", model, challenger, champion)
    return report
