"""The D-SGD / AD-SAM decomposition on losses whose Taylor expansions are known exactly."""

import pytest
import torch
from torch import nn

from dsgd.metrics._func import flatten, flatten_stacked, make_loss_fn, module_params, tree_add
from dsgd.metrics._func import tree_norm as norm
from dsgd.metrics.consensus import average, consensus_distance, deviations
from dsgd.metrics.equivalence import Decomposition, adsam_estimate, adsam_gradient, decompose

D = torch.float64
SHAPES = {"a": (3,), "b": (2, 2)}  # P = 7, two named tensors


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand_stack(m, seed, center=0.0, scale=1.0):
    """m workers around a common random center (``center`` scales it)."""
    out = {}
    for i, (k, shape) in enumerate(SHAPES.items()):
        c = torch.randn(shape, generator=gen(1000 + seed + i), dtype=D)
        out[k] = center * c + scale * torch.randn(m, *shape, generator=gen(seed + i), dtype=D)
    return out


def shrink(stacked, c):
    """Same average, deviations scaled by c."""
    return {k: s.mean(0) + c * (s - s.mean(0)) for k, s in stacked.items()}


def diff(a, b):
    return norm(tree_add(a, b, alpha=-1.0))


def quadratic(seed=0):
    g = gen(seed)
    a = torch.randn(7, 7, generator=g, dtype=D)
    a = a @ a.T / 7
    b = torch.randn(7, generator=g, dtype=D)
    return lambda p: 0.5 * flatten(p) @ a @ flatten(p) + b @ flatten(p)


def quartic(p):
    return sum((v**4).sum() / 4 for v in p.values())


def test_quadratic_all_four_directions_agree():
    s = rand_stack(5, 0, center=1.0)
    dec = decompose(quadratic(), s, num_samples=3, generator=gen(1))
    assert isinstance(dec, Decomposition)
    # mean deviation is 0 and H is constant: grad Tr(H Xi) = 0 and every direction is A w_a + b;
    # antithetic pairs make the AD-SAM estimate exact, not just exact in expectation
    for g in (dec.g_sgd, dec.g_adsam, dec.g_2nd):
        assert diff(dec.g_dsgd, g) < 1e-12
    assert norm(dec.g_reg) < 1e-12
    assert max(dec.res_sgd, dec.res_adsam, dec.res_2nd) < 1e-12
    assert dec.consensus_distance == pytest.approx(consensus_distance(s))


def test_quartic_closed_forms():
    m = 4
    s = rand_stack(m, 10, center=1.0, scale=0.3)
    dec = decompose(quartic, s, num_samples=2, generator=gen(2))
    w = flatten(average(s))
    d = flatten_stacked(deviations(s))  # (m, P)
    diag_xi = (d**2).mean(0)
    # g_dsgd = (1/m) sum_j (w_a + d_j)^3,  g_2nd = w_a^3 + 3 w_a diag(Xi)
    assert torch.allclose(flatten(dec.g_dsgd), ((w + d) ** 3).mean(0), atol=1e-12)
    assert torch.allclose(flatten(dec.g_2nd), w**3 + 3 * w * diag_xi, atol=1e-12)
    assert torch.allclose(flatten(dec.g_reg), 3 * w * diag_xi, atol=1e-12)
    # the residual is exactly the third-order term (1/m) sum_j d_j^3, elementwise
    resid = flatten(dec.g_dsgd) - flatten(dec.g_2nd)
    assert torch.allclose(resid, (d**3).mean(0), atol=1e-12)
    assert dec.res_2nd == pytest.approx(float(resid.norm() / flatten(dec.g_dsgd).norm()))


def test_quartic_adsam_is_unbiased_for_second_order():
    # for L = sum w^4/4, E_eps (w + eps)^3 = w^3 + 3 w diag(Xi) = g_2nd exactly (odd moments
    # vanish); per antithetic pair the estimate is w^3 + 3 w eps^2, Var(eps_i^2) = 2 Xi_ii^2
    s = rand_stack(4, 20, center=1.0, scale=0.5)
    k = 400
    g = adsam_gradient(quartic, average(s), s, k, gen(3))
    w = flatten(average(s))
    diag_xi = (flatten_stacked(deviations(s)) ** 2).mean(0)
    se = 3 * w.abs() * diag_xi * (2 / k) ** 0.5
    err = (flatten(g) - (w**3 + 3 * w * diag_xi)).abs()
    assert torch.all(err < 5 * se + 1e-12)


