"""A rank whose DeepSpeed launcher has gone stops as on SIGTERM.

`deepspeed --num_gpus N` (the runner) starts `deepspeed.launcher.launch`, which starts the
ranks. On one node the runner installs no signal handler, so a SIGTERM to it (a user's kill,
Slurm's scancel reaching the job's script) ends the runner alone: the launch process and every
rank train on, orphaned, and nothing stops them. A launch process killed with SIGKILL leaves
its ranks the same way. `watch` looks once a second whether either has gone (its child's
parent pid changed: no pid reuse can fool it) and then sends this process SIGTERM, so a rank
that trains checkpoints at the next step the ranks agree on and stops (checkpoint.Preemption),
and one still starting ends at once, as on the launcher's own SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import psutil

LAUNCH = "deepspeed.launcher.launch"


def _parent(pid: int) -> int | None:
    try:
        return os.getppid() if pid == os.getpid() else psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def launchers() -> list[tuple[int, int, str]]:
    """(pid, its parent's pid, what the parent is) for each tie of this rank to the job: this
    process to DeepSpeed's launch process and that one to the process that started it (the
    runner; not when init holds it already). Empty when this process's parent is not
    DeepSpeed's launch process (python, torchrun, mpirun, srun: left as they are)."""
    me, parent = os.getpid(), os.getppid()
    try:
        launch = psutil.Process(parent)
        if LAUNCH not in launch.cmdline():
            return []
        runner = launch.ppid()
    except psutil.Error:
        return []
    ties = [(me, parent, f"DeepSpeed's launcher ({LAUNCH}, pid {parent})")]
    if runner > 1:
        ties.append((parent, runner, f"the deepspeed runner (pid {runner}) that started "
                                     f"DeepSpeed's launcher"))
    return ties


def watch(rank: int, say: bool, interval_s: float = 1.0) -> threading.Thread | None:
    """Start the watch (a daemon thread) if DeepSpeed's launcher started this process; `say`:
    whether this rank writes the line that says why it stops (one per node will do)."""
    ties = launchers()
    if not ties:
        return None

    def run() -> None:
        while True:
            time.sleep(interval_s)
            gone = [what for pid, parent, what in ties if _parent(pid) != parent]
            if gone:
                break
        if say:
            sys.stderr.write(f"rank {rank}: {gone[0]} has exited and left the ranks running: "
                             "stopping as on SIGTERM (a checkpoint at the next signal check "
                             "once training)\n")
            sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="dsfm-launcher-watch", daemon=True)
    thread.start()
    return thread
