"""The cluster's launch (docs/cluster.md, (a)): the DeepSpeed runner over a hostfile of several
nodes, which starts each node's `deepspeed.launcher.launch` through pdsh and ssh. Here the two
"nodes" are this machine under two names (localhost, 127.0.0.1), one rank each, with a real
pdsh and sshd (`bash .ci/local_pdsh.sh` sets them up; CI does). Skipped without them, unless
DSFM_REQUIRE_PDSH=1 (CI sets it once they answer), where that is a failure.

The runner is started through an interpreter path of the test's own (a virtual environment
over this one's packages): on SIGTERM it kills every node's launcher whose command line starts
with its own interpreter's path, and a shared one would end the launches of tests running
beside this one."""

import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import time

import pytest

from tests.conftest import REPO, free_port, run, wait_for_logged_steps
from tests.test_train import TINY, ds_config, losses

pytestmark = pytest.mark.slow

HOSTS = ("localhost", "127.0.0.1")


def _pdsh_up() -> str | None:
    """None when pdsh reaches both names of this machine over ssh, else why not."""
    if not shutil.which("pdsh"):
        return "no pdsh on PATH"
    try:
        proc = subprocess.run(["pdsh", "-w", ",".join(HOSTS), "echo up"], capture_output=True,
                              text=True, timeout=60,
                              env={**os.environ, "PDSH_RCMD_TYPE": "ssh",
                                   "PDSH_SSH_ARGS_APPEND": "-o BatchMode=yes"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"pdsh failed: {exc}"
    if not {f"{h}: up" for h in HOSTS} <= set(proc.stdout.splitlines()):
        return f"pdsh over ssh to {', '.join(HOSTS)} failed: {proc.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="module", autouse=True)
def pdsh():
    why = _pdsh_up()
    if why:
        if os.environ.get("DSFM_REQUIRE_PDSH") == "1":
            pytest.fail(f"DSFM_REQUIRE_PDSH=1 but {why}")
        pytest.skip(f"{why}; bash .ci/local_pdsh.sh sets up pdsh and ssh to this machine")


def own_python(tmp_path) -> str:
    """A path of this test's own to this Python with this environment's packages: a virtual
    environment whose site directory adds this one's (a bare link to the interpreter would
    leave a virtual environment for the base installation's packages)."""
    env_dir = tmp_path / "py"
    python = env_dir / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages",
                        str(env_dir)], check=True)
        purelib = sysconfig.get_path("purelib", vars={"base": str(env_dir),
                                                      "platbase": str(env_dir)})
        with open(os.path.join(purelib, "dsfm_test_parent.pth"), "w") as fh:
            fh.write("import site; " + "; ".join(f"site.addsitedir({d!r})"
                                                 for d in site.getsitepackages()) + "\n")
    return str(python)


def runner_cmd(tmp_path, ds: str, run_dir, sets) -> list[str]:
    """The DeepSpeed runner over a two-node hostfile, under this test's own interpreter path."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    cmd = [own_python(tmp_path), "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "dsfm/train.py",
           "--ds_config", ds, "--run-dir", str(run_dir)]
    for s in TINY + list(sets):
        cmd += ["--set", s]
    return cmd


def ranks_of(run_dir) -> list[int]:
    """The pids of this run's ranks, on either node (the docs' pattern, with the run dir)."""
    out = subprocess.run(["pgrep", "-f", f"python[0-9.]* -u dsfm/train.py .*--run-dir {run_dir}"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def complete_checkpoints(run_dir) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name[4:]) for p in ckpt.glob("step*") if (p / "COMPLETE").exists())


def test_two_nodes_over_pdsh_train_checkpoint_on_the_batch_scripts_signals_and_resume(
        demo_base, tmp_path):
    """Two nodes, one rank each, through pdsh: the run says so and trains. The batch script's
    SIGUSR1 recipe (`pkill -USR1 -f "python[0-9.]* -u dsfm/train.py"`, on the batch node)
    checkpoints and carries on, the runner untouched. SIGTERM to the runner (Slurm's at the
    time limit) ends pdsh, and so the ssh sessions the ranks print to, then kills each node's
    launcher, which passes SIGTERM on: the ranks used to die of the broken pipe at their next
    line (the one saying they were checkpointing), with no checkpoint written; they now write
    it and stop. The run resumes from it over pdsh."""
    ds = ds_config(tmp_path, 2, micro=2)
    run_dir = tmp_path / "r"
    cmd = runner_cmd(tmp_path, ds, run_dir, [f"data.base={demo_base}", "train.max_steps=100000",
                                             "train.checkpoint_every=0"])
    out_file = tmp_path / "runner.out"      # a file: a pipe read only at the end could fill
    with open(out_file, "w") as fh:
        runner = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT)
    try:
        assert wait_for_logged_steps(run_dir, 3, 240), runner.poll()
        log = run_dir / "train.log"
        assert "2 rank(s) via the DeepSpeed launcher" in log.read_text()
        assert len(ranks_of(run_dir)) == 2
        subprocess.run(["pkill", "-USR1", "-f",
                        f"python[0-9.]* -u dsfm/train.py .*--run-dir {run_dir}"], check=True)
        deadline = time.time() + 120
        while not complete_checkpoints(run_dir) and time.time() < deadline:
            time.sleep(0.2)
        [first] = complete_checkpoints(run_dir)
        assert wait_for_logged_steps(run_dir, first + 3, 120)       # and it trains on
        assert runner.poll() is None and len(ranks_of(run_dir)) == 2
        runner.send_signal(signal.SIGTERM)
        deadline = time.time() + 90         # the nodes' launchers SIGKILL their ranks at 30 s
        while ranks_of(run_dir) and time.time() < deadline:
            time.sleep(0.2)
        assert not ranks_of(run_dir)
        runner.wait(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
        for pid in ranks_of(run_dir):
            os.kill(pid, signal.SIGKILL)
    text, out = log.read_text(), out_file.read_text()
    assert "signal received: checkpointing at step" in text, out[-3000:]
    stopped = complete_checkpoints(run_dir)
    assert len(stopped) == 2 and stopped[1] > first + 2, (stopped, out[-3000:], text[-2000:])
    assert f"stopped at step {stopped[1]} on a signal" in text
    proc = run(runner_cmd(tmp_path, ds, run_dir, [f"data.base={demo_base}",
                                                  f"train.max_steps={stopped[1] + 2}",
                                                  "train.checkpoint_every=0"]) + ["--resume"],
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from step {stopped[1]} " in log.read_text()
    assert max(losses(run_dir)) == stopped[1] + 2
