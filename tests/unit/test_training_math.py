"""Reward-model and PPO arithmetic against small hand-computed references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.policy.ppo_math import (
    AdaptiveKLController,
    gae,
    kl_k1,
    kl_k3,
    policy_loss,
    rloo_advantages,
    token_rewards,
    value_loss,
    whiten,
)
from training.reward.losses import (
    bt_fit,
    bt_loss,
    expected_calibration_error,
    length_correlation,
    margin_from_share,
)

t = torch.tensor


def test_bradley_terry_loss_with_and_without_margin_and_centering():
    rc, rr = t([1.0]), t([0.0])
    assert bt_loss(rc, rr).item() == pytest.approx(math.log(1 + math.exp(-1.0)))  # 0.313262
    assert bt_loss(rc, rr, margin=t([0.5])).item() == pytest.approx(math.log(1 + math.exp(-0.5)))  # 0.474077
    assert bt_loss(rc, rr, centering=0.1).item() == pytest.approx(0.313262 + 0.1, abs=1e-6)
    # two pairs: the mean of -log sigmoid(gap)
    assert bt_loss(t([2.0, 0.0]), t([0.0, 1.0])).item() == pytest.approx(
        (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2)
    assert margin_from_share(t([0.5, 0.75, 1.0]), 2.0).tolist() == [0.0, 1.0, 2.0]
    # weighted: a reviewed pair weighted 3 counts as three unreviewed ones
    three = bt_loss(t([2.0, 0.0, 0.0, 0.0]), t([0.0, 1.0, 1.0, 1.0])).item()
    assert bt_loss(t([2.0, 0.0]), t([0.0, 1.0]), weight=t([1.0, 3.0])).item() == pytest.approx(three)


def test_a_bradley_terry_fit_on_a_few_features_recovers_their_weights():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20_000, 2))
    won = rng.random(len(x)) < 1 / (1 + np.exp(-(x @ np.array([2.0, -0.5]))))
    delta = np.where(won[:, None], x, -x)  # each pair oriented chosen minus rejected
    assert bt_fit(delta, l2=1e-6) == pytest.approx([2.0, -0.5], abs=0.08)
    # separable pairs: the prior keeps the weight finite, and more pairs move it further
    assert 0 < bt_fit(np.ones((10, 1)))[0] < bt_fit(np.ones((100, 1)))[0] < 10


def test_expected_calibration_error_of_an_overconfident_model():
    gaps = np.array([100.0, 100, 100, 100, -100])  # always certain, right 4 times in 5
    assert expected_calibration_error(gaps, np.zeros(5)) == pytest.approx(0.2)
    assert expected_calibration_error(np.zeros(4), np.zeros(4)) == pytest.approx(0.0)  # p = 0.5, half right
    assert length_correlation(np.array([1.0, 2, 3]), np.array([10, 20, 30])) == pytest.approx(1.0)


def test_kl_estimators():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))  # 0.693147
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 - 1 + math.log(2))  # 0.193147
    assert kl_k3(ref, ref).item() == 0.0 and kl_k3(ref, logp).item() > 0  # never negative


def test_gae_hand_computed():
    r, v, m = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.5, 0.5]]), torch.ones(1, 3)
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.5])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.02875, 0.175, 0.5])
    assert ret[0].tolist() == pytest.approx([0.52875, 0.675, 1.0])
    # padding after the end carries no value and no advantage
    adv, _ = gae(t([[0.0, 1.0, 0.0]]), t([[0.5, 0.5, 9.0]]), t([[1.0, 1.0, 0.0]]), gamma=0.9, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.175, 0.5, 0.0])


def test_token_rewards_put_the_score_on_the_last_real_token():
    out = token_rewards(t([2.0]), t([[0.1, 0.2, 0.3]]), t([[1.0, 1.0, 0.0]]), beta=0.5)
    assert out[0].tolist() == pytest.approx([-0.05, 1.9, 0.0])


def test_adaptive_kl_controller_update():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(9.0, 100) == pytest.approx(0.1002)  # error clipped to +0.2
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(3.0, 100) == pytest.approx(0.0998)  # error clipped to -0.2
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(6.6, 1000) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    c = AdaptiveKLController(0.1, target=6.0, horizon=32, min_beta=0.1)
    assert c.update(3.0, 8) == 0.1  # 0.1 x (1 - 0.2 x 8/32) = 0.095 is below the floor
    assert c.update(9.0, 8) == pytest.approx(0.105)


def test_reward_whitening():
    out = whiten(t([1.0, 2.0, 3.0, 4.0]))
    assert out.tolist() == pytest.approx([-1.161895, -0.387298, 0.387298, 1.161895], abs=1e-5)
    masked = whiten(t([1.0, 2.0, 3.0, 4.0, 100.0]), mask=t([1.0, 1, 1, 1, 0]))
    assert masked[:4].tolist() == pytest.approx(out.tolist(), abs=1e-5)
    assert whiten(t([1.0, 3.0]), shift_mean=False).tolist() == pytest.approx([2 - 0.707107, 2 + 0.707107], abs=1e-5)


def test_clipped_surrogate_and_value_losses():
    m = torch.ones(1, 2)
    loss, stats = policy_loss(t([[0.0, 0.0]]), t([[0.0, 0.0]]), t([[1.0, -3.0]]), m, clip=0.2)
    assert loss.item() == pytest.approx(1.0) and stats["clipfrac"].item() == 0.0
    loss, stats = policy_loss(t([[math.log(1.5)]]), t([[0.0]]), t([[1.0]]), torch.ones(1, 1), clip=0.2)
    assert loss.item() == pytest.approx(-1.2) and stats["clipfrac"].item() == 1.0
    # value moved from 0 to 1 with clip 0.2: clipped prediction 0.2; return 2 -> max(1, 3.24) / 2
    assert value_loss(t([[1.0]]), t([[0.0]]), t([[2.0]]), torch.ones(1, 1), clip=0.2).item() == pytest.approx(1.62)


def test_rloo_advantages_hand_computed():
    # two prompts, three answers each: each answer minus the mean of its prompt's other two
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    want = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    assert torch.allclose(rloo_advantages(rewards, 3), want)
    grouped = rewards.reshape(2, 3)  # = k/(k-1) x (reward - the prompt's mean): each prompt's advantages sum to 0
    assert torch.allclose(rloo_advantages(rewards, 3), (1.5 * (grouped - grouped.mean(1, keepdim=True))).reshape(-1))
    with pytest.raises(ValueError):
        rloo_advantages(rewards, 1)


def test_k3_clamps_the_log_ratio():
    logp, ref = torch.tensor([0.0, -0.1]), torch.tensor([-40.0, -0.2])
    got = kl_k3(logp, ref)
    assert got[0] == pytest.approx(math.expm1(-10.0) + 10.0)  # d = 40 clamped to 10
    assert got[1] == pytest.approx(math.expm1(-0.1) + 0.1, rel=1e-5)
