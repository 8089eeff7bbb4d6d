"""Run configuration: frozen, typed dataclasses; presets are TOML files; overrides are
``section.key=value`` strings. The resolved config is saved with every run.

A config file has the sections ``[data]``, ``[model]``, ``[train]``, ``[log]``, ``[network]`` and
the top-level keys ``name`` and ``device``. Every key is optional (defaults below); an unknown key
or a value of the wrong type is a one-line ``ConfigError``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsgd.errors import UserError

PRESETS = Path(__file__).parent / "presets"


class ConfigError(UserError):
    """A malformed config file, an unknown key or an invalid value."""


# A run name becomes a directory (runs/<name>), a TOML string and a report heading: one path
# component of letters, digits and . _ + = -, not starting with a dot (no "..", no newline).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}")
DEVICE_PATTERN = re.compile(r"cpu|cuda(:[0-9]+)?")
INT64_MAX = 2**63 - 1  # steps, seeds and sizes end up in int64 tensors and checkpoints

# Settings that change how a run is watched or where it runs, not what it computes: they may
# differ between the processes of a torchrun job (each has its own device) ...
PER_PROCESS_KEYS = ("name", "device", "log.progress", "log.tensorboard", "log.eval_batch_size")
# ... and on --resume (every process must checkpoint at the same steps, though).
RUNTIME_KEYS = (*PER_PROCESS_KEYS, "log.checkpoint_every")
# May change on --resume: a finished run is extended by raising it.
RESUMABLE_KEYS = ("train.steps",)


@dataclass(frozen=True)
class DataConfig:
    # fashion-mnist | mnist1d | cifar10 | cifar100 | tiny-imagenet | synthetic, or your own
    # "package.module:factory" returning (train, test) Datasets
    name: str = "fashion-mnist"
    dir: str | None = None  # where a file-based data set lives (default /usr/share/datasets/<name>)
    n_train: int | None = None  # keep the first N training samples (None: all)
    n_test: int | None = None  # keep the first N test samples (None: all)
    image_size: int | None = None  # resize images to S x S (the paper: 56 for CIFAR)
    # iid (seeded shuffle into equal shards, as the paper) | dirichlet | shards
    partition: str = "iid"
    alpha: float = 1.0  # Dirichlet concentration (smaller: more label skew)
    shards_per_worker: int = 2  # shards: label-sorted shards per worker (at most that many classes)
    augment: bool = False  # random crop (pad 4) + horizontal flip
    options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the data factory


@dataclass(frozen=True)
class ModelConfig:
    name: str = "lenet5"  # a built-in model (see dsgd config), or your own "package.module:factory"
    options: dict[str, Any] = field(default_factory=dict)  # passed to the model factory


@dataclass(frozen=True)
class TrainConfig:
    # dsgd | csgd | local | gt | d2 | qgm | pushsum | drdsgd | choco | deepsqueeze
    # (docs/algorithms.md)
    algorithm: str = "dsgd"
    topology: str = "ring"  # the mixing graph: ring | grid | torus | exponential | ...
    # relabel the workers every step: false | true or "symmetric" (P' = Pi^T P Pi, one fresh
    # permutation) | "paper" (P' = Pi1^T P Pi2, two independent ones, as the paper's code)
    shuffle_topology: bool | str = False
    workers: int = 16  # m, the number of D-SGD workers
    batch_size: int = 32  # per worker; the total batch is workers * batch_size
    steps: int = 1000  # training iterations (every worker takes one step each)
    lr: float = 0.1  # peak learning rate (scale it linearly with the total batch yourself)
    schedule: str = "multistep"  # multistep | cosine | constant
    warmup_steps: int = 0  # linear warmup from lr/warmup_steps to lr
    milestones: list[int] = field(default_factory=list)  # steps where lr *= gamma
    gamma: float = 0.1  # multistep: the lr factor at each milestone
    momentum: float = 0.0  # SGD momentum (torch.optim.SGD's rule, per worker)
    nesterov: bool = False  # Nesterov momentum (needs momentum > 0)
    weight_decay: float = 0.0  # L2 penalty, taken at the worker's pre-gossip weights
    gossip_every: int = 1  # > 1: local SGD, gossip every tau steps
    buffers: str = "gossip"  # BatchNorm statistics: gossip (mixed like weights) | local
    strategy: str = "auto"  # how the workers' gradients are computed: auto | vmap | loop
    compile: bool = False  # torch.compile the step (slow first steps; CPU needs g++)
    chunk_size: int = 0  # vmap over this many workers at a time (0: all); caps activation memory
    gradient: str = "sgd"  # sgd | sam | asam | avg_sam (average-direction SAM, isotropic)
    rho: float = 0.05  # SAM/ASAM radius
    sigma: float = 0.01  # avg_sam: eps ~ N(0, sigma^2 I)
    samples: int = 2  # avg_sam: Monte-Carlo samples per step
    qgm_beta: float = 0.9  # qgm: the quasi-global momentum factor (Lin et al. 2021)
    drdsgd_lambda: float = 10.0  # drdsgd: the robustness lambda (the paper's analysis: > 1)
    # choco, deepsqueeze (compressed gossip), csgd (compressed gradients, error feedback): the
    # compressor, e.g. {name = "topk", ratio = 0.01}; names none | topk | randomk | qsgd
    # (levels, bucket) | sign | lowp (dtype)
    compression: dict[str, Any] = field(default_factory=dict)
    consensus_step: float = 1.0  # choco, deepsqueeze: the consensus step size gamma, in (0, 1]
    # lazy gossip: P' = lazy I + (1 - lazy) P; 0.5 lifts an even ring's -1/3 eigenvalue for d2
    lazy: float = 0.0
    # dropped links and stragglers, e.g. {drop = 0.1, stragglers = 0.05, straggle_steps = 3}
    faults: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # fp32 | bf16 (forward/backward under autocast; weights float32)
    seed: int = 0  # seeds the model's initialization, the partition, shuffles and augmentation


@dataclass(frozen=True)
class LogConfig:
    eval_every: int = 100  # steps between evaluations (a JSON line in metrics.jsonl)
    checkpoint_every: int = 500  # steps between checkpoints (and always at the end)
    eval_batch_size: int = 1000  # test samples per forward pass when evaluating
    progress: bool = True  # progress bar
    tensorboard: bool = False  # also write TensorBoard events to <out>/tensorboard
    # costly measurements at eval time: hessian (trace, top eigenvalue, Tr(H Xi)),
    # equivalence (the D-SGD = average-direction SAM decomposition), uncertainty (ECE, NLL)
    instruments: list[str] = field(default_factory=list)
    instrument_samples: int = 256  # training samples the instruments evaluate the loss on


@dataclass(frozen=True)
class NetworkConfig:
    # the simulated clock behind every eval row's sim_time_s (dsgd.engine.network)
    latency_ms: float = 1.0  # per message
    bandwidth_gbps: float = 1.0  # per link, Gbit/s
    compute_ms: float = 0.0  # one worker's gradient time per step; 0: measured from the run
    # stragglers of the clock (its neighbours wait for them; the same values in train.faults,
    # drawn from the same seed, also make them miss the gossip):
    stragglers: float = 0.0  # probability a step that a worker falls behind
    straggle_steps: int = 1  # steps it stays behind
    straggler_ms: float = 0.0  # extra compute per step while behind


@dataclass(frozen=True)
class Config:
    name: str = "run"  # the run's name (the default run directory is runs/<name>)
    device: str = "cpu"  # cpu | cuda | cuda:N
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)


ALGORITHMS = ("dsgd", "csgd", "local", "gt", "d2", "qgm", "pushsum", "drdsgd", "choco",
              "deepsqueeze")
COMPRESSORS = {"none": (), "topk": ("ratio",), "randomk": ("ratio",), "qsgd": ("levels", "bucket"),
               "sign": (), "lowp": ("dtype",)}
COMPRESSED = ("choco", "deepsqueeze", "csgd")  # the algorithms train.compression applies to
# why the others refuse it: what compression error, held back in a residual, would break
UNCOMPRESSIBLE = {
    "gt": "gradient tracking needs sum_j y_j = sum_j g_j at every step, which compression error "
          "left in a residual breaks",
    "d2": "D2's extrapolation 2 x(t) - x(t-1) of the mixed weights would amplify compression "
          "error instead of letting it decay",
    "qgm": "QG-DSGDm takes its momentum from the change of the gossiped weights, which "
           "compression error would enter",
    "pushsum": "push-sum needs the mass of its weights psi conserved, which compression error "
               "left in a residual breaks",
}
FAULTS = ("drop", "stragglers", "straggle_steps", "seed")
SCHEDULES = ("multistep", "cosine", "constant")
GRADIENTS = ("sgd", "sam", "asam", "avg_sam")
INSTRUMENTS = ("hessian", "equivalence", "uncertainty")


def _check_type(where: str, value: Any, hint: Any) -> Any:
    """Return value converted to the annotated type, or raise ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) > 1 and all(a in (int, float, str, bool) for a in kinds):
            if not any(type(value) is a for a in kinds):  # bool | str: either, as given
                names = " or ".join(a.__name__ for a in kinds)
                raise ConfigError(f"{where} must be {names}, got {value!r}")
            return value
        hint = kinds[0]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and type(value) is float and not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if hint is int and type(value) is int and abs(value) > INT64_MAX:
        raise ConfigError(f"{where} = {value} does not fit in 64 bits")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_check_type(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {hint} for {where}")  # a bug, not a user error


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; known keys"
                          f"{' in [' + where + ']' if where else ''}: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"[{name}] must be a table, got {value!r}")
            kwargs[name] = _build(hints[name], value, name)
        else:
            kwargs[name] = _check_type(key, value, hints[name])
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Semantic checks with one-line messages; returns cfg."""
    from dsgd.data import DATASETS, PARTITIONS
    from dsgd.models import MODELS
    from dsgd.topology import NAMES as TOPOLOGIES

    t, d, log = cfg.train, cfg.data, cfg.log

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(t.algorithm in ALGORITHMS, f"train.algorithm must be one of {', '.join(ALGORITHMS)}, "
                                    f"got {t.algorithm!r}")
    need(t.topology in TOPOLOGIES, f"unknown topology {t.topology!r} (train.topology); choose "
                                   f"one of {', '.join(TOPOLOGIES)}")
    need(":" in cfg.model.name or cfg.model.name.lower() in MODELS,
         f"unknown model {cfg.model.name!r} (model.name); choose one of "
         f"{', '.join(sorted(MODELS))} or name your own as \"package.module:factory\"")
    need(":" in d.name or d.name in DATASETS,
         f"unknown dataset {d.name!r} (data.name); choose one of {', '.join(DATASETS)} or name "
         "your own as \"package.module:factory\"")
    need(d.partition in PARTITIONS, f"data.partition must be one of {', '.join(PARTITIONS)}, "
                                    f"got {d.partition!r}")
    need(d.shards_per_worker >= 1, f"data.shards_per_worker must be >= 1, got "
                                   f"{d.shards_per_worker}")
    need(d.alpha > 0, f"data.alpha must be > 0, got {d.alpha}")
    need(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    need(t.workers >= 1, f"train.workers must be >= 1, got {t.workers}")
    need(t.workers >= 2 or t.topology != "exponential" or t.algorithm != "dsgd",
         "train.topology = exponential needs train.workers >= 2 (one worker has no "
         "neighbours); for plain SGD on one worker use train.algorithm = csgd")
    need(t.batch_size >= 1, f"train.batch_size must be a positive integer, got {t.batch_size}")
    need(t.steps >= 1, f"train.steps must be >= 1, got {t.steps}")
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    need(t.momentum >= 0 and t.weight_decay >= 0, "train.momentum and train.weight_decay "
                                                   "must be >= 0")
    need(not t.nesterov or t.momentum > 0, "train.nesterov needs train.momentum > 0")
    need(t.shuffle_topology in (False, True, "symmetric", "paper"),
         f"train.shuffle_topology must be false, true, \"symmetric\" or \"paper\", got "
         f"{t.shuffle_topology!r}")
    need(t.gossip_every >= 1, f"train.gossip_every must be >= 1, got {t.gossip_every}")
    need(t.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}")
    need(t.buffers in ("gossip", "local"), "train.buffers must be gossip or local")
    need(t.strategy in ("auto", "vmap", "loop"), "train.strategy must be auto, vmap or loop")
    need(t.chunk_size >= 0, f"train.chunk_size must be >= 0 (0: all workers), got {t.chunk_size}")
    need(t.gradient in GRADIENTS, f"train.gradient must be one of {', '.join(GRADIENTS)}")
    need(t.rho >= 0 and t.sigma >= 0, "train.rho and train.sigma must be >= 0")
    need(t.samples >= 2 and t.samples % 2 == 0, "train.samples must be an even number >= 2")
    need(0 <= t.qgm_beta < 1, f"train.qgm_beta must be in [0, 1), got {t.qgm_beta}")
    need(t.drdsgd_lambda > 0, f"train.drdsgd_lambda must be > 0, got {t.drdsgd_lambda}")
    need(0 < t.consensus_step <= 1, f"train.consensus_step must be in (0, 1], got "
                                    f"{t.consensus_step}")
    comp = t.compression.get("name", "none")
    need(comp in COMPRESSORS, f"train.compression.name must be one of {', '.join(COMPRESSORS)}, "
                              f"got {comp!r}")
    extra = sorted(set(t.compression) - {"name", *COMPRESSORS.get(comp, ())})
    need(not extra, f"train.compression: {comp} takes {list(COMPRESSORS.get(comp, ()))}, "
                    f"not {extra}")
    need(not t.compression or t.algorithm not in UNCOMPRESSIBLE,
         f"train.compression does not apply to {t.algorithm}: "
         f"{UNCOMPRESSIBLE.get(t.algorithm)}; use choco, deepsqueeze or csgd")
    need(not t.compression or t.algorithm in COMPRESSED,
         "train.compression applies to train.algorithm = choco, deepsqueeze (compressed gossip) "
         "or csgd (compressed gradients, error feedback)")
    need(set(t.faults) <= set(FAULTS), f"train.faults takes {', '.join(FAULTS)}, got "
                                       f"{sorted(t.faults)}")
    need(0 <= t.lazy < 1, f"train.lazy must be in [0, 1), got {t.lazy}")
    n = cfg.network
    need(n.latency_ms >= 0 and n.compute_ms >= 0 and n.straggler_ms >= 0,
         "network.latency_ms, network.compute_ms and network.straggler_ms must be >= 0")
    need(n.bandwidth_gbps > 0, f"network.bandwidth_gbps must be > 0, got {n.bandwidth_gbps}")
    need(0 <= n.stragglers <= 1 and n.straggle_steps >= 1,
         "network.stragglers must be a probability and network.straggle_steps >= 1")
    need(t.precision in ("fp32", "bf16"), f"train.precision must be fp32 or bf16, got "
                                          f"{t.precision!r}")
    need(log.eval_every >= 1 and log.checkpoint_every >= 1 and log.eval_batch_size >= 1,
         "log.eval_every, log.checkpoint_every and log.eval_batch_size must be >= 1")
    bad = sorted(set(log.instruments) - set(INSTRUMENTS))
    need(not bad, f"unknown instrument {bad[0] if bad else ''!r} in log.instruments; choose "
                  f"from {', '.join(INSTRUMENTS)}")
    need(DEVICE_PATTERN.fullmatch(cfg.device) is not None,
         f"device must be cpu, cuda or cuda:N, got {cfg.device!r}")
    need(NAME_PATTERN.fullmatch(cfg.name) is not None,
         f"name must be 1-128 letters, digits or . _ + = - (not starting with a dot), since it "
         f"names the run directory; got {cfg.name!r}")
    need(all(m >= 1 for m in t.milestones) and t.milestones == sorted(set(t.milestones)),
         f"train.milestones must be increasing steps >= 1, got {t.milestones}")
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    return validate(_build(Config, raw, ""))


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """``cfg`` with ``section.key=value`` overrides applied, validated again."""
    return from_dict(apply_overrides(to_dict(cfg), overrides))


def _parse_value(text: str) -> Any:
    """A TOML value (1e-3, true, [1, 2], "x"); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dict (in place; returned)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        *path, last = key.strip().split(".")
        node = raw
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[last] = _parse_value(value.strip())
    return raw


def resolve_path(path: str | Path) -> Path:
    """A config path, or the name of a preset shipped with dsgd (e.g. ``quickstart``)."""
    p = Path(path)
    if p.is_file():
        return p
    preset = PRESETS / f"{p.stem if p.suffix == '.toml' else p.name}.toml"
    if preset.is_file() and not p.parent.name:
        return preset
    known = ", ".join(sorted(f.stem for f in PRESETS.glob("*.toml")))
    raise ConfigError(f"config file {path} not found (presets: {known})")


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (a file or a preset name), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = resolve_path(path)
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{p} is not valid TOML: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{p} is not UTF-8 text (byte {err.start}); TOML files are "
                              "UTF-8: re-save it as UTF-8") from None
        except OSError as err:
            raise ConfigError(f"cannot read config file {p}: {err.strerror}") from None
    return from_dict(apply_overrides(raw, overrides or []))


