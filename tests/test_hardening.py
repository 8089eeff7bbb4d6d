"""Inputs chosen by an attacker or an unlucky user: no code runs from a data file, nothing is
written outside the run directory, every user error is one line with exit status 2, a run's
recorded status is true, and a valid checkpoint stays valid and resumes bit-identically."""

import errno
import gzip
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import sets, torchrun_launch

from dsgd.data.dataset import channel_stats
from dsgd.data.readers import read_cifar10, read_idx
from dsgd.engine import Engine
from dsgd.errors import TrainingDiverged, UserError
from dsgd.experiments import config as C
from dsgd.experiments import runner as R
from dsgd.experiments.cli import main
from dsgd.experiments.rundir import RunDir
from dsgd.report.runs import is_finished, load_run
from dsgd.topology import TopologyError, from_adjacency, make_topology

SHORT = ("train.steps=10",)


def one_line_error(capsys, code: int, fragment: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def rows(path):  # wall-clock keys left out: time, and sim_time_s from the measured compute time
    return [{k: v for k, v in json.loads(x).items() if k not in ("time", "sim_time_s")}
            for x in (path / "metrics.jsonl").read_text().splitlines()]


def weights(path, name="last.pt"):
    return torch.load(path / "checkpoints" / name, weights_only=True)["engine"]["w"]


def fail_at(monkeypatch, step: int, error):
    """Make Engine.step call ``error()`` when it is about to take step ``step + 1``."""
    real = Engine.step

    def step_fn(self, x, y):
        if self.step_count == step:
            error()
        return real(self, x, y)

    monkeypatch.setattr(Engine, "step", step_fn)


# ---------------------------------------------------------------- 1. malicious CIFAR pickles
class _System:  # the classic payload: unpickling calls os.system
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _ValidBatch:  # runs code, then hands back a real batch so that training would go on
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        code = (f"open({str(self.marker)!r}, 'w').close() or "
                "{b'data': __import__('numpy').zeros((2, 3072), 'uint8'), b'labels': [0, 1]}")
        return eval, (code,)


def _cifar(folder, first):
    folder.mkdir(exist_ok=True)
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump(first if name == "data_batch_1" else good, f)


@pytest.mark.parametrize("payload", [
    lambda m: {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"x": _System(m)},
    lambda m: _ValidBatch(m),
])
def test_a_malicious_cifar_pickle_runs_nothing_and_is_one_line(payload, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    _cifar(tmp_path / "cifar", payload(marker))
    with pytest.raises(UserError, match="data_batch_1 is not a CIFAR python-version pickle"):
        read_cifar10(str(tmp_path / "cifar"))
    code = main(["train", *sets("data.name=cifar10", f'data.dir="{tmp_path / "cifar"}"',
                                "model.name=lenet5"), "--out", str(tmp_path / "run")])
    one_line_error(capsys, code, "refused to load")
    assert not marker.exists()


def _py2(b: bytes) -> bytes:  # a Python 2 str: SHORT_BINSTRING or BINSTRING
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b


def python2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """The opcodes Python 2's cPickle (protocol 2) wrote for the CIFAR-10 python version."""
    out = b"\x80\x02}q\x00(" + _py2(b"batch_label") + _py2(b"training batch 1 of 5")
    out += _py2(b"labels") + b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    out += _py2(b"data") + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
    out += b"K\x00\x85" + _py2(b"b") + b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
    out += b"(K\x01M" + struct.pack("<H", len(data)) + b"M"
    out += struct.pack("<H", 3072) + b"\x86cnumpy\ndtype\n" + _py2(b"u1") + b"K\x00K\x01\x87R"
    out += b"(K\x03" + _py2(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    return out + b"\x89" + _py2(data.tobytes()) + b"tbu."  # __setstate__, SETITEMS, STOP


@pytest.mark.parametrize("protocol", ["python2", 2, 4, 5])
def test_real_cifar_pickles_of_every_protocol_still_load(protocol, tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar"
    folder.mkdir()
    data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 1], b"data": data,
             b"filenames": [b"a.png", b"b.png"]}
    raw = (python2_cifar_pickle(data, [3, 1]) if protocol == "python2"
           else pickle.dumps(batch, protocol=protocol))
    assert pickle.loads(raw, encoding="bytes")[b"labels"] == [3, 1]  # what pickle.load reads
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(raw)
    ds = read_cifar10(str(folder))
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.y_train.tolist() == [3, 1] * 5
    images = data.reshape(2, 3, 32, 32)
    mean, std = channel_stats(images)  # the five batches repeat these two images
    expected = (images / 255.0 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(ds.x_train[:2], torch.tensor(expected, dtype=torch.float32))


# ---------------------------------------------------------------- 2. run names
@pytest.mark.parametrize("name", ["../../../tmp/x", "a/b", ".hidden", "..", "", "a\nb",
                                  "# heading", "x" * 200])
def test_a_run_name_cannot_leave_the_runs_folder_or_break_files(name, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["train", *sets(f"name={json.dumps(name)}")])  # a TOML string (\n: newline)
    one_line_error(capsys, code, "name must be")
    assert list(tmp_path.iterdir()) == []  # nothing written, inside or outside runs/


def test_a_report_shows_a_foreign_run_name_only_in_a_safe_spelling(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "test_acc": 0.5}\n')
    (run / "config.json").write_text(json.dumps({"name": "x\n# injected | cell"}))
    assert load_run(run).name == "r"


# ---------------------------------------------------------------- 3. true status
def test_a_run_that_raises_is_failed_not_finished_and_pipelines_resume_it(tmp_path,
                                                                          monkeypatch):
    out = tmp_path / "run"

    def boom():
        raise RuntimeError("simulated fault\nsecond line")

    fail_at(monkeypatch, 7, boom)
    with pytest.raises(RuntimeError):
        main(["train", *sets(*SHORT), "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 7
    assert summary["message"] == "RuntimeError: simulated fault"
    assert not is_finished(out) and load_run(out).status == "failed"
    monkeypatch.undo()
    cfg = C.load(None, [a for a in sets(*SHORT) if a != "--set"])
    assert R.ensure_run(cfg, out)["status"] == "finished" and is_finished(out)
    assert [r["step"] for r in rows(out)] == [5, 10]


def test_finished_with_fewer_steps_than_configured_reads_as_incomplete(tmp_path):
    out = tmp_path / "run"
    assert main(["train", *sets(*SHORT), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "steps": 5}))
    assert not is_finished(out) and load_run(out).status == "incomplete"
    (out / "summary.json").write_text("")  # a zero-byte summary: unfinished, not a crash
    assert not is_finished(out) and load_run(out).status == "incomplete"
    cfg = C.load(None, [a for a in sets(*SHORT) if a != "--set"])
    assert R.ensure_run(cfg, out)["status"] == "finished"


# ---------------------------------------------------------------- 4-6. resume from damage
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *sets(*SHORT), "--out", str(out)]) == 0
    return out


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    (dst / "summary.json").unlink()
    return dst


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(damage, finished_run,
                                                                  tmp_path, capsys):
    out = _copy(finished_run, tmp_path / "run")
    last = out / "checkpoints" / "last.pt"
    data = last.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "empty": b"",
               "random": os.urandom(len(data))}[damage]
    last.write_bytes(damaged)
    assert main(["train", *sets(*SHORT), "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming from the previous checkpoint last.prev.pt (step 5)" in err
    assert err.count("\n") == 1
    assert (out / "checkpoints" / "last.corrupt.pt").read_bytes() == damaged  # kept as it was
    assert torch.equal(weights(out), weights(finished_run))
    assert rows(out) == rows(finished_run)


def test_unreadable_or_malicious_checkpoints_are_one_line(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path / "run")
    marker = tmp_path / "PWNED"
    (out / "checkpoints" / "last.pt").write_bytes(pickle.dumps({"engine": _System(marker)}))
    (out / "checkpoints" / "last.prev.pt").write_bytes(b"")
    code = main(["train", *sets(*SHORT), "--out", str(out), "--resume"])
    one_line_error(capsys, code, "no readable checkpoint")
    assert not marker.exists()


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(finished_run, tmp_path,
                                                                        capsys):
    out = _copy(finished_run, tmp_path / "run")
    import shutil
    shutil.rmtree(out / "checkpoints")  # rows written, no checkpoint yet
    assert main(["train", *sets(*SHORT), "--out", str(out), "--resume"]) == 0
    assert "resuming from step 0" in capsys.readouterr().err
    assert rows(out) == rows(finished_run)
    again = _copy(out, tmp_path / "again")
    shutil.rmtree(again / "checkpoints")
    assert main(["train", *sets(*SHORT), "--out", str(again)]) == 0  # or start afresh
    assert rows(again) == rows(finished_run)


def test_a_torn_last_metrics_row_does_not_block_resume(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 15, "train_lo')
    assert main(["train", *sets(*SHORT), "--out", str(out), "--resume"]) == 0
    assert rows(out) == rows(finished_run)


# ---------------------------------------------------------------- 7. SIGTERM and Ctrl-C
@pytest.mark.parametrize("sig,code,name", [(signal.SIGTERM, 143, "SIGTERM"),
                                           (signal.SIGINT, 130, "Ctrl-C")])
def test_a_signal_checkpoints_the_current_step_and_resumes_identically(
        sig, code, name, finished_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    fail_at(monkeypatch, 7, lambda: os.kill(os.getpid(), sig))  # arrives during step 8
    assert main(["train", *sets(*SHORT), "--out", str(out)]) == code
    err = capsys.readouterr().err
    assert f"stopped by {name} at step 8; a checkpoint of this step is saved" in err
    assert err.count("\n") == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 8
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["engine"]["step"] == 8
    monkeypatch.undo()
    assert main(["train", *sets(*SHORT), "--out", str(out), "--resume"]) == 0
    assert rows(out) == rows(finished_run)
    assert torch.equal(weights(out), weights(finished_run))


def test_an_interrupt_before_the_first_checkpoint_says_so(tmp_path, monkeypatch, capsys):
    def ctrl_c():
        raise KeyboardInterrupt

    fail_at(monkeypatch, 3, ctrl_c)
    assert main(["train", *sets(*SHORT), "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "before the first checkpoint" in err and "intact" not in err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "interrupted"


# ---------------------------------------------------------------- 8. a full disk
def test_a_full_disk_is_one_line_and_leaves_no_partial_file(finished_run, tmp_path,
                                                            monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def save(obj, f, *a, **k):  # the third checkpoint finds the disk full, as torch says it
        saves.append(f)
        if len(saves) >= 2:
            open(f, "wb").write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
        return real_save(obj, f, *a, **k)

    class Full:
        f_bavail, f_frsize = 0, 4096

    real_write = R.Path.write_text

    def write_text(self, text, *a, **k):
        if saves and len(saves) >= 2:
            real_write(self, "", *a, **k)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(R.torch, "save", save)
    monkeypatch.setattr(R.os, "statvfs", lambda path: Full())
    monkeypatch.setattr(R.Path, "write_text", write_text)
    code = main(["train", *sets(*SHORT, "log.checkpoint_every=4"), "--out", str(out)])
    one_line_error(capsys, code, "no space left on the device")
    monkeypatch.undo()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if "tmp" in p.name], files
    assert not [p for p in files if p.stat().st_size == 0 and p.name != "metrics.jsonl"]
    assert not (out / "summary.json").exists()  # the old or none, never a torn one
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["engine"]["step"] == 4
    assert main(["train", *sets(*SHORT), "--out", str(out), "--resume"]) == 0
    assert torch.equal(weights(out), weights(finished_run))


# ---------------------------------------------------------------- 9. one process per run
def test_a_second_process_on_one_run_directory_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    holder = RunDir(out)
    holder.lock()  # another open file description: flock treats it as another process
    try:
        code = main(["train", *sets(*SHORT), "--out", str(out)])
        one_line_error(capsys, code, f"is in use by another dsgd process (pid {os.getpid()})")
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.unlock()
    assert main(["train", *sets(*SHORT), "--out", str(out)]) == 0


# ---------------------------------------------------------------- 10. one line, not a traceback
def _idx(a: np.ndarray) -> bytes:
    magic = 2051 if a.ndim == 3 else 2049
    return (magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in a.shape)
            + a.tobytes())


def _fashion(folder, **replace):
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (8, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 8, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4, dtype=np.uint8)}
    for stem, a in arrays.items():
        (folder / stem).write_bytes(replace.get(stem, _idx(a)))
    return arrays


def test_corrupt_gzip_and_overflowing_idx_headers_are_one_line(tmp_path):
    raw = _idx(np.zeros((3, 4, 4), np.uint8))
    bad = bytearray(gzip.compress(raw))
    bad[10] ^= 0xFF  # the first deflate block header: zlib.error, not a CRC mismatch
    (tmp_path / "a.gz").write_bytes(bytes(bad))
    with pytest.raises(UserError, match="cannot read IDX file"):
        read_idx(str(tmp_path / "a.gz"), 3)
    huge = (2051).to_bytes(4, "big") + (2**32 - 1).to_bytes(4, "big") * 3 + b"\0" * 16
    (tmp_path / "b").write_bytes(huge)
    with pytest.raises(UserError, match="truncated or padded"):
        read_idx(str(tmp_path / "b"), 3)


@pytest.mark.parametrize("stem,array,fragment", [
    ("train-labels-idx1-ubyte", np.array([0, 1, 2, 200, 4, 5, 6, 7], np.uint8),
     "train labels outside [0, 10)"),
    ("t10k-labels-idx1-ubyte", np.array([0, 1, 2, 10], np.uint8), "test labels outside"),
    ("t10k-images-idx3-ubyte", np.zeros((4, 27, 28), np.uint8), "both splits must share"),
])
def test_bad_labels_and_shapes_are_one_line(stem, array, fragment, tmp_path, capsys):
    _fashion(tmp_path / "fm", **{stem: _idx(array)})
    code = main(["train", *sets("data.name=fashion-mnist", f'data.dir="{tmp_path / "fm"}"',
                                "model.name=lenet5"), "--out", str(tmp_path / "run")])
    one_line_error(capsys, code, fragment)


@pytest.mark.parametrize("batch,fragment", [
    ({b"data": "rows", b"labels": [0, 1]}, "as a uint8 array"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}, "list of ints"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "(N, 3072) uint8"),
    ([1, 2, 3], "does not hold a dict"),
])
def test_cifar_fields_of_the_wrong_type_are_one_line(batch, fragment, tmp_path):
    _cifar(tmp_path / "cifar", batch)
    with pytest.raises(UserError, match="data_batch_1") as err:
        read_cifar10(str(tmp_path / "cifar"))
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override,fragment", [
    ('device="cudaX"', "device must be cpu, cuda or cuda:N"),
    ("train.gamma=nan", "train.gamma must be a finite number"),
    ("train.lr=inf", "train.lr must be a finite number"),
])
def test_bad_values_are_one_line(override, fragment, tmp_path, capsys):
    code = main(["train", *sets(override), "--out", str(tmp_path / "run")])
    one_line_error(capsys, code, fragment)


def test_a_latin1_config_file_is_one_line(tmp_path, capsys):
    (tmp_path / "c.toml").write_bytes('name = "café"\n'.encode("latin-1"))
    code = main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "r")])
    one_line_error(capsys, code, "is not UTF-8 text")


