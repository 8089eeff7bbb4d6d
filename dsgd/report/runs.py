"""Reading run directories written by ``dsgd train``, and grouping the seeds of one setting.

A run directory holds::

    config.json    resolved config (flat or nested in sections such as "train", "data")
    version.json   {"dsgd": ..., "git": ..., "torch": ...}
    metrics.jsonl  one JSON object per evaluation: step, epoch, lr, train/test loss and accuracy,
                   consensus (Tr Xi), time, plus optional floats (hessian_trace, residual_*, ...)
    summary.json   {"final": {...}, "best_test_acc", "wall_time", "steps", "status"}

metrics.jsonl is what marks a directory as a run; the other files may be missing while a run is
being written, or after a crash, and then read as empty dicts.

Units: accuracies are stored as fractions in [0, 1] and reported in percent. A run whose
accuracies already exceed 1 was written in percent and is not rescaled (see ``accuracy_scale``).

This module reads JSON only: it never imports torch or an engine (STYLE.md point 12).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsgd.errors import UserError

METRICS_FILE = "metrics.jsonl"

# Config keys that do not define a setting: two runs differing only here are seeds of one
# setting. Matched against the last component of a dotted key ("data.seed" -> "seed"), except
# NAME_KEYS, which are matched against the whole dotted key ("model.name" is a setting).
SEED_SUFFIX = "seed"
NAME_KEYS = frozenset({"name", "run_name", "run.name", "experiment.name", "tag"})
PATH_KEYS = frozenset(
    {
        "out", "out_dir", "output", "output_dir", "run_dir", "runs_dir", "save_dir", "log_dir",
        "checkpoint_dir", "resume", "dir", "data_dir", "data_root", "root", "cache_dir",
    }
)  # fmt: skip
# Where and how a run was watched, not what it computes (matched like PATH_KEYS).
RUNTIME_KEYS = frozenset(
    {"device", "progress", "tensorboard", "checkpoint_every", "eval_batch_size"}
)

# Where the label's fields may live, most specific spelling first.
_LABEL_FIELDS: dict[str, tuple[str, ...]] = {
    "algorithm": ("algorithm", "algo"),
    "topology": ("topology",),
    "workers": ("workers", "n_workers", "world_size"),
    "batch_size": ("batch_size",),
}
_SECTIONS = ("train", "data", "model", "optim", "experiment")
_ALGORITHM_NAMES = {"dsgd": "D-SGD", "csgd": "C-SGD", "d-sgd": "D-SGD", "c-sgd": "C-SGD"}
# Algorithms without a communication graph: their topology says nothing and stays off the label.
_NO_TOPOLOGY = frozenset({"csgd", "c-sgd"})


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts to one dict with dotted keys: {"train": {"lr": 0.1}} -> {"train.lr": 0.1}."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def is_accuracy(key: str) -> bool:
    """Keys holding accuracies (reported in percent): test_acc, train_acc, best_test_acc, ..."""
    return key.endswith("acc") or key.endswith("accuracy")


def accuracy_scale(values: Iterable[float]) -> float:
    """100 if ``values`` are fractions (all finite ones within [0, 1]), else 1 (already percent)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return 100.0 if all(0.0 <= v <= 1.0 for v in finite) else 1.0


