"""Say so when a rank waits on a torch-extension build lock that may have been left behind.

DeepSpeed compiles its ops (the CPU communication op under gloo, FusedAdam and the CPU Adam on
GPUs) with torch's JIT builder, which takes `<build dir>/lock` for every load, even one that only
finds the op up to date, and which waits for that file to go without limit and without a word.
A process killed while it held the lock (a SIGKILL, a kill during start-up, a node lost) leaves
the file behind, and from then on every run of every user of that cache hangs at start-up,
before its first log line, until someone deletes it. Whether a compiler still runs cannot be
told from here (the cache is often on a file system shared by many nodes), so the file is never
deleted for the user: a rank that has waited `patience_s` names each lock older than that.
"""

from __future__ import annotations

import glob
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable

#: seconds a rank waits in DeepSpeed's set-up before it names old build locks (tests shorten it)
PATIENCE_ENV = "DSFM_BUILD_LOCK_PATIENCE_S"
DEFAULT_PATIENCE_S = 120.0


def build_root() -> str:
    """Where torch builds extensions: TORCH_EXTENSIONS_DIR, else its per-user cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return root
    from torch.utils.cpp_extension import get_default_build_root

    return get_default_build_root()


def old_locks(root: str, older_than_s: float, now: float | None = None) -> list[tuple[str, float]]:
    """(path, age in s) of every build lock under root older than `older_than_s`: one level
    down under TORCH_EXTENSIONS_DIR, two under the default root (`py311_cu128/<op>/lock`)."""
    now = time.time() if now is None else now
    found = []
    for path in sorted(glob.glob(os.path.join(root, "*", "lock"))
                       + glob.glob(os.path.join(root, "*", "*", "lock"))):
        try:
            age = now - os.stat(path).st_mtime
        except OSError:                       # released meanwhile
            continue
        if age >= older_than_s:
            found.append((path, age))
    return found


def patience() -> float:
    value = os.environ.get(PATIENCE_ENV, "")
    try:
        return float(value) if value else DEFAULT_PATIENCE_S
    except ValueError:
        return DEFAULT_PATIENCE_S


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@contextmanager
def watch(what: str, say: Callable[[str], None] = _stderr, patience_s: float | None = None):
    """Around a step that may load a DeepSpeed op (`what` names it and the rank): if it lasts
    longer than `patience_s`, each build lock older than that is named once, with what to do."""
    wait_s = patience() if patience_s is None else patience_s
    done = threading.Event()
    began = time.monotonic()

    def run() -> None:
        named: set[str] = set()
        while not done.wait(wait_s):
            for path, age in old_locks(build_root(), wait_s):
                if path in named:
                    continue
                named.add(path)
                say(f"warning: {what} has waited {time.monotonic() - began:.0f} s; the "
                    f"extension build lock {path} has existed for {age:.0f} s. torch holds it "
                    "while it compiles a DeepSpeed op (minutes) and waits for it without limit: "
                    "if no compiler runs (no ninja or c++ in ps on any node sharing that "
                    "directory), a process killed during a build left it; delete the file and "
                    "the ranks go on")

    thread = threading.Thread(target=run, name="dsfm-build-lock-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
