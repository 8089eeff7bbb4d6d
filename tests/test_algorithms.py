"""The field's algorithms against their closed forms on heterogeneous least squares, against
plain reference loops of their update rules, and across backends and resumes."""

import networkx as nx
import pytest
import torch
from torch import nn

from dsgd.algorithms import DRDSGD, QGM, make_algorithm
from dsgd.engine import Engine
from dsgd.errors import UserError
from dsgd.topology import Topology, TopologyError, from_networkx, make_topology

M, N, D = 9, 12, 3  # odd m: the ring's smallest eigenvalue is above -1/3, as D2 needs


def problem(seed=0):
    """Worker j's full-batch least squares (1/N)||A_j w - b_j||^2, each with its own optimum."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(M, N, D, generator=g, dtype=torch.float64)
    b = torch.randn(M, N, 1, generator=g, dtype=torch.float64) + 3 * torch.randn(
        M, 1, 1, generator=g, dtype=torch.float64)
    w_star = torch.linalg.solve(torch.einsum("jni,jnk->ik", A, A),
                                torch.einsum("jni,jnk->ik", A, b))  # (D, 1)
    return A, b, w_star.flatten()


def engine(algorithm, topo=None, lr=0.05, **kw):
    torch.manual_seed(0)
    model = nn.Linear(D, 1, bias=False).double()
    return Engine(model, topo or make_topology("ring", M), lr=lr, algorithm=algorithm,
                  loss=nn.functional.mse_loss, **kw)


def run(eng, steps, A, b):
    for _ in range(steps):
        eng.step(A, b)
    return eng


def gap(eng, w_star):
    return float((eng.w - w_star).norm(dim=1).max())  # every worker's distance to the optimum


@pytest.mark.parametrize("name", ["gt", "d2"])
def test_tracking_methods_converge_to_the_global_optimum(name):
    A, b, w_star = problem()
    eng = run(engine(name), 3000, A, b)
    assert gap(eng, w_star) < 1e-6


def test_dsgd_fixed_point_is_biased_by_an_amount_that_grows_with_lr():
    A, b, w_star = problem()
    bias = {lr: gap(run(engine("dsgd", lr=lr), 3000, A, b), w_star) for lr in (0.025, 0.05)}
    assert bias[0.025] > 1e-3  # a real bias, far above the tracking methods' 1e-6
    assert 1.6 < bias[0.05] / bias[0.025] < 2.4  # first order in lr


def _grads(w, A, b):
    """(m, D) each worker's gradient of (1/N)||A_j w_j - b_j||^2 at its own w_j."""
    r = torch.einsum("jni,ji->jn", A, w) - b[..., 0]
    return 2 * torch.einsum("jni,jn->ji", A, r) / N


def test_every_rule_equals_its_reference_loop():
    A, b, _ = problem()
    P = make_topology("ring", M).matrix(0)
    lr, beta, lam = 0.05, 0.8, 40.0
    w0 = engine("dsgd").w.clone()
    engines = {"gt": engine("gt"), "d2": engine("d2"), "qgm": engine(QGM(beta=beta)),
               "drdsgd": engine(DRDSGD(lam=lam)), "pushsum": engine("pushsum")}
    x = {k: w0.clone() for k in engines}
    y = g_prev = x_prev = step_prev = m_buf = None
    for _ in range(6):
        for eng in engines.values():
            eng.step(A, b)
        # gradient tracking: x <- P x - lr y;  y <- P y + g(new) - g(old)
        g = _grads(x["gt"], A, b)
        y = g if y is None else P @ y + g - g_prev
        g_prev, x["gt"] = g, P @ x["gt"] - lr * y
        # D2: x1 = P(x0 - lr g0); x(t+1) = P(2x(t) - x(t-1) - lr g(t) + lr g(t-1))
        s = lr * _grads(x["d2"], A, b)
        z = x["d2"] - s if x_prev is None else 2 * x["d2"] - x_prev - s + step_prev
        x_prev, step_prev, x["d2"] = x["d2"], s, P @ z
        # QG-DSGDm: d = g + beta m; x' = P(x - lr d); m <- beta m + (1 - beta)(x - x') / lr
        d = _grads(x["qgm"], A, b) + (0 if m_buf is None else beta * m_buf)
        new = P @ (x["qgm"] - lr * d)
        change = (x["qgm"] - new) / lr
        m_buf = (1 - beta) * change if m_buf is None else beta * m_buf + (1 - beta) * change
        x["qgm"] = new
        # DR-DSGD: D-SGD with worker j's gradient scaled by exp(f_j / lambda)
        f = ((torch.einsum("jni,ji->jn", A, x["drdsgd"]) - b[..., 0]) ** 2).mean(1)
        x["drdsgd"] = P @ x["drdsgd"] - lr * torch.exp(f / lam)[:, None] * _grads(
            x["drdsgd"], A, b)
        # push-sum on a doubly stochastic matrix: D-SGD in the step-then-gossip order
        x["pushsum"] = P @ (x["pushsum"] - lr * _grads(x["pushsum"], A, b))
    for name, eng in engines.items():
        torch.testing.assert_close(eng.w, x[name], atol=1e-10, rtol=0, msg=name)


