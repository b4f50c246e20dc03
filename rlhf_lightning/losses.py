"""Every objective of every method, as pure tensor functions (no ``nn.Module``, no Lightning).

Notation: B batch, T tokens, K objectives, S segments. Per-example losses come back unreduced
``(B,)`` with the implicit rewards where the method has them; the modules reduce and log. PPO's
token-level losses return a scalar (the masked token mean) plus a dict of detached scalar stats.

Where this departs from the papers, and why:

* IPO (Azar et al. 2023) is written for sequence log-probs, but with summed log-probs of long
  completions the target ``1/(2 beta)`` is dwarfed by the log-ratio; the DPO module feeds
  length-averaged log-probs for ``loss_type="ipo"`` (as TRL does). The formula here is unchanged.
* PPO's ``approx_kl`` stat is the k3 estimator of KL(pi_old || pi) (non-negative and unbiased),
  not the ``0.5 * (log r)^2`` used by some implementations.
* GAE bootstraps with 0 after the last valid token: a response ends its episode (EOS or length
  limit), so there is no next state.
* Whitening can use global moments (``mean``/``var`` arguments, from :func:`masked_moment_sums`
  all-reduced across ranks) so data-parallel PPO normalises advantages over the whole rollout batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "dpo_loss",
    "reward_model_loss",
    "reward_centering_loss",
    "modpo_loss",
    "kl_penalty",
    "gae",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_moment_sums",
    "mean_var_from_moment_sums",
    "whiten",
    "ppo_policy_loss",
    "ppo_value_loss",
    "masked_nll",
    "dense_reward",
    "dense_reward_from_segments",
    "group_advantages",
    "discounted_returns",
    "reinforce_pp_advantages",
    "remax_advantages",
    "policy_gradient_loss",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
KL_KINDS = ("k1", "k2", "k3", "abs")
GROUP_BASELINES = ("mean", "leave_one_out")
GROUP_SCALES = ("std", "none")
RATIO_LEVELS = ("token", "sequence")
LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "token_sum_norm")


# ---------------------------------------------------------------------------------------------
# Preference objectives: DPO, reward modelling, MODPO
# ---------------------------------------------------------------------------------------------


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"expected tensors of the same shape (B,), got {shapes}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Direct Preference Optimization and its variants (Rafailov et al. 2023, eq. 7).

    With the log-ratio difference
    ``delta = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))``:

    * ``"sigmoid"`` (DPO eq. 7): ``-log sigma(beta delta)``; with ``label_smoothing = eps`` the
      conservative DPO form (labels flipped with probability eps, Mitchell 2023):
      ``-(1 - eps) log sigma(beta delta) - eps log sigma(-beta delta)``.
    * ``"ipo"`` (Azar et al. 2023, sampled IPO loss of Sec. 5): ``(delta - 1 / (2 beta))^2``. Note: the DPO module feeds
      *length-averaged* log-probs for IPO, as TRL does (see the module docstring).
    * ``"hinge"`` (SLiC-HF, Zhao et al. 2023): ``relu(1 - beta delta)``.
    * ``"robust"`` (rDPO, Chowdhury et al. 2024, Sec. 3), unbiased under label-flip rate eps:
      ``[-(1 - eps) log sigma(beta delta) + eps log sigma(-beta delta)] / (1 - 2 eps)``.

    Args:
        policy_chosen_logps: ``(B,)`` sequence log-prob of the chosen completion under the policy.
        policy_rejected_logps: ``(B,)`` same for the rejected completion.
        ref_chosen_logps: ``(B,)`` chosen log-prob under the frozen reference.
        ref_rejected_logps: ``(B,)`` rejected log-prob under the frozen reference.
        beta: inverse KL strength, > 0.
        loss_type: one of ``"sigmoid"``, ``"ipo"``, ``"hinge"``, ``"robust"``.
        label_smoothing: label-flip rate eps; ``0 <= eps <= 0.5`` for ``"sigmoid"``,
            ``0 <= eps < 0.5`` for ``"robust"`` (it divides by ``1 - 2 eps``), must be 0 otherwise.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``. The rewards are the implicit
        rewards ``beta * (log pi - log pi_ref)``, detached.
    """
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    eps = label_smoothing
    if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5] for 'sigmoid', got {eps}")
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5) for 'robust' (divides by 1 - 2*eps), got {eps}")
    if loss_type in ("ipo", "hinge") and eps != 0.0:
        raise ValueError(f"dpo_loss: label_smoothing is only used by 'sigmoid' and 'robust', got {eps} with {loss_type!r}")
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )

    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    delta = chosen_logratios - rejected_logratios  # (B,)
    logits = beta * delta

    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * F.logsigmoid(logits)
        if eps > 0:
            losses = losses - eps * F.logsigmoid(-logits)
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1.0 - 2.0 * eps)
    elif loss_type == "ipo":
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - logits)

    chosen_rewards = (beta * chosen_logratios).detach()
    rejected_rewards = (beta * rejected_logratios).detach()
    return losses, chosen_rewards, rejected_rewards


