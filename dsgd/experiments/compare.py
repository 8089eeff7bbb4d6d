"""``dsgd compare``: one base config, several arms (algorithms or their settings), a few settings
of one axis (the data partition, the network), several seeds; every run trained (or reused
when finished) into ``<out>/runs/<setting>/<arm>/s<seed>``, then ``results.json`` and the report
of ``dsgd.report.compare``.

A study is data: the base preset and overrides, ``arms`` and ``settings`` as (label, overrides).
``STUDIES`` holds the two the documentation shows (docs/comparison/): the field's algorithms
under non-iid data, and compressed gossip on a simulated network.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from dsgd.errors import UserError
from dsgd.experiments import config as C
from dsgd.experiments.runner import ensure_run
from dsgd.report.compare import slug, write_report

Arm = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    preset: str
    overrides: tuple[str, ...]
    arms: tuple[Arm, ...]
    settings: tuple[Arm, ...]
    axis: str  # what the settings vary, in words
    seeds: int = 3
    notes: tuple[str, ...] = ()


_FASHION = ("data.name=fashion-mnist", "train.workers=16", "train.topology=ring",
            "train.batch_size=16", "log.eval_every=100", "log.checkpoint_every=600",
            "log.progress=false")

ALGORITHMS = Study(
    "algorithms", "The field's decentralized algorithms under non-iid data",
    "cpu_fashion_mlp", (*_FASHION, "train.steps=600"),
    arms=(("C-SGD", ("train.algorithm=csgd",)),
          ("D-SGD", ("train.algorithm=dsgd",)),
          ("gradient tracking", ("train.algorithm=gt",)),
          ("D² (lazy ring)", ("train.algorithm=d2", "train.lazy=0.5")),
          ("QG-DSGDm", ("train.algorithm=qgm", "train.lr=0.01")),
          ("push-sum (directed exp.)", ("train.algorithm=pushsum",
                                        "train.topology=directed_exponential"))),
    settings=(("iid", ("data.partition=iid",)),
              ("Dirichlet 10", ("data.partition=dirichlet", "data.alpha=10.0")),
              ("Dirichlet 1", ("data.partition=dirichlet", "data.alpha=1.0")),
              ("Dirichlet 0.1", ("data.partition=dirichlet", "data.alpha=0.1"))),
    axis="data partition",
    notes=("MLP 784-100-100-10 on Fashion-MNIST (all 60000 training images), 16 workers, "
           "per-worker batch 16, 600 steps, lr 0.1 with warmup 30 and decays at 240/480, no "
           "momentum, no weight decay.",
           "D² needs the smallest eigenvalue of P above -1/3; a 16-ring has exactly -1/3, so D² "
           "runs on the lazy ring (I + P) / 2.",
           "QG-DSGDm (beta 0.9) runs at lr 0.01: its momentum multiplies the step by "
           "1 / (1 - beta) = 10, so its effective lr equals the others' 0.1.",
           "Push-sum runs on the directed exponential graph (one peer per step, weight 1/2, as "
           "in SGP), the others on the undirected ring."),
)

_NET = ("network.compute_ms=2", "network.latency_ms=1", "network.bandwidth_gbps=1")
COMPRESSION = Study(
    "compression", "Compressed gossip on a simulated 1 Gbit/s, 1 ms network",
    "cpu_fashion_mlp", (*_FASHION, "train.steps=600", *_NET),
    arms=(("C-SGD", ("train.algorithm=csgd",)),
          ("D-SGD float32", ("train.algorithm=dsgd",)),
          ("CHOCO top-1%", ("train.algorithm=choco", 'train.compression={name="topk", '
                            'ratio=0.01}', "train.consensus_step=0.05")),
          ("CHOCO QSGD 4-bit", ("train.algorithm=choco", 'train.compression={name="qsgd", '
                                'levels=7}', "train.consensus_step=0.3")),
          ("C-SGD top-1% (error feedback)", ("train.algorithm=csgd",
                                             'train.compression={name="topk", ratio=0.01}'))),
    settings=(("no stragglers", ()),
              ("stragglers", ("network.stragglers=0.02", "network.straggle_steps=3",
                              "network.straggler_ms=20"))),
    axis="network",
    notes=("MLP 784-100-100-10 on Fashion-MNIST, 16 workers on a ring, per-worker batch 16, "
           "600 steps, lr 0.1 (warmup 30, decays at 240/480).",
           "Clock: 2 ms of compute per worker and step, 1 ms latency per message, 1 Gbit/s per "
           "link; C-SGD is a ring all-reduce (2 (m - 1) hops of P / m).",
           "Stragglers: each worker falls behind with probability 0.02 a step for 3 steps "
           "(about one worker behind at any time), computing 20 ms longer; in gossip only its "
           "neighbours wait for it (and theirs one step later), C-SGD's all-reduce waits at once. "
           "The stragglers change the clock only, not the training.",
           "CHOCO's consensus step: 0.05 for top-1%, 0.3 for QSGD 4-bit (3 bits and a sign an "
           "entry, one float32 norm a bucket of 512, decoded rescaled by 1 / (1 + omega)).",
           "C-SGD top-1% (error feedback): each worker sends the top 1% of its gradient plus the "
           "residual it kept; the messages travel as a ring all-gather (m - 1 hops of one "
           "message), every worker steps with their mean."),
)

STUDIES = {s.name: s for s in (ALGORITHMS, COMPRESSION)}


def get_study(name: str, quick: bool = False) -> Study:
    if name not in STUDIES:
        raise UserError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    study = STUDIES[name]
    if quick:  # the same pipeline in seconds: a few steps on a small subset
        study = replace(study, seeds=2, overrides=(
            *study.overrides, "data.n_train=4096", "data.n_test=500", "train.steps=20",
            "train.batch_size=4",
            "train.warmup_steps=2", "train.milestones=[8, 16]", "log.eval_every=10",
            "log.checkpoint_every=20"))
    return study


def plan(study: Study, extra: list[str] | None = None) -> list[dict]:
    """Every run of ``study``: setting, arm, seed, validated config and run path."""
    runs = []
    for setting, s_over in study.settings:
        for arm, a_over in study.arms:
            for seed in range(study.seeds):
                cfg = C.load(study.preset, [*study.overrides, *s_over, *a_over,
                                            *(extra or []), f"train.seed={seed}",
                                            f'name="{slug(arm)}"'])
                runs.append({"setting": setting, "arm": arm, "seed": seed, "cfg": cfg,
                             "run": f"{slug(setting)}/{slug(arm)}/s{seed}"})
    return runs


def compare(out: str | Path, study: Study, *, extra: list[str] | None = None,
            log: Callable[[str], None] = print) -> Path:
    """Train (or reuse) every run of ``study`` into ``out``; write results.json and the report."""
    out = Path(out)
    todo = plan(study, extra)
    records = []
    for i, r in enumerate(todo):
        t0 = time.perf_counter()
        run_dir = out / "runs" / r["run"]
        summary = ensure_run(r["cfg"], run_dir)  # a diverged run is a result, counted
        final = summary.get("final") or {}
        log(f"[{i + 1}/{len(todo)}] {r['run']}: {summary.get('status')}"
            + (f", test acc {100 * final['test_acc']:.2f}%" if "test_acc" in final else "")
            + f" ({time.perf_counter() - t0:.0f} s)")
        records.append({"setting": r["setting"], "arm": r["arm"], "seed": r["seed"],
                        "run": f"runs/{r['run']}", "status": summary.get("status"),
                        "final": final})
    results = {"study": study.name, "title": study.title, "axis": study.axis,
               "preset": study.preset, "overrides": list(study.overrides),
               "arms": [{"label": a, "overrides": list(o)} for a, o in study.arms],
               "settings": [{"label": s, "overrides": list(o)} for s, o in study.settings],
               "seeds": study.seeds, "notes": list(study.notes), "runs": records}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    path = write_report(results, out)
    log(f"report: {path}")
    return path
