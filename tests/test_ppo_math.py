"""Hand-computed checks of `rlaif.policy_training.ppo_math` (GAE, whitening, KL, losses, baselines).

Each table row carries the arithmetic in its comment, so a failing case can be re-derived
by hand. The vectorized GAE is also checked against a slow reverse-loop reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlaif.policy_training.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    explained_variance,
    group_usable_mask,
    grpo_advantages,
    kl_k1,
    kl_k3,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_token_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    value_loss,
)

T = torch.tensor


def gae_reference(rewards, values, mask, gamma, lam):
    """The textbook reverse loop, one sequence at a time, over the real tokens only."""
    B, _ = rewards.shape
    adv = torch.zeros_like(rewards)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    returns = torch.where(mask, adv + values, torch.zeros_like(values))
    return adv, returns


# ----------------------------------------------------------------------------- GAE

GAE_CASES = [
    # deltas = [0+0.6-0.5, 0+0.7-0.6, 1+0-0.7] = [0.1, 0.1, 0.3];
    # A2 = 0.3, A1 = 0.1 + 0.5*0.3 = 0.25, A0 = 0.1 + 0.5*0.25 = 0.225
    ([0, 0, 1], [0.5, 0.6, 0.7], 1.0, 0.5, [0.225, 0.25, 0.3]),
    # gamma=0.5, lam=1: deltas = [1 + 0.5*0 - 0, 2 - 0] = [1, 2]; A0 = 1 + 0.5*2 = 2
    ([1, 2], [0, 0], 0.5, 1.0, [2.0, 2.0]),
    # lam=0: A_t = delta_t = [1 + 1*2 - 1, 2 + 3 - 2, 3 + 0 - 3] = [2, 3, 0]
    ([1, 2, 3], [1, 2, 3], 1.0, 0.0, [2.0, 3.0, 0.0]),
    # gamma=lam=1: Monte-Carlo return minus value: [6-1, 5-1, 3-1]
    ([1, 2, 3], [1, 1, 1], 1.0, 1.0, [5.0, 4.0, 2.0]),
    # single token: A = r - V = 1 - 0.25
    ([1], [0.25], 1.0, 0.95, [0.75]),
]


@pytest.mark.parametrize("rewards,values,gamma,lam,expected", GAE_CASES)
def test_gae_hand_examples(rewards, values, gamma, lam, expected):
    r, v = T([rewards], dtype=torch.float32), T([values], dtype=torch.float32)
    mask = torch.ones_like(r, dtype=torch.bool)
    adv, ret = compute_gae(r, v, mask, gamma, lam)
    torch.testing.assert_close(adv, T([expected]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, T([expected]) + v, atol=1e-6, rtol=0)


def test_gae_ignores_padding_values_and_rewards():
    # The first case above, right-padded with garbage (a huge value, NaN reward) that must not leak in:
    # the last real token still bootstraps from V = 0.
    r = T([[0.0, 0.0, 1.0, float("nan"), 5.0]])
    v = T([[0.5, 0.6, 0.7, 1e6, float("nan")]])
    mask = T([[True, True, True, False, False]])
    adv, ret = compute_gae(r, v, mask, 1.0, 0.5)
    torch.testing.assert_close(adv, T([[0.225, 0.25, 0.3, 0.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ret, T([[0.725, 0.85, 1.0, 0.0, 0.0]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
def test_gae_vectorized_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, L = 6, 17
    rewards = torch.randn(B, L, generator=g)
    values = torch.randn(B, L, generator=g)
    lengths = T([17, 1, 5, 16, 9, 2])
    mask = torch.arange(L)[None, :] < lengths[:, None]
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ref_ret, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- masked statistics


def test_masked_stats_and_whitening():
    x = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[True, True, True, False]])
    # mean of 1, 2, 3 = 2; unbiased var = ((-1)^2 + 0 + 1^2) / 2 = 1; the 100 is padding
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(1.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    torch.testing.assert_close(masked_whiten(x, mask), T([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    # shift_mean=False rescales but keeps the mean: (x - 2)/1 + 2
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), T([[1.0, 2.0, 3.0, 0.0]]), atol=1e-6, rtol=0)


def test_masked_whiten_with_all_sum_uses_the_statistics_of_every_part():
    # Two processes holding identical halves: all_sum doubles every local sum, and the result
    # must be the whitening of the concatenated batch (n = 6 values, Bessel divisor 5, not 2).
    x = T([[1.0, 2.0, 7.0, 100.0], [4.0, -3.0, 0.0, 0.0]])
    mask = T([[True, True, True, False], [True, False, False, False]])
    whole = masked_whiten(torch.cat([x, x]), torch.cat([mask, mask]))[:2]
    torch.testing.assert_close(masked_whiten(x, mask, all_sum=lambda t: 2 * t), whole)
    # values 1, 2, 7, 4 twice: mean 3.5, var = 2 * (6.25 + 2.25 + 12.25 + 0.25) / 7 = 6
    torch.testing.assert_close(whole[0, 0], T((1.0 - 3.5) / math.sqrt(6.0)))


def test_masked_token_mean_parts_add_up_to_the_whole():
    # 6 real tokens: 1 + 2 + 3 in row 0, 10 + 20 in row 1, 4 in row 2 -> token mean 40 / 6.
    x = T([[1.0, 2.0, 3.0], [10.0, 20.0, float("nan")], [4.0, 0.0, 0.0]])
    mask = T([[True, True, True], [True, True, False], [True, False, False]])
    assert masked_token_mean(x, mask).item() == pytest.approx(40 / 6)  # default: its own tokens
    parts = [masked_token_mean(x[rows], mask[rows], num_tokens=6) for rows in ([0], [1, 2])]
    assert sum(p.item() for p in parts) == pytest.approx(40 / 6)
    assert masked_token_mean(x, torch.zeros_like(mask), num_tokens=0).item() == 0.0  # no tokens: 0, not NaN


@pytest.mark.parametrize("loss_fn", ["policy", "value"])
def test_losses_split_into_parts_give_the_whole_loss_and_gradient(loss_fn):
    # Rows of 1, 3 and 2 tokens, ratios and values on both sides of the clip range.
    mask = T([[True, False, False], [True, True, True], [True, True, False]])
    new = T([[0.3, 9.0, 9.0], [-0.5, 0.05, 0.1], [0.0, -0.2, 9.0]])
    old = torch.zeros(3, 3)
    target = T([[1.0, 0.0, 0.0], [-2.0, 0.5, 3.0], [0.25, -1.0, 0.0]])

    def run(rows: list[int], num_tokens: float | None) -> tuple[torch.Tensor, dict, torch.Tensor]:
        leaf = new.clone().requires_grad_(True)
        if loss_fn == "policy":
            loss, stats = policy_loss(leaf[rows], old[rows], target[rows], mask[rows], 0.2, num_tokens)
        else:
            loss, stats = value_loss(leaf[rows], old[rows], target[rows], mask[rows], 0.2, num_tokens)
        loss.backward()
        return loss.detach(), stats, leaf.grad

    whole, whole_stats, whole_grad = run([0, 1, 2], None)
    parts = [run(rows, num_tokens=6) for rows in ([0], [1, 2])]
    torch.testing.assert_close(sum(p[0] for p in parts), whole)
    torch.testing.assert_close(sum(p[2] for p in parts), whole_grad)
    for key, value in whole_stats.items():
        torch.testing.assert_close(sum(p[1][key] for p in parts), value)


def test_masked_mean_tolerates_nan_in_padding_and_empty_masks():
    x = T([[1.0, float("nan")], [3.0, float("inf")]])
    mask = T([[True, False], [True, False]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)  # (1 + 3) / 2
    torch.testing.assert_close(masked_mean(x, mask, dim=1), T([1.0, 3.0]))
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0  # empty selection: 0, not NaN


# ----------------------------------------------------------------------------- KL estimators

KL_CASES = [
    # pi = 0.5, ref = 0.25: k1 = log 2; k3 with r = ref/pi = 0.5: (0.5 - 1) - log 0.5 = log 2 - 0.5
    (0.5, 0.25, math.log(2), math.log(2) - 0.5),
    # pi = 0.25, ref = 0.5: k1 = -log 2 (k1 can be negative); k3: r = 2 -> (2 - 1) - log 2
    (0.25, 0.5, -math.log(2), 1 - math.log(2)),
    # identical: both 0
    (0.3, 0.3, 0.0, 0.0),
]


@pytest.mark.parametrize("p,ref,k1,k3", KL_CASES)
def test_kl_estimators_hand_values(p, ref, k1, k3):
    lp, lr = T([math.log(p)]), T([math.log(ref)])
    assert kl_k1(lp, lr).item() == pytest.approx(k1, abs=1e-6)
    assert kl_k3(lp, lr).item() == pytest.approx(k3, abs=1e-6)
    assert kl_penalty(lp, lr, "k1").item() == pytest.approx(k1, abs=1e-6)
    assert kl_penalty(lp, lr, "k3").item() == pytest.approx(k3, abs=1e-6)


def test_kl_estimators_are_unbiased_and_k3_nonnegative():
    # E_{x~pi}[k] over the whole support must equal the exact KL(pi || ref) for both estimators.
    pi = torch.softmax(T([0.3, -1.0, 2.0, 0.0]), 0)
    ref = torch.softmax(T([1.0, 0.5, -0.5, 0.2]), 0)
    exact = (pi * (pi.log() - ref.log())).sum()
    assert (pi * kl_k1(pi.log(), ref.log())).sum().item() == pytest.approx(exact.item(), abs=1e-6)
    assert (pi * kl_k3(pi.log(), ref.log())).sum().item() == pytest.approx(exact.item(), abs=1e-6)
    assert (kl_k3(pi.log(), ref.log()) >= 0).all()
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(pi, ref, "k2")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- policy loss

PG_CASES = [
    # ratio 1, A = 2: loss = -2, nothing clipped
    (1.0, 2.0, -2.0, 0.0),
    # ratio 1.5, A = +1: pg1 = -1.5, pg2 = -1.2 -> max = -1.2, the clipped branch is active
    (1.5, 1.0, -1.2, 1.0),
    # ratio 1.5, A = -1: pg1 = 1.5, pg2 = 1.2 -> max = 1.5, pessimistic: no clipping of a bad move
    (1.5, -1.0, 1.5, 0.0),
    # ratio 0.5, A = +1: pg1 = -0.5, pg2 = -0.8 -> max = -0.5, unclipped
    (0.5, 1.0, -0.5, 0.0),
    # ratio 0.5, A = -1: pg1 = 0.5, pg2 = 0.8 -> max = 0.8, clipped
    (0.5, -1.0, 0.8, 1.0),
]


@pytest.mark.parametrize("ratio,adv,loss,clipfrac", PG_CASES)
def test_policy_loss_clipping(ratio, adv, loss, clipfrac):
    old = T([[math.log(0.4)]])
    new = (old + math.log(ratio)).requires_grad_(True)
    mask = T([[True]])
    out, stats = policy_loss(new, old, T([[adv]]), mask, clip_range=0.2)
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert stats["clipfrac"].item() == clipfrac
    # approx_kl = (ratio - 1) - log ratio
    assert stats["approx_kl"].item() == pytest.approx((ratio - 1) - math.log(ratio), abs=1e-6)
    out.backward()
    # d/dlogp of -A*ratio is -A*ratio when unclipped; the clipped branch carries no gradient
    expected_grad = 0.0 if clipfrac else -adv * ratio
    assert new.grad.item() == pytest.approx(expected_grad, abs=1e-6)


def test_policy_loss_ignores_padding_and_tokens_after_eos():
    # Token 0 is real (ratio 1, A = 1 -> loss -1). Positions 1-2 are after EOS / padding with
    # absurd values that would dominate if they leaked into the mean or the gradient.
    old = T([[-1.0, -1.0, -1.0]])
    new = T([[-1.0, 40.0, -1.0]], requires_grad=True)
    adv = T([[1.0, 1e6, -1e6]])
    mask = T([[True, False, False]])
    loss, stats = policy_loss(new, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-1.0)
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    torch.testing.assert_close(new.grad, T([[-1.0, 0.0, 0.0]]))


def test_policy_loss_is_token_mean_over_the_batch():
    # Two sequences of lengths 1 and 3, ratio 1, advantages 4 and 0: token mean = -(4 + 0+0+0)/4 = -1
    lp = torch.zeros(2, 3)
    adv = T([[4.0, 9.0, 9.0], [0.0, 0.0, 0.0]])
    mask = T([[True, False, False], [True, True, True]])
    loss, _ = policy_loss(lp, lp, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- value loss

VALUE_CASES = [
    # inside the clip range: 0.5 * (0.1 - 1)^2 = 0.405
    (0.1, 0.0, 1.0, 0.405, 0.0),
    # V moved 0.5 from old 0, clipped to 0.2: max((0.5-1)^2, (0.2-1)^2) = 0.64 -> 0.32, clipped branch active
    (0.5, 0.0, 1.0, 0.32, 1.0),
    # V = 1.5 from old 1.0, target 0: unclipped 2.25 vs clipped (1.2)^2 = 1.44 -> max 2.25 -> 1.125
    (1.5, 1.0, 0.0, 1.125, 0.0),
    # V = -0.5 from old 0, target 0: unclipped 0.25 vs clipped 0.04 -> 0.125
    (-0.5, 0.0, 0.0, 0.125, 0.0),
]


@pytest.mark.parametrize("value,old,ret,loss,clipfrac", VALUE_CASES)
def test_value_loss_clipping(value, old, ret, loss, clipfrac):
    out, stats = value_loss(T([[value]]), T([[old]]), T([[ret]]), T([[True]]), clip_range_value=0.2)
    assert out.item() == pytest.approx(loss, abs=1e-6)
    assert stats["vf_clipfrac"].item() == clipfrac


def test_value_loss_masks_padding():
    values = T([[0.1, 50.0]], requires_grad=True)
    out, _ = value_loss(values, T([[0.0, 0.0]]), T([[1.0, -50.0]]), T([[True, False]]), 0.2)
    assert out.item() == pytest.approx(0.405, abs=1e-6)
    out.backward()
    # d/dV 0.5*(V - R)^2 = V - R = -0.9 on the real token, 0 on padding
    torch.testing.assert_close(values.grad, T([[-0.9, 0.0]]))


# ----------------------------------------------------------------------------- entropy, logprobs, EV

ENTROPY_CASES = [
    ([0.0, 0.0, 0.0, 0.0], math.log(4)),  # uniform over 4
    ([0.0, math.log(3)], -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))),  # p = [0.25, 0.75]
    ([100.0, 0.0, 0.0], 0.0),  # (nearly) one-hot: no NaN from log(0)
]


@pytest.mark.parametrize("logits,expected", ENTROPY_CASES)
def test_entropy_from_logits(logits, expected):
    assert entropy_from_logits(T([[logits]])).item() == pytest.approx(expected, abs=1e-5)


def test_logprobs_from_logits_gathers_the_token():
    logits = T([[[0.0, math.log(3)], [0.0, 0.0]]])  # position 0: p = [0.25, 0.75]; position 1: [0.5, 0.5]
    out = logprobs_from_logits(logits, T([[1, 0]]))
    torch.testing.assert_close(out, T([[math.log(0.75), math.log(0.5)]]))


def test_explained_variance():
    y = T([[1.0, 2.0, 3.0, 4.0, 99.0]])
    mask = T([[True, True, True, True, False]])
    assert explained_variance(y, y, mask).item() == pytest.approx(1.0)  # perfect critic
    assert explained_variance(torch.full_like(y, 2.5), y, mask).item() == pytest.approx(0.0)  # predicts the mean
    # predicting 0 everywhere: var(y - 0) / var(y) = 1 -> 0 as well (variance ignores the offset)
    assert explained_variance(torch.zeros_like(y), y, mask).item() == pytest.approx(0.0)
    # anti-correlated prediction: residual y - (5 - y) = 2y - 5 has 4x the variance -> 1 - 4 = -3
    assert explained_variance(5 - y, y, mask).item() == pytest.approx(-3.0)


# ----------------------------------------------------------------------------- KL controllers

ADAPTIVE_CASES = [
    # KL = 2x target: error clipped from 1.0 to 0.2; beta *= 1 + 0.2 * 1000/10000 = 1.02
    (12.0, 1000, 0.102),
    # on target: unchanged
    (6.0, 1000, 0.1),
    # KL = 0.5x target: error -0.5 clipped to -0.2 -> 0.98
    (3.0, 1000, 0.098),
    # KL = 1.1x target: error 0.1 -> 1 + 0.1 * 0.1 = 1.01
    (6.6, 1000, 0.101),
    # non-finite KL (e.g. every sample skipped): no change
    (float("nan"), 1000, 0.1),
]


@pytest.mark.parametrize("kl,n,expected", ADAPTIVE_CASES)
def test_adaptive_kl_controller(kl, n, expected):
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(kl, n)
    assert ctl.value == pytest.approx(expected)
    restored = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 10_000)
    assert ctl.value == 0.05


# ----------------------------------------------------------------------------- group baselines

RLOO_CASES = [
    # group [1, 2, 3]: baselines are the peers' means [2.5, 2, 1.5] -> [-1.5, 0, 1.5]
    ([1.0, 2.0, 3.0], 3, None, [-1.5, 0.0, 1.5]),
    # two groups of 2: baseline is the other sample -> [1-5, 5-1, 0, 0]
    ([1.0, 5.0, 2.0, 2.0], 2, None, [-4.0, 4.0, 0.0, 0.0]),
    # third sample missing: group of [1, 2] -> [-1, 1], the missing one gets 0
    ([1.0, 2.0, 100.0], 3, [True, True, False], [-1.0, 1.0, 0.0]),
    # only one valid sample in the group: no peer, no baseline -> 0
    ([1.0, 7.0, 3.0], 3, [False, True, False], [0.0, 0.0, 0.0]),
]


@pytest.mark.parametrize("rewards,g,valid,expected", RLOO_CASES)
def test_rloo_advantages(rewards, g, valid, expected):
    v = None if valid is None else T(valid)
    torch.testing.assert_close(rloo_advantages(T(rewards), g, v), T(expected))


GRPO_CASES = [
    # mean 2, unbiased std 1 -> [-1, 0, 1] / (1 + 1e-4)
    ([1.0, 2.0, 3.0], 3, None, True, [-1 / 1.0001, 0.0, 1 / 1.0001]),
    # all equal: std 0, eps keeps it at 0 instead of 0/0
    ([5.0, 5.0], 2, None, True, [0.0, 0.0]),
    # no std scaling (Dr. GRPO): only centering
    ([1.0, 2.0, 3.0], 3, None, False, [-1.0, 0.0, 1.0]),
    # missing third sample: group [1, 3], mean 2, std sqrt(2) -> +-1/sqrt(2), missing -> 0
    ([1.0, 3.0, 100.0], 3, [True, True, False], True,
     [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4), 0.0]),
]


@pytest.mark.parametrize("rewards,g,valid,scale,expected", GRPO_CASES)
def test_grpo_advantages(rewards, g, valid, scale, expected):
    v = None if valid is None else T(valid)
    torch.testing.assert_close(grpo_advantages(T(rewards), g, v, scale_by_std=scale), T(expected))


def test_group_usable_mask():
    valid = T([True, True, False, False, True, False])
    # group 1 has two valid members, group 2 only one (no peer)
    torch.testing.assert_close(group_usable_mask(valid, 3), T([True, True, False, False, False, False]))


def test_group_functions_reject_bad_shapes():
    with pytest.raises(AssertionError, match="groups of 3"):
        rloo_advantages(torch.zeros(4), 3)
    with pytest.raises(AssertionError, match="group_size >= 2"):
        grpo_advantages(torch.zeros(4), 1)
