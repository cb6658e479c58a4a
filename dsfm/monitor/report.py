"""python -m dsfm.monitor.report RUN_DIR [--out FILE.png]

Reads a run's TensorBoard events back and draws one PNG: utilization (GPU, or CPU on a CPU run),
throughput, the step-time breakdown and the step time per rank, over training steps; then prints
a short summary: mean utilization, MFU, data-wait share, and the slowest rank.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from dsfm.helpfmt import HelpFormatter


def load_scalars(run_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    logdir = os.path.join(run_dir, "tb") if os.path.isdir(os.path.join(run_dir, "tb")) \
        else run_dir
    acc = EventAccumulator(logdir, size_guidance={SCALARS: 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        events = acc.Scalars(tag)
        out[tag] = ([e.step for e in events], [e.value for e in events])
    return out


def _kept(s: dict, tag: str) -> dict[int, float]:
    """A tag's values by log step, the first log interval (start-up and warm-up) left out when
    there are more than two."""
    pairs = list(zip(*s.get(tag, ([], []))))
    return dict(pairs[1:] if len(pairs) > 2 else pairs)


def _spans(s: dict) -> tuple[dict[int, float], dict[int, float]]:
    """What each log interval holds, by its log step: its steps (since the log step before; the
    first since step 0), and its training time as its steps over its samples/s (every step
    trains as many samples), or as its steps where a samples/s is missing."""
    logged = sorted({st for tag in ("time/step_ms", "perf/samples_per_sec")
                     for st in s.get(tag, ([], []))[0]})
    steps = {st: float(st - before) for st, before in zip(logged, [0] + logged[:-1])}
    rate = dict(zip(*s.get("perf/samples_per_sec", ([], []))))
    if all(rate.get(st, 0.0) > 0 for st in steps):
        return steps, {st: n / rate[st] for st, n in steps.items()}
    return steps, steps


def _mean(values: dict[int, float], weights: dict[int, float]) -> float | None:
    """The mean of values by log step, each weighted by what its interval holds."""
    w = [weights.get(st, 0.0) for st in values]
    if sum(w) <= 0:
        return sum(values.values()) / len(values) if values else None
    return sum(v * x for v, x in zip(values.values(), w)) / sum(w)


def summarize(s: dict) -> dict:
    """The numbers people ask first, from the scalars of a run (the first log interval, which
    holds start-up and warm-up, is left out when there are more than two). Rates (samples/s,
    TFLOP/s, MFU, utilization) are averaged over the intervals by their training time, times
    per step by their steps: samples/s is the samples trained over the time they took, as the
    step time says. Each interval's rate counted once before, a fast interval as much as a slow
    one of the same steps that took longer: a CPU run whose intervals ran 0.7 to 4.4 samples/s
    at 4 samples a step reported 2.4 samples/s beside a 2.3 s step."""
    steps, time = _spans(s)

    def mean(tag: str, by: dict[int, float]) -> float | None:
        return _mean(_kept(s, tag), by)

    util_tag = "gpu/util_pct" if "gpu/util_pct" in s else "system/process_cpu_pct"
    ranks = {}
    for tag in s:
        m = re.fullmatch(r"ranks/step_ms/r(\d+)", tag)
        if m and _kept(s, tag):
            ranks[int(m.group(1))] = mean(tag, steps)
    step = mean("time/step_ms", steps)
    wait = mean("time/data_wait_ms", steps)
    return {
        "utilization": mean(util_tag, time), "utilization_tag": util_tag,
        "sm_active": mean("gpu/sm_active_pct", time),
        "mfu": mean("perf/mfu", time),
        "samples_per_sec": mean("perf/samples_per_sec", time),
        "tflops": mean("perf/tflops", time),
        "step_ms": step,
        "data_wait_share": (wait / step) if wait is not None and step else None,
        "slowest_rank": max(ranks, key=ranks.get) if ranks else None,
        "rank_step_ms": ranks,
    }


def _fmt(value, pattern: str, missing: str = "n/a") -> str:
    return missing if value is None else pattern.format(value)


def _plot(ax, steps, values, lone: str = "o", **kw):
    """A line over steps; a lone point (a run that logged once) as a `lone` marker, which a
    line of one point is not drawn as."""
    if len(steps) < 2:
        kw.setdefault("marker", lone)
        kw.setdefault("markersize", 10 if lone == "s" else 6)
    return ax.plot(steps, values, **kw)


def figure(s: dict, title: str):
    """The report's matplotlib figure (2 × 2 charts) of a run's scalars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8), constrained_layout=True)
    fig.suptitle(title)

    ax = axes[0, 0]
    gpu = "gpu/util_pct" in s
    for tag, label in ((("gpu/util_pct", "GPU utilization (NVML)"),
                        ("gpu/sm_active_pct", "SM active (GPM)"),
                        ("gpu/tensor_active_pct", "tensor cores active (GPM)")) if gpu else
                       (("system/cpu_pct", "machine CPU"),
                        ("system/process_cpu_pct", "trainer + readers CPU"))):
        if tag in s:
            steps, values = s[tag]
            (line,) = _plot(ax, steps, values, label=label)
            if f"{tag}/min" in s and f"{tag}/max" in s:
                lo, hi = dict(zip(*s[f"{tag}/min"])), dict(zip(*s[f"{tag}/max"]))
                both = sorted(lo.keys() & hi.keys())      # a cut-short run: one may be longer
                if len(both) == 1:                        # a band of one step: a bar
                    ax.vlines(both, [lo[k] for k in both], [hi[k] for k in both], lw=6,
                              alpha=0.2, color=line.get_color())
                else:
                    ax.fill_between(both, [lo[k] for k in both], [hi[k] for k in both],
                                    alpha=0.2)
    ax.set(title="Utilization % (mean; band: min-max over ranks)", xlabel="step", ylabel="%")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)

    ax = axes[0, 1]
    if "perf/samples_per_sec" in s:
        # a square behind TFLOP/s's circle, which its own axis puts at the same place
        _plot(ax, *s["perf/samples_per_sec"], lone="s", color="tab:green", label="samples/s")
        ax.set_ylabel("samples/s (all ranks)")
    if "perf/tflops" in s:
        twin = ax.twinx()
        _plot(twin, *s["perf/tflops"], color="tab:purple", label="TFLOP/s")
        twin.set_ylabel("achieved TFLOP/s")
    ax.set(title="Throughput", xlabel="step")

    ax = axes[1, 0]
    phases = [("time/data_wait_ms", "data wait"), ("time/forward_ms", "forward"),
              ("time/backward_ms", "backward + reduction"), ("time/optimizer_ms", "optimizer")]
    present = [(tag, label) for tag, label in phases if tag in s]
    if present:
        # the steps every phase has: a run cut short (or read while it writes) can end between
        # one phase's value of a log step and the next one's
        steps = sorted(set.intersection(*(set(s[tag][0]) for tag, _ in present)))
        values = [dict(zip(*s[tag])) for tag, _ in present]
        if len(steps) == 1:                 # one logged step: a stacked bar, not an empty area
            bottom = 0.0
            for v, (_, label) in zip(values, present):
                ax.bar(steps, [v[steps[0]]], bottom=bottom, label=label, alpha=0.8)
                bottom += v[steps[0]]
        else:
            ax.stackplot(steps, *[[v[step] for step in steps] for v in values],
                         labels=[label for _, label in present], alpha=0.8)
        if "time/step_ms" in s:
            _plot(ax, *s["time/step_ms"], color="black", lw=1, label="step (wall)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set(title="Step time breakdown (ms, mean over ranks)", xlabel="step", ylabel="ms")

    ax = axes[1, 1]
    for tag in sorted(t for t in s if re.fullmatch(r"ranks/step_ms/r\d+", t)):
        _plot(ax, *s[tag], lw=1, label=tag.rsplit("/", 1)[1])
    ax.set(title="Step time per rank (ms)", xlabel="step", ylabel="ms")
    if sum(1 for t in s if t.startswith("ranks/step_ms/")) <= 16:
        ax.legend(loc="upper right", fontsize=7, ncol=2)
    return fig


def draw(s: dict, out: str, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = figure(s, title)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _unwritable(out: str) -> str | None:
    """Why the PNG cannot be written at `out` (None when it can): another user's or an
    archived run directory is often read-only."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        return "that is a directory"
    if not os.path.isdir(folder):
        return f"{folder} is not a directory"
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(out)
                                                     and not os.access(out, os.W_OK)):
        return "permission denied"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsfm.monitor.report",
                                 formatter_class=HelpFormatter,
                                 description=__doc__.split("\n\n")[1])
    ap.add_argument("run_dir", help="run directory (events read from its tb/), or a folder "
                    "of events")
    ap.add_argument("--out", default=None, help="PNG path (default RUN_DIR/report.png)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        print(f"error: {args.run_dir}: no such run directory", file=sys.stderr)
        return 2
    out = args.out or os.path.join(args.run_dir, "report.png")
    problem = _unwritable(out)       # before reading the events (minutes for a long run)
    if problem:
        print(f"error: cannot write the report to {out}: {problem}; give --out FILE.png",
              file=sys.stderr)
        return 2
    s = load_scalars(args.run_dir)
    if not s:
        print(f"error: {args.run_dir}: no TensorBoard scalars found (looked in tb/)",
              file=sys.stderr)
        return 1
    draw(s, out, os.path.basename(os.path.normpath(args.run_dir)))
    r = summarize(s)
    what = "GPU utilization" if r["utilization_tag"].startswith("gpu") else "CPU (trainer)"
    print(f"report: {out}")
    print(f"mean {what}: {_fmt(r['utilization'], '{:.1f}%')}"
          + (f", SM active {r['sm_active']:.1f}%" if r["sm_active"] is not None else ""))
    print(f"throughput: {_fmt(r['samples_per_sec'], '{:.1f}')} samples/s, "
          f"{_fmt(r['tflops'], '{:.3f}')} TFLOP/s, MFU {_fmt(r['mfu'], '{:.1%}')}")
    print(f"step: {_fmt(r['step_ms'], '{:.1f} ms')}, data wait "
          f"{_fmt(r['data_wait_share'], '{:.1%}')} of it")
    if r["slowest_rank"] is not None:
        ms = r["rank_step_ms"]
        fastest = min(ms.values())
        print(f"slowest rank: {r['slowest_rank']} ({ms[r['slowest_rank']]:.1f} ms/step, "
              f"fastest {fastest:.1f} ms) of {len(ms)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
