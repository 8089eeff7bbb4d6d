"""Train one configuration into a run directory, with progress, metrics, checkpoints and resume.

A run directory holds::

    config.toml / config.json   the resolved config
    version.json                dsgd version, git commit, torch version
    metrics.jsonl               one JSON object per evaluation (step, losses, accuracies, consensus)
    summary.json                the final metrics and the run's status
    checkpoints/last.pt         the latest checkpoint (rank<r>.pt per process under torchrun),
                                and the one before it (last.prev.pt, rank<r>.prev.pt)
    tensorboard/                optional TensorBoard events

Checkpoints are written atomically (temp file + rename) and hold everything a bit-identical
resume needs: the engine (weights, buffers, optimizer state, RNG), the data loader (its RNG and
positions), the torch RNG and the running training averages. They load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dsgd.algorithms import CSGD, DRDSGD, QGM, Algorithm, Choco, DeepSqueeze
from dsgd.compress import make_compressor
from dsgd.data import WorkerLoader, batches, crop_flip, load_dataset, split
from dsgd.engine import Engine
from dsgd.engine.network import NetworkClock, SimulatedClock, faulty
from dsgd.errors import RunInterrupted, TrainingDiverged, UserError
from dsgd.experiments import config as C
from dsgd.experiments.instruments import measure
from dsgd.experiments.rundir import RunDir, os_error_message
from dsgd.models import build_model
from dsgd.optim import SGD
from dsgd.optim.schedule import constant, cosine, warmup_multistep
from dsgd.report.runs import is_finished, read_summary
from dsgd.topology import Topology, lazy, make_topology


def _schedule(t: C.TrainConfig):
    if t.schedule == "constant":
        return warmup_multistep(t.lr, t.warmup_steps) if t.warmup_steps else constant(t.lr)
    if t.schedule == "cosine":
        return cosine(t.lr, t.steps, t.warmup_steps)
    return warmup_multistep(t.lr, t.warmup_steps, t.milestones, t.gamma)


def _gradient_rule(t: C.TrainConfig):
    if t.gradient == "sgd":
        return None
    if t.gradient in ("sam", "asam"):
        from dsgd.optim.sam import SAM
        return SAM(rho=t.rho, adaptive=t.gradient == "asam")
    from dsgd.optim.avg_sam import AvgSAM, isotropic
    return AvgSAM(isotropic(t.sigma), num_samples=t.samples)


@dataclass
class Setup:
    """Everything a run is made of, built from a config (also used by the instruments)."""

    cfg: C.Config
    dataset: object
    loader: WorkerLoader
    engine: Engine


def topology_of(cfg: C.Config) -> Topology:
    """The config's mixing-matrix schedule: topology, shuffle, lazy self-weight and faults."""
    t = cfg.train
    topo = lazy(make_topology(t.topology, t.workers, shuffle=t.shuffle_topology, seed=t.seed),
                t.lazy)
    return faulty(topo, **{"seed": t.seed, **t.faults}) if t.faults else topo


def _compressor(t: C.TrainConfig):
    """The compressor ``[train.compression]`` names (the identity when none)."""
    opts = dict(t.compression)
    return make_compressor(opts.pop("name", "none"), **opts)


def _algorithm(t: C.TrainConfig) -> str | Algorithm:
    """The configured algorithm: its name, or an object carrying its config keys."""
    if t.algorithm == "qgm":
        return QGM(beta=t.qgm_beta)
    if t.algorithm == "drdsgd":
        return DRDSGD(lam=t.drdsgd_lambda)
    if t.algorithm in ("choco", "deepsqueeze"):
        kind = Choco if t.algorithm == "choco" else DeepSqueeze
        return kind(_compressor(t), t.consensus_step, seed=t.seed)
    if t.algorithm == "csgd" and t.compression.get("name", "none") != "none":  # error feedback
        return CSGD(_compressor(t), seed=t.seed)
    return t.algorithm


