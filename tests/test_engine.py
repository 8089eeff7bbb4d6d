"""The engine against the loop-over-modules reference, and the algebra of gossip."""

import os
import shutil

import pytest
import torch
from torch import nn

from dsgd.engine import Engine, LocalCommunicator
from dsgd.engine.reference import ReferenceEngine
from dsgd.errors import TrainingDiverged
from dsgd.optim import SGD
from dsgd.optim.schedule import warmup_multistep
from dsgd.topology import Topology, complete, make_topology, permuted

M = 6


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 3))


def batches(shape, steps, m=M, B=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, B, *shape, generator=g), torch.randint(0, 3, (m, B), generator=g))
            for _ in range(steps)]


def run_both(model_fn, shape, topo, steps=6, strategy="vmap", opt=None, **kw):
    opt = opt or {}
    lr = warmup_multistep(0.2, warmup_steps=2, milestones=[4], gamma=0.5)
    fast = Engine(model_fn(), topo, optimizer=SGD(**opt), lr=lr, strategy=strategy, **kw)
    ref = ReferenceEngine(model_fn(), topo, lr=lr, **opt, **kw)
    for x, y in batches(shape, steps, m=topo.m):
        fast.step(x, y)
        ref.step(x, y)
    return fast, ref


def assert_same(fast, ref, atol=1e-5):
    for name, stacked in ref.worker_params().items():
        torch.testing.assert_close(fast.params[name], stacked, atol=atol, rtol=0)
    for name, value in ref.average_state().items():
        torch.testing.assert_close(fast.average_state()[name].to(value.dtype), value,
                                   atol=atol, rtol=0)


TOPOLOGIES = ["ring", "grid", "torus", "exponential", "complete", "star", "random_regular",
              "one_peer_exponential"]


@pytest.mark.parametrize("name", TOPOLOGIES + ["ring+shuffle"])
def test_engine_equals_reference_on_every_topology(name):
    base = name.split("+")[0]
    topo = make_topology(base, M, shuffle=name.endswith("shuffle"), seed=5)
    assert_same(*run_both(mlp, (5,), topo))


OPTIMIZERS = [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
              {"weight_decay": 5e-3}, {"momentum": 0.5, "weight_decay": 1e-2, "nesterov": True}]


@pytest.mark.parametrize("opt", OPTIMIZERS)
@pytest.mark.parametrize("algorithm", ["dsgd", "csgd"])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_engine_equals_reference_for_every_optimizer(opt, algorithm, strategy):
    topo = make_topology("ring", M)
    assert_same(*run_both(mlp, (5,), topo, opt=opt, algorithm=algorithm, strategy=strategy))


