"""The verdicts of ``dsgd reproduce`` as data, computed from its per-run records only.

Each claim of Zhu et al. (ICML 2023) that the measurements can test becomes one record

    {"claim", "status", "effect", "se", "n", "rule", "note", ...}

``effect`` is signed so that a positive value is the paper's direction, ``se`` its standard
error (over seeds, and Monte Carlo where it applies), ``n`` the number of independent values it
rests on, ``rule`` the test in words. The one rule (``grade``):

    reproduced       effect > 2 se (and every extra requirement of the claim holds)
    not reproduced   effect < -2 se (the opposite direction beyond the noise)
    inconclusive     otherwise, or no noise estimate (a single seed)
    not measured     the numbers are missing

Diverged or unfinished runs are excluded from every statistic and counted (``excluded``).
Claims that cannot fail are not graded: Gaussian smoothing cannot raise the local gradient
Lipschitz estimate (up to Monte Carlo noise), so the smoothing numbers are reported as
measurements only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from dsgd.report.reproduction.groups import find, group_runs, labels
from dsgd.report.reproduction.sweep import regression, sweep_finals
from dsgd.report.stats import finite, mean_of, se_of, spearman, spearman_se, stat

Verdict = dict[str, Any]
Z = 2.0  # standard errors an effect must clear


def grade(effect: float, se: float, required: bool = True) -> str:
    """The rule of the module docstring; ``required`` is the claim's extra condition."""
    if not finite(effect):
        return "not measured"
    if not finite(se):
        return "inconclusive"
    if effect < -Z * se:
        return "not reproduced"
    if effect > Z * se and required:
        return "reproduced"
    return "inconclusive"


def verdict(claim: str, effect: float, se: float, n: int, rule: str, note: str,
            required: bool = True, **extra: Any) -> Verdict:
    """One claim's record; NaN values are stored as None (JSON)."""
    def js(v):
        return float(v) if finite(v) else None

    return {"claim": claim, "status": grade(effect, se, required), "effect": js(effect),
            "se": js(se), "n": n, "rule": rule, "note": note,
            **{k: js(v) if isinstance(v, float) else v for k, v in extra.items()}}


def missing(claim: str, note: str) -> Verdict:
    return {"claim": claim, "status": "not measured", "effect": None, "se": None, "n": 0,
            "rule": "", "note": note}


def _quad(*ses: float) -> float:
    return math.sqrt(sum(s * s for s in ses))