def test_drdsgd_with_a_huge_lambda_is_dsgd():
    A, b, _ = problem()
    a, d = run(engine(DRDSGD(lam=1e12)), 20, A, b), run(engine("dsgd"), 20, A, b)
    torch.testing.assert_close(a.w, d.w, atol=1e-9, rtol=0)


def directed():
    """A strongly connected digraph whose push-sum matrix is column but not row stochastic."""
    g = nx.DiGraph([(0, 1), (1, 2), (2, 3), (3, 4), (4, 0), (0, 2), (0, 3), (5, 0), (2, 5)])
    return Topology.static("digraph", from_networkx(g))


def test_push_sum_averages_exactly_over_a_column_stochastic_graph():
    topo = directed()
    P = topo.matrix(0)
    assert topo.stochastic == "column"
    assert not torch.allclose(P.sum(1), torch.ones(6, dtype=torch.float64))
    torch.manual_seed(0)
    eng = Engine(nn.Linear(D, 1, bias=False).double(), topo, lr=0.0, algorithm="pushsum",
                 loss=nn.functional.mse_loss)
    eng.w = torch.randn(6, D, dtype=torch.float64)
    mean = eng.w.mean(0)
    x, y = torch.zeros(6, 4, D, dtype=torch.float64), torch.zeros(6, 4, 1, dtype=torch.float64)
    plain = eng.w.clone()
    for _ in range(300):
        eng.step(x, y)
        plain = P @ plain
    torch.testing.assert_close(eng.w, mean.expand(6, -1), atol=1e-12, rtol=0)
    assert (plain - mean).abs().max() > 1e-2  # plain mixing settles on a skewed combination


def test_push_sum_bias_on_a_directed_graph_shrinks_with_lr():
    A, b, w_star = problem()
    A, b = A[:6], b[:6]
    w_star = torch.linalg.solve(torch.einsum("jni,jnk->ik", A, A),
                                torch.einsum("jni,jnk->ik", A, b)).flatten()
    bias = {}
    for lr in (0.0125, 0.025):
        eng = run(engine("pushsum", directed(), lr=lr), 4000, A, b)
        bias[lr] = gap(eng, w_star)
    assert bias[0.025] > bias[0.0125] > 1e-4  # biased at a constant lr, like D-SGD
    assert bias[0.025] / bias[0.0125] > 1.5


def test_doubly_stochastic_algorithms_refuse_a_directed_graph():
    with pytest.raises(TopologyError, match="use algorithm 'pushsum'"):
        engine("gt", directed())
    with pytest.raises(UserError, match="smallest eigenvalue.*-1/3"):
        engine("d2", make_topology("ring", 8))


@pytest.mark.parametrize("name", ["gt", "d2", "qgm", "pushsum", "drdsgd"])
def test_vmap_equals_loop_and_resume_is_bit_identical(name, tmp_path):
    A, b, _ = problem()
    name = DRDSGD(lam=40.0) if name == "drdsgd" else name  # the losses here are ~10
    vm, lo = engine(name, strategy="vmap"), engine(name, strategy="loop")
    for _ in range(5):
        vm.step(A, b)
        lo.step(A, b)
    torch.testing.assert_close(vm.w, lo.w, atol=1e-12, rtol=0)
    torch.save(vm.state_dict(), tmp_path / "ckpt.pt")
    resumed = engine(name, strategy="vmap")
    resumed.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    for _ in range(4):
        vm.step(A, b)
        resumed.step(A, b)
    assert torch.equal(vm.w, resumed.w)


def test_gradient_tracking_sends_two_vectors_per_neighbour():
    A, b, _ = problem()
    bytes_ = {}
    for name in ("dsgd", "gt"):
        eng = engine(name)
        run(eng, 3, A, b)
        bytes_[name] = eng.comm.bytes_sent
    first = 2 * M * D * 8  # the first step mixes only x (y starts as the gradient)
    assert bytes_["gt"] == 2 * bytes_["dsgd"] - first


def test_make_algorithm_names_its_options():
    assert make_algorithm("qgm", beta=0.5).beta == 0.5
    with pytest.raises(ValueError, match="unknown algorithm"):
        make_algorithm("adam")


