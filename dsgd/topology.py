"""Communication topologies as data: m x m doubly stochastic mixing matrices.

Row j of a mixing matrix P holds the weights worker j gives to every worker when it gossips:
``w_j <- sum_k P[j, k] w_k``. The generators below reproduce the paper's topologies (Zhu et al.,
ICML 2023, and the code it builds on) and the usual ones of the decentralized-SGD literature.
``validate`` checks a matrix once; ``spectral_gap`` is ``1 - |lambda_2(P)|``.

A :class:`Topology` is a matrix *schedule* ``step -> P(step)``: static matrices, time-varying ones
(one-peer exponential) and the random-permutation wrapper ``P' = Pi^T P Pi`` are all topologies.
Every schedule is a pure function of the step, so any process can rebuild any step's matrix
(needed for resuming and for the distributed engine).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch

from dsgd._types import MixingMatrix
from dsgd.errors import UserError


class TopologyError(UserError):
    """A mixing matrix that is not square, not doubly stochastic, negative or disconnected."""


def _tensor(a) -> MixingMatrix:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def _check_m(m: int, least: int = 1) -> None:
    if not isinstance(m, int) or m < least:
        raise TopologyError(f"number of workers must be an integer >= {least}, got {m!r}")


def _circulant(m: int, offsets: list[int]) -> MixingMatrix:
    """P[i, (i + o) % m] += 1/len(offsets) for each offset (offset 0 is the worker itself)."""
    P = np.zeros((m, m))
    for i in range(m):
        for o in offsets:
            P[i, (i + o) % m] += 1.0 / len(offsets)
    return _tensor(P)


def ring(m: int) -> MixingMatrix:
    """Ring: 1/3 to self and to each of the two neighbours (the paper's ring)."""
    _check_m(m)
    if m <= 2:
        return complete(m)
    return _circulant(m, [0, 1, -1])


def exponential(m: int) -> MixingMatrix:
    """Static exponential graph: i -> {i, i+1, i+2, i+4, ...} (mod m), equal weights.

    Circulant and not symmetric, as in the paper's code: for m=16, i -> {i, i+1, i+2, i+4, i+8},
    each 1/5, |lambda_2| = 0.600.
    """
    _check_m(m)
    offsets = [0] + [2**k for k in range(int(math.log2(m - 1)) + 1)] if m > 1 else [0]
    return _circulant(m, offsets)


def one_peer_exponential(m: int, t: int) -> MixingMatrix:
    """Time-varying one-peer exponential graph (Ying et al. 2021): at step t, worker i averages
    with worker i + 2^(t mod log2 m), weights 1/2 each. For m a power of two, log2(m) consecutive
    steps multiply to exact averaging."""
    _check_m(m)
    if m == 1:
        return complete(1)
    tau = max(1, math.ceil(math.log2(m)))
    return _circulant(m, [0, 2 ** (t % tau)])


def directed_exponential(m: int, t: int) -> MixingMatrix:
    """Time-varying directed exponential graph (Assran et al. 2019, Stochastic Gradient Push):
    at step t worker i keeps half its mass and sends half to worker i + 2^(t mod log2 m).
    Column j = i holds what worker i sends: P[i, i] = P[i + 2^k, i] = 1/2."""
    _check_m(m)
    if m == 1:
        return complete(1)
    return one_peer_exponential(m, t).T.contiguous()


def complete(m: int) -> MixingMatrix:
    """Complete graph, 1/m everywhere: one gossip step is exact averaging (C-SGD up to numerics)."""
    _check_m(m)
    return torch.full((m, m), 1.0 / m, dtype=torch.float64)


def from_networkx(graph: nx.Graph) -> MixingMatrix:
    """Metropolis-Hastings weights on an undirected graph: P[i,j] = 1 / (1 + max(deg_i, deg_j))
    for each edge (self counted in the degree, as the paper's grid), the rest on the diagonal.

    A ``networkx.DiGraph`` gives push-sum weights instead: each node splits its mass equally over
    itself and its out-neighbours, P[j, i] = 1 / (outdeg(i) + 1) for every edge i -> j and i = j
    (column stochastic); the graph must be strongly connected."""
    if graph.is_directed():
        return _push_sum_weights(graph)
    nodes = list(graph.nodes)
    index = {v: i for i, v in enumerate(nodes)}
    m = len(nodes)
    _check_m(m)
    deg = {v: sum(1 for u in graph.neighbors(v) if u != v) for v in nodes}
    P = np.zeros((m, m))
    for u, v in graph.edges:
        if u == v:
            continue
        w = 1.0 / (1 + max(deg[u], deg[v]))
        P[index[u], index[v]] = P[index[v], index[u]] = w
    P[np.diag_indices(m)] = 1.0 - P.sum(axis=1)
    return _tensor(P)


def _push_sum_weights(graph: nx.DiGraph) -> MixingMatrix:
    nodes = list(graph.nodes)
    _check_m(len(nodes))
    if not nx.is_strongly_connected(graph):
        raise TopologyError("the directed graph is not strongly connected: push-sum needs a path "
                            "from every node to every other")
    index = {v: i for i, v in enumerate(nodes)}
    P = np.zeros((len(nodes), len(nodes)))
    for v in nodes:
        out = [u for u in graph.successors(v) if u != v]
        for u in [v, *out]:
            P[index[u], index[v]] = 1.0 / (len(out) + 1)
    return _tensor(P)


def from_adjacency(adjacency) -> MixingMatrix:
    """Metropolis-Hastings weights from a symmetric 0/1 adjacency matrix (see from_networkx).

    The graph must be connected: workers in different components never reach consensus."""
    A = np.asarray(adjacency)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise TopologyError(f"adjacency must be a non-empty square matrix, got shape {A.shape}")
    if not np.array_equal(A != 0, (A != 0).T):
        raise TopologyError("adjacency must be symmetric (an undirected graph)")
    g = nx.from_numpy_array((A != 0).astype(int))
    if not nx.is_connected(g):
        raise TopologyError(f"adjacency is disconnected ({nx.number_connected_components(g)} "
                            "components): workers in different components never reach consensus")
    return from_networkx(g)


def _grid_shape(m: int) -> tuple[int, int]:
    rows = int(math.isqrt(m))
    while m % rows:
        rows -= 1
    return rows, m // rows


def grid(m: int, rows: int | None = None) -> MixingMatrix:
    """2-D grid without wraparound, Metropolis weights (the paper's grid; 4x4 for m=16).

    A prime m >= 3 has no 2-D shape (it would be a 1 x m path) and is refused unless ``rows``
    is given; m = 1 and 2 are the only graphs of their size."""
    _check_m(m)
    if rows is None and m >= 3 and _grid_shape(m)[0] == 1:
        raise TopologyError(f"grid: {m} workers do not form a 2-D grid ({m} is prime, so it "
                            "would be a path); choose m = rows x cols with both >= 2, or "
                            "topology ring")
    rows = rows or _grid_shape(m)[0]
    if m % rows:
        raise TopologyError(f"grid: {m} workers do not fill {rows} rows")
    return from_networkx(nx.convert_node_labels_to_integers(nx.grid_2d_graph(rows, m // rows)))


def torus(m: int, rows: int | None = None) -> MixingMatrix:
    """2-D torus (grid with wraparound), Metropolis weights (1/5 each for sides >= 3)."""
    _check_m(m)
    rows = rows or _grid_shape(m)[0]
    if m % rows:
        raise TopologyError(f"torus: {m} workers do not fill {rows} rows")
    g = nx.grid_2d_graph(rows, m // rows, periodic=True)
    return from_networkx(nx.convert_node_labels_to_integers(g))


def star(m: int) -> MixingMatrix:
    """Star with worker 0 at the centre, Metropolis weights."""
    _check_m(m)
    return from_networkx(nx.star_graph(m - 1)) if m > 1 else complete(1)


def random_regular(m: int, d: int, seed: int = 0) -> MixingMatrix:
    """Random d-regular graph (networkx, seeded), Metropolis weights 1/(d+1)."""
    _check_m(m, 2)
    if d >= m or (m * d) % 2:
        raise TopologyError(f"random_regular: need d < m and m*d even, got m={m}, d={d}")
    g = nx.random_regular_graph(d, m, seed=seed)
    if not nx.is_connected(g):
        raise TopologyError(f"random_regular(m={m}, d={d}, seed={seed}) is disconnected; "
                            "try another seed or a larger d")
    return from_networkx(g)


def validate(P, name: str = "mixing matrix", atol: float = 1e-6,
             connected: bool = True, stochastic: str = "doubly") -> MixingMatrix:
    """Return P as a float64 tensor, or raise TopologyError saying what is wrong with it.

    Checks: square, finite, non-negative, rows and columns sum to 1 (doubly stochastic, so gossip
    preserves the workers' mean), and the graph of non-zero weights is connected (so consensus is
    reached). A time-varying topology need only be connected over a window of steps: pass
    ``connected=False`` for one step and validate the window's sum. ``stochastic="column"``
    asks only that columns sum to 1 (a directed graph, for push-sum) and that the directed graph
    be strongly connected.
    """
    P = torch.as_tensor(P, dtype=torch.float64)
    if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] == 0:
        raise TopologyError(f"{name} must be a non-empty square m x m matrix, got {tuple(P.shape)}")
    if not torch.isfinite(P).all():
        raise TopologyError(f"{name} has NaN or infinite entries")
    if (P < -atol).any():
        raise TopologyError(f"{name} has negative weights (min {P.min().item():.3g})")
    rows, cols = P.sum(1), P.sum(0)
    if stochastic == "column":
        if not torch.allclose(cols, torch.ones_like(cols), atol=atol):
            j = int((cols - 1).abs().argmax())
            raise TopologyError(f"{name} is not column stochastic: column {j} sums to "
                                f"{cols[j].item():.6g}, every column must sum to 1")
        d = nx.from_numpy_array((P.T > atol).numpy().astype(int), create_using=nx.DiGraph)
        if connected and not nx.is_strongly_connected(d):
            raise TopologyError(f"{name} is not strongly connected: some worker's mass never "
                                "reaches some other worker")
        return P
    if not torch.allclose(rows, torch.ones_like(rows), atol=atol):
        j = int((rows - 1).abs().argmax())
        raise TopologyError(f"{name} is not doubly stochastic: row {j} sums to "
                            f"{rows[j].item():.6g}, every row must sum to 1")
    if not torch.allclose(cols, torch.ones_like(cols), atol=atol):
        j = int((cols - 1).abs().argmax())
        raise TopologyError(f"{name} is not doubly stochastic: column {j} sums to "
                            f"{cols[j].item():.6g}, every column must sum to 1")
    g = nx.from_numpy_array(((P + P.T) > atol).numpy().astype(int))
    if connected and not nx.is_connected(g):
        parts = nx.number_connected_components(g)
        raise TopologyError(f"{name} is disconnected ({parts} components): workers in different "
                            "components never reach consensus")
    return P


def stochasticity(P, atol: float = 1e-6) -> str | None:
    """Which sums of P are 1: "doubly" (rows and columns), "column", "row", or None."""
    P = torch.as_tensor(P, dtype=torch.float64)
    ones = torch.ones(P.shape[0], dtype=torch.float64)
    rows = torch.allclose(P.sum(1), ones, atol=atol)
    cols = torch.allclose(P.sum(0), ones, atol=atol)
    return "doubly" if rows and cols else "column" if cols else "row" if rows else None


def second_eigenvalue(P) -> float:
    """|lambda_2(P)|: the second largest eigenvalue modulus (P need not be symmetric)."""
    ev = np.sort(np.abs(np.linalg.eigvals(np.asarray(P, dtype=np.float64))))[::-1]
    return float(ev[1]) if len(ev) > 1 else 0.0


def spectral_gap(P) -> float:
    """1 - |lambda_2(P)|: how fast gossip contracts the workers towards their mean."""
    return 1.0 - second_eigenvalue(P)


@dataclass(frozen=True)
class Topology:
    """A mixing-matrix schedule: ``matrix(step)`` is the (m, m) matrix used at that step."""

    name: str
    m: int
    schedule: Callable[[int], MixingMatrix]
    time_varying: bool = False
    stochastic: str = "doubly"  # "column": a directed graph, for push-sum only

    def matrix(self, step: int = 0) -> MixingMatrix:
        return self.schedule(step)

    @classmethod
    def static(cls, name: str, P) -> Topology:
        """A fixed matrix: doubly stochastic (every algorithm), or column stochastic only (a
        directed graph, which only ``pushsum`` accepts); recorded in ``stochastic``."""
        kind = "column" if stochasticity(P) == "column" else "doubly"
        P = validate(P, name, stochastic=kind)
        return cls(name, P.shape[0], lambda step: P, stochastic=kind)


SHUFFLES = ("symmetric", "paper")


def permuted(topology: Topology, seed: int = 0, mode: str = "symmetric") -> Topology:
    """A random relabelling of the workers at every step, from a generator seeded by (seed, t).

    ``symmetric``: P'(t) = Pi_t^T P(t) Pi_t, one fresh permutation Pi_t: the same graph with the
    workers relabelled (symmetric if P is, same spectrum, the self-weight stays on the
    diagonal). ``paper``: P'(t) = Pi1_t^T P(t) Pi2_t with two independent permutations, as the
    released code of Zhu et al. (ICML 2023) draws it: still doubly stochastic, but neither
    symmetric nor a relabelling, and its diagonal is mostly zero (a worker mostly does not keep
    its own weights).
    """
    if mode not in SHUFFLES:
        raise TopologyError(f"unknown shuffle {mode!r}; choose one of {', '.join(SHUFFLES)}")

    def schedule(step: int) -> MixingMatrix:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        rows = torch.randperm(topology.m, generator=g)
        cols = rows if mode == "symmetric" else torch.randperm(topology.m, generator=g)
        return topology.matrix(step)[rows][:, cols]

    suffix = "+shuffle" if mode == "symmetric" else "+paper-shuffle"
    return Topology(f"{topology.name}{suffix}", topology.m, schedule, time_varying=True,
                    stochastic=topology.stochastic)


def lazy(topology: Topology, self_weight: float) -> Topology:
    """Lazy gossip: P' = a I + (1 - a) P. Still doubly (or column) stochastic, with eigenvalues
    a + (1 - a) lambda, so a >= 1/2 lifts every eigenvalue of a symmetric P above -1/3 (what D²
    needs; an even ring has exactly -1/3), at the cost of slower mixing."""
    if not 0 <= self_weight < 1:
        raise TopologyError(f"the lazy self-weight must be in [0, 1), got {self_weight}")
    if self_weight == 0:
        return topology

    def schedule(step: int) -> MixingMatrix:
        P = topology.matrix(step)
        return self_weight * torch.eye(topology.m, dtype=P.dtype) + (1 - self_weight) * P

    return Topology(f"{topology.name}+lazy{self_weight:g}", topology.m, schedule,
                    time_varying=topology.time_varying, stochastic=topology.stochastic)


STATIC = {
    "ring": ring, "grid": grid, "torus": torus, "exponential": exponential,
    "complete": complete, "star": star,
}
TIME_VARYING = {"one_peer_exponential": one_peer_exponential,
                "directed_exponential": directed_exponential}
NAMES = sorted([*STATIC, *TIME_VARYING, "random_regular"])


def _time_varying(name: str, m: int, schedule: Callable[[int, int], MixingMatrix]) -> Topology:
    """A schedule that cycles through log2(m) matrices, each doubly stochastic, connected over
    the cycle (the directed exponential graph is a circulant too, so every algorithm may use
    it)."""
    window = [schedule(m, t) for t in range(max(1, math.ceil(math.log2(m))))]
    for P in window:
        validate(P, name, connected=False)
    validate(sum(window) / len(window), f"{name} over {len(window)} steps")
    return Topology(name, m, lambda t: schedule(m, t), time_varying=True)


def make_topology(name: str, m: int, *, shuffle: bool | str = False, seed: int = 0,
                  degree: int = 4) -> Topology:
    """Build a topology by name (the config/CLI entry point). ``shuffle`` adds ``permuted``:
    True or "symmetric" (Pi^T P Pi), "paper" (Pi1^T P Pi2), False for none."""
    if name in STATIC:
        topo = Topology.static(name, STATIC[name](m))
    elif name in TIME_VARYING:
        topo = _time_varying(name, m, TIME_VARYING[name])
    elif name == "random_regular":
        topo = Topology.static(name, random_regular(m, degree, seed))
    else:
        raise TopologyError(f"unknown topology {name!r}; choose one of {', '.join(NAMES)}")
    if shuffle is False:
        return topo
    return permuted(topo, seed, "symmetric" if shuffle is True else shuffle)
