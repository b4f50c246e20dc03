"""Every loss against numbers worked out by hand in the docstrings, plus gradient and reference checks.

Conventions used throughout: ``L3 = ln 3``, ``sigma(L3) = 3/4``, ``sigma(-L3) = 1/4``, so
``-log sigma(L3) = ln(4/3)``, ``-log sigma(-L3) = ln 4`` and ``-log sigma(0) = ln 2``.
"""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_lightning.losses import (
    dense_reward,
    dense_reward_from_segments,
    discounted_returns,
    dpo_loss,
    group_advantages,
    policy_gradient_loss,
    reinforce_pp_advantages,
    remax_advantages,
    gae,
    kl_penalty,
    masked_mean,
    masked_moment_sums,
    masked_nll,
    masked_var,
    mean_var_from_moment_sums,
    modpo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    reward_centering_loss,
    reward_model_loss,
    whiten,
)

L2, L3, L4 = math.log(2.0), math.log(3.0), math.log(4.0)
L43 = math.log(4.0 / 3.0)


def t(*values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------


def _dpo_pairs():
    """Three pairs with beta = 0.5 and delta = (pc - rc) - (pr - rr) = 2 L3, 0, -2 L3.

    pair 0: pc - rc = 2 L3, pr - rr = 0     -> beta delta =  L3, rewards ( L3, 0)
    pair 1: pc - rc = 1,    pr - rr = 1     -> beta delta =  0,  rewards (0.5, 0.5)
    pair 2: pc - rc = 0,    pr - rr = 2 L3  -> beta delta = -L3, rewards (0, L3)
    """
    pc = t(-2.0, -5.0, -4.0)
    rc = t(-2.0 - 2 * L3, -6.0, -4.0)
    pr = t(-3.0, -7.0, -1.0)
    rr = t(-3.0, -8.0, -1.0 - 2 * L3)
    return pc, pr, rc, rr


def test_dpo_sigmoid_by_hand():
    """-log sigma(beta delta) = ln(4/3), ln 2, ln 4; rewards beta (policy - ref), detached."""
    pc, pr, rc, rr = _dpo_pairs()
    pc.requires_grad_(True)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert_close(losses, t(L43, L2, L4))
    assert_close(chosen, t(L3, 0.5, 0.0))
    assert_close(rejected, t(0.0, 0.5, L3))
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


def test_dpo_conservative_label_smoothing_by_hand():
    """eps = 0.1: -(0.9) log sigma(z) - 0.1 log sigma(-z).

    z = L3: 0.9 ln(4/3) + 0.1 ln 4;  z = 0: ln 2;  z = -L3: 0.9 ln 4 + 0.1 ln(4/3).
    """
    pc, pr, rc, rr = _dpo_pairs()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    assert_close(losses, t(0.9 * L43 + 0.1 * L4, L2, 0.9 * L4 + 0.1 * L43))
    # eps = 0 is plain DPO.
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    smoothed0, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.0)
    assert_close(smoothed0, plain)


def test_dpo_robust_by_hand():
    """eps = 0.1: [-(0.9) log sigma(z) + 0.1 log sigma(-z)] / 0.8.

    z = L3: (0.9 ln(4/3) - 0.1 ln 4) / 0.8;  z = 0: 0.8 ln 2 / 0.8 = ln 2;
    z = -L3: (0.9 ln 4 - 0.1 ln(4/3)) / 0.8.
    """
    pc, pr, rc, rr = _dpo_pairs()
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert_close(losses, t((0.9 * L43 - 0.1 * L4) / 0.8, L2, (0.9 * L4 - 0.1 * L43) / 0.8))
    assert_close(chosen, t(L3, 0.5, 0.0))
    assert_close(rejected, t(0.0, 0.5, L3))
    # eps = 0 is plain DPO.
    robust0, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="robust")
    plain, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert_close(robust0, plain)


def test_dpo_ipo_by_hand():
    """beta = 0.25, so the target 1/(2 beta) = 2: (delta - 2)^2 with delta = 2 L3, 0, -2 L3."""
    pc, pr, rc, rr = _dpo_pairs()
    losses, chosen, _ = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    assert_close(losses, t((2 * L3 - 2) ** 2, 4.0, (2 * L3 + 2) ** 2))
    assert_close(chosen, t(0.5 * L3, 0.25, 0.0))


def test_dpo_hinge_by_hand():
    """beta = 0.5: relu(1 - beta delta) = relu(1 - L3) = 0 (L3 > 1), 1, 1 + L3."""
    pc, pr, rc, rr = _dpo_pairs()
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")
    assert_close(losses, t(0.0, 1.0, 1.0 + L3))


def test_dpo_sigmoid_gradient_by_hand_and_gradcheck():
    """d/d pc [-log sigma(beta delta)] = -beta sigma(-beta delta); d/d rc = +beta sigma(-beta delta).

    pair 0 (beta delta = L3): -0.5 * 1/4 = -0.125;  pair 1 (beta delta = 0): -0.5 * 1/2 = -0.25.
    d/d pr and d/d rr are the negatives.
    """
    pc, pr, rc, rr = (x[:2].clone().requires_grad_(True) for x in _dpo_pairs())
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    losses.sum().backward()
    assert_close(pc.grad, t(-0.125, -0.25))
    assert_close(rc.grad, t(0.125, 0.25))
    assert_close(pr.grad, t(0.125, 0.25))
    assert_close(rr.grad, t(-0.125, -0.25))

    for loss_type, eps in [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("ipo", 0.0), ("hinge", 0.0)]:
        inputs = tuple(x.detach().clone().requires_grad_(True) for x in (pc, pr, rc, rr))
        assert torch.autograd.gradcheck(
            lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.5, loss_type=loss_type, label_smoothing=eps)[0], inputs
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": -1.0}, "beta"),
        ({"loss_type": "kto"}, "loss_type"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"label_smoothing": 0.6}, "label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
    ],
)
def test_dpo_invalid_arguments(kwargs, match):
    pc, pr, rc, rr = _dpo_pairs()
    with pytest.raises(ValueError, match=match):
        dpo_loss(pc, pr, rc, rr, **kwargs)


