"""The functional SGD against torch.optim.SGD, and the lr schedules' closed forms."""

import math

import pytest
import torch

from dsgd.optim import SGD
from dsgd.optim.schedule import constant, cosine, warmup_multistep


@pytest.mark.parametrize("opts", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
                                  {"weight_decay": 0.01}, {"momentum": 0.5, "weight_decay": 0.1}])
def test_sgd_equals_torch_optim_sgd(opts):
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(3, 7, generator=g)  # 3 workers, stacked
    ours = {"w": w0.clone()}
    state = SGD(**opts).init(ours)
    ref = [torch.nn.Parameter(w0[j].clone()) for j in range(3)]
    opt = torch.optim.SGD(ref, lr=0.1, **opts)
    for step in range(6):
        grads = torch.randn(3, 7, generator=g)
        lr = 0.1 * (step + 1)
        d, state = SGD(**opts).direction({"w": grads}, state, ours)
        ours = {"w": ours["w"] - lr * d["w"]}
        for j, p in enumerate(ref):
            p.grad = grads[j].clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        torch.testing.assert_close(ours["w"], torch.stack([p.detach() for p in ref]))


def test_sgd_rejects_bad_hyperparameters():
    with pytest.raises(ValueError):
        SGD(momentum=-1)
    with pytest.raises(ValueError):
        SGD(nesterov=True)


def test_schedules():
    s = warmup_multistep(0.8, warmup_steps=60, milestones=[2400, 4800], gamma=0.1)
    assert s(0) == pytest.approx(0.8 / 60) and s(59) == pytest.approx(0.8)
    assert s(2399) == pytest.approx(0.8) and s(2400) == pytest.approx(0.08)
    assert s(5999) == pytest.approx(0.008)
    c = cosine(1.0, total_steps=110, warmup_steps=10)
    assert c(9) == pytest.approx(1.0) and c(60) == pytest.approx(0.5)
    assert c(110) == pytest.approx(0.0, abs=1e-12)
    assert c(35) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert constant(0.3)(10**6) == 0.3