def reward_model_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Bradley-Terry pairwise loss (Ouyang et al. 2022, eq. 1), with Llama-2's optional margin.

    ``loss = -log sigma(r(x, y_w) - r(x, y_l) - m)`` (Touvron et al. 2023, eq. 2).

    Args:
        chosen_rewards: ``(B,)`` scalar reward of the chosen completion.
        rejected_rewards: ``(B,)`` reward of the rejected completion.
        margin: ``(B,)`` or scalar preference-strength margin ``m``; ``None`` means 0.

    Returns:
        ``(B,)`` per-pair losses.
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def reward_centering_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, *, coef: float
) -> torch.Tensor:
    """Auxiliary reward-centering term (Eisenstein et al. 2023, "Helping or Herding?", sec. 3).

    Bradley-Terry only sees reward differences, so the reward's offset drifts freely; this pins the
    pair's reward sum near zero: ``coef * mean_b (r(x, y_w) + r(x, y_l))^2``.

    Args:
        chosen_rewards / rejected_rewards: ``(B,)``.
        coef: weight of the term (0.01 in the paper).

    Returns:
        scalar.
    """
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return coef * ((chosen_rewards + rejected_rewards) ** 2).mean()


def modpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    margin_chosen: torch.Tensor,
    margin_rejected: torch.Tensor,
    *,
    weights: torch.Tensor | Sequence[float],
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Multi-Objective DPO (Zhou et al. 2024, "Beyond One-Preference-Fits-All Alignment", Sec. 3, the MODPO loss).

    Trains objective 0's preferences while the other K-1 objectives enter through fixed margin
    reward models ``r_{-0}``:

    ``loss = -log sigma( (1 / w_0) * ( beta [log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)]
                                       - w_{-0}^T (r_{-0}(x, y_w) - r_{-0}(x, y_l)) ) )``

    With ``K = 1`` (empty margins) and ``w = [1]`` this is exactly DPO's sigmoid loss.

    Args:
        policy_chosen_logps / policy_rejected_logps: ``(B,)`` policy sequence log-probs.
        ref_chosen_logps / ref_rejected_logps: ``(B,)`` reference sequence log-probs.
        margin_chosen: ``(B, K-1)`` scores of the chosen completion under the other objectives'
            reward models (``(B, 0)`` when K = 1).
        margin_rejected: ``(B, K-1)`` same for the rejected completion.
        weights: length-K preference weights ``w``; ``w[0]`` (the trained objective) must be > 0.
        beta: inverse KL strength, > 0.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``. The rewards are the
        margin-adjusted implicit rewards of objective 0,
        ``(beta log pi(y)/pi_ref(y) - w_{-0}^T r_{-0}(x, y)) / w_0``, detached; their difference is
        the logit inside the sigmoid.
    """
    if beta <= 0:
        raise ValueError(f"modpo_loss: beta must be > 0, got {beta}")
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if margin_chosen.dim() != 2 or margin_chosen.shape != margin_rejected.shape:
        raise ValueError(
            "modpo_loss: margin_chosen and margin_rejected must both have shape (B, K-1), got "
            f"{tuple(margin_chosen.shape)} and {tuple(margin_rejected.shape)}"
        )
    if margin_chosen.shape[0] != policy_chosen_logps.shape[0]:
        raise ValueError(
            f"modpo_loss: margins have batch size {margin_chosen.shape[0]}, log-probs {policy_chosen_logps.shape[0]}"
        )
    w = torch.as_tensor(weights, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
    if w.dim() != 1 or w.numel() != margin_chosen.shape[1] + 1:
        raise ValueError(
            f"modpo_loss: weights must have length K = margin width + 1 = {margin_chosen.shape[1] + 1}, "
            f"got shape {tuple(w.shape)}"
        )
    w0 = float(w[0])
    if not w0 > 0:
        raise ValueError(
            f"modpo_loss: weights[0] (the objective being trained) must be > 0, got {w0}; "
            "it divides the loss logit"
        )

    w_rest = w[1:]  # (K-1,)
    chosen_margin = (margin_chosen * w_rest).sum(dim=-1)  # (B,), 0 when K = 1
    rejected_margin = (margin_rejected * w_rest).sum(dim=-1)  # (B,)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    # Same operation order as dpo_loss so that K = 1, w = [1] reproduces it bit for bit.
    logits = (beta * (chosen_logratios - rejected_logratios) - (chosen_margin - rejected_margin)) / w0
    losses = -F.logsigmoid(logits)

    chosen_rewards = ((beta * chosen_logratios - chosen_margin) / w0).detach()
    rejected_rewards = ((beta * rejected_logratios - rejected_margin) / w0).detach()
    return losses, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------------------------------------
# Masked reductions and whitening
# ---------------------------------------------------------------------------------------------


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` is 1. Masked entries may hold NaN/inf: they are never read."""
    masked = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over entries where ``mask`` is 1 (all of them, or along ``dim``).

    An empty selection gives 0 rather than NaN (the count is clamped to 1), with no device sync.
    """
    count = mask.to(values.dtype).sum() if dim is None else mask.to(values.dtype).sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over all entries where ``mask`` is 1 (scalar).

    ``unbiased`` applies Bessel's correction ``n / (n - 1)``; with a single valid entry the
    denominator is clamped to 1 (variance 0) instead of dividing by zero.
    """
    mean = masked_mean(values, mask)
    count = mask.to(values.dtype).sum()
    sq_dev = masked_sum((values - mean) ** 2, mask)
    denom = (count - 1.0) if unbiased else count
    return sq_dev / denom.clamp(min=1.0)


