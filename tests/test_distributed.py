"""The distributed communicator: its exchange plan, the torchrun engine against the
single-process one, its byte count, and what a killed or hung peer does to the others.

Process start-up dominates (each rank imports torch), so one torchrun job runs every
equivalence config and the two fault jobs run side by side.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dsgd.engine import LocalCommunicator
from dsgd.engine.distributed import (
    DistributedSetupError,
    TorchDistributedCommunicator,
    gossip_plan,
    init_from_env,
    shutdown,
)
from dsgd.topology import make_topology

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import batches, make_engine  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "distributed_worker.py")
WORLD = 4
P = 66  # parameters of distributed_worker.mlp()
STEPS = 20

CONFIGS = [
    {"name": "ring_m4", "topology": "ring", "m": 4},
    {"name": "exponential_m4", "topology": "exponential", "m": 4},
    {"name": "ring_m4_momentum", "topology": "ring", "m": 4, "momentum": 0.9},
    {"name": "one_peer_exp_m8", "topology": "one_peer_exponential", "m": 8, "momentum": 0.9},
    {"name": "exponential_m8_shuffle", "topology": "exponential", "m": 8, "shuffle": True},
    {"name": "torus_m8_batchnorm", "topology": "torus", "m": 8, "batchnorm": True},
    {"name": "csgd_m8", "topology": "ring", "m": 8, "algorithm": "csgd"},
    {"name": "csgd_m4_momentum", "topology": "ring", "m": 4, "algorithm": "csgd",
     "momentum": 0.9},
    {"name": "gt_ring_m8", "topology": "ring", "m": 8, "algorithm": "gt"},
    {"name": "d2_star_m8", "topology": "star", "m": 8, "algorithm": "d2"},
    {"name": "qgm_ring_m4", "topology": "ring", "m": 4, "algorithm": "qgm"},
    {"name": "pushsum_directed_exp_m8", "topology": "directed_exponential", "m": 8,
     "algorithm": "pushsum"},
    {"name": "drdsgd_exponential_m4", "topology": "exponential", "m": 4, "algorithm": "drdsgd"},
    {"name": "choco_topk_ring_m4", "topology": "ring", "m": 4, "algorithm": "choco",
     "compression": {"name": "topk", "ratio": 0.2}, "gamma": 0.5},
    {"name": "deepsqueeze_topk_ring_m4", "topology": "ring", "m": 4,
     "algorithm": "deepsqueeze", "compression": {"name": "topk", "ratio": 0.2}, "gamma": 0.5},
    # random compressors: each worker draws from its own generator, whichever rank hosts it
    {"name": "choco_randomk_ring_m4", "topology": "ring", "m": 4, "algorithm": "choco",
     "compression": {"name": "randomk", "ratio": 0.2}, "gamma": 0.5},
    {"name": "choco_qsgd_ring_m4", "topology": "ring", "m": 4, "algorithm": "choco",
     "compression": {"name": "qsgd", "levels": 7}, "gamma": 0.5},
    {"name": "choco_randomk_ring_m8", "topology": "ring", "m": 8, "algorithm": "choco",
     "compression": {"name": "randomk", "ratio": 0.2}, "gamma": 0.5},
    # compressed gradients with error feedback: an all-gather of the messages
    {"name": "csgd_topk_m4", "topology": "ring", "m": 4, "algorithm": "csgd",
     "compression": {"name": "topk", "ratio": 0.2}, "momentum": 0.9},
    {"name": "csgd_qsgd_m8", "topology": "ring", "m": 8, "algorithm": "csgd",
     "compression": {"name": "qsgd", "levels": 7}},
]
for _cfg in CONFIGS:
    _cfg["steps"] = STEPS


# ---- the plan, in one process ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ring", "exponential", "torus", "star", "complete",
                                  "one_peer_exponential"])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_plan_exchanges_exactly_what_gossip_needs(name, world):
    m = 8
    topo = make_topology(name, m, shuffle=name == "ring", seed=1)
    x = torch.randn(m, 3, dtype=torch.float64)
    b = m // world
    for step in range(3):
        P = topo.matrix(step)
        plans = [gossip_plan(P, r, world) for r in range(world)]
        for r, plan in enumerate(plans):
            received = []
            for q, n in plan.recvs:
                sent = dict(plans[q].sends)[r]  # what q sends to r is what r expects from q
                assert len(sent) == n
                received.append(x[q * b + sent])
            mixed = plan.weights @ torch.cat([x[r * b:(r + 1) * b], *received])
            torch.testing.assert_close(mixed, (P @ x)[r * b:(r + 1) * b])
            # nothing is sent that no one reads: each sent row has a reader on the peer
            for q, idx in plan.sends:
                assert (P[q * b:(q + 1) * b, r * b + idx] != 0).any(0).all()


def test_ring_plan_sends_one_row_to_each_neighbour():
    plan = gossip_plan(make_topology("ring", 8).matrix(0), rank=3, world_size=8)
    assert [(q, idx.tolist()) for q, idx in plan.sends] == [(2, [0]), (4, [0])]
    assert plan.recvs == ((2, 1), (4, 1))


def test_one_process_group_mixes_like_the_local_communicator(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(DistributedSetupError, match="torchrun"):
        init_from_env()
    topo = make_topology("one_peer_exponential", 8)
    with pytest.raises(DistributedSetupError, match="init_from_env"):
        TorchDistributedCommunicator(topo)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        comm, local = TorchDistributedCommunicator(topo), LocalCommunicator(topo)
        assert comm.workers == range(8) and init_from_env().world_size == 1
        x = torch.randn(8, 5)
        for step in range(4):
            torch.testing.assert_close(comm.mix(x, step), local.mix(x, step))
        torch.testing.assert_close(comm.mean(x), local.mean(x))
        assert comm.bytes_sent == 0  # alone: nothing to send for gossip or the all-reduce
    finally:
        shutdown()


def test_choco_on_a_time_varying_topology_is_refused_under_torchrun_with_what_to_do():
    from dsgd.errors import UserError

    choco = {"m": 8, "algorithm": "choco", "compression": {"name": "topk", "ratio": 0.2}}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ring = TorchDistributedCommunicator(make_topology("ring", 8))
        make_engine({**choco, "topology": "ring"}, ring)  # a fixed matrix runs
        varying = TorchDistributedCommunicator(make_topology("one_peer_exponential", 8))
        with pytest.raises(UserError, match="one process only: use algorithm deepsqueeze"):
            make_engine({**choco, "topology": "one_peer_exponential"}, varying)
    finally:
        shutdown()


# ---- launching processes -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            **{k: str(v) for k, v in extra.items()}}


def spawn(configs: list[dict], out: Path, tag: str, world: int = WORLD) -> list[subprocess.Popen]:
    """``world`` processes with torchrun's variables set by hand, rendezvous on 127.0.0.1."""
    spec = out / f"{tag}.json"
    spec.write_text(json.dumps(configs))
    port = free_port()
    procs = []
    for r in range(world):
        with open(out / f"{tag}.rank{r}.log", "w") as log:  # the child keeps its own handle
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, str(spec), str(out)], stdout=log, stderr=log, cwd=ROOT,
                env=env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port)))
    return procs


