"""dsgd.report against fake run directories with known values."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsgd.errors import UserError
from dsgd.report import (
    find_runs,
    flatten,
    group_runs,
    load_run,
    make_report,
    markdown_table,
    paper_column,
    summarize_runs,
)
from dsgd.report.__main__ import main as report_main
from dsgd.report.plots import group_curve, plot_groups

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = [0, 50, 100, 150, 200]

# Final test accuracies (fractions) per seed: two settings x three seeds.
DSGD_FINAL = [0.9391, 0.9412, 0.9377]
CSGD_FINAL = [0.8820, 0.8791, 0.8866]
SEEDS = [1, 2, 3]


def write_run(
    root: Path,
    name: str,
    config: dict,
    rows: list[dict],
    status: str | None = "finished",
    extra_summary: dict | None = None,
) -> Path:
    d = root / name
    (d / "checkpoints").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"name": name, **config}))
    version = {"dsgd": "0.1.0", "git": "abc1234def", "torch": "2.13.0"}
    (d / "version.json").write_text(json.dumps(version))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status is not None:
        summary = {
            "final": rows[-1] if rows else {},
            "best_test_acc": max((r["test_acc"] for r in rows), default=float("nan")),
            "wall_time": rows[-1]["time"] if rows else 0.0,
            "steps": rows[-1]["step"] if rows else 0,
            "status": status,
            **(extra_summary or {}),
        }
        (d / "summary.json").write_text(json.dumps(summary))
    return d


def curve_rows(final_acc: float, seed: int, optional: bool = False) -> list[dict]:
    """Metric rows rising linearly to ``final_acc``; losses and consensus decay."""
    rows = []
    for i, step in enumerate(STEPS):
        frac = i / (len(STEPS) - 1)
        row = {
            "step": step,
            "epoch": step / 50,
            "lr": 0.1 if step < 150 else 0.01,
            "train_loss": 2.0 - 1.5 * frac + 0.01 * seed,
            "train_acc": 0.1 + (final_acc + 0.02 - 0.1) * frac,
            "test_loss": 2.1 - 1.4 * frac + 0.01 * seed,
            "test_acc": 0.1 + (final_acc - 0.1) * frac,
            "consensus": 10.0 ** (-1 - 2 * frac) * seed,
            "time": 1.5 * step,
        }
        if optional:
            row["hessian_trace"] = 100.0 + 10 * i + seed
        rows.append(row)
    return rows


def dsgd_config(seed: int) -> dict:
    # Nested sections, as dsgd.experiments.config writes them; device, paths and the progress
    # bar differ between seeds and must not split the group.
    return {
        "device": "cuda" if seed == 1 else "cpu",
        "out_dir": f"runs/dsgd-s{seed}",
        "train": {"algorithm": "dsgd", "topology": "ring", "workers": 16, "batch_size": 64,
                  "lr": 0.1, "steps": 200, "seed": seed},
        "data": {"name": "cifar10", "dir": f"/data{seed}", "partition_seed": seed + 100},
        "model": {"name": "resnet18_micro", "options": {}},
        "log": {"eval_every": 50, "eval_batch_size": 1000, "progress": seed != 2},
    }  # fmt: skip


def csgd_config(seed: int) -> dict:
    # Flat, as the trainer may also write it.
    return {"seed": seed, "algorithm": "csgd", "topology": "complete", "workers": 16,
            "batch_size": 64, "lr": 0.1, "steps": 200, "model": "resnet18_micro",
            "dataset": "cifar10"}  # fmt: skip


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for seed, acc in zip(SEEDS, DSGD_FINAL):
        write_run(root / "sweep", f"dsgd-ring-s{seed}", dsgd_config(seed),
                  curve_rows(acc, seed, optional=True))  # fmt: skip
    for seed, acc in zip(SEEDS, CSGD_FINAL):
        write_run(root, f"csgd-s{seed}", csgd_config(seed), curve_rows(acc, seed))
    return root


# ---------------------------------------------------------------- loading


def test_load_run_reads_every_file(runs_root: Path):
    run = load_run(runs_root / "sweep" / "dsgd-ring-s2")
    assert run.name == "dsgd-ring-s2"
    assert run.flat["train.topology"] == "ring" and run.flat["data.partition_seed"] == 102
    assert run.seed == 2
    assert run.status == "finished"
    assert run.version["git"] == "abc1234def"
    assert len(run.metrics) == len(STEPS)
    assert "hessian_trace" in run.metric_keys
    steps, acc = run.series("test_acc")
    np.testing.assert_allclose(steps, STEPS)
    assert acc[-1] == pytest.approx(100 * DSGD_FINAL[1])  # fractions are reported in percent
    assert run.final("test_acc", percent=False) == pytest.approx(DSGD_FINAL[1])
    for row in run.metrics:
        del row["step"]
    np.testing.assert_allclose(run.series("test_acc")[0], range(len(STEPS)))


def test_flatten_nested_config():
    assert flatten({"a": 1, "b": {"c": 2, "d": {"e": 3}}, "f": {}}) == {
        "a": 1, "b.c": 2, "b.d.e": 3, "f": {}
    }  # fmt: skip


def test_dir_without_metrics_is_a_one_line_user_error(tmp_path: Path):
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "config.json").write_text("{}")
    with pytest.raises(UserError) as e:
        load_run(tmp_path / "notarun")
    msg = str(e.value)
    assert "notarun" in msg and "metrics.jsonl" in msg and "\n" not in msg
    with pytest.raises(UserError) as e:
        find_runs([tmp_path / "notarun"])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        find_runs([tmp_path / "missing"])


def test_malformed_metrics_line_is_a_user_error_but_a_cut_last_line_is_skipped(tmp_path: Path):
    d = write_run(tmp_path, "r", csgd_config(1), curve_rows(0.9, 1))
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 250, "test_ac')  # a crash mid-write
    assert len(load_run(d).metrics) == len(STEPS)
    (d / "metrics.jsonl").write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2"):
        load_run(d)


def test_find_runs_recurses_into_parents_and_drops_duplicates(runs_root: Path):
    runs = find_runs([runs_root])
    assert len(runs) == 6
    assert {r.name for r in runs} >= {"dsgd-ring-s1", "csgd-s3"}
    again = find_runs([runs_root / "sweep", runs_root / "sweep" / "dsgd-ring-s1"])
    assert len(again) == 3
    assert len(find_runs(runs_root / "csgd-s1")) == 1


# ---------------------------------------------------------------- grouping


def test_grouping_ignores_seed_and_builds_labels(runs_root: Path):
    groups = group_runs(find_runs([runs_root]))
    assert [g.label for g in groups] == ["C-SGD m=16 B=64", "D-SGD ring m=16 B=64"]
    assert all(len(g.runs) == 3 for g in groups)
    assert sorted(groups[1].seeds) == SEEDS
    # An explicit key list: one group per algorithm value, whatever the config layout.
    by_model = group_runs(find_runs([runs_root / "sweep"]), by=["model.name"])
    assert len(by_model) == 1 and len(by_model[0].runs) == 3


def test_groups_with_equal_labels_are_told_apart(tmp_path: Path):
    for lr in (0.1, 0.4):
        for seed in (1, 2):
            write_run(tmp_path, f"lr{lr}-s{seed}", {**csgd_config(seed), "lr": lr},
                      curve_rows(0.9, seed))  # fmt: skip
    labels = [g.label for g in group_runs(find_runs([tmp_path]))]
    assert labels == ["C-SGD m=16 B=64 lr=0.1", "C-SGD m=16 B=64 lr=0.4"]


def test_label_falls_back_to_the_run_name(tmp_path: Path):
    for seed in (1, 2):
        write_run(tmp_path, f"mystery-seed{seed}", {"seed": seed, "x": 1}, curve_rows(0.5, seed))
    (group,) = group_runs(find_runs([tmp_path]))
    assert group.label == "mystery" and len(group.runs) == 2


# ---------------------------------------------------------------- tables


def test_table_mean_and_sample_std_match_numpy(runs_root: Path):
    rows = summarize_runs([runs_root])
    by_label = {r["label"]: r for r in rows}
    for label, finals in [("D-SGD ring m=16 B=64", DSGD_FINAL), ("C-SGD m=16 B=64", CSGD_FINAL)]:
        row = by_label[label]
        pct = 100 * np.array(finals)
        s = row["final_test_acc_pct"]
        assert s["n"] == 3 and row["n_runs"] == 3 and row["status"] == "3 finished"
        assert s["mean"] == pytest.approx(pct.mean())
        assert s["std"] == pytest.approx(pct.std(ddof=1))
        assert row["best_test_acc_pct"]["mean"] == pytest.approx(pct.mean())
        assert row["wall_time_s"]["mean"] == pytest.approx(1.5 * STEPS[-1])
        train = [2.0 - 1.5 + 0.01 * s for s in SEEDS]
        assert row["final_train_loss"]["mean"] == pytest.approx(np.mean(train))
        cons = [1e-3 * s for s in SEEDS]
        assert row["final_consensus"]["std"] == pytest.approx(np.std(cons, ddof=1))
        table = markdown_table(rows)
        assert f"{pct.mean():.2f} ± {pct.std(ddof=1):.2f}" in table
    json.dumps(rows, allow_nan=False)  # JSON-ready: undefined values are None, never NaN


def test_paper_column(runs_root: Path):
    rows = paper_column(summarize_runs([runs_root]), {"D-SGD ring m=16 B=64": 94.67})
    row = next(r for r in rows if r["label"].startswith("D-SGD"))
    assert row["paper"] == 94.67
    assert row["delta"] == pytest.approx(100 * np.mean(DSGD_FINAL) - 94.67)
    other = next(r for r in rows if r["label"].startswith("C-SGD"))
    assert other["paper"] is None and other["delta"] is None
    table = markdown_table(rows)
    assert "paper (%)" in table and "94.67" in table
    assert paper_column(rows, {"D-SGD ring m=16 B=64": 0.9467})[1]["paper"] == pytest.approx(94.67)
    with pytest.raises(UserError):
        paper_column(rows, {"no such group": 90.0})


def test_diverged_and_empty_runs_show_their_status(tmp_path: Path):
    rows = curve_rows(0.5, 1)
    for r in rows[2:]:
        r.update(train_loss=float("nan"), test_loss=float("inf"), test_acc=float("nan"))
    write_run(tmp_path, "div-s1", {**csgd_config(1), "lr": 10.0}, rows, status="diverged",
              extra_summary={"best_test_acc": None, "message": "loss is nan at step 100"})
    write_run(tmp_path, "div-s2", {**csgd_config(2), "lr": 10.0}, curve_rows(0.6, 2))
    write_run(tmp_path, "empty", {**csgd_config(1), "lr": 5.0}, [], status=None)
    out = summarize_runs([tmp_path])
    div = next(r for r in out if "lr=10" in r["label"])
    assert div["statuses"] == {"diverged": 1, "finished": 1}
    assert div["final_test_acc_pct"]["n"] == 1  # the diverged seed has no finite final value
    assert div["final_test_acc_pct"]["mean"] == pytest.approx(60.0)
    assert div["best_test_acc_pct"]["n"] == 2
    empty = next(r for r in out if "lr=5" in r["label"])
    assert empty["status"] == "empty" and empty["final_test_acc_pct"]["mean"] is None
    table = markdown_table(out)
    assert "1 diverged" in table and "| empty |" in table and "60.00 (n=1)" in table

    report = make_report([tmp_path], tmp_path / "report", metrics=["test_loss", "test_acc"])
    text = report.read_text()
    assert "diverged" in text and "empty" in text
    assert (tmp_path / "report" / "plots" / "test_loss.png").stat().st_size > 1000


def test_group_curve_aligns_different_step_grids_and_skips_nan(tmp_path: Path):
    a = curve_rows(0.9, 1)
    b = curve_rows(0.9, 2)[:3]  # stopped early
    b[1]["test_acc"] = float("nan")
    write_run(tmp_path, "a-s1", csgd_config(1), a)
    write_run(tmp_path, "a-s2", csgd_config(2), b)
    (group,) = group_runs(find_runs([tmp_path]))
    xs, mean, std, n = group_curve(group, "test_acc")
    np.testing.assert_allclose(xs, STEPS)
    np.testing.assert_array_equal(n, [2, 1, 2, 1, 1])
    assert mean[1] == pytest.approx(100 * a[1]["test_acc"]) and math.isnan(std[1])
    both = 100 * np.array([a[2]["test_acc"], b[2]["test_acc"]])
    assert mean[2] == pytest.approx(both.mean()) and std[2] == pytest.approx(both.std(ddof=1))


# ---------------------------------------------------------------- plots and REPORT.md


def test_make_report_writes_markdown_pngs_and_json(runs_root: Path, tmp_path: Path):
    out = tmp_path / "report"
    path = make_report([runs_root], out, title="CIFAR-10 test",
                       reference={"C-SGD m=16 B=64": 93.91})  # fmt: skip
    assert path == out / "REPORT.md"
    text = path.read_text()
    assert text.startswith("# CIFAR-10 test\n")
    assert "ddof=1" in text and "abc1234def" in text and "93.91" in text
    for metric in ("test_acc", "test_loss", "train_loss", "consensus", "lr", "hessian_trace"):
        png = out / "plots" / f"{metric}.png"
        assert f"](plots/{metric}.png)" in text
        data = png.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, metric
    # every embedded image resolves relative to REPORT.md
    for line in text.splitlines():
        if line.startswith("!["):
            assert (out / line.split("](")[1].rstrip(")")).is_file()
    rows = json.loads((out / "summary.json").read_text())
    assert {r["label"] for r in rows} == {"C-SGD m=16 B=64", "D-SGD ring m=16 B=64"}


def test_plot_groups_skips_metrics_without_values(runs_root: Path, tmp_path: Path):
    groups = group_runs(find_runs([runs_root]))
    written = plot_groups(groups, tmp_path / "p", metrics=["test_acc", "no_such_metric"])
    assert list(written) == ["test_acc"]


def test_cli(runs_root: Path, tmp_path: Path, capsys):
    assert report_main([str(runs_root), "-o", str(tmp_path / "r"), "--metrics", "lr"]) == 0
    assert (tmp_path / "r" / "REPORT.md").is_file()
    assert report_main([str(tmp_path / "nothing"), "-o", str(tmp_path / "r2")]) == 2
    assert "error:" in capsys.readouterr().err


def test_report_never_imports_torch_or_an_engine(runs_root: Path, tmp_path: Path):
    code = (
        "import sys; import dsgd.report as r; "
        f"r.make_report([{str(runs_root)!r}], {str(tmp_path / 'sub')!r}, metrics=['lr']); "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or 'dsgd.engine' in m]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_zero_consensus_on_a_log_axis_does_not_crash(tmp_path: Path):
    rows = curve_rows(0.9, 1)
    for r in rows:
        r["consensus"] = 0.0  # C-SGD: the workers agree exactly
    write_run(tmp_path, "c", csgd_config(1), rows)
    write_run(tmp_path, "d", dsgd_config(1), curve_rows(0.9, 1))
    groups = group_runs(find_runs([tmp_path]))
    written = plot_groups(groups, tmp_path / "p", metrics=["consensus"])
    assert written["consensus"].read_bytes()[:8] == PNG_MAGIC


def _reproduction_results() -> dict:
    """A results.json of ``dsgd reproduce`` in miniature: every section has records."""
    small, large = 256, 2048
    runs = [{"run": f"{lab}-{tb}-{s}", "experiment": exp, "protocol": proto, "label": lab,
             "total_batch": tb, "lr": 0.1 * tb / small, "seed": s, "status": status,
             "test_acc": acc + s, "train_acc": acc + 1, "train_loss": 0.3 + 0.01 * s,
             "consensus_mean": 0.0 if lab == "C-SGD" else 0.01 * (s + 1), "wall_time": 10.0,
             "time_per_step": 0.02, "steps_done": 33 if status == "diverged" else 600,
             "last_test_acc": acc}
            for proto, exp in (("full", "large_batch"), ("probe-b4096", "probe"))
            for lab in ("C-SGD", "D-SGD ring") for tb in (small, large)
            for s in ((0, 1, 2) if exp == "large_batch" else (0,))
            for acc, status in [((80.0 if tb == small else 75.0),
                                 "diverged" if exp == "probe" and tb == large else "finished")]]
    curve = {"conf": [0.5, None, 0.9], "acc": [0.4, None, 0.95], "count": [10, 0, 20]}
    unc = [{"label": lab, "total_batch": large, "seed": s, "phase": ph, "members": 16,
            "consensus": 0.1, "prob_spread": 0.02, "disagreement": 0.1,
            **{k: {"accuracy": 0.8, "nll": 0.5 - 0.01 * i, "ece": 0.05 - 0.01 * i,
                   "curve": curve} for i, k in enumerate(("averaged", "ensemble", "posterior"))}}
           for lab in ("C-SGD", "D-SGD ring") for ph in ("early", "final") for s in range(2)]
    lock = [[{"step": t, "dist_adsam": 0.01 * t, "dist_sgd": 0.02 * t, "consensus": 0.1,
              "travel": 0.1 * t, "adsam_noise": 0.01, "lip_dsgd": 2.0,
              "lip_dsgd_smoothed": 1.0, "lip_sgd": 2.5} for t in (0, 5, 10)] for _ in range(2)]
    sweep = [{"activation": "tanh", "lr": lr, "seed": 0, "step": 10, "consensus": lr ** 2,
              "res_sgd": lr ** 2, "res_adsam": lr ** 3, "res_adsam_noise": lr ** 4,
              "res_2nd": lr ** 3} for lr in (0.4, 0.2, 0.1)]
    scaling = [{"activation": "tanh", "lr": 0.1, "steps": 10, "pairs": 8, "s": s,
                "consensus": s ** 2, "res_sgd": s ** 2, "res_2nd": s ** 3, "res_adsam": s ** 3,
                "res_adsam_noise": s ** 4, "res_adsam_plain": s ** 2,
                "res_adsam_plain_noise": s ** 2} for s in (1.0, 0.5, 0.25)]
    grid = [[0.1 * (a * a + b * b) for b in range(3)] for a in range(3)]
    return {"scale": "quick", "preset": "cpu_fashion_mlp", "seeds": 3,
            "base_config": {"train": {"workers": 16}, "data": {}, "model": {}},
            "protocols": [{"name": "full", "title": "main", "graded": True,
                           "batches": [small, large], "lrs": {"256": 0.1, "2048": 0.8}},
                          {"name": "probe-b4096", "title": "probe", "graded": False,
                           "batches": [small, large]}],
            "runs": runs, "early_runs": [],
            "sharpness": [{"label": lab, "total_batch": large, "seed": s, "protocol": "full",
                           "hessian_trace": 10.0 + s, "hessian_trace_stderr": 0.5,
                           "top_eigenvalue": 2.0, "xi_trace": 0.1, "train_loss_fixed": 0.3}
                          for lab in ("C-SGD", "D-SGD ring") for s in range(3)],
            "landscape": {"C-SGD": {"alphas": [-1, 0, 1], "betas": [-1, 0, 1], "Z": grid}},
            "uncertainty": unc, "lockstep_by_lr": {"0.2": lock},
            "lockstep_settings": {"steps": 10, "samples": 8, "radius": 0.05},
            "sweep": {"rows": sweep, "pairs": 16, "steps": 10}, "scaling": {"rows": scaling},
            "wall_time": 1.0}


def test_reproduction_report_never_imports_torch_the_engine_or_the_experiments(tmp_path: Path):
    out = tmp_path / "repro"
    out.mkdir()
    (out / "results.json").write_text(json.dumps(_reproduction_results()))
    code = (
        "import sys; from dsgd.report.reproduction.__main__ import main; "
        f"assert main([{str(out)!r}]) == 0; "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or 'dsgd.engine' in m "
        "or 'dsgd.experiments' in m]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    text = (out / "REPORT.md").read_text()
    assert "This is the `--quick` scale" in text
    for section in ("What reproduced", "1. Large batch", "1b. Large batch: probes",
                    "2. Sharpness", "3. D-SGD and", "Deviation scaling", "4. Uncertainty",
                    "5. Regularization", "## Reproduce"):
        assert section in text
    assert "NaN at step 33 (75.00)" in text  # a diverged probe, generated from its record
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert all({"status", "effect", "se", "n", "rule"} <= set(v) for v in verdicts)
    for name in ("large_batch_full", "landscape", "lockstep", "sweep", "reliability_early",
                 "reliability_final", "tradeoff"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


def test_stats_is_the_one_stat_and_spearman():
    from dsgd.report import stats, tables

    assert tables.stat is stats.stat and tables.format_stat is stats.format_stat
    s = stats.stat([1.0, 2.0, 3.0, None, float("nan")])
    assert (s["mean"], s["std"], s["n"]) == (2.0, 1.0, 3)
    assert stats.se_of(s) == pytest.approx(1 / math.sqrt(3))
    assert math.isnan(stats.se_of(stats.stat([1.0])))
    assert stats.spearman([1, 2, 3, 4], [10, 20, 15, 40]) == pytest.approx(0.8)
    assert stats.loglog_slope([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)
