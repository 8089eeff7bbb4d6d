"""Running a config from Python: ``dsgd.train("quickstart", out="runs/q", set=[...])``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsgd.experiments import config as C

ConfigLike = C.Config | str | Path


def load_config(config: ConfigLike | None = None,
                set: Sequence[str] | Mapping[str, Any] = ()) -> C.Config:  # noqa: A002
    """A validated Config from a Config, a TOML path or a preset name (None: the defaults),
    with overrides: ``["train.lr=0.05", ...]`` as on the command line, or a mapping
    ``{"train.lr": 0.05}`` of values. An invalid key or value is a one-line ConfigError."""
    raw = C.to_dict(config) if isinstance(config, C.Config) else (
        C.to_dict(C.load(config)) if config is not None else {})
    if isinstance(set, Mapping):
        for key, value in set.items():
            *path, last = key.split(".")
            node = raw
            for part in path:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise C.ConfigError(f"override {key!r}: {part} is not a section")
            node[last] = value
    else:
        C.apply_overrides(raw, list(set))
    return C.from_dict(raw)


def train(config: ConfigLike, out: str | Path | None = None, *,
          set: Sequence[str] | Mapping[str, Any] = (), resume: bool = False) -> dict:  # noqa: A002
    """Train a config in this process, as ``dsgd train`` does, into the run directory ``out``
    (default ``runs/<name>``); returns the summary (``summary["final"]`` holds the last
    evaluation: test_acc, test_loss, consensus, ...). ``resume=True`` continues the run in
    ``out`` from its last checkpoint."""
    from dsgd.experiments.runner import train as run

    cfg = load_config(config, set)
    return run(cfg, Path(out) if out is not None else Path("runs") / cfg.name, resume=resume)
