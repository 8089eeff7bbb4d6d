"""Throughput and peak memory of the D-SGD engine against C-SGD on one model and the paper's loop.

For each model and number of workers m (per-worker batch 32, random data of the dataset's shape)
this measures samples/s = m * 32 / (median step time) and peak memory of

  (a) ``Engine`` D-SGD on a ring, gradient strategy auto (and vmap and loop separately);
  (b) C-SGD on ONE model at the same total batch m * 32 (plain torch, torch.optim.SGD): the same
      FLOPs, so the practical upper limit for any m-worker simulation;
  (c) ``ReferenceEngine``: m nn.Module copies, one torch.optim.SGD each, gossip by state-dict
      copies (its gossip sums over all m workers, O(m^2) tensor ops);
  (c') the paper's loop with gossip over the neighbours only (what the authors' code does), a
      fairer loop baseline for large m;
  and, with ``--methods ... compile``, (a) with ``Engine(strategy="vmap", compile=True)`` (its
      first step compiles: give it a ``--step-limit`` of a minute or more); ``csgd_engine`` is
      the engine's own C-SGD (``algorithm="csgd"``).

On CPU every configuration runs in a fresh subprocess, so the peak memory is that process's own
high-water mark: ``VmHWM`` from /proc/self/status minus ``VmRSS`` after imports and model
construction (the data batch, the engine state and the activations are counted). On GPU they run
one after another in one process (``--in-process``, the default there: no CUDA start-up per
configuration), memory freed in between, and the peak is ``torch.cuda.max_memory_allocated``
above what was allocated before the configuration was built. Time is the median of
``--repeats`` timed steps after two warmup steps; a configuration whose first step takes longer
than ``--step-limit`` seconds is skipped ("—"), and slow ones are timed with fewer repeats
(column n).

    python benchmarks/engine.py --quick
    python benchmarks/engine.py --models mlp lenet5 --workers 1 4 16 64 256 --repeats 7
    python benchmarks/engine.py --profile mlp:64:vmap
    python benchmarks/engine.py --device cuda --jsonl gpu.jsonl
    python benchmarks/engine.py --from-jsonl gpu.jsonl       # the tables again, from saved results
    python benchmarks/engine.py --device cuda --paper-projection
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time

BATCH = 32
SHAPES = {"mlp": (1, 28, 28), "lenet5": (1, 28, 28), "resnet8": (3, 32, 32),
          "resnet20": (3, 32, 32), "resnet18_micro": (3, 32, 32)}
METHODS = ("vmap", "loop", "csgd1", "ref", "paper", "compile", "csgd_engine", "bf16",
           "csgd1:cl")
DEFAULT_METHODS = METHODS[:5]  # "compile" (vmap + torch.compile) on request: it compiles first
QUICK = {"models": ["mlp", "lenet5", "resnet8"], "workers": [1, 16, 64], "repeats": 5}


# ---- measurement (runs in the child process) ---------------------------------------------------
def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PaperLoop:
    """The authors' loop: m modules, torch.optim.SGD each; after the local steps every worker
    takes sum_k P[j, k] w_k(t) over its neighbours k (non-zero weights) from state-dict copies."""

    def __init__(self, model, P, lr: float = 0.01):
        import copy

        import torch
        self.workers = [copy.deepcopy(model) for _ in range(P.shape[0])]
        self.opts = [torch.optim.SGD(w.parameters(), lr=lr) for w in self.workers]
        self.P = P.float()
        self.nbrs = [[(k, float(self.P[j, k])) for k in torch.nonzero(self.P[j]).flatten().tolist()]
                     for j in range(P.shape[0])]

    def step(self, x, y):
        import torch
        import torch.nn.functional as F
        for j, (w, opt) in enumerate(zip(self.workers, self.opts, strict=True)):
            opt.zero_grad()
            F.cross_entropy(w(x[j]), y[j]).backward()
        before = [{n: t.clone() for n, t in w.state_dict().items()} for w in self.workers]
        for opt in self.opts:
            opt.step()
        with torch.no_grad():
            for j, w in enumerate(self.workers):
                for name, p in w.named_parameters():
                    p += sum(a * before[k][name] for k, a in self.nbrs[j]) - before[j][name]


def _build_runner(model_name: str, m: int, method: str, device: str, image: int | None = None,
                  batch: int = BATCH, topology: str = "ring", classes: int = 10):
    """Return ``step()`` running one iteration of ``method`` with data already on the device."""
    import torch
    import torch.nn.functional as F

    from dsgd.engine import Engine
    from dsgd.engine.reference import ReferenceEngine
    from dsgd.models import build_model
    from dsgd.topology import make_topology

    shape = SHAPES[model_name] if image is None else (3, image, image)
    torch.manual_seed(0)
    model = build_model(model_name, classes, shape).to(device)
    x = torch.randn(m, batch, *shape, device=device)
    y = torch.randint(0, classes, (m, batch), device=device)
    if method.startswith("csgd1"):
        # "csgd1:bf16": the usual mixed-precision recipe (bf16 autocast, channels-last images),
        # to show how far below the float32 time the same FLOPs can go on this device;
        # "csgd1:cl": float32 with channels-last images, as the engine runs conv nets
        bf16 = method == "csgd1:bf16"
        xb, yb = x.reshape(m * batch, *shape), y.reshape(m * batch)
        if (bf16 or method == "csgd1:cl") and xb.ndim == 4:
            model = model.to(memory_format=torch.channels_last)
            xb = xb.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        model.train()

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
        return step
    if method in ("ref", "paper"):
        topo = make_topology(topology, m)
        eng = (ReferenceEngine(model, topo, lr=0.01) if method == "ref"
               else PaperLoop(model, topo.matrix(0)))
        return lambda: eng.step(x, y)
    if method == "csgd_engine":  # the engine's own C-SGD (all-reduce), strategy auto
        method = "csgd:auto"
    precision = "fp32"
    if method == "bf16":  # the engine, strategy auto, forward and backward in bf16
        method, precision = "auto", "bf16"
    algorithm = "csgd" if method.startswith("csgd") else "dsgd"
    strategy = method.split(":")[1] if ":" in method else method
    compiled = strategy == "compile"
    strategy = "vmap" if compiled else strategy
    if algorithm == "csgd":
        topo = make_topology("complete", m)
    else:
        topo = make_topology(topology, m)
    eng = Engine(model, topo, lr=0.01, strategy=strategy, algorithm=algorithm, compile=compiled,
                 precision=precision)

    def engine_step():
        return eng.step(x, y)
    engine_step.engine = eng  # type: ignore[attr-defined]  # what auto picked, for the tables
    return engine_step


def _too_slow(signum, frame):
    raise TimeoutError


def measure(cfg: dict) -> dict:
    """Time one configuration in this process; return a JSON-able result."""
    import torch

    import dsgd.engine  # noqa: F401
    import dsgd.models  # noqa: F401  (import cost outside the baseline)
    cuda = cfg["device"].startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base_kib = _proc_kib("VmRSS")
    if cuda:
        sync()
        base_bytes = torch.cuda.memory_allocated()
    out = {k: cfg[k] for k in ("model", "m", "method")}
    try:
        step = _build_runner(cfg["model"], cfg["m"], cfg["method"], cfg["device"],
                             cfg.get("image"), cfg.get("batch", BATCH),
                             cfg.get("topology", "ring"))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        signal.signal(signal.SIGALRM, _too_slow)
        signal.setitimer(signal.ITIMER_REAL, cfg["limit"])  # interrupts the first step
        step()
        sync()
        signal.setitimer(signal.ITIMER_REAL, 0)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        step()  # second warmup: caches, allocator (the first may include autotuning)
        sync()
        second = time.perf_counter() - t0
        n = cfg["repeats"]
        if second * n > cfg["budget"]:
            n = max(3, int(cfg["budget"] / second))
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return {**out, "skip": "out of memory"}
    except TimeoutError:
        return {**out, "skip": f"one step > {cfg['limit']:.0f} s"}
    except Exception as e:  # e.g. a CUDA library refusing a shape: report it, go on
        return {**out, "skip": f"failed: {str(e).splitlines()[0][:60]}"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    med = statistics.median(times)
    peak = ((torch.cuda.max_memory_allocated() - base_bytes) / 2**20 if cuda
            else (_proc_kib("VmHWM") - base_kib) / 1024)
    samples = cfg["m"] * cfg.get("batch", BATCH)
    return {**out, "step_s": med, "first_s": first, "n": n, "peak_mib": peak,
            "samples_s": samples / med,
            "best_samples_s": samples / min(times)}


def run_here(cfg: dict, timeout: float) -> dict:
    """``measure(cfg)`` in this process, then free what it allocated (GPU runs)."""
    import torch
    r = measure(cfg)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return r


def run_child(cfg: dict, timeout: float) -> dict:
    """``measure(cfg)`` in a fresh interpreter (own memory high-water mark)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(cfg)]
    base = {k: cfg[k] for k in ("model", "m", "method")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "skip": f"timeout {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**base, "skip": f"failed: {err[:60]}"}
    return json.loads(lines[-1])


def _save(path: str | None, row: dict) -> None:
    """Append one result to the JSON-lines file (results survive an interrupted run)."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _device_line(device: str) -> str:
    import torch
    if not device.startswith("cuda"):
        return f"cpu, {torch.get_num_threads()} threads"
    b = torch.backends
    return (f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}, "
            f"cudnn.benchmark={b.cudnn.benchmark}, TF32 matmul={b.cuda.matmul.allow_tf32} "
            f"conv={b.cudnn.allow_tf32}")


# ---- tables ------------------------------------------------------------------------------------
def _auto_strategy(model_name: str, device: str, m: int) -> str:
    """The backend ``auto`` keeps unless the timing at the first step finds another faster."""
    from dsgd.engine.backends import default_strategy
    from dsgd.models import build_model
    return default_strategy(build_model(model_name, 10, SHAPES[model_name]), m, device)


def _fmt(r: dict | None, key: str, spec: str) -> str:
    if r is None or "skip" in r:
        return "—"
    return format(r[key], spec)


def _ratio(a: dict | None, b: dict | None, key: str = "samples_s") -> str:
    if a is None or b is None or "skip" in a or "skip" in b:
        return "—"
    return f"{a[key] / b[key]:.2f}"


def print_table(results: dict, models: list[str], workers: dict[str, list[int]],
                device: str) -> None:
    workers = {mo: sorted(set(ms)) for mo, ms in workers.items()}
    mem = "peak MiB" if device == "cpu" else "max alloc MiB"
    print(f"\nsamples/s (median step) and {mem}; per-worker batch {BATCH}; ring; device {device}")
    print("a = Engine D-SGD (auto -> strategy), b = C-SGD one model at batch m*32, "
          "c = ReferenceEngine, c' = paper loop (neighbours only)")
    head = (f"| {'model':<14} | {'m':>4} | {'auto':>4} | {'a vmap':>9} | {'a loop':>9} | "
            f"{'a comp':>9} | {'b C-SGD':>9} | {'c ref':>9} | {'c paper':>9} | {'a/b':>5} | "
            f"{'comp/b':>6} | {'a/c':>5} | {'a/c_':>5} | {'mem a':>7} | {'mem b':>7} | "
            f"{'mem c':>7} | {'n':>3} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    skips = []
    for model in models:
        for m in workers[model]:
            auto = _auto_strategy(model, device, m)
            r = {meth: results.get((model, m, meth)) for meth in METHODS}
            a = r[auto]
            print(f"| {model:<14} | {m:>4} | {auto:>4} | {_fmt(r['vmap'], 'samples_s', '9.0f')} | "
                  f"{_fmt(r['loop'], 'samples_s', '9.0f')} | "
                  f"{_fmt(r['compile'], 'samples_s', '9.0f')} | "
                  f"{_fmt(r['csgd1'], 'samples_s', '9.0f')} | "
                  f"{_fmt(r['ref'], 'samples_s', '9.0f')} | "
                  f"{_fmt(r['paper'], 'samples_s', '9.0f')} | {_ratio(a, r['csgd1']):>5} | "
                  f"{_ratio(r['compile'], r['csgd1']):>6} | "
                  f"{_ratio(a, r['ref']):>5} | {_ratio(a, r['paper']):>5} | "
                  f"{_fmt(a, 'peak_mib', '7.0f')} | {_fmt(r['csgd1'], 'peak_mib', '7.0f')} | "
                  f"{_fmt(r['ref'], 'peak_mib', '7.0f')} | {_fmt(a, 'n', '3d')} |")
            skips += [f"{model} m={m} {k}: {v['skip']}" for k, v in r.items()
                      if v is not None and "skip" in v]
    if skips:
        print("skipped: " + "; ".join(skips))
    print("\nthe same ratios from the fastest step of each configuration (less sensitive to other "
          "load on the machine)")
    print(f"| {'model':<14} | {'m':>4} | {'a/b':>5} | {'a/c':>5} | {'a/c_':>5} | "
          f"{'vmap/loop':>9} |")
    print(f"|{'-' * 16}|{'-' * 6}|{'-' * 7}|{'-' * 7}|{'-' * 7}|{'-' * 11}|")
    for model in models:
        for m in workers[model]:
            auto = _auto_strategy(model, device, m)
            r = {meth: results.get((model, m, meth)) for meth in METHODS}
            a, k = r[auto], "best_samples_s"
            print(f"| {model:<14} | {m:>4} | {_ratio(a, r['csgd1'], k):>5} | "
                  f"{_ratio(a, r['ref'], k):>5} | {_ratio(a, r['paper'], k):>5} | "
                  f"{_ratio(r['vmap'], r['loop'], k):>9} |")


# ---- profiling ---------------------------------------------------------------------------------
def profile(spec: str, device: str) -> None:
    """``model:m:method``: torch.profiler table of 5 steps after 2 warmup steps."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile
    model, m, method = spec.split(":")
    step = _build_runner(model, int(m), method, device)
    step()
    step()
    cuda = device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with tprofile(activities=acts) as prof:
        for _ in range(5):
            step()
        sync()
    wall = (time.perf_counter() - t0) / 5
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    avgs = prof.key_averages()
    print(f"profile {spec} ({_device_line(device)}), 5 steps; wall {1e3 * wall:.2f} ms per step "
          f"(under the profiler)")
    if cuda:  # launch-bound if the kernels keep the GPU busy for only part of the step
        kernels = sum(e.self_device_time_total for e in avgs) / 5e3
        print(f"GPU kernel time {kernels:.2f} ms per step ({100 * kernels / (1e3 * wall):.0f}% "
              f"of the wall time), {sum(e.count for e in avgs if e.self_device_time_total) / 5:.0f}"
              " device-timed ops per step")
    print(avgs.table(sort_by=key, row_limit=22, max_name_column_width=48))


# ---- gossip modes inside the engine step ---------------------------------------------------------
def prototype(models: list[str], workers: list[int], repeats: int) -> None:
    """The D-SGD step with each of ``LocalCommunicator``'s gossip modes (auto, sparse, shift, and
    shift with the update fused by torch.compile), interleaved in one process. The modes began
    here as prototypes of engine changes; they are the library's own now."""
    import torch

    from dsgd.engine import Engine, LocalCommunicator
    from dsgd.models import build_model
    from dsgd.topology import make_topology
    print(f"gossip modes, {torch.get_num_threads()} threads: ms per D-SGD ring step (median of "
          f"{repeats}, interleaved); b = C-SGD one model at batch m*32")
    head = (f"| {'model':<8} | {'m':>4} | {'strategy':>8} | {'auto':>8} | {'sparse':>8} | "
            f"{'shift':>8} | {'shift+fused':>11} | {'b':>8} | {'gain':>5} | {'a/b auto':>10} | "
            f"{'a/b fused':>9} |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for name in models:
        for m in workers:
            torch.manual_seed(0)
            shape = SHAPES[name]
            model = build_model(name, 10, shape)
            topo = make_topology("ring", m)
            x, y = torch.randn(m, BATCH, *shape), torch.randint(0, 10, (m, BATCH))
            engines = {
                "auto": Engine(model, topo, lr=0.01),
                "sparse": Engine(model, comm=LocalCommunicator(topo, "sparse"), lr=0.01),
                "shift": Engine(model, comm=LocalCommunicator(topo, "shift"), lr=0.01),
                "shift+fused": Engine(model, comm=LocalCommunicator(topo, "shift", compile=True),
                                      lr=0.01),
            }
            steps = {k: (lambda e=e, x=x, y=y: e.step(x, y)) for k, e in engines.items()}
            steps["b"] = _build_runner(name, m, "csgd1", "cpu")
            times: dict[str, list[float]] = {k: [] for k in steps}
            for f in steps.values():
                f()
                f()
            for _ in range(repeats):
                for k, f in steps.items():
                    t0 = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t0)
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            w_ref = engines["auto"].w
            for k in ("sparse", "shift", "shift+fused"):
                assert torch.allclose(engines[k].w, w_ref, atol=1e-5), k
            print(f"| {name:<8} | {m:>4} | {engines['auto'].backend.name:>8} | {ms['auto']:8.1f} | "
                  f"{ms['sparse']:8.1f} | {ms['shift']:8.1f} | {ms['shift+fused']:11.1f} | "
                  f"{ms['b']:8.1f} | {ms['auto'] / ms['shift+fused']:5.2f} | "
                  f"{ms['b'] / ms['auto']:10.2f} | {ms['b'] / ms['shift+fused']:9.2f} |",
                  flush=True)


# ---- ratios from interleaved steps in one process ------------------------------------------------
def interleaved(models: list[str], workers: list[int], methods: list[str], repeats: int,
                device: str, block: int = 1) -> None:
    """(a)/(b) with the steps of every method alternating in one process: the machine's state
    (other load, clock) hits all methods alike, so the ratio is steadier than across processes.
    a = the engine with strategy auto; b = C-SGD on one model (csgd1). ``block`` > 1: each
    round runs that many steps of a method in a row and times all but the first, so that a
    method finds its own tensors in the cache, as in a run of it alone (with one step a round,
    each method's step follows another's, which evicted its state)."""
    import torch
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    engines = ["auto", *[m for m in methods if m not in ("auto", "csgd1", "csgd1:cl", "ref",
                                                         "paper")]]
    bases = ["csgd1", *(["csgd1:cl"] if "csgd1:cl" in methods else [])]
    names = engines + bases
    per_round = "one step" if block == 1 else f"{block} steps, the first untimed,"
    print(f"interleaved, {_device_line(device)}: ms per step, median over {repeats} rounds "
          f"({per_round} of each method per round); ratio = C-SGD time / method time"
          + ("; b_cl: C-SGD with channels-last images" if len(bases) > 1 else ""))
    ratios = [(n, "csgd1", f"{n}/b") for n in engines] + (
        [("auto", "csgd1:cl", "auto/b_cl")] if len(bases) > 1 else [])
    wid = {n: max(9, len(n) + 2) for n in names + [r[2] for r in ratios]}
    head = (f"| {'model':<14} | {'m':>4} | " + " | ".join(f"{n:>{wid[n]}}" for n in names)
            + " | " + " | ".join(f"{r[2]:>{wid[r[2]]}}" for r in ratios) + " |")
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    picks = []
    for model in models:
        for m in workers:
            steps = {n: _build_runner(model, m, n, device) for n in names}
            for f in steps.values():
                f()
                f()
            times: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(repeats):
                for n, f in steps.items():
                    for i in range(block):
                        sync()
                        t0 = time.perf_counter()
                        f()
                        sync()
                        if i or block == 1:
                            times[n].append(time.perf_counter() - t0)
            ms = {n: 1e3 * statistics.median(v) for n, v in times.items()}
            print(f"| {model:<14} | {m:>4} | "
                  + " | ".join(f"{ms[n]:{wid[n]}.2f}" for n in names) + " | "
                  + " | ".join(f"{ms[b] / ms[n]:{wid[r]}.2f}" for n, b, r in ratios)
                  + " |", flush=True)
            picks.append(f"{model} m={m}: {steps['auto'].engine.backend.reason}")
    print("\n".join(picks))


# ---- where an engine step's time goes -----------------------------------------------------------
def phases(models: list[str], workers: list[int], repeats: int, device: str) -> None:
    """The engine's step (strategy auto, D-SGD ring) split into its parts, beside C-SGD on one
    model, all interleaved in one process: the gradient backend (of which the flattening of the
    per-parameter gradients into the (m, P) rows), the update (optimizer direction, gossip and
    step), and the rest (batch checks, random-number bookkeeping). ``pass`` is the time of one
    pass over the (m, P) weights on this machine (``torch.add(w, d, out=buf)``: two reads and a
    write), the unit in which the memory-bound parts are counted."""
    import torch
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    print(f"phases, {_device_line(device)}: ms per step, median of {repeats} rounds")
    cols = ["step", "gradients", "flatten", "update", "rest", "csgd1", "pass", "ratio",
            "ratio w/o update"]
    print("| model | m | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t0 = time.perf_counter()
            r = fn(*a, **k)
            sync()
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
            return r
        return wrapper

    for model in models:
        for m in workers:
            step = _build_runner(model, m, "auto", device)
            base = _build_runner(model, m, "csgd1", device)
            eng = step.engine
            eng.backend.gradients = timed("gradients", eng.backend.gradients)
            eng.layout.flatten = timed("flatten", eng.layout.flatten)
            eng.optimizer = _Timed(eng.optimizer, "direction", timed)
            eng.algorithm = _Timed(eng.algorithm, "step", timed)
            w, d = eng.w, torch.randn_like(eng.w)
            buf = torch.empty_like(w)
            for f in (step, step, base, base):
                f()
            rows: dict[str, list[float]] = {c: [] for c in cols[:7]}
            for _ in range(repeats):
                spent.clear()
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                total = time.perf_counter() - t0
                update = spent.get("direction", 0) + spent.get("step", 0)
                rows["step"].append(total)
                rows["gradients"].append(spent.get("gradients", 0))
                rows["flatten"].append(spent.get("flatten", 0))
                rows["update"].append(update)
                rows["rest"].append(total - spent.get("gradients", 0) - update)
                sync()
                t0 = time.perf_counter()
                base()
                sync()
                rows["csgd1"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                torch.add(w, d, out=buf)
                sync()
                rows["pass"].append(time.perf_counter() - t0)
            ms = {c: 1e3 * statistics.median(v) for c, v in rows.items()}
            print(f"| {model} | {m} | " + " | ".join(f"{ms[c]:.2f}" for c in cols[:7])
                  + f" | {ms['csgd1'] / ms['step']:.2f} | "
                  f"{ms['csgd1'] / (ms['step'] - ms['update']):.2f} |", flush=True)


class _Timed:
    """An object (the engine's algorithm or optimizer) with one method timed (for ``phases``)."""

    def __init__(self, inner, method: str, timed):
        self._inner = inner
        setattr(self, method, timed(method, getattr(inner, method)))

    def __getattr__(self, name):
        return getattr(self._inner, name)


# ---- the paper's run, projected (GPU) ----------------------------------------------------------
PROJECTION = {  # row label -> (method, topology)
    "C-SGD": ("csgd:auto", "complete"),
    "C-SGD, loop": ("csgd:loop", "complete"),
    "D-SGD ring": ("auto", "ring"),
    "D-SGD ring, loop": ("loop", "ring"),
    "one model, 16x batch": ("csgd1", "complete"),
    "one model, bf16": ("csgd1:bf16", "complete"),
}


def paper_projection(args) -> None:
    """Time 100 iterations of the paper's CIFAR-10 ResNet-18 (16 workers, 64 and 512 per worker)
    and project to 6000 iterations and to the paper's 8 runs (C-SGD and D-SGD ring/grid/exp at
    total batch 1024 and 8192). Iteration time is measured on ``--projection-steps`` steps."""
    rows = []
    run = run_here if args.in_process else run_child
    for batch in args.projection_batches:
        for label, (method, topo) in PROJECTION.items():
            if args.projection_rows and label not in args.projection_rows:
                continue
            cfg = {"model": "resnet18_micro", "m": 16, "method": method, "device": args.device,
                   "image": args.image, "batch": batch, "topology": topo,
                   "limit": args.step_limit, "budget": args.budget,
                   "repeats": args.projection_steps}
            r = run(cfg, timeout=args.step_limit * 3 + args.budget * 2 + 120)
            rows.append((batch, label, r))
            _save(args.jsonl, {**cfg, **r, "projection": True})
            desc = r.get("skip") or f"{r['step_s']:.3f} s/step, {r['peak_mib'] / 1024:.1f} GiB"
            print(f"  batch {batch} {label}: {desc}", flush=True)
    print(f"\nPaper projection: resnet18_micro, 10 classes, 3x{args.image}x{args.image}, "
          f"16 workers; {_device_line(args.device)}")
    print(f"| {'batch/worker':>12} | {'run':<20} | {'s/100 it':>9} | {'h/6000 it':>9} | "
          f"{'max alloc GiB':>13} |")
    print(f"|{'-' * 14}|{'-' * 22}|{'-' * 11}|{'-' * 11}|{'-' * 15}|")
    hours: dict[tuple[int, str], float] = {}
    for batch, label, r in rows:
        if "skip" in r:
            print(f"| {batch:>12} | {label:<20} | {'—':>9} | {'—':>9} | {r['skip'][:13]:>13} |")
            continue
        s100 = r["step_s"] * 100
        hours[(batch, label)] = s100 * 60 / 3600
        print(f"| {batch:>12} | {label:<20} | {s100:9.1f} | {s100 * 60 / 3600:9.2f} | "
              f"{r['peak_mib'] / 1024:13.1f} |")
    total = 0.0
    for batch in args.projection_batches:
        # each run takes the faster of its strategies (what auto should pick)
        dsgd = min((hours[k] for k in ((batch, "D-SGD ring"), (batch, "D-SGD ring, loop"))
                    if k in hours), default=None)
        csgd = min((hours[k] for k in ((batch, "C-SGD"), (batch, "C-SGD, loop")) if k in hours),
                   default=None)
        if dsgd is None or csgd is None:
            print(f"8-run table: incomplete (batch {batch} not measured)")
            return
        total += csgd + 3 * dsgd  # ring, grid and exponential gossip cost the same here
    small, large = args.projection_batches
    print(f"8-run table (C-SGD + D-SGD ring/grid/exp at 16x{small} and 16x{large}, 6000 it each): "
          f"{total:.1f} GPU-hours in sequence (the authors report 8 to 50 hours per run)")


# ---- main --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet5", "resnet8", "resnet18_micro"])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 4, 16, 64, 256])
    ap.add_argument("--mlp-extra", nargs="*", type=int, default=[1024],
                    help="extra worker counts for the MLP only")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help=f"subset: {QUICK}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--step-limit", type=float, default=20.0,
                    help="skip a configuration whose first step takes longer (s)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="timed seconds per configuration; fewer repeats (>= 3) beyond it")
    ap.add_argument("--paper-projection", action="store_true")
    ap.add_argument("--image", type=int, default=56, help="image side for --paper-projection")
    ap.add_argument("--projection-steps", type=int, default=10)
    ap.add_argument("--projection-rows", nargs="+", choices=list(PROJECTION),
                    help="measure only these rows of the projection")
    ap.add_argument("--projection-batches", nargs=2, type=int, default=[64, 512],
                    help="per-worker batches of the paper's small- and large-batch runs")
    ap.add_argument("--profile", metavar="MODEL:M:METHOD")
    ap.add_argument("--interleaved", action="store_true",
                    help="(a)/(b) from alternating steps in one process (--models, --workers; "
                         "--methods adds vmap / loop / compile columns)")
    ap.add_argument("--block", type=int, default=1,
                    help="--interleaved: steps of a method in a row per round (all but the "
                         "first timed), so that each finds its state in the cache")
    ap.add_argument("--phases", action="store_true",
                    help="where the engine step's time goes (--models, --workers)")
    ap.add_argument("--prototype", action="store_true",
                    help="the step with each gossip mode, interleaved (--models, --workers)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's allocator settings alone (the CLI tunes them)")
    ap.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=None,
                    help="run the configurations in this process (default: on GPU only)")
    ap.add_argument("--jsonl", help="append every result to this JSON-lines file as it comes")
    ap.add_argument("--from-jsonl", help="print the tables from a file --jsonl wrote, run nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_process is None:
        args.in_process = args.device.startswith("cuda")

    import torch
    if args.child:
        cfg = json.loads(args.child)
        if cfg.get("keep_freed_memory", True):  # as the dsgd command line does
            from dsgd.engine.memory import keep_freed_memory
            keep_freed_memory()
        if cfg.get("threads"):
            torch.set_num_threads(cfg["threads"])
        print(json.dumps(measure(cfg)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_jsonl:
        print_saved(args.from_jsonl)
        return
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # every method alike: autotuned in warmup steps
    if args.profile:
        profile(args.profile, args.device)
        return
    if args.prototype:
        prototype(args.models, args.workers, args.repeats)
        return
    if args.phases or args.interleaved:
        if not args.default_malloc:
            from dsgd.engine.memory import keep_freed_memory
            keep_freed_memory()
        if args.phases:
            phases(args.models, args.workers, args.repeats, args.device)
        else:
            interleaved(args.models, args.workers, args.methods, args.repeats, args.device,
                        args.block)
        return
    if args.paper_projection:
        paper_projection(args)
        return
    if args.quick:
        args.models, args.workers, args.repeats = QUICK["models"], QUICK["workers"], QUICK[
            "repeats"]
        args.mlp_extra = []
    print(f"torch {torch.__version__}, {_device_line(args.device)}, "
          f"median of {args.repeats} steps after 2 warmup steps")
    workers = {mo: args.workers + (args.mlp_extra if mo == "mlp" else []) for mo in args.models}
    results = {}
    run = run_here if args.in_process else run_child
    # rounds over the models, m in the order given (put the m that matter first: a run cut short
    # still has them); a configuration is skipped when a smaller m of its method was too slow
    too_slow: dict[tuple[str, str], int] = {}
    for i in range(max(len(ms) for ms in workers.values())):
        for model in args.models:
            if i >= len(workers[model]):
                continue
            m = workers[model][i]
            auto = _auto_strategy(model, args.device, m)
            for method in args.methods:
                if method == "paper" and m == 1:
                    continue
                if too_slow.get((model, method), m + 1) < m:
                    results[(model, m, method)] = {"skip": "smaller m over the limit"}
                    continue
                cfg = {"model": model, "m": m, "method": method, "device": args.device,
                       "limit": args.step_limit, "budget": args.budget,
                       "repeats": args.repeats, "threads": args.threads,
                       "keep_freed_memory": not args.default_malloc}
                r = run(cfg, timeout=args.step_limit * 3 + args.budget * 2 + 120)
                results[(model, m, method)] = r
                _save(args.jsonl, {**r, "device": args.device})
                if r.get("skip", "").startswith(("one step", "out of memory")):
                    too_slow[(model, method)] = min(m, too_slow.get((model, method), m))
                desc = r.get("skip") or f"{r['samples_s']:.0f} samples/s, {r['peak_mib']:.0f} MiB"
                print(f"  {model} m={m} {method}{' (auto)' if method == auto else ''}: {desc}",
                      flush=True)
    print_table(results, args.models, workers, args.device)


def print_saved(path: str) -> None:
    """The tables of a run that ``--jsonl`` saved (also a run cut short)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    table = [r for r in rows if not r.get("projection")]
    if table:
        device = table[0].get("device", "cpu")
        results = {(r["model"], r["m"], r["method"]): r for r in table}
        models = list(dict.fromkeys(r["model"] for r in table))
        workers = {mo: [r["m"] for r in table if r["model"] == mo] for mo in models}
        print_table(results, models, workers, device)
    for r in rows:
        if r.get("projection"):
            desc = r.get("skip") or (f"{r['step_s'] * 100:.1f} s/100 it, "
                                     f"{r['step_s'] * 6000 / 3600:.2f} h/6000 it, "
                                     f"{r['peak_mib'] / 1024:.1f} GiB")
            print(f"projection: batch {r['batch']} {r['method']} {r['topology']}: {desc}")


if __name__ == "__main__":
    main()
