"""Per-run records of ``dsgd reproduce`` grouped over seeds: mean ± std (``stats.stat``) per
(protocol, label, total batch, lr), diverged and unfinished runs excluded and counted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dsgd.report.stats import finite, stat

LABEL_ORDER = ("C-SGD", "D-SGD ring", "D-SGD grid", "D-SGD exponential")


def labels(rows: Sequence[dict]) -> list[str]:
    """The labels present in ``rows``: C-SGD first, then the paper's topologies, then others."""
    present = {r["label"] for r in rows}
    return [lab for lab in LABEL_ORDER if lab in present] + sorted(present - set(LABEL_ORDER))


def counted(r: dict, require: str = "test_acc") -> bool:
    """A run enters the statistics only if it finished with a finite ``require`` value; a
    diverged or unfinished run is excluded (and counted in its group's ``excluded``). Records
    without a status (measurements on finished checkpoints) count as finished."""
    return r.get("status", "finished") == "finished" and finite(r.get(require))


def group_runs(records: Sequence[dict], keys: Sequence[str], require: str = "test_acc"
               ) -> list[dict[str, Any]]:
    """One row per (protocol, label, total batch, lr): ``n`` counted runs, ``excluded`` by
    status (e.g. {"diverged": 1}), and ``stat`` of each key over the counted runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r.get("protocol", ""), r["label"], r["total_batch"], r.get("lr"))
        groups.setdefault(key, []).append(r)
    out = []
    for (protocol, lab, tb, lr), rs in groups.items():
        ok = [r for r in rs if counted(r, require)]
        excluded: dict[str, int] = {}
        for r in rs:
            if not counted(r, require):
                excluded[r.get("status", "?")] = excluded.get(r.get("status", "?"), 0) + 1
        out.append({"protocol": protocol, "label": lab, "total_batch": tb, "lr": lr,
                    "n": len(ok), "excluded": excluded,
                    **{k: stat([r.get(k) for r in ok]) for k in keys}})
    return out


def find(rows: Sequence[dict], label: str, total_batch: int, protocol: str | None = None
         ) -> dict | None:
    return next((r for r in rows if r["label"] == label and r["total_batch"] == total_batch
                 and (protocol is None or r.get("protocol", "") == protocol)), None)