@pytest.mark.parametrize("buffers", ["gossip", "local"])
@pytest.mark.parametrize("algorithm", ["dsgd", "csgd"])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_batchnorm_buffers_match_reference(buffers, algorithm, strategy):
    topo = make_topology("exponential", M)
    fast, ref = run_both(convnet, (2, 5, 5), topo, strategy=strategy, algorithm=algorithm,
                         buffers=buffers, opt={"momentum": 0.9})
    assert_same(fast, ref)
    for j, worker in enumerate(ref.workers):
        bn = worker[1]
        torch.testing.assert_close(fast.worker_buffers["1.running_mean"][j], bn.running_mean,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(fast.worker_buffers["1.running_var"][j], bn.running_var,
                                   atol=1e-5, rtol=0)
    spread = fast.worker_buffers["1.running_mean"].std(0).max().item()
    if algorithm == "csgd" and buffers == "gossip":
        assert spread < 1e-6  # averaged every step
    else:
        assert spread > 1e-4  # the workers' statistics differ


@pytest.mark.parametrize("every", [2, 3])
def test_local_sgd_gossips_every_tau_steps(every):
    topo = make_topology("complete", M)
    fast, ref = run_both(mlp, (5,), topo, steps=7, gossip_every=every)
    assert_same(fast, ref)


@pytest.mark.parametrize("name", TOPOLOGIES)
@pytest.mark.parametrize("mode", ["auto", "dense", "sparse"])
def test_gossip_preserves_the_mean(name, mode):
    topo = make_topology(name, 16)
    comm = LocalCommunicator(topo, mode=mode)
    x = torch.randn(16, 1000, dtype=torch.float64)
    for t in range(5):
        y = comm.mix(x, t)
        torch.testing.assert_close(y.mean(0), x.mean(0), atol=1e-12, rtol=0)
        torch.testing.assert_close(y, topo.matrix(t) @ x, atol=1e-12, rtol=0)
        x = y


def test_gossip_contracts_at_the_spectral_rate():
    # for symmetric P, ||P^t x - mean|| <= |lambda_2|^t ||x - mean||, with equality on the
    # second eigenvector
    P = make_topology("ring", 16).matrix(0)
    evals, evecs = torch.linalg.eigh(P)
    v = evecs[:, -2:-1]  # (m, 1): eigenvector of lambda_2
    comm = LocalCommunicator(Topology.static("ring", P))
    torch.testing.assert_close(comm.mix(v, 0), evals[-2] * v)


def _linear_regression(m, steps, seed=0):
    """Workers share one design X but hold different targets: every loss has the same Hessian,
    so the mean of their gradients at w_j is the gradient at w_a (the gradient is affine)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(16, 4, generator=g)
    x = X.expand(m, 16, 4)
    ys = [torch.randn(m, 16, 1, generator=g) for _ in range(steps)]
    return x, ys


def test_dsgd_on_complete_reproduces_csgd_for_a_common_hessian():
    m, steps = 8, 50
    x, ys = _linear_regression(m, steps)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    loss = nn.functional.mse_loss
    dsgd = Engine(model, make_topology("complete", m), lr=0.1, loss=loss, algorithm="dsgd")
    csgd = Engine(model, make_topology("complete", m), lr=0.1, loss=loss, algorithm="csgd")
    for y in ys:
        dsgd.step(x, y)
        csgd.step(x, y)
    assert dsgd.consensus_distance() > 1e-4  # the workers really differ
    for name, value in csgd.average_state().items():
        torch.testing.assert_close(dsgd.average_state()[name], value, atol=1e-5, rtol=0)


def test_dsgd_on_complete_tracks_csgd_to_second_order_in_lr():
    # in general the gradients are taken at w_j = w_a + O(eta), so the gap is O(eta^2)
    def gap(lr):
        runs = []
        for algorithm in ("dsgd", "csgd"):
            engine = Engine(mlp(), make_topology("complete", M), lr=lr, algorithm=algorithm)
            for x, y in batches((5,), 10):
                engine.step(x, y)
            runs.append(engine.w.mean(0))
        return (runs[0] - runs[1]).norm().item()

    ratio = gap(0.02) / gap(0.01)
    assert 3.0 < ratio < 5.0, ratio


def test_csgd_keeps_workers_identical_and_equals_large_batch_sgd():
    m = 4
    x, y = batches((5,), 1, m=m)[0]
    engine = Engine(mlp(), make_topology("ring", m), lr=0.1, algorithm="csgd")
    engine.step(x, y)
    assert engine.consensus_distance() == 0.0
    single = mlp()
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    nn.functional.cross_entropy(single(x.reshape(-1, 5)), y.reshape(-1)).backward()
    opt.step()
    for name, p in single.named_parameters():
        torch.testing.assert_close(engine.average_state()[name], p.detach(), atol=1e-6, rtol=0)


def test_nan_loss_raises_and_leaves_weights_untouched():
    engine = Engine(mlp(), make_topology("ring", M), lr=0.1)
    x, y = batches((5,), 1)[0]
    x[2, 0, 0] = float("nan")
    before = engine.w.clone()
    with pytest.raises(TrainingDiverged, match=r"at step 0 on worker\(s\) \[2\]"):
        engine.step(x, y)
    assert torch.equal(engine.w, before)


def test_state_dict_round_trip_resumes_identically(tmp_path):
    topo = make_topology("ring", M)
    data = batches((5,), 8)
    a = Engine(mlp(), topo, optimizer=SGD(momentum=0.9), lr=0.1)
    for x, y in data[:4]:
        a.step(x, y)
    torch.save(a.state_dict(), tmp_path / "ckpt.pt")
    b = Engine(mlp(), topo, optimizer=SGD(momentum=0.9), lr=0.1)
    b.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    for x, y in data[4:]:
        a.step(x, y)
        b.step(x, y)
    assert torch.equal(a.w, b.w)


def test_consensus_distance_closed_form():
    engine = Engine(mlp(), Topology.static("c", complete(3)), lr=0.1)
    engine.w = torch.stack([torch.zeros(engine.layout.size), torch.ones(engine.layout.size),
                            2 * torch.ones(engine.layout.size)])
    # (1/m) sum_j ||w_j - w_a||^2 = (1 + 0 + 1) * P / 3
    assert engine.consensus_distance() == pytest.approx(2 * engine.layout.size / 3)


def test_permuted_topology_time_varies_inside_the_engine():
    topo = permuted(make_topology("ring", M), seed=1)
    assert_same(*run_both(mlp, (5,), topo, steps=4))


@pytest.mark.parametrize("name,rows", [("ring", 2), ("exponential", 4), ("complete", 15)])
def test_nominal_bytes_per_worker_per_step(name, rows):
    engine = Engine(mlp(), make_topology(name, 16), lr=0.1)
    x, y = batches((5,), 1, m=16)[0]
    engine.step(x, y)
    per_worker = engine.comm.bytes_sent / 16
    assert per_worker == rows * engine.layout.size * 4  # float32 rows to each out-neighbour


def test_csgd_bytes_are_one_ring_all_reduce_per_worker():
    engine = Engine(mlp(), make_topology("ring", M), lr=0.1, algorithm="csgd")
    engine.step(*batches((5,), 1)[0])
    # reduce-scatter then all-gather: 2 (m - 1) chunks of P / m values per worker
    assert engine.comm.bytes_sent == M * 2 * (M - 1) / M * engine.layout.size * 4
    assert engine.comm.rounds == [("allreduce", -1, engine.layout.size * 4)]


def test_gossip_rounds_name_their_step_and_message_size():
    engine = Engine(mlp(), make_topology("ring", M), lr=0.1)
    for x, y in batches((5,), 2):
        engine.step(x, y)
    assert engine.comm.rounds == [("gossip", t, engine.layout.size * 4) for t in range(2)]


@pytest.mark.parametrize("name", ["ring", "exponential", "one_peer_exponential", "complete"])
def test_shift_gossip_of_circulant_matrices_equals_the_product(name):
    topo = make_topology(name, 16)
    comm = LocalCommunicator(topo, mode="shift")
    x = torch.randn(16, 300, dtype=torch.float64)
    for t in range(4):
        torch.testing.assert_close(comm.mix(x, t), topo.matrix(t) @ x, atol=1e-12, rtol=0)
    # auto: shift while 4 * deg <= m (deg counts the worker itself), else the dense product
    deg = int((topo.matrix(0)[0] != 0).sum())
    assert LocalCommunicator(topo).plan(0, x).mode == ("shift" if 4 * deg <= 16 else "dense")


def test_shift_gossip_refuses_a_non_circulant_matrix():
    with pytest.raises(ValueError, match="circulant"):
        LocalCommunicator(make_topology("grid", 16), mode="shift").mix(torch.zeros(16, 3), 0)


def test_vmap_in_chunks_equals_vmap_over_all_workers():
    topo = make_topology("ring", M)
    kw = dict(lr=0.1, strategy="vmap", optimizer=SGD(momentum=0.9))
    whole, chunked = Engine(convnet(), topo, **kw), Engine(convnet(), topo, chunk_size=4, **kw)
    for x, y in batches((2, 5, 5), 3):
        whole.step(x, y)
        chunked.step(x, y)
    torch.testing.assert_close(chunked.w, whole.w, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chunked.b, whole.b, atol=1e-6, rtol=1e-6)  # BatchNorm statistics


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_vmap_gradients_equal_the_eager_ones():
    """torch.compile over vmap(grad): same weights and BatchNorm statistics as eager."""
    topo = make_topology("ring", 4)
    kw = dict(lr=0.1, strategy="vmap", optimizer=SGD(momentum=0.9))
    eager, compiled = Engine(convnet(), topo, **kw), Engine(convnet(), topo, compile=True, **kw)
    for x, y in batches((2, 5, 5), 3, m=4):
        eager.step(x, y)
        compiled.step(x, y)
    torch.testing.assert_close(compiled.w, eager.w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.b, eager.b, atol=1e-5, rtol=1e-5)
    assert not torch.equal(eager.b, Engine(convnet(), topo, **kw).b)  # statistics did move


@pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                    reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("name,mode", [("ring", "auto"), ("grid", "auto"), ("grid", "sparse")])
def test_compiled_mix_add_equals_mix_then_add(name, mode):
    topo = make_topology(name, 16)
    fused, plain = LocalCommunicator(topo, mode, compile=True), LocalCommunicator(topo, mode)
    x, d = torch.randn(16, 300), torch.randn(16, 300)
    for alpha in (-0.1, -0.05):  # a new lr reuses the compiled code
        torch.testing.assert_close(fused.mix_add(x, d, alpha, 0), plain.mix(x, 0) + alpha * d,
                                   atol=1e-6, rtol=1e-6)
    assert fused.bytes_sent == plain.bytes_sent > 0  # the same accounting
    assert not LocalCommunicator(make_topology("one_peer_exponential", 16), compile=True).compiled


