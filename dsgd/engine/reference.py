"""The slow, obviously correct engine the fast one is tested against.

m deep copies of an nn.Module, each with its own ``torch.optim.SGD``; one forward/backward per
worker; gossip by copying state dicts, as the paper's code does. D-SGD's step

    w_j(t+1) = sum_k P[j, k] w_k(t) - eta * u_j(t)

is computed literally: snapshot every w_k(t), let torch.optim.SGD take w_j(t) to
w_j(t) - eta * u_j(t), then add sum_k P[j, k] w_k(t) - w_j(t).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsgd.optim.schedule import Schedule, constant
from dsgd.topology import Topology


class ReferenceEngine:
    def __init__(self, model: nn.Module, topology: Topology, *, lr: float | Schedule = 0.1,
                 momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 algorithm: str = "dsgd", gossip_every: int = 1, buffers: str = "gossip",
                 loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy):
        self.topology, self.m = topology, topology.m
        self.lr = lr if callable(lr) else constant(float(lr))
        self.algorithm, self.gossip_every, self.buffers, self.loss = (
            algorithm, gossip_every, buffers, loss)
        self.workers = [copy.deepcopy(model) for _ in range(self.m)]
        self.opts = [torch.optim.SGD(w.parameters(), lr=1.0, momentum=momentum,
                                     nesterov=nesterov, weight_decay=weight_decay)
                     for w in self.workers]
        self.step_count = 0

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        t, lr = self.step_count, float(self.lr(self.step_count))
        losses = []
        for j, (w, opt) in enumerate(zip(self.workers, self.opts)):
            w.train()
            opt.zero_grad()
            loss = self.loss(w(x[j]), y[j])
            loss.backward()
            losses.append(loss.item())
        if self.algorithm == "csgd":
            for ps in zip(*(w.parameters() for w in self.workers)):
                mean = torch.stack([p.grad for p in ps]).mean(0)
                for p in ps:
                    p.grad = mean.clone()
        before = [copy.deepcopy(w.state_dict()) for w in self.workers]  # w_k(t), buffers
        for opt in self.opts:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        gossip = self.algorithm == "dsgd" and (t + 1) % self.gossip_every == 0
        P = self.topology.matrix(t).to(next(self.workers[0].parameters()).dtype)
        for j, w in enumerate(self.workers):
            with torch.no_grad():
                for name, p in w.named_parameters():
                    if gossip:
                        p += sum(P[j, k] * before[k][name] for k in range(self.m)) - before[j][name]
                for name, b in w.named_buffers():
                    if not b.is_floating_point() or self.buffers != "gossip":
                        continue
                    if gossip:
                        b.copy_(sum(P[j, k] * before[k][name] for k in range(self.m)))
                    elif self.algorithm == "csgd":
                        b.copy_(sum(before[k][name] for k in range(self.m)) / self.m)
        self.step_count += 1
        return torch.tensor(losses)

    def average_state(self) -> dict[str, Tensor]:
        states = [w.state_dict() for w in self.workers]
        return {n: (sum(s[n] for s in states) / self.m if v.is_floating_point() else v)
                for n, v in states[0].items()}

    def worker_params(self) -> dict[str, Tensor]:
        """{name: (m, *shape)} stacked from the modules."""
        return {n: torch.stack([dict(w.named_parameters())[n].detach() for w in self.workers])
                for n, _ in self.workers[0].named_parameters()}
