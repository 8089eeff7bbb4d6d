"""Calibration and uncertainty metrics against hand-computed values; the local-model ensemble."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dsgd.metrics.uncertainty import (
    accuracy,
    averaged_probs,
    brier,
    ece,
    ensemble_probs,
    evaluate_uncertainty,
    nll,
    posterior_probs,
    predictive_entropy,
    reliability_curve,
)
from dsgd.report.figures import plot_reliability

D64 = torch.float64


def test_ece_perfectly_calibrated_is_zero():
    # in each bin the fraction correct equals the (constant) confidence exactly
    probs, labels = [], []
    for conf, n, n_right in [(0.55, 20, 11), (0.7, 10, 7), (0.75, 20, 15), (0.9, 10, 9)]:
        probs += [[conf, 1 - conf]] * n
        labels += [0] * n_right + [1] * (n - n_right)
    probs, labels = torch.tensor(probs, dtype=D64), torch.tensor(labels)
    assert abs(ece(probs, labels)) < 1e-12
    assert abs(ece(probs, labels, n_bins=10)) < 1e-12


def test_ece_hand_computed():
    probs = torch.tensor(
        [[0.85, 0.10, 0.05], [0.75, 0.20, 0.05], [0.20, 0.65, 0.15], [0.25, 0.20, 0.55]], dtype=D64
    )
    labels = torch.tensor([0, 1, 1, 2])  # right, wrong, right, right
    # 5 bins (0.2 wide): 0.55 -> (0.4, 0.6]; 0.65, 0.75 -> (0.6, 0.8]; 0.85 -> (0.8, 1]
    expect = 0.25 * 0.45 + 0.5 * abs(0.5 - 0.70) + 0.25 * 0.15
    assert math.isclose(ece(probs, labels, n_bins=5), expect, rel_tol=1e-12)
    conf, acc, count = reliability_curve(probs, labels, n_bins=5)
    assert count.tolist() == [0, 0, 1, 2, 1]
    torch.testing.assert_close(conf[2:], torch.tensor([0.55, 0.70, 0.85], dtype=D64))
    torch.testing.assert_close(acc[2:], torch.tensor([1.0, 0.5, 1.0], dtype=D64))
    assert torch.isnan(conf[:2]).all() and torch.isnan(acc[:2]).all()


def test_ece_matches_loop_reference():
    # the loop of Guo et al. 2017's reference code: bin_lower < conf <= bin_upper
    g = torch.Generator().manual_seed(0)
    probs = torch.randn(500, 4, generator=g, dtype=D64).mul(2).softmax(-1)
    labels = torch.randint(0, 4, (500,), generator=g)
    conf, pred = probs.max(-1)
    right = (pred == labels).double()
    edges = torch.linspace(0, 1, 16, dtype=D64)
    ref = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        inb = (conf > lo) & (conf <= hi)
        if inb.any():
            ref += inb.double().mean().item() * abs(right[inb].mean() - conf[inb].mean()).item()
    assert math.isclose(ece(probs, labels), ref, rel_tol=1e-12)


def test_nll_brier_entropy_accuracy_hand_computed():
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], dtype=D64)
    labels = torch.tensor([0, 2])
    assert math.isclose(nll(probs, labels), -(math.log(0.5) + math.log(0.1)) / 2)
    # (0.25 + 0.0625 + 0.0625) + (0.01 + 0.64 + 0.81)
    assert math.isclose(brier(probs, labels), (0.375 + 1.46) / 2)
    h1 = 1.5 * math.log(2)
    h2 = -(0.2 * math.log(0.1) + 0.8 * math.log(0.8))
    assert math.isclose(predictive_entropy(probs), (h1 + h2) / 2)
    assert accuracy(probs, labels) == 0.5
    assert math.isfinite(nll(torch.tensor([[1.0, 0.0]]), torch.tensor([1])))


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )


def _stack(modules):
    params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in modules])
              for k, _ in modules[0].named_parameters()}  # fmt: skip
    buffers = {k: torch.stack([dict(m.named_buffers())[k] for m in modules])
               for k, _ in modules[0].named_buffers()}  # fmt: skip
    return params, buffers


def _perturbed(net, seed):
    other = copy.deepcopy(net)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        other[1].running_mean.add_(0.1 * torch.randn(8, generator=g))
        other[1].running_var.mul_(1.5)
    return other


def test_ensemble_of_identical_models_is_the_model():
    net = _net()
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(37, 5)
    net.eval()
    single = net(x).softmax(-1)
    net.train()
    params, buffers = _stack([net] * 4)
    ens = ensemble_probs(net, params, buffers, x, batch_size=10)
    torch.testing.assert_close(ens, single, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(averaged_probs(net, params, buffers, x), single)
    post = posterior_probs(net, params, x, 3, torch.Generator(), stacked_buffers=buffers)
    torch.testing.assert_close(post, single)  # Xi = 0: every sample is w_a
    assert net.training  # mode restored


def test_ensemble_is_mean_of_local_models():
    net = _net()
    models = [net, _perturbed(net, 1), _perturbed(net, 2)]
    params, buffers = _stack(models)
    x = torch.randn(20, 5)
    for m in models:
        m.eval()
    expect = sum(m(x).softmax(-1) for m in models) / 3
    torch.testing.assert_close(ensemble_probs(net, params, buffers, x), expect)


def test_evaluate_uncertainty_and_plot(tmp_path):
    net = _net()
    params, buffers = _stack([net, _perturbed(net, 1), _perturbed(net, 2), _perturbed(net, 3)])
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    gen = torch.Generator().manual_seed(0)
    out = evaluate_uncertainty(net, params, buffers, x, y, num_samples=4, generator=gen)
    assert set(out) == {"averaged", "ensemble", "posterior"}
    for metrics in out.values():
        assert set(metrics) == {"accuracy", "nll", "ece", "brier", "entropy"}
        assert all(math.isfinite(v) for v in metrics.values())
    probs = ensemble_probs(net, params, buffers, x)
    path = tmp_path / "reliability.png"
    plot_reliability({"ensemble": reliability_curve(probs, y, 10)}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_member_spread_is_zero_at_consensus_and_measures_disagreement():
    from torch import nn

    from dsgd.metrics.uncertainty import member_spread

    net = nn.Linear(2, 2, bias=False).to(D64)
    x = torch.tensor([[1.0, 0.0]], dtype=D64)
    same = {"weight": torch.eye(2, dtype=D64).expand(3, 2, 2).contiguous()}
    out = member_spread(net, same, None, x)
    assert out == {"members": 3, "disagreement": 0.0, "prob_spread": 0.0}
    # two members, logits (+a, -a) and (-a, +a) for class 0/1: p = (s, 1-s) and (1-s, s)
    a = 1.0
    w = torch.stack([torch.tensor([[a, 0.0], [-a, 0.0]]), torch.tensor([[-a, 0.0], [a, 0.0]])])
    out = member_spread(net, {"weight": w.to(D64)}, None, x)
    s = torch.sigmoid(torch.tensor(2 * a, dtype=D64)).item()
    assert out["prob_spread"] == pytest.approx(abs(s - 0.5))  # TV to the uniform ensemble
    assert out["members"] == 2
