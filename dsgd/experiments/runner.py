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

import errno
import fcntl
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import dsgd
from dsgd.data import WorkerLoader, batches, crop_flip, dirichlet, iid, load_dataset
from dsgd.engine import Engine
from dsgd.errors import RunInterrupted, TrainingDiverged, UserError
from dsgd.experiments import config as C
from dsgd.experiments.instruments import measure
from dsgd.models import build_model
from dsgd.optim import SGD
from dsgd.optim.schedule import constant, cosine, warmup_multistep
from dsgd.report.runs import is_finished, read_metrics, read_summary
from dsgd.topology import make_topology


def code_version() -> dict[str, str]:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(dsgd.__file__).parent,
                             capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return {"dsgd": dsgd.__version__, "git": sha or "unknown", "torch": torch.__version__}


def _replace_via_temp(path: Path, write) -> None:
    """``write(tmp)`` to a temp file beside ``path``, then rename it over ``path``: a reader
    sees the old file or the new one, never a torn or empty one. The temp file is removed
    when writing fails (a full disk leaves no partial files behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _torch_save(obj, path: Path) -> None:
    """torch.save, with a full disk reported as the OSError it is: torch's writer turns it into
    a RuntimeError ("unexpected pos ..."), so a failed write with the disk (nearly) full is
    taken for ENOSPC."""
    try:
        torch.save(obj, path)
    except RuntimeError:
        try:
            st = os.statvfs(path.parent)
            full = st.f_bavail * st.f_frsize < 1 << 20
        except OSError:
            full = False
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temp file in the same directory, then rename: never a torn checkpoint."""
    _replace_via_temp(Path(path), lambda tmp: _torch_save(obj, tmp))


def atomic_write(path: Path, text: str) -> None:
    """Path.write_text, atomically (see ``_replace_via_temp``)."""
    _replace_via_temp(Path(path), lambda tmp: tmp.write_text(text))