# ---- from a config ---------------------------------------------------------------------------
def test_the_config_names_every_algorithm():
    from dsgd.algorithms import ALGORITHMS
    from dsgd.experiments import config as C

    assert set(C.ALGORITHMS) == set(ALGORITHMS)


TINY = {"data.name": "synthetic", "data.n_train": 256, "data.n_test": 64, "model.name": "mlp",
        "model.options": {"hidden": [16]}, "train.workers": 5, "train.batch_size": 8,
        "train.steps": 12, "train.lr": 0.1, "log.eval_every": 6, "log.progress": False}


@pytest.mark.parametrize("extra", [
    {"train.algorithm": "gt"}, {"train.algorithm": "d2"}, {"train.algorithm": "qgm",
                                                          "train.qgm_beta": 0.5},
    {"train.algorithm": "pushsum", "train.topology": "directed_exponential"},
    {"train.algorithm": "drdsgd", "train.drdsgd_lambda": 20.0},
    {"train.algorithm": "choco", "train.compression": {"name": "topk", "ratio": 0.1},
     "train.consensus_step": 0.5},
    {"train.algorithm": "choco", "train.compression": {"name": "qsgd", "levels": 7},
     "train.consensus_step": 0.5, "train.topology": "one_peer_exponential",
     "train.workers": 4, "train.faults": {"drop": 0.3}},
    {"train.algorithm": "local", "train.gossip_every": 3},
    {"train.faults": {"drop": 0.3, "stragglers": 0.1, "straggle_steps": 2}},
    {"train.precision": "bf16"},
], ids=["gt", "d2", "qgm", "pushsum", "drdsgd", "choco", "choco-time-varying-faults", "local",
        "faults", "bf16"])
def test_every_algorithm_trains_from_a_config(extra, tmp_path):
    import json

    import dsgd

    summary = dsgd.train(None, tmp_path / "run", set={**TINY, **extra})
    assert summary["status"] == "finished" and summary["steps"] == 12
    assert summary["backend"] in ("vmap", "loop") and summary["backend_reason"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert rows[-1]["consensus"] > 0  # the workers really are apart


def test_config_refuses_what_an_algorithm_cannot_take(tmp_path):
    import dsgd
    from dsgd.errors import UserError

    with pytest.raises(UserError, match="applies to train.algorithm"):
        dsgd.load_config(None, {**TINY, "train.compression": {"name": "topk"}})
    for name, why in [("gt", "sum_j y_j = sum_j g_j"), ("d2", "amplify compression error"),
                      ("qgm", "change of the gossiped weights"),
                      ("pushsum", "mass of its weights")]:
        with pytest.raises(UserError, match=f"not apply to {name}: .*{why}.*; use choco, "
                                            "deepsqueeze or csgd$"):
            dsgd.load_config(None, {**TINY, "train.algorithm": name,
                                    "train.compression": {"name": "topk"}})
    cfg = dsgd.load_config(None, {**TINY, "train.algorithm": "csgd",
                                  "train.compression": {"name": "sign"}})
    assert cfg.train.compression == {"name": "sign"}
    with pytest.raises(UserError, match="topk takes"):
        dsgd.load_config(None, {**TINY, "train.algorithm": "choco",
                                "train.compression": {"name": "topk", "levels": 3}})
    with pytest.raises(UserError, match="train.faults takes"):
        dsgd.load_config(None, {**TINY, "train.faults": {"loss": 0.1}})
    with pytest.raises(UserError, match=r"above -1/3; ring has -0.3333"):
        dsgd.train(None, tmp_path / "r", set={**TINY, "train.algorithm": "d2",
                                              "train.workers": 8})


def test_csgd_compression_from_a_config_is_used(tmp_path):
    """[train.compression] with csgd trains EF-SGD: what travels is the workers' top-2 % messages
    (an all-gather of m - 1 = 4 messages of 0.02 P values and indices, 0.64 P bytes, against
    the all-reduce's 2 (m - 1) / m * 4 P = 6.4 P), and the workers stay identical."""
    import json

    import dsgd

    bytes_at = {}
    for name, extra in [("plain", {}), ("topk", {"train.compression": {"name": "topk",
                                                                       "ratio": 0.02}})]:
        summary = dsgd.train(None, tmp_path / name, set={**TINY, "train.algorithm": "csgd",
                                                         **extra})
        assert summary["status"] == "finished"
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        assert rows[-1]["consensus"] < 1e-10
        bytes_at[name] = rows[-1]["bytes_per_worker"]
    assert 0.09 < bytes_at["topk"] / bytes_at["plain"] < 0.11