def test_unreadable_inputs_and_unwritable_outputs_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "c.toml").write_text("name = 'x'\n")
    real_read = R.Path.read_text

    def read_text(self, *a, **k):
        if self.name == "c.toml":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self, *a, **k)

    monkeypatch.setattr(R.Path, "read_text", read_text)
    code = main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "r")])
    one_line_error(capsys, code, "cannot read config file")
    monkeypatch.undo()

    def mkdir(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(R.Path, "mkdir", mkdir)
    code = main(["train", *sets(*SHORT), "--out", str(tmp_path / "ro" / "run")])
    one_line_error(capsys, code, "Permission denied")


def test_tensorboard_missing_is_one_line_before_anything_is_written(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    code = main(["train", *sets("log.tensorboard=true"), "--out", str(tmp_path / "run")])
    one_line_error(capsys, code, "needs the tensorboard package")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", [os.urandom(2000) + b"\xff", b"[" * 100_000 + b"\n"])
def test_report_of_a_binary_or_deeply_nested_metrics_file_is_one_line(content, tmp_path,
                                                                      capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_bytes(content + b'\n{"step": 1}\n')
    code = main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")])
    one_line_error(capsys, code, "metrics.jsonl")


# ---------------------------------------------------------------- 11. questionable configs
@pytest.mark.parametrize("overrides,fragment", [
    (["train.topology=grid", "train.workers=7"], "7 is prime"),
    (["train.topology=exponential", "train.workers=1"], "needs train.workers >= 2"),
    ([f"train.steps={2**70}"], "does not fit in 64 bits"),
    (["train.milestones=[20, 10]"], "train.milestones must be increasing"),
    (["train.milestones=[-5]"], "train.milestones must be increasing"),
])
def test_questionable_configs_are_refused(overrides, fragment, tmp_path, capsys):
    code = main(["train", *sets(*overrides), "--out", str(tmp_path / "run")])
    one_line_error(capsys, code, fragment)


def test_grids_need_two_sides_and_adjacencies_must_be_connected():
    with pytest.raises(TopologyError, match="prime"):
        make_topology("grid", 13)
    assert make_topology("grid", 12).matrix(0).shape == (12, 12)  # 3 x 4
    two_pairs = np.zeros((4, 4))
    two_pairs[0, 1] = two_pairs[1, 0] = two_pairs[2, 3] = two_pairs[3, 2] = 1
    with pytest.raises(TopologyError, match="disconnected"):
        from_adjacency(two_pairs)


# ---------------------------------------------------------------- resume that helps
def test_resume_without_config_with_other_log_settings(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path / "run")
    (out / "checkpoints" / "last.pt").unlink()  # resume from step 5
    os.replace(out / "checkpoints" / "last.prev.pt", out / "checkpoints" / "last.pt")
    assert main(["train", "--out", str(out), "--resume", "--no-progress",
                 "--set", "log.eval_batch_size=16", "--set", "log.checkpoint_every=3"]) == 0
    assert [r["step"] for r in rows(out)] == [5, 10]
    assert torch.equal(weights(out), weights(finished_run))
    assert C.load(str(out / "config.toml")).log.eval_batch_size == 16


def test_resume_with_more_steps_extends_a_finished_run_exactly(finished_run, tmp_path):
    straight = tmp_path / "straight"
    assert main(["train", *sets("train.steps=15"), "--out", str(straight)]) == 0
    out = _copy(finished_run, tmp_path / "run")
    assert main(["train", "--out", str(out), "--resume", "--set", "train.steps=15"]) == 0
    assert rows(out) == rows(straight) and is_finished(out)
    assert torch.equal(weights(out), weights(straight))


def test_a_refused_resume_names_the_keys_and_both_values(finished_run, tmp_path, capsys):
    out = _copy(finished_run, tmp_path / "run")
    code = main(["train", *sets(*SHORT, "train.lr=0.2", "train.seed=3"), "--out", str(out),
                 "--resume"])
    one_line_error(capsys, code, "train.lr = 0.1 there, 0.2 now; train.seed = 0 there, 3 now")
    code = main(["train", "--out", str(out), "--resume", "--set", "train.steps=5"])
    one_line_error(capsys, code, "a run cannot be shortened")


# ---------------------------------------------------------------- 13-14. processes of a job
def test_the_config_fingerprint_ignores_only_settings_that_do_not_compute():
    base = C.load("quickstart")
    same = C.load("quickstart", ['device="cuda:1"', "log.progress=false", 'name="other"',
                                 "log.eval_batch_size=7", "log.tensorboard=true"])
    assert C.fingerprint(base) == C.fingerprint(same)
    for change in ("train.lr=0.3", "train.seed=1", "train.steps=7", "model.name=mlp",
                   "model.options={hidden=[3]}", "log.eval_every=3",
                   "log.checkpoint_every=7"):  # ranks must checkpoint at the same steps
        assert C.fingerprint(C.load("quickstart", [change])) != C.fingerprint(base), change


class _Ranks:
    """agree_min over this process and another holding ``other``'s config fingerprint."""

    def __init__(self, other: C.Config):
        self.other, self.rank, self.world_size = C.fingerprint(other), 0, 2

    def agree_min(self, value: int) -> int:
        return min(value, self.other if value >= 0 else -self.other)


def test_processes_with_different_configs_are_refused_before_training(tmp_path):
    cfg = C.load(None, [a for a in sets(*SHORT) if a != "--set"])
    other = C.load(None, [a for a in sets(*SHORT, "train.lr=0.2") if a != "--set"])
    with pytest.raises(UserError, match="started with different configs"):
        R.train(cfg, tmp_path / "run", comm=_Ranks(other))
    assert not (tmp_path / "run").exists()


def test_divergence_is_recorded_and_reported_as_divergence(tmp_path, monkeypatch, capsys):
    def nan():
        raise TrainingDiverged("the loss became NaN at step 4 (on some worker); lower the "
                               "learning rate")

    fail_at(monkeypatch, 3, nan)
    code = main(["train", *sets(*SHORT, "log.checkpoint_every=2"), "--out",
                 str(tmp_path / "run")])
    one_line_error(capsys, code, "the loss became NaN at step 4")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps"] == 3


def test_torchrun_processes_with_different_configs_each_say_so(tmp_path):
    """Rank 1 is started with another lr: every rank refuses with one line, before training."""
    launch = torchrun_launch(2, ["train", *sets(*SHORT), "--out"], tmp_path / "run", 30)
    worker = str(Path(__file__).with_name("rank_config_worker.py"))
    cmd = [*launch[:3], worker, "train.lr=0.2", *launch[5:]]  # the script instead of -m dsgd
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"dsgd: error (rank {rank}): the processes of this job were started with " \
               "different configs" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
