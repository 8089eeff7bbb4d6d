"""What ``strategy="auto"`` picks, against the best of vmap and loop, per model kind.

For each model (per-worker batch 32, random data of its shape, D-SGD on a ring of m workers) this
times the engine's step with ``strategy="vmap"``, ``"loop"`` and ``"auto"``, their steps
alternating in one process (median of ``--repeats`` rounds after two warm-up steps each), and
prints ms per step, what auto picked and why, and auto / best (1.00: auto is the fastest;
the target is <= 1.2).

    python benchmarks/auto.py
    python benchmarks/auto.py --workers 16 64 --repeats 7 --models lstm transformer
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from dsgd.engine import Engine
from dsgd.models import build_model
from dsgd.topology import make_topology

BATCH = 32


class Recurrent(nn.Module):
    """Row-by-row sequence classifier (28 steps of 28 features), GRU or LSTM, 64 units."""

    def __init__(self, cell):
        super().__init__()
        self.rnn, self.head = cell(28, 64, batch_first=True), nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Tokens(nn.Module):
    """Embedding + 2-layer TransformerEncoder (d 64, 4 heads, dropout 0.1) over 32 tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        layer = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


MODELS = {  # name: (factory, one worker's batch of inputs)
    "mlp": (lambda: build_model("mlp", 10, (1, 28, 28)),
            lambda m: torch.randn(m, BATCH, 1, 28, 28)),
    "lenet5": (lambda: build_model("lenet5", 10, (1, 28, 28)),
               lambda m: torch.randn(m, BATCH, 1, 28, 28)),
    "resnet8": (lambda: build_model("resnet8", 10, (3, 32, 32)),
                lambda m: torch.randn(m, BATCH, 3, 32, 32)),
    "lstm": (lambda: Recurrent(nn.LSTM), lambda m: torch.randn(m, BATCH, 28, 28)),
    "gru": (lambda: Recurrent(nn.GRU), lambda m: torch.randn(m, BATCH, 28, 28)),
    "transformer": (Tokens, lambda m: torch.randint(0, 100, (m, BATCH, 32))),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--workers", nargs="+", type=int, default=[16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"cpu, {torch.get_num_threads()} threads: ms per step (median of {args.repeats} "
          "interleaved rounds); auto/best = auto's time over the faster of vmap and loop")
    print("| model       |    m |    vmap |    loop |    auto | auto picked | auto/best |")
    print("|-------------|------|---------|---------|---------|-------------|-----------|")
    reasons = []
    for name in args.models:
        make, inputs = MODELS[name]
        for m in args.workers:
            torch.manual_seed(0)
            x, y = inputs(m), torch.randint(0, 10, (m, BATCH))
            engines = {s: Engine(make(), make_topology("ring", m), lr=0.01, strategy=s)
                       for s in ("vmap", "loop", "auto")}
            for eng in engines.values():
                eng.step(x, y)
                eng.step(x, y)
            times: dict[str, list[float]] = {s: [] for s in engines}
            for _ in range(args.repeats):
                for s, eng in engines.items():
                    t0 = time.perf_counter()
                    eng.step(x, y)
                    times[s].append(time.perf_counter() - t0)
            ms = {s: 1e3 * statistics.median(v) for s, v in times.items()}
            auto = engines["auto"].backend
            print(f"| {name:<11} | {m:>4} | {ms['vmap']:7.1f} | {ms['loop']:7.1f} | "
                  f"{ms['auto']:7.1f} | {auto.name:>11} | "
                  f"{ms['auto'] / min(ms['vmap'], ms['loop']):9.2f} |", flush=True)
            reasons.append(f"{name} m={m}: {auto.reason}")
            for eng in engines.values():
                eng.close()
    print("\n".join(reasons))


if __name__ == "__main__":
    main()
