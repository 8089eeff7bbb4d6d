"""REPORT.md, verdicts.json and the figures of ``dsgd reproduce``, from ``results.json`` only.

Every section, the probes included, is generated from the records; rerunning the pipeline (or
``python -m dsgd.report.reproduction OUT``) rewrites the whole file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsgd.report import figures as F
from dsgd.report.reproduction.groups import find, group_runs, labels
from dsgd.report.reproduction.sweep import (
    scaling_markdown,
    sweep_markdown,
    sweep_slopes,
    sweep_table,
)
from dsgd.report.reproduction.verdicts import lockstep_seed_means, tradeoff_points, verdicts
from dsgd.report.stats import finite, fmt, mean_of, se_of, stat

# The paper's final test accuracy (%) on CIFAR-10 ResNet-18 at iteration 5950 (SPEC.md, from
# the authors' released logs): (total batch 1024 at lr 0.1, 8192 at lr 0.8).
PAPER_RESNET18 = {"C-SGD": (93.91, 88.20), "D-SGD ring": (94.67, 92.16),
                  "D-SGD grid": (94.64, 92.59), "D-SGD exponential": (94.66, 93.73)}
PAPER_RESNET18_NO_PRETRAINING = {"C-SGD": (83.99, 80.37), "D-SGD ring": (83.56, 82.83)}


def _pm(effect: float | None, se: float | None) -> str:
    if not finite(effect):
        return "—"
    return f"{effect:+.3g} ± {se:.2g}" if finite(se) else f"{effect:+.3g} (no se)"


def _excluded(row: dict | None) -> str:
    ex = (row or {}).get("excluded") or {}
    return ", ".join(f"{n} {k}" for k, n in sorted(ex.items())) or "—"


# ---------------------------------------------------------------- sections


def _verdict_section(vs: Sequence[dict]) -> list[str]:
    lines = ["## What reproduced and what did not", "",
             "Computed from the records below (`dsgd.report.reproduction.verdicts`). Each "
             "effect is signed so that positive is the paper's direction; **reproduced** "
             "needs effect > 2 se (and the claim's extra condition), **not reproduced** "
             "effect < -2 se, anything else is **inconclusive**. Diverged and unfinished "
             "runs are excluded and counted.", "",
             "| status | claim | effect ± se | n | note |", "|---|---|---|---|---|"]
    for v in vs:
        ex = v.get("excluded") or {}
        note = v["note"] + (" Excluded: " + ", ".join(f"{n} {k}" for k, n in ex.items())
                            + "." if ex else "")
        lines.append(f"| **{v['status']}** | {v['claim']} | {_pm(v['effect'], v['se'])} | "
                     f"{v['n']} | {note} |")
    rules = []
    for v in vs:
        if v.get("rule") and v["rule"] not in rules:
            rules.append(v["rule"])
    lines += ["", "Rules (effect and se of each claim):", ""] + [f"- {r}" for r in rules]
    lines += ["", "Not graded: the gradient-smoothing comparison (section 5). Gaussian "
              "smoothing cannot raise the local gradient-Lipschitz estimate beyond Monte "
              "Carlo noise, so a lower value for the Xi-smoothed loss holds by construction "
              "and says nothing about D-SGD; its numbers are reported as measurements.", ""]
    return lines


def _large_batch_section(results: dict, figs: Path) -> list[str]:
    lines = ["## 1. Large batch: C-SGD vs D-SGD", ""]
    runs = [r for r in results.get("runs") or [] if r.get("experiment") == "large_batch"]
    for i, proto in enumerate(p for p in results.get("protocols") or [] if p["graded"]):
        small, large = proto["batches"]
        lr = proto.get("lrs", {})
        rows = group_runs([r for r in runs if r.get("protocol") == proto["name"]],
                          ["test_acc", "train_acc", "train_loss", "consensus_mean",
                           "wall_time"])
        lines += [f"### {proto['name']}: {proto['title']}", "",
                  f"Final test accuracy (%) of the averaged model, mean ± sample std over "
                  f"seeds (n), total batch {small} (lr {lr.get(str(small), '?')}) vs {large} "
                  f"(lr {lr.get(str(large), '?')}); drop = small minus large, ± its se.", ""]
        paper = i == 0
        head = f"| setting | batch {small} | batch {large} | drop | excluded |"
        if paper:
            head += (" paper ResNet-18 pretrained 1024 / 8192 (drop) | paper no pretraining "
                     "1024 / 8192 (drop) |")
        lines += [head, "|---" * (head.count("|") - 1) + "|"]
        bars = {}
        for lab in labels(rows):
            s, g = find(rows, lab, small), find(rows, lab, large)
            drop = mean_of((s or {}).get("test_acc")) - mean_of((g or {}).get("test_acc"))
            se = (se_of((s or {}).get("test_acc")) ** 2
                  + se_of((g or {}).get("test_acc")) ** 2) ** 0.5
            ex = {k: (s or {}).get("excluded", {}).get(k, 0) + (g or {}).get(
                "excluded", {}).get(k, 0) for k in {**(s or {}).get("excluded", {}),
                                                    **(g or {}).get("excluded", {})}}
            row = (f"| {lab} | {fmt((s or {}).get('test_acc'), '.2f')} "
                   f"(n={(s or {}).get('n', 0)}) | {fmt((g or {}).get('test_acc'), '.2f')} "
                   f"(n={(g or {}).get('n', 0)}) | {_pm(drop, se)} | "
                   f"{_excluded({'excluded': ex})} |")
            if paper:
                p, q = PAPER_RESNET18.get(lab), PAPER_RESNET18_NO_PRETRAINING.get(lab)
                row += (f" {p[0]:.2f} / {p[1]:.2f} ({p[0] - p[1]:.2f}) |" if p else " — |")
                row += (f" {q[0]:.2f} / {q[1]:.2f} ({q[0] - q[1]:.2f}) |" if q else " — |")
            lines.append(row)
            bars[lab] = [(mean_of((r or {}).get("test_acc")),
                          ((r or {}).get("test_acc") or {}).get("std") or float("nan"))
                         for r in (s, g)]
        name = f"large_batch_{proto['name']}.png"
        F.plot_bars(bars, [f"total batch {small}", f"total batch {large}"], figs / name,
                    "final test accuracy (%)", f"{proto['name']}: C-SGD vs D-SGD")
        lines += ["", f"![large batch {proto['name']}](figures/{name})", "",
                  "| setting | total batch | n | final train acc (%) | final train loss | "
                  "mean consensus Tr Xi | wall time (s) |", "|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["total_batch"], labels(rows).index(r["label"]))):
            lines.append(f"| {r['label']} | {r['total_batch']} | {r['n']} | "
                         f"{fmt(r['train_acc'], '.2f')} | {fmt(r['train_loss'], '.4f')} | "
                         f"{fmt(r['consensus_mean'])} | {fmt(r['wall_time'], '.0f')} |")
        bad = [r for r in runs if r.get("protocol") == proto["name"]
               and r.get("status") != "finished"]
        if bad:
            lines += ["", f"Excluded runs ({len(bad)}): " + "; ".join(
                f"{r['run']} ({r['status']} at step {r.get('steps_done')}, last evaluation "
                f"{fmt(r.get('last_test_acc'), '.2f')}%)" for r in bad) + "."]
        lines.append("")
    return lines


def _probes_section(results: dict) -> list[str]:
    probes = [p for p in results.get("protocols") or [] if not p["graded"]]
    if not probes:
        return []
    lines = ["## 1b. Large batch: probes", "",
             "Single-seed runs (three for the last probe) at other batches and schedules, "
             "D-SGD on the ring and C-SGD, reported and not graded. A run that stopped with a "
             "non-finite loss shows 'NaN at step k' and, in brackets, its last evaluation "
             "before that: it is not an accuracy drop and enters no table above.", "",
             "| probe | total batch (lr) | seed | C-SGD | D-SGD ring | time per step (ms) |",
             "|---|---|---|---|---|---|"]
    runs = [r for r in results.get("runs") or [] if r.get("experiment") == "probe"]

    def cell(r: dict | None) -> str:
        if r is None:
            return "—"
        if r["status"] == "finished":
            acc = fmt(r.get("test_acc"), ".2f")
            return acc + (f" (train {fmt(r.get('train_acc'), '.2f')})"
                          if finite(r.get("train_acc")) else "")
        return (f"{'NaN' if r['status'] == 'diverged' else r['status']} at step "
                f"{r.get('steps_done')} ({fmt(r.get('last_test_acc'), '.2f')})")

    for p in probes:
        rs = [r for r in runs if r.get("protocol") == p["name"]]
        for tb, seed in sorted({(r["total_batch"], r["seed"]) for r in rs}):
            c = next((r for r in rs if (r["label"], r["total_batch"], r["seed"]) ==
                      ("C-SGD", tb, seed)), None)
            d = next((r for r in rs if (r["label"], r["total_batch"], r["seed"]) ==
                      ("D-SGD ring", tb, seed)), None)
            t = [fmt(1000 * r["time_per_step"], ".0f") if r and finite(r.get("time_per_step"))
                 else "—" for r in (c, d)]
            lines.append(f"| {p['name']}: {p['title']} | {tb} ({(c or d)['lr']:g}) | {seed} | "
                         f"{cell(c)} | {cell(d)} | {t[0]} / {t[1]} |")
    diverged = [r for r in runs if r["status"] == "diverged"]
    lines += ["", f"{len(diverged)} of {len(runs)} probe runs diverged"
              + (": " + ", ".join(f"{r['label']} at total batch {r['total_batch']} "
                                 f"(lr {r['lr']:g}) step {r.get('steps_done')}"
                                 for r in diverged) if diverged else "") + ".", ""]
    return lines


def _sharpness_section(results: dict, figs: Path) -> list[str]:
    lines = ["## 2. Sharpness of the final averaged models", "",
             "Hessian trace (Hutchinson), top eigenvalue (power iteration) and Tr(H Xi) on a "
             "fixed training batch, eval mode; mean ± sample std over seeds.", ""]
    recs = results.get("sharpness") or []
    if recs:
        rows = group_runs(recs, ["hessian_trace", "hessian_trace_stderr", "top_eigenvalue",
                                 "xi_trace", "train_loss_fixed"], require="hessian_trace")
        lines += ["| setting | total batch | n | Hessian trace | its Monte Carlo se | top "
                  "eigenvalue | Tr(H Xi) | loss |", "|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["total_batch"], labels(rows).index(r["label"]))):
            lines.append(f"| {r['label']} | {r['total_batch']} | {r['n']} | "
                         f"{fmt(r['hessian_trace'], '.4g')} | "
                         f"{fmt(mean_of(r['hessian_trace_stderr']), '.2g')} | "
                         f"{fmt(r['top_eigenvalue'], '.4g')} | {fmt(r['xi_trace'])} | "
                         f"{fmt(r['train_loss_fixed'], '.4f')} |")
        lines.append("")
    if results.get("landscape"):
        F.plot_surfaces(results["landscape"], figs / "landscape.png")
        lines += ["Filter-normalized 2D loss surfaces (Li et al. 2018; same levels in every "
                  "panel, the centre is the averaged model):", "",
                  "![landscape](figures/landscape.png)", ""]
    return lines


def _equivalence_section(results: dict, figs: Path) -> list[str]:
    lines = ["## 3. D-SGD and average-direction SAM", ""]
    lock = results.get("lockstep_by_lr") or {}
    ls = results.get("lockstep_settings") or {}
    if lock:
        F.plot_lockstep(lock, figs / "lockstep.png")
        lines += [
            f"D-SGD ({ls.get('topology')}, total batch {ls.get('total_batch')}, constant lr "
            f"{', '.join(lock)}, {ls.get('steps')} steps), centralized ADSAM with Sigma = Xi(t) "
            f"read from the D-SGD workers at the same step ({ls.get('samples')} draws per "
            "worker and step, antithetic), and SGD with the same total batch, from the same "
            "start on the same mini-batches. Distances to D-SGD's average w_a(t), averaged "
            "over the recorded steps, mean ± std over seeds. 'ADSAM noise' is the relative "
            "Monte Carlo error of the ADSAM step direction from its finite draws (m x pairs "
            "antithetic pairs, on a fixed batch), averaged over the probes.", "",
            "| lr | seeds | ADSAM distance | SGD distance | SGD minus ADSAM | ADSAM noise | "
            "mean Tr Xi |", "|---|---|---|---|---|---|---|"]
        for lr, seeds in lock.items():
            m = lockstep_seed_means(seeds)
            noise = stat([r["adsam_noise"] for rows in seeds for r in rows
                          if finite(r.get("adsam_noise"))])
            cons = stat([r["consensus"] for rows in seeds for r in rows if r["step"] > 0])
            lines.append(f"| {lr} | {len(seeds)} | {fmt(stat(m['dist_adsam']), '.4g')} | "
                         f"{fmt(stat(m['dist_sgd']), '.4g')} | {fmt(stat(m['gain']), '.3g')} | "
                         f"{fmt(mean_of(noise), '.3g')} | {fmt(mean_of(cons))} |")
        lines += ["", "![lockstep](figures/lockstep.png)", ""]
    sweep = results.get("sweep")
    if sweep and sweep.get("rows"):
        table = sweep_table(sweep["rows"])
        F.plot_sweep(table, figs / "sweep.png")
        lines += [f"Decomposition residuals ||g_dsgd - g|| / ||g_dsgd|| at the end of "
                  f"{sweep.get('steps')}-step D-SGD runs at each learning rate, on a fixed "
                  f"training batch. g_adsam from {sweep.get('pairs')} antithetic pairs with the "
                  "second-order control variate; its Monte Carlo noise floor (the relative "
                  "norm of its standard error) is beside it, and a residual below about twice "
                  "its floor is noise:", "", sweep_markdown(table), "",
                  "Log-log slopes: " + "; ".join(
                      f"{act}: " + ", ".join(f"{k} {v:.2f}" for k, v in sl.items())
                      for act, sl in sweep_slopes(table).items()), "",
                  "![sweep](figures/sweep.png)", ""]
    scaling = results.get("scaling")
    if scaling and scaling.get("rows"):
        r0 = scaling["rows"][0]
        lines += [f"Deviation scaling: one D-SGD state (tanh MLP, lr {r0['lr']:g}, "
                  f"{r0['steps']} steps), every deviation w_j - w_a multiplied by s; "
                  f"g_adsam from {r0['pairs']} antithetic pairs with and without the control "
                  "variate (the same draws), each beside its noise floor:", "",
                  scaling_markdown(scaling["rows"]), ""]
    return lines


def _uncertainty_section(results: dict, figs: Path) -> list[str]:
    unc = results.get("uncertainty") or []
    lines = ["## 4. Uncertainty", ""]
    if not unc:
        return lines
    lines += ["On the first test samples, mean ± std over runs; 'early' is a prefix run that "
              "stops at the first lr decay (same schedule up to there), 'final' the end of "
              "training. Members: local models in the ensemble; spread: mean total-variation "
              "distance of a member's predictive distribution to the ensemble's; "
              "disagreement: mean fraction of members whose top class differs from the "
              "ensemble's. With spread 0 the ensemble, the posterior and the averaged model "
              "are one predictor.", "",
              "| phase | setting | total batch | runs | members | Tr Xi | spread | "
              "disagreement | predictive | accuracy (%) | NLL | ECE |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for u in unc:
        groups.setdefault((u.get("phase", "final"), u["label"], u["total_batch"]), []).append(u)
    for (phase, lab, tb), us in sorted(groups.items(), key=lambda kv: (
            kv[0][0] != "early", kv[0][2], labels(unc).index(kv[0][1]))):
        kinds = ("averaged",) if lab == "C-SGD" else ("averaged", "ensemble", "posterior")
        head = (f"| {phase} | {lab} | {tb} | {len(us)} | {us[0].get('members', '?')} | "
                f"{fmt(stat([u.get('consensus') for u in us]))} | "
                f"{fmt(stat([u.get('prob_spread') for u in us]))} | "
                f"{fmt(stat([u.get('disagreement') for u in us]))} |")
        for i, k in enumerate(kinds):
            lines.append((head if i == 0 else "| | | | | | | | |")
                         + f" {k} | {fmt(stat([100 * u[k]['accuracy'] for u in us]), '.2f')} | "
                         f"{fmt(stat([u[k]['nll'] for u in us]), '.4f')} | "
                         f"{fmt(stat([u[k]['ece'] for u in us]), '.4f')} |")
    lines.append("")
    for phase in ("early", "final"):
        d = next((u for u in unc if u["label"] == "D-SGD ring" and u.get("phase") == phase),
                 None)
        c = next((u for u in unc if u["label"] == "C-SGD" and u.get("phase") == phase
                  and (d is None or u["total_batch"] == d["total_batch"])), None)
        curves = {f"D-SGD ring {k}": d[k]["curve"] for k in
                  ("averaged", "ensemble", "posterior")} if d else {}
        if c:
            curves["C-SGD"] = c["averaged"]["curve"]
        if curves:
            tb = (d or c)["total_batch"]
            F.plot_reliability(curves, figs / f"reliability_{phase}.png",
                               title=f"reliability ({phase}), total batch {tb}")
            lines += [f"![reliability {phase}](figures/reliability_{phase}.png)", ""]
    return lines


def _tradeoff_section(results: dict, figs: Path) -> list[str]:
    lines = ["## 5. Regularization-optimization trade-off and gradient smoothing", ""]
    pts = tradeoff_points(results)
    finished = [r for r in results.get("runs") or [] if r.get("status") == "finished"
                and finite(r.get("consensus_mean")) and r.get("experiment") in
                ("large_batch", "tradeoff") and r.get("protocol") == (
                    (results.get("protocols") or [{}])[0].get("name"))]
    if finished:
        F.plot_tradeoff(finished, figs / "tradeoff.png")
        lines += [f"Every finished run of the main protocol (the trade-off runs add D-SGD "
                  f"learning rates at the small batch); {len(pts)} D-SGD runs at that batch "
                  "enter the correlation of section 'What reproduced'.", "",
                  "![trade-off](figures/tradeoff.png)", ""]
    lock = results.get("lockstep_by_lr") or {}
    probes = [r for seeds in lock.values() for rows in seeds for r in rows
              if finite(r.get("lip_dsgd_smoothed"))]
    if probes:
        def avg(k):
            return stat([r[k] for r in probes if finite(r.get(k))])
        lines += [f"Local gradient-Lipschitz estimates (radius {(results.get('lockstep_settings') or {}).get('radius')}) "  # noqa: E501
                  f"along the lockstep runs ({len(probes)} probes): L at D-SGD's average "
                  f"{fmt(avg('lip_dsgd'), '.4g')}, the Xi-smoothed L there "
                  f"{fmt(avg('lip_dsgd_smoothed'), '.4g')}, L along C-SGD "
                  f"{fmt(avg('lip_sgd'), '.4g')}. Not graded: smoothing lowers this estimate "
                  "by construction.", ""]
    return lines


def _header(results: dict) -> list[str]:
    base = results.get("base_config", {})
    tr, data, model = base.get("train", {}), base.get("data", {}), base.get("model", {})
    name = results["scale"]
    quick = name == "quick" or name.endswith("-quick")
    lines = [f"# Reproduction of Zhu et al., ICML 2023 — scale `{name}`", ""]
    if quick:
        lines += ["**This is the `--quick` scale: a few hundred samples and a few steps, to "
                  "check the pipeline. Its numbers and verdicts say nothing about the paper.**",
                  ""]
    runs = results.get("runs") or []
    lines += [
        f"Main protocol: {data.get('name')} (n_train={data.get('n_train') or 'all'}, "
        f"n_test={data.get('n_test') or 'all'}), model `{model.get('name')}` "
        f"{model.get('options') or ''}, {tr.get('workers')} workers, {tr.get('steps')} steps, "
        f"momentum {tr.get('momentum')}, weight decay {tr.get('weight_decay')}, warmup "
        f"{tr.get('warmup_steps')}, milestones {tr.get('milestones')}, shuffle "
        f"{tr.get('shuffle_topology')}. Preset `{results.get('preset')}`; training wall time "
        f"summed over the {len(runs)} runs "
        f"{sum(r.get('wall_time') or 0 for r in runs) / 60:.1f} min; wall time of the last "
        f"invocation (finished runs and cached analyses are reused) "
        f"{results.get('wall_time', 0) / 60:.1f} min.", "",
        "The paper trains ImageNet-pretrained ResNet-18 on CIFAR-10 for 6000 iterations on a "
        "GPU; the CPU scale uses another data set and model, so the comparison with the paper "
        "is of the *shape* (how much each method loses from the small to the large total "
        "batch), not of the accuracy values. The paper's closest row is its no-pretraining "
        "run (C-SGD 83.99 -> 80.37, D-SGD ring 83.56 -> 82.83).", ""]
    return lines


def _footer(results: dict) -> list[str]:
    name = results["scale"]
    quick = name == "quick" or name.endswith("-quick")
    name = "cpu" if name == "quick" else name.removesuffix("-quick")
    return ["## Reproduce", "", "```bash",
            f"dsgd reproduce --scale {name}" + (" --quick" if quick else "")
            + f" --seeds {results.get('seeds')} --out OUT",
            "python -m dsgd.report.reproduction OUT   # the report again, from OUT/results.json",
            "```", "", "Finished runs are skipped and interrupted ones resumed; "
            "`OUT/results.json` holds every record above.", ""]


def write_report(results: dict[str, Any], out: str | Path) -> Path:
    """OUT/REPORT.md, OUT/verdicts.json and OUT/figures/*.png from a ``results.json`` dict."""
    out = Path(out)
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    vs = verdicts(results)
    lines = (_header(results) + _verdict_section(vs) + _large_batch_section(results, figs)
             + _probes_section(results) + _sharpness_section(results, figs)
             + _equivalence_section(results, figs) + _uncertainty_section(results, figs)
             + _tradeoff_section(results, figs) + _footer(results))
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    (out / "verdicts.json").write_text(json.dumps(vs, indent=1))
    return path
