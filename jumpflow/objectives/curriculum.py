"""Training-step state for objectives with curricula (alpha-Flow's alpha schedule, iCT's
step doubling, sCT's tangent warm-up), written once.

The step lives in a buffer of a small module that the objective asks for through
``extra_modules``; the generator keeps it in ``net.aux``, so it is checkpointed with the
weights, copied (not averaged) by the trainer's EMA, and advanced by ``on_step_end``. An
objective never keeps a mutable counter of its own."""

from __future__ import annotations

import math

import torch
from torch import nn

from jumpflow.objectives.base import require


class StepCounter(nn.Module):
    """Optimiser steps taken: an ``int64`` scalar buffer ``step``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def advance(self) -> None:
        self.step += 1

    def forward(self) -> int:
        return int(self.step)


def counter_of(net, key: str, owner: str) -> StepCounter:
    """``net.aux[key]``, with a message naming the objective when the net has no such module."""
    aux = getattr(net, "aux", None)
    if aux is None or key not in aux:
        raise ValueError(f"{owner} needs the step counter net.aux[{key!r}] (the Generator builds it from "
                         f"objective.extra_modules)")
    return aux[key]


class TangentWarmup:
    """sCM's tangent warm-up (Lu & Song 2025, sec. 4): the term carrying ``du/dt`` is scaled by
    ``r_warm``, ramped linearly from 0 to 1 over ``tangent_warmup_steps`` optimiser steps, and the
    tangent may be normalised by ``||g|| + tangent_c``. Shared by sCT and AYF; the step count lives
    in ``net.aux[counter_key]`` so that it is checkpointed with the network."""

    counter_key = "tangent_step"

    def init_tangent(self, tangent_c: float | None, tangent_warmup_steps: int) -> None:
        require(tangent_c is None or tangent_c > 0, "tangent_c", f"must be > 0 or null, got {tangent_c}")
        require(isinstance(tangent_warmup_steps, int) and tangent_warmup_steps >= 0, "tangent_warmup_steps",
                f"must be an integer >= 0, got {tangent_warmup_steps!r}")
        self.tangent_c, self.tangent_warmup_steps = tangent_c, tangent_warmup_steps

    def schedule_lengths(self) -> dict[str, int]:
        return {"tangent_warmup_steps": self.tangent_warmup_steps} if self.tangent_warmup_steps > 0 else {}

    def warmup_modules(self) -> dict[str, nn.Module]:
        """The step counter, when there is a warm-up."""
        return {self.counter_key: StepCounter()} if self.tangent_warmup_steps > 0 else {}

    def on_step_end(self, net) -> None:
        if self.tangent_warmup_steps > 0:
            counter_of(net, self.counter_key, self.name).advance()

    def warmup(self, net) -> float:
        """``r_warm`` in ``[0, 1]`` at the net's current step."""
        if self.tangent_warmup_steps == 0:
            return 1.0
        return min(1.0, int(counter_of(net, self.counter_key, self.name).step) / self.tangent_warmup_steps)


SCHEDULES = ("sigmoid", "linear", "constant")


def check_ramp(schedule: str, steps, gamma: float, prefix: str) -> tuple[int, int]:
    """Validate the arguments of :func:`ramp`; returns ``(begin, finish)`` as ints."""
    require(schedule in SCHEDULES, f"{prefix}_schedule", f"must be one of {SCHEDULES}, got {schedule!r}")
    require(isinstance(steps, (list, tuple)) and len(steps) == 2, f"{prefix}_steps",
            f"must be [begin, end] training steps, got {steps!r}")
    begin, finish = steps
    require(all(isinstance(s, (int, float)) and float(s).is_integer() for s in steps) and 0 <= begin < finish,
            f"{prefix}_steps", f"need integers 0 <= begin < end, got {steps!r}")
    require(gamma > 0, f"{prefix}_gamma", f"must be > 0, got {gamma}")
    return int(begin), int(finish)


def ramp(step: int, schedule: str, start: float, end: float, begin: int, finish: int, gamma: float) -> float:
    """Value of a schedule from ``start`` (before ``begin``) to ``end`` (after ``finish``).

    ``sigmoid``: ``start + (end - start) * sigmoid(gamma * (step - mid) / (finish - begin))``
    with ``mid`` halfway (alpha-Flow's curriculum, gamma 25); ``linear``; ``constant``
    (always ``start``)."""
    if schedule == "constant" or step < begin:
        return float(start)
    if step > finish:
        return float(end)
    if schedule == "linear":
        frac = (step - begin) / (finish - begin)
    else:
        frac = 1.0 / (1.0 + math.exp(-gamma * (step - 0.5 * (begin + finish)) / (finish - begin)))
    return float(start + (end - start) * frac)


def halvings(step: int, curriculum_steps: int, stages: int) -> int:
    """Stage index ``a = min(floor(step / d), stages - 1)`` with ``d = max(1, curriculum_steps // stages)``:
    how many times a step size has been divided by the shrink factor at training step ``step``
    (ECT's ``dt = t n(t) / q^a``; iCT's doubling of ``N`` uses the same stage length)."""
    per_stage = max(1, int(curriculum_steps) // int(stages))
    return min(int(step) // per_stage, int(stages) - 1)
