"""What the monitor's samplers cost a training step: `python -m perf.monitor_overhead [--json F]`.

A fixed matmul workload (the "step": `--matmuls` products of two `--size`² fp32 matrices, on CPU,
or on the GPU when there is one) is timed with no sampler running, then with SystemSampler and
GpuSampler sampling on their threads at 1 Hz and at 10 Hz. Rounds interleave the variants (in
rotating order) and the median counts, since this kind of VM drifts in speed: the overhead is
the median over rounds of the step time against the no-sampler run of the same round (goal:
under 1 % at 1 Hz). It also times one `sample()` call of each sampler on its own, which says
what sampling costs wherever the workload leaves a core free: on a GPU machine, whatever this
prints there. Those calls are 0.1 s apart, so that each is a whole sample (GPM metrics, rates)
as at 1 or 10 Hz; `samples complete` says which share of them returned every metric.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsfm.helpfmt import HelpFormatter
from dsfm.monitor.nvml import GPU_KEYS, GpuSampler
from dsfm.monitor.system import SYSTEM_KEYS, SystemSampler
from perf.cli import positive_float, positive_int
from perf.report import write_json


def _workload(size: int, matmuls: int, device: torch.device):
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device) / size ** 0.5

    def step():
        x = a
        for _ in range(matmuls):
            x = x @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x

    return step


def _timed(step, steps: int) -> float:
    """Mean seconds per step over `steps` steps (the mean, since a sampler that stalls the loop
    now and then shows in the mean and not in a median)."""
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


#: seconds between the timed sample() calls: GPM needs 100 ms between two samples and the
#: system sampler's rates half its interval (0.1 s at the 0.2 s it is built with here); a call
#: sooner than that skips that work, which a sampler at 1 or 10 Hz never does
SAMPLE_GAP_S = 0.1


def _sample_cost(sampler, calls: int, keys) -> tuple[float, float] | tuple[None, None]:
    """(mean microseconds of one sample() call in this thread, the share of those calls that
    returned every metric in `keys` the sampler has), calls SAMPLE_GAP_S apart; (None, None)
    when the sampler is unavailable."""
    if not sampler.available:
        return None, None
    expected = set(keys) - set(sampler.unavailable)
    sampler.sample()
    spent, complete = 0.0, 0
    for _ in range(calls):
        time.sleep(SAMPLE_GAP_S)
        t = time.perf_counter()
        values = sampler.sample()
        spent += time.perf_counter() - t
        complete += expected - set(sampler.unavailable) <= set(values)
    return spent / calls * 1e6, complete / calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.monitor_overhead",
                                 formatter_class=HelpFormatter,
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=positive_int, default=384)
    ap.add_argument("--matmuls", type=positive_int, default=8)
    ap.add_argument("--seconds", type=positive_float, default=4.0, help="per variant per round")
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = _workload(args.size, args.matmuls, device)
    one = []
    for _ in range(20):                     # warm up, and the fastest step sets the count
        t = time.perf_counter()
        step()
        one.append(time.perf_counter() - t)
    steps = max(5, int(args.seconds / min(one)))

    t = time.perf_counter()
    probe = GpuSampler(device=0 if device.type == "cuda" else None, notice=lambda _: None)
    construct_us = (time.perf_counter() - t) * 1e6
    system_us, system_complete = _sample_cost(SystemSampler(interval_s=2 * SAMPLE_GAP_S,
                                                            notice=lambda _: None),
                                              20, SYSTEM_KEYS)
    gpu_us, gpu_complete = _sample_cost(probe, 20, GPU_KEYS)
    costs = {"system sample() us": system_us, "gpu sample() us": gpu_us,
             "gpu construct us": construct_us,
             "gpu available": probe.available,
             "system samples complete": system_complete, "gpu samples complete": gpu_complete}
    probe.stop()

    variants = {"off": None, "1 Hz": 1.0, "10 Hz": 0.1}
    per_round: dict[str, list[float]] = {name: [] for name in variants}
    samples: dict[str, int] = {name: 0 for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:     # rotate: no variant always goes first
            interval = variants[name]
            samplers = [] if interval is None else [
                SystemSampler(interval_s=interval),
                GpuSampler(device=0 if device.type == "cuda" else None, interval_s=interval,
                           notice=lambda _: None)]
            for s in samplers:
                s.start()
            per_round[name].append(_timed(step, steps))
            for s in samplers:
                s.stop()
                samples[name] += s.samples

    rows = []
    for name, times in per_round.items():
        # paired with the no-sampler run of the same round, so slow drifts of the VM cancel
        ratios = [t / off for t, off in zip(times, per_round["off"])]
        rows.append({"variant": name, "ms_per_step": statistics.median(times) * 1e3,
                     "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3,
                     "overhead_pct": 100.0 * (statistics.median(ratios) - 1.0),
                     "samples": samples[name], "rounds_ms": [t * 1e3 for t in times]})

    print(f"workload: {args.matmuls} x matmul {args.size}² fp32 on {device.type}, "
          f"{steps} steps per variant per round, {args.rounds} rounds, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'samplers':<10}{'ms/step':>10}{'min':>9}{'max':>9}{'overhead':>10}{'samples':>9}")
    for r in rows:
        print(f"{r['variant']:<10}{r['ms_per_step']:>10.2f}{r['min_ms']:>9.2f}{r['max_ms']:>9.2f}"
              f"{r['overhead_pct']:>+9.2f}%{r['samples']:>9d}")
    for key, value in costs.items():
        shown = "n/a (NVML unavailable)" if value is None else (
            f"{value:.1f}" if isinstance(value, float) else value)
        print(f"{key}: {shown}")
    sample_us = sum(costs[k] or 0.0 for k in ("system sample() us", "gpu sample() us"))
    costs["sampling share of one core at 1 Hz, %"] = sample_us / 1e4
    print(f"sampling (both samplers) takes {sample_us / 1e4:.3f} % of one core at 1 Hz, "
          f"{sample_us / 1e3:.2f} % at 10 Hz")
    if args.json:
        write_json(args.json, {"device": device.type, "size": args.size,
                               "matmuls": args.matmuls, "steps": steps, "rounds": args.rounds,
                               "rows": rows, "sample_costs": costs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