def os_error_message(err: OSError) -> str:
    """One line for a failed file operation: what failed, where, and what to do."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = f" holding {Path(err.filename).parent}" if err.filename else ""
        return (f"no space left on the device{folder}; the last checkpoint is intact: free some "
                "space and rerun with --resume")
    return f"{err.strerror or err}{where}; check the path and its permissions"


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
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device is {device} but this machine has {torch.cuda.device_count()} "
                        "GPU(s); choose device = \"cuda:N\" with N below that")
    if t.compile and device.type == "cpu" and not (shutil.which(os.environ.get("CXX", "g++"))
                                                   or shutil.which("clang++")):
        raise UserError("train.compile on CPU needs a C++ compiler (g++ or clang++, or $CXX); "
                        "install one or set train.compile = false")
    ds = load_dataset(d.name, d.dir, n_train=d.n_train, n_test=d.n_test, image_size=d.image_size)
    if d.partition == "iid":
        parts = iid(len(ds.y_train), t.workers, seed=t.seed)
    else:
        parts = dirichlet(ds.y_train, t.workers, alpha=d.alpha, seed=t.seed)
    loader = WorkerLoader(ds.x_train, ds.y_train, parts, t.batch_size, seed=t.seed,
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


def _notice(text: str) -> None:
    """A one-line notice on stderr for something the run did on its own (a fallback)."""
    print(f"dsgd: {text}", file=sys.stderr, flush=True)


class Run:
    """The files of one run directory."""

    def __init__(self, out: Path, rank: int = 0, world: int = 1):
        self.out, self.rank = Path(out), rank
        self.ckpt = self.out / "checkpoints" / ("last.pt" if world == 1 else f"rank{rank}.pt")
        self.prev = self.ckpt.with_suffix(".prev.pt")  # the checkpoint before, kept for resume
        self.metrics = self.out / "metrics.jsonl"
        self._lock: int | None = None

    @property
    def writer(self) -> bool:
        return self.rank == 0

    # ---- one process per run directory (per rank under torchrun) -----------------------------
    def lock(self) -> None:
        """Hold an advisory lock on the directory for the run's life: a second process on the
        same --out would interleave its rows and checkpoints with this one's. The lock goes with
        the process (also when it is killed), so a crash never leaves a stale lock."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / (".lock" if self.rank == 0 else f".lock.rank{self.rank}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.out} is in use by another dsgd process (pid {holder}); "
                            "wait for it to end or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, state: dict) -> None:
        """Write the checkpoint atomically, keeping the previous one as ``*.prev.pt``."""
        tmp = self.ckpt.with_name(f".{self.ckpt.name}.tmp{os.getpid()}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            _torch_save(state, tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no partial file behind
            raise
        if self.ckpt.is_file():
            os.replace(self.ckpt, self.prev)
        os.replace(tmp, self.ckpt)

    def _load(self, path: Path) -> dict:
        """A checkpoint with the keys a resume needs, or UserError saying it is unusable.

        ``weights_only`` refuses anything but tensors and plain containers, so a crafted file
        cannot run code; a truncated, empty or foreign file fails here too."""
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols it reads
                warnings.simplefilter("ignore")
                state = torch.load(path, weights_only=True, map_location="cpu")
            step = state["engine"]["step"]
            if not isinstance(step, int) or not all(k in state for k in
                                                    ("loader", "torch_rng", "running")):
                raise KeyError("engine step, loader, torch_rng or running")
        except Exception as e:  # noqa: BLE001 -- whatever is wrong with the file, it is unusable
            why = ("empty" if path.stat().st_size == 0 else
                   "corrupt, or it holds objects other than tensors and plain containers"
                   if isinstance(e, pickle.UnpicklingError) else
                   "not a dsgd checkpoint" if isinstance(e, (KeyError, TypeError, IndexError))
                   else f"truncated or corrupt: {type(e).__name__}")
            raise UserError(f"checkpoint {path} is unreadable ({why})") from None
        return state

    def _latest(self) -> tuple[dict | None, Path | None]:
        """The newest readable checkpoint of this rank. A corrupt ``last.pt`` is set aside as
        ``last.corrupt.pt`` (kept for inspection) and the previous one is used."""
        if not self.ckpt.is_file():
            return (self._load(self.prev), self.prev) if self.prev.is_file() else (None, None)
        try:
            return self._load(self.ckpt), self.ckpt
        except UserError as err:
            if not self.prev.is_file():
                raise
            try:
                state = self._load(self.prev)
            except UserError as err_prev:
                raise UserError(f"no readable checkpoint in {self.ckpt.parent}: {err} and "
                                f"{err_prev}; start the run again in another --out") from None
            corrupt = self.ckpt.with_name(self.ckpt.name.replace(".pt", ".corrupt.pt"))
            os.replace(self.ckpt, corrupt)
            _notice(f"{err}; resuming from the previous checkpoint {self.prev.name} (step "
                    f"{state['engine']['step']}), the unreadable one kept as {corrupt.name}")
            return state, self.prev

    def has_checkpoint(self) -> bool:
        """Any rank's checkpoint: a run of another job shape is still a run to keep."""
        return any(self.ckpt.parent.glob("*.pt"))

    def _saved_config(self) -> dict:
        path = self.out / "config.json"
        try:
            saved = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"nothing to resume in {self.out}: no run was started there "
                            f"(no config.json, no {self.ckpt.name} checkpoint)") from None
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({type(e).__name__}); the run cannot be "
                            "resumed: start it again in another --out") from None
        if not isinstance(saved, dict):
            raise UserError(f"{path} does not hold a config; start the run in another --out")
        return saved

    def _check_resumable(self, saved: dict, cfg: C.Config, step: int) -> None:
        diff = C.differences(saved, cfg, allowed=C.RESUMABLE_KEYS)
        if diff:
            shown = "; ".join(f"{k} = {a!r} there, {b!r} now" for k, a, b in diff[:4])
            more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
            raise UserError(f"the config differs from the one {self.out} was started with: "
                            f"{shown}{more}; resume without --config to use the saved one "
                            "(--set may change train.steps and the log settings)")
        old_steps = C.computation(saved).get("train.steps")
        if cfg.train.steps < step:
            raise UserError(f"train.steps = {cfg.train.steps} is below the checkpoint's step "
                            f"{step}; a run cannot be shortened, only extended")
        if cfg.train.steps != old_steps and cfg.train.schedule == "cosine":
            raise UserError("a cosine schedule depends on train.steps, so changing it on resume "
                            "would change the steps already taken; start a new run instead")

    def start(self, cfg: C.Config, resume: bool, comm=None) -> dict | None:
        """Prepare the directory; return the checkpoint to resume from (or None: step 0).

        Under torchrun every rank resumes from the same step: a crash between two ranks'
        saves leaves some ranks one checkpoint ahead, and those take their previous one. A run
        stopped before its first checkpoint resumes from step 0 (its rows are dropped), and may
        equally be started afresh."""
        if resume:
            saved = self._saved_config()
            state, used = self._latest()
            step = state["engine"]["step"] if state is not None else -1  # -1: no checkpoint
            common = comm.agree_min(step) if comm is not None else step
            if common != step and used == self.ckpt and self.prev.is_file():
                state = self._load(self.prev)
            elif common == -1:
                state = None
            if (state["engine"]["step"] if state is not None else -1) != common:
                raise UserError(f"the checkpoints in {self.out / 'checkpoints'} are from "
                                f"different steps (this rank: {step}, another: {common}); "
                                "restart the run")
            self._check_resumable(saved, cfg, max(common, 0))
            if state is None:
                _notice(f"no checkpoint in {self.out} yet: resuming from step 0")
            if self.writer:
                self._write_config(cfg)  # the settings the run continues with
            return state
        if self.has_checkpoint():
            raise UserError(f"{self.out} already holds a run; pass --resume to continue it or "
                            "choose another --out")
        if self.writer:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_config(cfg)
            atomic_write(self.out / "version.json", json.dumps(code_version(), indent=1))
            atomic_write(self.metrics, "")
            (self.out / "summary.json").unlink(missing_ok=True)  # of a run with no checkpoint
        return None

    def _write_config(self, cfg: C.Config) -> None:
        atomic_write(self.out / "config.toml", C.dumps_toml(cfg))
        atomic_write(self.out / "config.json", json.dumps(C.to_dict(cfg), indent=1))

    # ---- metrics and summary -------------------------------------------------------------------
    def truncate_metrics(self, step: int) -> list[dict]:
        """Keep the rows up to the checkpoint's step (later ones are recomputed on resume); a
        torn last row is dropped."""
        if not self.metrics.exists():
            return []
        rows = [r for r in read_metrics(self.metrics) if r.get("step", 0) <= step]
        if self.writer:
            atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def log(self, row: dict) -> None:
        """Append one row; a failed write (a full disk) is cut back so no torn row stays."""
        if not self.writer:
            return
        with self.metrics.open("a") as f:
            size = f.tell()
            try:
                f.write(json.dumps(row) + "\n")
                f.flush()
            except OSError:
                f.truncate(size)
                raise

    def summarize(self, rows: list[dict], status: str, wall: float, steps: int,
                  message: str = "") -> dict:
        summary = {"final": rows[-1] if rows else {}, "status": status, "steps": steps,
                   "wall_time": wall, "message": message,
                   "best_test_acc": max((r["test_acc"] for r in rows), default=None)}
        if self.writer:
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=1))
        return summary


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
    run = Run(Path(out), rank, world)
    run.lock()
    try:
        return _train(cfg, run, resume, comm)
    finally:
        run.unlock()


def _train(cfg: C.Config, run: Run, resume: bool, comm) -> dict:
    state = run.start(cfg, resume, comm)
    setup = build(cfg, comm)
    engine, loader, ds, t, log = setup.engine, setup.loader, setup.dataset, cfg.train, cfg.log
    hosted = list(engine.comm.workers)
    acc = {"loss": 0.0, "acc": 0.0, "n": 0, "elapsed": 0.0}  # running train averages
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
        saved_step = engine.step_count
    rows = run.truncate_metrics(engine.step_count)

    def checkpoint() -> None:
        nonlocal saved_step
        acc["elapsed"] = time.perf_counter() - started
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
                sent = engine.comm.bytes_sent
                result = engine.step(x[hosted], y[hosted])
                acc["bytes"] = acc.get("bytes", 0) + engine.comm.bytes_sent - sent
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
                                    engine.step_count, message)
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
           # gossip/all-reduce payload per worker per step (see Communicator)
           "bytes_per_worker_step": acc.get("bytes", 0) / acc["n"] / len(hosted)}
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
