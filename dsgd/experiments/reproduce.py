"""``dsgd reproduce``: the experiments of Zhu et al. (ICML 2023) end to end, into one report.

1. Large batch: C-SGD vs D-SGD (ring, grid, exponential) at a small and a large total batch
   with linearly scaled learning rates, in one or more protocols (data, model, schedule); the
   paper's shape is that C-SGD loses accuracy at the large batch, and more than D-SGD.
   Single-seed probes (other batches, schedules) are run and reported, not graded.
2. Sharpness: Hessian trace (Hutchinson) and top eigenvalue of the final averaged models of
   the main protocol, and filter-normalized 2D loss surfaces of C-SGD vs D-SGD.
3. Equivalence: D-SGD, centralized average-direction SAM with Sigma = Xi(t) of that D-SGD run
   and plain SGD in lockstep (distance to D-SGD's average over time, and the ADSAM arm's Monte
   Carlo noise), the decomposition residuals against the learning rate, and against a scaling
   s of the deviations (``dsgd.experiments.equivalence``).
4. Uncertainty: ECE/NLL of the averaged model, the local-model ensemble and the Xi-posterior,
   and of C-SGD, before the first lr decay (where Xi is alive) and at the end, with the number
   of local models, Tr Xi and the spread of their predictions.
5. Trade-off: consensus distance against final train loss over topologies and learning rates;
   local gradient-Lipschitz estimates along training (gradient smoothing).

Every training run has its own run directory under ``OUT/runs``; rerunning skips finished runs
and resumes interrupted ones. Each analysis writes ``OUT/analysis/<name>.json`` once (delete it
to recompute). This module computes only: ``OUT/results.json`` holds JSON-ready per-run records
and rows, and ``dsgd.report.reproduction`` turns that file into ``OUT/REPORT.md``,
``OUT/verdicts.json`` and the figures (statistics, verdicts and markdown live there).
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

# ---------------------------------------------------------------- scales


@dataclass(frozen=True)
class Protocol:
    """A further large-batch protocol: the scale's preset with ``overrides``, C-SGD and D-SGD
    on ``topologies`` at each (per-worker batch, peak lr) of ``batches``, ``seeds`` seeds.
    ``graded``: its verdicts count; a probe (``graded=False``) is reported only."""

    name: str
    title: str
    batches: tuple[tuple[int, float], ...]
    overrides: tuple[str, ...] = ()
    topologies: tuple[str, ...] = ("ring", "grid", "exponential")
    seeds: int = 3
    graded: bool = True
    preset: str | None = None  # None: the scale's


@dataclass(frozen=True)
class Scale:
    """What one ``--scale`` trains and measures. Batches are (per-worker batch, peak lr); the
    main protocol is (preset, overrides, batches, topologies, seeds), ``protocols`` more."""

    name: str
    preset: str
    batches: tuple[tuple[int, float], ...]
    topologies: tuple[str, ...] = ("ring", "grid", "exponential")
    seeds: int = 3
    overrides: tuple[str, ...] = ()
    title: str = "main"  # the main protocol's name
    description: str = ""  # and what it is
    protocols: tuple[Protocol, ...] = ()
    # trade-off: extra D-SGD learning rates at the small batch (first seed only)
    tradeoff_lrs: tuple[float, ...] = ()
    # sharpness / uncertainty / landscape measurements on the final checkpoints
    analysis_samples: int = 1024
    hutchinson_samples: int = 20
    power_iters: int = 20
    uncertainty_samples: int = 2000
    posterior_draws: int = 16
    early_uncertainty: bool = True  # also before the first lr decay (dedicated prefix runs)
    landscape_steps: int = 15
    # equivalence: lr sweep (None: not run at this scale) and lockstep trajectories
    sweep_lrs: tuple[float, ...] | None = (0.4, 0.2, 0.1, 0.05, 0.025)
    sweep_steps: int = 200
    sweep_activations: tuple[str, ...] = ("relu", "tanh")
    sweep_seeds: int = 2
    sweep_samples: int = 16  # antithetic pairs of the ADSAM gradient (with control variate)
    scaling_scales: tuple[float, ...] | None = (1.0, 0.5, 0.25, 0.125, 0.0625)
    scaling_lr: float = 0.1
    scaling_steps: int = 200
    scaling_samples: int = 64
    lockstep_steps: int | None = 300
    lockstep_lrs: tuple[float, ...] = (0.2, 0.05)  # smoothness probes run at the first
    lockstep_seeds: int = 3
    lockstep_samples: int = 8  # draws per worker and step of the ADSAM arm (4 pairs)
    lockstep_probe_every: int = 50
    lockstep_radius: float = 0.05
    probe_dirs: int = 8  # smoothness probes: random directions, Monte Carlo pairs
    probe_samples: int = 8
    needs_gpu: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def all_protocols(self) -> tuple[Protocol, ...]:
        """The main protocol first, then the others."""
        main = Protocol(self.title, self.description or f"preset {self.preset}",
                        self.batches, self.overrides, self.topologies, self.seeds, True,
                        self.preset)
        return (main, *self.protocols)


# The closest CPU-scale setting to the paper's shape found by probing: 4096 training samples,
# 2000 steps, a 10% warmup, total batch 256 at lr 0.05 vs 2048 at lr 0.4.
N4096 = Protocol(
    "n4096", "Fashion-MNIST, 4096 training samples, 2000 steps (warmup 200, milestones "
    "1000/1500), total batch 256 (lr 0.05) vs 2048 (lr 0.4)",
    ((16, 0.05), (128, 0.4)),
    ("data.n_train=4096", "train.steps=2000", "train.warmup_steps=200",
     "train.milestones=[1000, 1500]", "log.eval_every=250", "log.checkpoint_every=500"))


def _probe(name: str, batches, steps: int, warmup: int, milestones: tuple[int, int],
           seeds: int = 1) -> Protocol:
    return Protocol(
        name, f"{steps} steps, warmup {warmup}, milestones {milestones[0]}/{milestones[1]}",
        batches, (f"train.steps={steps}", f"train.warmup_steps={warmup}",
                  f"train.milestones=[{milestones[0]}, {milestones[1]}]",
                  f"log.eval_every={max(10, steps // 8)}",
                  f"log.checkpoint_every={max(10, steps // 4)}"),
        ("ring",), seeds, graded=False)


# Larger total batches and longer training on the full data set, one seed (three for the last):
# where the large-batch shape was looked for and not found (divergence, not a drop).
CPU_PROBES = (
    _probe("probe-b4096", ((256, 1.6),), 600, 30, (240, 480)),
    _probe("probe-b3072", ((192, 1.2),), 600, 30, (240, 480)),
    _probe("probe-b2048-w6", ((128, 0.8),), 600, 6, (240, 480)),
    _probe("probe-long-w20", ((16, 0.1), (128, 0.8)), 2000, 20, (800, 1600)),
    _probe("probe-long-w30", ((16, 0.1), (128, 0.8)), 2000, 30, (800, 1600), seeds=3),
)

SCALES: dict[str, Scale] = {
    # the main protocol: the full Fashion-MNIST training set, 600 steps
    "cpu": Scale(name="cpu", preset="cpu_fashion_mlp", batches=((16, 0.1), (128, 0.8)),
                 title="full", description="Fashion-MNIST, all 60000 training samples, 600 "
                 "steps (warmup 30, milestones 240/480), total batch 256 (lr 0.1) vs 2048 "
                 "(lr 0.8)", protocols=(N4096, *CPU_PROBES), tradeoff_lrs=(0.05, 0.2, 0.4)),
    # a BatchNorm conv net at the paper's batches and iterations (GPU): resnet20 on
    # Fashion-MNIST, 1024 = 16 x 64 at lr 0.1 vs 8192 = 16 x 512 at lr 0.8
    "gpu": Scale(name="gpu", preset="gpu_fashion_resnet20", batches=((64, 0.1), (512, 0.8)),
                 title="resnet20", description="resnet20 (BatchNorm) on Fashion-MNIST, 6000 "
                 "steps (warmup 200, milestones 2400/4800), total batch 1024 (lr 0.1) vs 8192 "
                 "(lr 0.8)", seeds=1, analysis_samples=2048, sweep_lrs=None,
                 scaling_scales=None, lockstep_steps=None, needs_gpu=True),
    # the paper's CIFAR-10 ResNet-18 runs (GPU): 1024 = 16 x 64 at 0.1, 8192 = 16 x 512 at 0.8
    "paper": Scale(name="paper", preset="paper_cifar10_resnet18", batches=((64, 0.1),
                                                                           (512, 0.8)),
                   title="resnet18", description="the paper's CIFAR-10 ResNet-18, 6000 steps, "
                   "total batch 1024 (lr 0.1) vs 8192 (lr 0.8)", seeds=1,
                   analysis_samples=2048, sweep_lrs=None,
                   scaling_scales=None, lockstep_steps=None, needs_gpu=True),
}

_QUICK_RUN = ("train.warmup_steps=2", "train.milestones=[8, 16]", "log.eval_every=10",
              "log.checkpoint_every=10")
# --quick: the cpu pipeline, same code path, on a few hundred samples and a few steps
QUICK = replace(
    SCALES["cpu"], name="quick", description="full at --quick: 1024 training samples, 20 "
    "steps, MLP 32, 8 workers", seeds=2, topologies=("ring",), tradeoff_lrs=(0.4,),
    overrides=("data.n_train=1024", "data.n_test=500", "train.steps=20", *_QUICK_RUN,
               "model.options={hidden = [32]}", "train.workers=8"),
    protocols=(replace(N4096, title="n4096 at --quick: 512 training samples, 20 steps",
                       topologies=("ring",), seeds=2, batches=((4, 0.05), (16, 0.4)),
                       overrides=("data.n_train=512", "train.steps=20", *_QUICK_RUN)),
               replace(CPU_PROBES[0], title="probe at --quick: 12 steps", batches=((32, 1.6),),
                       overrides=("train.steps=12", *_QUICK_RUN))),
    analysis_samples=256, hutchinson_samples=4, power_iters=5, uncertainty_samples=300,
    posterior_draws=4, landscape_steps=5, sweep_lrs=(0.4, 0.1), sweep_steps=10,
    sweep_activations=("relu", "tanh"), sweep_seeds=1, sweep_samples=4,
    scaling_scales=(1.0, 0.5, 0.25), scaling_steps=10, scaling_samples=8, lockstep_steps=12,
    lockstep_lrs=(0.2,), lockstep_seeds=2, lockstep_samples=2, lockstep_probe_every=6,
    probe_dirs=2, probe_samples=2)


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
    experiment: str  # large_batch | tradeoff | probe | early
    protocol: str
    label: str
    total_batch: int
    lr: float
    seed: int
    cfg: C.Config


def _with(cfg: C.Config, overrides: list[str]) -> C.Config:
    return C.with_overrides(cfg, overrides)


def settings(scale: Scale, seeds: int | None = None, extra: list[str] | None = None
             ) -> list[Setting]:
    """Every training run of ``scale``: validated configs, nothing trained. ``seeds`` caps
    the seeds of every protocol."""
    out: list[Setting] = []
    protocols = scale.all_protocols()
    main = protocols[0]
    for proto in protocols:
        base = C.load(proto.preset or scale.preset,
                      [*scale.overrides, *(proto.overrides if proto is not main else ()),
                       *(extra or [])])
        m, seed0 = base.train.workers, base.train.seed
        n_seeds = min(proto.seeds, seeds) if seeds is not None else proto.seeds
        prefix = "large_batch" if proto is main else proto.name
        experiment = "large_batch" if proto.graded else "probe"

        def add(experiment: str, algorithm: str, topology: str, batch: int, lr: float,
                seed: int, run: str, base=base, m=m, proto=proto) -> None:
            cfg = _with(base, [
                f"train.algorithm={algorithm}", f"train.topology={topology}",
                f"train.batch_size={batch}", f"train.lr={float(lr)!r}", f"train.seed={seed}",
                f'name="{run.replace("/", "_")}"'])
            out.append(Setting(run, experiment, proto.name, label_of(algorithm, topology),
                               m * batch, lr, seed, cfg))

        algos = [("csgd", base.train.topology)] + [("dsgd", t) for t in proto.topologies]
        for batch, lr in proto.batches:
            for algorithm, topology in algos:
                tag = "csgd" if algorithm == "csgd" else f"dsgd-{topology}"
                for i in range(n_seeds):
                    add(experiment, algorithm, topology, batch, lr, seed0 + i,
                        f"{prefix}/{tag}-b{m * batch}/s{seed0 + i}")
        if proto is not main:
            continue
        batch, lr0 = proto.batches[0]
        for lr in scale.tradeoff_lrs:
            if math.isclose(lr, lr0):
                continue
            for topology in proto.topologies:
                add("tradeoff", "dsgd", topology, batch, lr, seed0,
                    f"tradeoff/dsgd-{topology}-lr{lr:g}/s{seed0}")
    return out


def early_settings(scale: Scale, plan: list[Setting]) -> list[Setting]:
    """Prefix runs of the main protocol's large-batch settings that stop at its first lr
    decay: the same schedule up to that step (warmup, then the peak lr; no milestone reached),
    so Xi is measured before the decays shrink it."""
    if not scale.early_uncertainty:
        return []
    main = scale.title
    lb = [s for s in plan if s.experiment == "large_batch" and s.protocol == main]
    if not lb:
        return []
    large = max(s.total_batch for s in lb)
    out = []
    for s in lb:
        t = s.cfg.train
        if s.total_batch != large or not t.milestones or t.schedule != "multistep":
            continue
        stop = min(t.milestones)
        run = "early/" + s.run.removeprefix("large_batch/")
        cfg = _with(s.cfg, [f"train.steps={stop}", "train.milestones=[]",
                            f"log.checkpoint_every={stop}", f"log.eval_every={stop}",
                            f'name="{run.replace("/", "_")}"'])
        out.append(replace(s, run=run, experiment="early", cfg=cfg))
    return out


# ---------------------------------------------------------------- training, resumable


def _read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary(run_dir: Path) -> dict:
    p = run_dir / "summary.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def run_finished(run_dir: Path) -> bool:
    """Whether a run counts as finished: the one place that decides it (its checkpoint is then
    measured and its record enters the statistics)."""
    return is_finished(run_dir)


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


def sharpness_record(setup, scale: Scale, seed: int = 0) -> dict[str, float]:
    """Hutchinson trace (and its se), top eigenvalue and Tr(H Xi) of the final averaged model,
    and its loss, on the first ``analysis_samples`` training samples."""
    from dsgd.experiments.instruments import averaged_loss, sharpness

    loss_fn, w = averaged_loss(setup.engine, *_fixed(setup, scale.analysis_samples))
    out = sharpness(loss_fn, w, setup.engine.params, samples=scale.hutchinson_samples,
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
    and the Xi-posterior N(w_a, Xi) on the first test samples; the number of local models,
    Tr Xi and the spread of the members' predictions (``member_spread``)."""
    from dsgd.metrics.consensus import consensus_distance
    from dsgd.metrics.uncertainty import (
        averaged_probs,
        ensemble_probs,
        member_spread,
        posterior_probs,
        reliability_curve,
        summarize,
    )

    e, ds = setup.engine, setup.dataset
    k = min(scale.uncertainty_samples, len(ds.y_test))
    x, y = ds.x_test[:k].to(e.w.device), ds.y_test[:k].to(e.w.device)
    gen = torch.Generator().manual_seed(seed)
    probs = {"averaged": averaged_probs(e.model, e.params, e.worker_buffers, x),
             "ensemble": ensemble_probs(e.model, e.params, e.worker_buffers, x),
             "posterior": posterior_probs(e.model, e.params, x, scale.posterior_draws, gen,
                                          stacked_buffers=e.worker_buffers)}
    out: dict[str, Any] = {**member_spread(e.model, e.params, e.worker_buffers, x),
                           "consensus": consensus_distance(e.params)}
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
    in lockstep (``lockstep_samples`` draws per worker and step for ADSAM), with the ADSAM
    arm's Monte Carlo noise every ``lockstep_probe_every`` steps and, if ``probes``, the
    smoothness probes."""
    from dsgd.experiments.equivalence import adsam_noise_probe, lockstep, smoothness_probe
    from dsgd.experiments.runner import build
    from dsgd.topology import make_topology

    batch, _ = scale.batches[0]
    cfg = _with(base, ["train.algorithm=dsgd", f"train.batch_size={batch}",
                       f"train.seed={seed}"])
    setup = build(cfg)
    e, t = setup.engine, cfg.train
    model = e.module(e.average_state())
    topo = make_topology(t.topology, t.workers, shuffle=t.shuffle_topology, seed=seed)

    def batches():
        while True:
            yield setup.loader.next_batch()

    x, y = _fixed(setup, min(scale.analysis_samples, 512))
    pairs = max(1, scale.lockstep_samples // 2)
    noise = adsam_noise_probe(x, y, pairs=pairs, seed=seed)
    smooth = smoothness_probe(x, y, radius=scale.lockstep_radius, num_dirs=scale.probe_dirs,
                              num_samples=scale.probe_samples, seed=seed)

    def probe(engines, step):
        return {**noise(engines, step), **(smooth(engines, step) if probes else {})}

    return lockstep(model, topo, batches(), lr=lr, steps=scale.lockstep_steps,
                    num_samples=2 * pairs, strategy=t.strategy, seed=seed,
                    record_every=max(1, scale.lockstep_steps // 60), probe=probe,
                    probe_every=scale.lockstep_probe_every)


# ---------------------------------------------------------------- collecting results


def _last(rows: list[dict], key: str) -> tuple[float | None, int | None]:
    """The last finite value of ``key`` in the metric rows, and its step."""
    for r in reversed(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            return float(v), r.get("step")
    return None, None


def _run_record(s: Setting, run_dir: Path) -> dict[str, Any]:
    """One run as a JSON-ready record (accuracies in percent); a diverged run keeps its last
    evaluation, with its status saying it diverged (the report excludes it)."""
    summary = _summary(run_dir)
    rows = _read_rows(run_dir)
    final = summary.get("final") or (rows[-1] if rows else {})
    cons = [r["consensus"] for r in rows if "consensus" in r]
    last_acc, last_step = _last(rows, "test_acc")
    t = s.cfg.train
    steps_done = summary.get("steps")
    wall = summary.get("wall_time")

    def pct(v):
        return 100 * v if isinstance(v, (int, float)) else None

    return {"run": s.run, "experiment": s.experiment, "protocol": s.protocol,
            "label": s.label, "total_batch": s.total_batch, "lr": s.lr, "seed": s.seed,
            "status": summary.get("status", "missing"), "message": summary.get("message"),
            "steps": t.steps, "warmup_steps": t.warmup_steps, "milestones": t.milestones,
            "steps_done": steps_done,
            "test_acc": pct(final.get("test_acc")), "train_acc": pct(final.get("train_acc")),
            "train_loss": final.get("train_loss"),
            "last_test_acc": pct(last_acc), "last_eval_step": last_step,
            "consensus_final": final.get("consensus"),
            "consensus_mean": sum(cons) / len(cons) if cons else None,
            "wall_time": wall,
            "time_per_step": wall / steps_done if wall and steps_done else None}


def _train(plan: list[Setting], runs: Path, log: Callable[[str], None]) -> list[dict]:
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
    return records


def _measure(scale: Scale, plan: list[Setting], runs: Path, analysis: Path,
             log: Callable[[str], None]) -> tuple[list, list, dict]:
    """Sharpness and uncertainty of every finished main-protocol large-batch run (and of the
    early prefix runs), landscapes of the first seed's C-SGD and D-SGD ring."""
    lb = [s for s in plan if s.experiment in ("large_batch", "early")
          and s.protocol == scale.title]
    if not lb:
        return [], [], {}
    large = max(s.total_batch for s in lb)
    small = min(s.total_batch for s in lb)
    first_seed = min(s.seed for s in lb)
    landscapes = {(lab, tb) for lab in ("C-SGD", "D-SGD ring") for tb in (large, small)}
    measures = {"sharpness": sharpness_record, "uncertainty": uncertainty,
                "landscape": landscape}
    sharp, unc, surfaces = [], [], {}
    log("sharpness, loss landscapes and uncertainty of the averaged models")
    for s in lb:
        if not run_finished(runs / s.run):
            continue
        early = s.experiment == "early"
        wanted = ["uncertainty"] if early else ["sharpness", "uncertainty"]
        if not early and s.seed == first_seed and (s.label, s.total_batch) in landscapes:
            wanted.append("landscape")
        paths = {k: analysis / k / f"{s.run.replace('/', '_')}.json" for k in wanted}
        setup = None
        if not all(p.is_file() for p in paths.values()):
            setup = load_engine(runs / s.run)  # one build per run for every measurement
        v = {k: _cached(p, lambda k=k, setup=setup, s=s: measures[k](setup, scale, s.seed))
             for k, p in paths.items()}
        key = {"label": s.label, "total_batch": s.total_batch, "lr": s.lr, "seed": s.seed,
               "run": s.run, "protocol": s.protocol}
        if "sharpness" in v:
            sharp.append({**key, **v["sharpness"]})
        unc.append({**key, "phase": "early" if early else "final",
                    "step": s.cfg.train.steps, **v["uncertainty"]})
        if "landscape" in v:
            surfaces[f"{s.label}, total batch {s.total_batch}"] = v["landscape"]
    order = [f"{lab}, total batch {tb}" for tb in (large, small)
             for lab in ("C-SGD", "D-SGD ring")]
    return sharp, unc, {k: surfaces[k] for k in order if k in surfaces}


