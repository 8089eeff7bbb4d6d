"""``dsgd compare``: the study pipeline on synthetic data, and its report from results alone."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dsgd.experiments.compare import COMPRESSION, STUDIES, compare, get_study, plan
from dsgd.report.compare import cells

TINY = ("data.name=synthetic", "data.n_train=512", "data.n_test=128", "data.image_size=8",
        "train.workers=4", "train.batch_size=8", "train.steps=12", "train.warmup_steps=0",
        "train.milestones=[]", "log.eval_every=6", "log.checkpoint_every=12",
        "log.progress=false", "network.compute_ms=2")


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    study = replace(COMPRESSION, overrides=TINY, seeds=2,
                    arms=(("C-SGD", ("train.algorithm=csgd",)),
                          ("D-SGD", ("train.algorithm=dsgd",)),
                          ("CHOCO top-10%", ("train.algorithm=choco",
                                             'train.compression={name="topk", ratio=0.1}'))))
    out = tmp_path_factory.mktemp("compare")
    compare(out, study, log=lambda _: None)
    return study, out


def test_every_study_plans_valid_configs_at_full_and_quick_size():
    for name in STUDIES:
        for quick in (False, True):
            study = get_study(name, quick)
            runs = plan(study)
            assert len(runs) == len(study.arms) * len(study.settings) * study.seeds
            assert len({r["run"] for r in runs}) == len(runs)  # no two runs share a directory


def test_compare_trains_every_cell_and_reports_it(tiny_study):
    study, out = tiny_study
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 3 * 2 * 2
    assert all(r["status"] == "finished" for r in results["runs"])
    table = cells(results)
    for c in table.values():
        assert c["test_acc"]["n"] == 2 and 0 < c["test_acc"]["mean"] <= 100
    # the stragglers change the clock only: accuracy equal, C-SGD's simulated time grows more
    # than D-SGD's (an all-reduce waits for every late worker at once)
    calm, late = (s["label"] for s in results["settings"])
    for arm in ("C-SGD", "D-SGD"):
        assert table[arm, calm]["test_acc"]["values"] == table[arm, late]["test_acc"]["values"]
    cost = {arm: table[arm, late]["sim_time_s"]["mean"] - table[arm, calm]["sim_time_s"]["mean"]
            for arm in ("C-SGD", "D-SGD")}
    assert cost["C-SGD"] > cost["D-SGD"] >= 0
    # bytes: top-10% sends k values and k int32 indices, a tenth of 8 bytes per entry of D-SGD's
    # 4-byte float (both to two neighbours); C-SGD's all-reduce 2 (m - 1) / m of the vector
    d, c = table["D-SGD", calm]["bytes"]["mean"], table["C-SGD", calm]["bytes"]["mean"]
    assert c == pytest.approx(d / 2 * 2 * 3 / 4)
    assert table["CHOCO top-10%", calm]["bytes"]["mean"] == pytest.approx(d * 0.2, rel=0.01)
    text = (out / "REPORT.md").read_text()
    assert "## Final test accuracy (%)" in text and (out / "accuracy.png").is_file()
    sub = out / "settings" / "no-stragglers"
    assert (sub / "REPORT.md").is_file()
    assert (sub / "plots" / "test_acc_vs_sim_time_s.png").is_file()
    assert (sub / "plots" / "test_acc_vs_bytes_per_worker.png").is_file()
    # the curves are labelled by arm, not by the config keys that differ
    groups = json.loads((sub / "summary.json").read_text())
    assert sorted(g["label"] for g in groups) == sorted(a for a, _ in study.arms)


def test_a_rerun_trains_nothing(tiny_study):
    study, out = tiny_study
    logged = []
    compare(out, study, log=logged.append)
    assert all("(0 s)" in line for line in logged[:-1])


def test_diverged_runs_are_counted_and_left_out_of_the_means(tmp_path: Path):
    def run(arm, seed, status, acc):
        return {"setting": "s", "arm": arm, "seed": seed, "run": f"runs/s/{arm}/s{seed}",
                "status": status, "final": {"test_acc": acc, "consensus": 0.1}}

    results = {"study": "x", "title": "t", "axis": "a", "preset": "p", "overrides": [],
               "arms": [{"label": "A", "overrides": []}], "seeds": 3, "notes": [],
               "settings": [{"label": "s", "overrides": []}],
               "runs": [run("A", 0, "finished", 0.5), run("A", 1, "finished", 0.7),
                        run("A", 2, "diverged", float("nan"))]}
    c = cells(results)["A", "s"]
    assert c["diverged"] == 1 and c["test_acc"]["n"] == 2
    assert c["test_acc"]["mean"] == pytest.approx(60.0)
    (tmp_path / "runs").mkdir()
    code = ("import sys, json; from dsgd.report.compare import write_report; "
            f"write_report(json.loads(open({str(tmp_path / 'r.json')!r}).read()), "
            f"{str(tmp_path)!r}); bad = [m for m in sys.modules if m.split('.')[0] == 'torch' "
            "or 'dsgd.engine' in m or 'dsgd.experiments' in m]; assert not bad, bad")
    (tmp_path / "r.json").write_text(json.dumps(results))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
    assert "60.00 ± 14.14 (n=2), 1 diverged" in (tmp_path / "REPORT.md").read_text()
