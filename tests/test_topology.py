import math

import networkx as nx
import pytest
import torch

from dsgd import topology as T
from dsgd.errors import UserError

ALL_STATIC = ["ring", "grid", "torus", "exponential", "complete", "star", "random_regular"]


@pytest.mark.parametrize("name", ALL_STATIC + ["one_peer_exponential"])
@pytest.mark.parametrize("m", [1, 2, 4, 9, 16])
def test_every_topology_is_a_valid_mixing_matrix(name, m):
    if name == "random_regular" and m < 6:
        pytest.skip("needs m > degree")
    topo = T.make_topology(name, m)
    mats = [T.validate(topo.matrix(step), connected=not topo.time_varying) for step in range(5)]
    assert all(P.shape == (m, m) for P in mats)
    T.validate(sum(mats) / len(mats))  # connected over a window


@pytest.mark.parametrize("name,lam2", [("ring", 0.949), ("grid", 0.869), ("exponential", 0.600)])
def test_paper_spectral_figures_m16(name, lam2):
    P = T.make_topology(name, 16).matrix(0)
    assert T.second_eigenvalue(P) == pytest.approx(lam2, abs=5e-4)
    assert T.spectral_gap(P) == pytest.approx(1 - lam2, abs=5e-4)


def test_paper_weights():
    ring, exp, grid = T.ring(16), T.exponential(16), T.grid(16)
    assert torch.allclose(ring[3, [2, 3, 4]], torch.full((3,), 1 / 3, dtype=torch.float64))
    assert set(torch.nonzero(exp[0]).flatten().tolist()) == {0, 1, 2, 4, 8}
    assert torch.allclose(exp[0, [0, 1, 2, 4, 8]], torch.full((5,), 0.2, dtype=torch.float64))
    assert not torch.allclose(exp, exp.T)  # directed, as the paper's
    # grid corner (deg 2, self counted: 3) to edge node (deg 3 -> 4): 1/4
    assert grid[0, 1].item() == pytest.approx(1 / 4)
    assert grid[5, 6].item() == pytest.approx(1 / 5)  # two interior nodes (deg 4 -> 5)


def test_closed_form_ring_spectrum():
    # eigenvalues of the circulant ring are (1 + 2 cos(2 pi k / m)) / 3
    m = 10
    lam2 = (1 + 2 * math.cos(2 * math.pi / m)) / 3
    assert T.second_eigenvalue(T.ring(m)) == pytest.approx(lam2, abs=1e-12)
    assert T.spectral_gap(T.complete(m)) == pytest.approx(1.0)


def test_one_peer_exponential_averages_exactly_in_log2_m_steps():
    m = 16
    Q = torch.eye(m, dtype=torch.float64)
    for t in range(4):
        Q = T.one_peer_exponential(m, t) @ Q
    assert torch.allclose(Q, T.complete(m), atol=1e-12)


def test_permuted_is_a_relabelling_and_deterministic():
    base = T.make_topology("ring", 8)
    topo = T.permuted(base, seed=3)
    P0, P1 = topo.matrix(0), topo.matrix(1)
    assert topo.time_varying
    assert torch.equal(P0, T.permuted(base, seed=3).matrix(0))
    assert not torch.equal(P0, P1)
    # same spectrum as the ring: a permutation similarity
    assert T.second_eigenvalue(P0) == pytest.approx(T.second_eigenvalue(base.matrix(0)))


def test_from_networkx_metropolis():
    g = nx.path_graph(3)  # degrees 1, 2, 1
    P = T.from_networkx(g)
    expected = torch.tensor([[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]],
                            dtype=torch.float64)
    assert torch.allclose(P, expected)
    assert torch.allclose(T.from_adjacency(nx.to_numpy_array(g)), expected)


@pytest.mark.parametrize("P,fragment", [
    (torch.tensor([[0.5, 0.4], [0.5, 0.5]]), "row 0 sums to 0.9"),
    (torch.tensor([[0.7, 0.3], [0.7, 0.3]]), "column 0 sums to 1.4"),
    (torch.tensor([[1.5, -0.5], [-0.5, 1.5]]), "negative"),
    (torch.eye(3), "disconnected (3 components)"),
    (torch.ones(2, 3) / 3, "square"),
    (torch.tensor([[float("nan"), 1.0], [1.0, 0.0]]), "NaN"),
])
def test_validate_names_the_problem(P, fragment):
    with pytest.raises(UserError) as err:
        T.validate(P)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_topology_lists_choices():
    with pytest.raises(UserError, match="unknown topology 'hexagon'.*ring"):
        T.make_topology("hexagon", 4)


def test_static_rejects_bad_matrix():
    with pytest.raises(T.TopologyError, match="doubly stochastic"):
        T.Topology.static("mine", [[0.9, 0.1], [0.3, 0.7]])


def test_lazy_gossip_shifts_the_spectrum_and_lets_d2_run_on_an_even_ring():
    from dsgd.algorithms.d2 import check_d2_matrix

    ring = T.make_topology("ring", 16)
    with pytest.raises(UserError, match="train.lazy"):
        check_d2_matrix(ring.matrix(0), ring.name)
    half = T.lazy(ring, 0.5)
    P = half.matrix(0)
    torch.testing.assert_close(P, 0.5 * torch.eye(16, dtype=P.dtype) + 0.5 * ring.matrix(0))
    lam = torch.linalg.eigvalsh(ring.matrix(0).double())
    torch.testing.assert_close(torch.linalg.eigvalsh(P.double()), 0.5 + 0.5 * lam)
    check_d2_matrix(P, half.name)  # lambda_min = 1/3 now
    assert T.lazy(ring, 0.0) is ring