def _equivalence(scale: Scale, base: C.Config, analysis: Path, log: Callable[[str], None]
                 ) -> tuple[dict, dict | None, dict | None]:
    from dsgd.experiments.equivalence import deviation_scaling, lr_sweep

    lock: dict[str, list] = {}
    if scale.lockstep_steps:
        log("lockstep trajectories: D-SGD, ADSAM with Sigma = Xi(t), SGD")
        for k, lr in enumerate(scale.lockstep_lrs):
            seeds_ = [base.train.seed + i for i in range(scale.lockstep_seeds)]
            lock[f"{lr:g}"] = [_cached(
                analysis / "lockstep" / f"lr{lr:g}_seed{sd}_k{scale.lockstep_samples}.json",
                lambda sd=sd, lr=lr, k=k: lockstep_run(scale, base, sd, lr, probes=k == 0))
                for sd in seeds_]
    batch, _ = scale.batches[0]
    small = _with(base, [f"train.batch_size={batch}"])
    sweep = None
    if scale.sweep_lrs:
        log("learning-rate sweep of the decomposition residuals")
        rows: list[dict] = []
        for act in scale.sweep_activations:
            rows += _cached(analysis / "sweep" / f"{act}_cv.json", lambda act=act: lr_sweep(
                small, scale.sweep_lrs, steps=scale.sweep_steps, activation=act,
                seeds=[base.train.seed + i for i in range(scale.sweep_seeds)],
                eval_samples=scale.analysis_samples, num_samples=scale.sweep_samples,
                control_variate=True, log=log))
        sweep = {"rows": rows, "pairs": scale.sweep_samples, "control_variate": True,
                 "steps": scale.sweep_steps}
    scaling = None
    if scale.scaling_scales:
        log("deviation scaling of the decomposition residuals (tanh MLP)")
        rows = _cached(analysis / "scaling" / "tanh.json", lambda: deviation_scaling(
            small, lr=scale.scaling_lr, steps=scale.scaling_steps,
            scales=scale.scaling_scales, activation="tanh", seed=base.train.seed,
            eval_samples=scale.analysis_samples, num_samples=scale.scaling_samples))
        scaling = {"rows": rows}
    return lock, sweep, scaling


