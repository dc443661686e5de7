"""The arithmetic of PPO for language models, as small pure functions (each checked against hand-computed
numbers in ``tests/unit/test_training_math.py``). :mod:`training.policy.ppo` puts them together.

Per token t of a sampled response (state = prompt + tokens so far, action = the next token):

- KL estimators of KL(π ‖ π_ref) from the log-ratio ``d = log π(a) - log π_ref(a)`` of the sampled token
  (Schulman, "Approximating KL divergence"): ``k1 = d`` (unbiased, can be negative per token) and
  ``k3 = exp(-d) - 1 + d`` (unbiased, always >= 0, lower variance; ``d`` clamped to ±10). Every
  log-probability is of the distribution the tokens were sampled from: ``log_softmax(logits / T)``.
- RLOO (the CPU default): k answers a prompt, the sequence reward ``R = score - β Σ_t kl_t``, and each answer's
  advantage ``R_i - mean_{j≠i} R_j`` on every one of its tokens.
- Reward per token: ``r_t = -β · kl_t`` for every token, plus the (whitened, clipped) sequence reward on the
  last token (InstructGPT / Ziegler et al. 2019).
- Advantages by GAE: ``δ_t = r_t + γ V_{t+1} - V_t``, ``A_t = Σ (γλ)^k δ_{t+k}``, returns ``A_t + V_t``.
- Policy loss: the clipped surrogate ``-min(ρ A, clip(ρ, 1-ε, 1+ε) A)`` with ``ρ = exp(log π - log π_old)``;
  value loss: ``½ max((V - R)², (clip(V, V_old ± ε_v) - R)²)``; an entropy bonus.
- The adaptive KL controller (Ziegler et al.): ``β ← β (1 + clip(KL / target - 1, -0.2, 0.2) · n / horizon)``,
  never below ``min_beta``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor, clamp: float = 10.0) -> torch.Tensor:
    """k3 with the log-ratio clamped to ±``clamp`` (as OpenRLHF clamps it): one token the reference finds
    nearly impossible would otherwise give exp(20) and swamp a batch's reward and gradient."""
    d = (logp - ref_logp).clamp(-clamp, clamp)
    return torch.expm1(-d) + d


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, as TRL's RLOOTrainer): rows ``i*k .. i*k+k-1`` answer
    the same prompt; each answer's advantage is its reward minus the mean reward of the prompt's other
    ``k - 1`` answers. An unbiased baseline that costs no critic and no extra forward pass."""
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 answers a prompt, got {k}")
    grouped = rewards.reshape(-1, k)
    others = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others).reshape(-1)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8,
           all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over the (masked) elements; ``shift_mean=False`` keeps the mean (used for advantages'
    scale only where the sign must survive). Uses the unbiased variance, like TRL and OpenAI's lm-human-prefs.
    ``all_sum`` turns each local sum into the sum over every process (data-parallel training), so the mean and
    variance are those of the whole batch."""
    total = all_sum or (lambda t: t)
    if mask is None:
        mask = torch.ones_like(x)
    n = total(mask.sum())
    mean = total((x * mask).sum()) / n
    var = total((((x - mean) ** 2) * mask).sum()) / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """``-β·kl`` on every response token and the sequence score added on each row's last real token."""
    rewards = -beta * kl * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()  # the last token with mask 1
    return rewards + last.float() * score[:, None]


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns, right to left over each row; tokens with mask 0 (padding after the end)
    have no value and no reward."""
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_v = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -adv * ratio, -adv * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKLController:
    """Ziegler et al. 2019: move β so that the measured KL tracks ``target``; ``horizon`` sets the speed."""

    def __init__(self, init_beta: float, target: float, horizon: int, min_beta: float = 0.0):
        self.beta, self.target, self.horizon, self.min_beta = init_beta, target, horizon, min_beta

    def update(self, kl: float, n_steps: int) -> float:
        error = max(-0.2, min(0.2, kl / self.target - 1.0))
        self.beta = max(self.min_beta, self.beta * (1.0 + error * n_steps / self.horizon))
        return self.beta


class FixedKLController:
    def __init__(self, beta: float):
        self.beta = beta

    def update(self, kl: float, n_steps: int) -> float:  # noqa: ARG002
        return self.beta
