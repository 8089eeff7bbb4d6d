"""The ``dsgd`` command line.

    dsgd train --config quickstart --set train.workers=8 --out runs/x [--resume]
    torchrun --nproc-per-node=4 -m dsgd train --config X.toml --engine distributed --out runs/x
    dsgd topology ring -m 16 [--draw ring.png]
    dsgd report runs/a runs/b --out reports/ab
    dsgd quickstart --out runs/quickstart
    dsgd compare algorithms --out runs/compare-algorithms

User errors (a bad config, a missing data directory, a diverged run, ...) print one line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dsgd.errors import RunInterrupted, UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def _train(args) -> int:
    from dsgd.experiments.runner import train

    cfg = _train_config(args)
    out = Path(args.out or f"runs/{cfg.name}")
    if args.engine == "distributed":
        summary = _train_distributed(cfg, out, args)
    else:
        summary = train(cfg, out, resume=args.resume)
    if summary is None:  # a torchrun process other than rank 0: rank 0 reports
        return 0
    final = summary["final"]
    print(f"{cfg.name}: {summary['steps']} steps in {summary['wall_time']:.0f} s, "
          f"test accuracy {100 * final.get('test_acc', float('nan')):.2f}%, "
          f"consensus distance {final.get('consensus', float('nan')):.3g}; run in {out}")
    return 0


def _train_config(args):
    """The config of ``dsgd train``: --config and --set; with --resume and no --config, the
    run's saved config (and --set, e.g. train.steps=N to extend a finished run)."""
    import json

    from dsgd.experiments import config as C

    extra = ["log.progress=false"] if args.no_progress else []
    if args.config is None and args.resume:
        if not args.out:
            raise UserError("--resume without --config needs --out RUN (the run directory)")
        saved = Path(args.out) / "config.json"
        try:
            raw = json.loads(saved.read_text())
        except FileNotFoundError:
            raise UserError(f"nothing to resume in {saved.parent}: no config.json there; "
                            "give --out the run directory, or --config") from None
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {saved} ({type(e).__name__}); pass --config") from None
        return C.from_dict(C.apply_overrides(raw, [*args.set, *extra]))
    return C.load(args.config, [*args.set, *extra])


def _train_distributed(cfg, out: Path, args) -> dict | None:
    """One process of a torchrun job: host this rank's block of workers, gossip over
    torch.distributed. A dead or silent peer ends every survivor with one line and status 2."""
    from dsgd.engine import distributed as D
    from dsgd.experiments import config as C
    from dsgd.experiments.runner import topology_of, train

    ctx = D.init_from_env(timeout_s=args.timeout)
    cfg = C.with_overrides(cfg, [f'device="{ctx.device}"'])
    topo = topology_of(cfg)
    try:
        comm = D.TorchDistributedCommunicator(topo, timeout_s=args.timeout, checkpoint_dir=out)
        summary = train(cfg, out, resume=args.resume, comm=comm)
    except D.PeerFailure as err:
        print(f"dsgd: error: {err}", file=sys.stderr)
        D.abort_process(2)  # gloo threads blocked in a timed-out collective would hang exit
    except UserError as err:  # a diverged run too: every rank says so
        print(f"dsgd: error (rank {ctx.rank}): {err}", file=sys.stderr)
        D.abort_process(2)
    except RunInterrupted as err:
        print(f"dsgd: rank {ctx.rank}: {err}", file=sys.stderr)
        D.abort_process(err.exit_code)
    D.shutdown(args.timeout)
    return summary if ctx.rank == 0 else None


