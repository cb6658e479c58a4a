"""Host metrics with psutil: is the machine, or this trainer and its reader processes, the
bottleneck?

Keys (floats): `system/cpu_pct` (whole machine, 0-100 over all cores), `system/process_cpu_pct`
(this process plus its children, e.g. dsfm's reader processes, in percent of one core as `top`
shows it: 250 means two and a half cores busy), `system/mem_used_gib`, `system/mem_pct`,
`system/rss_gib` (this process plus children; shared memory such as the loader's ring is counted
once per process that maps it, as RSS does), `system/load1`, and rates in MB/s (1e6 bytes/s):
`system/net_rx_mbps`, `system/net_tx_mbps` (all interfaces but loopback),
`system/disk_read_mbps`, `system/disk_write_mbps` (whole disks, not partitions).

Rates and CPU shares come from cumulative counters differenced between samples over at least
half an interval (between 0.1 and 0.5 s; the first baseline is taken at construction, so a
sample taken right after it gives levels only), never from psutil's module-global
`cpu_percent` state, which another caller in the same process would disturb.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import psutil

from dsfm.monitor.sampler import BackgroundSampler

SYSTEM_KEYS = ("system/cpu_pct", "system/process_cpu_pct", "system/mem_used_gib",
               "system/mem_pct", "system/rss_gib", "system/load1", "system/net_rx_mbps",
               "system/net_tx_mbps", "system/disk_read_mbps", "system/disk_write_mbps")
_GIB = 1024 ** 3
_RESCAN_S = 10.0


def _machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds over all cores since boot."""
    t = psutil.cpu_times()
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)  # in user already
    idle = t.idle + getattr(t, "iowait", 0.0)
    return total - idle, total


def _net_bytes() -> tuple[int, int] | None:
    nics = psutil.net_io_counters(pernic=True)
    real = [c for name, c in nics.items() if name != "lo"]
    if not real:
        return None
    return sum(c.bytes_recv for c in real), sum(c.bytes_sent for c in real)


def _disk_bytes() -> tuple[int, int] | None:
    try:
        d = psutil.disk_io_counters()
    except (OSError, NotImplementedError):      # containers without /proc/diskstats
        return None
    return None if d is None else (d.read_bytes, d.write_bytes)


class SystemSampler(BackgroundSampler):
    name = "system sampler"

    def __init__(self, interval_s: float = 1.0, notice: Callable[[str], None] = print):
        super().__init__(interval_s, notice)
        self._me = psutil.Process(os.getpid())
        self._children: list[psutil.Process] | None = None
        self._scanned = 0.0
        # CPU times tick every 10 ms: a rate needs at least 0.1 s behind it
        self._min_window_s = max(0.1, min(0.5, interval_s / 2))
        self._prev = self._counters()
        self.unavailable: dict[str, str] = {}
        for kind, keys, why in (
                ("net", ("system/net_rx_mbps", "system/net_tx_mbps"),
                 "no network interface besides loopback"),
                ("disk", ("system/disk_read_mbps", "system/disk_write_mbps"),
                 "no disk I/O counters (/proc/diskstats) visible")):
            if self._prev[kind] is None:
                self.unavailable.update(dict.fromkeys(keys, why))
                notice(f"system: {', '.join(keys)} unavailable: {why}")

    def _tree(self) -> list[psutil.Process]:
        """This process and its descendants. Listing descendants means reading every process's
        /proc stat (about 0.8 ms with 70 processes on the dev VM, more on a busy node), so the
        list is refreshed only every `_RESCAN_S` or when a known child has gone; dsfm's readers
        live as long as the run."""
        now = time.monotonic()
        if self._children is None or now - self._scanned >= _RESCAN_S:
            try:
                self._children = self._me.children(recursive=True)
            except psutil.Error:
                self._children = []
            self._scanned = now
        return [self._me, *self._children]

    def _counters(self) -> dict:
        """Cumulative counters and instantaneous values at one moment (`wall`: the epoch time
        before the processes were listed, which process create times compare with)."""
        wall = time.time()
        cpu_s: dict[tuple[int, float], float] = {}
        rss = 0
        for proc in self._tree():
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    cpu_s[(proc.pid, proc.create_time())] = t.user + t.system
                    rss += proc.memory_info().rss
            except psutil.Error:                # exited since the last listing
                self._children = None
                continue
        return {"t": time.monotonic(), "wall": wall, "machine": _machine_cpu(), "procs": cpu_s,
                "rss": rss, "net": _net_bytes(), "disk": _disk_bytes()}

    def _read(self) -> dict[str, float]:
        prev, cur = self._prev, self._counters()
        vm = psutil.virtual_memory()
        out = {"system/mem_used_gib": vm.used / _GIB, "system/mem_pct": vm.percent,
               "system/rss_gib": cur["rss"] / _GIB, "system/load1": os.getloadavg()[0]}
        dt = cur["t"] - prev["t"]
        if dt < self._min_window_s:
            # too short to difference (CPU times tick every 10 ms; the first sample comes right
            # after the baseline): levels only, and the baseline stays for the next reading
            return out
        self._prev = cur
        busy = cur["machine"][0] - prev["machine"][0]
        total = cur["machine"][1] - prev["machine"][1]
        if total > 0:
            out["system/cpu_pct"] = 100.0 * min(max(busy / total, 0.0), 1.0)
        # a child that started during the interval counts from zero; one that exited is lost.
        # One listed for the first time that was already running at the previous reading (the
        # list is refreshed every _RESCAN_S) counts from this reading on: its CPU time so far
        # is not this interval's. All of it used to land here, at the rescan (673 % on 2 cores
        # for a child started after the sampler). psutil's create times (boot time in whole
        # seconds, plus clock ticks) read up to a second early, never late: a child just
        # started may be counted from the next reading, none is charged for time before this
        # interval.
        used = 0.0
        for (pid, created), s in cur["procs"].items():
            if (pid, created) in prev["procs"]:
                used += max(s - prev["procs"][(pid, created)], 0.0)
            elif created >= prev["wall"]:
                used += s
        out["system/process_cpu_pct"] = 100.0 * used / dt
        for kind, keys in (("net", ("system/net_rx_mbps", "system/net_tx_mbps")),
                           ("disk", ("system/disk_read_mbps", "system/disk_write_mbps"))):
            if cur[kind] is not None and prev[kind] is not None:
                for key, a, b in zip(keys, prev[kind], cur[kind]):
                    out[key] = max(b - a, 0) / dt / 1e6
        return out