def dumps_toml(cfg: Config) -> str:
    """The resolved config as TOML (None values are left out: they mean the default)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):  # JSON's escapes (\n, \", \uXXXX) are TOML's; TOML also bars DEL
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):  # keys quoted: an option name may be any string
            return "{" + ", ".join(f"{fmt(str(k))} = {fmt(x)}" for k, x in v.items()) + "}"
        return repr(v)

    lines, tables = [], []
    for k, v in to_dict(cfg).items():
        if isinstance(v, dict):
            body = [f"{kk} = {fmt(vv)}" for kk, vv in v.items() if vv is not None]
            tables.append(f"\n[{k}]\n" + "\n".join(body))
        elif v is not None:
            lines.append(f"{k} = {fmt(v)}")
    return "\n".join(lines) + "\n" + "\n".join(tables) + "\n"


def computation(cfg: Config | dict[str, Any], ignore: tuple[str, ...] = RUNTIME_KEYS
                ) -> dict[str, Any]:
    """The flat config (dotted keys) without ``ignore``: what determines the run's numbers."""
    raw = to_dict(cfg) if isinstance(cfg, Config) else cfg

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = prefix + k
            if isinstance(v, dict) and key != "model.options":
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    return {k: v for k, v in flat(raw).items() if k not in ignore}


def fingerprint(cfg: Config) -> int:
    """A 63-bit hash of the config without PER_PROCESS_KEYS: equal on every process of a job."""
    text = json.dumps(computation(cfg, PER_PROCESS_KEYS), sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def differences(saved: dict[str, Any], cfg: Config, allowed: tuple[str, ...] = ()
                ) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every computation key that differs, except ``allowed``.

    Values are compared as JSON text, so a NaN saved by an older version equals a NaN."""
    a, b = computation(saved), computation(cfg)

    def norm(v: Any) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in allowed and norm(a.get(k)) != norm(b.get(k))]
