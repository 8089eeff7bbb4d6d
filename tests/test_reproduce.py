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
from dsgd.experiments.equivalence import lockstep, set_activation
from dsgd.report.reproduction import grade, verdicts
from dsgd.report.reproduction.groups import group_runs
from dsgd.report.stats import loglog_slope, spearman
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
    lockstep_lrs=(0.2, 0.05), lockstep_seeds=2, lockstep_probe_every=2, protocols=(),
    scaling_scales=(1.0, 0.5), scaling_steps=3, scaling_samples=2)


def test_tiny_pipeline_end_to_end_then_rerun_skips(tmp_path):
    out = tmp_path / "out"
    report = R.reproduce(out, TINY, log=lambda s: None)
    text = report.read_text()
    for section in ("What reproduced", "1. Large batch", "2. Sharpness", "3. D-SGD and",
                    "4. Uncertainty", "5. Regularization", "Deviation scaling"):
        assert section in text
    for fig in ("large_batch_full", "landscape", "lockstep", "reliability_final",
                "reliability_early", "tradeoff", "sweep"):
        assert (out / "figures" / f"{fig}.png").is_file()
        assert f"figures/{fig}.png" in text
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 2 * 2 * 2 + 1  # {C-SGD, ring} x 2 batches x 2 seeds + 1
    assert all(r["status"] == "finished" for r in results["runs"])
    groups = group_runs([r for r in results["runs"] if r["experiment"] == "large_batch"],
                        ["test_acc"])
    assert {r["label"] for r in groups} == {"C-SGD", "D-SGD ring"}
    assert groups[0]["test_acc"]["n"] == 2
    # uncertainty before the first lr decay, from prefix runs that stop there
    assert {r["steps_done"] for r in results["early_runs"]} == {3}
    assert {u["phase"] for u in results["uncertainty"]} == {"early", "final"}
    assert all(u["members"] == 4 for u in results["uncertainty"])
    assert json.loads((out / "verdicts.json").read_text()) == verdicts(results)
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


def test_gpu_scale_builds_a_batchnorm_protocol_and_refuses_without_a_gpu(tmp_path):
    from dsgd.models import build_model

    plan = R.settings(R.SCALES["gpu"])
    assert len(plan) == 8  # {C-SGD, ring, grid, exponential} x {1024, 8192}, one seed
    for s in plan:
        t = s.cfg.train
        assert (t.workers, t.steps, t.warmup_steps, t.milestones) == (16, 6000, 200, [2400, 4800])
        assert s.cfg.model.name == "resnet20" and s.cfg.data.name == "fashion-mnist"
        assert t.shuffle_topology == "paper"
        assert (s.total_batch, s.lr) in ((1024, 0.1), (8192, 0.8))  # linear scaling
    net = build_model("resnet20", 10, (1, 28, 28))
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the gpu scale would train")
    with pytest.raises(UserError, match="no CUDA GPU"):
        R.reproduce(tmp_path, R.SCALES["gpu"], log=lambda s: None)


def test_cpu_scale_protocols_and_early_runs():
    plan = R.settings(R.SCALES["cpu"])
    n4096 = [s for s in plan if s.protocol == "n4096"]
    assert len(n4096) == 4 * 2 * 3  # {C-SGD, 3 topologies} x 2 batches x 3 seeds
    for s in n4096:
        t = s.cfg.train
        assert s.cfg.data.n_train == 4096 and s.experiment == "large_batch"
        assert (t.steps, t.warmup_steps, t.milestones) == (2000, 200, [1000, 1500])
        assert (s.total_batch, s.lr) in ((256, 0.05), (2048, 0.4))
    probes = [s for s in plan if s.experiment == "probe"]
    assert {s.label for s in probes} == {"C-SGD", "D-SGD ring"}
    assert len({s.protocol for s in probes}) == len(R.CPU_PROBES)
    early = R.early_settings(R.SCALES["cpu"], plan)
    assert len(early) == 4 * 3 and all(s.total_batch == 2048 for s in early)
    for s in early:  # stops at the first decay with the same schedule up to it
        assert (s.cfg.train.steps, s.cfg.train.milestones) == (240, [])
        assert s.cfg.train.warmup_steps == 30 and s.cfg.train.lr == 0.8


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


