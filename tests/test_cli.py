"""The command line: one-line errors with exit status 2, and real runs that resume after SIGKILL."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import dsgd_cli, sets, torchrun_launch

from dsgd.errors import UserError
from dsgd.experiments import config as C
from dsgd.experiments.cli import main


@pytest.mark.parametrize("args,fragment", [
    (["--set", "train.lrr=0.1"], "unknown key train.lrr"),
    (["--set", "train.lr=-0.1"], "train.lr must be > 0"),
    (["--set", "train.batch_size=0"], "train.batch_size must be a positive integer"),
    (["--set", "train.topology=hexagon"], "unknown topology 'hexagon'"),
    (["--set", "model.name=transformer9"], "unknown model 'transformer9'"),
    (["--set", "data.name=cifar10", "--set", "data.dir=/nonexistent/cifar"],
     "/nonexistent/cifar does not exist"),
    (["--config", "/nonexistent/x.toml"], "config file /nonexistent/x.toml not found"),
])
def test_user_errors_are_one_line_exit_2(args, fragment, tmp_path, capsys):
    code = main(["train", *sets(), *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert fragment in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_malformed_toml_in_a_real_process(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 0.1\n")
    proc = dsgd_cli("train", "--config", str(bad), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert "is not valid TOML" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1


def test_config_round_trips_through_toml():
    cfg = C.load("quickstart", ["train.milestones=[5, 9]", "model.options={hidden=[8, 4]}"])
    import tomllib
    assert C.from_dict(tomllib.loads(C.dumps_toml(cfg))) == cfg


def test_run_writes_metrics_summary_and_resolved_config(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *sets("log.tensorboard=true"), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]["test_acc"] > 0.3  # 10 separable clusters, chance is 0.1
    assert all(r["consensus"] > 0 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 30
    saved = C.load(str(out / "config.toml"))
    assert saved.train.workers == 4 and saved.model.options == {"hidden": [16]}
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["engine"]["step"] == 30
    # a finished run is not overwritten by accident
    assert main(["train", *sets(), "--out", str(out)]) == 2


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # a given compute time makes the simulated clock deterministic: it resumes exactly too
    slow = ("train.steps=1500", "log.eval_every=50", "log.checkpoint_every=50",
            "network.compute_ms=2.5")
    assert main(["train", *sets(*slow), "--out", str(straight)]) == 0
    cmd = [sys.executable, "-m", "dsgd", "train", *sets(*slow), "--out", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 90
    while time.time() < deadline:  # wait until at least two checkpoints exist, then kill
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert 3 <= done < 30, "the run must be killed mid-way"
    assert main(["train", *sets(*slow), "--out", str(killed), "--resume"]) == 0
    a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in metrics.read_text().splitlines()]
    strip = [{k: v for k, v in r.items() if k != "time"} for r in a]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in b]
    wa = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["engine"]["w"]
    wb = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["engine"]["w"]
    assert torch.equal(wa, wb)


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", *sets("train.lr=1e30", "log.checkpoint_every=1"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "lower the learning rate" in err and err.count("\n") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged"
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert torch.isfinite(ckpt["engine"]["w"]).all()
    assert ckpt["engine"]["step"] == summary["steps"]


def test_topology_command(capsys, tmp_path):
    assert main(["topology", "ring", "-m", "16", "--draw", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "|lambda_2| = 0.949" in out and "spectral gap = 0.051" in out
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["topology", "hexagon"]) == 2


def test_resume_without_checkpoint_is_a_user_error(tmp_path, capsys):
    assert main(["train", *sets(), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_presets_are_valid():
    presets = sorted(Path(C.PRESETS).glob("*.toml"))
    assert presets
    for p in presets:
        C.load(p)


def test_torchrun_train_matches_the_simulated_run(tmp_path):
    """The same config under torchrun (2 processes, 2 workers each) and in one process."""
    sim, dist = tmp_path / "sim", tmp_path / "dist"
    args = ["train", *sets("train.topology=exponential", "train.momentum=0.9"), "--out"]
    assert main([*args, str(sim)]) == 0
    proc = subprocess.run(torchrun_launch(2, args, dist, 30), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = [json.loads(x) for x in (sim / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (dist / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "consensus"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    w = torch.load(sim / "checkpoints" / "last.pt", weights_only=True)["engine"]["w"]
    blocks = [torch.load(dist / "checkpoints" / f"rank{r}.pt", weights_only=True)["engine"]["w"]
              for r in range(2)]
    torch.testing.assert_close(torch.cat(blocks), w, atol=1e-5, rtol=0)


def test_instruments_are_logged_at_eval_time(tmp_path):
    out = tmp_path / "run"
    instruments = 'log.instruments=["hessian", "equivalence", "uncertainty"]'
    assert main(["train", *sets(instruments, "train.steps=10", "log.instrument_samples=64"),
                 "--out", str(out)]) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    keys = ["hessian_trace", "top_eigenvalue", "xi_trace", "residual_sgd", "residual_adsam",
            "residual_2nd", "averaged_ece", "ensemble_nll", "posterior_accuracy"]
    assert all(k in row and math.isfinite(row[k]) for k in keys), row
    assert row["xi_trace"] != 0 and row["residual_sgd"] > 0
    assert row["averaged_accuracy"] == pytest.approx(row["test_acc"])  # same averaged model


def test_quickstart_trains_both_and_reports_then_reruns_without_training(tmp_path, capsys):
    args = ["quickstart", "--out", str(tmp_path / "qs"), *sets("train.steps=10")]
    assert main(args) == 0
    report = tmp_path / "qs" / "report" / "REPORT.md"
    text = report.read_text()
    assert "D-SGD ring m=4" in text and "C-SGD m=4" in text
    before = (tmp_path / "qs" / "dsgd" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main(args) == 0  # finished runs are reused, not retrained
    assert (tmp_path / "qs" / "dsgd" / "metrics.jsonl").read_text() == before
    assert capsys.readouterr().out.count("finished: test accuracy") == 2


def test_torchrun_crash_then_resume_matches_the_simulated_run(tmp_path):
    """Kill a whole torchrun job mid-run; --resume from the per-rank checkpoints finishes with
    the weights of an uninterrupted single-process run."""
    sim, dist = tmp_path / "sim", tmp_path / "dist"
    slow = ("train.steps=600", "log.eval_every=20", "log.checkpoint_every=20")
    args = ["train", *sets(*slow), "--out"]
    assert main([*args, str(sim)]) == 0
    launch = torchrun_launch(2, args, dist, 30)
    proc = subprocess.Popen(launch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    metrics = dist / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    # torchrun starts each worker in a session of its own: kill the workers with the launcher
    workers = _children(proc.pid)
    assert len(workers) == 2, workers
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in workers):
        time.sleep(0.01)  # until the kernel has ended them (their run-directory locks go too)
    assert len(metrics.read_text().splitlines()) < 30, "the job must be killed mid-way"
    done = subprocess.run([*launch, "--resume"], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    w = torch.load(sim / "checkpoints" / "last.pt", weights_only=True)["engine"]["w"]
    blocks = [torch.load(dist / "checkpoints" / f"rank{r}.pt", weights_only=True)["engine"]["w"]
              for r in range(2)]
    torch.testing.assert_close(torch.cat(blocks), w, atol=1e-5, rtol=0)


def _state(pid: int) -> str:
    """The process state letter from /proc/<pid>/stat ("Z": a zombie), "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def test_resume_takes_the_step_every_rank_holds(tmp_path):
    """A crash between two ranks' saves: the rank ahead resumes from its previous checkpoint."""
    from dsgd.experiments.rundir import RunDir

    out = tmp_path / "run"
    assert main(["train", *sets("train.steps=10"), "--out", str(out)]) == 0
    cfg = C.load(str(out / "config.toml"))

    class Behind:  # another rank only reached step 5
        def __init__(self, step):
            self.step = step

        def agree_min(self, value):
            return min(value, self.step)

    assert RunDir(out).start(cfg, resume=True, comm=Behind(10))["engine"]["step"] == 10
    assert RunDir(out).start(cfg, resume=True, comm=Behind(5))["engine"]["step"] == 5
    with pytest.raises(UserError, match="different steps"):
        RunDir(out).start(cfg, resume=True, comm=Behind(0))


def test_compile_without_a_cpp_compiler_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import dsgd.experiments.runner as runner
    monkeypatch.setattr(runner.shutil, "which", lambda name: None)
    code = main(["train", *sets("train.compile=true"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "train.compile on CPU needs a C++ compiler" in err
    assert err.count("\n") == 1 and "Traceback" not in err
