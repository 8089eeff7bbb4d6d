"""Costly measurements the runner logs at evaluation time when ``log.instruments`` asks.

- ``hessian``: Hutchinson trace of H(w_a), its top eigenvalue (power iteration), and the
  consensus-weighted trace Tr(H Xi) = (1/m) sum_j d_j^T H d_j, the sharpness term D-SGD
  minimizes implicitly (Zhu et al., ICML 2023).
- ``equivalence``: relative distances of g_dsgd = (1/m) sum_j grad L(w_j) to grad L(w_a) (SGD),
  to E_{eps~N(0,Xi)} grad L(w_a + eps) (average-direction SAM; 8 antithetic pairs with the
  second-order control variate, its Monte Carlo noise floor logged beside it) and to the
  second-order prediction grad L(w_a) + grad (1/2) Tr(H Xi).
- ``uncertainty``: accuracy, NLL, ECE and Brier of the averaged model, the ensemble of local
  models and the Xi-posterior N(w_a, Xi), on the test set.

All are computed on fixed samples (the first ``log.instrument_samples`` training samples, the
first 2000 test samples), with the model in eval mode, so values are comparable across steps.
"""

from __future__ import annotations

import torch

from dsgd.errors import UserError
from dsgd.metrics._func import make_loss_fn
from dsgd.metrics.consensus import deviations
from dsgd.metrics.equivalence import decompose
from dsgd.metrics.hessian import hutchinson_trace, top_eigenvalue, xi_weighted_trace
from dsgd.metrics.uncertainty import evaluate_uncertainty

UNCERTAINTY_TEST_SAMPLES = 2000


def averaged_loss(engine, x, y):
    """``(loss_fn, w_a)``: the averaged model's loss on (x, y) as a function of its parameters
    (eval mode, averaged buffers), and its parameters."""
    avg = engine.module(engine.average_state())
    loss_fn = make_loss_fn(avg, x, y, buffers=dict(avg.named_buffers()))
    return loss_fn, {k: p.detach() for k, p in avg.named_parameters()}


def sharpness(loss_fn, w_a, stacked, *, samples: int = 20, iters: int = 30,
              generator: torch.Generator | None = None) -> dict[str, float]:
    """Hutchinson trace (and its standard error), top eigenvalue and Tr(H Xi) at w_a."""
    trace, stderr = hutchinson_trace(loss_fn, w_a, num_samples=samples, generator=generator)
    top = top_eigenvalue(loss_fn, w_a, iters=iters, tol=1e-3, generator=generator)[0]
    return {"hessian_trace": trace, "hessian_trace_stderr": stderr, "top_eigenvalue": top,
            "xi_trace": xi_weighted_trace(loss_fn, w_a, deviations(stacked))}


def measure(engine, dataset, log, seed: int = 0) -> dict[str, float]:
    if len(engine.comm.workers) != engine.m:
        raise UserError("log.instruments need every worker in one process; run them with the "
                        "simulated engine")
    gen = torch.Generator().manual_seed(seed)
    device = engine.w.device
    n = log.instrument_samples
    x, y = dataset.x_train[:n].to(device), dataset.y_train[:n].to(device)
    loss_fn, w_a = averaged_loss(engine, x, y)
    stacked = engine.params
    row: dict[str, float] = {}
    if "hessian" in log.instruments:
        row.update(sharpness(loss_fn, w_a, stacked, generator=gen))
    if "equivalence" in log.instruments and engine.m > 1:
        dec = decompose(loss_fn, stacked, num_samples=8, generator=gen, control_variate=True)
        row.update(residual_sgd=dec.res_sgd, residual_adsam=dec.res_adsam,
                   residual_adsam_noise=dec.res_adsam_noise, residual_2nd=dec.res_2nd)
    if "uncertainty" in log.instruments:
        k = UNCERTAINTY_TEST_SAMPLES
        res = evaluate_uncertainty(engine.model, stacked, engine.worker_buffers,
                                   dataset.x_test[:k].to(device), dataset.y_test[:k],
                                   num_samples=8, generator=gen)
        for kind, metrics in res.items():
            for name in ("ece", "nll", "brier", "accuracy"):
                row[f"{kind}_{name}"] = metrics[name]
    return row
