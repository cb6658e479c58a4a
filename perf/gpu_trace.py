"""Where a step's GPU time goes: profile a few steps with torch.profiler and read its trace.

`profile_steps(step)` runs `step` under the profiler, each call inside a `dsfm_profiled_step`
annotation that ends after a device synchronization, and `summarize` reads the exported trace:
per step, the wall time of the window, the time the GPU was busy (the union of kernel, memcpy and
memset intervals inside it, so concurrent kernels count once), the kernel count, the kernel time
per category (matmul/conv, attention, compiled, optimizer, ...) and the costliest kernels.

A busy share near 100 % says the step is bound by the card; well below it, the card waits for the
host (launch overhead, Python, host synchronizations), which is what `train_bench`'s `graph`
wrapper and compiled blocks attack. Without CUDA there are no device events: the summary then has
no busy figures (`busy_share` None).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections import defaultdict

import torch

WINDOW = "dsfm_profiled_step"
WARMUP = "dsfm_profiler_warmup"        # a first step under the profiler, not summarized
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")

#: kernel-name fragments (lower case) per category, tried in this order; the first match wins.
#: Inductor's kernels come first (their names list the operators they fused: "transpose",
#: "convolution"...), matrix multiplies it generated as templates aside.
CATEGORIES = (
    ("matmul/conv", ("triton_tem_",)),
    ("compiled", ("triton",)),
    ("comm", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "mem_eff", "sdpa", "softmax")),
    ("layout", ("nchwtonhwc", "nhwctonchw", "transpose")),
    ("matmul/conv", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "conv", "dgrad", "wgrad",
                     "implicit", "winograd", "cudnn")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("norm", ("norm", "welford", "gammabeta")),
    ("reduction", ("reduce",)),
    ("copy", ("memcpy", "memset", "copy", "gather", "scatter", "index")),
    ("elementwise", ("elementwise", "vectorized")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, parts in CATEGORIES:
        if any(p in low for p in parts):
            return cat
    return "other"


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by half-open intervals (start, end), overlaps counted once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _windows(events: list[dict], window: str = WINDOW) -> list[tuple[float, float]]:
    """(start, end) in µs of the `window` annotations, in order."""
    return sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "user_annotation" and e.get("name") == window
                  and "dur" in e)


def summarize(events: list[dict], window: str = WINDOW, device_cats=DEVICE_CATS,
              top: int = 8) -> dict:
    """Per-step figures from chrome-trace events (ts and dur in µs), averaged over the
    `window` annotations found. Device events are attributed to the window their start falls
    in and clipped to it for the busy time."""
    windows = _windows(events, window)
    if not windows:
        raise ValueError(f"no {window!r} annotation in the trace")
    device = [e for e in events if e.get("cat") in device_cats and "dur" in e]
    n = len(windows)
    inside_any = 0
    busy = kernel_us = 0.0
    count = 0
    by_cat: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    per_window = []
    for lo, hi in windows:
        inside = [e for e in device if lo <= e["ts"] < hi]
        inside_any += len(inside)
        per_window.append(len(inside))
        busy += union_length([(e["ts"], min(e["ts"] + e["dur"], hi)) for e in inside])
        for e in inside:
            kernel_us += e["dur"]
            count += 1
            name = e.get("name", "?")
            by_cat["copy" if e["cat"] in ("gpu_memcpy", "gpu_memset") else category(name)] \
                += e["dur"]
            by_name[name][0] += e["dur"]
            by_name[name][1] += 1
    wall_us = sum(hi - lo for lo, hi in windows)
    costly = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "steps": n,
        "wall_ms": wall_us / n / 1e3,
        "busy_ms": busy / n / 1e3 if device else None,
        "busy_share": busy / wall_us if device and wall_us else None,
        "kernels_per_step": count / n,           # kernels, memcpys and memsets
        # identical steps issue as many kernels each: fewer in one window means device
        # records were lost (or fell outside), and that step's busy share reads too low
        "kernels_min_max": [min(per_window), max(per_window)],
        # of all device events in the trace, the share inside the windows: about n / (n + 1)
        # with the unsummarized first step; far less means the device and host clocks of the
        # trace disagree, and the busy share is not to be trusted
        "events_in_windows": inside_any / len(device) if device else None,
        "kernel_ms_per_step": kernel_us / n / 1e3,
        "categories_ms": {c: round(us / n / 1e3, 3)
                          for c, us in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name[:120], "ms_per_step": round(us / n / 1e3, 3),
                 "calls_per_step": calls / n} for name, (us, calls) in costly],
    }


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_steps(step, n: int = 2, keep: str | None = None) -> dict:
    """Profile `n` calls of `step` (each inside the annotation, ending on a device sync),
    after one more that is not summarized (the profiler's own first-call costs), and summarize
    them. `keep`: also write the window and device events (not the host's) there as gzipped
    JSON, small enough to bring back from a GPU machine and inspect."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    _sync()
    with profile(activities=activities) as prof:
        for i in range(n + 1):
            with record_function(WARMUP if i == 0 else WINDOW):
                step()
                _sync()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    finally:
        os.unlink(path)
    summary = summarize(events)
    if keep:                            # the windows and the device events in them, compact
        spans = _windows(events)
        kept = [{"name": WINDOW, "cat": "user_annotation", "ts": lo, "dur": hi - lo}
                for lo, hi in spans]
        kept += [{"name": e.get("name", "?"), "cat": e["cat"], "ts": e["ts"], "dur": e["dur"],
                  "stream": e.get("args", {}).get("stream")}
                 for e in events if e.get("cat") in DEVICE_CATS and "dur" in e
                 and any(lo <= e["ts"] < hi for lo, hi in spans)]
        with gzip.open(keep, "wt") as fh:
            json.dump({"traceEvents": kept}, fh)
    return summary


def steps_arg(text: str) -> int:
    """argparse type of `--profile N`: a number of steps, 0 for none."""
    n = int(text)
    if n < 0:
        raise ValueError(text)
    return n


def profile_into(row: dict, step, n: int, keep: str | None = None) -> None:
    """row["profile"] = profile_steps(step, n, keep), or row["profile_error"]: a diagnostic
    whose failure must not cost the benchmark the figures it has already measured."""
    try:
        row["profile"] = profile_steps(step, n, keep)
    except Exception as exc:
        row["profile_error"] = f"{type(exc).__name__}: {exc}"


def describe_row(row: dict, step_ms: float, steady: bool = True) -> str:
    """`describe` of a row filled by `profile_into`, or why its profile failed."""
    if "profile" not in row:
        return f"profile failed: {row.get('profile_error')}"
    return describe(row["profile"], step_ms, steady=steady)


def describe(summary: dict, step_ms: float | None = None, n_categories: int = 4,
             steady: bool = True) -> str:
    """One line: busy share, kernels per step, the largest categories. `step_ms`, the step's
    unprofiled time: the busy time is also given against it, since the profiler's own host
    work lengthens the profiled step (and so lowers the busy share within it)."""
    cats = ", ".join(f"{c} {ms:.1f}" for c, ms in list(summary["categories_ms"].items())
                     [:n_categories])
    if summary["busy_share"] is None:
        busy = f"no device events ({summary['wall_ms']:.1f} ms)"
    else:
        busy = (f"GPU busy {100 * summary['busy_share']:.1f}% of the profiled "
                f"{summary['wall_ms']:.1f} ms" + (f", {summary['busy_ms']:.1f} ms = "
                                                  f"{100 * summary['busy_ms'] / step_ms:.1f}% "
                                                  f"of the timed {step_ms:.1f} ms"
                                                  if step_ms else ""))
        if summary["events_in_windows"] < 0.5 * summary["steps"] / (summary["steps"] + 1):
            busy += (f" (CLOCKS? only {100 * summary['events_in_windows']:.0f}% of device "
                     "events fall in the step windows)")
    lo, hi = summary.get("kernels_min_max", (0, 0))
    # steady: every step issues the same kernels (not so for a step fed by the loader, whose
    # next() launches copies and assembly for as many batches as have arrived)
    if steady and summary["busy_share"] is not None and lo != hi:
        busy += f" (KERNELS DIFFER between steps: {lo} to {hi}; records lost?)"
    return (f"{busy}; {summary['kernels_per_step']:.0f} kernels/step, "
            f"{summary['kernel_ms_per_step']:.1f} ms of kernels" + (f" ({cats} ms)" if cats
                                                                    else ""))
