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

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import dsgd
from dsgd.data import WorkerLoader, batches, crop_flip, load_dataset, split
from dsgd.engine import Engine
from dsgd.errors import TrainingDiverged, UserError
from dsgd.experiments import config as C
from dsgd.experiments.instruments import measure
from dsgd.models import build_model
from dsgd.optim import SGD
from dsgd.optim.schedule import constant, cosine, warmup_multistep
from dsgd.topology import make_topology


def code_version() -> dict[str, str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(dsgd.__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {"dsgd": dsgd.__version__, "git": sha or "unknown", "torch": torch.__version__}


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same directory, then rename: never a torn checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def build(cfg: C.Config, comm=None) -> Setup:
    d, t = cfg.data, cfg.train
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device is cuda but no CUDA GPU is available; set device = \"cpu\"")
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
    topo = make_topology(t.topology, t.workers, shuffle=t.shuffle_topology, seed=t.seed)
    engine = Engine(model, topo, comm=comm, algorithm=t.algorithm, lr=_schedule(t),
                    optimizer=SGD(t.momentum, t.nesterov, t.weight_decay),
                    gossip_every=t.gossip_every, buffers=t.buffers, strategy=t.strategy,
                    compile=t.compile, chunk_size=t.chunk_size or None,
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


class Run:
    """The files of one run directory."""

    def __init__(self, out: Path, rank: int = 0, world: int = 1):
        self.out, self.rank = Path(out), rank
        self.ckpt = self.out / "checkpoints" / ("last.pt" if world == 1 else f"rank{rank}.pt")
        self.prev = self.ckpt.with_suffix(".prev.pt")  # the checkpoint before, kept for resume
        self.metrics = self.out / "metrics.jsonl"

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def save(self, state: dict) -> None:
        """Write the checkpoint atomically, keeping the previous one as ``*.prev.pt``."""
        tmp = self.ckpt.with_name(f".{self.ckpt.name}.tmp{os.getpid()}")
        atomic_save(state, tmp)
        if self.ckpt.is_file():
            os.replace(self.ckpt, self.prev)
        os.replace(tmp, self.ckpt)

    def _load(self, path: Path) -> dict:
        return torch.load(path, weights_only=True, map_location="cpu")

    def start(self, cfg: C.Config, resume: bool, comm=None) -> dict | None:
        """Prepare the directory; return the checkpoint to resume from (or None).

        Under torchrun every rank resumes from the same step: a crash between two ranks'
        saves leaves some ranks one checkpoint ahead, and those take their previous one."""
        if resume:
            latest = self.ckpt if self.ckpt.is_file() else self.prev
            if not latest.is_file():
                raise UserError(f"nothing to resume in {self.out}: no {self.ckpt.name} checkpoint")
            saved = json.loads((self.out / "config.json").read_text())
            if saved != C.to_dict(cfg):
                raise UserError(f"the config differs from the one {self.out} was started with; "
                                "resume with the same config and --set overrides")
            state = self._load(latest)
            step = state["engine"]["step"]
            common = comm.agree_min(step) if comm is not None else step
            if common != step and self.prev.is_file() and latest != self.prev:
                state = self._load(self.prev)
            if state["engine"]["step"] != common:
                raise UserError(f"the checkpoints in {self.out / 'checkpoints'} are from "
                                f"different steps (this rank: {step}, another: {common}); "
                                "restart the run")
            return state
        if self.metrics.exists() and self.metrics.stat().st_size:
            raise UserError(f"{self.out} already holds a run; pass --resume to continue it or "
                            "choose another --out")
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.toml").write_text(C.dumps_toml(cfg))
            (self.out / "config.json").write_text(json.dumps(C.to_dict(cfg), indent=1))
            (self.out / "version.json").write_text(json.dumps(code_version(), indent=1))
            self.metrics.write_text("")
        return None

    def truncate_metrics(self, step: int) -> list[dict]:
        """Keep the rows up to the checkpoint's step (later ones are recomputed on resume)."""
        if not self.metrics.exists():
            return []
        rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if line]
        rows = [r for r in rows if r["step"] <= step]
        if self.writer:
            self.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def log(self, row: dict) -> None:
        if self.writer:
            with self.metrics.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def summarize(self, rows: list[dict], status: str, wall: float, steps: int,
                  message: str = "") -> dict:
        summary = {"final": rows[-1] if rows else {}, "status": status, "steps": steps,
                   "wall_time": wall, "message": message,
                   "best_test_acc": max((r["test_acc"] for r in rows), default=None)}
        if self.writer:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train(cfg: C.Config, out: str | Path, *, resume: bool = False, comm=None) -> dict:
    """Train ``cfg`` into the run directory ``out``; returns the summary.

    Evaluates the averaged model every ``log.eval_every`` steps, checkpoints every
    ``log.checkpoint_every`` steps and at the end. A NaN/inf loss stops the run with
    ``TrainingDiverged`` and leaves the last good checkpoint in place.
    """
    rank = 0 if comm is None else getattr(comm, "rank", 0)
    world = 1 if comm is None else getattr(comm, "world_size", 1)
    run = Run(Path(out), rank, world)
    state = run.start(cfg, resume, comm)
    setup = build(cfg, comm)
    engine, loader, ds, t, log = setup.engine, setup.loader, setup.dataset, cfg.train, cfg.log
    hosted = list(engine.comm.workers)
    acc = {"loss": 0.0, "acc": 0.0, "n": 0, "elapsed": 0.0}  # running train averages
    rows: list[dict] = []
    if state is not None:
        engine.load_state_dict(state["engine"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["torch_rng"])
        acc = dict(state["running"])
        rows = run.truncate_metrics(engine.step_count)

    def checkpoint() -> None:
        run.save({"engine": engine.state_dict(), "loader": loader.state_dict(),
                  "torch_rng": torch.get_rng_state(), "running": acc})

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
        while engine.step_count < t.steps:
            x, y = loader.next_batch()
            sent = engine.comm.bytes_sent
            result = engine.step(x[hosted], y[hosted])
            acc["bytes"] = acc.get("bytes", 0) + engine.comm.bytes_sent - sent
            acc["loss"] += result.loss.mean().item()
            acc["acc"] += result.accuracy.mean().item()
            acc["n"] += 1
            step = engine.step_count
            if step % log.eval_every == 0 or step == t.steps:
                # every process holds an equal block of workers: the mean of the blocks' means
                # is the mean over all m workers
                local = torch.tensor([[acc["loss"], acc["acc"]]], dtype=torch.float64)
                train_loss, train_acc = (engine.comm.mean(local.to(engine.w.device).expand(
                    len(hosted), 2).contiguous())[0] / acc["n"]).tolist()
                row = {"step": step, "epoch": step / loader.steps_per_epoch, "lr": result.lr,
                       "train_loss": train_loss, "train_acc": train_acc,
                       **evaluate(engine, ds.x_test, ds.y_test, log.eval_batch_size),
                       "consensus": engine.consensus_distance(),
                       # gossip/all-reduce payload per worker per step (see Communicator)
                       "bytes_per_worker_step": acc.get("bytes", 0) / acc["n"] / len(hosted)}
                if log.instruments:
                    row.update(measure(engine, ds, log))
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
                acc["elapsed"] = time.perf_counter() - started
                checkpoint()
            if bar is not None:
                bar.update(1)
    except TrainingDiverged as err:
        status, message = "diverged", str(err)
        raise
    except KeyboardInterrupt:
        status, message = "interrupted", f"interrupted at step {engine.step_count}"
        raise
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            tb.close()
        run.summarize(rows, status, time.perf_counter() - started, engine.step_count, message)
    return run.summarize(rows, status, time.perf_counter() - started, engine.step_count)


def ensure_run(cfg: C.Config, run_dir: str | Path) -> dict:
    """Train ``cfg`` into ``run_dir`` unless it finished (or diverged) before; resume when a
    checkpoint exists; start afresh when a run died before its first checkpoint. Returns the
    summary. For pipelines (quickstart, reproduce) that are rerun until everything is done."""
    run_dir = Path(run_dir)
    summary = run_dir / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if s.get("status") in ("finished", "diverged"):
            return s
    resume = any((run_dir / "checkpoints").glob("*.pt"))
    if not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # nothing resumable was written
    try:
        return train(cfg, run_dir, resume=resume)
    except TrainingDiverged:
        return json.loads(summary.read_text())