def network_clock(cfg: C.Config, topology: Topology) -> NetworkClock:
    """The simulated clock of ``cfg.network``; its stragglers are drawn from the seed the faults
    use, so equal values in ``train.faults`` make the same workers miss the gossip."""
    n = cfg.network
    return NetworkClock(SimulatedClock(n.compute_ms / 1e3, n.latency_ms / 1e3,
                                       n.bandwidth_gbps * 1e9 / 8), topology,
                        delay_s=n.straggler_ms / 1e3, stragglers=n.stragglers,
                        straggle_steps=n.straggle_steps,
                        seed=cfg.train.faults.get("seed", cfg.train.seed))


def build(cfg: C.Config, comm=None) -> Setup:
    d, t = cfg.data, cfg.train
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device is cuda but no CUDA GPU is available; set device = \"cpu\"")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device is {device} but this machine has {torch.cuda.device_count()} "
                        "GPU(s); choose device = \"cuda:N\" with N below that")
    if t.compile and device.type == "cpu" and not (shutil.which(os.environ.get("CXX", "g++"))
                                                   or shutil.which("clang++")):
        raise UserError("train.compile on CPU needs a C++ compiler (g++ or clang++, or $CXX); "
                        "install one or set train.compile = false")
    ds = load_dataset(d.name, d.dir, n_train=d.n_train, n_test=d.n_test, image_size=d.image_size,
                      **d.options)
    loader = split(ds, t.workers, t.batch_size, partition=d.partition, alpha=d.alpha,
                   shards_per_worker=d.shards_per_worker, seed=t.seed,
                   augment=crop_flip if d.augment else None)
    torch.manual_seed(t.seed)
    model = build_model(cfg.model.name, ds.num_classes, ds.sample_shape, **cfg.model.options)
    model = model.to(device)
    engine = Engine(model, topology_of(cfg) if comm is None else None, comm=comm,
                    algorithm=_algorithm(t), lr=_schedule(t),
                    optimizer=SGD(t.momentum, t.nesterov, t.weight_decay),
                    gossip_every=t.gossip_every, buffers=t.buffers, strategy=t.strategy,
                    compile=t.compile, chunk_size=t.chunk_size or None, precision=t.precision,
                    gradient_rule=_gradient_rule(t), seed=t.seed)
    return Setup(cfg, ds, loader, engine)


@torch.no_grad()
def evaluate(engine: Engine, x, y, batch_size: int) -> dict[str, float]:
    """Loss and accuracy of the averaged model w_a on (x, y)."""
    model = engine.module(engine.average_state()).eval()
    device = engine.w.device
    total_loss, correct, n = 0.0, 0, 0
    for xb, yb in batches(x, y, batch_size):
        xb, yb = xb.to(device), yb.to(device)
        out = model(xb)
        total_loss += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(-1) == yb).sum().item()
        n += len(yb)
    return {"test_loss": total_loss / n, "test_acc": correct / n}