def _refuse_without_gpu(scale: Scale, plan: list[Setting], force: bool) -> list[Setting]:
    if not scale.needs_gpu or torch.cuda.is_available():
        return plan
    if not force:
        data_dir = plan[0].cfg.data.dir
        where = f"; data dir {data_dir}" if data_dir else ""
        raise UserError(f"--scale {scale.name} is {len(plan)} runs of "
                        f"{plan[0].cfg.train.steps} steps ({plan[0].cfg.model.name}, "
                        f"{plan[0].cfg.train.workers} workers{where}): configs validated, but "
                        "no CUDA GPU here, so nothing was trained (pass --force to train on "
                        "the CPU anyway)")
    return [replace(s, cfg=_with(s.cfg, ["device=cpu"])) for s in plan]


def reproduce(out: str | Path, scale: Scale, *, seeds: int | None = None,
              extra: list[str] | None = None, log: Callable[[str], None] = print,
              force: bool = False) -> Path:
    """Run (or resume) every experiment of ``scale`` into ``out``; write ``results.json`` and
    the report made from it."""
    from dsgd.report.reproduction import write_report

    out = Path(out)
    plan = _refuse_without_gpu(scale, settings(scale, seeds, extra), force)
    early = early_settings(scale, plan)
    started = time.perf_counter()
    runs, analysis = out / "runs", out / "analysis"
    records = _train(plan, runs, log)
    early_records = _train(early, runs, log) if early else []
    sharp, unc, surfaces = _measure(scale, plan + early, runs, analysis, log)
    base = C.load(scale.preset, [*scale.overrides, *(extra or [])])
    lock, sweep, scaling = _equivalence(scale, base, analysis, log)

    protocols = []
    for proto in scale.all_protocols():
        ps = [s for s in plan if s.protocol == proto.name]
        if not ps:
            continue
        tbs = sorted({s.total_batch for s in ps if s.experiment != "tradeoff"})
        protocols.append({
            "name": proto.name, "title": proto.title, "graded": proto.graded,
            "batches": [tbs[0], tbs[-1]] if len(tbs) > 1 else tbs,
            "lrs": {str(s.total_batch): s.lr for s in ps if s.experiment != "tradeoff"},
            "seeds": len({s.seed for s in ps}),
            "config": C.to_dict(ps[0].cfg)})
    results = {
        "scale": scale.name, "preset": scale.preset, "seeds": seeds or scale.seeds,
        "base_config": C.to_dict(base), "protocols": protocols,
        "runs": records, "early_runs": early_records,
        "sharpness": sharp, "landscape": surfaces, "uncertainty": unc,
        "lockstep_by_lr": lock or None,
        "lockstep_settings": {"lrs": list(scale.lockstep_lrs), "steps": scale.lockstep_steps,
                              "samples": 2 * max(1, scale.lockstep_samples // 2),
                              "total_batch": base.train.workers * scale.batches[0][0],
                              "topology": base.train.topology,
                              "radius": scale.lockstep_radius},
        "sweep": sweep, "scaling": scaling,
        "analysis_settings": {"samples": scale.analysis_samples,
                              "hutchinson": scale.hutchinson_samples,
                              "uncertainty_samples": scale.uncertainty_samples,
                              "posterior_draws": scale.posterior_draws},
        "wall_time": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    path = write_report(results, out)
    log(f"report: {path}")
    return path
