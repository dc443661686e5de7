"""PPO for a causal LM against a learned reward, with a KL penalty to the frozen reference (ours: TRL 1.16
has no PPO). The arithmetic is in :mod:`training.policy.ppo_math`; this module runs the loop.

Objective (InstructGPT, Ouyang et al. 2022; Ziegler et al. 2019), for prompts x and responses y ~ π_T(·|x):

    maximise  E[ R(x, y) ]  -  β · KL( π_T(·|x) ‖ π_ref,T(·|x) )

where π_T = softmax(logits / T) is the policy at the sampling temperature T: the answers are drawn from it, so
the ratio, the KL penalty, the controller's KL and the gate's KL are all read from logits / T (as OpenRLHF, verl
and TRL do). Optimised with PPO's clipped surrogate (Schulman et al. 2017) on per-token advantages from one of:

- ``advantage: rloo`` (the default): ``samples_per_prompt`` answers a prompt (the prompt is read once and its
  keys and values shared), each answer's KL-penalised reward ``score - β Σ kl`` minus the mean of its prompt's
  other answers' (REINFORCE leave-one-out, Ahmadian et al. 2024), on each of its tokens. No critic, and no
  forward pass of the policy before the update: the sampler's own log-probabilities are the old ones.
- ``advantage: gae``: a value head on the policy's last hidden state (a shared trunk), the KL penalty per token
  and the sequence score on the last token, GAE (λ = 1 by default), ``L = L_clip + c_v · L_value``;
  ``critic_warmup_steps`` first fits the value head alone to the reward model's returns (the policy waits).

One round (``steps`` of them): sample -> score with the reward model -> advantages -> ``ppo_epochs`` passes
over minibatches -> update β (adaptive controller) -> log -> checkpoint.

Deviations from the textbook, on purpose:

- ``target_kl`` is the per-sequence KL the adaptive controller steers β towards (β never below
  ``min_kl_coef``). The controller alone reacts slowly at 16 samples a step, so ``kl_guard`` (>= 1) stops a
  step's remaining updates once a minibatch's KL to the reference passes ``kl_guard · target_kl``, and
  ``max_approx_kl`` once the policy has moved that far from the sampler; ``ppo/early_stop`` logs it. The
  loss is never replaced, and k3 clamps its log-ratio to ±10.
- Sequence scores are normalised (``reward_norm``: whitened over the rollout batch, or standardised with the
  reward model's own training statistics, which keeps the KL lower late in training), then clipped to
  ±``reward_clip`` (raw scores are what we report); a response that never emits EOS within
  ``max_new_tokens`` gets ``no_eos_penalty`` added to its raw score first (otherwise the policy learns to
  ramble past the window the RM sees).
- Advantages are whitened over the batch's response tokens. Values are clipped around their rollout values.
  The entropy is computed outside the autograd graph unless ``entropy_coef`` is set.
- With ``lora: true`` only LoRA adapters (peft) (and the value head) train, and the reference model is the
  same network with the adapters disabled, so no second copy of the weights is kept.
- Prompts are left-padded; response tokens after the first EOS are masked out of every loss.

On a GPU when the recipe's ``device`` allows one; data-parallel under ``torchrun`` (:mod:`training.distributed`):
every rank generates, scores and updates on its slice of each step's ``rollout_batch`` (minibatches are cut
the same way), DistributedDataParallel averages the gradients, and the statistics that steer the update are
global: reward whitening over the whole batch, advantage whitening over all ranks' response tokens, the KL
the controller sees, the KL guard's decision. Rank 0 evaluates, logs, checkpoints and registers.
"""

from __future__ import annotations

import copy
import logging
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from flywheel.settings import Settings
from pipelines.dataset import open_dataset, split_prompts
from training.config import PPORecipe
from training.distributed import Dist, check_divisible, optimizer_to
from training.distributed import setup as setup_distributed
from training.generation import (
    Rollout,
    entropy_from_logits,
    flatten_prompt,
    load_causal_lm,
    logprob_temperature,
    policy_pyfunc,
    response_logits,
    response_logits_to_keep,
    sample,
    token_logprobs,
)
from training.policy.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_k1,
    kl_k3,
    masked_mean,
    policy_loss,
    rloo_advantages,
    token_rewards,
    value_loss,
    whiten,
)
from training.reward.model import RewardModel
from training.reward.train import load_registered_reward
from training.runs import PolicyResult, load_checkpoint, register_challenger, save_checkpoint, tracked_run
from training.tracking import (
    POLICY_MODEL,
    StepProgress,
    use_tracking,
)

log = logging.getLogger(__name__)