class _StopSignals:
    """SIGTERM (as schedulers send it) and Ctrl-C during training set a flag instead of killing
    the process mid-step: the loop checkpoints at the current step and ends with status
    "interrupted". A second signal interrupts at once. Installed only in the main thread."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _one_line(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _agree_on_config(cfg: C.Config, comm) -> None:
    """Every process of a job must train the same computation: compare a fingerprint of the
    resolved config (without the settings that may differ per process, such as the device)."""
    fp = C.fingerprint(cfg)
    low, high = comm.agree_min(fp), -comm.agree_min(-fp)
    if low != high:
        raise UserError(f"the processes of this job were started with different configs (this "
                        f"process: fingerprint {fp:016x}); give every process the same --config "
                        "and --set")


def train(cfg: C.Config, out: str | Path, *, resume: bool = False, comm=None) -> dict:
    """Train ``cfg`` into the run directory ``out``; returns the summary.

    Evaluates the averaged model every ``log.eval_every`` steps, checkpoints every
    ``log.checkpoint_every`` steps and at the end. The summary's status is true: "finished"
    only when all ``train.steps`` were taken; "diverged" (a NaN/inf loss, ``TrainingDiverged``,
    the last good checkpoint kept), "interrupted" (SIGTERM or Ctrl-C: ``RunInterrupted``, with
    a checkpoint at the current step) or "failed" (any other error, with its one-line reason).
    """
    rank = 0 if comm is None else getattr(comm, "rank", 0)
    world = 1 if comm is None else getattr(comm, "world_size", 1)
    if comm is not None:
        _agree_on_config(cfg, comm)
    if cfg.log.tensorboard and rank == 0:
        try:  # before anything is written: a missing package is a setup error, not a failed run
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise UserError("log.tensorboard = true needs the tensorboard package: pip install "
                            "tensorboard, or set log.tensorboard = false") from None
    run = RunDir(Path(out), rank, world)
    run.lock()
    try:
        return _train(cfg, run, resume, comm)
    finally:
        run.unlock()


def _train(cfg: C.Config, run: RunDir, resume: bool, comm) -> dict:
    state = run.start(cfg, resume, comm)
    setup = build(cfg, comm)
    engine, loader, ds, t, log = setup.engine, setup.loader, setup.dataset, cfg.train, cfg.log
    hosted = list(engine.comm.workers)
    acc = {"loss": 0.0, "acc": 0.0, "n": 0, "elapsed": 0.0}  # running train averages
    clock = network_clock(cfg, engine.comm.topology)  # the schedule the engine gossips on
    rows: list[dict] = []
    saved_step = None  # the step of the newest checkpoint on disk
    if state is not None:
        try:
            engine.load_state_dict(state["engine"])
            loader.load_state_dict(state["loader"])
            torch.set_rng_state(state["torch_rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise UserError(f"the checkpoint in {run.ckpt.parent} does not fit this config "
                            f"({_one_line(e)[:160]}); resume with the config it was written "
                            "with") from None
        acc = dict(state["running"])
        if "clock" in acc:
            clock.load_state_dict(acc["clock"])
        saved_step = engine.step_count
    rows = run.truncate_metrics(engine.step_count)

    def checkpoint() -> None:
        nonlocal saved_step
        acc["elapsed"] = time.perf_counter() - started
        acc["clock"] = clock.state_dict()
        run.save({"engine": engine.state_dict(), "loader": loader.state_dict(),
                  "torch_rng": torch.get_rng_state(), "running": acc})
        saved_step = engine.step_count

    tb = None
    if log.tensorboard and run.writer:
        from torch.utils.tensorboard import SummaryWriter
        tb = SummaryWriter(str(run.out / "tensorboard"))
    bar = None
    if log.progress and run.writer:
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=engine.step_count, desc=cfg.name, dynamic_ncols=True,
                   mininterval=1.0)
    started = time.perf_counter() - acc["elapsed"]
    status, message = "finished", ""
    try:
        with _StopSignals() as stop:
            while engine.step_count < t.steps:
                x, y = loader.next_batch()
                sent, t0 = engine.comm.bytes_sent, time.perf_counter()
                engine.comm.rounds.clear()
                result = engine.step(x[hosted], y[hosted])
                compute = (cfg.network.compute_ms / 1e3 if cfg.network.compute_ms
                           else (time.perf_counter() - t0) / len(hosted))
                acc["sim_time_s"] = clock.advance(engine.step_count - 1, engine.comm.rounds,
                                                  compute)
                acc["bytes"] = acc.get("bytes", 0) + engine.comm.bytes_sent - sent
                acc["total_bytes"] = acc.get("total_bytes", 0) + engine.comm.bytes_sent - sent
                acc["loss"] += result.loss.mean().item()
                acc["acc"] += result.accuracy.mean().item()
                acc["n"] += 1
                step = engine.step_count
                if step % log.eval_every == 0 or step == t.steps:
                    row = _eval_row(engine, ds, log, acc, hosted, result.lr,
                                    step / loader.steps_per_epoch)
                    row["time"] = time.perf_counter() - started
                    rows.append(row)
                    run.log(row)
                    if tb is not None:
                        for k, v in row.items():
                            if k != "step":
                                tb.add_scalar(k, v, step)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['train_loss']:.3f}",
                                        test_acc=f"{row['test_acc']:.3f}",
                                        consensus=f"{row['consensus']:.2e}", refresh=False)
                    acc.update(loss=0.0, acc=0.0, n=0, bytes=0)
                if step % log.checkpoint_every == 0 or step == t.steps:
                    checkpoint()
                if bar is not None:
                    bar.update(1)
                if stop.received is not None and engine.step_count < t.steps:
                    checkpoint()
                    name = "SIGTERM" if stop.received == signal.SIGTERM else "Ctrl-C"
                    raise RunInterrupted(
                        f"stopped by {name} at step {engine.step_count}; a checkpoint of this "
                        "step is saved: rerun with --resume to continue",
                        exit_code=128 + stop.received)
    except TrainingDiverged as err:
        status, message = "diverged", str(err)
        raise
    except RunInterrupted as err:
        status, message = "interrupted", str(err)
        raise
    except KeyboardInterrupt:
        status = "interrupted"
        message = (f"interrupted at step {engine.step_count}; the last checkpoint (step "
                   f"{saved_step}) is intact: rerun with --resume" if saved_step is not None else
                   f"interrupted at step {engine.step_count}, before the first checkpoint: "
                   "rerun the same command to start again")
        raise RunInterrupted(message, exit_code=130) from None
    except OSError as err:  # a full disk, a folder made read-only, ...
        status, message = "failed", os_error_message(err)
        raise UserError(message) from None
    except Exception as err:
        status, message = "failed", _one_line(err)
        raise
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
        try:
            summary = run.summarize(rows, status, time.perf_counter() - started,
                                    engine.step_count, message, backend=engine.backend.name,
                                    backend_reason=getattr(engine.backend, "reason", ""))
        except OSError as err:
            if status == "finished":  # else the error already on its way says more
                raise UserError(os_error_message(err)) from None
    return summary


def _eval_row(engine: Engine, ds, log: C.LogConfig, acc: dict, hosted: list[int], lr: float,
              epoch: float) -> dict:
    # every process holds an equal block of workers: the mean of the blocks' means is the
    # mean over all m workers
    local = torch.tensor([[acc["loss"], acc["acc"]]], dtype=torch.float64)
    train_loss, train_acc = (engine.comm.mean(local.to(engine.w.device).expand(
        len(hosted), 2).contiguous())[0] / acc["n"]).tolist()
    row = {"step": engine.step_count, "epoch": epoch, "lr": lr,
           "train_loss": train_loss, "train_acc": train_acc,
           **evaluate(engine, ds.x_test, ds.y_test, log.eval_batch_size),
           "consensus": engine.consensus_distance(),
           # bytes a worker put on the wire per step (see dsgd.engine.comm), and since step 0
           "bytes_per_worker_step": acc.get("bytes", 0) / acc["n"] / len(hosted),
           "bytes_per_worker": acc.get("total_bytes", 0) / len(hosted),
           "sim_time_s": acc.get("sim_time_s", 0.0)}
    if log.instruments:
        row.update(measure(engine, ds, log))
    return row


def ensure_run(cfg: C.Config, run_dir: str | Path) -> dict:
    """Train ``cfg`` into ``run_dir`` unless it finished (or diverged) before; resume when a
    checkpoint exists (also after "failed" or "interrupted"); start afresh when a run died
    before its first checkpoint. Returns the summary. For pipelines (quickstart, reproduce)
    that are rerun until everything is done."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    if is_finished(run_dir) or summary.get("status") == "diverged":
        return summary
    resume = any((run_dir / "checkpoints").glob("*.pt"))
    try:
        return train(cfg, run_dir, resume=resume)
    except TrainingDiverged:
        return read_summary(run_dir)
