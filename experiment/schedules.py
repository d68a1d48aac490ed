"""The learning-rate schedules --schedule names, as a factor on every rate at each step
(torch-free, so a script can offer them before torch loads)."""

from __future__ import annotations

import math

# where the paper's rate drops tenfold, as fractions of the run (Jaderberg et al., appendix)
STEP_MILESTONES = (0.6, 0.8)
SCHEDULES = ("cosine", "constant", "step")


def rate_factor(kind: str, step: int, total_steps: int) -> float:
    """What the schedule `kind` multiplies every learning rate by at `step` of `total_steps`:
    cosine decay to 0, constant 1, or the DNI paper's steps (a tenth from 60% of the run, a
    hundredth from 80%, its 300k and 400k of 500k updates)."""
    if kind == "constant":
        return 1.0
    if kind == "step":
        first, second = STEP_MILESTONES
        return 1.0 if step < first * total_steps else 0.1 if step < second * total_steps else 0.01
    if kind != "cosine":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
