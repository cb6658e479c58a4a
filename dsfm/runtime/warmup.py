"""DeepSpeed's warmup schedulers, with no update at either end of the schedule.

DeepSpeed's WarmupLR, WarmupDecayLR and WarmupCosineLR start at iteration -1, which gives the
warmup's starting rate (WarmupCosineLR: 0, whatever warmup_min_ratio says), and the engine
steps them after each update to iteration 0, which gives the starting rate again: every run
made its first two updates at it, at lr 0 by default, while Adam's moments took in their
gradients, and a linear warmup of W steps reached (W - 1)/W of its peak at step W + 1.

The classes here take DeepSpeed's parameters and keep its state (`last_batch_iteration`, which
the engine steps and checkpoints as before), and give step n of a run (its n-th update, made at
iteration n - 2) the schedule's rate at n, where the schedule's two ends are not steps: the
warmup rises from its starting rate at step 0 to the peak at step W (n/W of the way at step n,
linear; log(n + 1)/log(W + 1), log), and the decay after it (DeepSpeed's linear or cosine
shape) falls from the peak at step W to its floor at step total_num_steps + 1, just past the
last step of a run whose "auto" total is train.max_steps. So no step is spent at a starting
rate or a floor of 0. A warmup of 1 step is one step (DeepSpeed makes it 2: a run whose "auto"
warmup is 1, under 30 steps, warmed up for 2). OneCycle, LRRangeTest and torch's schedulers
give their first update their configured starting rate and repeat none: they run as DeepSpeed or
torch has them.
"""

from __future__ import annotations

import inspect
import math

import torch
from deepspeed.runtime import lr_schedules as ds

from dsfm.runtime.schedule import WARMUP_SCHEDULERS


def _warmup(sched, n: int) -> float:
    """How far the warmup is at step n: from 0 (step 0, never trained) to 1 (step W on)."""
    w = sched.warmup_num_steps
    if n >= w:
        return 1.0
    if sched.warmup_type == ds.WARMUP_LOG_RATE:
        return math.log(n + 1) / math.log(w + 1)
    return n / w


def _decay(sched, n: int) -> float:
    """How far the decay is at step n > W: from 0 (the peak, step W) to 1 (the floor, step
    total_num_steps + 1, and any step after it)."""
    w = sched.warmup_num_steps
    return min(1.0, (n - w) / max(1, sched.total_num_steps + 1 - w))


def _step(sched) -> int:
    """The step whose update the optimizer's rate is for: the engine steps the scheduler
    after each update, from iteration -1."""
    return sched.last_batch_iteration + 2


class _GivenWarmup:
    """Keeps warmup_num_steps as given: DeepSpeed's constructors raise 1 to 2."""

    def __init__(self, optimizer, *args, **kwargs):
        given = inspect.signature(super().__init__).bind(optimizer, *args, **kwargs)
        given.apply_defaults()
        super().__init__(optimizer, *args, **kwargs)
        self.warmup_num_steps = given.arguments["warmup_num_steps"]
        if self.last_batch_iteration == -1:         # the first update's rate, set again
            self.step(-1)


class WarmupLR(_GivenWarmup, ds.WarmupLR):
    """DeepSpeed's WarmupLR, step n at the warmup's rate at n."""

    def get_lr(self):
        gamma = self._gamma_at(_step(self))
        return [low + delta * gamma for low, delta in zip(self.min_lrs, self.delta_lrs)]

    def _gamma_at(self, n: int) -> float:
        return _warmup(self, n)


class WarmupDecayLR(_GivenWarmup, ds.WarmupDecayLR):
    """DeepSpeed's WarmupDecayLR, step n at the schedule's rate at n: after the warmup, a
    linear decay to warmup_min_lr at step total_num_steps + 1."""

    get_lr = WarmupLR.get_lr

    def _gamma_at(self, n: int) -> float:
        if n <= self.warmup_num_steps:
            return _warmup(self, n)
        return 1.0 - _decay(self, n)


class WarmupCosineLR(_GivenWarmup, ds.WarmupCosineLR):
    """DeepSpeed's WarmupCosineLR, step n at the schedule's rate at n: after the warmup, a
    cosine decay to cos_min_ratio at step total_num_steps + 1."""

    def get_lr_ratio(self):
        n = _step(self)
        if n <= self.warmup_num_steps:
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * _warmup(self, n)
        cosine = (1 + math.cos(math.pi * _decay(self, n))) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self):
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]


def _ours(name: str, lr_schedule: int) -> bool:
    """Whether a scheduler of this `name` is built as dsfm's: DeepSpeed's warmup schedulers,
    unless `lr_schedule` is 1 (DeepSpeed's own, for runs begun on them)."""
    return name in WARMUP_SCHEDULERS and lr_schedule >= 2


def scheduler_class(name: str, lr_schedule: int):
    """The class a scheduler of this `name` is built from: dsfm's (`_ours`), else DeepSpeed's
    or torch's."""
    if _ours(name, lr_schedule):
        return globals()[name]
    return getattr(ds, name, None) or getattr(torch.optim.lr_scheduler, name)


def client_scheduler(ds_config: dict, lr_schedule: int):
    """For deepspeed.initialize's `lr_scheduler`: a callable building dsfm's class over the
    optimizer, or None where DeepSpeed builds the config's scheduler itself."""
    sched = ds_config.get("scheduler")
    if not sched or not _ours(sched["type"], lr_schedule):
        return None
    cls, params = globals()[sched["type"]], sched.get("params", {})
    return lambda optimizer: cls(optimizer, **params)
