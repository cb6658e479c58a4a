"""Launches through a real Slurm: a one-node cluster on this machine (`bash .ci/local_slurm.sh`
starts one; CI does). Training under `srun`, SLURM-style preemption signals sent with `scancel`,
the hostfile helper inside an allocation feeding the deepspeed launcher, and the collective
sweep's srun launcher. Skipped when no Slurm answers, unless DSFM_REQUIRE_SLURM=1 (CI sets it
once its cluster is up), where that is a failure."""

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import REPO, run, wait_for_logged_steps
from tests.test_train import TINY, ds_config, losses

pytestmark = pytest.mark.slow


def _slurm_up() -> str | None:
    """None when a Slurm partition has a usable node, else why not."""
    if not shutil.which("sinfo") or not shutil.which("srun"):
        return "no Slurm client (sinfo, srun) on PATH"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                timeout=20).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if not any(s.rstrip("*") in ("idle", "mixed", "allocated") for s in states):
        return f"no usable Slurm node (sinfo: {states or 'no answer'})"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm():
    why = _slurm_up()
    if why:
        if os.environ.get("DSFM_REQUIRE_SLURM") == "1":
            pytest.fail(f"DSFM_REQUIRE_SLURM=1 but {why}")
        pytest.skip(f"{why}; bash .ci/local_slurm.sh starts a one-node cluster")


def _train_cmd(ds: str, run_dir, sets) -> list[str]:
    cmd = [sys.executable, "dsfm/train.py", "--ds_config", ds, "--run-dir", str(run_dir)]
    for s in TINY + list(sets):
        cmd += ["--set", s]
    return cmd


def test_srun_training_discovers_ranks_from_slurm(demo_base, tmp_path):
    ds = ds_config(tmp_path, 3)
    run_dir = tmp_path / "srun"
    proc = run(["srun", "-n", "2", "--job-name", f"dsfm-{uuid.uuid4().hex[:8]}"]
               + _train_cmd(ds, run_dir, [f"data.base={demo_base}", "train.max_steps=3"]),
               timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) via srun" in proc.stdout and "ZeRO stage 3" in proc.stdout
    assert sorted(losses(run_dir)) == [1, 2, 3]
    files = set(os.listdir(run_dir / "checkpoints" / "step00000003"))
    assert {"dsfm_rank0.pt", "dsfm_rank1.pt", "COMPLETE"} <= files


def _job_id(name: str, timeout_s: float = 60) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True,
                             text=True, timeout=20).stdout.split()
        if out:
            return out[0]
        time.sleep(0.2)
    raise AssertionError(f"job {name} never showed in squeue")


def test_scancel_signals_checkpoint_then_stop_a_srun_job(demo_base, tmp_path):
    """What a SLURM preemption does: `scancel --signal=USR1` (as `#SBATCH --signal=USR1@120`
    would) checkpoints and carries on, `scancel --signal=TERM` checkpoints and stops cleanly."""
    ds = ds_config(tmp_path, 2)
    run_dir = tmp_path / "preempt"
    name = f"dsfm-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        ["srun", "-n", "2", "--job-name", name] + _train_cmd(
            ds, run_dir, [f"data.base={demo_base}", "train.max_steps=3000",
                          "train.checkpoint_every=0", "train.signal_check_every=2"]),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job = _job_id(name)
        wait_for_logged_steps(run_dir, 3, 180)
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        deadline = time.time() + 60
        while time.time() < deadline and not any(
                (run_dir / "checkpoints").glob("step*/COMPLETE")):
            time.sleep(0.1)
        time.sleep(1.0)
        subprocess.run(["scancel", "--signal=TERM", job], check=True, timeout=30)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            subprocess.run(["scancel", "--name", name], timeout=30)
            proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    tags = sorted(t for t in os.listdir(run_dir / "checkpoints") if t.startswith("step"))
    assert len(tags) == 2 and int(tags[1][4:]) > int(tags[0][4:]) >= 3, tags
    for tag in tags:
        files = set(os.listdir(run_dir / "checkpoints" / tag))
        assert {"dsfm_rank0.pt", "dsfm_rank1.pt", "COMPLETE"} <= files
    assert "stopped at step" in out and "--resume" in out
    assert max(losses(run_dir)) < 3000


def test_hostfile_from_an_allocation_drives_the_deepspeed_launcher(tmp_path):
    """`python -m dsfm.runtime.slurm` inside `salloc` writes this node with the allocation's
    slots; the sweep's deepspeed launcher runs that many ranks from it."""
    hostfile = tmp_path / "hostfile"
    proc = run(["salloc", "-N", "1", "--ntasks-per-node", "2", sys.executable, "-m",
                "dsfm.runtime.slurm", "--out", str(hostfile)], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    hosts = [ln.split() for ln in hostfile.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    node = subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()
    assert hosts == [[node, "slots=2"]]
    # -n alone sets no SLURM_NTASKS_PER_NODE: SLURM_TASKS_PER_NODE's 2 (the default 4 before)
    proc = run(["salloc", "-n", "2", sys.executable, "-m", "dsfm.runtime.slurm", "--out",
                str(tmp_path / "by_tasks")], timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = (tmp_path / "by_tasks").read_text()
    assert f"\n{node} slots=2\n" in text and "slots from SLURM_TASKS_PER_NODE" in text
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    proc = run([sys.executable, "-m", "perf.allreduce_sweep", "--backend", "gloo", "--launcher",
                "deepspeed", "--hostfile", str(hostfile), "-b", "1K", "-e", "4K",
                "-c", "all_reduce", "--out", str(tmp_path / "s"), "--json",
                str(tmp_path / "r.json")], env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = json.loads((tmp_path / "r.json").read_text())
    assert {r["world_size"] for r in records} == {2} and all(r["wrong"] == 0 for r in records)


def test_sweep_srun_launcher_inside_an_allocation(tmp_path):
    proc = run(["salloc", "-n", "2", sys.executable, "-m", "perf.allreduce_sweep", "--backend",
                "gloo", "--launcher", "srun", "--profiles", "ring", "-b", "1K", "-e", "16K",
                "-f", "4", "-c", "all_reduce,broadcast", "--out", str(tmp_path / "s"),
                "--json", str(tmp_path / "r.json")], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = json.loads((tmp_path / "r.json").read_text())
    assert {r["world_size"] for r in records} == {2} and all(r["wrong"] == 0 for r in records)
    assert {r["collective"] for r in records} == {"all_reduce", "broadcast"}
    assert {r["profile"] for r in records} == {"ring"}