def test_dpo_shape_mismatch_raises():
    pc, pr, rc, rr = _dpo_pairs()
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(pc, pr[:2], rc, rr)


def test_dpo_is_stable_for_large_margins():
    """A log-ratio gap of 2000 must give a finite loss ~ 0 (or ~ beta |delta|), never inf/nan."""
    zero = torch.zeros(2, dtype=torch.float32)
    gap = torch.tensor([2000.0, -2000.0])
    losses, _, _ = dpo_loss(gap, zero, zero, zero, beta=1.0)
    assert torch.isfinite(losses).all()
    assert_close(losses, torch.tensor([0.0, 2000.0]))


# ---------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------


def test_reward_model_loss_by_hand():
    """-log sigma(r_c - r_r - m).

    No margin: r_c - r_r = L3, 0, -L3 -> ln(4/3), ln 2, ln 4.
    Margin (1, 2, 0.5) with r_c - r_r = 1 + L3, 2, 0.5 - L3 -> the same three numbers.
    A scalar margin is broadcast.
    """
    chosen, rejected = t(1.0 + L3, 2.0, 0.0), t(1.0, 2.0, L3)
    assert_close(reward_model_loss(chosen, rejected), t(L43, L2, L4))
    assert_close(reward_model_loss(chosen, rejected, margin=None), t(L43, L2, L4))
    chosen_m = t(1.0 + L3, 4.0, 0.5)
    rejected_m = t(0.0, 2.0, L3)
    assert_close(reward_model_loss(chosen_m, rejected_m, margin=t(1.0, 2.0, 0.5)), t(L43, L2, L4))
    assert_close(reward_model_loss(t(1.0 + L3), t(0.0), margin=1.0), t(L43))


def test_reward_model_gradient_by_hand():
    """d/d r_c [-log sigma(r_c - r_r)] = -sigma(r_r - r_c) = -1/4 at r_c - r_r = L3."""
    chosen = t(L3).requires_grad_(True)
    rejected = t(0.0).requires_grad_(True)
    reward_model_loss(chosen, rejected).sum().backward()
    assert_close(chosen.grad, t(-0.25))
    assert_close(rejected.grad, t(0.25))


def test_reward_centering_loss_by_hand():
    """coef * mean((r_c + r_r)^2): pairs (1, 2) and (-1, 1) -> 0.01 * (9 + 0) / 2 = 0.045."""
    out = reward_centering_loss(t(1.0, -1.0), t(2.0, 1.0), coef=0.01)
    assert out.dim() == 0
    assert_close(out, t(0.045)[0])


# ---------------------------------------------------------------------------------------------
# MODPO
# ---------------------------------------------------------------------------------------------


def test_modpo_k1_equals_dpo_sigmoid_exactly():
    """K = 1: margins (B, 0), weights [1] -> bit-for-bit DPO sigmoid with the same beta."""
    pc, pr, rc, rr = _dpo_pairs()
    empty = torch.zeros(3, 0, dtype=torch.float64)
    for weights in ([1.0], torch.tensor([1.0])):
        out = modpo_loss(pc, pr, rc, rr, empty, empty, weights=weights, beta=0.5)
        ref = dpo_loss(pc, pr, rc, rr, beta=0.5)
        for got, want in zip(out, ref):
            assert torch.equal(got, want)


def test_modpo_zero_margins_unit_w0_equals_dpo_exactly():
    """K = 3 with all margins 0 and w0 = 1: the other weights do not matter, it is DPO."""
    pc, pr, rc, rr = _dpo_pairs()
    zeros = torch.zeros(3, 2, dtype=torch.float64)
    out = modpo_loss(pc, pr, rc, rr, zeros, zeros, weights=[1.0, 0.3, 0.7], beta=0.5)
    ref = dpo_loss(pc, pr, rc, rr, beta=0.5)
    for got, want in zip(out, ref):
        assert torch.equal(got, want)


def test_modpo_k1_rescales_beta_by_w0():
    """K = 1 with w0 = 0.5 is DPO with beta / w0."""
    pc, pr, rc, rr = _dpo_pairs()
    empty = torch.zeros(3, 0, dtype=torch.float64)
    losses, chosen, _ = modpo_loss(pc, pr, rc, rr, empty, empty, weights=[0.5], beta=0.25)
    ref_losses, ref_chosen, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert_close(losses, ref_losses)
    assert_close(chosen, ref_chosen)


