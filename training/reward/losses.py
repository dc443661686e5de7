"""Bradley-Terry reward-model objective and the evaluation statistics of a reward model. Pure torch / numpy.

Bradley-Terry: P(chosen ≻ rejected) = sigmoid(r_c - r_r). The loss is the negative log-likelihood

    L = -mean( log sigmoid(r_c - r_r - m) ) + centering * mean( (r_c + r_r)^2 )

- ``m`` (optional) is a margin the reward gap must exceed, from the dataset's ``margin`` column (the winning
  side's vote share counting the number of votes, ``(wins + 1) / (votes + 2)``, in [0.5, 1)):
  ``m = margin_scale * (2 * margin - 1)``: 1/3 of ``margin_scale`` for a single vote, 0 where the data carries no
  strength information (``margin`` 0.5, e.g. HH-RLHF), approaching ``margin_scale`` as unanimous votes add up
  (Llama 2's margin loss, with the margin taken from rater agreement).
- centering (Eisenstein et al. 2023, "auxiliary loss") pulls the mean reward of a pair towards zero so that
  rewards stay comparable across runs and PPO's reward scale does not drift; BT itself is shift-invariant.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812


def margin_from_share(share: torch.Tensor, scale: float) -> torch.Tensor:
    """The logit margin a pair must clear, from the winning side's vote share."""
    return scale * (2.0 * share - 1.0)


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
            centering: float = 0.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``weight``: each pair's weight in the mean (a pair from feedback a reviewer accepted may count more)."""
    gap = r_chosen - r_rejected
    if margin is not None:
        gap = gap - margin
    nll = -F.logsigmoid(gap)
    # a batch whose weights are all 0 (a bootstrap resample can leave a small batch out of a head) adds nothing
    loss = nll.mean() if weight is None else (weight * nll).sum() / weight.sum().clamp(min=1e-12)
    if centering:
        loss = loss + centering * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def bt_fit(delta: np.ndarray, l2: float = 1.0, iters: int = 50) -> np.ndarray:
    """The maximum a-posteriori weights ``w`` of a linear Bradley-Terry model on a few features,
    P(chosen ≻ rejected) = sigmoid(delta @ w), where ``delta`` (``[pairs, features]``) holds each pair's
    chosen-minus-rejected feature differences: Newton's method on the log-likelihood with a Gaussian prior
    ``l2 / 2 * |w|**2``, which keeps ``w`` finite where the pairs are separable."""
    d = np.asarray(delta, dtype=float).reshape(len(delta), -1)
    w = np.zeros(d.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(d @ w)))  # P(the chosen side wins) under w
        grad = d.T @ (1.0 - p) - l2 * w
        hess = (d * (p * (1.0 - p))[:, None]).T @ d + l2 * np.eye(d.shape[1])
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-9:
            break
    return w


def pairwise_accuracy(r_chosen: np.ndarray, r_rejected: np.ndarray) -> float:
    """Share of pairs where the chosen response scores strictly higher (ties count half)."""
    if len(r_chosen) == 0:
        return float("nan")
    return float(np.mean((r_chosen > r_rejected) + 0.5 * (r_chosen == r_rejected)))


def expected_calibration_error(r_chosen: np.ndarray, r_rejected: np.ndarray, bins: int = 10) -> float:
    """ECE of p = sigmoid(r_c - r_r) as the probability that the chosen side wins.

    Every pair is scored in both orders ((c, r) with outcome 1 and (r, c) with outcome 0), so the outcomes are
    balanced and a model that is always 100% sure and 80% right has ECE 0.2. Equal-width bins on [0, 1]."""
    gap = np.asarray(r_chosen, dtype=float) - np.asarray(r_rejected, dtype=float)
    if len(gap) == 0:
        return float("nan")
    p = 1.0 / (1.0 + np.exp(-np.concatenate([gap, -gap])))
    y = np.concatenate([np.ones_like(gap), np.zeros_like(gap)])
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            ece += sel.mean() * abs(p[sel].mean() - y[sel].mean())
    return float(ece)


def length_correlation(rewards: np.ndarray, lengths: np.ndarray) -> float:
    """Pearson correlation of reward with response length: high values warn of a length-hacked reward."""
    r, n = np.asarray(rewards, dtype=float), np.asarray(lengths, dtype=float)
    if len(r) < 3 or r.std() == 0 or n.std() == 0:
        return float("nan")
    return float(np.corrcoef(r, n)[0, 1])


def reward_eval(r_chosen: np.ndarray, r_rejected: np.ndarray, len_chosen: np.ndarray, len_rejected: np.ndarray) -> dict[str, float]:
    gap = np.asarray(r_chosen) - np.asarray(r_rejected)
    return {
        "accuracy": pairwise_accuracy(r_chosen, r_rejected),
        "ece": expected_calibration_error(r_chosen, r_rejected),
        "mean_margin": float(gap.mean()) if len(gap) else math.nan,
        "length_corr": length_correlation(np.concatenate([r_chosen, r_rejected]),
                                          np.concatenate([len_chosen, len_rejected])),
        "pairs": float(len(gap)),
    }
