"""Free uncertainty from D-SGD's local models (Zhu et al. 2023, advantage 1).

The m local models of a D-SGD run are spread around their average w_a with the consensus
covariance Xi = (1/m) sum_j (w_j - w_a)(w_j - w_a)^T; that spread estimates a posterior
covariance of the weights at no extra training cost. Three predictive distributions compare:

    averaged   p(y|x, w_a)                                    the model D-SGD reports
    ensemble   (1/m) sum_j p(y|x, w_j)                        the local models as an ensemble
    posterior  (1/S) sum_s p(y|x, w_a + eps_s), eps_s ~ N(0, Xi)   Gaussian posterior samples,
               drawn with the low-rank sampler ``dsgd.treemath.sample_xi`` (as in SWAG,
               Maddox et al. 2019, with D-SGD's local models in place of SGD iterates)

Metrics take class probabilities ``probs`` (N, C) and integer ``labels`` (N,); for logits pass
``logits.softmax(-1)``. They return Python floats, averaged over the N examples.
``member_spread`` says how different the local models' predictions are (all three coincide
when it is 0). The reliability diagram is ``dsgd.report.figures.plot_reliability``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import functional_call

from dsgd._types import Params, Stacked
from dsgd.treemath import deviations
from dsgd.treemath import sample_xi as sample_low_rank

_TINY = 1e-12  # clamps log(0) in nll / entropy


# ---------------------------------------------------------------- metrics (pure functions)


def accuracy(probs: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose arg-max class is the label."""
    return (probs.argmax(-1) == labels).double().mean().item()


def nll(probs: Tensor, labels: Tensor) -> float:
    """Negative log-likelihood ``-(1/N) sum_i log p_i[y_i]`` (nats)."""
    p = probs.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)  # (N,)
    return -p.double().clamp_min(_TINY).log().mean().item()


def brier(probs: Tensor, labels: Tensor) -> float:
    """Multi-class Brier score ``(1/N) sum_i sum_c (p_ic - 1[y_i = c])^2`` (Brier 1950)."""
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[-1]).to(probs)  # (N, C)
    return (probs - onehot).double().pow(2).sum(-1).mean().item()


def predictive_entropy(probs: Tensor) -> float:
    """Mean entropy of the predictive distribution ``-(1/N) sum_i sum_c p_ic log p_ic`` (nats)."""
    p = probs.double()
    return -(p * p.clamp_min(_TINY).log()).sum(-1).mean().item()


def reliability_curve(
    probs: Tensor, labels: Tensor, n_bins: int = 15
) -> tuple[Tensor, Tensor, Tensor]:
    """Confidence binned into ``n_bins`` equal-width bins (lo, hi] of [0, 1] (Guo et al. 2017).

    Returns ``(bin_conf, bin_acc, bin_count)``, each (n_bins,): the mean confidence (max prob)
    and the accuracy of the examples in each bin, NaN for empty bins, and their number.
    """
    conf, pred = probs.double().max(-1)  # (N,), (N,)
    correct = (pred == labels).double()  # (N,)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1].to(conf.device))  # edges[i] < conf <= edges[i+1]
    count = torch.zeros(n_bins, dtype=torch.float64, device=conf.device)
    count.index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).index_add_(0, idx, conf)
    acc_sum = torch.zeros_like(count).index_add_(0, idx, correct)
    return conf_sum / count, acc_sum / count, count.long()  # 0/0 -> NaN for empty bins


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|`` (Naeini et al. 2015;
    Guo et al. 2017), equal-width confidence bins."""
    bin_conf, bin_acc, bin_count = reliability_curve(probs, labels, n_bins)
    gap = (bin_acc - bin_conf).abs().nan_to_num(0.0)  # empty bins weigh 0
    return (bin_count.double() * gap).sum().item() / bin_count.sum().item()


def summarize(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """All the metrics above for one predictive distribution."""
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "ece": ece(probs, labels, n_bins),
        "brier": brier(probs, labels),
        "entropy": predictive_entropy(probs),
    }


# ---------------------------------------------------------------- model-side helpers


def _row(stacked: Mapping[str, Tensor] | None, j: int) -> Params:
    return {k: v[j] for k, v in (stacked or {}).items()}


def _average(stacked: Mapping[str, Tensor] | None) -> Params:
    """Mean over workers for floating tensors; worker 0's value for integer ones (counters)."""
    out = {}
    for k, v in (stacked or {}).items():
        out[k] = v.mean(0) if v.is_floating_point() else v[0]
    return out