def test_quartic_residual_scaling():
    s = rand_stack(4, 30, center=1.0, scale=0.2)
    big = decompose(quartic, s, num_samples=1, generator=gen(4))
    small = decompose(quartic, shrink(s, 0.1), num_samples=1, generator=gen(4))
    r2 = diff(big.g_dsgd, big.g_2nd) / diff(small.g_dsgd, small.g_2nd)
    r1 = diff(big.g_dsgd, big.g_sgd) / diff(small.g_dsgd, small.g_sgd)
    assert r2 == pytest.approx(1000.0, rel=1e-8)  # O(||d||^3), exactly cubic here
    assert 90 < r1 < 110  # O(||d||^2)
    assert small.consensus_distance == pytest.approx(big.consensus_distance / 100)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    x, y = torch.randn(32, 3, dtype=D), torch.randint(0, 3, (32,))
    params = module_params(net)
    s = {
        k: v + 0.3 * torch.randn(6, *v.shape, generator=gen(5 + i), dtype=D)
        for i, (k, v) in enumerate(params.items())
    }
    return make_loss_fn(net, x, y), s


def test_mlp_residual_scaling(mlp):
    loss_fn, s = mlp
    decs = [decompose(loss_fn, shrink(s, c), num_samples=1, generator=gen(6)) for c in (0.1, 0.01)]
    r2 = diff(decs[0].g_dsgd, decs[0].g_2nd) / diff(decs[1].g_dsgd, decs[1].g_2nd)
    r1 = diff(decs[0].g_dsgd, decs[0].g_sgd) / diff(decs[1].g_dsgd, decs[1].g_sgd)
    assert 700 < r2 < 1300  # g_dsgd - g_2nd = O(||d||^3)
    assert 90 < r1 < 110  # g_dsgd - g_sgd = O(||d||^2)
    # the second-order correction explains most of what separates D-SGD from SGD
    assert decs[0].res_2nd < 0.1 * decs[0].res_sgd
    assert decs[1].res_2nd < 0.01 * decs[1].res_sgd


def test_mlp_adsam_closer_than_sgd(mlp):
    loss_fn, s = mlp
    dec = decompose(loss_fn, shrink(s, 0.1), num_samples=32, generator=gen(7))
    assert dec.res_adsam < dec.res_sgd
    assert set(dec.summary()) >= {"consensus_distance", "res_sgd", "res_adsam", "res_2nd"}


def test_loop_equals_vmap(mlp):
    loss_fn, s = mlp
    vec = decompose(loss_fn, s, num_samples=4, generator=gen(8))
    looped = decompose(loss_fn, s, num_samples=4, generator=gen(8), vectorize=False)
    for name in ("g_dsgd", "g_sgd", "g_adsam", "g_2nd"):
        assert diff(getattr(vec, name), getattr(looped, name)) < 1e-12


def test_num_samples_validated():
    with pytest.raises(ValueError):
        decompose(quartic, rand_stack(3, 0), num_samples=0)


def test_quartic_control_variate_is_exact_for_every_draw():
    # per pair (w + e)^3 / 2 + (w - e)^3 / 2 = w^3 + 3 w e^2, and the control variate
    # (1/2) L'''[e, e, .] = 3 w e^2 removes the whole draw-dependent part: the estimate is
    # w^3 + 3 w diag(Xi) = g_2nd with zero Monte Carlo error, from only two pairs
    s = rand_stack(4, 40, center=1.0, scale=0.5)
    w = flatten(average(s))
    diag_xi = (flatten_stacked(deviations(s)) ** 2).mean(0)
    g, se = adsam_estimate(quartic, average(s), s, 2, gen(9), control_variate=True)
    assert torch.allclose(flatten(g), w**3 + 3 * w * diag_xi, atol=1e-12)
    assert norm(se) < 1e-12
    plain, plain_se = adsam_estimate(quartic, average(s), s, 2, gen(9))
    assert norm(plain_se) > 1e-3  # without it the same draws are noisy
    dec = decompose(quartic, s, num_samples=2, generator=gen(9), control_variate=True)
    assert dec.res_adsam_noise < 1e-12 and dec.control_variate


def test_mlp_noise_floor_shrinks_like_s4_with_the_control_variate_and_s2_without(mlp):
    loss_fn, s = mlp
    floors = {}
    for cv in (True, False):
        floors[cv] = [decompose(loss_fn, shrink(s, c), num_samples=16, generator=gen(10),
                                control_variate=cv).res_adsam_noise for c in (0.1, 0.05)]
    assert 12 < floors[True][0] / floors[True][1] < 20  # ~2^4
    assert 3 < floors[False][0] / floors[False][1] < 5  # ~2^2
    assert floors[True][1] < floors[False][1]
