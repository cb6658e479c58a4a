"""A rank whose launcher has gone stops as on SIGTERM.

`deepspeed --num_gpus N` (the runner) starts `deepspeed.launcher.launch`, which starts the
ranks. On one node the runner installs no signal handler, so a SIGTERM to it (a user's kill,
Slurm's scancel reaching the job's script) ends the runner alone: the launch process and every
rank train on, orphaned, and nothing stops them. A launch process killed with SIGKILL leaves
its ranks the same way, and so does a torchrun (its elastic agent) killed with SIGKILL (the
OOM killer; its SIGTERM it passes on to the ranks itself). `watch` looks once a second whether
any of them has gone (its child's parent pid changed: no pid reuse can fool it) and then sends
this process SIGTERM, so a rank that trains checkpoints at the next step the ranks agree on and
stops (checkpoint.Preemption), and one still starting ends at once, as on the launcher's own
SIGTERM.
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


def _is_torchrun(cmdline: list[str]) -> bool:
    return any(os.path.basename(arg) == "torchrun" or arg == "torch.distributed.run"
               for arg in cmdline[:3])


def launchers() -> list[tuple[int, int, str]]:
    """(pid, its parent's pid, what the parent is) for each tie of this rank to the job: this
    process to DeepSpeed's launch process and that one to the process that started it (the
    runner; not when init holds it already), or this process to torchrun. Empty when this
    process's parent is neither (python, mpirun, srun: left as they are)."""
    me, parent = os.getpid(), os.getppid()
    try:
        launch = psutil.Process(parent)
        cmdline = launch.cmdline()
        if _is_torchrun(cmdline):
            return [(me, parent, f"torchrun (pid {parent})")]
        if LAUNCH not in cmdline:
            return []
        runner = launch.ppid()
    except psutil.Error:
        return []
    ties = [(me, parent, f"DeepSpeed's launcher ({LAUNCH}, pid {parent})")]
    if runner > 1:
        ties.append((parent, runner, f"the deepspeed runner (pid {runner}) that started "
                                     f"DeepSpeed's launcher"))
    return ties


def watch(rank: int, interval_s: float = 1.0) -> threading.Thread | None:
    """Start the watch (a daemon thread) if DeepSpeed's launcher or torchrun started this
    process. Each rank that sees its launcher gone says so: the first to see it stops the
    others at the next signal check, often before their own look."""
    ties = launchers()
    if not ties:
        return None

    def run() -> None:
        while True:
            time.sleep(interval_s)
            gone = [what for pid, parent, what in ties if _parent(pid) != parent]
            if gone:
                break
        sys.stderr.write(f"rank {rank}: {gone[0]} has exited and left the ranks running: "
                         "stopping as on SIGTERM (a checkpoint at the next signal check once "
                         "training)\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run, name="dsfm-launcher-watch", daemon=True)
    thread.start()
    return thread
