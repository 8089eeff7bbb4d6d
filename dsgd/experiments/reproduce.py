"""``dsgd reproduce``: the experiments of Zhu et al. (ICML 2023) end to end, into one report.

1. Large batch: C-SGD vs D-SGD (ring, grid, exponential) at a small and a large total batch
   with linearly scaled learning rates; the paper's shape is that C-SGD loses more accuracy
   than D-SGD when the total batch grows.
2. Sharpness: Hessian trace (Hutchinson) and top eigenvalue of the final averaged models of 1,
   and filter-normalized 2D loss surfaces of C-SGD vs D-SGD at the large batch.
3. Equivalence: D-SGD, centralized average-direction SAM with Sigma = Xi(t) of that D-SGD run
   and plain SGD in lockstep (distance to D-SGD's average over time), and the decomposition
   residuals against the learning rate (``dsgd.experiments.equivalence``).
4. Uncertainty: ECE/NLL of the averaged model, the local-model ensemble and the Xi-posterior,
   and of C-SGD; a reliability diagram.
5. Trade-off: consensus distance against final train loss and test accuracy over topologies and
   learning rates; local gradient-Lipschitz estimates along training (gradient smoothing).

Every training run has its own run directory under ``OUT/runs``; rerunning skips finished runs
and resumes interrupted ones. Each analysis writes ``OUT/analysis/<name>.json`` once (delete it
to recompute). ``OUT/results.json`` collects everything, and ``dsgd.experiments.reproduce_report``
turns it into ``OUT/REPORT.md`` with figures (no engine involved).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dsgd.errors import UserError
from dsgd.experiments import config as C
from dsgd.experiments.runner import ensure_run
from dsgd.report.runs import is_finished
from dsgd.report.tables import stat

# ---------------------------------------------------------------- scales


@dataclass(frozen=True)
class Scale:
    """What one ``--scale`` trains and measures. Batches are (per-worker batch, peak lr)."""

    name: str
    preset: str
    batches: tuple[tuple[int, float], ...]
    topologies: tuple[str, ...] = ("ring", "grid", "exponential")
    seeds: int = 3
    overrides: tuple[str, ...] = ()
    # trade-off: extra D-SGD learning rates at the small batch (first seed only)
    tradeoff_lrs: tuple[float, ...] = ()
    # sharpness / uncertainty / landscape measurements on the final checkpoints
    analysis_samples: int = 1024
    hutchinson_samples: int = 20
    power_iters: int = 20
    uncertainty_samples: int = 2000
    posterior_draws: int = 16
    landscape_steps: int = 15
    # equivalence: lr sweep (None: not run at this scale) and lockstep trajectories
    sweep_lrs: tuple[float, ...] | None = (0.4, 0.2, 0.1, 0.05, 0.025)
    sweep_steps: int = 200
    sweep_activations: tuple[str, ...] = ("relu", "tanh")
    sweep_seeds: int = 2
    lockstep_steps: int | None = 300
    lockstep_lrs: tuple[float, ...] = (0.2, 0.05)  # smoothness probes run at the first
    lockstep_seeds: int = 3
    lockstep_probe_every: int = 50
    lockstep_radius: float = 0.05
    probe_dirs: int = 8  # smoothness probes: random directions, Monte Carlo pairs
    probe_samples: int = 8
    sweep_samples: int = 16  # antithetic pairs of the ADSAM gradient in the decomposition
    needs_gpu: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


SCALES: dict[str, Scale] = {
    # about an hour on two busy CPU cores (the steps were sized by timing the engine first)
    "cpu": Scale(name="cpu", preset="cpu_fashion_mlp", batches=((16, 0.1), (128, 0.8)),
                 tradeoff_lrs=(0.05, 0.2, 0.4)),
    # the paper's CIFAR-10 ResNet-18 runs (GPU): 1024 = 16 x 64 at 0.1, 8192 = 16 x 512 at 0.8
    "paper": Scale(name="paper", preset="paper_cifar10_resnet18", batches=((64, 0.1),
                                                                           (512, 0.8)),
                   seeds=1, analysis_samples=2048, sweep_lrs=None, lockstep_steps=None,
                   needs_gpu=True),
}

# --quick: the cpu pipeline, same code path, on a few hundred samples and a few steps
QUICK = replace(
    SCALES["cpu"], name="quick", seeds=2, topologies=("ring",), tradeoff_lrs=(0.4,),
    overrides=("data.n_train=1024", "data.n_test=500", "train.steps=20",
               "train.warmup_steps=2", "train.milestones=[8, 16]", "log.eval_every=10",
               "log.checkpoint_every=10", "model.options={hidden = [32]}", "train.workers=8"),
    analysis_samples=256, hutchinson_samples=4, power_iters=5, uncertainty_samples=300,
    posterior_draws=4, landscape_steps=5, sweep_lrs=(0.4, 0.1), sweep_steps=10,
    sweep_activations=("relu", "tanh"), sweep_seeds=1, sweep_samples=4, lockstep_steps=12,
    lockstep_lrs=(0.2,), lockstep_seeds=2, lockstep_probe_every=6, probe_dirs=2,
    probe_samples=2)


def get_scale(name: str, quick: bool = False) -> Scale:
    if name not in SCALES:
        raise UserError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)}")
    if quick:
        return QUICK if name == "cpu" else replace(QUICK, name=f"{name}-quick")
    return SCALES[name]


# ---------------------------------------------------------------- the settings, as configs

PAPER_LABELS = {"csgd": "C-SGD", "ring": "D-SGD ring", "grid": "D-SGD grid",
                "exponential": "D-SGD exponential"}


def label_of(algorithm: str, topology: str) -> str:
    return PAPER_LABELS["csgd"] if algorithm == "csgd" else PAPER_LABELS.get(
        topology, f"D-SGD {topology}")


@dataclass(frozen=True)
class Setting:
    """One training run: its directory (relative to OUT/runs), label and config."""

    run: str
    experiment: str  # large_batch | tradeoff
    label: str
    total_batch: int
    lr: float
    seed: int
    cfg: C.Config


def settings(scale: Scale, seeds: int | None = None, extra: list[str] | None = None
             ) -> list[Setting]:
    """Every training run of ``scale``: validated configs, nothing trained."""
    seeds = scale.seeds if seeds is None else seeds
    base = C.load(scale.preset, [*scale.overrides, *(extra or [])])
    m, seed0 = base.train.workers, base.train.seed
    out: list[Setting] = []

    def add(experiment: str, algorithm: str, topology: str, batch: int, lr: float, seed: int,
            run: str) -> None:
        cfg = C.from_dict(C.apply_overrides(C.to_dict(base), [
            f"train.algorithm={algorithm}", f"train.topology={topology}",
            f"train.batch_size={batch}", f"train.lr={float(lr)!r}", f"train.seed={seed}",
            f'name="{run.replace("/", "_")}"']))
        out.append(Setting(run, experiment, label_of(algorithm, topology), m * batch, lr, seed,
                           cfg))

    algos = [("csgd", base.train.topology)] + [("dsgd", t) for t in scale.topologies]
    for batch, lr in scale.batches:
        for algorithm, topology in algos:
            tag = "csgd" if algorithm == "csgd" else f"dsgd-{topology}"
            for i in range(seeds):
                add("large_batch", algorithm, topology, batch, lr, seed0 + i,
                    f"large_batch/{tag}-b{m * batch}/s{seed0 + i}")
    batch, lr0 = scale.batches[0]
    for lr in scale.tradeoff_lrs:
        if math.isclose(lr, lr0):
            continue
        for topology in scale.topologies:
            add("tradeoff", "dsgd", topology, batch, lr, seed0,
                f"tradeoff/dsgd-{topology}-lr{lr:g}/s{seed0}")
    return out


# ---------------------------------------------------------------- training, resumable


def _read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_engine(run_dir: Path):
    """The engine of a finished run, from ``checkpoints/last.pt`` (weights_only load)."""
    from dsgd.experiments.runner import build

    cfg = C.from_dict(json.loads((run_dir / "config.json").read_text()))
    setup = build(cfg)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True,
                       map_location="cpu")
    setup.engine.load_state_dict(state["engine"])
    return setup


def _cached(path: Path, compute: Callable[[], Any]) -> Any:
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


# ---------------------------------------------------------------- measurements on checkpoints


def _fixed(setup, n: int):
    ds, dev = setup.dataset, setup.engine.w.device
    n = min(n, len(ds.y_train))
    return ds.x_train[:n].to(dev), ds.y_train[:n].to(dev)


def sharpness(setup, scale: Scale, seed: int = 0) -> dict[str, float]:
    """Hutchinson trace, top eigenvalue and Tr(H Xi) of the final averaged model."""
    from dsgd.experiments.instruments import averaged_loss
    from dsgd.experiments.instruments import sharpness as measure_sharpness

    loss_fn, w = averaged_loss(setup.engine, *_fixed(setup, scale.analysis_samples))
    out = measure_sharpness(loss_fn, w, setup.engine.params, samples=scale.hutchinson_samples,
                            iters=scale.power_iters, generator=torch.Generator().manual_seed(seed))
    return {**out, "train_loss_fixed": float(loss_fn(w))}


def landscape(setup, scale: Scale, seed: int = 0) -> dict[str, Any]:
    """Filter-normalized 2D loss surface around the final averaged model (Li et al. 2018)."""
    from dsgd.experiments.instruments import averaged_loss
    from dsgd.metrics.landscape import surface_2d

    loss_fn, w = averaged_loss(setup.engine, *_fixed(setup, scale.analysis_samples))
    a, b, Z = surface_2d(loss_fn, w, steps=scale.landscape_steps, span=1.0,
                         generator=torch.Generator().manual_seed(seed))
    return {"alphas": a.tolist(), "betas": b.tolist(), "Z": Z.tolist()}


def uncertainty(setup, scale: Scale, seed: int = 0) -> dict[str, Any]:
    """ECE/NLL/accuracy and reliability curves of the averaged model, the local-model ensemble
    and the Xi-posterior N(w_a, Xi) on the first test samples."""
    from dsgd.metrics.uncertainty import (
        averaged_probs,
        ensemble_probs,
        posterior_probs,
        reliability_curve,
        summarize,
    )

    e, ds = setup.engine, setup.dataset
    k = min(scale.uncertainty_samples, len(ds.y_test))
    x, y = ds.x_test[:k].to(e.w.device), ds.y_test[:k].to(e.w.device)
    gen = torch.Generator().manual_seed(seed)
    probs = {"averaged": averaged_probs(e.model, e.params, e.buffers, x),
             "ensemble": ensemble_probs(e.model, e.params, e.buffers, x),
             "posterior": posterior_probs(e.model, e.params, x, scale.posterior_draws, gen,
                                          stacked_buffers=e.buffers)}
    out: dict[str, Any] = {}
    for kind, p in probs.items():
        conf, acc, count = reliability_curve(p, y)
        out[kind] = {**summarize(p, y), "curve": {
            "conf": [None if math.isnan(v) else v for v in conf.tolist()],
            "acc": [None if math.isnan(v) else v for v in acc.tolist()],
            "count": count.tolist()}}
    return out


def lockstep_run(scale: Scale, base: C.Config, seed: int, lr: float,
                 probes: bool = True) -> list[dict[str, float]]:
    """Experiment 3 for one seed and constant learning rate ``lr``: D-SGD / ADSAM(Xi(t)) / SGD
    in lockstep, with smoothness probes every ``lockstep_probe_every`` steps if ``probes``."""
    from dsgd.experiments.equivalence import lockstep, smoothness_probe
    from dsgd.experiments.runner import build
    from dsgd.topology import make_topology

    batch, _ = scale.batches[0]
    cfg = C.from_dict(C.apply_overrides(C.to_dict(base), [
        "train.algorithm=dsgd", f"train.batch_size={batch}", f"train.seed={seed}"]))
    setup = build(cfg)
    e, t = setup.engine, cfg.train
    model = e.module(e.average_state())
    topo = make_topology(t.topology, t.workers, shuffle=t.shuffle_topology, seed=seed)

    def batches():
        while True:
            yield setup.loader.next_batch()

    x, y = _fixed(setup, min(scale.analysis_samples, 512))
    probe = smoothness_probe(x, y, radius=scale.lockstep_radius, num_dirs=scale.probe_dirs,
                             num_samples=scale.probe_samples, seed=seed)
    return lockstep(model, topo, batches(), lr=lr, steps=scale.lockstep_steps,
                    strategy=t.strategy, seed=seed,
                    record_every=max(1, scale.lockstep_steps // 60),
                    probe=probe if probes else None, probe_every=scale.lockstep_probe_every)


# ---------------------------------------------------------------- collecting results


def _run_record(s: Setting, run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text()) if (
        run_dir / "summary.json").is_file() else {}
    rows = _read_rows(run_dir)
    final = summary.get("final") or (rows[-1] if rows else {})
    cons = [r["consensus"] for r in rows if "consensus" in r]
    return {"run": s.run, "experiment": s.experiment, "label": s.label,
            "total_batch": s.total_batch, "lr": s.lr, "seed": s.seed,
            "status": summary.get("status", "missing"),
            "test_acc": 100 * final["test_acc"] if "test_acc" in final else None,
            "train_loss": final.get("train_loss"),
            "consensus_final": final.get("consensus"),
            "consensus_mean": sum(cons) / len(cons) if cons else None,
            "wall_time": summary.get("wall_time")}


def group_stats(records: list[dict], keys: list[str]) -> list[dict[str, Any]]:
    """mean ± std (sample std, dsgd.report.tables.stat) over seeds per (label, total_batch)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["label"], r["total_batch"], r["lr"]), []).append(r)
    return [{"label": lab, "total_batch": tb, "lr": lr, "n": len(rs),
             "statuses": sorted({r["status"] for r in rs}),
             **{k: stat([r.get(k) for r in rs]) for k in keys}}
            for (lab, tb, lr), rs in groups.items()]


