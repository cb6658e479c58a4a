"""A build lock left by a killed process hung every later run silently at start-up."""

import os
import signal
import subprocess
import sys
import threading
import time

from dsfm.runtime import build_lock
from tests.conftest import REPO


def _lock(path, age_s: float = 0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    then = time.time() - age_s
    os.utime(path, (then, then))
    return str(path)


def test_old_locks_are_found_in_both_layouts_and_young_ones_are_not(tmp_path):
    """Under TORCH_EXTENSIONS_DIR an op builds in <root>/<op>, under torch's own cache in
    <root>/py311_cpu/<op>; a lock younger than the patience is a build in progress."""
    flat = _lock(tmp_path / "deepspeed_shm_comm" / "lock", age_s=600)
    nested = _lock(tmp_path / "py311_cu128" / "fused_adam" / "lock", age_s=300)
    _lock(tmp_path / "py311_cpu" / "cpu_adam" / "lock", age_s=5)
    (tmp_path / "py311_cpu" / "cpu_adam" / ".ninja_lock").touch()     # ninja's, not torch's
    now = time.time()
    found = dict(build_lock.old_locks(str(tmp_path), 120, now=now))
    assert sorted(found) == sorted([flat, nested])
    assert 599 < found[flat] < 700 and 299 < found[nested] < 400


def test_a_step_that_outlasts_its_patience_names_each_old_lock_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = _lock(tmp_path / "deepspeed_shm_comm" / "lock", age_s=3600)
    said, heard = [], threading.Event()

    def say(line):
        said.append(line)
        heard.set()

    with build_lock.watch("rank 3's process-group start", say=say, patience_s=0.05):
        assert heard.wait(30), "the watch never spoke"
        time.sleep(0.3)                 # several more checks: the same lock is not named again
    assert len(said) == 1, said
    assert said[0].startswith("warning: rank 3's process-group start has waited ")
    assert path in said[0] and "delete the file" in said[0]


def test_a_run_stuck_on_a_left_lock_says_which_file(demo_base, tmp_path):
    """A real run under gloo loads DeepSpeed's CPU communication op while its process group
    starts: with that op's lock left behind, the run waited forever and said nothing."""
    ext = tmp_path / "ext"
    path = _lock(ext / "deepspeed_shm_comm" / "lock", age_s=3600)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext), PYTHONFAULTHANDLER="1",
               **{build_lock.PATIENCE_ENV: "1"})
    cmd = [sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero2.json",
           "--run-dir", str(tmp_path / "run"), "--set", f"data.base={demo_base}",
           "--set", "data.num_workers=1"]
    out = tmp_path / "stdout.txt"
    with open(out, "w") as stdout:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout,
                                stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None and \
                not any("extension build lock" in line for line in lines):
            time.sleep(0.1)
        warned = [line for line in lines if "extension build lock" in line]
        if not warned:
            if proc.poll() is None:
                # where it is instead (once seen in a full CI-like run, never alone): SIGABRT
                # makes the faulthandler print every thread's stack to stderr
                proc.send_signal(signal.SIGABRT)
                proc.wait(timeout=60)
            reader.join(timeout=10)         # all it said, also if it ended by itself
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert warned, ("stdout: " + out.read_text()[-2000:] + "\nstderr: "
                    + "".join(lines)[-6000:])
    assert warned[0].startswith("warning: rank 0's process-group start has waited ")
    assert path in warned[0]