def _runs(label, tb, accs, protocol="main", status=None, lr=0.1, sign=1.0):
    return [{"run": f"{label}-{tb}-{i}", "experiment": "large_batch", "protocol": protocol,
             "label": label, "total_batch": tb, "lr": lr, "seed": i,
             "status": (status or {}).get(i, "finished"), "test_acc": a,
             "train_loss": 0.3 + sign * 0.01 * i,
             "consensus_mean": 0.0 if label == "C-SGD" else 0.1 * (i + 1)}
            for i, a in enumerate(accs)]


def _fake(csgd=((80.0, 80.2, 79.8), (70.0, 70.3, 69.7)),
          ring=((80.0, 80.2, 79.8), (78.0, 78.3, 77.7)), trace=(50.0, 20.0),
          ece=(0.05, 0.03), dist=(0.1, 0.3), losses=(0.3, 0.4, 0.5), status=None) -> dict:
    small, large = 256, 2048
    sign = 1.0 if losses[-1] > losses[0] else -1.0 if losses[-1] < losses[0] else 0.0
    runs = (_runs("C-SGD", small, csgd[0]) + _runs("C-SGD", large, csgd[1], status=status)
            + _runs("D-SGD ring", small, ring[0], sign=sign)
            + _runs("D-SGD ring", large, ring[1]))
    # trade-off points at the small batch and lr 0.2: consensus rising, the loss with sign
    runs += [{"run": f"t{i}", "experiment": "tradeoff", "protocol": "main",
              "label": "D-SGD ring", "total_batch": small, "lr": 0.2, "seed": 0,
              "status": "finished", "test_acc": 80.0, "consensus_mean": 0.01 * (i + 1),
              "train_loss": 0.3 + sign * 0.01 * i} for i in range(9)]
    sharp = [{"label": lab, "total_batch": large, "seed": i, "protocol": "main",
              "hessian_trace": t + 0.5 * i, "top_eigenvalue": t / 5 + 0.1 * i}
             for lab, t in (("C-SGD", trace[0]), ("D-SGD ring", trace[1])) for i in range(3)]

    def kinds(i):
        j = 0.001 * i
        return {"averaged": {"ece": ece[0] + j, "nll": 0.5 + j},
                "ensemble": {"ece": ece[1] + j, "nll": 0.45 + j},
                "posterior": {"ece": ece[1] + j, "nll": 0.45 + j}}

    unc = [{"label": lab, "total_batch": large, "seed": i, "phase": phase, "members": 16,
            "consensus": 0.1, "prob_spread": 0.05, **kinds(i)}
           for lab in ("D-SGD ring", "C-SGD") for phase in ("early", "final") for i in range(3)]
    lock = [[{"step": 0, "dist_adsam": 0.0, "dist_sgd": 0.0, "consensus": 0.0, "travel": 0.0},
             {"step": 10, "dist_adsam": dist[0] + 0.01 * i, "dist_sgd": dist[1] - 0.01 * i,
              "consensus": 0.1, "travel": 1.0, "adsam_noise": 0.01}] for i in range(3)]
    return {"protocols": [{"name": "main", "title": "t", "graded": True,
                           "batches": [small, large]}],
            "runs": runs, "sharpness": sharp, "uncertainty": unc,
            "lockstep_by_lr": {"0.2": lock}, "sweep": None, "scaling": None}


def _status(results, claim_start):
    return [v["status"] for v in verdicts(results) if v["claim"].startswith(claim_start)]


