"""Everything a training run measures about itself, in one object the train loop drives.

It owns the samplers (NVML for this rank's GPU, psutil for the host), the step-phase timer and
the FLOP counter, and at each log step returns this rank's numbers as a flat dict of tags, which
`board.gather` / `board.combine` turn into cross-rank statistics on rank 0.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch

from dsfm.monitor.steps import ModelFlops, StepTimer, memory_gib, numerics, peak_tflops


class RunMonitor:
    def __init__(self, model_config, device: torch.device, interval_s: float = 1.0,
                 gpu: bool = True, system: bool = True, notice: Callable[[str], None] = print,
                 frozen: frozenset[str] = frozenset()):
        self.device = device
        self.timer = StepTimer(device)
        self.flops = ModelFlops(model_config, frozen=frozen)
        self.samplers = []
        cuda = device.type == "cuda"
        if gpu and cuda:
            from dsfm.monitor.nvml import GpuSampler
            self.samplers.append(GpuSampler(device=device.index, interval_s=interval_s,
                                            notice=notice))
        elif gpu:
            notice("GPU metrics unavailable: training on CPU; " + (
                "logging system/ metrics (psutil) in the same dashboards" if system else
                "system/ metrics are off too (monitor.system=false)"))
        if system:
            from dsfm.monitor.system import SystemSampler
            self.samplers.append(SystemSampler(interval_s=interval_s))
        for sampler in self.samplers:
            sampler.start()
        name = torch.cuda.get_device_name(device) if cuda else "CPU"
        self.peak = peak_tflops(name) if cuda else None
        self.numerics = numerics() if cuda else "fp32"
        self._flop = 0.0
        self._samples = 0
        self._patches = 0
        self._t0 = time.perf_counter()
        self._outside = 0.0          # seconds since _t0 not spent training

    @contextlib.contextmanager
    def outside_training(self):
        """Time that is not training (evaluation, checkpoints): left out of the rates."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self._outside += time.perf_counter() - began

    def micro_batch(self, x_shape: tuple[int, ...], wait_s: float) -> None:
        """Account for one trained micro-batch: its data wait, FLOPs, samples and patches."""
        self.timer.data(wait_s)
        began = time.perf_counter()
        self._flop += self.flops.step(x_shape)
        counting = time.perf_counter() - began        # a new shape: a meta-device count
        self.timer.exclude(counting)
        self._outside += counting
        self._samples += x_shape[0]
        self._patches += self.flops.patches(x_shape)

    def collect(self) -> dict[str, float]:
        """This rank's numbers since the last call."""
        now = time.perf_counter()
        elapsed = max(now - self._t0 - self._outside, 1e-9)
        out = self.timer.collect()
        tflops = self._flop / elapsed / 1e12
        out.update({"perf/samples_per_sec": self._samples / elapsed,
                    "perf/patches_per_sec": self._patches / elapsed,
                    "perf/tflops": tflops})
        if self.peak:
            out["perf/mfu"] = tflops / self.peak
        out.update(memory_gib(self.device))
        for sampler in self.samplers:
            out.update(sampler.snapshot())
        self._flop, self._samples, self._patches, self._t0 = 0.0, 0, 0, now
        self._outside = 0.0
        return out

    def close(self) -> None:
        for sampler in self.samplers:
            sampler.stop()
        self.samplers = []