def test_modpo_k2_by_hand():
    """beta = 0.5, w = (0.5, 0.5); log-ratios from _dpo_pairs.

    pair 0: beta(pc - rc) = L3, beta(pr - rr) = 0; margins (chosen, rejected) = (0, 0)
            logit = (L3 - 0.5 * 0) / 0.5 = 2 L3 -> -log sigma(2 L3) = ln(1 + 1/9) = ln(10/9)
            rewards (L3 / 0.5, 0) = (2 L3, 0)
    pair 1: beta(pc - rc) = 0.5, beta(pr - rr) = 0.5; margins (2, 0)
            logit = (0 - 0.5 * 2) / 0.5 = -2 -> -log sigma(-2) = ln(1 + e^2)
            rewards ((0.5 - 1) / 0.5, 0.5 / 0.5) = (-1, 1)
    pair 2: beta(pc - rc) = 0, beta(pr - rr) = L3; margins (L3, -L3)
            logit = (-L3 - 0.5 * 2 L3) / 0.5 = -4 L3 -> -log sigma(-4 L3) = ln(1 + 81) = ln 82
            rewards ((0 - 0.5 L3) / 0.5, (L3 + 0.5 L3) / 0.5) = (-L3, 3 L3)
    """
    pc, pr, rc, rr = _dpo_pairs()
    margin_chosen = t(0.0, 2.0, L3).unsqueeze(1)  # (B, K-1) = (3, 1)
    margin_rejected = t(0.0, 0.0, -L3).unsqueeze(1)
    losses, chosen, rejected = modpo_loss(
        pc, pr, rc, rr, margin_chosen, margin_rejected, weights=torch.tensor([0.5, 0.5]), beta=0.5
    )
    assert_close(losses, t(math.log(10 / 9), math.log(1 + math.e**2), math.log(82.0)))
    assert_close(chosen, t(2 * L3, -1.0, -L3))
    assert_close(rejected, t(0.0, 1.0, 3 * L3))
    assert not chosen.requires_grad and not rejected.requires_grad
    # The loss logit is the reward difference: loss = -log sigma(chosen - rejected).
    assert_close(losses, -torch.nn.functional.logsigmoid(chosen - rejected))


def test_modpo_k3_by_hand():
    """beta = 0.5, w = (0.5, 0.25, 0.25), margins (B, 2).

    pair 0: beta log-ratios (L3, 0); margins chosen (4, 0), rejected (0, 0)
            w_rest . m = 0.25 * 4 = 1; logit = (L3 - 1) / 0.5 = 2 L3 - 2
            rewards ((L3 - 1) / 0.5, 0) = (2 L3 - 2, 0)
    pair 1: beta log-ratios (0.5, 0.5); margins chosen (1, 3), rejected (3, 1)
            w_rest . (m_c - m_r) = 0.25 * (-2) + 0.25 * 2 = 0 -> logit 0 -> ln 2
            rewards ((0.5 - 1) / 0.5, (0.5 - 1) / 0.5) = (-1, -1)
    """
    pc, pr, rc, rr = (x[:2] for x in _dpo_pairs())
    margin_chosen = t(4.0, 0.0, 1.0, 3.0).view(2, 2)
    margin_rejected = t(0.0, 0.0, 3.0, 1.0).view(2, 2)
    losses, chosen, rejected = modpo_loss(
        pc, pr, rc, rr, margin_chosen, margin_rejected, weights=(0.5, 0.25, 0.25), beta=0.5
    )
    z = 2 * L3 - 2
    assert_close(losses, t(math.log1p(math.exp(-z)), L2))
    assert_close(chosen, t(2 * L3 - 2, -1.0))
    assert_close(rejected, t(0.0, -1.0))


def test_modpo_gradient_by_hand_and_gradcheck():
    """logit = (beta [(pc - rc) - (pr - rr)] - w_rest . (m_c - m_r)) / w0, loss = -log sigma(logit).

    d loss / d pc = -(beta / w0) sigma(-logit). Pair 0 of test_modpo_k2_by_hand has logit 2 L3:
    sigma(-2 L3) = 1/10 -> -(0.5 / 0.5) / 10 = -0.1. Pair 1 has logit -2: -sigma(2).
    Margins get no gradient here (reward-model scores are constants), but the formula is smooth in
    them, so gradcheck covers all six inputs.
    """
    pc, pr, rc, rr = (x[:2].clone().requires_grad_(True) for x in _dpo_pairs())
    margin_chosen = t(0.0, 2.0).unsqueeze(1).requires_grad_(True)
    margin_rejected = t(0.0, 0.0).unsqueeze(1).requires_grad_(True)
    losses, _, _ = modpo_loss(pc, pr, rc, rr, margin_chosen, margin_rejected, weights=[0.5, 0.5], beta=0.5)
    losses.sum().backward()
    sig2 = 1.0 / (1.0 + math.exp(-2.0))
    assert_close(pc.grad, t(-0.1, -sig2))
    assert_close(rr.grad, t(-0.1, -sig2))
    # d/d m_c = (w1 / w0) sigma(-logit) = sigma(-logit)
    assert_close(margin_chosen.grad, t(0.1, sig2).unsqueeze(1))

    inputs = tuple(x.detach().clone().requires_grad_(True) for x in (pc, pr, rc, rr, margin_chosen, margin_rejected))
    assert torch.autograd.gradcheck(
        lambda a, b, c, d, e, f: modpo_loss(a, b, c, d, e, f, weights=[0.7, 0.3], beta=0.5)[0], inputs
    )


@pytest.mark.parametrize("weights", [[0.0, 1.0], [-0.5, 1.5], torch.tensor([0.0, 1.0])])
def test_modpo_nonpositive_w0_raises(weights):
    pc, pr, rc, rr = _dpo_pairs()
    m = torch.zeros(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"weights\[0\].*> 0"):
        modpo_loss(pc, pr, rc, rr, m, m, weights=weights)


