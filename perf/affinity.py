"""CPU affinity for the benchmarks that place the training process and the readers apart."""

from __future__ import annotations

import os


def pin_threads(pid: int | str, cpus) -> None:
    """Every thread of process `pid` ("self" for this one) onto `cpus`: `sched_setaffinity` on a
    pid moves that one thread only, and the training process's other threads (autograd's,
    which runs the whole backward on CUDA, the CUDA driver's, a DataLoader's pin-memory
    thread) would stay where they were."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:                   # a thread that has just ended
            pass
