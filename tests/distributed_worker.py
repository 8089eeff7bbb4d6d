"""One rank of a distributed test job: runs a list of configs with TorchDistributedCommunicator.

Launch under torchrun (``torchrun --standalone --nproc-per-node=4 tests/distributed_worker.py
CONFIGS.json OUT_DIR``) or as W processes with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.
Every rank builds the same model and the same full (m, B, ...) batches, trains on its own rows,
and writes ``OUT_DIR/<name>.rank<r>.pt`` with its block of the final weights and bytes_sent.

A config may inject a fault on one rank at one step: ``{"rank": 2, "step": 5, "kind": k}`` with
k = "exit" (os._exit(1)), "hang" (sleep forever), "wait" (write ``<name>.rank<r>.ready`` and
sleep, for the test to SIGKILL it) or "nan" (a NaN in the rank's batch: its loss diverges). A
rank that fails writes ``<name>.rank<r>.error`` (the message) and exits with status 2 through
``abort_process``, as the CLI should on a PeerFailure.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dsgd.algorithms import CSGD, Choco, DeepSqueeze
from dsgd.compress import make_compressor
from dsgd.engine import Engine
from dsgd.engine.distributed import (
    TorchDistributedCommunicator,
    abort_process,
    init_from_env,
    shutdown,
)
from dsgd.errors import UserError
from dsgd.optim import SGD
from dsgd.optim.schedule import warmup_multistep
from dsgd.topology import make_topology


def mlp(batchnorm: bool = False) -> nn.Module:
    """66 parameters; with BatchNorm, 14 more and 14 float buffers that gossip too."""
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(7)] if batchnorm else []
    return nn.Sequential(nn.Linear(5, 7), *norm, nn.Tanh(), nn.Linear(7, 3))


def batches(m: int, steps: int, B: int = 8, seed: int = 1):
    """The full (m, B, 5) inputs and (m, B) labels of every step, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, B, 5, generator=g), torch.randint(0, 3, (m, B), generator=g))
            for _ in range(steps)]


def make_engine(cfg: dict, comm=None) -> Engine:
    """The engine of a config; ``comm=None`` gives the single-process reference."""
    topo = make_topology(cfg["topology"], cfg["m"], shuffle=cfg.get("shuffle", False), seed=3)
    lr = warmup_multistep(0.2, warmup_steps=2, milestones=[10], gamma=0.5)
    model = mlp(cfg.get("batchnorm", False))
    algorithm = cfg.get("algorithm", "dsgd")
    if "compression" in cfg:  # choco / deepsqueeze / csgd: its compressor by name
        opts = dict(cfg["compression"])
        compressor = make_compressor(opts.pop("name"), **opts)
        if algorithm == "csgd":  # compressed gradients with error feedback
            algorithm = CSGD(compressor, seed=7)
        else:  # compressed gossip, its consensus step
            kind = DeepSqueeze if algorithm == "deepsqueeze" else Choco
            algorithm = kind(compressor, cfg.get("gamma", 1.0), seed=7)
    return Engine(model, topo if comm is None else None, comm=comm, lr=lr,
                  optimizer=SGD(momentum=cfg.get("momentum", 0.0)), algorithm=algorithm)


def run(cfg: dict, out: Path, rank: int) -> None:
    topo = make_topology(cfg["topology"], cfg["m"], shuffle=cfg.get("shuffle", False), seed=3)
    comm = TorchDistributedCommunicator(topo, timeout_s=cfg.get("timeout_s", 60),
                                        checkpoint_dir=cfg.get("checkpoint_dir"))
    engine = make_engine(cfg, comm)
    rows = slice(comm.workers.start, comm.workers.stop)
    fault = cfg.get("fault") or {}
    for t, (x, y) in enumerate(batches(cfg["m"], cfg["steps"])):
        if fault.get("rank") == rank and fault.get("step") == t and fault["kind"] == "nan":
            x = x.clone()
            x[rows.start, 0, 0] = float("nan")  # this rank's first worker diverges
        elif fault.get("rank") == rank and fault.get("step") == t:
            (out / f"{cfg['name']}.rank{rank}.ready").write_text(str(time.time()))
            if fault["kind"] == "exit":
                os._exit(1)
            time.sleep(3600)  # "hang" and "wait" (the test kills it)
        engine.step(x[rows], y[rows])
    torch.save({"workers": list(comm.workers), "w": engine.w, "bytes_sent": comm.bytes_sent,
                "steps": engine.step_count}, out / f"{cfg['name']}.rank{rank}.pt")


def main(argv: list[str]) -> int:
    configs = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    torch.set_num_threads(1)
    ctx = init_from_env(timeout_s=float(os.environ.get("DSGD_TEST_INIT_TIMEOUT", 120)))
    for cfg in configs:
        try:
            run(cfg, out, ctx.rank)
        except UserError as e:
            (out / f"{cfg['name']}.rank{ctx.rank}.error").write_text(f"{time.time()}\n{e}")
            print(f"error: {e}", file=sys.stderr, flush=True)
            abort_process(2)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
