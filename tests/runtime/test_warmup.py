"""DeepSpeed's warmup schedulers as dsfm runs them (`dsfm.runtime.warmup`): step n of a run at
the schedule's rate at n, in real engines (tests/runtime/warmup_probe.py) and as classes.

Before, DeepSpeed's own classes made the first two updates of every run at the warmup's
starting rate (lr 0 in the shipped configs): the scheduler starts at iteration -1, which gives
that rate, and the engine steps it after each update to iteration 0, which gives it again."""

import json
import math
import re
import sys

import pytest
import torch
from deepspeed.runtime import lr_schedules

from dsfm.runtime import schedule
from dsfm.runtime.warmup import WarmupCosineLR, WarmupDecayLR, WarmupLR, scheduler_class
from tests.conftest import REPO, run
from tests.runtime.test_dist import _clean_env

PROBE = "tests/runtime/warmup_probe.py"
BASE = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 2}}


def cosine(progress: float) -> float:
    return (1 + math.cos(math.pi * progress)) / 2


def test_every_update_of_a_real_engine_takes_its_step_of_the_warmup(tmp_path):
    """Update k (step k + 1) of a W-step linear warmup from 0 uses lr_max (k + 1)/W and moves
    the weights; the decay after it reaches its floor only past the last step, so no step of
    the schedule is made at lr 0 (DeepSpeed's own: steps 1 and 2 at 0, weights unmoved)."""
    configs = {"shipped": f"{REPO}/ds_configs/zero2.json"}
    for name, sched, accum in (
            ("warmup_lr", {"type": "WarmupLR", "params": {
                "warmup_num_steps": 4, "warmup_max_lr": 1e-3, "warmup_type": "linear"}}, 1),
            ("warmup_lr_log", {"type": "WarmupLR", "params": {
                "warmup_num_steps": 4, "warmup_max_lr": 1e-3}}, 1),
            ("decay", {"type": "WarmupDecayLR", "params": {
                "total_num_steps": 8, "warmup_num_steps": 4, "warmup_max_lr": 1e-3,
                "warmup_type": "linear"}}, 1),
            ("cosine_accum", {"type": "WarmupCosineLR", "params": {
                "total_num_steps": 8, "warmup_num_steps": 4, "warmup_min_ratio": 0.1,
                "cos_min_ratio": 0.0, "warmup_type": "linear"}}, 2)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**BASE, "gradient_accumulation_steps": accum,
                                    "scheduler": sched}))
        configs[name] = str(path)
    proc = run([sys.executable, PROBE, "--updates", "8"]
               + [f"{n}={p}" for n, p in configs.items()], env=_clean_env(), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    got = {r["name"]: r for r in map(json.loads, re.findall(r"WARMUP (\{.*\})", out))}
    assert set(got) == set(configs), out[-4000:]
    for name, record in got.items():
        assert all(record["moved"]), (name, record)           # every update trains
        assert min(record["lr"]) > 0, (name, record)
    # the shipped configs at train.max_steps=100: 5 warmup steps to 3e-4, then the cosine
    assert got["shipped"]["lr"][:5] == pytest.approx([3e-4 * n / 5 for n in range(1, 6)])
    assert got["shipped"]["lr"][5] == pytest.approx(3e-4 * (0.01 + 0.99 * cosine(1 / 96)))
    assert got["warmup_lr"]["lr"] == pytest.approx([2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 5)
    assert got["warmup_lr_log"]["lr"] == pytest.approx(
        [1e-3 * math.log(n + 1) / math.log(5) for n in range(1, 4)] + [1e-3] * 5)
    # the linear decay from the peak at step 4 would reach 0 at step 9
    assert got["decay"]["lr"] == pytest.approx([1e-3 * n / 4 for n in range(1, 5)]
                                               + [1e-3 * (9 - n) / 5 for n in range(5, 9)])
    # warmup_min_ratio is where the warmup starts, at step 0 (DeepSpeed's first update: 0)
    assert got["cosine_accum"]["lr"] == pytest.approx(
        [1e-3 * (0.1 + 0.9 * n / 4) for n in range(1, 5)]
        + [1e-3 * cosine((n - 4) / 5) for n in range(5, 9)])


def rates(sched, opt, steps: int) -> list[float]:
    """The rate each of `steps` updates uses, the scheduler stepped after each as the engine
    does."""
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        sched.step()
    return out


def optimizer(lr: float = 1.0):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("cls,params", [
    (WarmupLR, {"warmup_num_steps": 5, "warmup_min_lr": 0.1, "warmup_max_lr": 1.0,
                "warmup_type": "linear"}),
    (WarmupDecayLR, {"total_num_steps": 12, "warmup_num_steps": 5, "warmup_max_lr": 1.0}),
    (WarmupCosineLR, {"total_num_steps": 12, "warmup_num_steps": 5, "cos_min_ratio": 0.1,
                      "warmup_type": "linear"}),
])
def test_a_resumed_schedule_continues_exactly_and_checkpoints_as_deepspeeds(cls, params):
    """The state is DeepSpeed's (the engine saves and loads it as before): a scheduler loaded
    from another's state_dict after 7 updates goes on with the same rates as the one that
    never stopped; the rates end at the configured floor one step past total_num_steps."""
    opt = optimizer()
    straight = rates(cls(opt, **params), opt, 16)
    opt = optimizer()
    first = cls(opt, **params)
    head = rates(first, opt, 7)
    state = first.state_dict()
    ds_twin = getattr(lr_schedules, cls.__name__)(optimizer(), **params)
    for _ in range(7):
        ds_twin.step()
    assert state == ds_twin.state_dict() == {"last_batch_iteration": 6}
    opt = optimizer()
    second = cls(opt, **params)
    second.load_state_dict(state)
    second.step(second.last_batch_iteration)     # the optimizer's rate, as its state holds it
    assert head + rates(second, opt, 9) == straight
    assert min(straight[:12]) > 0 and straight[4] == pytest.approx(1.0)     # peak: step W = 5
    if cls is not WarmupLR:
        floor = 0.1 if cls is WarmupCosineLR else 0.0
        assert straight[11] > floor and straight[12:] == pytest.approx([floor] * 4)


@pytest.mark.parametrize("cls,params", [
    (WarmupLR, {"warmup_max_lr": 1.0, "warmup_type": "linear"}),
    (WarmupLR, {"warmup_max_lr": 1.0}),
    (WarmupDecayLR, {"total_num_steps": 5, "warmup_max_lr": 1.0, "warmup_type": "linear"}),
    (WarmupCosineLR, {"total_num_steps": 5, "cos_min_ratio": 0.0}),
])
def test_a_one_step_warmup_peaks_at_step_one(cls, params):
    """warmup_num_steps 1 (what "auto" gives a run under 30 steps): DeepSpeed's constructors
    raise it to 2, so step 1 trained at half the peak (linear; 0.63 of it, log) and the decay
    was stretched to match; now step 1 is at the peak, and the decay falls from it to the floor
    at step total_num_steps + 1."""
    opt = optimizer()
    got = rates(cls(opt, warmup_num_steps=1, **params), opt, 7)
    if cls is WarmupLR:
        assert got == [1.0] * 7
    else:
        shape = (lambda p: 1 - p) if cls is WarmupDecayLR else cosine
        assert got == pytest.approx([shape((n - 1) / 5) for n in range(1, 6)] + [0.0] * 2)
    # given as a keyword or in its place, as DeepSpeed's own constructor takes it
    if cls is WarmupCosineLR:
        assert cls(optimizer(), 5, 0.0, 1).warmup_num_steps == 1


def test_other_schedulers_are_deepspeeds_or_torchs():
    """OneCycle and LRRangeTest give their first update their configured starting rate and
    repeat none; torch's start at theirs too: they are built as they are."""
    assert scheduler_class("OneCycle", schedule.LR_SCHEDULE) is lr_schedules.OneCycle
    assert scheduler_class("LRRangeTest", schedule.LR_SCHEDULE) is lr_schedules.LRRangeTest
    assert scheduler_class("LinearLR", schedule.LR_SCHEDULE) is torch.optim.lr_scheduler.LinearLR
    assert scheduler_class("WarmupCosineLR", 1) is lr_schedules.WarmupCosineLR
    opt = optimizer(1e-3)
    got = rates(lr_schedules.OneCycle(opt, cycle_min_lr=1e-4, cycle_max_lr=1e-3,
                                      cycle_first_step_size=3, cycle_momentum=False), opt, 4)
    assert got == pytest.approx([1e-4, 4e-4, 7e-4, 1e-3])
