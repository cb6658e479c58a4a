"""Where a training step's time goes, and how close to the hardware it runs.

`StepTimer` splits every step into data wait (the loader's own clock: the trainer blocked on the
next batch), forward, backward (with DeepSpeed's gradient reduction, which runs inside it) and
optimizer step. On a GPU the three compute phases are timed with CUDA events, read only at log
time (no synchronization in the step); on CPU with host clocks. `ModelFlops` counts a training
step's FLOPs once per input shape with torch.utils.flop_counter on a meta-device copy of the model
(no compute, no memory), so achieved TFLOP/s and MFU come from the real operator mix.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import torch

# Dense peak TFLOP/s per card: (fp32 on CUDA cores, TF32 on tensor cores), from NVIDIA's
# datasheets (TF32 there is quoted with sparsity: half of it). Matched in order against the
# NVML name, case-insensitively: the PCIe and NVL cards first, then the SXM parts, whose names
# carry no form factor ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA GH200 480GB").
PEAK_TFLOPS = (
    ("H100 PCIe", 51.0, 378.0),
    ("H100 NVL", 60.0, 417.5),
    ("H200 NVL", 60.0, 417.5),
    ("H100", 67.0, 494.7),
    ("H200", 67.0, 494.7),
    ("A100", 19.5, 156.0),          # SXM4 and PCIe alike
)
PHASES = ("forward", "backward", "optimizer")


def numerics() -> str:
    """"tf32" when CUDA matmuls may use TF32 tensor cores, else "fp32"."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_tflops(device_name: str, kind: str | None = None) -> float | None:
    """Dense peak of the named card for fp32 or TF32; None for a card not in the table."""
    kind = kind or numerics()
    for card, fp32, tf32 in PEAK_TFLOPS:
        if card.lower() in device_name.lower():
            return tf32 if kind == "tf32" else fp32
    return None


class StepTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[str, object, object]] = []   # (phase, start, end)
        self._host: dict[str, float] = defaultdict(float)
        self._data_s = 0.0
        self._steps = 0
        self._step_s = 0.0
        self._step_start: float | None = None
        self._mark = None
        self._phase_start = None

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin_step(self) -> None:
        self._step_start = time.perf_counter()

    def data(self, wait_s: float) -> None:
        """The loader's wait for this micro-batch (host clock)."""
        self._data_s += wait_s

    def start(self) -> None:
        self._phase_start = self._now()

    def lap(self, phase: str) -> None:
        """End `phase` (forward, backward, optimizer) and start the next one."""
        now = self._now()
        if self.cuda:
            self._pending.append((phase, self._phase_start, now))
        else:
            self._host[phase] += now - self._phase_start
        self._phase_start = now

    def end_step(self) -> None:
        self._steps += 1
        self._step_s += time.perf_counter() - self._step_start

    def exclude(self, seconds: float) -> None:
        """Host time spent inside a step on the monitor's own work (counting a new shape's
        FLOPs), not the training's: left out of the step time."""
        self._step_s -= seconds

    def collect(self) -> dict[str, float]:
        """Mean milliseconds per step for each phase since the last call, and the step time."""
        if not self._steps:
            return {}
        ms = dict(self._host)
        if self._pending:
            self._pending[-1][2].synchronize()
            for phase, start, end in self._pending:
                ms[phase] = ms.get(phase, 0.0) + start.elapsed_time(end) / 1e3
        n = self._steps
        out = {f"time/{p}_ms": 1e3 * ms.get(p, 0.0) / n for p in PHASES}
        out["time/data_wait_ms"] = 1e3 * self._data_s / n
        out["time/step_ms"] = 1e3 * self._step_s / n
        out["perf/data_wait_pct"] = 100.0 * self._data_s / max(self._step_s, 1e-12)
        self._pending.clear()
        self._host.clear()
        self._data_s = self._step_s = 0.0
        self._steps = 0
        return out


class ModelFlops:
    """FLOPs of one training step (forward + backward) of `config`'s AViT per input shape,
    counted on the real operators of a meta-device model (its last block on the decoded frame
    only: AViT.skip_unused_frames); cached per shape. Counted with
    attention="fused" whatever the config's: packed attention computes the scores between
    the sequences it packs together too (-inf, discarded), work the model does not need,
    and direct attention, compiled, sums products the counter has no formula for. And with
    backward_matmuls="autograd" and fp32_matmuls="native" whatever the config's: "tn_dgrad"
    and "tn" form the same products through dsfm::mm_tn, "3xtf32" each product as three
    TF32 ones through dsfm::mm_3xtf32, which the counter has no formula for either (and
    the model's FLOPs are the products', not the three TF32 passes of each)."""

    def __init__(self, model_config, patch: int = 16, frozen: frozenset[str] = frozenset()):
        counted = {k: v for k, v in (("attention", "fused"), ("backward_matmuls", "autograd"),
                                     ("fp32_matmuls", "native"))
                   if getattr(model_config, k, v) != v}
        if counted:
            model_config = dataclasses.replace(model_config, **counted)
        self.config = model_config
        self.patch = patch
        self.frozen = frozenset(frozen)       # parameters without gradients (fine-tuning)
        self._cache: dict[tuple, float] = {}

    def step(self, x_shape: tuple[int, ...]) -> float:
        key = tuple(x_shape)
        if key not in self._cache:
            from torch.utils.flop_counter import FlopCounterMode

            from dsfm.eval import nmse
            from dsfm.models.avit import AViT

            b, t, c, h, w = key
            with torch.device("meta"):
                model = AViT(self.config)
                x, y = torch.empty(key), torch.empty(b, c, h, w)
                ids = torch.arange(c)
            for name, param in model.named_parameters():
                param.requires_grad_(name not in self.frozen)   # no weight gradients to count
            counter = FlopCounterMode(display=False)
            with counter:
                nmse(model(x, ids, None), y).backward()
            self._cache[key] = float(counter.get_total_flops())
        return self._cache[key]

    def patches(self, x_shape: tuple[int, ...]) -> int:
        b, t, _, h, w = x_shape
        return b * t * (h // self.patch) * (w // self.patch)


def memory_gib(device: torch.device) -> dict[str, float]:
    """torch's allocator on this rank's GPU (allocated, reserved, peak since the last call)."""
    if device.type != "cuda":
        return {}
    gib = 2.0 ** 30
    out = {"perf/mem_allocated_gib": torch.cuda.memory_allocated(device) / gib,
           "perf/mem_reserved_gib": torch.cuda.memory_reserved(device) / gib,
           "perf/mem_peak_gib": torch.cuda.max_memory_allocated(device) / gib}
    torch.cuda.reset_peak_memory_stats(device)
    return out