class PolicyWithValue(nn.Module):
    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the last ``logits_to_keep`` positions, or of all with 0; values at every position)."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                      logits_to_keep=logits_to_keep)
        values = self.value_head(out.hidden_states[-1]).squeeze(-1)
        return out.logits, values


class PPOTrainer:
    def __init__(self, recipe: PPORecipe, policy: nn.Module, tokenizer: Any, reward: RewardModel,
                 dist: Dist | None = None):
        self.r, self.tok, self.reward = recipe, tokenizer, reward
        self.dist = dist or Dist()
        check_divisible("rollout_batch", recipe.rollout_batch, self.dist.world)
        check_divisible("minibatch", recipe.minibatch, self.dist.world)
        check_divisible("rollout_batch / samples_per_prompt", recipe.rollout_batch // recipe.samples_per_prompt,
                        self.dist.world)
        policy.to(self.dist.device)
        reward.to(self.dist.device)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if recipe.lora:
            from peft import LoraConfig, get_peft_model

            policy = get_peft_model(policy, LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                                                       target_modules=list(recipe.lora_targets), lora_dropout=0.0,
                                                       task_type="CAUSAL_LM"))
            self.ref = None  # the same weights with the adapters disabled
        else:
            self.ref = copy.deepcopy(policy).eval().requires_grad_(False)
        self.model = PolicyWithValue(policy).to(self.dist.device)
        self.critic = recipe.advantage == "gae"
        if not self.critic:  # RLOO: no value head to train (and none for DistributedDataParallel to wait for)
            self.model.value_head.requires_grad_(False)
        self.net = self.dist.wrap(self.model)  # the update's forward: DistributedDataParallel under torchrun
        self.reward.eval().requires_grad_(False)
        self.temperature = logprob_temperature(recipe.temperature)
        params = [{"params": [p for p in self.model.lm.parameters() if p.requires_grad], "lr": recipe.lr}]
        if self.critic:
            params.append({"params": self.model.value_head.parameters(), "lr": recipe.value_lr})
        self.opt = torch.optim.AdamW(params, eps=1e-5)
        self.kl_ctl = (AdaptiveKLController(recipe.init_kl_coef, recipe.target_kl, recipe.kl_horizon, recipe.min_kl_coef)
                       if recipe.kl_controller == "adaptive" else FixedKLController(recipe.init_kl_coef))
        self.step = 0

    # ------------------------------------------------------------------------------------------ rollout
    @contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        if self.ref is not None:
            yield self.ref
        else:
            with self.model.lm.disable_adapter():
                yield self.model.lm

    def generate(self, prompts: list[str], *, greedy: bool = False, samples: int = 1) -> Rollout:
        """Answers (``samples`` a prompt, rows grouped by prompt) with the sampler's log-probabilities, which
        serve as the update's old log-probabilities: no second pass of the policy."""
        r = self.r
        return sample(self.model.lm, self.tok, prompts, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                      top_k=r.top_k, max_prompt_tokens=r.max_prompt_tokens, greedy=greedy, samples=samples,
                      with_logprobs=True)

    @torch.no_grad()
    def score(self, prompts: list[str], ro: Rollout) -> torch.Tensor:
        """Raw reward-model scores, with the no-EOS penalty."""
        scores = self.reward.score(prompts, ro.texts).float().to(ro.finished.device)
        return scores + (~ro.finished).float() * self.r.no_eos_penalty

    @torch.no_grad()
    def logprobs_values(self, ro: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(the policy's log-probabilities of the response tokens, the reference's, the values or None), all at
        the sampling temperature. The policy's are the sampler's (:meth:`generate` keeps them); the policy's
        forward pass runs only for the critic's values."""
        if ro.logprobs is None:
            raise ValueError("the rollout has no log-probabilities: sample it with with_logprobs=True")
        keep = response_logits_to_keep(ro.input_ids, ro.prompt_len)
        logp, values = ro.logprobs, None
        if self.critic:
            _logits, all_values = self.model(ro.input_ids, ro.attention_mask, logits_to_keep=keep)
            values = all_values[:, ro.prompt_len - 1:-1]
        with self._reference() as ref:
            ref_logits = ref(input_ids=ro.input_ids, attention_mask=ro.attention_mask, logits_to_keep=keep).logits
        ref_logp = token_logprobs(ref_logits, ro.input_ids, ro.prompt_len, self.temperature)
        return logp, ref_logp, values

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Sequence scores as the policy sees them (``reward_norm``), clipped to ±``reward_clip``."""
        if self.r.reward_norm == "batch" and len(raw) * self.dist.world > 1:  # over every rank's slice of the batch
            raw = whiten(raw, all_sum=self.dist.sum)
        elif self.r.reward_norm == "reward_model":
            stats = getattr(self.reward, "stats", None) or {"mean": 0.0, "std": 1.0}
            raw = (raw - stats["mean"]) / max(stats["std"], 1e-6)
        return raw.clamp(-self.r.reward_clip, self.r.reward_clip)

    def kl(self, logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
        return kl_k3(logp, ref_logp) if self.r.kl_estimator == "k3" else kl_k1(logp, ref_logp)

    def advantages(self, score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                   values: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token advantages (whitened over every rank's response tokens) and the critic's returns (None
        for RLOO). GAE: the KL penalty on every token and the score on the last. RLOO: one advantage per
        answer, its KL-penalised reward minus the mean of its prompt's other answers', on each of its tokens."""
        r = self.r
        if self.critic:
            assert values is not None
            rewards = token_rewards(score, kl, mask, self.kl_ctl.beta)
            adv, returns = gae(rewards, values, mask, r.gamma, r.lam)
        else:
            seq = rloo_advantages(score - self.kl_ctl.beta * kl.sum(1), r.samples_per_prompt)
            adv, returns = seq[:, None].expand_as(mask).contiguous(), None
        return whiten(adv, mask, all_sum=self.dist.sum) * mask, returns

    # ------------------------------------------------------------------------------------------- update
    def train_step(self, prompts: list[str]) -> dict[str, float]:
        """One round on ``prompts`` (``rollout_batch / samples_per_prompt`` of them, on this rank): sample
        ``samples_per_prompt`` answers each, score, advantages, ``ppo_epochs`` passes of clipped updates."""
        r = self.r
        k = r.samples_per_prompt
        t0 = time.perf_counter()
        ro = self.generate(prompts, samples=k)
        # scored on the prompt as the policy read it (cut to max_prompt_tokens), not on text it never saw
        answered = [flatten_prompt(p) for p in ro.prompts for _ in range(k)]
        t1 = time.perf_counter()
        raw = self.score(answered, ro)
        t2 = time.perf_counter()
        old_logp, ref_logp, old_values = self.logprobs_values(ro)
        mask = ro.mask
        kl = self.kl(old_logp, ref_logp) * mask
        seq_kl = kl.sum(1)
        adv, returns = self.advantages(self.normalise(raw), kl, mask, old_values)
        t3 = time.perf_counter()

        stats: dict[str, list[float]] = {k_: [] for k_ in ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl")}
        self.model.train()
        n = len(answered)
        minibatch = r.minibatch // self.dist.world  # this rank's share of a minibatch
        guard = r.kl_guard * r.target_kl if r.kl_guard > 0 else float("inf")
        stopped = updates = 0
        keep = response_logits_to_keep(ro.input_ids, ro.prompt_len)
        for _epoch in range(r.ppo_epochs):
            order = torch.randperm(n, device=mask.device)
            for i in range(0, n, minibatch):
                idx = order[i:i + minibatch]
                m = mask[idx]
                logits, values = self.net(ro.input_ids[idx], ro.attention_mask[idx], keep)
                logp = token_logprobs(logits, ro.input_ids[idx], ro.prompt_len, self.temperature)
                pl, pstats = policy_loss(logp, old_logp[idx], adv[idx], m, r.clip)
                warming = self.critic and self.step < r.critic_warmup_steps
                loss = pl.detach() if warming else pl  # warm-up: the critic learns, the policy stays
                if self.critic:
                    assert old_values is not None and returns is not None
                    vl = value_loss(values[:, ro.prompt_len - 1:-1], old_values[idx], returns[idx], m, r.value_clip)
                    loss = loss + r.value_coef * vl
                    stats["value_loss"].append(float(vl.detach()))
                if r.entropy_coef and not warming:
                    ent = masked_mean(entropy_from_logits(response_logits(logits, ro.input_ids, ro.prompt_len),
                                                          self.temperature), m)
                    loss = loss - r.entropy_coef * ent
                else:  # reported, not optimised: no graph over the vocabulary
                    with torch.no_grad():
                        ent = masked_mean(entropy_from_logits(response_logits(logits.detach(), ro.input_ids,
                                                                              ro.prompt_len), self.temperature), m)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if warming:  # no gradient at all (not a zero one): AdamW would still decay the weights
                    for p in self.opt.param_groups[0]["params"]:
                        p.grad = None
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.max_grad_norm)
                self.opt.step()
                updates += 1
                for k_, v in (("policy_loss", pl), ("entropy", ent), ("clipfrac", pstats["clipfrac"]),
                              ("approx_kl", pstats["approx_kl"])):
                    stats[k_].append(float(v.detach()))
                # early stopping (on every rank's mean, so all ranks stop together): this step has moved the
                # policy far enough from the sampler (``max_approx_kl``) or from the reference (``kl_guard``)
                with torch.no_grad():
                    seq = (kl_k3(logp.detach(), ref_logp[idx]) * m).sum(1).mean()
                far = torch.stack([pstats["approx_kl"], seq]).double()
                approx, ref_kl = (float(x) for x in self.dist.mean(far))
                if (r.max_approx_kl and approx > r.max_approx_kl) or ref_kl > guard:
                    stopped = 1
                    break
            if stopped:
                break
        t4 = time.perf_counter()
        mean_kl = float(self.dist.mean(seq_kl.mean()))
        beta = self.kl_ctl.beta
        self.kl_ctl.update(mean_kl, n * self.dist.world)
        self.step += 1
        all_raw = self.dist.gather(raw)
        local = {"ppo/response_length": float(mask.sum(1).mean()),
                 "ppo/critic_warmup": float(self.critic and self.step <= r.critic_warmup_steps),
                 "ppo/no_eos_share": float((~ro.finished).float().mean()),
                 "ppo/early_stop": float(stopped), "ppo/updates": float(updates),
                 **{f"ppo/{k_}": float(np.mean(v)) if v else float("nan") for k_, v in stats.items()},
                 "time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/prepare_s": t3 - t2,
                 "time/update_s": t4 - t3}
        means = self.dist.mean(torch.tensor(list(local.values()), dtype=torch.float64)).tolist()
        return {
            "ppo/reward": float(all_raw.mean()), "ppo/reward_std": float(all_raw.std()) if len(all_raw) > 1 else 0.0,
            "ppo/kl": mean_kl, "ppo/beta": beta, "ppo/tokens": float(self.dist.sum(mask.sum())),
            **dict(zip(local, means, strict=True)),
        }

    @torch.no_grad()
    def evaluate(self, prompts: list[str], seed: int) -> dict[str, float]:
        """Mean raw reward and per-sequence KL on held-out prompts (sampled with a fixed seed)."""
        if not prompts:
            return {}
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        rewards, kls, lengths = [], [], []
        for i in range(0, len(prompts), self.r.rollout_batch):
            batch = prompts[i:i + self.r.rollout_batch]
            ro = self.generate(batch)
            rewards.append(self.score([flatten_prompt(p) for p in ro.prompts], ro))
            logp, ref_logp, _ = self.logprobs_values(ro)
            kls.append((self.kl(logp, ref_logp) * ro.mask).sum(1))
            lengths.append(ro.mask.sum(1))
        torch.set_rng_state(state)
        return {"reward": float(torch.cat(rewards).mean()), "kl": float(torch.cat(kls).mean()),
                "response_length": float(torch.cat(lengths).mean())}

    # --------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        trainable = {k: v for k, v in self.model.state_dict().items()
                     if not self.r.lora or "lora_" in k or k.startswith("value_head")}
        return {"model": trainable, "optimizer": self.opt.state_dict(), "beta": self.kl_ctl.beta,
                "step": self.step, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=not self.r.lora)
        self.opt.load_state_dict(state["optimizer"])
        optimizer_to(self.opt, self.dist.device)
        self.kl_ctl.beta, self.step = state["beta"], state["step"]
        torch.set_rng_state(state["torch_rng"])

    def save_policy(self, path: Path) -> Path:
        lm = self.model.lm
        if self.r.lora:
            lm = copy.deepcopy(lm).merge_and_unload()
        lm.save_pretrained(path)
        self.tok.save_pretrained(path)
        return path