def masked_moment_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(3,)`` tensor ``[sum x, sum x^2, count]`` over entries where ``mask`` is 1.

    For statistics across data-parallel ranks: ``all_reduce(SUM)`` this one tensor, then
    :func:`mean_var_from_moment_sums` gives the global mean and variance for :func:`whiten`.
    """
    return torch.stack(
        [masked_sum(values, mask), masked_sum(values * values, mask), mask.to(values.dtype).sum()]
    )


def mean_var_from_moment_sums(sums: torch.Tensor, unbiased: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from ``[sum x, sum x^2, count]`` (see :func:`masked_moment_sums`).

    Uses ``var = (sum x^2 - n mean^2) / (n - 1)``, which loses precision when ``|mean| >> std``;
    advantages are close to zero-mean, where this is harmless.
    """
    total, total_sq, count = sums.unbind()
    n = count.clamp(min=1.0)
    mean = total / n
    sq_dev = (total_sq - n * mean * mean).clamp(min=0.0)
    denom = (count - 1.0) if unbiased else count
    return mean, sq_dev / denom.clamp(min=1.0)


def whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise ``values`` to mean 0 and variance 1 over entries where ``mask`` is 1.

    Used for PPO advantages. Statistics are the masked mean and unbiased variance of this tensor,
    unless ``mean`` and ``var`` are given (e.g. global statistics all-reduced across ranks with
    :func:`masked_moment_sums` / :func:`mean_var_from_moment_sums`).

    Args:
        values: ``(B, T)`` (any shape matching ``mask``).
        mask: 1 on valid entries; padding does not enter the statistics.
        shift_mean: if False, only rescale: the mean is added back after dividing by the std.
        eps: added to the variance before the square root.
        mean / var: precomputed statistics (both or neither).

    Returns:
        whitened values, same shape; masked positions are 0.
    """
    if (mean is None) != (var is None):
        raise ValueError("whiten: pass both mean and var, or neither")
    if mean is None:
        mean = masked_mean(values, mask)
        var = masked_var(values, mask, unbiased=True)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=whitened.device))


# ---------------------------------------------------------------------------------------------
# KL, reward shaping and GAE
# ---------------------------------------------------------------------------------------------


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, *, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from the policy pi.

    With ``log r = log pi(y_t) - log pi_ref(y_t)`` (Schulman, "Approximating KL divergence", 2020):

    * ``"k1"``: ``log r`` (unbiased, high variance, can be negative);
    * ``"k2"``: ``0.5 (log r)^2`` (biased, low variance);
    * ``"k3"``: ``exp(-log r) - 1 + log r`` (unbiased, low variance, always >= 0);
    * ``"abs"``: ``|log r|``.

    Args:
        logprobs: ``(B, T)`` policy log-probs of the sampled tokens.
        ref_logprobs: ``(B, T)`` reference log-probs of the same tokens.
        kind: one of ``"k1"``, ``"k2"``, ``"k3"``, ``"abs"``.

    Returns:
        ``(B, T)`` (unmasked: the caller applies its response mask).
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    if kind == "abs":
        return log_ratio.abs()
    raise ValueError(f"kl_penalty: unknown kind {kind!r}; expected one of {KL_KINDS}")


def dense_reward_from_segments(
    kl: torch.Tensor,
    segment_rewards: torch.Tensor,
    segment_end_positions: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float | torch.Tensor,
    segment_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token rewards: a KL penalty on every token plus segment rewards on their end tokens.

    Fine-Grained RLHF (Wu et al. 2023, Sec. 2.1): ``r_t = sum_k sum_j 1[t = T_j^k] R_k(x, y, j)
    - beta_kl log(pi(y_t) / pi_ref(y_t))``. A sequence-level score is one segment ending at the
    last valid token (:func:`dense_reward`).

    Args:
        kl: ``(B, T)`` per-token KL estimate (e.g. :func:`kl_penalty`).
        segment_rewards: ``(B, S)`` reward of each segment (already weighted and summed over
            reward sources if there are several).
        segment_end_positions: ``(B, S)`` long, index in ``[0, T)`` of each segment's last token.
        mask: ``(B, T)``, 1 on response tokens; the KL term is zero elsewhere.
        kl_coef: KL coefficient (float or 0-dim tensor, e.g. from an adaptive controller).
        segment_mask: ``(B, S)``, 1 on real segments; padding segments (any position, e.g. -1) are
            ignored. ``None`` means all segments are real.

    Returns:
        ``(B, T)`` rewards; rewards of segments ending on the same token add up.
    """
    if segment_rewards.shape != segment_end_positions.shape:
        raise ValueError(
            f"segment_rewards {tuple(segment_rewards.shape)} and segment_end_positions "
            f"{tuple(segment_end_positions.shape)} must both be (B, S)"
        )
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    rewards = torch.where(mask.bool(), -kl_coef * kl, zero)  # (B, T)
    if segment_mask is None:
        segment_mask = torch.ones_like(segment_rewards, dtype=torch.bool)
    segment_mask = segment_mask.bool()
    index = torch.where(segment_mask, segment_end_positions.long(), 0)  # padding segments point at 0 ...
    src = torch.where(segment_mask, segment_rewards.to(rewards.dtype), zero)  # ... and add 0 there
    return rewards.scatter_add(1, index, src)


