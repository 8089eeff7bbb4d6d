"""Learning-rate schedules: pure functions ``step -> lr``.

Hyperparameters are in the units people tune: a peak ``lr``, a number of warmup *steps*, and
milestones in steps. The paper's schedule is ``warmup_multistep(lr, 60, [2400, 4800], 0.1)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Schedule = Callable[[int], float]


def constant(lr: float) -> Schedule:
    return lambda step: lr


def _warmup(lr: float, warmup_steps: int, step: int) -> float | None:
    # linear ramp lr * (step + 1) / warmup_steps over the first warmup_steps steps
    return lr * (step + 1) / warmup_steps if step < warmup_steps else None


def warmup_multistep(lr: float, warmup_steps: int = 0, milestones: Sequence[int] = (),
                     gamma: float = 0.1) -> Schedule:
    """Linear warmup, then lr * gamma^(number of milestones passed)."""
    milestones = sorted(milestones)

    def schedule(step: int) -> float:
        w = _warmup(lr, warmup_steps, step)
        return w if w is not None else lr * gamma ** sum(step >= s for s in milestones)

    return schedule


def cosine(lr: float, total_steps: int, warmup_steps: int = 0, final_lr: float = 0.0) -> Schedule:
    """Linear warmup, then cosine decay from lr to final_lr at total_steps."""

    def schedule(step: int) -> float:
        w = _warmup(lr, warmup_steps, step)
        if w is not None:
            return w
        frac = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * frac))

    return schedule