def train_ppo(settings: Settings, recipe: PPORecipe, dataset_ref: str, *, checkpoint_dir: str | Path | None = None,
              experiment: str = POLICY_MODEL, register_model: bool = True) -> dict[str, Any]:
    import mlflow

    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    dist = setup_distributed(recipe.device)
    torch.manual_seed(recipe.seed + dist.rank)  # ranks sample independently (DDP starts them from rank 0's weights)
    ds = open_dataset(dataset_ref, settings)
    train_prompts = split_prompts(ds, "train", recipe.prompts, recipe.seed)
    eval_prompts = split_prompts(ds, "eval", recipe.eval_prompts, recipe.seed)
    if not train_prompts:
        raise ValueError(f"dataset {dataset_ref}: no training prompts")
    if dist.main:
        use_tracking(settings, experiment)  # before resolving models:/ URIs of the reward model
    dist.barrier()  # rank 0 has created (migrated) the tracking store; the others only read from it
    if not dist.main:
        mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    lm, tok = load_causal_lm(recipe.policy)
    reward = load_registered_reward(recipe.reward_model)
    reward_version = _reward_version(recipe.reward_model)
    trainer = PPOTrainer(recipe, lm, tok, reward, dist)

    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    run_id = None
    before: dict[str, float] = {}
    state = load_checkpoint(ckpt)
    if state is not None:
        trainer.load_state_dict(state)
        run_id, before = state["run_id"], state.get("eval_before", {})
        if dist.active:
            torch.manual_seed(recipe.seed * 100_003 + trainer.step * dist.world + dist.rank)
        log.info("resuming PPO %s at step %d (MLflow run %s)", recipe.name, trainer.step, run_id)

    with tracked_run(recipe, kind="ppo", run_id=run_id, dataset=ds, main=dist.main,
                     tags={"flywheel.reward_model": recipe.reward_model,
                           "flywheel.reward_model_version": reward_version}) as run:
        if dist.main and not run_id:
            before = {f"eval/{k}_before": v for k, v in trainer.evaluate(eval_prompts, recipe.seed).items()}
            mlflow.log_metrics(before, step=0)
        history: list[dict[str, float]] = []
        rng = random.Random(recipe.seed)
        bar = StepProgress(recipe.steps, trainer.step, f"policy steps (PPO, {recipe.name})", disable=not dist.main)
        while trainer.step < recipe.steps:
            rng.seed(recipe.seed * 100_003 + trainer.step)  # the batch of a step is a function of the step
            per_step = recipe.rollout_batch // recipe.samples_per_prompt  # prompts a step
            batch = rng.sample(train_prompts, min(per_step, len(train_prompts)))
            metrics = trainer.train_step(dist.shard(batch))
            history.append(metrics)
            bar.update(1, reward=metrics["ppo/reward"], kl=metrics["ppo/kl"], length=metrics["ppo/response_length"])
            if dist.main:
                mlflow.log_metrics(metrics, step=trainer.step)
                log.info("PPO step %d: reward %.3f kl %.3f beta %.4f", trainer.step, metrics["ppo/reward"],
                         metrics["ppo/kl"], metrics["ppo/beta"])
            if dist.main and ckpt and (trainer.step % recipe.checkpoint_every == 0 or trainer.step == recipe.steps):
                save_checkpoint(ckpt, {**trainer.state_dict(), "run_id": run.info.run_id, "eval_before": before})
        bar.close()
        if not dist.main:  # rank 0 evaluates, saves and registers; the others are done
            dist.barrier()
            return PolicyResult("ppo", None, None, trainer.step)
        if dist.active:
            mlflow.log_params({"distributed.world_size": dist.world, "distributed.device": dist.device.type})
        after = {f"eval/{k}_after": v for k, v in trainer.evaluate(eval_prompts, recipe.seed).items()}
        mlflow.log_metrics(after, step=trainer.step)
        if history:
            _log_plots(history)
        out_dir = trainer.save_policy(Path(tempfile.mkdtemp(prefix="policy-")) / "policy")
        version = log_and_register_policy(out_dir, run.info.run_id, ds.version, reward_version,
                                          {**before, **after}, reference=recipe.policy) if register_model else None
        dist.barrier()
        return PolicyResult("ppo", run.info.run_id, version, trainer.step, str(out_dir), {**before, **after})


def _reward_version(uri: str) -> str:
    if not uri.startswith("models:/"):
        return uri
    from mlflow import MlflowClient

    name, _, alias = uri.removeprefix("models:/").partition("@")
    if alias:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    return uri.rsplit("/", 1)[-1]


def _log_plots(history: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow

    df = pd.DataFrame(history)
    keys = ["ppo/reward", "ppo/kl", "ppo/beta", "ppo/entropy", "ppo/response_length", "ppo/value_loss"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, k in zip(axes.flat, keys, strict=True):
        ax.plot(np.arange(1, len(df) + 1), df[k])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    mlflow.log_figure(fig, "plots/ppo.png")
    plt.close(fig)


def log_and_register_policy(policy_dir: Path, run_id: str, dataset_version: str, reward_version: str,
                            metrics: dict[str, float], reference: str = "smollm2") -> str:
    return register_challenger(POLICY_MODEL, "policy", policy_pyfunc()(), {"policy": str(policy_dir)},
                               {"dataset_version": dataset_version, "reward_model_version": reward_version,
                                "run_id": run_id, "reference": reference}, metrics)


__all__ = ["PPOTrainer", "PolicyWithValue", "train_ppo"]