def dense_reward(
    kl: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, *, kl_coef: float | torch.Tensor
) -> torch.Tensor:
    """KL-shaped per-token reward for PPO (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2).

    ``r_t = -kl_coef * kl_t``, plus the sequence score at the last valid token of each row.

    Args:
        kl: ``(B, T)`` per-token KL estimate.
        scores: ``(B,)`` sequence-level reward.
        mask: ``(B, T)``, 1 on response tokens (left or right padded); a row with no valid token
            gets no score.
        kl_coef: KL coefficient.

    Returns:
        ``(B, T)`` rewards.
    """
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).max(dim=1).values  # (B,), -1 for an empty row
    return dense_reward_from_segments(
        kl,
        scores.unsqueeze(1),
        last.unsqueeze(1),
        mask,
        kl_coef=kl_coef,
        segment_mask=(last >= 0).unsqueeze(1),
    )


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, eq. 16) over a batch of responses.

    ``delta_t = r_t + gamma V_{t+1} - V_t`` and ``A_t = delta_t + gamma lam A_{t+1}``, where
    ``V_{t+1}`` and ``A_{t+1}`` are 0 after the last valid token (the episode terminates). Computed
    by one reversed loop over T, vectorised over B; gradients are not blocked (call it under
    ``torch.no_grad()``).

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. :func:`dense_reward`).
        values: ``(B, T)`` value estimates of the states before each token.
        mask: ``(B, T)``, 1 on response tokens; valid tokens of a row must be contiguous (left or
            right padding). Entries of ``rewards``/``values`` outside the mask are never read.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, with ``returns = advantages + values`` on valid
        tokens; both are 0 on masked positions.
    """
    valid = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(valid, rewards, zero)
    values = torch.where(valid, values, zero)
    batch, steps = values.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(batch, dtype=values.dtype, device=values.device)  # V_{t+1}, 0 past the end
    next_advantage = torch.zeros_like(next_value)  # A_{t+1}
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, zero)
        advantages[:, t] = advantage
        # A masked token has V = 0 and A = 0, so the step before it bootstraps from nothing.
        next_value, next_advantage = values[:, t], advantage
    returns = torch.where(valid, advantages + values, zero)
    return advantages, returns


# ---------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    With ``r_t = pi(y_t) / pi_old(y_t)``:
    ``loss = masked_mean_t max(-A_t r_t, -A_t clip(r_t, 1 - eps, 1 + eps))``, the token mean over
    all valid tokens of the batch.

    Args:
        logprobs: ``(B, T)`` current policy log-probs of the rollout tokens.
        old_logprobs: ``(B, T)`` log-probs at rollout time.
        advantages: ``(B, T)`` (usually whitened) advantages.
        mask: ``(B, T)``, 1 on response tokens.
        clip_range: eps, > 0.

    Returns:
        ``(loss, stats)``: scalar loss and detached scalars ``"clipfrac"`` (fraction of valid tokens
        where the clipped term is the larger one), ``"approx_kl"`` (masked mean of the k3 estimate of
        KL(pi_old || pi): ``r - 1 - log r``) and ``"ratio_mean"``.
    """
    if clip_range <= 0:
        raise ValueError(f"ppo_policy_loss: clip_range must be > 0, got {clip_range}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            # Tokens come from pi_old, so KL(pi_old || pi) takes k3 with the ratios swapped.
            "approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs, kind="k3"), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (as in OpenAI baselines' PPO2 and Ziegler et al. 2019).

    ``V_clip = V_old + clip(V - V_old, -eps, eps)`` and
    ``loss = 0.5 * masked_mean_t max((V_t - R_t)^2, (V_clip_t - R_t)^2)``.

    Args:
        values: ``(B, T)`` current value predictions.
        old_values: ``(B, T)`` predictions at rollout time.
        returns: ``(B, T)`` GAE returns (targets).
        mask: ``(B, T)``, 1 on response tokens.
        clip_range: eps, > 0; ``None`` disables clipping (plain 0.5 * MSE).

    Returns:
        ``(loss, stats)``: scalar loss and detached scalars ``"vf_clipfrac"`` (fraction of valid
        tokens where the clipped error is the larger one) and ``"value_mean"``.
    """
    unclipped = (values - returns) ** 2
    if clip_range is None:
        clipped = unclipped
    else:
        if clip_range <= 0:
            raise ValueError(f"ppo_value_loss: clip_range must be > 0 or None, got {clip_range}")
        values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask),
            "value_mean": masked_mean(values, mask),
        }
    return loss, stats


# ---------------------------------------------------------------------------------------------
# Critic-free policy gradient: GRPO, Dr. GRPO, DAPO, GSPO, RLOO, REINFORCE++, ReMax
# ---------------------------------------------------------------------------------------------


def group_advantages(
    scores: torch.Tensor,
    group_size: int,
    *,
    baseline: str = "mean",
    scale: str = "std",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages of ``N = P * G`` completions from their group's scores (one group per prompt).

    For completion ``i`` of a group with scores ``s_1 .. s_G``:

    * ``baseline="mean"``: ``A_i = s_i - mean_j s_j`` (GRPO, Shao et al. 2024, eq. 3 outcome supervision);
    * ``baseline="leave_one_out"``: ``A_i = s_i - mean_{j != i} s_j = G/(G-1) (s_i - mean_j s_j)``
      (RLOO, Ahmadian et al. 2024, eq. 5; needs ``G >= 2``);
    * ``scale="std"``: divide by ``std_j s_j + eps`` (unbiased std, as GRPO's reference code); ``"none"``
      keeps the raw difference (Dr. GRPO, Liu et al. 2025, which drops the std to remove the
      question-difficulty bias; RLOO).

    GRPO = mean/std, Dr. GRPO = mean/none, RLOO = leave_one_out/none. A group of equal scores gives
    exact zeros (its difference is 0 before any division), never NaN; ``G = 1`` with ``"mean"`` gives
    zeros too (the only completion is its own baseline).

    Args:
        scores: ``(N,)`` sequence scores, grouped consecutively (rows ``p*G .. p*G+G-1`` share prompt p,
            the ``repeat_interleave`` order of :func:`~rlhf_lightning.generation.generate`).
        group_size: G.
        baseline / scale / eps: see above.

    Returns:
        ``(N,)`` advantages, same dtype as ``scores``.
    """
    if baseline not in GROUP_BASELINES:
        raise ValueError(f"group_advantages: baseline must be one of {GROUP_BASELINES}, got {baseline!r}")
    if scale not in GROUP_SCALES:
        raise ValueError(f"group_advantages: scale must be one of {GROUP_SCALES}, got {scale!r}")
    if scores.dim() != 1 or group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(
            f"group_advantages: scores must be (N,) with N a multiple of group_size; got shape "
            f"{tuple(scores.shape)} and group_size {group_size}"
        )
    if baseline == "leave_one_out" and group_size < 2:
        raise ValueError("group_advantages: the leave-one-out baseline needs group_size >= 2")
    grouped = scores.view(-1, group_size)  # (P, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if baseline == "leave_one_out":
        centred = centred * (group_size / (group_size - 1))
    if scale == "std":
        std = grouped.std(dim=1, keepdim=True, unbiased=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go ``G_t = sum_{s >= t} gamma^(s - t) r_s`` over the valid tokens of each row.

    Args:
        rewards: ``(B, T)`` per-token rewards; entries outside ``mask`` are never read.
        mask: ``(B, T)``, 1 on response tokens (contiguous per row).
        gamma: discount factor.

    Returns:
        ``(B, T)`` returns, 0 outside ``mask``.
    """
    valid = mask.bool()
    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    rewards = torch.where(valid, rewards, zero)
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(valid[:, t], rewards[:, t] + gamma * running, zero)
        returns[:, t] = running
    return returns


def reinforce_pp_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float | torch.Tensor,
    gamma: float = 1.0,
    baseline: torch.Tensor | None = None,
    normalize: bool = True,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ advantages (Hu 2025, eqs. 5-7), and ReMax's when ``baseline`` is given.

    Token reward ``r_t = 1[t = last] (s - b) - kl_coef * kl_t`` (the score minus an optional per-sequence
    baseline ``b`` on the last action, the KL penalty on every action: :func:`dense_reward`), return
    ``G_t = sum_{s >= t} gamma^(s - t) r_s`` (:func:`discounted_returns`), and, with ``normalize``, the
    advantage ``A_t = (G_t - mean) / std`` with the mean and std over *every valid token of the global
    batch* — pass ``mean``/``var`` computed across data-parallel ranks (all-reduced
    :func:`masked_moment_sums`), or they are this batch's own.

    ReMax (Li et al. 2024, Algorithm 1): ``baseline`` = the score of the greedy completion of the same
    prompt, and ``normalize=False`` (the paper does not normalise).

    Args:
        scores: ``(B,)`` sequence scores.
        kl: ``(B, T)`` per-token KL estimate (e.g. :func:`kl_penalty` ``k1``), 0 where not penalised.
        mask: ``(B, T)``, 1 on response tokens.
        kl_coef: KL coefficient (0 disables the penalty).
        gamma: discount factor.
        baseline: optional ``(B,)`` per-sequence baseline subtracted from the score.
        normalize: whiten the returns over the (global) batch.
        mean / var: global statistics of the returns for the normalisation (both or neither).
        eps: added to the variance.

    Returns:
        ``(advantages, returns)``, both ``(B, T)`` and 0 outside ``mask``.
    """
    if baseline is not None:
        scores = scores - baseline.to(scores.dtype)
    rewards = dense_reward(kl, scores.to(kl.dtype), mask, kl_coef=kl_coef)
    returns = discounted_returns(rewards, mask, gamma=gamma)
    if not normalize:
        return returns.clone(), returns
    return whiten(returns, mask, mean=mean, var=var, eps=eps), returns


def remax_advantages(scores: torch.Tensor, greedy_scores: torch.Tensor, group_size: int = 1) -> torch.Tensor:
    """ReMax's sequence advantage (Li et al. 2024, eq. 6): ``A_i = s_i - s_greedy(prompt of i)``.

    Args:
        scores: ``(N,)`` scores of sampled completions, ``N = P * G`` grouped per prompt.
        greedy_scores: ``(P,)`` scores of each prompt's greedy completion.
        group_size: G samples per prompt.

    Returns:
        ``(N,)``.
    """
    if greedy_scores.dim() != 1 or greedy_scores.shape[0] * group_size != scores.shape[0]:
        raise ValueError(
            f"remax_advantages: expected greedy_scores (P,) with P * group_size = N; got "
            f"{tuple(greedy_scores.shape)}, group_size {group_size}, scores {tuple(scores.shape)}"
        )
    return scores - greedy_scores.to(scores.dtype).repeat_interleave(group_size)


def _aggregate(values: torch.Tensor, mask: torch.Tensor, how: str, token_norm: float | None) -> torch.Tensor:
    if how == "token_mean":
        return masked_mean(values, mask)
    if how == "sequence_mean":
        return masked_mean(values, mask, dim=1).mean()
    norm = float(token_norm) if token_norm is not None else float(mask.shape[1])
    return masked_sum(values, mask) / (mask.shape[0] * norm)


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range_low: float = 0.2,
    clip_range_high: float | None = None,
    ratio_level: str = "token",
    loss_aggregation: str = "token_mean",
    token_norm: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float | torch.Tensor = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss of the critic-free family (GRPO / Dr. GRPO / DAPO / GSPO / RLOO / REINFORCE++).

    Per token: ``l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)) + kl_coef * k3_t``.

    * ``ratio_level="token"``: ``r_t = pi(y_t) / pi_old(y_t)`` (PPO, GRPO eq. 3).
    * ``ratio_level="sequence"`` (GSPO, Zheng et al. 2025, eq. 7 and its token form eq. 13): the
      length-normalised sequence ratio ``s = exp(mean_t log(pi / pi_old))`` clipped as a whole; written as
      ``r_t = sg[s] * pi(y_t) / sg[pi(y_t)]`` so that per-token advantages still work and, with one
      advantage per sequence, the gradient is exactly GSPO's.
    * ``clip_range_high`` > ``clip_range_low`` is DAPO's clip-higher (Yu et al. 2025, eq. 10).
    * the KL term (``ref_logprobs`` given, ``kl_coef > 0``) is GRPO's in-loss k3 estimator
      ``pi_ref/pi - log(pi_ref/pi) - 1`` (eq. 4); put the KL in the reward instead by shaping the
      advantages and leaving ``kl_coef=0`` here.
    * ``loss_aggregation``: ``"token_mean"`` — sum over every token of the batch / number of tokens
      (DAPO's token-level loss, eq. 12); ``"sequence_mean"`` — mean over sequences of each sequence's
      token mean (GRPO, eq. 3); ``"token_sum_norm"`` — sum over tokens / (B * ``token_norm``), a constant
      (Dr. GRPO: the generation budget, ``token_norm=None`` uses the tensor width T).

    Args:
        logprobs: ``(B, T)`` current log-probs of the rollout tokens (with grad).
        old_logprobs: ``(B, T)`` log-probs at rollout time.
        advantages: ``(B, T)`` per-token or ``(B,)`` per-sequence advantages.
        mask: ``(B, T)``, 1 on response tokens.
        clip_range_low / clip_range_high: ratio clip ``[1 - low, 1 + high]``; ``high=None`` is ``low``.
        ratio_level / loss_aggregation / token_norm / ref_logprobs / kl_coef: see above.

    Returns:
        ``(loss, stats)``: scalar loss and detached scalars ``clipfrac``, ``approx_kl`` (k3 of
        KL(pi_old || pi), token mean), ``ratio_mean`` and, with a KL term, ``kl_loss`` (its token mean).
    """
    clip_range_high = clip_range_low if clip_range_high is None else clip_range_high
    if clip_range_low <= 0 or clip_range_high <= 0:
        raise ValueError(f"policy_gradient_loss: clip ranges must be > 0, got {clip_range_low}, {clip_range_high}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"policy_gradient_loss: ratio_level must be one of {RATIO_LEVELS}, got {ratio_level!r}")
    if loss_aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(
            f"policy_gradient_loss: loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {loss_aggregation!r}"
        )
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1).expand_as(logprobs)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, zero)
    if ratio_level == "token":
        ratio = torch.exp(log_ratio)
    else:
        sequence_log_ratio = masked_mean(log_ratio, mask, dim=1)  # (B,)
        ratio = torch.exp(sequence_log_ratio.detach().unsqueeze(1) + logprobs - logprobs.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range_low, 1.0 + clip_range_high)
    per_token = torch.maximum(unclipped, clipped)
    kl = None
    if ref_logprobs is not None and (torch.is_tensor(kl_coef) or kl_coef != 0):
        kl = kl_penalty(logprobs, ref_logprobs, kind="k3")
        per_token = per_token + kl_coef * kl
    loss = _aggregate(per_token, mask, loss_aggregation, token_norm)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(kl_penalty(old_logprobs, logprobs, kind="k3"), mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
        if kl is not None:
            stats["kl_loss"] = masked_mean(kl, mask)
    return loss, stats


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


def masked_nll(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood (SFT): ``-sum_{b,t} m_bt log p_bt / sum_{b,t} m_bt``.

    Args:
        token_logprobs: ``(B, T)`` log-probs of the target tokens.
        mask: ``(B, T)``, 1 on tokens that are trained on (completion only, or all real tokens).

    Returns:
        scalar.
    """
    return -masked_mean(token_logprobs, mask)