def test_grade_is_two_standard_errors_both_ways():
    assert grade(3.0, 1.0) == "reproduced"
    assert grade(1.9, 1.0) == "inconclusive"
    assert grade(-1.9, 1.0) == "inconclusive"
    assert grade(-3.0, 1.0) == "not reproduced"
    assert grade(3.0, 1.0, required=False) == "inconclusive"  # the claim's extra condition
    assert grade(3.0, math.nan) == "inconclusive"  # one seed: no noise estimate
    assert grade(math.nan, 1.0) == "not measured"


def test_every_verdict_is_data_with_effect_se_n_and_rule():
    for v in verdicts(_fake()):
        assert set(v) >= {"claim", "status", "effect", "se", "n", "rule", "note"}
        assert v["status"] in ("reproduced", "not reproduced", "inconclusive", "not measured")
        if v["status"] != "not measured":
            assert v["rule"] and v["n"] >= 1
    json.dumps(verdicts(_fake()))  # JSON-ready


def test_verdicts_follow_the_numbers_both_ways():
    good = _fake()
    assert _status(good, "large batch (main): C-SGD loses") == ["reproduced"]
    assert _status(good, "large batch (main): D-SGD beats") == ["reproduced"]
    assert set(_status(good, "sharpness")) == {"reproduced"}
    assert _status(good, "equivalence: ADSAM") == ["reproduced"]
    assert _status(good, "trade-off") == ["reproduced"]
    assert set(_status(good, "uncertainty: D-SGD's ensemble")) == {"reproduced"}
    assert set(_status(good, "uncertainty: D-SGD's Xi-posterior has a lower")) == {"reproduced"}
    v = next(v for v in verdicts(good) if v["claim"].startswith("large batch (main): C-SGD"))
    assert v["effect"] == pytest.approx(10.0 - 2.0) and v["n"] == 3
    assert v["csgd_drop"] == pytest.approx(10.0)

    bad = _fake(csgd=((80.0, 80.2, 79.8), (79.0, 79.3, 78.7)),
                ring=((80.0, 80.2, 79.8), (70.0, 70.3, 69.7)), trace=(20.0, 50.0),
                ece=(0.03, 0.05), dist=(0.3, 0.1), losses=(0.5, 0.4, 0.3))
    assert _status(bad, "large batch (main): C-SGD loses") == ["not reproduced"]
    assert _status(bad, "large batch (main): D-SGD beats") == ["not reproduced"]
    assert set(_status(bad, "sharpness")) == {"not reproduced"}
    assert _status(bad, "equivalence: ADSAM") == ["not reproduced"]
    assert _status(bad, "trade-off") == ["not reproduced"]
    ece_rows = [v for v in verdicts(bad) if v["claim"].startswith("uncertainty: D-SGD's ensemble")
                and "ECE" in v["claim"]]
    assert {v["status"] for v in ece_rows} == {"not reproduced"}


def test_large_batch_needs_an_actual_csgd_drop():
    # both gain from the larger batch, C-SGD less: the gap is the paper's sign, the shape is not
    up = _fake(csgd=((80.0, 80.2, 79.8), (81.0, 81.2, 80.8)),
               ring=((80.0, 80.2, 79.8), (85.0, 85.2, 84.8)))
    assert _status(up, "large batch (main): C-SGD loses") == ["not reproduced"]
    # C-SGD flat within noise while D-SGD gains: no drop, so at best inconclusive
    flat = _fake(csgd=((80.0, 81.0, 79.0), (79.9, 80.9, 78.9)),
                 ring=((80.0, 80.2, 79.8), (88.0, 88.2, 87.8)))
    assert _status(flat, "large batch (main): C-SGD loses") == ["inconclusive"]


