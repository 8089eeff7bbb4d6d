"""Faults (dropped links, stragglers) and the simulated clock against their closed forms."""

import json

import pytest
import torch
from test_algorithms import directed as directed_topology
from torch import nn

from dsgd.engine import Engine
from dsgd.engine.network import NetworkClock, SimulatedClock, faulty, straggling
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


C, LAT, BW = 0.01, 1e-3, 1.25e8  # compute s, latency s, bytes/s (1 Gbit/s)
VEC = 4e6  # a 1M-parameter float32 vector


def ring_clock(m=16, **kw):
    return NetworkClock(SimulatedClock(C, LAT, BW), make_topology("ring", m), **kw)


def test_the_clock_of_a_run_is_the_sum_of_its_steps_closed_forms():
    m, n = 16, 7
    gossip, allreduce = ring_clock(m), ring_clock(m)
    for t in range(n):
        g = gossip.advance(t, [("gossip", t, VEC)])
        a = allreduce.advance(t, [("allreduce", -1, VEC)])
    assert g == pytest.approx(n * (C + LAT + VEC / BW))
    assert a == pytest.approx(n * (C + 2 * (m - 1) * (LAT + VEC / m / BW)))
    # compressed C-SGD: a ring all-gather of one message each, m - 1 hops of a whole message
    gather, message = ring_clock(m), VEC / 50
    for t in range(n):
        ag = gather.advance(t, [("allgather", -1, message)])
    assert ag == pytest.approx(n * (C + (m - 1) * (LAT + message / BW)))
    delays = torch.zeros(m, dtype=torch.float64)
    delays[5] = 0.5  # like the all-reduce, it waits for the slowest worker
    assert ring_clock(m).advance(0, [("allgather", -1, message)], delays=delays) == (
        pytest.approx(C + 0.5 + (m - 1) * (LAT + message / BW)))
    # two rounds in a step (gradient tracking's x and y) cost two message times
    two = ring_clock(m)
    assert two.advance(0, [("gossip", 0, VEC), ("gossip", 0, VEC)]) == pytest.approx(
        C + 2 * (LAT + VEC / BW))
    # a step without communication (local SGD between its averagings) is compute only
    assert ring_clock(m).advance(0, []) == pytest.approx(C)


def test_a_delay_spreads_one_hop_a_step_in_gossip_and_blocks_an_all_reduce_at_once():
    m, d = 16, 0.5
    delays = torch.zeros(m, dtype=torch.float64)
    delays[3] = d
    clock, step = ring_clock(m), C + LAT + VEC / BW
    for t in range(5):
        clock.advance(t, [("gossip", t, VEC)], delays=delays if t == 0 else None)
        hops = torch.tensor([min(abs(j - 3), m - abs(j - 3)) for j in range(m)])
        expected = (t + 1) * step + d * (hops <= t + 1).double()  # neighbours wait at round 0
        torch.testing.assert_close(clock.finish, expected)
    ar = ring_clock(m)
    ar.advance(0, [("allreduce", -1, VEC)], delays=delays)
    assert torch.all(ar.finish == ar.finish[0])  # everyone waited for worker 3


def test_delays_at_distant_workers_cost_their_maximum_in_gossip_their_sum_in_all_reduce():
    m, d, n = 16, 0.5, 20
    gossip, allreduce = ring_clock(m), ring_clock(m)
    for t in range(n):
        delays = torch.zeros(m, dtype=torch.float64)
        if t in (0, 1):
            delays[0 if t == 0 else 8] = d  # opposite sides of the ring, one step apart
        g = gossip.advance(t, [("gossip", t, VEC)], delays=delays)
        a = allreduce.advance(t, [("allreduce", -1, VEC)], delays=delays)
    assert g == pytest.approx(n * (C + LAT + VEC / BW) + d)
    assert a == pytest.approx(n * (C + 2 * (m - 1) * (LAT + VEC / m / BW)) + 2 * d)


def test_a_straggler_that_misses_the_gossip_is_not_waited_for():
    m, d = 16, 0.5
    topo = faulty(make_topology("ring", m), stragglers=0.05, straggle_steps=1, seed=3)
    late = next(t for t in range(100) if straggling(m, t, 0.05, 1, 3).sum() == 1)
    who = int(torch.nonzero(straggling(m, late, 0.05, 1, 3))[0])
    clock = NetworkClock(SimulatedClock(C, LAT, BW), topo, delay_s=d, stragglers=0.05,
                         straggle_steps=1, seed=3)
    clock.finish.zero_()
    clock.advance(late, [("gossip", late, VEC)])
    # its links are dropped this step: nobody waits, and it sends and receives nothing
    expected = torch.full((m,), C + LAT + VEC / BW, dtype=torch.float64)
    expected[who] = C + d
    torch.testing.assert_close(clock.finish, expected)


def test_eval_rows_log_the_simulated_time_of_the_run(tmp_path):
    from cli_helpers import sets

    from dsgd.experiments.cli import main

    net = ("network.compute_ms=2", "network.latency_ms=1", "network.bandwidth_gbps=1",
           "train.steps=10", "log.eval_every=10")
    times = {}
    for algo in ("dsgd", "csgd"):
        out = tmp_path / algo
        assert main(["train", *sets(f"train.algorithm={algo}", *net), "--out", str(out)]) == 0
        row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
        times[algo] = row["sim_time_s"], row["bytes_per_worker_step"], row["bytes_per_worker"]
    P4 = times["dsgd"][1] / 2  # the ring sends the float32 vector to two neighbours
    m = 4
    assert times["dsgd"][0] == pytest.approx(10 * (2e-3 + 1e-3 + P4 / BW))
    assert times["csgd"][0] == pytest.approx(10 * (2e-3 + 2 * (m - 1) * (1e-3 + P4 / m / BW)))
    assert times["csgd"][1] == 2 * (m - 1) / m * P4  # one ring all-reduce per step
    assert times["dsgd"][2] == 10 * times["dsgd"][1]  # cumulative bytes since step 0