def test_modpo_invalid_shapes_raise():
    pc, pr, rc, rr = _dpo_pairs()
    m = torch.zeros(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="length K"):
        modpo_loss(pc, pr, rc, rr, m, m, weights=[1.0, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"\(B, K-1\)"):
        modpo_loss(pc, pr, rc, rr, m.squeeze(1), m.squeeze(1), weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="batch size"):
        modpo_loss(pc, pr, rc, rr, m[:2], m[:2], weights=[1.0, 0.5])
    with pytest.raises(ValueError, match="beta"):
        modpo_loss(pc, pr, rc, rr, m, m, weights=[1.0, 0.5], beta=0.0)


# ---------------------------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------------------------


def test_kl_penalty_pointwise_by_hand():
    """log r = ln 2: k1 = ln 2, k2 = (ln 2)^2 / 2, k3 = 1/2 - 1 + ln 2, abs = ln 2.
    log r = -ln 2: k1 = -ln 2, k3 = 2 - 1 - ln 2 = 1 - ln 2, abs = ln 2."""
    logp = t(L2, -L2).view(1, 2)
    ref = torch.zeros(1, 2, dtype=torch.float64)
    assert_close(kl_penalty(logp, ref), t(L2, -L2).view(1, 2))
    assert_close(kl_penalty(logp, ref, kind="k1"), t(L2, -L2).view(1, 2))
    assert_close(kl_penalty(logp, ref, kind="k2"), t(L2**2 / 2, L2**2 / 2).view(1, 2))
    assert_close(kl_penalty(logp, ref, kind="k3"), t(L2 - 0.5, 1 - L2).view(1, 2))
    assert_close(kl_penalty(logp, ref, kind="abs"), t(L2, L2).view(1, 2))


def test_kl_estimators_by_enumeration():
    """For categoricals p (policy) and q (reference), E_{y~p}[k(y)] by exact enumeration:

    E_p[k1] = sum_y p log(p/q) = KL(p || q)                            (unbiased)
    E_p[k3] = sum_y p (q/p - 1 + log(p/q)) = sum q - 1 + KL = KL(p || q)  (unbiased)
    E_p[k2] = 0.5 E_p[(log p/q)^2], which is >= 0 and close to KL when q is close to p.
    k3 and k2 are non-negative for every y; k1 is not.
    """
    p = t(0.5, 0.3, 0.2)
    q = t(0.2, 0.5, 0.3)
    kl_exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    logp, logq = p.log().view(1, 3), q.log().view(1, 3)
    expect = lambda kind: (p * kl_penalty(logp, logq, kind=kind)[0]).sum()  # noqa: E731
    assert_close(expect("k1"), torch.tensor(kl_exact, dtype=torch.float64))
    assert_close(expect("k3"), torch.tensor(kl_exact, dtype=torch.float64))
    assert_close(expect("k2"), 0.5 * (p * (p.log() - q.log()) ** 2).sum())
    assert (kl_penalty(logp, logq, kind="k3") >= 0).all()
    assert (kl_penalty(logp, logq, kind="k2") >= 0).all()
    assert (kl_penalty(logp, logq, kind="k1") < 0).any()

    # k2's bias is third order in the log-ratio: for q close to p it matches KL closely.
    q_near = t(0.49, 0.31, 0.2)
    kl_near = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q_near.tolist()))
    k2_near = (p * kl_penalty(logp, q_near.log().view(1, 3), kind="k2")[0]).sum().item()
    assert k2_near == pytest.approx(kl_near, rel=0.02)


def test_kl_penalty_shape_and_unknown_kind():
    logp = torch.randn(4, 7)
    for kind in ("k1", "k2", "k3", "abs"):
        assert kl_penalty(logp, torch.randn(4, 7), kind=kind).shape == (4, 7)
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, logp, kind="k4")


# ---------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------


