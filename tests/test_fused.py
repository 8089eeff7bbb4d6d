"""The compiled whole D-SGD step (``dsgd.engine.fused``) against the eager step: the same
weights, momentum, losses and bytes; a non-finite loss keeps the pre-step state; a resumed run
repeats bit for bit; and what it does not take runs the two-graph compile."""

import os
import shutil

import pytest
import torch
from test_engine import batches, mlp
from torch import nn

from dsgd.engine import Engine
from dsgd.engine.fused import fusable
from dsgd.errors import TrainingDiverged
from dsgd.optim import SAM, SGD
from dsgd.topology import make_topology

needs_compiler = pytest.mark.skipif(not shutil.which(os.environ.get("CXX", "g++")),
                                    reason="torch.compile on CPU needs a C++ compiler")
MOMENTUM = SGD(momentum=0.9, nesterov=True, weight_decay=1e-3)


def pair(topology, optimizer, m, **kw):
    topo = make_topology(topology, m)
    eager = Engine(mlp(), topo, lr=0.1, strategy="vmap", optimizer=optimizer, **kw)
    fused = Engine(mlp(), topo, lr=0.1, strategy="vmap", optimizer=optimizer, compile=True,
                   **kw)
    assert fused._fused is not None
    return eager, fused


@needs_compiler
@pytest.mark.parametrize("topology,optimizer,m", [
    ("ring", MOMENTUM, 4),  # shift gossip: rolled rows
    pytest.param("grid", SGD(), 9, marks=pytest.mark.slow),  # the matrix product
])
def test_the_compiled_step_equals_the_eager_step(topology, optimizer, m):
    eager, fused = pair(topology, optimizer, m)
    for x, y in batches((5,), 4, m=m):
        a, b = eager.step(x, y), fused.step(x, y)
        torch.testing.assert_close(b.loss, a.loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(b.accuracy, a.accuracy)
    assert fused._fused._seen  # the whole step ran compiled
    torch.testing.assert_close(fused.w, eager.w, atol=1e-6, rtol=1e-6)
    if optimizer.momentum:
        torch.testing.assert_close(fused.opt_state.momentum["w"],
                                   eager.opt_state.momentum["w"], atol=1e-6, rtol=1e-6)
    assert fused.comm.bytes_sent == eager.comm.bytes_sent > 0
    assert fused.comm.rounds == eager.comm.rounds


@needs_compiler
def test_a_non_finite_loss_keeps_the_pre_step_state_and_a_resume_repeats_the_run():
    data = batches((5,), 4, m=4)
    _, run = pair("ring", MOMENTUM, 4)
    for x, y in data[:2]:
        run.step(x, y)
    saved = run.state_dict()
    before = (run.w.clone(), run.opt_state.momentum["w"].clone(), run.comm.bytes_sent)
    x, y = data[2]
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2"):
        run.step(torch.full_like(x, float("nan")), y)
    assert torch.equal(run.w, before[0]) and torch.equal(run.opt_state.momentum["w"], before[1])
    assert run.comm.bytes_sent == before[2] and run.step_count == 2
    for x, y in data[2:]:
        run.step(x, y)
    _, resumed = pair("ring", MOMENTUM, 4)
    resumed.load_state_dict(saved)
    for x, y in data[2:]:
        resumed.step(x, y)
    assert torch.equal(resumed.w, run.w)
    assert torch.equal(resumed.opt_state.momentum["w"], run.opt_state.momentum["w"])


def test_what_the_whole_step_does_not_take_says_why():
    ring = make_topology("ring", 4)

    def reason(model=None, topology=ring, **kw):
        engine = Engine(model or mlp(), topology, lr=0.1, strategy="vmap", compile=True, **kw)
        assert engine._fused is None
        return fusable(engine)

    assert "csgd" in reason(algorithm="csgd")
    assert "time-varying" in reason(topology=make_topology("one_peer_exponential", 4))
    assert "SAM" in reason(gradient_rule=SAM(rho=0.05))
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    assert "buffers" in reason(bn)
    assert Engine(mlp(), ring, lr=0.1, strategy="loop", compile=True)._fused is None
    assert Engine(mlp(), ring, lr=0.1, compile=True, chunk_size=2)._fused is None
    assert Engine(mlp(), ring, lr=0.1)._fused is None  # only with compile
