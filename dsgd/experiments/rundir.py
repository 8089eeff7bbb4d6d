"""The files of one run directory, written so that a crash, a full disk or a second process
never leaves them wrong: the layout is in ``dsgd.experiments.runner``.

Every file is replaced atomically (temp file + rename, the temp file removed when writing
fails); checkpoints keep the previous one; an advisory lock admits one process per run
directory (per rank under torchrun).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

import dsgd
from dsgd.errors import UserError
from dsgd.experiments import config as C
from dsgd.report.runs import read_metrics


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


def _notice(text: str) -> None:
    """A one-line notice on stderr for something the run did on its own (a fallback)."""
    print(f"dsgd: {text}", file=sys.stderr, flush=True)


class RunDir:
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
                  message: str = "", **extra: Any) -> dict:
        """The summary (``extra``: more keys, e.g. the gradient backend and why)."""
        summary = {"final": rows[-1] if rows else {}, "status": status, "steps": steps,
                   "wall_time": wall, "message": message,
                   "best_test_acc": max((r["test_acc"] for r in rows), default=None), **extra}
        if self.writer:
            atomic_write(self.out / "summary.json", json.dumps(summary, indent=1))
        return summary
