"""Loss-landscape slices against closed forms; filter normalization of Li et al. 2018."""

from __future__ import annotations

import math

import torch

from dsgd.metrics.landscape import (
    filter_normalize,
    interpolate,
    random_direction,
    surface_2d,
)
from dsgd.report.figures import plot_interpolation, plot_surface

D64 = torch.float64
SHAPES = {"conv.weight": (4, 2, 3, 3), "conv.bias": (4,), "bn.weight": (4,), "fc.weight": (3, 5)}
P = sum(math.prod(s) for s in SHAPES.values())


def params(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=D64) for k, s in SHAPES.items()}


def flat(p):
    return torch.cat([p[k].flatten() for k in SHAPES])


def quadratic(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(P, P, generator=g, dtype=D64)
    A = q @ q.T / P
    return A, lambda p: 0.5 * flat(p) @ A @ flat(p)


def test_interpolation_endpoints_exact():
    w0, w1 = params(1), params(2)
    loss = lambda p: (flat(p).sin() * flat(p).exp()).sum()  # noqa: E731  (non-quadratic)
    alphas, losses = interpolate(loss, w0, w1, [0.0, 0.3, 1.0, 1.5])
    assert losses[0].item() == loss(w0).item()
    assert losses[2].item() == loss(w1).item()
    mid = {k: 0.7 * w0[k] + 0.3 * w1[k] for k in w0}
    assert math.isclose(losses[1].item(), loss(mid).item(), rel_tol=1e-12)
    assert alphas.tolist() == [0.0, 0.3, 1.0, 1.5]
    assert interpolate(loss, w0, w1)[1].shape == (21,)


def test_interpolation_quadratic_closed_form():
    A, loss = quadratic()
    w0, w1 = params(1), params(2)
    x0, x1 = flat(w0), flat(w1)
    alphas, losses = interpolate(loss, w0, w1, torch.linspace(-0.5, 1.5, 9))
    for a, l in zip(alphas.tolist(), losses.tolist(), strict=True):
        x = (1 - a) * x0 + a * x1
        assert math.isclose(l, (0.5 * x @ A @ x).item(), rel_tol=1e-10)


def test_filter_normalization_matches_filter_norms_and_zeroes_biasbn():
    w = params(3)
    d = random_direction(w, torch.Generator().manual_seed(0))
    for k in ("conv.weight", "fc.weight"):  # per output channel / per row
        torch.testing.assert_close(d[k].flatten(1).norm(dim=1), w[k].flatten(1).norm(dim=1))
    assert (d["conv.bias"] == 0).all() and (d["bn.weight"] == 0).all()
    kept = filter_normalize(d, w, ignore_biasbn=False)
    assert torch.equal(kept["conv.bias"], w["conv.bias"])
    # direction only matters up to a positive per-filter scale
    doubled = filter_normalize({k: 2.0 * v for k, v in d.items()}, w)
    torch.testing.assert_close(doubled["fc.weight"], d["fc.weight"])


def test_surface_2d_quadratic_closed_form():
    A, loss = quadratic()
    w = params(4)
    steps, span = 5, 0.8
    alphas, betas, Z = surface_2d(loss, w, steps, span, torch.Generator().manual_seed(7))
    assert Z.shape == (steps, steps)
    torch.testing.assert_close(alphas, torch.linspace(-span, span, steps, dtype=D64))
    gen = torch.Generator().manual_seed(7)  # same draws, in the documented order d1, d2
    d1, d2 = flat(random_direction(w, gen)), flat(random_direction(w, gen))
    x = flat(w)
    g = A @ x
    for i, a in enumerate(alphas.tolist()):
        for k, b in enumerate(betas.tolist()):
            expect = (
                0.5 * x @ g
                + a * g @ d1
                + b * g @ d2
                + 0.5 * (a * a * d1 @ A @ d1 + 2 * a * b * d1 @ A @ d2 + b * b * d2 @ A @ d2)
            )
            assert math.isclose(Z[i, k].item(), expect.item(), rel_tol=1e-10, abs_tol=1e-10)
    centre = steps // 2
    assert math.isclose(Z[centre, centre].item(), loss(w).item(), rel_tol=1e-12)


def test_surface_2d_seeded_and_given_directions():
    _, loss = quadratic()
    w = params(5)
    z1 = surface_2d(loss, w, 3, 1.0, torch.Generator().manual_seed(1))[2]
    z2 = surface_2d(loss, w, 3, 1.0, torch.Generator().manual_seed(1))[2]
    assert torch.equal(z1, z2)
    gen = torch.Generator().manual_seed(1)
    dirs = (random_direction(w, gen), random_direction(w, gen))
    assert torch.equal(surface_2d(loss, w, 3, 1.0, directions=dirs)[2], z1)


def test_plots_write_png(tmp_path):
    _, loss = quadratic()
    w0, w1 = params(1), params(2)
    a, b, Z = surface_2d(loss, w0, 5, 1.0, torch.Generator().manual_seed(0))
    plot_surface(a, b, Z, tmp_path / "surface.png", levels=10, title="quadratic")
    plot_interpolation({"w0 -> w1": interpolate(loss, w0, w1)}, tmp_path / "interp.png")
    for name in ("surface.png", "interp.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