def _topology(args) -> int:
    from dsgd.topology import make_topology, second_eigenvalue, spectral_gap

    topo = make_topology(args.name, args.m, shuffle=args.shuffle, seed=args.seed)
    P = topo.matrix(0)
    degree = int((P[0] != 0).sum()) - 1
    print(f"{topo.name}  m={topo.m}  neighbours of worker 0: {degree}  "
          f"|lambda_2| = {second_eigenvalue(P):.3f}  spectral gap = {spectral_gap(P):.3f}"
          + ("  (time-varying: step 0 shown)" if topo.time_varying else ""))
    if args.matrix:
        for row in P.tolist():
            print(" ".join(f"{v:.3f}" for v in row))
    if args.draw:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import networkx as nx

        g = nx.from_numpy_array(((P + P.T) > 0).int().numpy())
        g.remove_edges_from(nx.selfloop_edges(g))
        fig, ax = plt.subplots(figsize=(5, 5))
        nx.draw_circular(g, ax=ax, with_labels=True, node_color="#9ecae1", node_size=300)
        ax.set_title(f"{topo.name}, m={topo.m}, gap {spectral_gap(P):.3f}")
        fig.savefig(args.draw, dpi=120, bbox_inches="tight")
        print(f"drew {args.draw}")
    return 0


def _report(args) -> int:
    from dsgd.report import make_report

    path = make_report([Path(p) for p in args.runs], Path(args.out), title=args.title,
                       by=args.by or None)
    print(f"report: {path}")
    return 0


def _quickstart(args) -> int:
    from dsgd.experiments import config as C
    from dsgd.experiments.runner import ensure_run
    from dsgd.report import make_report

    out = Path(args.out)
    runs = []
    for algorithm in ("dsgd", "csgd"):
        overrides = [f"train.algorithm={algorithm}", f'name="{algorithm}-quickstart"', *args.set]
        cfg = C.load("quickstart", overrides)
        run_dir = out / algorithm
        how = cfg.train.topology if algorithm == "dsgd" else "all-reduce"
        print(f"training {algorithm.upper()} ({how}, {cfg.train.workers} workers) "
              f"on {cfg.data.name} -> {run_dir}")
        summary = ensure_run(cfg, run_dir)  # reruns skip finished runs, resume broken ones
        print(f"  {summary.get('status', 'unknown')}: test accuracy "
              f"{100 * (summary.get('final') or {}).get('test_acc', float('nan')):.2f}% "
              f"in {summary.get('wall_time', 0):.0f} s")
        runs.append(run_dir)
    path = make_report(runs, out / "report", title="dsgd quickstart: D-SGD (ring) vs C-SGD")
    print(f"report: {path}")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated numbers, got {text!r}") from None


def _equivalence(args) -> int:
    from dsgd.experiments import config as C
    from dsgd.experiments.equivalence import lr_sweep
    from dsgd.report.reproduction.sweep import sweep_markdown, write_sweep

    cfg = C.load(args.config, ["log.progress=false", *args.set])
    rows = []
    for act in args.activation.split(","):
        rows += lr_sweep(cfg, _floats(args.lrs), steps=None if args.time else args.steps,
                         total_time=args.time, activation=act.strip(),
                         seeds=range(cfg.train.seed, cfg.train.seed + args.seeds),
                         eval_samples=args.samples, log=print)
    result = write_sweep(rows, args.out)
    print(sweep_markdown(result["table"]) + f"written to {args.out}/sweep.{{json,md,png}}")
    return 0


def _reproduce(args) -> int:
    import torch

    from dsgd.experiments.reproduce import get_scale, reproduce

    if args.threads:
        torch.set_num_threads(args.threads)
    extra = [f'data.dir="{args.data_dir}"'] if args.data_dir else []
    reproduce(args.out, get_scale(args.scale, args.quick), seeds=args.seeds,
              extra=extra + args.set, force=args.force)
    return 0


