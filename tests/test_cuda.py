"""The engine, gossip, instruments and command line on a CUDA GPU give what they give on the CPU.

Skipped where no GPU is present (the default test machine). The engine comparisons run in
float64, where cuDNN / cuBLAS and the CPU kernels agree to ~1e-12, so a tolerance of 1e-9 tells a
real difference from float32 rounding (which BatchNorm and momentum amplify to ~1e-4 in a few
steps); elsewhere TF32 is switched off so the GPU computes in true float32.
"""

import json
import math
import subprocess

import pytest
import torch
from cli_helpers import sets, torchrun_launch
from torch import nn

from dsgd.engine import Engine, LocalCommunicator
from dsgd.experiments.cli import main
from dsgd.models import build_model
from dsgd.optim import SGD
from dsgd.topology import make_topology

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHORT = ("train.steps=20", "log.eval_every=10")


@pytest.fixture(autouse=True)
def true_float32():
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def _run(model: nn.Module, device: str, topology: str, m: int, steps: int, shape, **kw):
    torch.manual_seed(1)
    batches = [(torch.randn(m, 8, *shape, dtype=torch.float64), torch.randint(0, 10, (m, 8)))
               for _ in range(steps)]
    eng = Engine(model.to(device, torch.float64), make_topology(topology, m), lr=0.05, **kw)
    for x, y in batches:
        eng.step(x, y)
    return eng


@pytest.mark.parametrize("name,shape,strategy,algorithm,topology,optimizer", [
    ("mlp", (1, 28, 28), "vmap", "dsgd", "ring", SGD()),
    ("mlp", (1, 28, 28), "loop", "csgd", "complete", SGD(momentum=0.9)),
    ("lenet5", (1, 28, 28), "vmap", "dsgd", "exponential", SGD(momentum=0.9, nesterov=True)),
    ("lenet5", (1, 28, 28), "loop", "dsgd", "grid", SGD(weight_decay=1e-3)),
    ("resnet8", (3, 16, 16), "vmap", "dsgd", "ring", SGD(momentum=0.9)),
    ("resnet8", (3, 16, 16), "loop", "csgd", "complete", SGD()),
])
def test_engine_on_cuda_matches_the_cpu(name, shape, strategy, algorithm, topology, optimizer):
    torch.manual_seed(0)
    model = build_model(name, 10, shape)
    kw = dict(strategy=strategy, algorithm=algorithm, optimizer=optimizer)
    cpu = _run(model, "cpu", topology, 8 if topology == "grid" else 4, 5, shape, **kw)
    gpu = _run(model, "cuda", topology, 8 if topology == "grid" else 4, 5, shape, **kw)
    assert gpu.w.is_cuda and gpu.backend.name == strategy
    torch.testing.assert_close(gpu.w.cpu(), cpu.w, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(gpu.b.cpu(), cpu.b, atol=1e-9, rtol=1e-7)  # BatchNorm statistics


@pytest.mark.parametrize("topology", ["ring", "exponential", "grid", "one_peer_exponential"])
def test_gossip_modes_on_cuda_equal_the_matrix_product(topology):
    topo = make_topology(topology, 16)
    x = torch.randn(16, 1000, dtype=torch.float64, device="cuda")
    circulant = LocalCommunicator(topo).plan(0, x).mode == "shift" or topology == "exponential"
    for mode in ("auto", "dense", "sparse") + (("shift",) if circulant else ()):
        comm = LocalCommunicator(topo, mode)
        for t in range(3):
            P = topo.matrix(t).to(x)
            torch.testing.assert_close(comm.mix(x, t), P @ x, atol=1e-12, rtol=0)


def test_auto_gossip_on_cuda_is_dense_but_never_in_tf32():
    topo = make_topology("exponential", 16)
    x = torch.randn(16, 100_000, device="cuda")
    exact = topo.matrix(0).to(x.device, torch.float64) @ x.double()
    comm = LocalCommunicator(topo)
    assert comm.plan(0, x).mode == "dense"  # TF32 off (fixture): one GEMM, exact float32
    torch.backends.cuda.matmul.allow_tf32 = True  # as torch.set_float32_matmul_precision("high")
    assert comm.plan(0, x).mode == "shift"  # the flag is part of the plan's cache key
    assert (comm.mix(x, 0).double() - exact).abs().max() < 1e-5
    assert LocalCommunicator(make_topology("grid", 16)).plan(0, x).mode == "sparse"


def test_training_run_on_cuda_matches_the_cpu_run_and_logs_instruments(tmp_path):
    instruments = 'log.instruments=["hessian", "equivalence", "uncertainty"]'
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        assert main(["train", *sets(*SHORT, f"device={device}", instruments,
                                    "log.instrument_samples=64"), "--out", str(out)]) == 0
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        w = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["engine"]["w"]
        runs[device] = row, w
    (row_c, w_c), (row_g, w_g) = runs["cpu"], runs["cuda"]
    assert w_g.device.type == "cuda"  # saved as it lives; loads anywhere with map_location
    torch.testing.assert_close(w_g.cpu(), w_c, atol=1e-4, rtol=1e-4)
    for key in ("hessian_trace", "top_eigenvalue", "xi_trace", "residual_sgd", "averaged_ece"):
        assert math.isfinite(row_g[key]), (key, row_g)
    assert row_g["xi_trace"] == pytest.approx(row_c["xi_trace"], rel=1e-3)
    assert row_g["test_acc"] == pytest.approx(row_c["test_acc"], abs=1 / 128 + 1e-9)


def test_torchrun_nccl_run_matches_the_simulated_run(tmp_path):
    """One process per GPU under torchrun with the nccl backend (here: the one GPU there is,
    hosting all 4 workers) against the simulated run."""
    sim, dist = tmp_path / "sim", tmp_path / "dist"
    args = ["train", *sets(*SHORT, "device=cuda", "train.topology=exponential"), "--out"]
    assert main([*args, str(sim)]) == 0
    proc = subprocess.run(torchrun_launch(1, args, dist, 60), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    w = torch.load(sim / "checkpoints" / "last.pt", weights_only=True)["engine"]["w"]
    w_d = torch.load(dist / "checkpoints" / "last.pt", weights_only=True)["engine"]["w"]
    assert w_d.device.type == "cuda"  # nccl: the rank's tensors live on its GPU (gloo: CPU)
    torch.testing.assert_close(w_d.cpu(), w.cpu(), atol=1e-5, rtol=0)