def _gae_reference(rewards, values, lengths, gamma, lam):
    """Independent per-row loop on right-padded rows: valid tokens are 0..L-1, V_L = 0, A_L = 0."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        running = 0.0
        for step in range(lengths[b] - 1, -1, -1):
            next_value = values[b, step + 1].item() if step + 1 < lengths[b] else 0.0
            delta = rewards[b, step].item() + gamma * next_value - values[b, step].item()
            running = delta + gamma * lam * running
            adv[b, step] = running
    ret = adv + values * (torch.arange(T)[None] < torch.tensor(lengths)[:, None])
    return adv, ret


def test_gae_by_hand():
    """gamma = lam = 1, one row of 2 tokens: A_1 = r_1 - V_1, A_0 = r_0 + r_1 - V_0.
    r = (1, 2), V = (0.5, 3) -> A = (2.5, -1), returns = A + V = (3, 2) (the reward-to-go)."""
    adv, ret = gae(t(1.0, 2.0).view(1, 2), t(0.5, 3.0).view(1, 2), torch.ones(1, 2), gamma=1.0, lam=1.0)
    assert_close(adv, t(2.5, -1.0).view(1, 2))
    assert_close(ret, t(3.0, 2.0).view(1, 2))


def test_gae_lambda_zero_is_one_step_td():
    """lam = 0: A_t = r_t + gamma V_{t+1} - V_t. gamma = 0.5, r = (1, 1), V = (2, 4):
    A_0 = 1 + 2 - 2 = 1, A_1 = 1 + 0 - 4 = -3 (terminal)."""
    adv, _ = gae(t(1.0, 1.0).view(1, 2), t(2.0, 4.0).view(1, 2), torch.ones(1, 2), gamma=0.5, lam=0.0)
    assert_close(adv, t(1.0, -3.0).view(1, 2))


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (0.5, 0.0)])
def test_gae_matches_reference_with_right_padding(gamma, lam):
    generator = torch.Generator().manual_seed(0)
    lengths = [6, 1, 4, 0, 3]
    B, T = len(lengths), 6
    rewards = torch.randn(B, T, generator=generator, dtype=torch.float64)
    values = torch.randn(B, T, generator=generator, dtype=torch.float64)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    want_adv, want_ret = _gae_reference(rewards, values, lengths, gamma, lam)

    # Garbage (even NaN) on padding must not leak into valid positions.
    poisoned_r = torch.where(mask.bool(), rewards, torch.nan)
    poisoned_v = torch.where(mask.bool(), values, torch.nan)
    adv, ret = gae(poisoned_r, poisoned_v, mask, gamma=gamma, lam=lam)
    assert_close(adv, want_adv)
    assert_close(ret, want_ret)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_left_padding_is_a_shift_of_right_padding():
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(1, 4, generator=generator, dtype=torch.float64)
    values = torch.randn(1, 4, generator=generator, dtype=torch.float64)
    right_mask = torch.tensor([[1, 1, 1, 0]])
    left_mask = torch.tensor([[0, 1, 1, 1]])
    right_adv, right_ret = gae(rewards, values, right_mask, gamma=0.9, lam=0.9)
    left_adv, left_ret = gae(rewards.roll(1, 1), values.roll(1, 1), left_mask, gamma=0.9, lam=0.9)
    assert_close(left_adv, right_adv.roll(1, 1))
    assert_close(left_ret, right_ret.roll(1, 1))


# ---------------------------------------------------------------------------------------------
# Masked reductions and whitening
# ---------------------------------------------------------------------------------------------


def test_masked_mean_var_by_hand():
    """Valid entries (1, 2, 3, 6): mean 3, squared deviations 4 + 1 + 0 + 9 = 14,
    unbiased var 14/3, biased 14/4; padding holds NaN and 1e6 and must not matter."""
    values = t(1.0, 2.0, float("nan"), 3.0, 6.0, 1e6).view(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert_close(masked_mean(values, mask), t(3.0)[0])
    assert_close(masked_mean(values, mask, dim=1), t(1.5, 4.5))
    assert_close(masked_var(values, mask), t(14 / 3)[0])
    assert_close(masked_var(values, mask, unbiased=False), t(14 / 4)[0])
    # An empty mask gives 0, not NaN.
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_masked_nll_by_hand():
    """token log-probs (-1, -2 | -3, pad): token mean NLL = (1 + 2 + 3) / 3 = 2."""
    logps = t(-1.0, -2.0, -3.0, -100.0).view(2, 2)
    assert_close(masked_nll(logps, torch.tensor([[1, 1], [1, 0]])), t(2.0)[0])


def test_whiten_masked_statistics_and_padding():
    generator = torch.Generator().manual_seed(0)
    values = 3.0 + 2.0 * torch.randn(4, 8, generator=generator, dtype=torch.float64)
    mask = (torch.arange(8)[None] < torch.tensor([8, 5, 2, 7])[:, None]).long()
    values = torch.where(mask.bool(), values, 1e6)  # padding far off: it must be ignored
    out = whiten(values, mask)
    valid = out[mask.bool()]
    assert_close(valid.mean(), torch.zeros((), dtype=torch.float64), atol=1e-12, rtol=0)
    assert_close(valid.std(), torch.ones((), dtype=torch.float64), atol=1e-6, rtol=0)
    assert (out[~mask.bool()] == 0).all()
    # Same as whitening the compacted valid entries.
    compact = values[mask.bool()]
    assert_close(valid, (compact - compact.mean()) / (compact.var() + 1e-8).sqrt())
    # shift_mean=False keeps the mean and only rescales.
    kept = whiten(values, mask, shift_mean=False)[mask.bool()]
    assert_close(kept.mean(), compact.mean())
    assert_close(kept - compact.mean(), valid)


def test_whiten_with_global_moments_across_ranks():
    """Two 'ranks' each sum [x, x^2, count]; the all-reduced sums give the full batch's whitening."""
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    mask = (torch.arange(5)[None] < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]).long()
    sums = masked_moment_sums(values[:3], mask[:3]) + masked_moment_sums(values[3:], mask[3:])
    mean, var = mean_var_from_moment_sums(sums)
    assert_close(mean, masked_mean(values, mask))
    assert_close(var, masked_var(values, mask))
    full = whiten(values, mask)
    rank0 = whiten(values[:3], mask[:3], mean=mean, var=var)
    rank1 = whiten(values[3:], mask[3:], mean=mean, var=var)
    assert_close(torch.cat([rank0, rank1]), full)
    with pytest.raises(ValueError, match="both"):
        whiten(values, mask, mean=mean)


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------


def _ppo_tokens():
    """Five valid tokens (clip eps = 0.2) and one padded token with absurd values.

    token  r    A    -A r   -A clip(r)  max    clipped term active?
    0      1.5  +1   -1.5   -1.2        -1.2   yes (r above 1 + eps, A > 0)
    1      1.5  -1    1.5    1.2         1.5   no
    2      0.5  +1   -0.5   -0.8        -0.5   no
    3      0.5  -1    0.5    0.8         0.8   yes (r below 1 - eps, A < 0)
    4      1.0  +2   -2.0   -2.0        -2.0   no (tie)
    loss = (-1.2 + 1.5 - 0.5 + 0.8 - 2.0) / 5 = -1.4 / 5 = -0.28; clipfrac = 2/5
    ratio_mean = (1.5 + 1.5 + 0.5 + 0.5 + 1) / 5 = 1
    approx_kl = mean(r - 1 - ln r) = (2 (0.5 - ln 1.5) + 2 (-0.5 + ln 2) + 0) / 5 = 2 ln(4/3) / 5
    """
    ratios = t(1.5, 1.5, 0.5, 0.5, 1.0, 50.0, 1.0).view(1, 7)
    old = t(-1.0, -2.0, -0.5, -3.0, -1.0, -20.0, -1.0).view(1, 7)
    logprobs = old + ratios.log()
    advantages = t(1.0, -1.0, 1.0, -1.0, 2.0, 1e3, 1.0).view(1, 7)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    return logprobs, old, advantages, mask