def _compare(args) -> int:
    import torch

    from dsgd.experiments.compare import compare, get_study

    if args.threads:
        torch.set_num_threads(args.threads)
    compare(args.out or f"runs/compare-{args.study}", get_study(args.study, args.quick),
            extra=args.set)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dsgd", description="Decentralized SGD for any nn.Module.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train one config into a run directory")
    t.add_argument("--config", help="a TOML file or a preset name (e.g. quickstart); with "
                   "--resume the run's saved config is the default")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=0.05 (repeatable)")
    t.add_argument("--out", help="run directory (default runs/<name>)")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    t.add_argument("--engine", choices=["simulated", "distributed"], default="simulated",
                   help="simulated: all workers in this process; distributed: under torchrun")
    t.add_argument("--timeout", type=float, default=60.0,
                   help="distributed: seconds before a silent peer is declared dead")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=_train)

    g = sub.add_parser("topology", help="print a topology's spectral gap (and draw it)")
    g.add_argument("name")
    g.add_argument("-m", type=int, default=16, help="number of workers")
    g.add_argument("--shuffle", action="store_true", help="random permutation each step")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--matrix", action="store_true", help="print the mixing matrix")
    g.add_argument("--draw", metavar="PNG", help="draw the graph to a PNG file")
    g.set_defaults(fn=_topology)

    r = sub.add_parser("report", help="markdown report with plots from run directories")
    r.add_argument("runs", nargs="+", help="run directories (or folders of them)")
    r.add_argument("--out", default="reports/latest")
    r.add_argument("--title", default="dsgd report")
    r.add_argument("--by", nargs="+", metavar="KEY",
                   help="group runs by these config keys (default: all but the seed)")
    r.set_defaults(fn=_report)

    q = sub.add_parser("quickstart", help="D-SGD (ring) vs C-SGD on Fashion-MNIST, and a report")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    q.set_defaults(fn=_quickstart)

    e = sub.add_parser("equivalence", help="D-SGD vs average-direction SAM residuals against lr")
    e.add_argument("--config", default="cpu_fashion_mlp", help="base config (D-SGD settings)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--lrs", default="0.4,0.2,0.1,0.05,0.025", help="comma-separated")
    e.add_argument("--steps", type=int, default=200, help="steps per learning rate")
    e.add_argument("--time", type=float, help="train round(TIME / lr) steps instead")
    e.add_argument("--activation", default="relu", help="relu, tanh, gelu (comma-separated)")
    e.add_argument("--seeds", type=int, default=1)
    e.add_argument("--samples", type=int, default=1024, help="training samples of the loss")
    e.add_argument("--out", default="runs/equivalence")
    e.set_defaults(fn=_equivalence)

    rp = sub.add_parser("reproduce", help="the paper's experiments and a report")
    rp.add_argument("--scale", choices=["cpu", "gpu", "paper"], default="cpu",
                    help="cpu: Fashion-MNIST MLP protocols; gpu: resnet20 (BatchNorm) on "
                         "Fashion-MNIST at total batch 1024 vs 8192; paper: CIFAR-10 ResNet-18")
    rp.add_argument("--quick", action="store_true", help="CI-size run of the same pipeline")
    rp.add_argument("--seeds", type=int, help="seeds per setting (default: the scale's)")
    rp.add_argument("--out", default="runs/reproduce")
    rp.add_argument("--data-dir", help="data directory (CIFAR-10 python layout for paper)")
    rp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    rp.add_argument("--threads", type=int, help="torch threads")
    rp.add_argument("--force", action="store_true", help="--scale gpu/paper without a GPU")
    rp.set_defaults(fn=_reproduce)

    cp = sub.add_parser("compare", help="algorithms (or their settings) side by side over "
                        "seeds, and a report")
    cp.add_argument("study", choices=["algorithms", "compression"],
                    help="algorithms: C-SGD, D-SGD, gt, d2, qgm, pushsum under iid and "
                         "Dirichlet data; compression: D-SGD, CHOCO top-1%% and QSGD 4-bit, "
                         "C-SGD dense and top-1%% with error feedback on a simulated network, "
                         "with and without stragglers")
    cp.add_argument("--quick", action="store_true", help="seconds-long run of the same pipeline")
    cp.add_argument("--out", help="default runs/compare-<study>")
    cp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key in every run")
    cp.add_argument("--threads", type=int, help="torch threads")
    cp.set_defaults(fn=_compare)

    from dsgd.experiments import config_doc  # `dsgd config` and the --help name lists

    config_doc.add_to(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dsgd.engine.memory import keep_freed_memory

    keep_freed_memory()  # large per-step tensors reuse freed memory instead of page-faulting
    try:
        return args.fn(args)
    except UserError as err:
        print(f"dsgd: error: {err}", file=sys.stderr)
        return 2
    except RunInterrupted as err:
        print(f"dsgd: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # an unreadable input or unwritable output outside a run
        from dsgd.experiments.runner import os_error_message

        print(f"dsgd: error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a training loop: nothing was being written
        print("dsgd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
