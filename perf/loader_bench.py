"""Input pipeline benchmark: `python -m perf.loader_bench --base BASE [--workers 2] [--json F]`.

On the same files, with the same number of worker processes, batch size and window (4 input +
1 output steps, z-score normalization), per dataset under BASE:

  (a) dsfm      dsfm.data.WellLoader (reader processes → shared ring → device)
  (b) upstream  the_well WellDataset + torch DataLoader (shuffle; pin_memory when CUDA)
  (c) h5py      a plain h5py Dataset (handles kept per worker, numpy stacking) + DataLoader
  (d) raw       one process doing back-to-back hyperslab reads of the same windows with h5py,
                handles open: the faster of read_direct into reused buffers and
                `dset[selection]` (also split over as many processes as workers); and, to show
                what the storage itself allows, the same windows as positioned reads (preadv)
                of the files into a reused buffer (`raw pread`)

Each variant runs once per round, rounds interleave the variants, and the median round counts
(this kind of VM drifts in speed); a round starts by draining, untimed, the batches the variant
read ahead while the others ran (a WellLoader's ring, a DataLoader's prefetch). Per worker,
WellLoader with one reader is compared with the raw bound of one process, in five forms:
`dsfm 1r` (the CPU default: the reader reads a batch and also lays out, normalizes and checks
each window, with one call of dsfm's C kernel),
`dsfm 1r numpy` (the same read window by window in Python, NumPy doing the rest, as where the
kernel cannot be built), `dsfm 1r read` (the GPU
configuration: the reader only reads, and the trainer process assembles; on CPU it does so in
parallel with the reader), `dsfm 1r read own` (the same with the reader on a core the trainer
stays off) and `dsfm 1r hdf5` (the CPU default with reads through the HDF5 library instead of
positioned reads). A reader's own work is also timed alone, in this process and without the
pipes (`reader alone`: read only, a batch per kernel call, and `alone read py` window by window
in Python; `alone asm`: the CPU default's work, a batch per kernel call, `alone asm window`
with the kernel called per window, with NumPy, and into 4 slots in turn as into a ring rather
than one reused buffer). The readers' own busy
time (in situ) is also turned into a rate per reader. The
benchmark's own process runs torch on `--trainer-threads` threads (default 1: beside a GPU the
training process does not assemble on the CPU, so it should not take the readers' cores). Prints
samples/s, MB/s and per-batch latency (median, p95), writes JSON. `--rss-batches N` also runs
WellLoader over the whole mixture for N batches and records the resident memory of the trainer
and its readers. With CUDA it also measures pinned and pageable host-to-device bandwidth and the
loader's own copy bandwidth (CUDA events around its copies) in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dsfm.data import WellLoader, native
from dsfm.data.index import list_hdf5, read_layouts
from dsfm.data.windows import well_source
from dsfm.helpfmt import HelpFormatter
from perf.affinity import pin_threads
from perf.cli import non_negative_int, positive_float, positive_int, well_datasets
from perf.report import write_json


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    ms = sorted(1e3 * t for t in latencies)
    return statistics.median(ms), ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]


def _consume(iterator, n_batches: int, to_device, drain: int = 0) -> tuple[float, list[float]]:
    """Time n_batches from an iterator: (seconds, per-batch latencies). First, untimed, `drain`
    batches: what the loader read ahead while the other variants ran (see `prefetched`), which
    would come at no cost and count as if read in the timed window."""
    for _ in range(drain):
        to_device(next(iterator))
    lat = []
    start = last = time.perf_counter()
    for _ in range(n_batches):
        to_device(next(iterator))
        now = time.perf_counter()
        lat.append(now - last)
        last = now
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, lat


def _summary(runs: list[tuple[float, list[float]]], n_batches: int, batch: int,
             sample_bytes: int) -> dict:
    """Median over rounds of samples/s (this VM's speed drifts), latencies pooled; `rounds`:
    each round's rate, in the order they ran."""
    rates = [n_batches * batch / t for t, _ in runs]
    rate = statistics.median(rates)
    med, p95 = _percentiles([x for _, lat in runs for x in lat])
    return {"samples_per_s": rate, "mb_per_s": rate * sample_bytes / 1e6,
            "batch_ms_median": med, "batch_ms_p95": p95, "rounds": rates}


_CPUS = sorted(os.sched_getaffinity(0))
READER_CPU = _CPUS[-1:]                  # the core the `dsfm_1w_read_own` reader runs on


@contextlib.contextmanager
def _own_core(variant: str):
    """While `dsfm_1w_read_own` is consumed, keep this (the training) process off its reader's
    core, as on a GPU host where each rank's readers have cores of their own."""
    if variant != "dsfm_1w_read_own" or len(_CPUS) < 2:
        yield
        return
    pin_threads("self", _CPUS[:-1])
    try:
        yield
    finally:
        pin_threads("self", _CPUS)


class PlainH5Dataset(Dataset):
    """What a user writes with h5py alone: keep files open per worker, slice, stack."""

    def __init__(self, source):
        self.source = source
        self._files = {}

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        fi, traj, t0 = self.source.locate(i)
        path = self.source.files[fi]
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = h5py.File(path, "r")
        n = self.source.n_steps
        parts = []
        for blk in self.source.blocks:
            a = f[blk.path][traj, t0:t0 + n]
            a = a.reshape(a.shape[:3] + (-1,)) if a.ndim > 3 else a[..., None]
            parts.append(np.moveaxis(a, -1, 1))
        return torch.from_numpy(np.concatenate(parts, axis=1))


def _raw_reads(source, windows: np.ndarray, fresh: bool = False,
               barrier=None) -> tuple[float, float]:
    """Back-to-back hyperslab reads of `windows` in this process, handles open (see
    `raw_bound`): (start, end) of the timed reads, which leave out opening the files and a
    warm-up of 20 reads; with `barrier`, the timed reads start once every process sharing it
    is ready."""
    files = {p: h5py.File(p, "r") for p in source.files}
    dsets = [[files[p][blk.path] for blk in source.blocks] for p in source.files]
    bufs = [np.empty(b.shape, np.float32) for b in source.blocks]
    n = source.n_steps

    def read(ws):
        for w in ws:
            fi, traj, t0 = source.locate(int(w))
            for dset, buf in zip(dsets[fi], bufs):
                if fresh:
                    dset[traj, t0:t0 + n]
                else:
                    dset.read_direct(buf, np.s_[traj, t0:t0 + n])

    read(windows[:20])
    if barrier is not None:
        barrier.wait(BARRIER_TIMEOUT_S)
    start = time.perf_counter()
    read(windows)
    end = time.perf_counter()
    for f in files.values():
        f.close()
    return start, end


def raw_bound(source, windows: np.ndarray, fresh: bool = False) -> float:
    """Seconds for back-to-back hyperslab reads of `windows` in one process, handles open:
    read_direct into reused buffers, or with `fresh`, `dset[selection]` into a new array per
    read (h5py's fast path, often the faster of the two)."""
    start, end = _raw_reads(source, windows, fresh)
    return end - start


def reader_alone(source, windows: np.ndarray, batch: int, assemble: bool, shift=None,
                 scale=None, kernel=None, slots: int = 1, batch_reads: bool = True) -> float:
    """Seconds for a reader process's own work on the same windows, in this process and without
    the pipes: `read_batch` into a shared-memory slot (the GPU configuration), or with
    `assemble`, `read_assembled` (the CPU default: layout, normalization, NaN check). With the
    C `kernel` a batch is read (and normalized) by one call of it, or with `batch_reads=False`
    window by window (the kernel normalizing each); without it, window by window in Python
    (NumPy normalizing). One reused slot, as the raw bound reuses its buffers, or `slots` taken
    in turn, as a reader fills a ring (whose slots do not all stay in cache)."""
    from dsfm.data.handles import H5Pool
    from dsfm.data.readers import assembled_views

    n_in = source.n_steps - 1
    per = source.assembled_floats if assemble else source.window_floats
    mem = mmap.mmap(-1, slots * batch * per * 4)
    ring = np.frombuffer(mem, np.float32)
    ring[:] = 0
    views = []
    for k in range(slots):
        slot = ring[k * batch * per:(k + 1) * batch * per]
        views.append((slot, *assembled_views(slot.view(np.uint8), source, batch, n_in))
                     if assemble else (slot, None, None))
    scratch = np.empty(source.window_floats, np.float32)
    pool = H5Pool()

    def run(ws):
        for k, i in enumerate(range(0, len(ws) - batch + 1, batch)):
            slot, x, y = views[k % slots]
            if assemble:
                source.read_assembled(pool, ws[i:i + batch], n_in, x, y, shift, scale, scratch,
                                      kernel=kernel, batch_reads=batch_reads)
            else:
                source.read_batch(pool, ws[i:i + batch], slot, kernel, batch_reads)

    run(windows[:2 * batch * slots])
    start = time.perf_counter()
    run(windows)
    elapsed = time.perf_counter() - start
    pool.close()
    views = slot = ring = None      # drop the views of the mapping before closing it
    mem.close()
    return elapsed


def raw_pread(source, windows: np.ndarray) -> float:
    """Seconds for the same windows as positioned reads (os.preadv) of each field's byte range
    into a reused buffer: what the files allow with no HDF5 library call at all."""
    from dsfm.data.handles import direct_offset

    fds, where = {}, []
    for p in source.files:
        fds[p] = os.open(p, os.O_RDONLY)
        with h5py.File(p, "r") as f:
            # per block: (byte offset, bytes per trajectory, bytes per time step)
            where.append([(direct_offset(d), 4 * int(np.prod(d.shape[1:])),
                           4 * int(np.prod(d.shape[2:])))
                          for d in (f[b.path] for b in source.blocks)])
    if any(off is None for blocks in where for off, _, _ in blocks):
        return float("nan")
    bufs = [np.empty(b.shape, np.float32) for b in source.blocks]

    def read(ws):
        for w in ws:
            fi, traj, t0 = source.locate(int(w))
            fd = fds[source.files[fi]]
            for (off, per_traj, frame), buf in zip(where[fi], bufs):
                os.preadv(fd, [buf], off + traj * per_traj + t0 * frame)

    read(windows[:20])
    start = time.perf_counter()
    read(windows)
    elapsed = time.perf_counter() - start
    for fd in fds.values():
        os.close(fd)
    return elapsed


#: how long a raw pool process waits at the barrier for the others before it gives up
BARRIER_TIMEOUT_S = 120.0
_barrier = None             # the raw pool's barrier, inherited by its forked processes


def _set_barrier(barrier) -> None:
    global _barrier
    _barrier = barrier


def raw_pool(processes: int) -> ProcessPoolExecutor:
    """The processes `raw_parallel` reads with (forked: they inherit a barrier at which their
    timed reads start together)."""
    ctx = get_context("fork")
    return ProcessPoolExecutor(processes, mp_context=ctx, initializer=_set_barrier,
                               initargs=(ctx.Barrier(processes),))


def _raw_task(args) -> tuple[float, float]:
    source, windows, fresh = args
    return _raw_reads(source, windows, fresh, _barrier)


def raw_parallel(pool, source, windows: np.ndarray, processes: int, fresh: bool) -> float:
    """Wall seconds for the `processes` processes of `pool` (from `raw_pool(processes)`)
    splitting the same windows' raw reads: from the first timed read's start to the last
    one's end. Each opens its files and warms up first, then waits for the others at the
    pool's barrier, so that neither handing out the work nor opening files is timed, as it is
    not for one process (`raw_bound`)."""
    parts = np.array_split(windows, processes)
    spans = list(pool.map(_raw_task, [(source, p, fresh) for p in parts]))
    return max(end for _, end in spans) - min(start for start, _ in spans)


def bench_windows(rng, n_windows: int, need: int) -> np.ndarray:
    """`need` window ids for a round of the raw bounds and a reader's work alone: shuffled
    passes over the dataset's `n_windows` back to back, as the loaders draw epochs, so that
    they read as many windows as each loader variant hands out (batches x batch) even where
    the dataset holds fewer."""
    passes = -(-need // n_windows)
    return np.concatenate([rng.permutation(n_windows) for _ in range(passes)])[:need]


def bench_dataset(path: str, workers: int, batch: int, n_batches: int, rounds: int,
                  device) -> dict:
    from the_well.data import WellDataset as UpstreamWellDataset
    from the_well.data.normalization import ZScoreNormalization

    layouts = read_layouts(list_hdf5(os.path.join(path, "data", "train")))
    source = well_source(layouts, 4, 1)
    sample_bytes = source.window_floats * 4
    cuda = device.type == "cuda"
    move = (lambda b: b.to(device, non_blocking=True)) if cuda else (lambda b: b)
    up = UpstreamWellDataset(path=path, well_split_name="train", n_steps_input=4,
                             n_steps_output=1, use_normalization=True,
                             normalization_type=ZScoreNormalization)
    variants = {
        "dsfm": (WellLoader([path], batch_size=batch, num_workers=workers, device=device),
                 lambda b: b),
        "dsfm_1w": (WellLoader([path], batch_size=batch, num_workers=1, device=device),
                    lambda b: b),
        "dsfm_1w_numpy": (WellLoader([path], batch_size=batch, num_workers=1, device=device,
                                     native_kernel=False), lambda b: b),
        "dsfm_1w_read": (WellLoader([path], batch_size=batch, num_workers=1, device=device,
                                    assemble_on="device"), lambda b: b),
        "dsfm_1w_hdf5": (WellLoader([path], batch_size=batch, num_workers=1, device=device,
                                    direct_reads=False), lambda b: b),
        # the GPU configuration with the reader on a core of its own: the trainer keeps the
        # others while it consumes this variant (see `_own_core`)
        "dsfm_1w_read_own": (WellLoader([path], batch_size=batch, num_workers=1, device=device,
                                        assemble_on="device", reader_cpus=READER_CPU),
                             lambda b: b),
        "upstream": (DataLoader(up, batch_size=batch, shuffle=True, num_workers=workers,
                                pin_memory=cuda, persistent_workers=True, drop_last=True),
                     lambda b: move(b["input_fields"])),
        "h5py": (DataLoader(PlainH5Dataset(source), batch_size=batch, shuffle=True,
                            num_workers=workers, pin_memory=cuda, persistent_workers=True,
                            drop_last=True), move),
    }
    iters = {k: iter(v) if isinstance(v, WellLoader) else _forever(v)
             for k, (v, _) in variants.items()}
    drain = {k: prefetched(v) for k, (v, _) in variants.items()}
    for k, (v, to_device) in variants.items():
        with _own_core(k):
            _consume(iters[k], 10, to_device)               # start-up and page cache
        if isinstance(v, WellLoader):
            v.reset_trainer_costs()                         # timed rounds only
    runs = {k: [] for k in variants}
    raw = {k: [] for k in ("direct", "new", "direct_w", "new_w") + ALONE}
    kernel = native.load()
    shift, scale = variants["dsfm"][0].datasets[0].shift, variants["dsfm"][0].datasets[0].scale
    rng = np.random.default_rng(0)
    with raw_pool(workers) as pool:
        raw_parallel(pool, source, rng.permutation(len(source))[:4 * workers], workers, True)
        for _ in range(rounds):
            for k, (_, to_device) in variants.items():
                with _own_core(k):
                    # each round starts from the steady state: what the loader read ahead
                    # while the variants before it ran is drained first
                    runs[k].append(_consume(iters[k], n_batches, to_device, drain[k]))
            windows = bench_windows(rng, len(source), n_batches * batch)
            raw["direct"].append(raw_bound(source, windows))
            raw["new"].append(raw_bound(source, windows, fresh=True))
            raw["pread"].append(raw_pread(source, windows))
            raw["alone_read"].append(reader_alone(source, windows, batch, False,
                                                  kernel=kernel))
            raw["alone_read_py"].append(reader_alone(source, windows, batch, False))
            raw["alone_asm"].append(reader_alone(source, windows, batch, True, shift, scale,
                                                 kernel))
            raw["alone_asm_window"].append(reader_alone(source, windows, batch, True, shift,
                                                        scale, kernel, batch_reads=False))
            raw["alone_asm_numpy"].append(reader_alone(source, windows, batch, True, shift,
                                                       scale))
            raw["alone_asm_ring"].append(reader_alone(source, windows, batch, True, shift, scale,
                                                      kernel, slots=RING_SLOTS_1R))
            raw["direct_w"].append(raw_parallel(pool, source, windows, workers, False))
            raw["new_w"].append(raw_parallel(pool, source, windows, workers, True))
    reader_rates, trainer = {}, {}
    for k in LOADERS:
        loader = variants[k][0]
        reader_rates[k] = [n / t for n, t in zip(loader.windows_read, loader.read_s)]
        trainer[k] = loader.trainer_costs()
        loader.close()
    rows = {"dataset": source.name, "window": [5, source.n_channels, *source.spatial_shape],
            "sample_mb": sample_bytes / 1e6, "raw_windows_per_round": len(windows),
            "native_kernel_used": {k: variants[k][0].native_kernel_used for k in LOADERS}}
    for k in variants:
        rows[k] = _summary(runs[k], n_batches, batch, sample_bytes)
    rate = {k: statistics.median(n_batches * batch / t for t in v) for k, v in raw.items()}
    raw_rate = max(rate["direct"], rate["new"])        # the bound: the faster way h5py reads
    raw_w_rate = max(rate["direct_w"], rate["new_w"])
    rows["raw"] = {"samples_per_s": raw_rate, "mb_per_s": raw_rate * sample_bytes / 1e6,
                   "read_direct_per_s": rate["direct"], "getitem_per_s": rate["new"]}
    rows["raw_w"] = {"samples_per_s": raw_w_rate, "mb_per_s": raw_w_rate * sample_bytes / 1e6}
    for k in ALONE:
        rows[f"raw_{k}"] = {"samples_per_s": rate[k], "mb_per_s": rate[k] * sample_bytes / 1e6,
                            "vs_raw": rate[k] / raw_rate}
    rows["dsfm_vs_raw_same_processes"] = rows["dsfm"]["samples_per_s"] / raw_w_rate
    for k, rates in reader_rates.items():       # in situ: windows per second a reader is busy
        rows[k]["trainer_ms_per_batch"] = trainer[k]
        rows[k]["reader_busy_per_s"] = rates
        rows[k]["reader_busy_vs_raw"] = [r / raw_rate for r in rates]
    rows["dsfm_vs_upstream"] = rows["dsfm"]["samples_per_s"] / rows["upstream"]["samples_per_s"]
    rows["dsfm_per_worker_vs_raw"] = rows["dsfm"]["samples_per_s"] / workers / raw_rate
    for k in LOADERS[1:]:
        rows[f"{k}_vs_raw"] = rows[k]["samples_per_s"] / raw_rate
        rows[f"{k}_vs_raw_pread"] = rows[k]["samples_per_s"] / rate["pread"]
    return rows


LOADERS = ("dsfm", "dsfm_1w", "dsfm_1w_numpy", "dsfm_1w_read", "dsfm_1w_read_own",
           "dsfm_1w_hdf5")
#: single-process bounds and a reader's work alone, each reported as raw_<name>
ALONE = ("pread", "alone_read", "alone_read_py", "alone_asm", "alone_asm_window",
         "alone_asm_numpy", "alone_asm_ring")
LABELS = {"dsfm_1w": "dsfm 1r", "dsfm_1w_numpy": "dsfm 1r numpy", "dsfm_1w_read": "dsfm 1r read",
          "dsfm_1w_hdf5": "dsfm 1r hdf5",
          "dsfm_1w_read_own": "dsfm 1r read own",
          "raw": "raw (1p)", "raw_pread": "raw pread", "raw_alone_read": "reader alone",
          "raw_alone_read_py": "alone read py", "raw_alone_asm": "reader alone asm",
          "raw_alone_asm_window": "alone asm window", "raw_alone_asm_numpy": "alone asm numpy",
          "raw_alone_asm_ring": "alone asm ring"}
#: with CUDA the device assembles in every WellLoader variant (there is no CPU default to
#: compare), so `dsfm 1r` is the same configuration as `dsfm 1r read`, `numpy` reads window by
#: window in Python and `hdf5` reads through the HDF5 library
CUDA_LABELS = {"dsfm_1w": "dsfm 1r (device)", "dsfm_1w_numpy": "dsfm 1r py reads",
               "dsfm_1w_read": "dsfm 1r again", "dsfm_1w_hdf5": "dsfm 1r hdf5 reads"}
#: the ring of a one-reader WellLoader (2 · num_workers + 2 slots), for `alone asm ring`
RING_SLOTS_1R = 4


def prefetched(loader) -> int:
    """Batches a loader holds ready after standing idle: a WellLoader's ring, a DataLoader's
    prefetch_factor batches per worker."""
    if isinstance(loader, WellLoader):
        return loader.ring_slots
    return (loader.prefetch_factor or 0) * loader.num_workers


def _forever(loader):
    while True:
        yield from loader


def rss_run(paths: list[str], workers: int, batch: int, n_batches: int, device,
            seconds: float | None = None) -> dict:
    """Memory of the trainer and its readers over n_batches of the whole mixture. The sum of
    RSS counts the shared ring once per process that has touched a page of it, so it climbs
    until every reader has written every slot; the sum of PSS (each shared page divided among
    the processes mapping it) is the memory really in use, and is what must stay flat."""
    import psutil

    def memory(loader):
        procs = [psutil.Process()] + [psutil.Process(p) for p in loader.worker_pids]
        rss = sum(p.memory_info().rss for p in procs) / 2**20
        try:
            pss = sum(p.memory_full_info().pss for p in procs) / 2**20
        except (psutil.AccessDenied, AttributeError):
            pss = float("nan")
        return rss, pss

    cuda = torch.device(device).type == "cuda"
    samples, gpu = [], []
    began = time.perf_counter()
    with WellLoader(paths, batch_size=batch, num_workers=workers, device=device) as loader:
        it = iter(loader)
        for i in range(n_batches):
            next(it)
            # `seconds`: stop early (a time-limited run keeps what it measured)
            late = seconds is not None and time.perf_counter() - began > seconds
            if i % max(1, n_batches // 20) == 0 or i == n_batches - 1 or late:
                samples.append((i + 1, *memory(loader)))
                if cuda:            # the batches waiting on the device (none handed out kept)
                    gpu.append(torch.cuda.memory_allocated(device) / 2**20)
            if late:
                break
        ring = loader.ring_bytes / 2**20
    n_batches = samples[-1][0]
    warm = [k for k, (i, _, _) in enumerate(samples) if i > n_batches // 10]
    out = {"batches": n_batches, "ring_mib": ring, "samples": samples,
           "rss_first_mib": samples[0][1], "rss_last_mib": samples[-1][1],
           "pss_first_mib": samples[0][2], "pss_last_mib": samples[-1][2],
           "rss_growth_after_warmup_mib": samples[warm[-1]][1] - samples[warm[0]][1],
           "pss_growth_after_warmup_mib": samples[warm[-1]][2] - samples[warm[0]][2]}
    if cuda:
        out.update(cuda_allocated_mib=gpu, cuda_first_mib=gpu[0], cuda_last_mib=gpu[-1],
                   cuda_growth_after_warmup_mib=gpu[warm[-1]] - gpu[warm[0]])
    return out


def h2d_bandwidth(device, nbytes: int = 256 * 2**20, kinds=("pageable", "pinned")) -> dict:
    """Pinned vs pageable host-to-device copy bandwidth, GB/s, median of 10 copies of
    `nbytes` each."""
    out = {}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for kind in kinds:
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=(kind == "pinned"))
        src.fill_(1)        # untouched pageable pages all map the zero page: a cached read
        times = []
        for _ in range(12):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out[f"{kind}_gb_s"] = nbytes / statistics.median(times[2:]) / 1e9
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="python -m perf.loader_bench",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="Well base directory (dsfm.sim --preset small)")
    ap.add_argument("--datasets", help="comma-separated subset of the datasets under BASE")
    ap.add_argument("--workers", type=positive_int, default=2)
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--batches", type=positive_int, default=60,
                    help="timed batches per variant, round")
    ap.add_argument("--rounds", type=positive_int, default=3,
                    help="rounds; each variant once per round")
    ap.add_argument("--rss-batches", type=non_negative_int, default=0,
                    help="also run the mixture this many batches and record memory")
    ap.add_argument("--rss-seconds", type=positive_float, default=None,
                    help="stop the memory run after this long (it reports the batches done)")
    ap.add_argument("--json")
    ap.add_argument("--trainer-threads", type=positive_int, default=1,
                    help="torch threads of this (the training) process")
    args = ap.parse_args(argv)
    names = None
    if args.datasets is not None:
        names = [n for n in args.datasets.split(",") if n]
        if not names:
            ap.error("--datasets: no dataset named")
    paths = well_datasets(ap, args.base, names)
    torch.set_num_threads(args.trainer_threads)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "workers": args.workers, "batch": args.batch,
              "trainer_threads": args.trainer_threads, "rows": []}
    why = native.why_unavailable()
    report["native_kernel"] = why or "available"
    print(f"{args.workers} workers, batch {args.batch}, 4+1 steps, z-score, on {report['device']}"
          f"; C kernel: {why or 'available'}", flush=True)

    def save() -> None:       # after every stage: a run cut short keeps what it measured
        if args.json:
            write_json(args.json, report)

    # the GPU's figures first (the copy rate, memory over many batches), then the long
    # per-dataset comparison
    if device.type == "cuda":
        report["h2d"] = h2d_bandwidth(device)
        with WellLoader(paths, batch_size=args.batch, num_workers=args.workers,
                        device=device) as loader:
            loader.time_copies = True
            for _ in range(100):
                next(loader)
            # each slot's first copy left out (first use of its pages and of the destination)
            report["h2d"]["loader_copy_gb_s"] = loader.copy_bandwidth(skip=loader.ring_slots)
            size = int(statistics.median(b for b, _, _ in loader.copies))
        h = report["h2d"]
        h["loader_vs_pinned"] = h["loader_copy_gb_s"] / h["pinned_gb_s"]
        # the same pinned copy at the loader's copy size: what a copy of that size can reach
        h["copy_bytes"] = size
        h["pinned_same_size_gb_s"] = h2d_bandwidth(device, size, ("pinned",))["pinned_gb_s"]
        h["loader_vs_pinned_same_size"] = h["loader_copy_gb_s"] / h["pinned_same_size_gb_s"]
        print(f"host-to-device: pinned {h['pinned_gb_s']:.1f} GB/s, pageable "
              f"{h['pageable_gb_s']:.1f} GB/s (256 MiB copies), WellLoader copies "
              f"{h['loader_copy_gb_s']:.1f} GB/s ({h['loader_vs_pinned']:.0%} of pinned; pinned "
              f"copies of the loader's {h['copy_bytes'] / 1e6:.1f} MB: "
              f"{h['pinned_same_size_gb_s']:.1f} GB/s, the loader "
              f"{h['loader_vs_pinned_same_size']:.0%} of that)", flush=True)
        save()
    if args.rss_batches:
        try:
            r = report["rss"] = rss_run(paths, args.workers, args.batch, args.rss_batches,
                                        device, args.rss_seconds)
        except Exception as exc:
            report["rss"] = {"error": repr(exc)}
            print(f"memory run failed: {exc!r}", flush=True)
        else:
            gpu = (f"; GPU memory allocated {r['cuda_first_mib']:.0f} → "
                   f"{r['cuda_last_mib']:.0f} MiB, growth after warm-up "
                   f"{r['cuda_growth_after_warmup_mib']:+.1f} MiB" if "cuda_last_mib" in r else "")
            print(f"memory over {r['batches']} mixture batches (trainer + readers): ring "
                  f"{r['ring_mib']:.0f} MiB; PSS {r['pss_first_mib']:.0f} → "
                  f"{r['pss_last_mib']:.0f} MiB, growth after warm-up "
                  f"{r['pss_growth_after_warmup_mib']:+.1f} MiB; RSS sum "
                  f"{r['rss_first_mib']:.0f} → {r['rss_last_mib']:.0f} MiB (counts the shared "
                  f"ring once per reader that touched it){gpu}", flush=True)
        save()
    labels = {**LABELS, **(CUDA_LABELS if device.type == "cuda" else {})}
    print(f"{'dataset':30s} {'variant':16s} {'samples/s':>9s} {'MB/s':>7s} {'med ms':>7s} "
          f"{'p95 ms':>7s}")
    for path in paths:
        try:
            r = bench_dataset(path, args.workers, args.batch, args.batches, args.rounds, device)
        except Exception as exc:                # one dataset's failure: say so, go on
            report["rows"].append({"dataset": os.path.basename(path), "error": repr(exc)})
            print(f"{os.path.basename(path):30s} failed: {exc!r}", flush=True)
            save()
            continue
        report["rows"].append(r)
        for v in LOADERS + ("upstream", "h5py", "raw", "raw_w") + tuple(f"raw_{k}"
                                                                      for k in ALONE):
            m = r[v]
            lat = f"{m['batch_ms_median']:7.2f} {m['batch_ms_p95']:7.2f}" if "batch_ms_p95" in m \
                else f"{'-':>7s} {'-':>7s}"
            # raw_w: the same reads spread over a pool of `workers` processes, beside "raw
            # (1p)", one process reading in place (with 1 worker the two differ by the pool)
            label = labels.get(v, f"raw pool ({args.workers}p)" if v == "raw_w" else v)
            print(f"{r['dataset']:30s} {label:16s} {m['samples_per_s']:9.0f} "
                  f"{m['mb_per_s']:7.0f} {lat}")
        print(f"{'':30s} dsfm/upstream {r['dsfm_vs_upstream']:.1f}x | dsfm vs raw pool "
              f"{args.workers}p: {r['dsfm_vs_raw_same_processes']:.2f}x")
        print(f"{'':30s} 1 reader vs raw 1p (vs raw pread): " + ", ".join(
            f"{labels[k]} {r[f'{k}_vs_raw']:.2f}x ({r[f'{k}_vs_raw_pread']:.2f}x)"
            for k in LOADERS[1:]))
        print(f"{'':30s} a reader's work alone vs raw 1p: read "
              f"{r['raw_alone_read']['vs_raw']:.2f}x (window by window in Python: "
              f"{r['raw_alone_read_py']['vs_raw']:.2f}x), read + assemble "
              f"{r['raw_alone_asm']['vs_raw']:.2f}x (kernel window by window: "
              f"{r['raw_alone_asm_window']['vs_raw']:.2f}x; NumPy: "
              f"{r['raw_alone_asm_numpy']['vs_raw']:.2f}x; {RING_SLOTS_1R} slots in turn: "
              f"{r['raw_alone_asm_ring']['vs_raw']:.2f}x)")
        print(f"{'':30s} readers busy, in situ, vs raw 1p: " + ", ".join(
            f"{labels.get(k, k)} {'/'.join(f'{x:.2f}' for x in r[k]['reader_busy_vs_raw'])}x"
            for k in LOADERS))
        t = r["dsfm"]["trainer_ms_per_batch"]
        print(f"{'':30s} trainer per batch (dsfm): next() {t['next_ms']:.2f} ms = waiting "
              f"{t['wait_ms']:.2f} ms (issuing copies and assembly inside it: "
              f"{t['launch_ms']:.2f} ms) + bookkeeping {t['next_ms'] - t['wait_ms']:.2f} ms",
              flush=True)
        save()
    save()
    # a dataset (or the memory run) that failed: said above, and in the exit status
    failed = [r["dataset"] for r in report["rows"] if "error" in r]
    failed += ["the memory run"] if "error" in report.get("rss", {}) else []
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