def test_ppo_policy_loss_by_hand():
    logprobs, old, advantages, mask = _ppo_tokens()
    logprobs.requires_grad_(True)
    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    assert_close(loss, t(-0.28)[0])
    assert_close(stats["clipfrac"], t(0.4)[0])
    assert_close(stats["ratio_mean"], t(1.0)[0])
    assert_close(stats["approx_kl"], t(2 * L43 / 5)[0])
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())

    # Gradient: clipped tokens and padding get 0; unclipped get d(-A r)/d logp / N = -A r / 5.
    loss.backward()
    assert_close(logprobs.grad, t(0.0, 1.5 / 5, -0.5 / 5, 0.0, -2.0 / 5, 0.0, 0.0).view(1, 7))


def test_ppo_policy_loss_at_ratio_one_is_minus_mean_advantage():
    adv = torch.randn(3, 4, dtype=torch.float64)
    logp = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.ones(3, 4)
    loss, stats = ppo_policy_loss(logp, logp, adv, mask)
    assert_close(loss, -adv.mean())
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    with pytest.raises(ValueError, match="clip_range"):
        ppo_policy_loss(logp, logp, adv, mask, clip_range=0.0)


def test_ppo_value_loss_by_hand():
    """old V = 0, eps = 0.2, so V_clip = clip(V, -0.2, 0.2).

    token  V    R    (V - R)^2  (V_clip - R)^2  max    clipped active?
    0      0.5  0    0.25       0.04            0.25   no
    1      0.5  1    0.25       0.64            0.64   yes
    2      0.1  1    0.81       0.81            0.81   no (tie)
    loss = 0.5 (0.25 + 0.64 + 0.81) / 3 = 0.85 / 3; vf_clipfrac = 1/3; value_mean = 1.1 / 3
    Without clipping: 0.5 (0.25 + 0.25 + 0.81) / 3 = 0.655 / 3.
    """
    values = t(0.5, 0.5, 0.1, 9.0).view(1, 4)
    old = torch.zeros(1, 4, dtype=torch.float64)
    returns = t(0.0, 1.0, 1.0, -9.0).view(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range=0.2)
    assert_close(loss, t(0.85 / 3)[0])
    assert_close(stats["vf_clipfrac"], t(1 / 3)[0])
    assert_close(stats["value_mean"], t(1.1 / 3)[0])
    unclipped, stats = ppo_value_loss(values, old, returns, mask, clip_range=None)
    assert_close(unclipped, t(0.655 / 3)[0])
    assert stats["vf_clipfrac"].item() == 0.0
    with pytest.raises(ValueError, match="clip_range"):
        ppo_value_loss(values, old, returns, mask, clip_range=-0.1)


# ---------------------------------------------------------------------------------------------
# Reward shaping
# ---------------------------------------------------------------------------------------------