def _float(v: Any) -> float:
    """A metric value as a float; None, strings and other non-numbers become NaN."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


@dataclass
class Run:
    """One run directory, as read from disk. ``metrics`` is the list of evaluation rows."""

    name: str
    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    version: dict[str, Any]
    flat: dict[str, Any] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.flat = flatten(self.config)

    @property
    def status(self) -> str:
        """summary.json's status; "empty" without summary and metrics; "incomplete" otherwise,
        and for a "finished" that is not (see ``finished``)."""
        status = self.summary.get("status")
        if status == "finished" and not finished(self.summary, self.config):
            return "incomplete"
        if isinstance(status, str) and status:
            return status
        return "empty" if not self.metrics else "incomplete"

    @property
    def seed(self) -> Any:
        return lookup(self.flat, ("seed",))

    @property
    def metric_keys(self) -> list[str]:
        """Every key that holds a number in some row, in first-seen order."""
        keys: dict[str, None] = {}
        for row in self.metrics:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    keys.setdefault(k, None)
        return list(keys)

    def series(self, key: str, x: str = "step", percent: bool = True):
        """(x, y) float arrays over the rows that have ``key``; missing x or y values are NaN.

        Without any ``x`` in the rows, x is the row index.

        With ``percent``, accuracies stored as fractions are scaled to percent.
        """
        rows = [r for r in self.metrics if key in r]
        if any(x in r for r in self.metrics):
            xs = np.array([_float(r.get(x)) for r in rows], dtype=float)
        else:  # no x recorded at all: the evaluation index is the best axis left
            xs = np.array([i for i, r in enumerate(self.metrics) if key in r], dtype=float)
        ys = np.array([_float(r[key]) for r in rows], dtype=float)
        if percent and is_accuracy(key):
            ys = ys * accuracy_scale(ys.tolist())
        ys[~np.isfinite(ys)] = np.nan  # inf (a diverged loss) plots and averages like NaN
        return xs, ys

    def final(self, key: str, percent: bool = True) -> float:
        """The value of ``key`` at the end of the run: summary["final"], else the last row."""
        final = self.summary.get("final")
        if isinstance(final, Mapping) and key in final:
            value = _float(final[key])
            scale_from = [value] + [_float(r.get(key)) for r in self.metrics]
        else:
            rows = [r for r in self.metrics if key in r]
            if not rows:
                return math.nan
            value = _float(rows[-1][key])
            scale_from = [_float(r[key]) for r in rows]
        if percent and is_accuracy(key):
            value *= accuracy_scale(scale_from)
        return value


def finished(summary: Mapping[str, Any], config: Mapping[str, Any]) -> bool:
    """The one rule for "this run is done", shared by every reader (quickstart, reproduce,
    report): summary.json says "finished" and its step count reached the configured
    ``train.steps`` (a run that stopped early, or one extended with ``--resume --set
    train.steps=N``, is not done)."""
    if summary.get("status") != "finished":
        return False
    steps, target = summary.get("steps"), lookup(flatten(config), ("steps",))
    if not isinstance(target, int) or isinstance(target, bool):
        return True  # no step count configured: the status is all there is
    return isinstance(steps, int) and steps >= target


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """summary.json of a run directory; {} when missing, empty or unreadable (a run that
    died while writing it is as unfinished as one that never wrote it)."""
    try:
        return _read_json(Path(run_dir) / "summary.json")
    except (UserError, OSError):
        return {}


def is_finished(run_dir: str | os.PathLike) -> bool:
    """``finished`` for the run directory ``run_dir`` (False for anything unreadable)."""
    try:
        config = _read_json(Path(run_dir) / "config.json")
    except (UserError, OSError):
        return False
    return finished(read_summary(run_dir), config)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a crash mid-write) is dropped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): not a metrics file") from None
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # Python's json reads the NaN and Infinity it writes
        except (json.JSONDecodeError, RecursionError) as e:
            if i == len(lines) - 1:
                break  # a last line cut short by a crash or a run still being written
            raise UserError(f"{path}:{i + 1} is not valid JSON: {str(e)[:200]}") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{i + 1} should be a JSON object, found {type(row).__name__}")
        rows.append(row)
    return rows


def load_run(path: str | os.PathLike) -> Run:
    """Read one run directory; raises UserError when ``path`` is not one."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a run directory: no such directory")
    if not (path / METRICS_FILE).is_file():
        raise UserError(
            f"{path} is not a run directory: no {METRICS_FILE} (was it written by `dsgd train`?)"
        )
    config = _read_json(path / "config.json")
    name = config.get("name")
    return Run(
        name=name if isinstance(name, str) and _SAFE_NAME.fullmatch(name) else _safe(path.name),
        path=path,
        config=config,
        metrics=read_metrics(path / METRICS_FILE),
        summary=read_summary(path),  # unreadable (a crash while writing it): unfinished
        version=_read_json(path / "version.json"),
    )


def _run_dirs_under(root: Path) -> list[Path]:
    """Directories at any depth below ``root`` holding metrics.jsonl; runs are not descended."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if METRICS_FILE in filenames:
            found.append(Path(dirpath))
            dirnames.clear()
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def find_runs(paths: Sequence[str | os.PathLike] | str | os.PathLike) -> list[Run]:
    """Runs from run directories or from directories containing runs (at any depth).

    Order: as given, and sorted by path within a parent directory; duplicates are dropped.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runs: list[Run] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist: give run directories or folders holding them")
        if (p / METRICS_FILE).is_file():
            dirs = [p]
        else:
            dirs = _run_dirs_under(p) if p.is_dir() else []
            if not dirs:
                raise UserError(
                    f"{p} is not a run directory: no {METRICS_FILE} in it or below it "
                    "(was it written by `dsgd train`?)"
                )
        for d in dirs:
            if d.resolve() not in seen:
                seen.add(d.resolve())
                runs.append(load_run(d))
    if not runs:
        raise UserError("no run directories given")
    return runs


