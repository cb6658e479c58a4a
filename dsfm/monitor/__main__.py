"""Standalone monitor: `python -m dsfm.monitor --logdir DIR [--interval 1.0] [--duration S]`.

Samples every local GPU (tags `gpu0/…`, `gpu1/…` by NVML index) and the host (`system/…`) into
TensorBoard, step = sample index, wall time real, until SIGINT/SIGTERM or `--duration` seconds;
exits 0 either way. Started again into the same `--logdir`, it counts on after the last step
its tags already have there. Use it beside jobs that do not log themselves, or to watch a whole
node. A custom_scalars layout written at start puts each GPU metric of all GPUs in one chart
("GPU") and the host metrics in "System". Without NVML it still logs system/ and says once why
GPU metrics are missing.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import select
import signal
import sys
import time

from dsfm.helpfmt import HelpFormatter
from dsfm.monitor.events import last_step
from dsfm.monitor.nvml import GPU_KEYS, GpuSampler, all_local_gpus, nvml_problem
from dsfm.monitor.system import SystemSampler

# the tags this monitor writes (regular expression): where a second start counts on from
OWN_TAGS = r"(system|gpu\d+)/"
SYSTEM_CHARTS = {
    "CPU % (machine, this monitor)": ["system/cpu_pct", "system/process_cpu_pct"],
    "Memory GiB": ["system/mem_used_gib", "system/rss_gib"],
    "Memory %": ["system/mem_pct"],
    "Load (1 min)": ["system/load1"],
    "Network MB/s": ["system/net_rx_mbps", "system/net_tx_mbps"],
    "Disk MB/s": ["system/disk_read_mbps", "system/disk_write_mbps"],
}


def gpu_tag(key: str, index: int) -> str:
    """`gpu/util_pct` of GPU 3 → `gpu3/util_pct`."""
    return f"gpu{index}/{key.removeprefix('gpu/')}"


def layout(gpus: bool = True) -> dict:
    """custom_scalars layout: one chart per GPU metric across GPUs (where there are GPUs), and
    the host charts (tags are regular expressions)."""
    gpu = {key.removeprefix("gpu/"): ["Multiline", [rf"^gpu\d+/{key.removeprefix('gpu/')}$"]]
           for key in GPU_KEYS}
    system = {title: ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]
              for title, tags in SYSTEM_CHARTS.items()}
    return {"GPU": gpu, "System": system} if gpus else {"System": system}


class StopSignal:
    """SIGINT/SIGTERM as a stop request the sampling loop can wait for, with no lock taken in
    the handler: setting a threading.Event there deadlocks now and then (the handler runs in the
    main thread, possibly while that thread holds the Event's lock inside Event.wait; seen about
    once in 400 SIGTERMs). The handler only notes the signal; Python's wakeup fd ends the
    wait."""

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.received: list[int] = []
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, lambda signum, _frame: self.received.append(signum))

    def wait(self, timeout: float) -> bool:
        """Sleep up to `timeout` seconds or until a signal came; True if one did."""
        if not self.received:
            select.select([self._r], [], [], max(timeout, 0.0))
            try:
                os.read(self._r, 4096)
            except BlockingIOError:
                pass
        return bool(self.received)

    def close(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._r)
        os.close(self._w)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsfm.monitor", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--logdir", required=True, help="TensorBoard log directory")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    ap.add_argument("--duration", type=float, default=None,
                    help="stop after this many seconds (default: until SIGINT/SIGTERM)")
    args = ap.parse_args(argv)
    if not 0 < args.interval < math.inf:
        ap.error(f"--interval must be a number of seconds > 0, got {args.interval:g}")
    if args.duration is not None and not 0 < args.duration < math.inf:
        ap.error(f"--duration must be a number of seconds > 0, got {args.duration:g} "
                 "(leave it out to sample until stopped)")
    try:                                    # before sampling: one line, not a traceback
        if os.path.exists(args.logdir) and not os.path.isdir(args.logdir):
            raise NotADirectoryError(errno.ENOTDIR, "not a directory")
        os.makedirs(args.logdir, exist_ok=True)
        if not os.access(args.logdir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as exc:
        print(f"error: --logdir {args.logdir}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    stop = StopSignal()

    from torch.utils.tensorboard import SummaryWriter

    gpus = all_local_gpus()
    if not gpus:
        print(f"GPU metrics unavailable: {nvml_problem() or 'NVML lists no GPU'}; "
              "logging system/ only", flush=True)
    samplers = [(i, GpuSampler(nvml_index=i, interval_s=args.interval)) for i in gpus]
    system = SystemSampler(interval_s=args.interval)
    before = last_step(args.logdir, OWN_TAGS)
    step = 0 if before is None else before + 1
    writer = SummaryWriter(args.logdir)
    writer.add_custom_scalars(layout(bool(gpus)))
    print(f"dsfm.monitor: {len(gpus)} GPU(s) and the host every {args.interval:g} s "
          f"→ {args.logdir}" + (f" (from step {step}, after the samples there)" if step else ""),
          flush=True)

    first = step
    start = time.monotonic()
    # one clock reading for both, and a tolerance for the sum's rounding: --duration 1
    # --interval 1 wrote no sample (its deadline was read a moment before its first time)
    deadline = None if args.duration is None else start + args.duration + 1e-6 * args.interval
    next_t = start + args.interval                  # each sample covers the interval before it
    try:
        while ((deadline is None or next_t <= deadline)
               and not stop.wait(max(next_t - time.monotonic(), 0.0))):
            walltime = time.time()
            values = dict(system.sample())
            for index, sampler in samplers:
                values.update({gpu_tag(k, index): v for k, v in sampler.sample().items()})
            for tag, value in sorted(values.items()):
                writer.add_scalar(tag, value, step, walltime=walltime)
            step += 1
            next_t = max(next_t + args.interval, time.monotonic())
    finally:
        writer.close()
        for _, sampler in samplers:
            sampler.stop()
        system.stop()
        stop.close()
    print(f"dsfm.monitor: {step - first} samples written", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
