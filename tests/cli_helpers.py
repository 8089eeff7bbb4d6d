"""Command-line helpers the CLI and CUDA tests share: a tiny synthetic run and torchrun launches."""

import shutil
import subprocess
import sys
from pathlib import Path

TINY = ["data.name=synthetic", "data.n_train=512", "data.n_test=128", "model.name=mlp",
        "model.options={hidden=[16]}", "train.workers=4", "train.batch_size=8",
        "train.steps=30", "train.lr=0.1", "log.eval_every=5", "log.checkpoint_every=5",
        "log.progress=false", "log.eval_batch_size=64"]


def sets(*overrides):
    """``--set`` arguments for TINY, then ``overrides`` (a later key wins)."""
    return [arg for o in (*TINY, *overrides) for arg in ("--set", o)]


def dsgd_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "dsgd", *args], capture_output=True, text=True,
                          timeout=timeout)


def torchrun_launch(nproc: int, args: list, out: Path, timeout_s: int) -> list[str]:
    """The command that runs ``dsgd <args> <out>`` under torchrun, distributed engine."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return [torchrun, "--standalone", f"--nproc-per-node={nproc}", "-m", "dsgd", *args, str(out),
            "--engine", "distributed", "--timeout", str(timeout_s)]
