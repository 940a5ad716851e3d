"""The arithmetic of policy-gradient fine-tuning, as pure tensor functions.

Everything here is stateless (except the small KL controllers) and has no idea what a
language model is, so each piece is tested on hand-computed numbers in
`tests/test_ppo_math.py`. The trainer in `ppo.py` only glues these together.

Papers followed:
- GAE: Schulman et al. 2015, "High-Dimensional Continuous Control Using Generalized
  Advantage Estimation" (arXiv 1506.02438).
- Clipped surrogate and value clipping: Schulman et al. 2017, "Proximal Policy
  Optimization Algorithms" (arXiv 1707.06347).
- Per-token KL penalty in the reward and the adaptive KL coefficient: Ziegler et al. 2019,
  "Fine-Tuning Language Models from Human Preferences" (arXiv 1909.08593).
- KL estimators k1/k3: J. Schulman, "Approximating KL Divergence" (2020 note).
- RLOO baseline: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
  Optimization for Learning from Human Feedback in LLMs" (arXiv 2402.14740).
- GRPO group-normalized advantage: Shao et al. 2024, "DeepSeekMath" (arXiv 2402.03300).

Conventions: `B` = sequences in a batch, `T` = response positions, `V` = vocabulary,
`G` = samples per prompt. Masks are boolean (B, T), True on real response tokens (up to
and including the first EOS); padding and tokens after EOS are False. Masked positions may
hold garbage (even NaN): every reduction selects with `torch.where` rather than
multiplying by the mask, because `nan * 0` is still NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k3"]


# ----------------------------------------------------------------------------- masked stats


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is True (over everything, or along `dim`)."""
    picked = torch.where(_as_bool(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over True positions. An empty selection gives 0, not NaN."""
    mask = _as_bool(mask)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_token_mean(x: Tensor, mask: Tensor, num_tokens: Tensor | float | None = None) -> Tensor:
    """This chunk's share of a token mean over `num_tokens` tokens: sum of `x` over `mask` / num_tokens.

    A minibatch split into micro-batches (gradient accumulation) or across processes (data
    parallel) must be averaged over *all* its tokens, not as a mean of per-chunk means: those
    weight a token in a short chunk more than one in a long chunk. Give every chunk the
    minibatch's token count and the chunks' results add up to the minibatch's token mean.
    `None` = the tokens of `mask` itself, i.e. `masked_mean(x, mask)`; a count of 0 gives 0.
    """
    if num_tokens is None:
        return masked_mean(x, mask)
    total = torch.as_tensor(num_tokens, dtype=x.dtype, device=x.device).clamp(min=1)
    return masked_sum(x, mask) / total


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` over True positions (Bessel-corrected by default)."""
    mask = _as_bool(mask)
    mean = masked_mean(x, mask)
    centered_sq = (x - mean) ** 2
    var = masked_mean(centered_sq, mask)
    if unbiased:
        count = mask.sum()
        assert count > 1, f"unbiased variance needs at least 2 selected values, got {int(count)}"
        var = var * count / (count - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Normalize `x` to zero mean / unit variance over the masked positions.

    Statistics come from real tokens only: counting padding would drag the mean toward 0.
    With `shift_mean=False` only the scale changes (used by some implementations for
    rewards, where the sign carries meaning). Masked positions come back as 0.

    `all_sum` sums a tensor over every process holding part of the batch (data parallel:
    `DistContext.sum_across`); the mean and the (Bessel-corrected) variance are then those
    of the whole batch, so each process's part is normalized exactly as it would be in one
    process holding everything. Default: this process's `x` is the whole batch.
    """
    mask = _as_bool(mask)
    if all_sum is None:
        all_sum = _identity
    count = all_sum(mask.sum()).to(x.dtype)
    mean = all_sum(masked_sum(x, mask)) / count.clamp(min=1)
    centered_sq_sum = all_sum(masked_sum((x - mean) ** 2, mask))
    var = centered_sq_sum / (count - 1).clamp(min=1)  # one value: its spread is 0, not 0/0
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))


def _identity(x: Tensor) -> Tensor:
    return x


# ----------------------------------------------------------------------------- GAE


def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015), vectorized over time.

    rewards, values, mask: (B, T). Each row's mask must be a contiguous prefix (a response
    is right-padded); the episode ends after its last True position, so V(s_T) = 0 there.

    Returns (advantages, returns), both (B, T) and 0 on masked positions, with
    returns = advantages + values (the value-function target).

    Note on the vectorization: the usual implementation is a reverse Python loop
    `A_t = delta_t + gamma*lam*A_{t+1}`. That recurrence unrolls to
    `A_t = sum_{k>=t} (gamma*lam)^(k-t) * delta_k`, i.e. `A = delta @ D` with the
    triangular discount matrix `D[k, t] = (gamma*lam)^(k-t)` for k >= t (0 above the diagonal). One (T, T) matrix
    and one matmul replace T sequential kernel launches; for response lengths used in LM
    fine-tuning (T up to a few thousand) D is a few MB. Powers of gamma*lam < 1 underflow to 0
    for very long gaps, which is the exact limit anyway. Zeroing rewards and values beyond the
    mask makes delta = 0 there, so padding contributes nothing and the last real token sees
    V_next = 0 (the episode ends at EOS).
    """
    assert rewards.shape == values.shape == mask.shape, (
        f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask {tuple(mask.shape)} must match")
    mask = _as_bool(mask)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(mask, rewards, zero)  # (B, T)
    values = torch.where(mask, values, zero)  # (B, T)
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # (B, T)
    deltas = rewards + gamma * next_values - values  # (B, T)

    T = rewards.shape[1]
    idx = torch.arange(T, device=rewards.device)
    exponent = (idx[:, None] - idx[None, :]).clamp(min=0).to(values.dtype)  # (T, T): k - t
    # torch.pow(0., 0.) == 1, so lam*gamma == 0 still gives A_t = delta_t.
    discount = torch.tril(torch.pow(torch.tensor(gamma * lam, dtype=values.dtype, device=values.device), exponent))
    advantages = deltas @ discount  # (B, T) @ (T, T) -> (B, T)
    advantages = torch.where(mask, advantages, zero)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


# ----------------------------------------------------------------------------- KL


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k1 estimate of KL(pi || ref): log pi(x) - log ref(x) for x ~ pi.

    Unbiased but can be negative for a single token; this is the Ziegler et al. 2019 penalty.
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || ref): (r - 1) - log r with r = ref(x)/pi(x).

    Unbiased and always >= 0 (lower variance than k1); GRPO uses it as a loss term.
    """
    log_r = ref_logprobs - logprobs
    return torch.expm1(log_r) - log_r


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token KL estimate chosen by name ("k1" or "k3"). (B, T) -> (B, T)."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"unknown KL estimator {estimator!r}; use 'k1' or 'k3'")


# ----------------------------------------------------------------------------- losses


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float,
                num_tokens: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), averaged over real tokens.

    All inputs (B, T). `old_logprobs` and `advantages` are constants from the rollout.
    Minimizing max(pg_loss1, pg_loss2) is maximizing the pessimistic min of the
    unclipped and clipped objectives: the update gains nothing by pushing the ratio
    beyond 1 +/- clip_range in the direction the advantage favours.

    stats (no grad): `approx_kl` (k3 estimate of KL(old || new), the "how far did this
    update move" diagnostic), `clipfrac` (share of tokens where the clipped branch is the
    active one), `ratio_mean`.

    `num_tokens`: the token count of the whole minibatch when these rows are one micro-batch
    (or one process's part) of it; loss and stats are then this part's share of the
    minibatch token mean (`masked_token_mean`), so the parts add up to it.
    """
    mask = _as_bool(mask)
    logratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(logratio)  # (B, T)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_token_mean(torch.max(pg_loss1, pg_loss2), mask, num_tokens)
    with torch.no_grad():
        stats = {
            "approx_kl": masked_token_mean((ratio - 1.0) - logratio, mask, num_tokens),
            "clipfrac": masked_token_mean((pg_loss2 > pg_loss1).to(logprobs.dtype), mask, num_tokens),
            "ratio_mean": masked_token_mean(ratio, mask, num_tokens),
        }
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float,
               num_tokens: Tensor | float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, 0.5 * max((V - R)^2, (V_clipped - R)^2) over real tokens.

    V_clipped keeps the new value within clip_range_value of the rollout-time value, so a
    single noisy batch cannot move the critic far (the PPO2 baselines trick; TRL and
    OpenRLHF keep it for LMs, where the critic starts from an LM trunk and is easily
    knocked off). `num_tokens` as in `policy_loss`.
    """
    mask = _as_bool(mask)
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    v_loss_unclipped = (values - returns) ** 2  # (B, T)
    v_loss_clipped = (v_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_token_mean(torch.max(v_loss_unclipped, v_loss_clipped), mask, num_tokens)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_token_mean((v_loss_clipped > v_loss_unclipped).to(values.dtype), mask,
                                                  num_tokens)}
    return loss, stats


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position. (B, T, V) -> (B, T).

    H = logsumexp(z) - sum softmax(z) * z, which avoids forming log(0) for tiny probabilities.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(token) at each position. logits (B, T, V), tokens (B, T) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def explained_variance(y_pred: Tensor, y_true: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(y_true - y_pred) / Var(y_true) over masked positions.

    1 = perfect critic, 0 = no better than a constant, < 0 = worse than a constant.
    NaN when the targets have no variance (nothing to explain).
    """
    var_y = masked_var(y_true, mask, unbiased=False)
    if var_y == 0:
        return torch.tensor(float("nan"))
    return 1.0 - masked_var(y_true - y_pred, mask, unbiased=False) / var_y


# ----------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive beta from Ziegler et al. 2019 (section 2.2): steer the KL toward a target.

    e_t = clip(KL_t / target - 1, -0.2, 0.2); beta <- beta * (1 + K_beta * e_t) with
    K_beta = n_steps / horizon. The clip bounds each update to +/-20% of the horizon rate so
    one outlier batch cannot swing beta; the horizon (in samples) sets how fast it adapts.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        assert target > 0 and horizon > 0, f"target ({target}) and horizon ({horizon}) must be > 0"
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta after a batch of `n_steps` samples whose mean sequence KL was `current_kl`."""
        if not math.isfinite(current_kl):
            return
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# ----------------------------------------------------------------------------- group baselines


def _grouped(rewards: Tensor, group_size: int, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    assert rewards.dim() == 1, f"rewards must be (B*G,), got shape {tuple(rewards.shape)}"
    assert group_size >= 2, f"group baselines need group_size >= 2, got {group_size}"
    assert rewards.numel() % group_size == 0, (
        f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    valid = _as_bool(valid)
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    r = torch.where(valid, rewards, zero).view(-1, group_size)  # (B, G)
    return r, valid.view(-1, group_size)


def group_usable_mask(valid: Tensor, group_size: int) -> Tensor:
    """Which samples can get a group baseline: valid ones in groups with >= 2 valid members.

    valid: (B*G,) bool -> (B*G,) bool. A lone survivor has no peer to compare against.
    """
    v = _as_bool(valid).view(-1, group_size)  # (B, G)
    return (v & (v.sum(dim=1, keepdim=True) >= 2)).view(-1)


def rloo_advantages(rewards: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024): r_i - mean_{j != i} r_j.

    rewards: (B*G,), consecutive runs of `group_size` samples share a prompt. Each sample's
    baseline is the mean of its peers, so it is independent of the sample itself and the
    gradient estimate stays unbiased. With `valid`, missing samples are left out of their
    group; samples that are invalid or lack a valid peer get advantage 0 (drop them with
    `group_usable_mask`).
    """
    r, v = _grouped(rewards, group_size, valid)  # (B, G)
    n = v.sum(dim=1, keepdim=True).to(rewards.dtype)  # (B, 1)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (n - 1).clamp(min=1)  # (B, G)
    usable = v & (n >= 2)
    adv = torch.where(usable, r - baseline, torch.zeros((), dtype=r.dtype, device=r.device))
    return adv.view(-1)  # (B*G,)


def grpo_advantages(rewards: Tensor, group_size: int, valid: Tensor | None = None,
                    scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO outcome advantages (Shao et al. 2024, section 4.1.2): (r_i - mean(r)) / std(r).

    Mean and (Bessel-corrected) std are taken within each prompt's group of valid samples.
    `eps` keeps groups whose samples all scored the same at advantage 0 instead of 0/0.
    `scale_by_std=False` keeps only the centering (the "Dr. GRPO" variant, which argues the
    std division up-weights too-easy and too-hard prompts). Invalid samples, and samples
    without a valid peer, get 0.
    """
    r, v = _grouped(rewards, group_size, valid)  # (B, G)
    n = v.sum(dim=1, keepdim=True).to(rewards.dtype)  # (B, 1)
    mean = r.sum(dim=1, keepdim=True) / n.clamp(min=1)
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    sq = torch.where(v, (r - mean) ** 2, zero)
    std = torch.sqrt(sq.sum(dim=1, keepdim=True) / (n - 1).clamp(min=1))  # (B, 1)
    adv = r - mean
    if scale_by_std:
        adv = adv / (std + eps)
    usable = v & (n >= 2)
    return torch.where(usable, adv, zero).view(-1)  # (B*G,)
