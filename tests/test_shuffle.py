"""The two shuffles of a topology: the symmetric relabelling Pi^T P Pi and the paper's
Pi1^T P Pi2 (two independent permutations per step), in the topology, the config and the
engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dsgd.engine import Engine
from dsgd.experiments import config as C
from dsgd.topology import TopologyError, make_topology, permuted, validate


def test_paper_shuffle_is_doubly_stochastic_deterministic_and_not_a_relabelling():
    base = make_topology("ring", 16)
    paper = make_topology("ring", 16, shuffle="paper", seed=3)
    sym = make_topology("ring", 16, shuffle=True, seed=3)
    assert paper.time_varying and paper.name == "ring+paper-shuffle"
    diag_kept = 0
    for t in range(50):
        P = paper.matrix(t)
        validate(P, connected=False)  # rows and columns sum to 1
        assert torch.equal(P, permuted(base, 3, "paper").matrix(t))
        # the same multiset of weights, rows and columns permuted independently
        assert torch.equal(P.flatten().sort().values, base.matrix(0).flatten().sort().values)
        diag_kept += int((P.diagonal() != 0).sum())
        S = sym.matrix(t)
        assert torch.equal(S, S.T) and torch.all(S.diagonal() == 1 / 3)
    # ring: 3 of 16 entries per row are non-zero, so about 3/16 of the diagonal survives
    assert 0.1 < diag_kept / (50 * 16) < 0.3
    assert not torch.equal(paper.matrix(0), paper.matrix(0).T)


def test_unknown_shuffle_is_a_user_error():
    with pytest.raises(TopologyError, match="unknown shuffle"):
        permuted(make_topology("ring", 4), mode="random")


def test_config_accepts_the_shuffles_and_rejects_others():
    assert C.load(None, ["train.shuffle_topology=\"paper\""]).train.shuffle_topology == "paper"
    assert C.load(None, ["train.shuffle_topology=true"]).train.shuffle_topology is True
    assert C.load("paper_cifar10_resnet18").train.shuffle_topology == "paper"
    with pytest.raises(C.ConfigError, match="shuffle_topology"):
        C.load(None, ["train.shuffle_topology=\"sometimes\""])
    with pytest.raises(C.ConfigError, match="bool or str"):
        C.load(None, ["train.shuffle_topology=3"])


def test_engine_with_the_paper_shuffle_keeps_the_mean_and_matches_dense_gossip():
    """D-SGD with P'(t) = Pi1^T P Pi2: one gossip is w <- P'(t) w, so with lr 0 the average
    is unchanged and every step is the dense product with that step's matrix."""
    torch.manual_seed(0)
    m = 8
    topo = make_topology("ring", m, shuffle="paper", seed=1)
    engine = Engine(nn.Linear(3, 2), topo, lr=0.0)
    engine.w.copy_(torch.randn_like(engine.w))
    w0 = engine.w.clone()
    x, y = torch.randn(m, 4, 3), torch.randint(0, 2, (m, 4))
    engine.step(x, y)
    assert torch.allclose(engine.w, topo.matrix(0).to(w0) @ w0, atol=1e-6)
    assert torch.allclose(engine.w.mean(0), w0.mean(0), atol=1e-6)
