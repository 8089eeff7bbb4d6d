"""dsgd reproduce / dsgd equivalence: the pipeline end to end on tiny settings, the lockstep
tracker against closed forms, and verdicts that follow the numbers."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsgd.errors import UserError
from dsgd.experiments import config as C
from dsgd.experiments import reproduce as R
from dsgd.experiments.equivalence import lockstep, loglog_slope, set_activation
from dsgd.experiments.reproduce_report import spearman, verdicts
from dsgd.topology import make_topology

# The --quick scale made smaller still: every stage runs, in well under a minute.
TINY = replace(
    R.QUICK, name="tiny", seeds=2, tradeoff_lrs=(0.4,),
    overrides=("data.name=synthetic", "data.n_train=256", "data.n_test=128", "train.steps=6",
               "train.warmup_steps=1", "train.milestones=[3, 5]", "log.eval_every=3",
               "log.checkpoint_every=3", "model.options={hidden = [16]}", "train.workers=4"),
    batches=((4, 0.1), (16, 0.4)), analysis_samples=64, hutchinson_samples=2, power_iters=3,
    uncertainty_samples=64, posterior_draws=2, landscape_steps=3, sweep_lrs=(0.2, 0.1),
    sweep_steps=4, sweep_activations=("tanh",), sweep_seeds=1, lockstep_steps=4,
    lockstep_lrs=(0.2, 0.05), lockstep_seeds=2, lockstep_probe_every=2)


def test_tiny_pipeline_end_to_end_then_rerun_skips(tmp_path):
    out = tmp_path / "out"
    report = R.reproduce(out, TINY, log=lambda s: None)
    text = report.read_text()
    for section in ("What reproduced", "1. Large batch", "2. Sharpness", "3. D-SGD and",
                    "4. Uncertainty", "5. Regularization"):
        assert section in text
    for fig in ("large_batch", "landscape", "lockstep", "reliability", "tradeoff", "sweep"):
        assert (out / "figures" / f"{fig}.png").is_file()
        assert f"figures/{fig}.png" in text
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 * 2 * 2 + 1  # {C-SGD, ring} x 2 batches x 2 seeds + 1
    assert all(r["status"] == "finished" for r in results["runs"])
    assert {r["label"] for r in results["large_batch"]} == {"C-SGD", "D-SGD ring"}
    assert results["large_batch"][0]["test_acc"]["n"] == 2
    assert "93.91 / 88.20" in text and "83.99 / 80.37" in text  # the paper beside ours
    assert len(verdicts(results)) >= 8

    # a second invocation trains nothing: every summary.json is left untouched
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("summary.json")}
    R.reproduce(out, TINY, log=lambda s: None)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_ensure_run_resumes_an_interrupted_run(tmp_path):
    s = R.settings(TINY, seeds=1)[0]
    run = tmp_path / "run"
    first = R.ensure_run(s.cfg, run)
    assert first["status"] == "finished"
    # as if killed after its last checkpoint: status interrupted, checkpoint present
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    again = R.ensure_run(s.cfg, run)
    assert again["status"] == "finished" and again["steps"] == s.cfg.train.steps
    # a run that died before its first checkpoint starts afresh
    (run / "summary.json").unlink()
    (run / "checkpoints" / "last.pt").unlink()
    assert R.ensure_run(s.cfg, run)["status"] == "finished"


def test_paper_scale_configs_and_polite_refusal(tmp_path):
    plan = R.settings(R.SCALES["paper"], seeds=1)
    assert len(plan) == 8  # {C-SGD, ring, grid, exponential} x {1024, 8192}
    for s in plan:
        t = s.cfg.train
        assert (t.workers, t.steps, t.warmup_steps, t.milestones) == (16, 6000, 60, [2400, 4800])
        assert (t.momentum, t.weight_decay, t.seed) == (0.0, 0.0, 666)
        assert s.cfg.model.name == "resnet18_micro" and s.cfg.data.image_size == 56
        assert (s.total_batch, s.lr) in ((1024, 0.1), (8192, 0.8))
    assert {s.label for s in plan} == {"C-SGD", "D-SGD ring", "D-SGD grid",
                                       "D-SGD exponential"}
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the paper scale would train")
    with pytest.raises(UserError, match="no CUDA GPU"):
        R.reproduce(tmp_path, R.SCALES["paper"], log=lambda s: None)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- lockstep closed forms


def _mse(out, y):
    return F.mse_loss(out.squeeze(-1), y)


def test_lockstep_on_a_quadratic_all_three_coincide():
    """Linear model, MSE, the same inputs x on every worker, different targets: every loss has
    the same Hessian, so (1/m) sum_j grad L_j(w_j) = (1/m) sum_j grad L_j(w_a) exactly (D-SGD's
    average is SGD), and antithetic ADSAM is exact on a quadratic, although Xi != 0."""
    torch.manual_seed(0)
    m, B, d = 8, 5, 6
    model = nn.Linear(d, 1, bias=False)
    x = torch.randn(B, d).expand(m, B, d).contiguous()

    def batches():
        g = torch.Generator().manual_seed(1)
        while True:
            yield x, torch.randn(m, B, generator=g)

    rows = lockstep(model, make_topology("ring", m), batches(), lr=0.1, steps=20, loss=_mse)
    assert rows[-1]["consensus"] > 1e-4  # the workers do disagree
    for r in rows:
        assert r["dist_sgd"] <= 1e-5 and r["dist_adsam"] <= 1e-5
    assert rows[-1]["travel"] > 0.05


def test_lockstep_identical_workers_coincide_exactly():
    """All workers see the same batch: D-SGD keeps them identical (Xi = 0), so D-SGD, ADSAM
    and SGD are one trajectory."""
    torch.manual_seed(0)
    m = 4
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))

    def batches():
        g = torch.Generator().manual_seed(2)
        while True:
            xb = torch.randn(6, 10, generator=g)
            yb = torch.randint(0, 3, (6,), generator=g)
            yield xb.expand(m, 6, 10).contiguous(), yb.expand(m, 6).contiguous()

    rows = lockstep(model, make_topology("complete", m), batches(), lr=0.2, steps=10)
    for r in rows:
        assert r["consensus"] < 1e-10
        assert r["dist_sgd"] < 1e-5 and r["dist_adsam"] < 1e-5
    assert rows[-1]["travel"] > 1e-2


def test_lockstep_adsam_closer_than_sgd_on_a_nonlinear_net():
    torch.manual_seed(0)
    m = 8
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    w_true = torch.randn(10, 3)

    def batches():
        g = torch.Generator().manual_seed(3)
        while True:
            xb = torch.randn(m, 8, 10, generator=g)
            yield xb, (xb @ w_true).argmax(-1)

    rows = lockstep(model, make_topology("ring", m), batches(), lr=0.5, steps=30,
                    num_samples=4)
    late = rows[len(rows) // 2:]
    assert sum(r["dist_adsam"] for r in late) < sum(r["dist_sgd"] for r in late)


def test_set_activation_swaps_relu_only():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    before = copy.deepcopy(model.state_dict())
    set_activation(model, "tanh")
    assert not any(isinstance(mod, nn.ReLU) for mod in model.modules())
    assert sum(isinstance(mod, nn.Tanh) for mod in model.modules()) == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):
        set_activation(model, "swish")


def test_loglog_slope_and_spearman():
    assert loglog_slope([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
    assert math.isnan(loglog_slope([1], [1]))
    assert spearman([1, 2, 3, 4], [10, 20, 15, 40]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


# ---------------------------------------------------------------- verdicts follow the numbers


def _stat(mean, std=0.1, n=3):
    return {"mean": mean, "std": std, "n": n, "values": [mean] * n}


def _fake(csgd=(80.0, 70.0), ring=(80.0, 78.0), trace=(50.0, 20.0), ece=(0.05, 0.03),
          dist=(0.1, 0.3), losses=(0.3, 0.4, 0.5), lip=(2.0, 1.0)) -> dict:
    small, large = 256, 2048
    rows = [{"label": lab, "total_batch": tb, "lr": 0.1, "n": 3, "statuses": ["finished"],
             "test_acc": _stat(acc[i])}
            for lab, acc in (("C-SGD", csgd), ("D-SGD ring", ring))
            for i, tb in enumerate((small, large))]
    sharp = [{"label": "C-SGD", "total_batch": large, "n": 3,
              "hessian_trace": _stat(trace[0]), "top_eigenvalue": _stat(trace[0] / 5)},
             {"label": "D-SGD ring", "total_batch": large, "n": 3,
              "hessian_trace": _stat(trace[1]), "top_eigenvalue": _stat(trace[1] / 5)}]
    kinds = {"averaged": {"ece": ece[0], "nll": 0.5}, "ensemble": {"ece": ece[1], "nll": 0.45},
             "posterior": {"ece": ece[1], "nll": 0.45}}
    unc = [{"label": "D-SGD ring", "total_batch": large, "seed": 0, **kinds},
           {"label": "C-SGD", "total_batch": large, "seed": 0, **kinds}]
    runs = [{"label": "D-SGD ring", "total_batch": small, "lr": 0.1, "status": "finished",
             "consensus_mean": c, "train_loss": loss, "test_acc": 80.0}
            for c, loss in zip((0.01, 0.1, 1.0), losses, strict=True)]
    lock = [[{"step": 0, "dist_adsam": 0.0, "dist_sgd": 0.0, "consensus": 0.0, "travel": 0.0},
             {"step": 10, "dist_adsam": dist[0], "dist_sgd": dist[1], "consensus": 0.1,
              "travel": 1.0, "lip_dsgd": lip[0], "lip_dsgd_smoothed": lip[1],
              "lip_sgd": 2.0}]]
    return {"batches": [small, large], "large_batch": rows, "sharpness": sharp,
            "uncertainty": unc, "runs": runs, "lockstep": lock, "sweep": None}


def _status(results, claim_start):
    return [v["status"] for v in verdicts(results) if v["claim"].startswith(claim_start)]


def test_verdicts_follow_the_numbers_both_ways():
    good = _fake()
    assert _status(good, "large batch: C-SGD loses") == ["reproduced"]
    assert _status(good, "large batch: D-SGD beats") == ["reproduced"]
    assert _status(good, "sharpness") == ["reproduced"]
    assert _status(good, "equivalence: ADSAM") == ["reproduced"]
    assert _status(good, "trade-off") == ["reproduced"]
    assert _status(good, "gradient smoothing") == ["reproduced"]
    assert set(_status(good, "uncertainty: the local")) == {"reproduced"}

    bad = _fake(csgd=(80.0, 79.0), ring=(80.0, 70.0), trace=(20.0, 50.0), ece=(0.03, 0.05),
                dist=(0.3, 0.1), losses=(0.5, 0.4, 0.3), lip=(1.0, 2.0))
    assert _status(bad, "large batch: C-SGD loses") == ["not reproduced"]
    assert _status(bad, "large batch: D-SGD beats") == ["not reproduced"]
    assert _status(bad, "sharpness") == ["not reproduced"]
    assert _status(bad, "equivalence: ADSAM") == ["not reproduced"]
    assert _status(bad, "trade-off") == ["not reproduced"]
    assert _status(bad, "gradient smoothing") == ["not reproduced"]
    assert "partly reproduced" in _status(bad, "uncertainty: the local")

    # ADSAM closer early on only: partly reproduced
    early = _fake()
    rows = early["lockstep"][0]
    rows += [{**rows[-1], "step": 100, "dist_adsam": 2.0, "dist_sgd": 1.0}]
    assert _status(early, "equivalence: ADSAM") == ["partly reproduced"]

    # a C-SGD lead smaller than the seed noise is inconclusive, not reproduced
    noisy = _fake(csgd=(80.0, 77.0), ring=(80.0, 78.0))
    for row in noisy["large_batch"]:
        row["test_acc"]["std"] = 5.0
    assert _status(noisy, "large batch: C-SGD loses") == ["inconclusive"]
    sentence = next(v["sentence"] for v in verdicts(noisy) if v["claim"].startswith(
        "large batch: C-SGD loses"))
    assert "down 3.00 points" in sentence and "down 2.00 points" in sentence
    assert "did not appear" not in sentence
    # both gain accuracy from the larger batch: the sentence says the drop did not appear
    up = _fake(csgd=(80.0, 81.0), ring=(80.0, 83.0))
    sentence = next(v["sentence"] for v in verdicts(up) if v["claim"].startswith(
        "large batch: C-SGD loses"))
    assert "up 1.00 points" in sentence and "did not appear" in sentence


def test_verdicts_without_measurements_say_so():
    empty = {"batches": [1, 2], "large_batch": [], "sharpness": [], "uncertainty": [],
             "runs": [], "lockstep": None, "sweep": None}
    assert {v["status"] for v in verdicts(empty)} == {"not measured"}


@pytest.mark.slow
def test_cli_reproduce_quick(tmp_path):
    from dsgd.experiments.cli import main

    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (make data)")

    assert main(["reproduce", "--quick", "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "REPORT.md").is_file()


def test_cli_equivalence_small(tmp_path, capsys):
    from dsgd.experiments.cli import main

    out = tmp_path / "eq"
    rc = main(["equivalence", "--set", "data.n_train=256", "--set", "train.workers=4",
               "--set", "model.options={hidden = [8]}", "--lrs", "0.2,0.1", "--steps", "3",
               "--samples", "64", "--activation", "tanh", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [r["lr"] for r in result["table"]] == [0.2, 0.1]
    assert (out / "sweep.png").is_file() and "res 2nd order" in (out / "sweep.md").read_text()


def test_cli_reproduce_paper_refuses_in_one_line(capsys):
    from dsgd.experiments.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["reproduce", "--scale", "paper", "--data-dir", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA GPU" in err
    cfg = C.load("paper_cifar10_resnet18")
    assert cfg.train.batch_size * cfg.train.workers == 1024
