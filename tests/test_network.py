"""Faults (dropped links, stragglers) and the simulated clock against their closed forms."""

import pytest
import torch
from test_algorithms import directed as directed_topology
from torch import nn

from dsgd.engine import Engine
from dsgd.engine.network import SimulatedClock, faulty
from dsgd.topology import Topology, make_topology


def test_dropped_links_keep_an_undirected_matrix_doubly_stochastic_and_the_mean():
    topo = faulty(make_topology("torus", 16), drop=0.3, seed=2)
    x = torch.randn(16, 50, dtype=torch.float64)
    mean = x.mean(0)
    changed = 0
    for t in range(20):
        P = topo.matrix(t)
        torch.testing.assert_close(P.sum(0), torch.ones(16, dtype=torch.float64))
        torch.testing.assert_close(P.sum(1), torch.ones(16, dtype=torch.float64))
        changed += int(not torch.equal(P, make_topology("torus", 16).matrix(t)))
        x = P @ x
    torch.testing.assert_close(x.mean(0), mean, atol=1e-12, rtol=0)
    assert changed >= 15  # links really drop
    assert torch.equal(topo.matrix(7), topo.matrix(7))  # a pure function of the step


def test_no_faults_is_the_fault_free_run_bit_for_bit():
    ring = make_topology("ring", 6)
    assert faulty(ring, drop=0.0, stragglers=0.0) is ring

    def run(topo):
        torch.manual_seed(0)
        eng = Engine(nn.Linear(4, 3), topo, lr=0.1, strategy="loop")
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            eng.step(torch.randn(6, 8, 4, generator=g), torch.randint(0, 3, (6, 8), generator=g))
        return eng.w

    zero = Topology("ring+faults", 6, faulty(ring, drop=1e-300).schedule, time_varying=True)
    assert torch.equal(run(ring), run(zero))


def test_a_straggler_misses_its_gossip_for_k_steps():
    topo = faulty(make_topology("ring", 8), stragglers=0.2, straggle_steps=3, seed=4)
    ring = make_topology("ring", 8).matrix(0)
    seen = False
    for t in range(30):
        P = topo.matrix(t)
        alone = [j for j in range(8) if P[j, j] == 1.0]
        for j in alone:  # a straggler neither sends nor receives
            assert (P[j].count_nonzero(), P[:, j].count_nonzero()) == (1, 1)
            seen = True
        torch.testing.assert_close(P.sum(0), torch.ones(8, dtype=torch.float64))
        assert torch.equal(P != 0, (P != 0) & ((ring != 0) | torch.eye(8, dtype=torch.bool)))
    assert seen


def test_dropped_messages_on_a_directed_graph_keep_the_columns():
    topo = faulty(directed_topology(), drop=0.4, seed=1)
    for t in range(10):
        torch.testing.assert_close(topo.matrix(t).sum(0), torch.ones(6, dtype=torch.float64))


def test_clock_closed_forms():
    m, P = 16, 1_000_000
    clock = SimulatedClock(compute_s=0.05, latency_s=1e-3, bandwidth_bps=1e9 / 8)
    vector = 4 * P
    allreduce = clock.allreduce_step(m, vector)
    assert allreduce == pytest.approx(0.05 + 2 * (m - 1) * (1e-3 + vector / m / 1.25e8))
    ring = make_topology("ring", m).matrix(0)
    gossip = clock.gossip_step(ring, vector)
    torch.testing.assert_close(gossip, torch.full((m,), 0.05 + 1e-3 + vector / 1.25e8,
                                                  dtype=torch.float64))
    delays = torch.zeros(m, dtype=torch.float64)
    delays[3] = 0.5  # one straggler: C-SGD waits for it, gossip only at its neighbours
    assert clock.allreduce_step(m, vector, delays) == pytest.approx(allreduce + 0.5)
    late = clock.gossip_step(ring, vector, delays)
    assert set(torch.nonzero(late > gossip + 0.4).flatten().tolist()) == {2, 3, 4}