def _excluded(*rows: dict | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        for k, v in ((r or {}).get("excluded") or {}).items():
            out[k] = out.get(k, 0) + v
    return out


# ---------------------------------------------------------------- 1. large batch


def verdict_large_batch(results: dict) -> list[Verdict]:
    out: list[Verdict] = []
    runs = [r for r in results.get("runs") or [] if r.get("experiment") == "large_batch"]
    for proto in results.get("protocols") or []:
        if not proto.get("graded", True) or len(proto["batches"]) != 2:
            continue  # a probe is reported, not graded
        name = proto["name"]
        small, large = proto["batches"]
        rows = group_runs([r for r in runs if r.get("protocol", "") == name], ["test_acc"])
        c_s, c_l = find(rows, "C-SGD", small), find(rows, "C-SGD", large)
        claim = (f"large batch ({name}): C-SGD loses accuracy from total batch {small} to "
                 f"{large}, and more than D-SGD")
        if not (c_s and c_l and c_s["n"] and c_l["n"]):
            out.append(missing(claim, "C-SGD runs are missing."))
            continue
        drop_c = mean_of(c_s["test_acc"]) - mean_of(c_l["test_acc"])
        se_c = _quad(se_of(c_s["test_acc"]), se_of(c_l["test_acc"]))
        for label in labels(rows):
            if label == "C-SGD":
                continue
            d_s, d_l = find(rows, label, small), find(rows, label, large)
            if not (d_s and d_l and d_s["n"] and d_l["n"]):
                out.append(missing(claim, f"{label} runs are missing."))
                continue
            drop_d = mean_of(d_s["test_acc"]) - mean_of(d_l["test_acc"])
            gap = drop_c - drop_d
            se = _quad(se_c, se_of(d_s["test_acc"]), se_of(d_l["test_acc"]))
            c_drops = finite(se_c) and drop_c > Z * se_c
            v = verdict(
                claim + f" ({label})", gap, se,
                min(r["n"] for r in (c_s, c_l, d_s, d_l)),
                "effect = C-SGD's drop minus D-SGD's drop (points); reproduced when effect > "
                "2 se and C-SGD's own drop > 2 of its se; not reproduced when effect < -2 se "
                "or C-SGD gains beyond 2 se",
                f"C-SGD {drop_c:+.2f} ± {se_c:.2f} points lost, {label} {drop_d:+.2f}.",
                required=c_drops, csgd_drop=drop_c, csgd_drop_se=se_c,
                excluded=_excluded(c_s, c_l, d_s, d_l), protocol=name)
            if finite(se_c) and drop_c < -Z * se_c:
                v["status"] = "not reproduced"  # C-SGD gained: the shape is the opposite
            out.append(v)
            better = mean_of(d_l["test_acc"]) - mean_of(c_l["test_acc"])
            out.append(verdict(
                f"large batch ({name}): D-SGD beats C-SGD at total batch {large} ({label})",
                better, _quad(se_of(d_l["test_acc"]), se_of(c_l["test_acc"])),
                min(d_l["n"], c_l["n"]),
                "effect = D-SGD minus C-SGD final test accuracy (points) at the large batch",
                f"{label} {mean_of(d_l['test_acc']):.2f}%, C-SGD "
                f"{mean_of(c_l['test_acc']):.2f}%.", excluded=_excluded(c_l, d_l),
                protocol=name))
    if not out:
        out.append(missing("large batch: C-SGD loses more accuracy than D-SGD",
                           "no large-batch protocol."))
    return out


# ---------------------------------------------------------------- 2. sharpness


def verdict_sharpness(results: dict) -> list[Verdict]:
    protos = results.get("protocols") or []
    recs = results.get("sharpness") or []
    if not protos or not recs:
        return [missing("sharpness: D-SGD ends flatter than C-SGD at the large batch",
                        "no sharpness measurement.")]
    large = protos[0]["batches"][1]
    keys = ("hessian_trace", "top_eigenvalue")
    rows = group_runs([r for r in recs if r["total_batch"] == large], keys,
                      require="hessian_trace")
    c = find(rows, "C-SGD", large)
    out = []
    for label in labels(rows):
        d = find(rows, label, large)
        if label == "C-SGD" or not d or not c:
            continue
        for key, name in (("hessian_trace", "Hessian trace"),
                          ("top_eigenvalue", "top Hessian eigenvalue")):
            eff = mean_of(c[key]) - mean_of(d[key])
            out.append(verdict(
                f"sharpness: D-SGD ({label}) has a smaller {name} than C-SGD at total batch "
                f"{large}", eff, _quad(se_of(c[key]), se_of(d[key])), min(c["n"], d["n"]),
                f"effect = C-SGD's minus D-SGD's {name}; se over seeds (each seed's estimate "
                "carries its own Monte Carlo noise)",
                f"C-SGD {mean_of(c[key]):.4g}, {label} {mean_of(d[key]):.4g}."))
    return out or [missing("sharpness: D-SGD ends flatter than C-SGD", "no C-SGD runs.")]


# ---------------------------------------------------------------- 3. equivalence


def lockstep_seed_means(lock: Sequence[Sequence[dict]]) -> dict[str, list[float]]:
    """Per seed, the mean over recorded steps (step > 0) of dist_adsam, dist_sgd and their
    difference dist_sgd - dist_adsam."""
    out: dict[str, list[float]] = {"dist_adsam": [], "dist_sgd": [], "gain": []}
    for rows in lock:
        pts = [r for r in rows if r["step"] > 0]
        if not pts:
            continue
        a = sum(r["dist_adsam"] for r in pts) / len(pts)
        s = sum(r["dist_sgd"] for r in pts) / len(pts)
        out["dist_adsam"].append(a)
        out["dist_sgd"].append(s)
        out["gain"].append(s - a)
    return out


def verdict_equivalence(results: dict) -> list[Verdict]:
    out: list[Verdict] = []
    lock = results.get("lockstep_by_lr") or {}
    claim = "equivalence: ADSAM with Sigma = Xi(t) tracks D-SGD's average closer than SGD"
    if not lock:
        out.append(missing(claim, "the lockstep experiment was not run."))
    for lr, seeds in lock.items():
        m = lockstep_seed_means(seeds)
        g = stat(m["gain"])
        noise = [r["adsam_noise"] for rows in seeds for r in rows if finite(r.get("adsam_noise"))]
        out.append(verdict(
            claim + f" (lr {lr})", mean_of(g), se_of(g), g["n"],
            "effect = mean over steps of ||w_sgd - w_a|| - ||w_adsam - w_a||, se over seeds",
            f"mean distance ADSAM {mean_of(stat(m['dist_adsam'])):.4g}, SGD "
            f"{mean_of(stat(m['dist_sgd'])):.4g} (ratio "
            f"{mean_of(stat(m['dist_adsam'])) / mean_of(stat(m['dist_sgd'])):.3f})"
            + (f"; the ADSAM step's Monte Carlo noise is {sum(noise) / len(noise):.3g} of its "
               "norm" if noise else "") + ".", lr=float(lr)))
    out += _verdict_sweep(results.get("sweep"))
    out += _verdict_scaling(results.get("scaling"))
    return out


def _verdict_sweep(sweep: dict | None) -> list[Verdict]:
    if not sweep or not sweep.get("rows"):
        return [missing("equivalence: Tr Xi grows like eta^2", "the lr sweep was not run.")]
    out = []
    finals = sweep_finals(sweep["rows"])
    for act in sorted({r["activation"] for r in finals}):
        rs = [r for r in finals if r["activation"] == act]
        slope, se, n = regression([r["lr"] for r in rs], [r["consensus"] for r in rs])
        out.append(verdict(
            f"equivalence: Tr Xi grows like eta^2 ({act} MLP)", 0.5 - abs(slope - 2.0), se, n,
            "effect = 0.5 - |slope - 2| for the log-log slope of Tr Xi against eta (every "
            "seed a point; se of the slope): reproduced when the slope is within 2 +- 0.5 "
            "beyond 2 se",
            f"slope {slope:.2f} ± {se:.2f} (theory: 2).", slope=slope))
    return out


def _verdict_scaling(scaling: dict | None) -> list[Verdict]:
    """Deviations scaled by s: res_sgd ~ s^2, res_2nd ~ s^3, res_adsam ~ s^3 above its noise."""
    claim = "equivalence: with the deviations scaled by s, res_2nd and res_adsam shrink a " \
            "power of s faster than res_sgd (s^3 vs s^2)"
    if not scaling or not scaling.get("rows"):
        return [missing(claim, "the deviation-scaling measurement was not run.")]
    rows = scaling["rows"]
    out = []
    for act in sorted({r["activation"] for r in rows}):
        rs = [r for r in rows if r["activation"] == act]
        ss = [r["s"] for r in rs]
        b_sgd, se_sgd, n = regression(ss, [r["res_sgd"] for r in rs])
        for key, name in (("res_2nd", "2nd-order form"), ("res_adsam", "ADSAM estimate")):
            above = [r for r in rs if finite(r.get(f"{key}_noise"))
                     and r[key] > Z * r[f"{key}_noise"]] if key == "res_adsam" else rs
            b, se, n = regression([r["s"] for r in above], [r[key] for r in above])
            if n < 3:  # measured, but too few points above the noise floor to fit a slope
                out.append({**missing(f"{claim} ({act} MLP, {name})", f"only {n} of "
                            f"{len(rs)} residuals are above twice their Monte Carlo noise."),
                            "status": "inconclusive", "n": n})
                continue
            out.append(verdict(
                f"{claim} ({act} MLP, {name})", b - b_sgd - 0.5, _quad(se, se_sgd), n,
                "effect = slope(res) - slope(res_sgd) - 0.5 (theory: 3 - 2 = 1) over the s "
                "values where the residual is above twice its Monte Carlo noise",
                f"slopes against s: res_sgd {b_sgd:.2f}, {key} {b:.2f} on {n} of {len(rs)} "
                "points.", slope=b, slope_sgd=b_sgd))
    return out


# ---------------------------------------------------------------- 4. uncertainty


def _paired(recs: Sequence[dict], kind: str, key: str) -> dict:
    """Per-run difference averaged(key) - kind(key): positive when ``kind`` is better."""
    return stat([r["averaged"][key] - r[kind][key] for r in recs
                 if finite(r["averaged"].get(key)) and finite(r[kind].get(key))])


def verdict_uncertainty(results: dict) -> list[Verdict]:
    protos = results.get("protocols") or []
    unc = results.get("uncertainty") or []
    if not protos or not unc:
        return [missing("uncertainty: the local models / Xi-posterior are better calibrated",
                        "no uncertainty measurement.")]
    large = protos[0]["batches"][1]
    out = []
    for phase in ("early", "final"):
        d = [u for u in unc if u["label"] != "C-SGD" and u["total_batch"] == large
             and u.get("phase", "final") == phase]
        c = [u for u in unc if u["label"] == "C-SGD" and u["total_batch"] == large
             and u.get("phase", "final") == phase]
        if not d:
            continue
        where = ("before the first lr decay" if phase == "early" else "at the end") + \
            f", total batch {large}"
        xi = stat([u.get("consensus") for u in d])
        spread = stat([u.get("prob_spread") for u in d])
        alive = (f"{d[0].get('members', '?')} local models, Tr Xi {mean_of(xi):.3g}, members' "
                 f"prediction spread {mean_of(spread):.3g}")
        for kind in ("ensemble", "posterior"):
            for key in ("nll", "ece"):
                s = _paired(d, kind, key)
                out.append(verdict(
                    f"uncertainty: D-SGD's {kind} has a lower {key.upper()} than its averaged "
                    f"model ({where})", mean_of(s), se_of(s), s["n"],
                    f"effect = averaged minus {kind} {key.upper()}, paired per D-SGD run "
                    "(all topologies and seeds), se over runs",
                    alive + ".", phase=phase))
        if c:
            for key in ("nll", "ece"):
                sc = stat([u["averaged"][key] for u in c])
                sd = stat([u["posterior"][key] for u in d])
                out.append(verdict(
                    f"uncertainty: D-SGD's Xi-posterior has a lower {key.upper()} than C-SGD "
                    f"({where})", mean_of(sc) - mean_of(sd), _quad(se_of(sc), se_of(sd)),
                    min(sc["n"], sd["n"]),
                    f"effect = C-SGD's minus D-SGD's posterior {key.upper()}, se over runs",
                    f"C-SGD {mean_of(sc):.4f}, D-SGD posterior {mean_of(sd):.4f}.",
                    phase=phase))
    return out


# ---------------------------------------------------------------- 5. trade-off


def tradeoff_points(results: dict) -> list[dict]:
    """Finished D-SGD runs of the main protocol at its small batch (every learning rate)."""
    protos = results.get("protocols") or []
    if not protos:
        return []
    main, small = protos[0]["name"], protos[0]["batches"][0]
    return [r for r in results.get("runs") or [] if r.get("status") == "finished"
            and r["label"] != "C-SGD" and finite(r.get("consensus_mean"))
            and finite(r.get("train_loss")) and r["total_batch"] == small
            and r.get("protocol", "") == main]


def verdict_tradeoff(results: dict) -> list[Verdict]:
    claim = "trade-off: at a fixed learning rate, a larger consensus distance goes with a " \
            "higher final train loss"
    pts = tradeoff_points(results)
    by_lr: dict[float, list[dict]] = {}
    for p in pts:
        by_lr.setdefault(p["lr"], []).append(p)
    rhos = {lr: (spearman([p["consensus_mean"] for p in ps], [p["train_loss"] for p in ps]),
                 len(ps)) for lr, ps in sorted(by_lr.items())}
    rhos = {lr: v for lr, v in rhos.items() if finite(v[0])}
    if not rhos:
        return [missing(claim, "fewer than 3 D-SGD runs at one learning rate.")]
    w = sum(n - 1 for _, n in rhos.values())
    rho = sum(r * (n - 1) for r, n in rhos.values()) / w
    pooled = spearman([p["consensus_mean"] for p in pts], [p["train_loss"] for p in pts])
    return [verdict(
        claim, rho, 1 / math.sqrt(w), sum(n for _, n in rhos.values()),
        "effect = the within-lr Spearman correlations averaged with weights n - 1; se = "
        "1 / sqrt(sum (n - 1)), the null std of that average",
        ", ".join(f"rho {r:+.2f} at lr {lr:g} (n={n})" for lr, (r, n) in rhos.items())
        + (f"; pooled over learning rates {pooled:+.2f} (n={len(pts)}, se "
           f"{spearman_se(len(pts)):.2f}), where a larger lr raises the consensus distance and "
           "speeds up optimization at once" if finite(pooled) else "") + ".")]


def verdicts(results: dict) -> list[Verdict]:
    """Every graded claim, computed from the records in ``results``."""
    return (verdict_large_batch(results) + verdict_sharpness(results)
            + verdict_equivalence(results) + verdict_uncertainty(results)
            + verdict_tradeoff(results))