def logs(out: Path, tag: str) -> str:
    return "\n".join(p.read_text()[-2000:] for p in sorted(out.glob(f"{tag}*.log")))


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    """Every equivalence config in one ``torchrun --standalone`` job of WORLD processes."""
    out = tmp_path_factory.mktemp("torchrun")
    spec = out / "configs.json"
    spec.write_text(json.dumps(CONFIGS))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={WORLD}", WORKER, str(spec), str(out)]
    with open(out / "torchrun.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=log, cwd=ROOT, env=env(),
                            timeout=150).returncode
    assert rc == 0, (out / "torchrun.log").read_text()[-4000:]
    return {cfg["name"]: [torch.load(out / f"{cfg['name']}.rank{r}.pt") for r in range(WORLD)]
            for cfg in CONFIGS}


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c["name"] for c in CONFIGS])
def test_torchrun_engine_equals_single_process_engine(torchrun_results, cfg):
    parts = torchrun_results[cfg["name"]]
    b = cfg["m"] // WORLD
    assert [p["workers"] for p in parts] == [list(range(r * b, (r + 1) * b))
                                             for r in range(WORLD)]
    assert all(p["steps"] == STEPS for p in parts)
    ref = make_engine(cfg)
    for x, y in batches(cfg["m"], STEPS):
        ref.step(x, y)
    torch.testing.assert_close(torch.cat([p["w"] for p in parts]), ref.w, atol=1e-5, rtol=0)
    if cfg.get("algorithm") != "csgd":  # the test is not vacuous: the workers disagree
        assert (ref.w - ref.w.mean(0)).abs().max() > 1e-3


