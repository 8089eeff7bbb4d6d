"""HVP-based curvature against closed forms and the full Hessian (torch.func.hessian)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, hessian

from dsgd.metrics._func import (
    flatten,
    flatten_stacked,
    make_loss_fn,
    module_params,
    unflatten,
)
from dsgd.metrics.consensus import average, deviations
from dsgd.metrics.hessian import (
    grad_xi_weighted_trace,
    hutchinson_trace,
    hvp,
    lanczos_top_k,
    second_directional,
    top_eigenvalue,
    xi_weighted_trace,
)

D = torch.float64
LIKE = {"a": torch.zeros(3, dtype=D), "b": torch.zeros(2, 2, dtype=D)}  # P = 7


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def quadratic(seed=0):
    """L(w) = 1/2 w^T A w + b^T w over two named tensors, with a clear top eigengap."""
    g = gen(seed)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=D))
    lam = torch.tensor([6.0, 3.0, 2.0, 1.0, 0.5, -0.5, -1.0], dtype=D)
    a = q @ torch.diag(lam) @ q.T
    b = torch.randn(7, generator=g, dtype=D)

    def loss_fn(p):
        w = flatten(p)
        return 0.5 * w @ a @ w + b @ w

    return loss_fn, a


def quartic(p):
    """L(w) = sum_i w_i^4 / 4: H = diag(3 w^2), grad (1/2) Tr(H Xi) = 3 w * diag(Xi)."""
    return sum((v**4).sum() / 4 for v in p.values())


def rand_params(seed):
    return unflatten(torch.randn(7, generator=gen(seed), dtype=D), LIKE)


def rand_stack(m, seed, scale=1.0):
    return {
        k: scale * torch.randn(m, *v.shape, generator=gen(seed + i), dtype=D)
        for i, (k, v) in enumerate(LIKE.items())
    }


def scaled_basis(like):
    """The probes sqrt(P) e_i, i = 1..P, stacked as {name: (P, *shape)}: (1/P) sum v v^T = I."""
    p = flatten(like).numel()
    rows = [unflatten(p**0.5 * e, like) for e in torch.eye(p, dtype=D)]
    return {k: torch.stack([r[k] for r in rows]) for k in like}


def explicit_xi(stacked):
    d = flatten_stacked(deviations(stacked))  # (m, P)
    return d.T @ d / d.shape[0]


# --- quadratic ------------------------------------------------------------------------------


def test_hvp_quadratic():
    loss_fn, a = quadratic()
    w, v = rand_params(1), rand_params(2)
    assert torch.allclose(flatten(hvp(loss_fn, w, v)), a @ flatten(v), atol=1e-12)
    assert set(hvp(loss_fn, w, v)) == {"a", "b"}


def test_hutchinson_quadratic():
    loss_fn, a = quadratic()
    w = rand_params(1)
    mean, se = hutchinson_trace(loss_fn, w, num_samples=200, generator=gen(3))
    assert abs(mean - float(torch.trace(a))) < 4 * se
    # exact with the scaled basis sqrt(P) e_i: (1/P) sum P e_i e_i^T = I
    mean, _ = hutchinson_trace(loss_fn, w, probes=scaled_basis(w))
    assert mean == pytest.approx(float(torch.trace(a)), abs=1e-12)


def test_top_eigenvalue_quadratic():
    loss_fn, a = quadratic()
    eig, vec = top_eigenvalue(loss_fn, rand_params(1), iters=500, tol=1e-12, generator=gen(4))
    assert eig == pytest.approx(6.0, abs=1e-4)
    v = flatten(vec)
    assert torch.allclose(a @ v, 6.0 * v, atol=1e-4)
    assert lanczos_top_k(loss_fn, rand_params(1), 3, iters=7, generator=gen(5)) == pytest.approx(
        torch.tensor([6.0, 3.0, 2.0], dtype=D), abs=1e-10
    )


def test_xi_weighted_trace_quadratic_and_zero_gradient():
    loss_fn, a = quadratic()
    s = rand_stack(4, 10)
    w_a, devs = average(s), deviations(s)
    want = float(torch.trace(a @ explicit_xi(s)))
    assert xi_weighted_trace(loss_fn, w_a, devs) == pytest.approx(want, rel=1e-12)
    g = grad_xi_weighted_trace(loss_fn, w_a, devs)
    assert torch.allclose(flatten(g), torch.zeros(7, dtype=D), atol=1e-12)


# --- quartic: third derivatives -------------------------------------------------------------


def test_grad_xi_weighted_trace_quartic_closed_form():
    s = rand_stack(5, 20)
    w_a, devs = average(s), deviations(s)
    w, xi = flatten(w_a), explicit_xi(s)
    assert xi_weighted_trace(quartic, w_a, devs) == pytest.approx(
        float((3 * w**2 * xi.diag()).sum()), rel=1e-12
    )
    want = 3 * w * xi.diag()
    got = flatten(grad_xi_weighted_trace(quartic, w_a, devs))
    assert torch.allclose(got, want, atol=1e-12)


def test_grad_xi_weighted_trace_quartic_finite_differences():
    s = rand_stack(3, 30)
    w_a, devs, xi = average(s), deviations(s), explicit_xi(s)

    def half_tr_hxi(w):  # (1/2) Tr(H(w) Xi) with H from torch.autograd.functional.hessian
        h = torch.autograd.functional.hessian(lambda x: quartic(unflatten(x, LIKE)), w)
        return 0.5 * torch.trace(h @ xi)

    w, h = flatten(w_a), 1e-5
    fd = torch.stack(
        [(half_tr_hxi(w + h * e) - half_tr_hxi(w - h * e)) / (2 * h) for e in torch.eye(7, dtype=D)]
    )
    got = flatten(grad_xi_weighted_trace(quartic, w_a, devs))
    assert torch.allclose(got, fd, atol=1e-7)


def test_second_directional_quartic():
    w, d = rand_params(1), rand_params(2)
    want = float((3 * flatten(w) ** 2 * flatten(d) ** 2).sum())
    assert float(second_directional(quartic, w, d)) == pytest.approx(want, rel=1e-12)


# --- tiny MLP against the full Hessian ------------------------------------------------------


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    x = torch.randn(16, 2, dtype=D)
    y = torch.randint(0, 3, (16,))
    loss_fn = make_loss_fn(net, x, y)
    params = module_params(net)  # P = 12 + 15 = 27

    def flat_loss(v):
        return loss_fn(unflatten(v, params))

    h = hessian(flat_loss)(flatten(params))  # (P, P), tests only
    return loss_fn, params, flat_loss, h


def test_mlp_hvp_trace_eigs(mlp):
    loss_fn, params, _, h = mlp
    p = h.shape[0]
    v = unflatten(torch.randn(p, generator=gen(1), dtype=D), params)
    assert torch.allclose(flatten(hvp(loss_fn, params, v)), h @ flatten(v), atol=1e-12)

    assert hutchinson_trace(loss_fn, params, probes=scaled_basis(params))[0] == pytest.approx(
        float(torch.trace(h)), abs=1e-10
    )
    mean, se = hutchinson_trace(loss_fn, params, num_samples=200, generator=gen(2))
    assert abs(mean - float(torch.trace(h))) < 4 * se
    looped = hutchinson_trace(loss_fn, params, 10, gen(2), vectorize=False)
    assert looped == pytest.approx(hutchinson_trace(loss_fn, params, 10, gen(2)), rel=1e-10)

    ev = torch.linalg.eigvalsh(h)
    top = ev[ev.abs().argmax()]
    eig, _ = top_eigenvalue(loss_fn, params, iters=2000, tol=1e-12, generator=gen(3))
    assert eig == pytest.approx(float(top), rel=1e-4)
    lz = lanczos_top_k(loss_fn, params, 4, iters=p, generator=gen(4))
    assert torch.allclose(lz, ev.flip(0)[:4], atol=1e-8)


def test_mlp_xi_weighted_trace_and_gradient(mlp):
    loss_fn, params, flat_loss, h = mlp
    s = {
        k: v + 0.1 * torch.randn(4, *v.shape, generator=gen(5), dtype=D) for k, v in params.items()
    }
    w_a, devs, xi = average(s), deviations(s), explicit_xi(s)
    w = flatten(w_a)
    h_a = hessian(flat_loss)(w)
    assert xi_weighted_trace(loss_fn, w_a, devs) == pytest.approx(
        float(torch.trace(h_a @ xi)), rel=1e-10
    )
    # the loop over workers gives the same numbers as the vmap
    assert xi_weighted_trace(loss_fn, w_a, devs, vectorize=False) == pytest.approx(
        xi_weighted_trace(loss_fn, w_a, devs), rel=1e-12
    )
    looped = grad_xi_weighted_trace(loss_fn, w_a, devs, vectorize=False)
    assert torch.allclose(flatten(looped), flatten(grad_xi_weighted_trace(loss_fn, w_a, devs)))
    # exact: reverse mode through the explicitly formed Hessian, w -> (1/2) Tr(H(w) Xi)
    got = flatten(grad_xi_weighted_trace(loss_fn, w_a, devs))
    want = grad(lambda v: 0.5 * torch.trace(hessian(flat_loss)(v) @ xi))(w)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-14)
    # and central finite differences of (1/2) Tr(H(w) Xi) along random directions u
    for seed in range(2):
        u = torch.randn(w.numel(), generator=gen(100 + seed), dtype=D)
        eps = 1e-5
        hp, hm = hessian(flat_loss)(w + eps * u), hessian(flat_loss)(w - eps * u)
        fd = 0.5 * torch.trace((hp - hm) @ xi) / (2 * eps)
        assert float(got @ u) == pytest.approx(float(fd), rel=1e-5, abs=1e-10)


# --- make_loss_fn ---------------------------------------------------------------------------


def test_make_loss_fn_eval_mode_and_buffers_untouched():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    net.train()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    before = {k: b.clone() for k, b in net.named_buffers()}
    params = module_params(net)
    for train_mode in (False, True):
        loss_fn = make_loss_fn(net, x, y, train_mode=train_mode)
        grad(loss_fn)(params)
        hvp(loss_fn, params, params)
        assert net.training  # restored
        for k, b in net.named_buffers():
            assert torch.equal(b, before[k]), k
    net.eval()
    assert make_loss_fn(net, x, y)(params).item() == pytest.approx(
        F.cross_entropy(net(x), y).item()
    )