def test_noise_makes_a_verdict_inconclusive():
    noisy = _fake(csgd=((80.0, 85.0, 75.0), (77.0, 82.0, 72.0)),
                  ring=((80.0, 85.0, 75.0), (78.0, 83.0, 73.0)))
    assert _status(noisy, "large batch (main): C-SGD loses") == ["inconclusive"]
    assert _status(noisy, "large batch (main): D-SGD beats") == ["inconclusive"]
    one_seed = _fake(csgd=((80.0,), (70.0,)), ring=((80.0,), (78.0,)))
    assert _status(one_seed, "large batch (main): C-SGD loses") == ["inconclusive"]
    even = _fake(trace=(20.0, 20.1), dist=(0.2, 0.2), losses=(0.4, 0.4, 0.4))
    assert set(_status(even, "sharpness")) == {"inconclusive"}
    assert _status(even, "equivalence: ADSAM") == ["inconclusive"]


def test_diverged_runs_are_excluded_and_counted():
    # C-SGD seed 2 at the large batch diverged at its last evaluation of 10%: excluded
    res = _fake(csgd=((80.0, 80.2, 79.8), (70.0, 70.3, 10.0)), status={2: "diverged"})
    v = next(v for v in verdicts(res) if v["claim"].startswith("large batch (main): C-SGD"))
    assert v["excluded"] == {"diverged": 1} and v["n"] == 2
    assert v["csgd_drop"] == pytest.approx(80.0 - 70.15)


def test_tradeoff_weights_each_learning_rate_by_its_points():
    res = _fake()
    v = next(v for v in verdicts(res) if v["claim"].startswith("trade-off"))
    # 9 points at lr 0.2 and 3 at lr 0.1, both rho = +1: weights n - 1
    assert v["n"] == 12 and v["se"] == pytest.approx(1 / math.sqrt(8 + 2))
    assert v["effect"] == pytest.approx(1.0)
    even = next(v for v in verdicts(_fake(losses=(0.4, 0.4, 0.4)))
                if v["claim"].startswith("trade-off"))
    assert even["status"] == "not measured"  # equal losses: no rank correlation


def test_scaling_and_sweep_verdicts():
    rows = [{"activation": "tanh", "s": s, "res_sgd": 0.4 * s ** 2, "res_2nd": 0.3 * s ** 3
             * (1 + 0.01 * k), "res_adsam": 0.3 * s ** 3, "res_adsam_noise": 1e-3 * s ** 4}
            for k, s in enumerate((1, 0.5, 0.25, 0.125, 0.0625))]
    good = {**_fake(), "scaling": {"rows": rows}}
    assert set(_status(good, "equivalence: with the deviations")) == {"reproduced"}
    floor = [{**r, "res_adsam": 0.3 * r["s"] ** 2, "res_2nd": 0.3 * r["s"] ** 2 * (1 + 0.01 * k)}
             for k, r in enumerate(rows)]
    bad = {**_fake(), "scaling": {"rows": floor}}
    assert set(_status(bad, "equivalence: with the deviations")) == {"not reproduced"}
    sweep = [{"activation": "relu", "lr": lr, "seed": sd, "step": 10,
              "consensus": c * lr ** p * (1 + 0.02 * sd), "res_sgd": 0.1, "res_adsam": 0.1,
              "res_2nd": 0.1} for lr in (0.4, 0.2, 0.1, 0.05) for sd in (0, 1)
             for c, p in ((1.0, 2.0),)]
    assert _status({**_fake(), "sweep": {"rows": sweep}}, "equivalence: Tr Xi") == [
        "reproduced"]
    flat = [{**r, "consensus": 0.1 * r["lr"] ** 0.5 * (1 + 0.02 * r["seed"])} for r in sweep]
    assert _status({**_fake(), "sweep": {"rows": flat}}, "equivalence: Tr Xi") == [
        "not reproduced"]


def test_verdicts_without_measurements_say_so():
    empty = {"protocols": [{"name": "main", "title": "t", "graded": True, "batches": [1, 2]}],
             "runs": [], "sharpness": [], "uncertainty": [], "lockstep_by_lr": None,
             "sweep": None, "scaling": None}
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
