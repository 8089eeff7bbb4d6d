"""dsgd.Gossip, the drop-in for a user's torchrun loop, against the simulated Engine on the same
batches: one torchrun job of 4 processes runs every config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import dsgd
from dsgd.engine import Engine
from dsgd.engine.distributed import DistributedSetupError, shutdown
from dsgd.optim import SGD
from dsgd.topology import make_topology

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import batches, mlp  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "gossip_worker.py")
WORLD, STEPS = 4, 15
CONFIGS = [
    {"name": "ring", "topology": "ring"},
    {"name": "ring_momentum", "topology": "ring", "momentum": 0.9},
    {"name": "exponential_local_sgd", "topology": "exponential", "momentum": 0.9,
     "gossip_every": 3},
    {"name": "one_peer_exp_batchnorm", "topology": "one_peer_exponential", "batchnorm": True,
     "momentum": 0.9},
    {"name": "ring_from_rank0", "topology": "ring", "perturb": True},
    {"name": "csgd_momentum", "topology": "ring", "algorithm": "csgd", "momentum": 0.9},
]
for _c in CONFIGS:
    _c.update(steps=STEPS, lr=0.2)


def launch(configs: list[dict], out: Path, timeout: int = 150) -> subprocess.CompletedProcess:
    spec = out / "configs.json"
    spec.write_text(json.dumps(configs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={WORLD}", WORKER, str(spec), str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gossip")
    run = launch(CONFIGS, out)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return {c["name"]: [torch.load(out / f"{c['name']}.rank{r}.pt") for r in range(WORLD)]
            for c in CONFIGS}


def reference(cfg: dict) -> Engine:
    engine = Engine(mlp(cfg.get("batchnorm", False)), make_topology(cfg["topology"], WORLD),
                    lr=cfg["lr"], optimizer=SGD(momentum=cfg.get("momentum", 0.0)),
                    algorithm=cfg.get("algorithm", "dsgd"),
                    gossip_every=cfg.get("gossip_every", 1))
    for x, y in batches(WORLD, cfg["steps"]):
        engine.step(x, y)
    return engine


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c["name"] for c in CONFIGS])
def test_gossip_loop_equals_the_simulated_engine(results, cfg):
    parts, ref = results[cfg["name"]], reference(cfg)
    assert all(p["steps"] == STEPS for p in parts)
    torch.testing.assert_close(torch.stack([p["w"] for p in parts]), ref.w, atol=1e-5, rtol=0)
    if ref.b.shape[1]:  # BatchNorm statistics, gossiped like the weights
        got = torch.stack([torch.cat([b.reshape(-1) for b in p["b"]]) for p in parts])
        torch.testing.assert_close(got, ref.b, atol=1e-5, rtol=0)
    consensus = ref.consensus_distance()
    for p in parts:
        assert p["consensus"] == pytest.approx(consensus, rel=1e-4, abs=1e-9)
    average = ref.average_state()
    for name, value in parts[0]["average"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, average[name], atol=1e-5, rtol=0)
    if cfg.get("algorithm") != "csgd":  # not vacuous: the workers disagree
        assert consensus > 1e-6 and (ref.w - ref.w.mean(0)).abs().max() > 1e-3


def test_ring_sends_one_row_to_each_neighbour(results):
    row = sum(p.numel() for p in mlp().parameters()) * 4  # one worker's float32 weights
    assert [p["bytes_sent"] for p in results["ring"]] == [STEPS * 2 * row] * WORLD


def test_gossip_needs_a_process_group_of_its_size(monkeypatch):
    with pytest.raises(DistributedSetupError, match="init_process_group"):
        dsgd.Gossip(mlp())
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(DistributedSetupError, match="8 workers but the job has 1"):
            dsgd.Gossip(mlp(), make_topology("ring", 8))
        model = mlp()
        before = [p.detach().clone() for p in model.parameters()]
        gossip = dsgd.Gossip(model, "complete")
        gossip.step()  # one worker: mixing leaves it as it is
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        assert gossip.consensus_distance() == 0.0 and gossip.state_dict() == {"step": 1}
    finally:
        shutdown()


@pytest.mark.slow
def test_a_hung_peer_ends_the_others_with_one_line(tmp_path):
    cfg = {**CONFIGS[0], "name": "hang", "timeout_s": 5, "hang": {"rank": 1, "step": 5}}
    run = launch([cfg], tmp_path, timeout=120)
    assert run.returncode != 0
    # each message is one write, but unbuffered ranks can interleave it with another's newline
    lines = re.findall(r"dsgd: error: [^\n]*?(?:checkpoint|$)", run.stderr, flags=re.M)
    # ranks 0 and 2 wait on rank 1; rank 3 loses them in turn
    assert len(lines) == 3, run.stderr[-3000:]
    for line in lines:
        assert re.fullmatch(r"dsgd: error: worker process \d \(or a peer\) stopped responding "
                            r"during gossip at step \d after [\d.]+ s \((timed out|connection "
                            r"lost), rank \d of 4\); restart the job from your last checkpoint",
                            line), line
    assert "exitcode: 2" in run.stderr


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(),
                    reason="needs a CUDA GPU and nccl")
def test_gossip_on_cuda_with_nccl(monkeypatch):
    """One process on one GPU (nccl needs a GPU per process): the flat exchange runs on CUDA
    tensors and leaves a single worker's weights as they are."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = mlp(batchnorm=True).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        gossip = dsgd.Gossip(model, "complete")
        x, y = batches(1, 1)[0]
        torch.nn.functional.cross_entropy(model(x[0].cuda()), y[0].cuda()).backward()
        expected = [p.detach() - 0.1 * p.grad for p in model.parameters()]
        gossip.step(opt)
        for p, e in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p, e)
        assert gossip.consensus_distance() == 0.0
    finally:
        shutdown()