@torch.no_grad()
def _probs(module: torch.nn.Module, params: Params, buffers: Params, x: Tensor, batch_size: int):
    """Softmax outputs of ``module`` at (params, buffers) on x, in eval mode: (N, C)."""
    was_training = module.training
    module.eval()
    try:
        out = [
            functional_call(module, (params, buffers), (xb,)).softmax(-1)
            for xb in x.split(batch_size)
        ]
    finally:
        module.train(was_training)
    return torch.cat(out)


def ensemble_probs(
    module: torch.nn.Module,
    stacked_params: Stacked,  # {name: (m, *shape)}
    stacked_buffers: Stacked | None,  # {name: (m, *shape)}, e.g. BatchNorm statistics
    x: Tensor,  # (N, *input_shape)
    batch_size: int = 1024,
) -> Tensor:
    """``(1/m) sum_j softmax(f(x; w_j))``: the local models as an ensemble, (N, C)."""
    m = next(iter(stacked_params.values())).shape[0]
    total = None
    for j in range(m):
        p = _probs(module, _row(stacked_params, j), _row(stacked_buffers, j), x, batch_size)
        total = p if total is None else total + p
    return total / m


@torch.no_grad()
def member_spread(
    module: torch.nn.Module,
    stacked_params: Stacked,
    stacked_buffers: Stacked | None,
    x: Tensor,
    batch_size: int = 1024,
) -> dict[str, float]:
    """How different the m local models' predictions are: ``members`` (m), ``disagreement``
    (the mean fraction of members whose top class differs from the ensemble's) and
    ``prob_spread`` (the mean total-variation distance (1/2) ||p_j - p_ens||_1 of a member's
    predictive distribution to the ensemble's). Both are 0 when the models agree, as after
    consensus, where ensemble and posterior are the averaged model."""
    m = next(iter(stacked_params.values())).shape[0]
    probs = torch.stack([_probs(module, _row(stacked_params, j), _row(stacked_buffers, j), x,
                                batch_size) for j in range(m)])  # (m, N, C)
    ens = probs.mean(0)
    return {"members": m,
            "disagreement": float((probs.argmax(-1) != ens.argmax(-1)).double().mean()),
            "prob_spread": float(0.5 * (probs - ens).abs().sum(-1).double().mean())}


def averaged_probs(
    module: torch.nn.Module,
    stacked_params: Stacked,
    stacked_buffers: Stacked | None,
    x: Tensor,
    batch_size: int = 1024,
) -> Tensor:
    """``softmax(f(x; w_a))`` for the averaged model, (N, C).

    Floating buffers (BatchNorm running statistics) are averaged over workers like the weights;
    recompute them on training data for exact statistics of w_a.
    """
    params, buffers = _average(stacked_params), _average(stacked_buffers)
    return _probs(module, params, buffers, x, batch_size)


def posterior_probs(
    module: torch.nn.Module,
    stacked: Stacked,  # {name: (m, *shape)}: the local models' parameters
    x: Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
    *,
    stacked_buffers: Stacked | None = None,
    batch_size: int = 1024,
) -> Tensor:
    """``(1/S) sum_s softmax(f(x; w_a + eps_s))``, eps_s ~ N(0, Xi) with Xi the consensus
    covariance of ``stacked``, drawn low-rank (``consensus.sample_xi_stacked``), (N, C).

    Buffers are the workers' average, as in ``averaged_probs``.
    """
    w_a = _average(stacked)
    devs = deviations(stacked)  # d_j = w_j - w_a, {name: (m, *shape)}
    buffers = _average(stacked_buffers)
    total = None
    for _ in range(num_samples):  # one draw at a time: memory stays at one model
        eps = sample_low_rank(devs, 1, generator)  # {name: (1, *shape)}
        w = {k: w_a[k] + eps[k][0] for k in w_a}
        p = _probs(module, w, buffers, x, batch_size)
        total = p if total is None else total + p
    return total / num_samples


def evaluate_uncertainty(
    module: torch.nn.Module,
    stacked_params: Stacked,
    stacked_buffers: Stacked | None,
    x: Tensor,
    labels: Tensor,  # (N,)
    *,
    num_samples: int = 16,
    generator: torch.Generator | None = None,
    n_bins: int = 15,
    batch_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """``summarize`` for the "averaged", "ensemble" and "posterior" predictive distributions."""
    probs = {
        "averaged": averaged_probs(module, stacked_params, stacked_buffers, x, batch_size),
        "ensemble": ensemble_probs(module, stacked_params, stacked_buffers, x, batch_size),
        "posterior": posterior_probs(
            module,
            stacked_params,
            x,
            num_samples,
            generator,
            stacked_buffers=stacked_buffers,
            batch_size=batch_size,
        ),
    }
    labels = labels.to(x.device)
    return {name: summarize(p, labels, n_bins) for name, p in probs.items()}