def test_dense_reward_places_score_on_last_valid_token():
    """kl_coef = 0.5, kl = 1 everywhere: every valid token gets -0.5; the score is added at the
    last valid token (right padded rows of length 3 and 1, a left padded row, an empty row)."""
    kl = torch.ones(4, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    scores = t(2.0, 3.0, 4.0, 5.0)
    out = dense_reward(kl, scores, mask, kl_coef=0.5)
    want = t(
        -0.5, -0.5, 1.5, 0.0,
        2.5, 0.0, 0.0, 0.0,
        0.0, -0.5, -0.5, 3.5,
        0.0, 0.0, 0.0, 0.0,
    ).view(4, 4)  # fmt: skip
    assert_close(out, want)


def test_dense_reward_from_segments_places_and_sums():
    """Row 0: segments end at tokens 1 and 3 (rewards 1, 2) and a padding segment (position -1).
    Row 1: two segments end on token 2 (rewards 1, -3): they add to -2.
    kl_coef = 0.1, kl = 1 on valid tokens -> -0.1 there; padded token of row 1 gets nothing."""
    kl = torch.ones(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    seg_rewards = t(1.0, 2.0, 7.0, 1.0, -3.0, 0.0).view(2, 3)
    seg_ends = torch.tensor([[1, 3, -1], [2, 2, 0]])
    seg_mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    out = dense_reward_from_segments(kl, seg_rewards, seg_ends, mask, kl_coef=0.1, segment_mask=seg_mask)
    want = t(
        -0.1, 0.9, -0.1, 1.9,
        -0.1, -0.1, -2.1, 0.0,
    ).view(2, 4)  # fmt: skip
    assert_close(out, want)


def test_dense_reward_is_one_segment_at_last_token():
    generator = torch.Generator().manual_seed(3)
    kl = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    mask = (torch.arange(5)[None] < torch.tensor([5, 2, 4])[:, None]).long()
    scores = torch.randn(3, generator=generator, dtype=torch.float64)
    coef = torch.tensor(0.05, dtype=torch.float64)
    via_segments = dense_reward_from_segments(
        kl, scores[:, None], torch.tensor([[4], [1], [3]]), mask, kl_coef=coef
    )
    assert_close(dense_reward(kl, scores, mask, kl_coef=coef), via_segments)
    with pytest.raises(ValueError, match=r"\(B, S\)"):
        dense_reward_from_segments(kl, scores[:, None], torch.tensor([4, 1, 3]), mask, kl_coef=coef)


# ---------------------------------------------------------------------------------------------
# Critic-free family: group advantages, REINFORCE++, ReMax, the clipped policy-gradient loss
# ---------------------------------------------------------------------------------------------


def test_group_advantages_grpo_by_hand():
    """Group 1 = (1, 2, 3): mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + eps). Group 2 = (0, 0, 6): mean 2,
    std sqrt((4 + 4 + 16) / 2) = sqrt(12) -> (-2, -2, 4) / sqrt(12)."""
    scores = t(1.0, 2.0, 3.0, 0.0, 0.0, 6.0)
    s12 = math.sqrt(12.0)
    expected = t(-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6), -2 / (s12 + 1e-6), -2 / (s12 + 1e-6), 4 / (s12 + 1e-6))
    assert_close(group_advantages(scores, 3), expected)
    # Dr. GRPO: the same differences, unscaled.
    assert_close(group_advantages(scores, 3, scale="none"), t(-1.0, 0.0, 1.0, -2.0, -2.0, 4.0))


def test_group_advantages_rloo_by_hand():
    """Leave-one-out: A_i = s_i - mean of the others. Group (1, 2, 3): 1 - 2.5, 2 - 2, 3 - 1.5;
    group (0, 0, 6): 0 - 3, 0 - 3, 6 - 0. Equal to G/(G-1) (s_i - mean)."""
    scores = t(1.0, 2.0, 3.0, 0.0, 0.0, 6.0)
    expected = t(-1.5, 0.0, 1.5, -3.0, -3.0, 6.0)
    assert_close(group_advantages(scores, 3, baseline="leave_one_out", scale="none"), expected)
    # The plain loop over "the others".
    loop = torch.stack([scores[i] - torch.cat([scores[g * 3 : i], scores[i + 1 : g * 3 + 3]]).mean()
                        for g in range(2) for i in range(g * 3, g * 3 + 3)])
    assert_close(group_advantages(scores, 3, baseline="leave_one_out", scale="none"), loop)


@pytest.mark.parametrize("baseline", ["mean", "leave_one_out"])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_equal_scores_give_zeros_not_nan(baseline, scale):
    scores = t(0.7, 0.7, 0.7, 0.7, -2.0, -2.0, -2.0, -2.0)
    advantages = group_advantages(scores, 4, baseline=baseline, scale=scale)
    assert torch.equal(advantages, torch.zeros_like(scores))
    # A single sample per prompt is its own mean: zeros, not NaN.
    assert torch.equal(group_advantages(t(3.0, -1.0), 1), t(0.0, 0.0))


def test_group_advantages_bad_arguments():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(t(1.0, 2.0, 3.0), 2)
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(t(1.0, 2.0), 2, baseline="median")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(t(1.0, 2.0), 2, scale="mad")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(t(1.0, 2.0), 1, baseline="leave_one_out")


def test_discounted_returns_by_hand():
    """Row 0 (right padded) r = (1, 2, 3, pad), gamma 0.5: G = (1 + 0.5*2 + 0.25*3, 2 + 0.5*3, 3) =
    (2.75, 3.5, 3). Row 1 (left padded) r = (pad, 4, 0, 2): G = (_, 4 + 0 + 0.25*2, 0 + 1, 2) = (_, 4.5, 1, 2)."""
    rewards = t(1.0, 2.0, 3.0, 99.0, 99.0, 4.0, 0.0, 2.0).view(2, 4)
    mask = t(1, 1, 1, 0, 0, 1, 1, 1).view(2, 4)
    expected = t(2.75, 3.5, 3.0, 0.0, 0.0, 4.5, 1.0, 2.0).view(2, 4)
    assert_close(discounted_returns(rewards, mask, gamma=0.5), expected)


def test_reinforce_pp_advantages_by_hand():
    """scores (1, -1), kl = 1 on every valid token, kl_coef 0.5, gamma 1, rows of 2 and 1 valid tokens.
    Row 0: r = (-0.5, 1 - 0.5) -> G = (0, 0.5). Row 1: r = (-1 - 0.5) -> G = (-1.5).
    Normalised over the batch's 3 tokens: mean (0 + 0.5 - 1.5)/3 = -1/3, unbiased var
    ((1/3)^2 + (5/6)^2 + (7/6)^2) / 2 = (4 + 25 + 49) / 72 = 13/12."""
    scores = t(1.0, -1.0)
    mask = t(1, 1, 1, 0).view(2, 2)
    kl = t(1.0, 1.0, 1.0, 0.0).view(2, 2)
    advantages, returns = reinforce_pp_advantages(scores, kl, mask, kl_coef=0.5)
    assert_close(returns, t(0.0, 0.5, -1.5, 0.0).view(2, 2))
    std = math.sqrt(13.0 / 12.0 + 1e-8)
    assert_close(advantages, t(1 / 3 / std, 5 / 6 / std, -7 / 6 / std, 0.0).view(2, 2))
    # Global statistics (e.g. all-reduced across ranks) replace the batch's own.
    advantages, _ = reinforce_pp_advantages(scores, kl, mask, kl_coef=0.5, mean=t(0.5), var=t(4.0 - 1e-8))
    assert_close(advantages, t(-0.25, 0.0, -1.0, 0.0).view(2, 2))


def test_remax_baseline_by_hand():
    """Two prompts x 2 samples, greedy scores (0.5, 2): A = s - greedy of the sample's prompt."""
    assert_close(remax_advantages(t(1.0, 0.0, 3.0, 2.0), t(0.5, 2.0), 2), t(0.5, -0.5, 1.0, 0.0))
    # As the REINFORCE++ machinery: baseline on the last token, no normalisation, no KL.
    kl = torch.zeros(2, 2, dtype=torch.float64)
    advantages, _ = reinforce_pp_advantages(t(1.0, 3.0), kl, torch.ones(2, 2), kl_coef=0.0,
                                            baseline=t(0.5, 2.0), normalize=False)
    assert_close(advantages, t(0.5, 0.5, 1.0, 1.0).view(2, 2))
    with pytest.raises(ValueError, match="greedy_scores"):
        remax_advantages(t(1.0, 0.0, 3.0), t(0.5, 2.0), 2)


def _pg_batch():
    """Two rows; row 0 has 2 valid tokens with ratios (2, 1/2), row 1 one valid token with ratio 1.
    Advantages per sequence (1, -1)."""
    old = t(-1.0, -1.0, -2.0, 0.0).view(2, 2)
    new = t(-1.0 + L2, -1.0 - L2, -2.0, 0.0).view(2, 2)
    mask = t(1, 1, 1, 0).view(2, 2)
    return new, old, t(1.0, -1.0), mask


def test_policy_gradient_loss_token_level_clip_low_high_by_hand():
    """eps_low 0.2, eps_high 0.28 (DAPO). Row 0, A = 1: ratio 2 -> max(-2, -1.28) = -1.28 (clipped);
    ratio 0.5 -> max(-0.5, -0.8) = -0.5. Row 1, A = -1, ratio 1 -> 1.
    token_mean: (-1.28 - 0.5 + 1) / 3 = -0.26; sequence_mean: ((-1.78) / 2 + 1) / 2 = 0.055;
    token_sum_norm with norm 4: (-0.78) / (2 * 4) = -0.0975."""
    new, old, adv, mask = _pg_batch()
    kwargs = dict(clip_range_low=0.2, clip_range_high=0.28)
    loss, stats = policy_gradient_loss(new, old, adv, mask, **kwargs)
    assert_close(loss, t(-0.26)[0])
    assert_close(stats["clipfrac"], t(1 / 3)[0])
    loss, _ = policy_gradient_loss(new, old, adv, mask, loss_aggregation="sequence_mean", **kwargs)
    assert_close(loss, t(0.055)[0])
    loss, _ = policy_gradient_loss(new, old, adv, mask, loss_aggregation="token_sum_norm", token_norm=4, **kwargs)
    assert_close(loss, t(-0.0975)[0])
    # Symmetric clip: ratio 2 clipped at 1.2 instead.
    loss, _ = policy_gradient_loss(new, old, adv, mask, clip_range_low=0.2)
    assert_close(loss, t((-1.2 - 0.5 + 1.0) / 3)[0])
    # Per-token advantages equal to the broadcast sequence advantages give the same loss.
    loss_tokens, _ = policy_gradient_loss(new, old, adv.unsqueeze(1).expand(2, 2), mask, **kwargs)
    assert_close(loss_tokens, t(-0.26)[0])


def test_policy_gradient_loss_sequence_ratio_gspo_by_hand():
    """GSPO: row 0's sequence ratio exp(mean(L2, -L2)) = 1, unclipped although its token ratios (2, 1/2)
    are far apart; row 1's is 1. token_mean: (-1 - 1 + 1) / 3 = -1/3. The gradient w.r.t. row 0's
    token log-probs is -A * s / 3 per token = -1/3 each (ratio times log-prob gradient), and 0 for clipped rows."""
    new, old, adv, mask = _pg_batch()
    new = new.clone().requires_grad_(True)
    loss, stats = policy_gradient_loss(new, old, adv, mask, ratio_level="sequence")
    assert_close(loss, t(-1 / 3)[0])
    assert stats["clipfrac"] == 0
    loss.backward()
    assert_close(new.grad, t(-1 / 3, -1 / 3, 1 / 3, 0.0).view(2, 2))
    # A sequence ratio outside the clip range: row 0 shifted by +L2 on both tokens -> s = 2 > 1.2 with A = 1: no gradient.
    shifted = (new.detach() + t(L2, L2, 0.0, 0.0).view(2, 2)).requires_grad_(True)
    loss, stats = policy_gradient_loss(shifted, old, adv, mask, ratio_level="sequence")
    assert_close(loss, t((-1.2 - 1.2 + 1.0) / 3)[0])
    loss.backward()
    assert_close(shifted.grad, t(0.0, 0.0, 1 / 3, 0.0).view(2, 2))


def test_policy_gradient_loss_k3_kl_in_loss_by_hand():
    """At ratio 1 with A = 0: the loss is kl_coef * token mean of k3 = exp(ref - logp) - (ref - logp) - 1.
    ref - logp = (L2, 0, -L2): k3 = (2 - L2 - 1, 0, 1/2 + L2 - 1) -> sum = 0.5; coef 0.1 -> 0.1 * 0.5 / 3."""
    logp = t(-1.0, -1.0, -2.0, 0.0).view(2, 2)
    ref = t(-1.0 + L2, -1.0, -2.0 - L2, 5.0).view(2, 2)
    mask = t(1, 1, 1, 0).view(2, 2)
    loss, stats = policy_gradient_loss(logp, logp, t(0.0, 0.0), mask, ref_logprobs=ref, kl_coef=0.1)
    assert_close(loss, t(0.1 * 0.5 / 3)[0])
    assert_close(stats["kl_loss"], t(0.5 / 3)[0])
    loss, stats = policy_gradient_loss(logp, logp, t(0.0, 0.0), mask, ref_logprobs=ref, kl_coef=0.0)
    assert loss == 0 and "kl_loss" not in stats


def test_policy_gradient_loss_matches_ppo_at_default_settings():
    """Token ratio, symmetric clip, token mean, no KL: exactly ppo_policy_loss."""
    torch.manual_seed(0)
    new, old = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    adv, mask = torch.randn(3, 5, dtype=torch.float64), (torch.rand(3, 5) > 0.3).double()
    assert_close(policy_gradient_loss(new, old, adv, mask)[0], ppo_policy_loss(new, old, adv, mask)[0])


def test_policy_gradient_loss_bad_arguments():
    new, old, adv, mask = _pg_batch()
    with pytest.raises(ValueError, match="ratio_level"):
        policy_gradient_loss(new, old, adv, mask, ratio_level="segment")
    with pytest.raises(ValueError, match="loss_aggregation"):
        policy_gradient_loss(new, old, adv, mask, loss_aggregation="sum")
    with pytest.raises(ValueError, match="clip ranges"):
        policy_gradient_loss(new, old, adv, mask, clip_range_high=0.0)