def lookup(flat: Mapping[str, Any], names: Sequence[str]) -> Any:
    """The first of ``names`` found in a flat config: at top level, in a usual section, anywhere.

    Returns None when absent.
    """
    for name in names:
        if name in flat:
            return flat[name]
        for section in _SECTIONS:
            if f"{section}.{name}" in flat:
                return flat[f"{section}.{name}"]
        for k in sorted(flat):
            if k.endswith("." + name):
                return flat[k]
    return None


def _ignored(key: str) -> bool:
    last = key.rsplit(".", 1)[-1]
    return (
        last.endswith(SEED_SUFFIX) or key in NAME_KEYS or last in PATH_KEYS or last in RUNTIME_KEYS
    )


def _hashable(v: Any) -> Any:
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (list, dict)) else v


def setting_key(run: Run, by: Sequence[str] | None = None) -> tuple[tuple[str, Any], ...]:
    """The identity of a run's setting: its flat config without seeds, names, paths and
    RUNTIME_KEYS, or only the dotted keys in ``by``."""
    if by is not None:
        return tuple((k, _hashable(run.flat.get(k))) for k in by)
    return tuple(sorted((k, _hashable(v)) for k, v in run.flat.items() if not _ignored(k)))


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def base_label(flat: Mapping[str, Any]) -> str | None:
    """"D-SGD ring m=16 B=64" from algorithm, topology, workers and per-worker batch size."""
    algo, topo, m, b = (lookup(flat, names) for names in _LABEL_FIELDS.values())
    parts = []
    if algo is not None:
        parts.append(_ALGORITHM_NAMES.get(str(algo).lower(), str(algo)))
    if topo is not None and str(algo).lower() not in _NO_TOPOLOGY:
        parts.append(str(topo))
    if m is not None:
        parts.append(f"m={m}")
    if b is not None:
        parts.append(f"B={b}")
    return " ".join(parts) or None


# Run names go into markdown headings and table cells: anything outside this set is replaced.
_SAFE_NAME = re.compile(r"[\w.+=-]{1,128}")


def _safe(name: str) -> str:
    return re.sub(r"[^\w.+=-]", "_", name)[:128] or "run"


_SEED_SUFFIX_RE = re.compile(r"[-_.]?(seed|s)[-_=]?\d+$", re.IGNORECASE)


@dataclass
class Group:
    """The runs (seeds) of one setting. ``key`` is ``setting_key`` of each of them."""

    label: str
    key: tuple[tuple[str, Any], ...]
    runs: list[Run]

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    @property
    def config(self) -> dict[str, Any]:
        """The flat config keys shared by every run of the group."""
        first = self.runs[0].flat
        return {
            k: v
            for k, v in first.items()
            if all(_hashable(r.flat.get(k)) == _hashable(v) for r in self.runs[1:])
        }


def group_runs(runs: Sequence[Run], by: Sequence[str] | None = None) -> list[Group]:
    """Group the seeds of each setting, in order of first appearance.

    The setting is the config without seeds, run names and paths (see ``setting_key``), or the
    dotted keys in ``by``. Labels come from ``base_label`` (else the run name without its seed
    suffix); groups whose labels collide get the config values that tell them apart appended.
    """
    buckets: dict[tuple, list[Run]] = {}
    for run in runs:
        buckets.setdefault(setting_key(run, by), []).append(run)
    groups = []
    for key, members in buckets.items():
        label = base_label(members[0].flat)
        if label is None:
            label = _SEED_SUFFIX_RE.sub("", members[0].name) or members[0].name
        groups.append(Group(label, key, members))
    _disambiguate(groups)
    return groups


def _disambiguate(groups: list[Group]) -> None:
    by_label: dict[str, list[Group]] = {}
    for g in groups:
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) < 2:
            continue
        keys = sorted({k for g in same for k, _ in g.key})
        dicts = [dict(g.key) for g in same]
        # At most three, so a label stays readable; the numbering below catches the rest.
        differing = [k for k in keys if len({repr(d.get(k)) for d in dicts}) > 1][:3]
        for g, d in zip(same, dicts):
            extra = " ".join(f"{k.rsplit('.', 1)[-1]}={_fmt_value(d.get(k))}" for k in differing)
            g.label = f"{g.label} {extra}".strip() if differing else g.label
    # Still equal (e.g. differing keys share a last component): number them.
    counts: dict[str, int] = {}
    for g in groups:
        counts[g.label] = counts.get(g.label, 0) + 1
    seen: dict[str, int] = {}
    for g in groups:
        if counts[g.label] > 1:
            seen[g.label] = seen.get(g.label, 0) + 1
            g.label = f"{g.label} #{seen[g.label]}"
