"""Cost of one gossip step ``x <- P @ x`` on the stacked weights x: (m, P), in one process.

Implementations compared (all return a new (m, P) tensor, checked against the dense product):

- ``dense``: ``LocalCommunicator(mode="dense")``, one ``P @ x``;
- ``gather``: a sum of ``deg`` row gathers with advanced indexing ``x[index[s]]``;
- ``index_select``: ``LocalCommunicator(mode="sparse")``, the same plan with ``index_select``;
- ``roll``: circulant topologies only (ring, exponential): ``sum_o w_o * torch.roll(x, -o, 0)``;
- ``shift``: ``LocalCommunicator(mode="shift")``, circulant only: for each offset o two in-place
  ``add_(..., alpha=w_o)`` on row slices (``out[:m-o] += w_o x[o:]``, ``out[m-o:] += w_o x[:o]``).

The column "auto" is what ``LocalCommunicator(mode="auto")`` picks; "best" the fastest measured.
Median of ``--repeats`` calls after one warmup call, in one process (ratios are within the run).

    python benchmarks/gossip.py
    python benchmarks/gossip.py --sizes 100000 --workers 16 64 256 --repeats 9
    python benchmarks/gossip.py --device cuda --workers 16 64 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsgd.engine.comm import LocalCommunicator
from dsgd.topology import make_topology

TOPOLOGIES = ("ring", "exponential", "grid")


def circulant_offsets(P: torch.Tensor) -> list[tuple[int, float]] | None:
    """[(offset, weight), ...] if P[i, (i + o) % m] = P[0, o] for all i (a circulant), else None."""
    m = P.shape[0]
    row = P[0]
    offsets = [(o, float(row[o])) for o in torch.nonzero(row).flatten().tolist()]
    idx = torch.arange(m)
    for o, w in offsets:
        if not torch.allclose(P[idx, (idx + o) % m], torch.full((m,), w, dtype=P.dtype)):
            return None
    if not torch.allclose(P.sum(), torch.tensor(float(m), dtype=P.dtype)):
        return None
    nnz = int((P != 0).sum())
    return offsets if nnz == m * len(offsets) else None


def mix_roll(x: torch.Tensor, offsets: list[tuple[int, float]]) -> torch.Tensor:
    out = None
    for o, w in offsets:
        term = (torch.roll(x, -o, 0) if o else x) * w
        out = term if out is None else out.add_(term)
    return out


def mix_gather(x: torch.Tensor, plan: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    index, weights = plan  # (deg, m) each
    out = x[index[0]] * weights[0][:, None]
    for s in range(1, index.shape[0]):
        out.addcmul_(x[index[s]], weights[s][:, None])
    return out


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _times(fn, x: torch.Tensor, repeats: int, budget: float) -> tuple[float, float]:
    """(median, min) seconds of ``repeats`` calls after one warmup call; fewer calls (at least
    one) when they would take longer than ``budget`` seconds."""
    _sync(x)
    t0 = time.perf_counter()
    fn()
    _sync(x)
    warm = time.perf_counter() - t0
    times = []
    for _ in range(max(1, min(repeats, int(budget / warm)))):
        t0 = time.perf_counter()
        fn()
        _sync(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def candidates(x: torch.Tensor, name: str) -> tuple[dict, str, int]:
    """The implementations for topology ``name`` on x: (m, P), LocalCommunicator's auto choice
    and the maximum degree (self included)."""
    m = x.shape[0]
    topo = make_topology(name, m)
    P = topo.matrix(0)
    deg = int((P != 0).sum(1).max())
    auto = LocalCommunicator(topo, "auto")._plan(0, x)[0]
    sparse, dense = LocalCommunicator(topo, "sparse"), LocalCommunicator(topo, "dense")
    plan = sparse._plan(0, x)[2]
    fns = {"dense": lambda: dense.mix(x, 0), "gather": lambda: mix_gather(x, plan),
           "index_select": lambda: sparse.mix(x, 0)}
    circ = circulant_offsets(P)
    if circ is not None:
        shift = LocalCommunicator(topo, "shift")
        fns["roll"] = lambda: mix_roll(x, circ)
        fns["shift"] = lambda: shift.mix(x, 0)
    return fns, auto, deg


def _mem_available_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0] / 2**30
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def run(sizes: list[int], workers: list[int], topologies: list[str], repeats: int,
        budget: float, device: str = "cpu") -> None:
    where = (torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda")
             else f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}; float32; ms per call, "
          f"median and min of {repeats} calls (fewer over {budget:.0f} s); "
          "auto = LocalCommunicator's choice")
    cols = ("dense", "gather", "index_select", "roll", "shift")
    head = (f"| {'P':>10} | {'m':>3} | {'topology':<11} | {'deg':>3} | {'stat':>6} | "
            + " | ".join(f"{c:>12}" for c in cols)
            + f" | {'auto':>6} | {'best':>12} | {'auto/best':>9} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for size in sizes:
        for m in workers:
            gib = 4 * m * size / 2**30
            if _mem_available_gib(device) < 5 * gib:
                print(f"| {size:>10} | {m:>3} | skipped: one copy is {gib:.1f} GiB, "
                      f"{_mem_available_gib(device):.1f} GiB available (need 5 copies) |")
                continue
            x = torch.randn(m, size, device=device)
            for name in topologies:
                fns, auto_mode, deg = candidates(x, name)
                if size * m <= 2**24:  # the code paths do not depend on P: check the small ones
                    ref = fns["dense"]()
                    for k, fn in fns.items():
                        err = (fn() - ref).abs().max().item()
                        assert err < 1e-4, (k, err)
                    ref = None
                t = {k: _times(fn, x, repeats, budget) for k, fn in fns.items()}
                auto_key = {"sparse": "index_select"}.get(auto_mode, auto_mode)
                for which, i in (("median", 0), ("min", 1)):
                    ms = {k: 1e3 * v[i] for k, v in t.items()}
                    best = min(ms, key=ms.get)
                    cells = " | ".join(f"{ms[c]:12.2f}" if c in ms else f"{'—':>12}"
                                       for c in cols)
                    print(f"| {size:>10} | {m:>3} | {name:<11} | {deg:>3} | {which:>6} | "
                          f"{cells} | {auto_mode:>6} | {best:>12} | "
                          f"{ms[auto_key] / ms[best]:9.2f} |", flush=True)
            x = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[100_000, 11_173_962],
                    help="parameters per worker (11,173,962 = resnet18_micro, 10 classes)")
    ap.add_argument("--workers", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=15.0,
                    help="seconds per implementation; fewer calls (>= 1) when slower")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.sizes, args.workers, args.topologies, args.repeats, args.budget, args.device)


if __name__ == "__main__":
    main()