def test_bytes_sent_is_neighbour_rows_only(torchrun_results):
    row = P * 4  # one worker's float32 weights
    # ring, one worker per rank: two neighbours, one row each, per step
    assert [p["bytes_sent"] for p in torchrun_results["ring_m4"]] == [STEPS * 2 * row] * WORLD
    # exponential(4): i reads i+1 and i+2, so each rank serves two ranks
    assert [p["bytes_sent"] for p in torchrun_results["exponential_m4"]] == [STEPS * 2 * row] * 4
    # C-SGD: one ring all-reduce of the gradient per step over W ranks: 2 (W - 1) / W of it
    assert [p["bytes_sent"] for p in torchrun_results["csgd_m8"]] == [
        STEPS * 2 * (WORLD - 1) * row // WORLD] * WORLD
    # one-peer exponential, 2 workers per rank: offsets 1, 2, 4 need 1, 2, 2 remote rows
    rows = sum((1, 2, 2)[t % 3] for t in range(STEPS))
    assert [p["bytes_sent"] for p in torchrun_results["one_peer_exp_m8"]] == [rows * row] * 4
    # CHOCO top-20 %: each rank sends its message (k values + k int32 indices) to 2 neighbours,
    # as the simulated engine counts it
    k = -(-P * 2 // 10)
    assert [p["bytes_sent"] for p in torchrun_results["choco_topk_ring_m4"]] == [
        STEPS * 2 * k * 8] * WORLD
    # random-k 20 %: k values and the indices' 8-byte seed; QSGD 7 levels: 4 bits an entry and
    # one float32 norm (66 entries, one bucket)
    assert [p["bytes_sent"] for p in torchrun_results["choco_randomk_ring_m4"]] == [
        STEPS * 2 * (k * 4 + 8)] * WORLD
    assert [p["bytes_sent"] for p in torchrun_results["choco_qsgd_ring_m4"]] == [
        STEPS * 2 * (-(-P * 4 // 8) + 4)] * WORLD
    # compressed C-SGD: a ring all-gather of the messages, W - 1 blocks of b messages per rank
    assert [p["bytes_sent"] for p in torchrun_results["csgd_topk_m4"]] == [
        STEPS * (WORLD - 1) * k * 8] * WORLD
    assert [p["bytes_sent"] for p in torchrun_results["csgd_qsgd_m8"]] == [
        STEPS * (WORLD - 1) * 2 * (-(-P * 4 // 8) + 4)] * WORLD
    # an all-gather of every worker would send (W - 1) rows per rank and step
    assert torchrun_results["ring_m4"][0]["bytes_sent"] < STEPS * (WORLD - 1) * row


@pytest.mark.parametrize("name", ["choco_topk_ring_m4", "choco_randomk_ring_m4",
                                  "choco_qsgd_ring_m4", "deepsqueeze_topk_ring_m4",
                                  "csgd_topk_m4"])
def test_compressed_exchanges_count_the_simulated_engines_bytes(torchrun_results, name):
    """One worker per rank: the ranks together send what the simulated workers send."""
    cfg = next(c for c in CONFIGS if c["name"] == name)
    ref = make_engine(cfg)
    for x, y in batches(cfg["m"], STEPS):
        ref.step(x, y)
    assert sum(p["bytes_sent"] for p in torchrun_results[name]) == ref.comm.bytes_sent


# ---- faults ------------------------------------------------------------------------------------
KILL_TIMEOUT_S = 60  # long: a killed peer must be noticed at once, not by the timeout
HANG_TIMEOUT_S = 8
MESSAGE = re.compile(r"(worker process \d \(or a peer\)|a worker process) stopped responding "
                     r"during (gossip at step \d+|all-reduce) after [\d.]+ s \((connection lost|"
                     r"timed out)[^)]*\); the run's checkpoints in \S+ are intact: resume with "
                     r"--resume")


def wait_for(path: Path, procs, limit_s: float) -> float:
    deadline = time.time() + limit_s
    while not path.exists():
        assert time.time() < deadline, f"{path.name} never appeared"
        assert all(p.poll() is None for p in procs), "a rank exited before the fault"
        time.sleep(0.1)
    return time.time()


def finish(procs, victim: int, limit_s: float) -> dict[int, tuple[int, float]]:
    """Wait for the survivors (at most limit_s), then kill the victim; {rank: (rc, time)}."""
    deadline, done = time.time() + limit_s, {}
    try:
        while len(done) < len(procs) - 1 and time.time() < deadline:
            for r, p in enumerate(procs):
                if r != victim and r not in done and p.poll() is not None:
                    done[r] = (p.returncode, time.time())
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
    return done


@pytest.fixture(scope="module")
def fault_jobs(tmp_path_factory):
    """Four jobs started together: a peer killed during gossip (2 processes), a peer hung
    during gossip (4: the rank that is not its neighbour fails when the neighbours exit), a peer
    hung during C-SGD's all-reduce (2), a peer whose loss diverges (4). Yields the output
    folder and {tag: processes}."""
    out = tmp_path_factory.mktemp("faults")
    ring = {"topology": "ring", "m": 4, "steps": STEPS, "checkpoint_dir": "runs/demo"}
    jobs = {
        "kill": spawn([{**ring, "m": 2, "name": "kill", "timeout_s": KILL_TIMEOUT_S,
                        "fault": {"rank": 1, "step": 5, "kind": "wait"}}], out, "kill", world=2),
        "hang": spawn([{**ring, "name": "hang", "timeout_s": HANG_TIMEOUT_S,
                        "fault": {"rank": 2, "step": 5, "kind": "hang"}}], out, "hang"),
        "hang_csgd": spawn([{**ring, "m": 2, "algorithm": "csgd", "name": "hang_csgd",
                             "timeout_s": HANG_TIMEOUT_S,
                             "fault": {"rank": 1, "step": 5, "kind": "hang"}}],
                           out, "hang_csgd", world=2),
        "nan": spawn([{**ring, "name": "nan", "timeout_s": HANG_TIMEOUT_S,
                       "fault": {"rank": 1, "step": 5, "kind": "nan"}}], out, "nan"),
    }
    try:
        yield out, jobs
    finally:
        for p in (p for procs in jobs.values() for p in procs):
            if p.poll() is None:
                p.kill()
                p.wait()


def check_survivors(out: Path, tag: str, done: dict, survivors: list[int], since: float,
                    within_s: float) -> dict[int, float]:
    """Every survivor exited with status 2 and the message; {rank: seconds it waited}."""
    assert sorted(done) == survivors, f"survivors did not exit in time:\n{logs(out, tag)}"
    for r, (rc, when) in done.items():
        assert rc == 2, logs(out, tag)
        assert when - since < within_s, f"rank {r} took {when - since:.1f} s"
        message = (out / f"{tag}.rank{r}.error").read_text().splitlines()[1]
        assert MESSAGE.fullmatch(message), message
    return {r: float(re.search(r"after ([\d.]+) s", (out / f"{tag}.rank{r}.error")
                               .read_text()).group(1)) for r in done}


def test_killed_peer_stops_the_others_at_once(fault_jobs):
    out, jobs = fault_jobs
    procs = jobs["kill"]
    wait_for(out / "kill.rank1.ready", procs, 120)
    killed = time.time()
    procs[1].send_signal(signal.SIGKILL)
    done = finish(procs, victim=1, limit_s=KILL_TIMEOUT_S / 2)
    check_survivors(out, "kill", done, [0], killed, within_s=KILL_TIMEOUT_S / 2)
    error = (out / "kill.rank0.error").read_text()
    assert "worker process 1 (or a peer)" in error and "connection lost" in error


@pytest.mark.parametrize("tag, victim, survivors, neighbours", [
    ("hang", 2, [0, 1, 3], [1, 3]),
    ("hang_csgd", 1, [0], [0]),
])
def test_hung_peer_stops_the_others_after_the_timeout(fault_jobs, tag, victim, survivors,
                                                      neighbours):
    out, jobs = fault_jobs
    procs = jobs[tag]
    hung = wait_for(out / f"{tag}.rank{victim}.ready", procs, 120)
    done = finish(procs, victim=victim, limit_s=HANG_TIMEOUT_S + 30)
    waited = check_survivors(out, tag, done, survivors, hung, within_s=HANG_TIMEOUT_S + 15)
    for r in neighbours:  # those waiting on the hung rank give up after the timeout, no sooner
        assert waited[r] >= HANG_TIMEOUT_S * 0.9, waited
        assert "timed out" in (out / f"{tag}.rank{r}.error").read_text()


def test_a_diverged_rank_is_reported_as_divergence_by_it_and_its_neighbours(fault_jobs):
    """Rank 1's loss turns NaN: it and its ring neighbours 0 and 2 say so. Rank 3 notices only
    when rank 0 (which hosts the job's store without torchrun's agent) exits, so it may report
    a stopped peer instead; both are one line and status 2."""
    out, jobs = fault_jobs
    procs = jobs["nan"]
    for p in procs:
        p.wait(timeout=HANG_TIMEOUT_S + 60)
    assert [p.returncode for p in procs] == [2, 2, 2, 2], logs(out, "nan")
    for r in range(4):
        error = (out / f"nan.rank{r}.error").read_text().splitlines()[1]
        if r == 3 and MESSAGE.fullmatch(error):
            continue
        assert "loss is nan at step 5 on worker(s) [1]" in error, error
        assert ("another process" in error) == (r != 1), error
