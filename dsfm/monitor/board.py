"""The TensorBoard side of monitoring: cross-rank statistics and the dashboard layout.

At each log step every rank hands its own numbers (GPU or system samples, step phases,
throughput); `Board.gather` collects them on rank 0 (one all_gather_object, at log steps only),
which writes for every metric the mean over ranks (the sum for rates and energy) under its own
tag plus `<tag>/min` and
`<tag>/max`, and for the step time and utilization one series per rank under `ranks/`, so a
straggler stands out. Train-loop scalars that are already global (loss, lr) pass through.
The custom_scalars layout written at start has the dashboards "GPU", "Throughput", "Step time"
and "Loss" (plus "System"), with min/mean/max drawn as margin charts.
"""

from __future__ import annotations

import functools
import math
import operator

# Metrics drawn per rank under ranks/<name>/r<rank> (the straggler view).
PER_RANK = {"time/step_ms": "step_ms", "time/data_wait_ms": "data_wait_ms",
            "gpu/util_pct": "gpu_util_pct", "gpu/sm_active_pct": "sm_active_pct",
            "system/process_cpu_pct": "process_cpu_pct"}
# Prefixes whose metrics differ between ranks and get min/mean/max.
PER_RANK_PREFIXES = ("gpu/", "system/", "time/", "perf/")
# Rates and amounts that add up over ranks (written as the sum; per-rank min/max still shown):
# the job's energy is every GPU's.
SUMMED = ("perf/samples_per_sec", "perf/patches_per_sec", "perf/tflops", "gpu/energy_j")
BITMASKS = ("gpu/throttle_reasons",)


def _margin(tag: str) -> list:
    return ["Margin", [tag, f"{tag}/min", f"{tag}/max"]]


def layout(datasets: list[str], gpu: bool = True) -> dict:
    """The custom_scalars layout (torch SummaryWriter.add_custom_scalars format). `gpu`: whether
    the run has GPU metrics; without them (a CPU run) the GPU dashboard, all empty charts, is
    left out rather than opened first."""
    gpu_charts = {
        "Utilization (mean, min-max over ranks)": _margin("gpu/util_pct"),
        "SM active % (GPM)": _margin("gpu/sm_active_pct"),
        "Tensor-core active % (GPM)": _margin("gpu/tensor_active_pct"),
        "SM occupancy % and DRAM bandwidth % (GPM)": [
            "Multiline", ["gpu/sm_occupancy_pct$", "gpu/dram_bw_util_pct$"]],
        "Utilization per rank": ["Multiline", [r"ranks/gpu_util_pct/r\d+"]],
        "SM active % per rank (GPM)": ["Multiline", [r"ranks/sm_active_pct/r\d+"]],
        "Memory controller busy % (NVML)": _margin("gpu/mem_util_pct"),
        "Memory used GiB": _margin("gpu/mem_used_gib"),
        "Power W": _margin("gpu/power_w"),
        "Energy J": ["Multiline", ["gpu/energy_j$"]],
        "SM clock MHz and throttling": ["Multiline", ["gpu/sm_clock_mhz$", "gpu/throttle$"]],
        "Temperature C": _margin("gpu/temp_c"),
        "PCIe GB/s": ["Multiline", ["gpu/pcie_(tx|rx)_gbps$"]],
        "NVLink GB/s": ["Multiline", ["gpu/nvlink_(tx|rx)_gbps$"]],
        "torch memory GiB": ["Multiline", [r"perf/mem_(allocated|reserved|peak)_gib$"]],
    }
    throughput = {
        "Samples/s (all ranks)": ["Multiline", ["perf/samples_per_sec$"]],
        "Patches/s (all ranks)": ["Multiline", ["perf/patches_per_sec$"]],
        "Achieved TFLOP/s (all ranks)": ["Multiline", ["perf/tflops$"]],
        "MFU": _margin("perf/mfu"),
        "Data wait % of step": _margin("perf/data_wait_pct"),
    }
    step_time = {
        "Step ms (mean, min-max over ranks)": _margin("time/step_ms"),
        "Phases ms": ["Multiline", [r"time/(data_wait|forward|backward|optimizer)_ms$"]],
        "Data wait ms": _margin("time/data_wait_ms"),
        "Step ms per rank": ["Multiline", [r"ranks/step_ms/r\d+"]],
        "Data wait ms per rank": ["Multiline", [r"ranks/data_wait_ms/r\d+"]],
        "Slowest rank (by step ms)": ["Multiline", ["ranks/slowest$"]],
    }
    loss = {
        "Loss": ["Multiline", ["train/loss$"]],
        "Loss per dataset": ["Multiline", [f"train/loss/{d}$" for d in datasets]
                             or ["train/loss/.*"]],
        "Learning rate": ["Multiline", ["train/lr$"]],
        "Gradient norm (before clipping)": ["Multiline", ["train/grad_norm$"]],
        "Valid VRMSE (1 step)": ["Multiline", [r"eval/.*/vrmse_1step"]],
        "Valid VRMSE (1 step), mean over fields": ["Multiline",
                                                   [r"eval/[^/]+/all_fields/vrmse_1step$"]],
    }
    system = {
        "CPU %": ["Multiline", ["system/cpu_pct$", "system/process_cpu_pct$"]],
        "CPU % per rank process": ["Multiline", [r"ranks/process_cpu_pct/r\d+"]],
        "Memory GiB": ["Multiline", ["system/mem_used_gib$", "system/rss_gib$"]],
        "Memory %": ["Multiline", ["system/mem_pct$"]],
        "Load (1 min)": ["Multiline", ["system/load1$"]],
        "Network and disk MB/s": ["Multiline", [r"system/(net|disk)_.*_mbps$"]],
    }
    dashboards = {"GPU": gpu_charts} if gpu else {}
    return {**dashboards, "Throughput": throughput, "Step time": step_time, "Loss": loss,
            "System": system}


def combine(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Rank 0's view: mean (sum for rates) with /min and /max of every per-rank metric, one
    series per rank for the straggler view, and which rank was slowest."""
    out: dict[str, float] = {}
    keys = sorted({k for d in per_rank for k in d})
    for key in keys:
        values = [(r, d[key]) for r, d in enumerate(per_rank)
                  if key in d and d[key] is not None and math.isfinite(d[key])]
        if not values:
            continue
        nums = [v for _, v in values]
        if key in BITMASKS:                  # reasons any rank had, not an average of bits
            out[key] = float(functools.reduce(operator.or_, (int(v) for v in nums), 0))
            continue
        if not key.startswith(PER_RANK_PREFIXES):
            out[key] = nums[0]
            continue
        out[key] = sum(nums) if key in SUMMED else sum(nums) / len(nums)
        # written for one rank too: the layout draws these as margin charts, which TensorBoard
        # shows as "Missing Tags" (no line at all) unless all three tags exist
        out[f"{key}/min"] = min(nums)
        out[f"{key}/max"] = max(nums)
        if key in PER_RANK:
            for r, v in values:
                out[f"ranks/{PER_RANK[key]}/r{r}"] = v
    steps = [(d["time/step_ms"], r) for r, d in enumerate(per_rank) if "time/step_ms" in d]
    if steps:
        out["ranks/slowest"] = float(max(steps)[1])
    return out


def gather(local: dict[str, float]) -> list[dict[str, float]] | None:
    """Every rank's dict on rank 0 (None elsewhere); a world of one needs no collective."""
    import torch.distributed as td

    if not td.is_initialized() or td.get_world_size() == 1:
        return [local]
    everything: list = [None] * td.get_world_size()
    td.all_gather_object(everything, local)
    return everything if td.get_rank() == 0 else None
