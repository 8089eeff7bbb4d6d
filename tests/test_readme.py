"""The README's examples run as printed: every Python block of "Your data", "Your model" and
"The public API", the command-line run of your own module, and the torchrun training loop."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def blocks(title: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section(title), flags=re.S)


def env(extra_path: Path | None = None) -> dict:
    path = [str(extra_path)] if extra_path else []
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(ROOT)]),
            "OMP_NUM_THREADS": "1"}


def run_python(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_your_data(tmp_path):
    (code,) = blocks("Your data", "python")
    check = ("assert xb.shape == (8, 32, 20) and yb.shape == (8, 32)\n"
             "again = [next(loader) for _ in range(3)]\n"
             "loader.load_state_dict(state)\n"
             "assert all(torch.equal(a[0], next(loader)[0]) for a in again)\n")
    run_python(code + "\n" + check, tmp_path)


def test_your_model_in_python(tmp_path):
    code = blocks("Your model", "python")[0]
    out = run_python(code + "\nassert out.loss.mean().item() < 0.6, out.loss\n", tmp_path)
    loss, distance = map(float, out.split())
    assert loss < 0.6 and distance > 0  # learnt, and the workers are not (yet) equal


def test_your_model_from_the_command_line(tmp_path):
    module, = [b for b in blocks("Your model", "python") if b.startswith("# mymodels.py")]
    (tmp_path / "mymodels.py").write_text(module)
    (command,) = blocks("Your model", "bash")
    args = shlex.split(command.replace("\\\n", " "))
    assert args[:2] == ["PYTHONPATH=.", "dsgd"]
    done = subprocess.run([sys.executable, "-m", "dsgd", *args[2:]], cwd=tmp_path,
                          env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "100 steps" in done.stdout and (tmp_path / "runs/mine/summary.json").is_file()
    acc = float(re.search(r"test accuracy ([\d.]+)%", done.stdout).group(1))
    assert acc > 50  # 4 classes: far above chance


def test_the_public_api(tmp_path):
    (code,) = blocks("The public API", "python")
    out = run_python(code, tmp_path)
    status, acc = out.split()
    assert status == "finished" and 0 <= float(acc) <= 1
    assert (tmp_path / "runs/api-demo/metrics.jsonl").read_text().count("\n") >= 1


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_your_training_loop_under_torchrun(tmp_path):
    (script,) = blocks("Your training loop", "python")
    first = script.splitlines()[0]
    assert "torchrun --nproc-per-node=4 train_gossip.py" in first
    (tmp_path / "train_gossip.py").write_text(script)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "train_gossip.py"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # unbuffered ranks can interleave their writes on one line: match the number exactly
    lines = re.findall(r"rank (\d): loss ([\d.]+), consensus distance ([\d.]+e[+-]\d+)",
                       done.stdout)
    assert sorted(r for r, _, _ in lines) == ["0", "1"]
    assert all(float(loss) < 1.0 for _, loss, _ in lines)
    assert len({d for _, _, d in lines}) == 1  # one value, agreed by every rank