def reproduce(out: str | Path, scale: Scale, *, seeds: int | None = None,
              extra: list[str] | None = None, log: Callable[[str], None] = print,
              force: bool = False) -> Path:
    """Run (or resume) every experiment of ``scale`` into ``out``; write the report."""
    from dsgd.experiments import reproduce_report

    out = Path(out)
    plan = settings(scale, seeds, extra)
    if scale.needs_gpu and not torch.cuda.is_available() and not force:
        data_dir = plan[0].cfg.data.dir
        where = f"; data dir {data_dir}" if data_dir else ""
        raise UserError(f"--scale {scale.name} is {len(plan)} runs of "
                        f"{plan[0].cfg.train.steps} steps ({plan[0].cfg.model.name}, "
                        f"{plan[0].cfg.train.workers} workers{where}): configs validated, but "
                        "no CUDA GPU here, so nothing was trained (pass --force to train on "
                        "the CPU anyway)")
    if scale.needs_gpu and not torch.cuda.is_available():
        plan = [replace(s, cfg=C.from_dict(C.apply_overrides(C.to_dict(s.cfg), ["device=cpu"])))
                for s in plan]
    started = time.perf_counter()
    runs = out / "runs"
    records = []
    for i, s in enumerate(plan):
        run_dir = runs / s.run
        t0 = time.perf_counter()
        summary = ensure_run(s.cfg, run_dir)
        acc = (summary.get("final") or {}).get("test_acc")
        log(f"[{i + 1}/{len(plan)}] {s.run}: {summary.get('status')}"
            + (f", test acc {100 * acc:.2f}%" if acc is not None else "")
            + f" ({time.perf_counter() - t0:.0f} s)")
        records.append(_run_record(s, run_dir))

    analysis = out / "analysis"
    lb = [s for s in plan if s.experiment == "large_batch"]
    finished = {s.run for s in plan if is_finished(runs / s.run)}
    large = max(s.total_batch for s in lb)
    small = min(s.total_batch for s in lb)

    first_seed = min(s.seed for s in lb)
    landscapes = {(lab, tb) for lab in ("C-SGD", "D-SGD ring") for tb in (large, small)}
    measures = {"sharpness": sharpness, "uncertainty": uncertainty, "landscape": landscape}
    sharp, unc, surfaces = [], [], {}
    log("sharpness, loss landscapes and uncertainty of the final averaged models")
    for s in lb:
        if s.run not in finished:
            continue
        wanted = ["sharpness", "uncertainty"]
        if s.seed == first_seed and (s.label, s.total_batch) in landscapes:
            wanted.append("landscape")
        paths = {k: analysis / k / f"{s.run.replace('/', '_')}.json" for k in wanted}
        setup = None
        if not all(p.is_file() for p in paths.values()):
            setup = load_engine(runs / s.run)  # one build per run for every measurement
        v = {k: _cached(p, lambda k=k, setup=setup, s=s: measures[k](setup, scale, s.seed))
             for k, p in paths.items()}
        sharp.append({"label": s.label, "total_batch": s.total_batch, "lr": s.lr,
                      "seed": s.seed, "status": "finished", **v["sharpness"]})
        unc.append({"label": s.label, "total_batch": s.total_batch, "seed": s.seed,
                    "run": s.run, **v["uncertainty"]})
        if "landscape" in v:
            surfaces[f"{s.label}, total batch {s.total_batch}"] = v["landscape"]
    order = [f"{lab}, total batch {tb}" for tb in (large, small)
             for lab in ("C-SGD", "D-SGD ring")]
    surfaces = {k: surfaces[k] for k in order if k in surfaces}

    base = C.load(scale.preset, [*scale.overrides, *(extra or [])])
    lock: dict[str, list] = {}
    if scale.lockstep_steps:
        log("lockstep trajectories: D-SGD, ADSAM with Sigma = Xi(t), SGD")
        for k, lr in enumerate(scale.lockstep_lrs):
            seeds_ = [base.train.seed + i for i in range(scale.lockstep_seeds)]
            lock[f"{lr:g}"] = [_cached(
                analysis / "lockstep" / f"lr{lr:g}_seed{sd}.json",
                lambda sd=sd, lr=lr, k=k: lockstep_run(scale, base, sd, lr, probes=k == 0))
                for sd in seeds_]
    sweep = None
    if scale.sweep_lrs:
        from dsgd.experiments.equivalence import lr_sweep, write_sweep

        log("learning-rate sweep of the decomposition residuals")
        rows = []
        batch, _ = scale.batches[0]
        sweep_base = C.from_dict(C.apply_overrides(C.to_dict(base),
                                                   [f"train.batch_size={batch}"]))
        for act in scale.sweep_activations:
            rows += _cached(analysis / "sweep" / f"{act}.json", lambda act=act: lr_sweep(
                sweep_base, scale.sweep_lrs, steps=scale.sweep_steps, activation=act,
                seeds=[base.train.seed + i for i in range(scale.sweep_seeds)],
                eval_samples=scale.analysis_samples, num_samples=scale.sweep_samples,
                log=log))
        sweep = write_sweep(rows, analysis / "sweep")

    results = {
        "scale": scale.name, "preset": scale.preset, "seeds": seeds or scale.seeds,
        "base_config": C.to_dict(base), "batches": [small, large],
        "lrs": {str(s.total_batch): s.lr for s in lb},
        "runs": records,
        "large_batch": group_stats([r for r in records if r["experiment"] == "large_batch"],
                                   ["test_acc", "train_loss", "consensus_mean", "wall_time"]),
        "sharpness": group_stats(sharp, ["hessian_trace", "top_eigenvalue", "xi_trace",
                                         "train_loss_fixed"]),
        "landscape": surfaces,
        "uncertainty": unc,
        "lockstep": next(iter(lock.values())) if lock else None,  # the first lr, with probes
        "lockstep_by_lr": lock or None,
        "lockstep_settings": {"lr": scale.lockstep_lrs[0], "lrs": list(scale.lockstep_lrs),
                              "steps": scale.lockstep_steps,
                              "total_batch": base.train.workers * scale.batches[0][0],
                              "topology": base.train.topology,
                              "radius": scale.lockstep_radius},
        "sweep": sweep,
        "wall_time": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    path = reproduce_report.write_report(results, out)
    log(f"report: {path}")
    return path


def _status(run_dir: Path) -> str:
    p = run_dir / "summary.json"
    return json.loads(p.read_text()).get("status", "?") if p.is_file() else "missing"
