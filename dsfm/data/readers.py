"""The prefetcher's reader process: `python -m dsfm.data.readers TASK_FD RESULT_FD PDEATHSIG`.

Started by `WellLoader` as a plain subprocess (not multiprocessing's spawn, which would re-import
the training script and torch in every reader): it imports only numpy and h5py, maps the shared
ring, and then reads the windows it is sent, each stored array of a window with one read
straight into its place in a ring slot (a positioned read of the file when the array is stored
contiguously as float32, an HDF5 hyperslab read otherwise; see `dsfm.data.handles.Slab`).
Messages are pickled over two pipes:

    in:  ("init", worker id, ring fd, ring bytes, slot bytes, sources, parent pid, max files,
          assemble here?, n_steps_input, per-source (shift, scale), check finite?,
          direct reads? (None: the default), CPUs to run on (None: any),
          C kernel? (None: if it builds))
         (step, slot, source index, window ids) ... None
    out: ("ready", wid, pid, using the C kernel?)
         ("done", wid, step, slot, seconds spent on the batch)
         ("error", wid, step, slot, type, text)

For a CUDA trainer the reader leaves each window in its native layout and the device assembles
the batch; for a CPU trainer it reads each window straight into its place in the assembled batch
and also normalizes and checks it (layout, broadcasting, normalization, NaN check), so that work
runs in parallel instead of in the training process. Where the compiled kernel of
`dsfm.data.native` builds, a batch whose arrays allow positioned reads is read (and, for a CPU
trainer, normalized in one pass per plane) by one call of it; otherwise window by window in
Python, with NumPy normalizing.
It ignores Ctrl-C, SIGTERM and SIGUSR1/2 (the training process decides; Slurm signals every
process of a job step), asks the kernel to kill it when its parent dies (when the loader was
built on the main thread: Linux sends that signal when the starting thread exits), and also exits
when it finds its parent gone or its task pipe closed.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import sys
import time
from multiprocessing.connection import Connection

import numpy as np

from dsfm import errors
from dsfm.data import native
from dsfm.data.handles import H5Pool
from dsfm.data.windows import WindowSource, first_nonfinite

FLOAT_BYTES = 4
#: what a reader ignores (the training process decides; Slurm signals every process of a job
#: step): `WellLoader` starts it with them blocked, which exec keeps where it resets handlers
IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def assembled_views(slot: np.ndarray, source: WindowSource, batch: int, n_in: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """x [B, T_in, C, *spatial] then y [B, T_out, C, *spatial], contiguous, at a slot's start."""
    per = source.n_channels * source.plane_floats
    nx, ny = batch * n_in * per, batch * (source.n_steps - n_in) * per
    flat = slot[:(nx + ny) * FLOAT_BYTES].view(np.float32)
    tail = (source.n_channels,) + source.spatial_shape
    return (flat[:nx].reshape((batch, n_in) + tail),
            flat[nx:].reshape((batch, source.n_steps - n_in) + tail))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the process that started it exits."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(tasks: Connection, results: Connection) -> None:
    try:
        init = tasks.recv()
    except EOFError:
        init = None
    if init is None:            # the loader closed (or its process died) before it sent it
        return
    (_, wid, ring_fd, ring_bytes, slot_bytes, sources, parent, max_open, assemble_here, n_in,
     norms, check_finite, direct, cpus, use_native) = init
    if os.getppid() != parent:
        return
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    mm = mmap.mmap(ring_fd, ring_bytes)       # the ring's file, inherited open and nameless
    os.close(ring_fd)
    ring = np.frombuffer(mm, dtype=np.uint8)
    pool = H5Pool(max_open, direct=direct)
    kernel = native.load(use_native)
    scratch = [np.empty(s.window_floats, np.float32) for s in sources] if assemble_here else []
    results.send(("ready", wid, os.getpid(), kernel is not None))
    try:
        while True:
            if not tasks.poll(0.5):
                if os.getppid() != parent:
                    break
                continue
            task = tasks.recv()
            if task is None:
                break
            step, slot, src_idx, windows = task
            windows = np.frombuffer(windows, dtype=np.int64)     # sent as raw bytes
            source = sources[src_idx]
            batch = len(windows)
            slot_mem = ring[slot * slot_bytes:(slot + 1) * slot_bytes]
            try:
                began = time.perf_counter()
                if assemble_here:
                    # CPU trainer: read each window straight into its place in the assembled
                    # batch and normalize it there while it is in cache
                    x, y = assembled_views(slot_mem, source, batch, n_in)
                    shift, scale = norms[src_idx]
                    bad = source.read_assembled(pool, windows, n_in, x, y, shift, scale,
                                                scratch[src_idx], check_finite, kernel)
                    del x, y
                    if bad is not None:
                        stored = np.empty(source.window_floats, np.float32)
                        source.read_batch(pool, windows[bad:bad + 1], stored)
                        raise errors.NonFiniteError(
                            first_nonfinite(source, windows[bad:bad + 1], stored))
                else:           # the device assembles: windows go straight into the slot
                    flat = slot_mem[:batch * source.window_floats * FLOAT_BYTES].view(np.float32)
                    source.read_batch(pool, windows, flat, kernel)
                read_s = time.perf_counter() - began
                results.send(("done", wid, step, slot, read_s))
            except errors.DsfmError as exc:
                results.send(("error", wid, step, slot, type(exc).__name__, str(exc)))
            except Exception as exc:  # noqa: BLE001 - anything else must still reach the trainer
                results.send(("error", wid, step, slot, type(exc).__name__,
                              f"{source.name}: {type(exc).__name__}: {exc}"))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass                                  # the training process went away
    finally:
        pool.close()                          # the ring mapping goes with the process


def main(argv: list[str]) -> int:
    if argv[2] == "1":                      # started by the main thread (see WellLoader)
        _die_with_parent()
    # The training process decides when readers stop. Ctrl-C reaches the whole process group,
    # and Slurm delivers scancel/--signal (USR1 before a preemption, TERM at it) to every
    # process of a job step: a reader that died of them would fail the trainer's very next
    # batch instead of letting it checkpoint. Readers still end with their pipe or their parent.
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # blocked since the fork (see WellLoader._start_workers): one that came meanwhile is pending
    # and, ignored now, discarded as it is unblocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, IGNORED_SIGNALS)
    tasks = Connection(int(argv[0]), writable=False)
    results = Connection(int(argv[1]), readable=False)
    serve(tasks, results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
