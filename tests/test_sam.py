"""Gradient rules against closed forms: SAM, ASAM, average-direction SAM and its samplers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from dsgd.optim.avg_sam import (
    AvgSAM,
    deviations,
    from_deviations,
    isotropic,
    sample_low_rank,
    virtual_workers,
)
from dsgd.optim.sam import SAM


@dataclass(frozen=True)
class Plain:
    """The plain mini-batch gradient as a gradient rule: ``g_j = grad L_j(w_j)`` (D-SGD, Lian
    et al. 2017); the identity every rule reduces to when it perturbs nothing."""

    def __call__(self, grad_fn, params, grads, *, generator=None):
        return grads


SHAPES = {"a": (2, 3), "b": (4,)}  # two entries: per-worker norms must span both
P = 10


def flat(s):  # {name: (m, *shape)} -> (m, P)
    return torch.cat([s[k].flatten(1) for k in SHAPES], 1)


def unflat(x):  # (m, P) -> {name: (m, *shape)}
    out, i = {}, 0
    for k, shp in SHAPES.items():
        n = math.prod(shp)
        out[k] = x[:, i : i + n].reshape(x.shape[0], *shp)
        i += n
    return out


def spd(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(P, P, generator=g, dtype=torch.float64)
    return q @ q.T / P + torch.eye(P, dtype=torch.float64)  # (P, P)


def quad_grad_fn(A):
    """L_j(w) = 1/2 w^T A w for every worker: grad = A w."""
    return lambda s: unflat(flat(s) @ A)  # A symmetric


def quartic_grad_fn(s):  # L(w) = sum w^4 / 4: grad = w^3
    return {k: v.pow(3) for k, v in s.items()}


def stacked(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    return unflat(torch.randn(m, P, generator=g, dtype=torch.float64))


def assert_stacked_equal(a, b, **kw):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kw)


# ---------------------------------------------------------------- SAM / ASAM


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_rho0_is_plain_exactly(adaptive):
    A, w = spd(), stacked(3)
    fn = quad_grad_fn(A)
    g = fn(w)
    rule = SAM(0.0, adaptive=adaptive)
    assert_stacked_equal(rule(fn, w, g), g, rtol=0, atol=0)
    assert_stacked_equal(Plain()(fn, w, g), g, rtol=0, atol=0)
    e = rule.perturbation(w, g)
    assert all(bool((v == 0).all()) for v in e.values())


def test_sam_quadratic_closed_form():
    A, w, rho = spd(), stacked(3), 0.3
    fn = quad_grad_fn(A)
    W = flat(w)  # (m, P)
    G = W @ A
    expect = (W + rho * G / G.norm(dim=1, keepdim=True)) @ A  # A(w + rho A w / ||A w||)
    got = SAM(rho)(fn, w, fn(w))
    torch.testing.assert_close(flat(got), expect, rtol=1e-12, atol=1e-12)


def test_asam_quadratic_closed_form():
    A, w, rho = spd(), stacked(3), 0.3
    fn = quad_grad_fn(A)
    W = flat(w)
    G = W @ A
    T = W.abs()
    e = rho * T**2 * G / (T * G).norm(dim=1, keepdim=True)  # rho T^2 g / ||T g||
    got = SAM(rho, adaptive=True)(fn, w, fn(w))
    torch.testing.assert_close(flat(got), (W + e) @ A, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_norm_is_per_worker(adaptive):
    A, rho = spd(), 0.5
    fn = quad_grad_fn(A)
    w0, w1 = stacked(1, seed=3), stacked(1, seed=4)
    w1 = {k: 7.0 * v for k, v in w1.items()}  # very different scale from worker 0
    both = {k: torch.cat([w0[k], w1[k]]) for k in w0}
    rule = SAM(rho, adaptive=adaptive)
    e_both = flat(rule.perturbation(both, fn(both)))
    e0 = flat(rule.perturbation(w0, fn(w0)))
    e1 = flat(rule.perturbation(w1, fn(w1)))
    torch.testing.assert_close(e_both, torch.cat([e0, e1]), rtol=1e-12, atol=1e-12)
    if not adaptive:  # each worker's own perturbation has norm rho
        torch.testing.assert_close(e_both.norm(dim=1), torch.full((2,), rho, dtype=e0.dtype))


def test_sam_does_not_mutate_params():
    A, w = spd(), stacked(2)
    before = {k: v.clone() for k, v in w.items()}
    SAM(0.2, adaptive=True)(quad_grad_fn(A), w, quad_grad_fn(A)(w))
    assert_stacked_equal(w, before, rtol=0, atol=0)


def test_sam_zero_gradient_is_finite():
    w = stacked(2)
    zero = lambda s: {k: torch.zeros_like(v) for k, v in s.items()}  # noqa: E731
    out = SAM(0.1)(zero, w, zero(w))
    assert all(bool(torch.isfinite(v).all()) for v in out.values())


# ---------------------------------------------------------------- average-direction SAM


@pytest.mark.parametrize("antithetic,k", [(True, 4), (False, 3)])
def test_avg_sam_sigma0_is_plain_exactly(antithetic, k):
    w = stacked(3)
    g = quartic_grad_fn(w)
    gen = torch.Generator().manual_seed(0)
    out = AvgSAM(isotropic(0.0), num_samples=k, antithetic=antithetic)(
        quartic_grad_fn, w, g, generator=gen
    )
    assert_stacked_equal(out, g, rtol=0, atol=0)


def test_avg_sam_quadratic_antithetic_exact_every_draw():
    A, w = spd(), stacked(3)
    fn = quad_grad_fn(A)
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        out = AvgSAM(isotropic(0.7), num_samples=2)(fn, w, fn(w), generator=gen)
        assert_stacked_equal(out, fn(w), rtol=1e-12, atol=1e-12)  # E[A(w + eps)] = A w


def test_avg_sam_quadratic_unbiased_without_antithetic():
    A, w, sigma, K = spd(), stacked(2), 0.5, 4000
    fn = quad_grad_fn(A)
    gen = torch.Generator().manual_seed(0)
    out = AvgSAM(isotropic(sigma), num_samples=K, antithetic=False)(fn, w, fn(w), generator=gen)
    # per coordinate: mean of A eps has std sigma * ||A_i|| / sqrt(K)
    se = sigma * A.norm(dim=1) / math.sqrt(K)  # (P,)
    assert ((flat(out) - flat(fn(w))).abs() < 5 * se).all()


@pytest.mark.parametrize("antithetic", [True, False])
def test_avg_sam_quartic_converges_to_closed_form(antithetic):
    # E[(w + eps)^3] = w^3 + 3 w sigma^2 for eps ~ N(0, sigma^2)
    w, sigma, K = stacked(2), 0.4, 20000
    gen = torch.Generator().manual_seed(0)
    rule = AvgSAM(isotropic(sigma), num_samples=K, antithetic=antithetic)
    out = flat(rule(quartic_grad_fn, w, quartic_grad_fn(w), generator=gen))
    W = flat(w)
    expect = W**3 + 3 * W * sigma**2
    s2 = sigma**2
    if antithetic:  # pair mean w^3 + 3 w eps^2: var 9 w^2 * 2 s^4, K/2 pairs
        se = (18 * W**2 * s2**2 / (K / 2)).sqrt()
    else:  # var of (w+eps)^3 = 9w^4 s2 + 36 w^2 s2^2 + 15 s2^3
        se = ((9 * W**4 * s2 + 36 * W**2 * s2**2 + 15 * s2**3) / K).sqrt()
    assert ((out - expect).abs() < 5 * se + 1e-12).all()


def test_low_rank_sampler_covariance_matches_xi():
    n, N = 3, 200_000
    devs = deviations(stacked(n, seed=5))
    D = flat(devs)  # (n, P)
    xi = D.T @ D / n  # (P, P)
    gen = torch.Generator().manual_seed(0)
    E = flat(sample_low_rank(devs, N, gen))  # (N, P)
    emp = E.T @ E / N
    # entrywise std of the empirical second moment: sqrt((xi_ii xi_jj + xi_ij^2) / N)
    se = ((xi.diag()[:, None] * xi.diag()[None, :] + xi**2) / N).sqrt()
    assert ((emp - xi).abs() < 5 * se + 1e-12).all()
    # rank <= n - 1 after centring: every draw lies in the span of the deviations
    proj = E @ torch.linalg.pinv(D) @ D
    torch.testing.assert_close(proj, E, rtol=1e-8, atol=1e-8)


def test_from_deviations_and_virtual_workers_agree():
    w = stacked(4)
    fn = quartic_grad_fn
    a = AvgSAM(from_deviations(deviations(w)), num_samples=4)
    b = AvgSAM(virtual_workers(4), num_samples=4)
    ga = a(fn, w, fn(w), generator=torch.Generator().manual_seed(9))
    gb = b(fn, w, fn(w), generator=torch.Generator().manual_seed(9))
    assert_stacked_equal(ga, gb, rtol=0, atol=0)
    with pytest.raises(ValueError):
        b(fn, stacked(3), fn(stacked(3)))


def test_virtual_workers_identical_copies_is_plain():
    # a centralized run: m identical copies -> Xi = 0 -> the plain gradient
    one = stacked(1)
    w = {k: v.expand(3, *v.shape[1:]).clone() for k, v in one.items()}
    g = quartic_grad_fn(w)
    out = AvgSAM(virtual_workers(3), num_samples=4)(quartic_grad_fn, w, g)
    assert_stacked_equal(out, g, rtol=0, atol=0)


def test_avg_sam_perturbs_workers_independently():
    w = stacked(2)
    seen = []

    def fn(s):
        seen.append(flat(s) - flat(w))
        return quartic_grad_fn(s)

    AvgSAM(isotropic(1.0), num_samples=2)(fn, w, fn(w), generator=torch.Generator())
    eps_plus, eps_minus = seen[1], seen[2]
    torch.testing.assert_close(eps_plus, -eps_minus)
    assert not torch.allclose(eps_plus[0], eps_plus[1])


def test_avg_sam_rejects_odd_antithetic():
    with pytest.raises(ValueError):
        AvgSAM(isotropic(0.1), num_samples=3, antithetic=True)


def test_sam_on_module_matches_single_model_loop():
    """vmap'd stacked SAM equals davda54/sam-style first_step/second_step run worker by worker."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    m, rho = 3, 0.05
    params = {k: torch.randn(m, *v.shape) for k, v in net.named_parameters()}
    x, y = torch.randn(m, 8, 3), torch.randint(0, 2, (m, 8))

    def loss(p, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(net, p, (xb,)), yb)

    grad_fn = lambda s: vmap(grad(loss))(s, x, y)  # noqa: E731
    got = SAM(rho, adaptive=True)(grad_fn, params, grad_fn(params))
    for j in range(m):
        w = {k: v[j].clone().requires_grad_() for k, v in params.items()}
        g = torch.autograd.grad(loss(w, x[j], y[j]), list(w.values()))
        gn = torch.cat(
            [(w_.abs() * g_).flatten() for w_, g_ in zip(w.values(), g, strict=True)]
        ).norm()
        with torch.no_grad():  # first step: w <- w + e
            for w_, g_ in zip(w.values(), g, strict=True):
                w_.add_(w_.abs() ** 2 * g_ * rho / (gn + 1e-12))
        g2 = torch.autograd.grad(loss(w, x[j], y[j]), list(w.values()))
        for k, g2_ in zip(w, g2, strict=True):
            torch.testing.assert_close(got[k][j], g2_, rtol=1e-5, atol=1e-6)
