"""perf.allreduce_sweep on local CPU ranks with gloo: everything but NCCL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, run

SWEEP = [sys.executable, "-m", "perf.allreduce_sweep"]


@pytest.mark.slow
def test_ci_command_runs_checks_and_writes_every_output(tmp_path):
    out = tmp_path / "sweep"
    proc = run(SWEEP + ["--backend", "gloo", "--nprocs", "2", "-e", "1M", "--out", str(out),
                        "--json", str(tmp_path / "r.json")], timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "# Avg bus bandwidth" in proc.stdout and "# Out of bounds values : 0 OK" in proc.stdout
    # the all_reduce table says what its out-of-place column times (and only that table)
    assert proc.stdout.count("# out-of-place: torch.distributed has no out-of-place") == 1
    records = json.loads((tmp_path / "r.json").read_text())
    sizes = sorted({r["size"] for r in records})
    assert sizes[0] == 8 and sizes[-1] == 2 ** 20 and len(sizes) == 18
    for r in records:
        assert {"collective", "size", "world_size", "algbw", "busbw", "time_us",
                "wrong"} <= set(r)
        assert r["wrong"] == 0 and r["world_size"] == 2
        assert r["busbw"] == pytest.approx(r["algbw"] * 2 * (2 - 1) / 2)      # 2(n-1)/n
        assert r["algbw"] == pytest.approx(r["size"] / (r["time_us"] * 1e-6) / 1e9, rel=1e-6)
    assert (out / "results.csv").read_text().startswith("backend,profile,split,collective,size")
    assert {r["backend"] for r in records} == {"gloo"}
    # which backend, and that gloo's path is not reported (it logs none)
    assert "== backend gloo, launcher local, 2 ranks: gloo over TCP, on CPU tensors" in \
        proc.stdout and "# NCCL path" not in proc.stdout
    assert (out / "busbw.png").stat().st_size > 5000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    # the curve is all_reduce's own (in-place) column, not the copy plus all_reduce
    curve = {e.step: e.value for e in acc.Scalars("sweep/default/world/all_reduce/busbw")}
    inplace = {r["size"]: r["busbw"] for r in records if r["inplace"]}
    assert curve == pytest.approx(inplace, rel=1e-6)

    proc = run(SWEEP + ["--backend", "gloo", "--nprocs", "2", "-e", "4K", "--out",
                        str(tmp_path / "s2"), "--min-busbw", "1e6"], timeout=300)
    assert proc.returncode == 1 and "below --min-busbw" in proc.stderr


@pytest.mark.slow
def test_all_collectives_and_splits_are_correct(tmp_path):
    proc = run(SWEEP + ["--backend", "gloo", "--nprocs", "4", "--ranks-per-node", "2",
                        "-b", "64", "-e", "64K", "-f", "32", "-w", "1", "-n", "3",
                        "-c", "all_reduce,reduce_scatter,all_gather,broadcast,all_to_all",
                        "--splits", "world,intra,rail", "--profiles", "ring,tree",
                        "--out", str(tmp_path / "s"), "--json", str(tmp_path / "r.json")],
               timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = json.loads((tmp_path / "r.json").read_text())
    seen = {(r["profile"], r["split"], r["collective"], r["world_size"]) for r in records}
    for profile in ("ring", "tree"):
        for coll in ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all"):
            assert (profile, "world", coll, 4) in seen
            assert (profile, "intra", coll, 2) in seen and (profile, "rail", coll, 2) in seen
    assert all(r["wrong"] == 0 for r in records)
    factors = {"all_reduce": 2 * 3 / 4, "reduce_scatter": 3 / 4, "all_gather": 3 / 4,
               "all_to_all": 3 / 4, "broadcast": 1.0}
    for r in records:
        if r["world_size"] == 4:
            assert r["busbw"] == pytest.approx(r["algbw"] * factors[r["collective"]])
    assert "profile ring: ring algorithm forced NCCL_ALGO=Ring" in proc.stdout


@pytest.mark.parametrize("args,words", [
    (["--profiles", "nope"], ["unknown profile 'nope'", "semi_rail"]),
    (["-c", "all_reduce,allreduce"], ["unknown collective 'allreduce'"]),
    (["-b", "1M", "-e", "1K"], ["sizes out of order"]),
    (["-b", "12Q"], ["size '12Q'"]),
    (["--splits", "world,node"], ["unknown split 'node'"]),
    (["-f", "nan"], ["-f nan", "finite number above 1"]),
    (["-f", "inf"], ["-f inf", "finite number above 1"]),
    (["-e", "8", "-n", "0"], ["-n 0", "at least one timed iteration"]),
    (["-e", "8", "--ranks-per-node", "-1"], ["--ranks-per-node -1"]),
    # before the sweep runs: refused after it, the results were never written
    (["-e", "8", "--cluster", "raphal"], ["--cluster 'raphal'", "raphael"]),
])
def test_bad_requests_are_refused_in_one_line(args, words, tmp_path):
    proc = run(SWEEP + ["--backend", "gloo", "--out", str(tmp_path / "s")] + args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "== profile" not in proc.stdout          # refused before any job started
    for w in words:
        assert w in proc.stderr


@pytest.mark.parametrize("launcher", ["deepspeed", "srun", "mpirun"])
def test_a_launcher_that_is_not_installed_is_one_line(launcher, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n")
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = run(SWEEP + ["--backend", "gloo", "--launcher", launcher, "--hostfile",
                        str(hostfile), "--out", str(tmp_path / "s")],
               env=dict(os.environ, PATH=str(empty)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"error: --launcher {launcher}: no {launcher} command on PATH"
    assert "== profile" not in proc.stdout


def test_a_split_the_job_has_no_communicator_for_is_named_not_blamed_on_the_sizes(tmp_path):
    """--splits rail on one node said "no size ... holds a float32 element"; --splits
    world,intra with one rank per node dropped intra's tables without a word."""
    proc = run(SWEEP + ["--backend", "gloo", "--nprocs", "2", "--splits", "rail", "--out",
                        str(tmp_path / "s")], timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: --splits rail: no communicator of them in this job "
                                  "(rail: one node (2 ranks)")
    assert "== profile" not in proc.stdout
    proc = run(SWEEP + ["--backend", "gloo", "--nprocs", "2", "--ranks-per-node", "1", "-b",
                        "1K", "-e", "1K", "--splits", "world,intra", "--out",
                        str(tmp_path / "s2")], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("note: --splits intra: one rank per node (2 nodes): an intra-node group needs 2; "
            "not measured") in proc.stderr
    assert "| split world |" in proc.stdout and "| split intra |" not in proc.stdout


def test_sizes_below_one_element_are_an_error_not_an_empty_success(tmp_path):
    proc = run(SWEEP + ["--backend", "gloo", "--nprocs", "2", "-b", "1", "-e", "3", "--out",
                        str(tmp_path / "s")], timeout=300)
    assert proc.returncode == 2 and "nothing was measured" in proc.stderr


def test_cluster_predictions_are_for_the_ranks_measured(tmp_path):
    proc = run(SWEEP + ["--backend", "gloo", "--nprocs", "2", "-b", "8K", "-e", "8K", "-w", "1",
                        "-n", "2", "--cluster", "raphael", "--out", str(tmp_path / "s")],
               timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # two local ranks: one node's NVLink, not raphael's 24 nodes × 4 GPUs
    assert "1 node(s) × 2 GPUs = 2 ranks" in proc.stdout
    from perf.topology import CLUSTERS, predict
    want = [r for r in predict(CLUSTERS["raphael"], "all_reduce", [8192], nranks=2)
            if r["algorithm"] != "sharp"]          # CollNet: not within one node
    model = proc.stdout.split("== model", 1)[1].splitlines()
    assert "sharp" not in model[0] + model[1]
    line = next(ln for ln in model if ln.split()[:1] == ["8192"])
    assert sorted(float(v) for v in line.split()[1:]) == \
        pytest.approx(sorted(round(r["busbw"], 2) for r in want), abs=0.006)
    # and said not to compare with this job's gloo figures
    assert "this job measured gloo on this machine's CPUs: not comparable" in proc.stdout


def test_cluster_predictions_follow_the_hostfile_layout():
    """--cluster with a hostfile: 2 hosts x 2 slots is a 2-node job on raphael (its network),
    not one node's NVLink; slots that differ between hosts get no prediction, said why."""
    from perf.allreduce_sweep import predictions
    from perf.topology import CLUSTERS, predict
    text = predictions("raphael", [2 ** 30], 4, [2, 2])
    assert "2 node(s) × 2 GPUs = 4 ranks" in text
    want = predict(CLUSTERS["raphael"], "all_reduce", [2 ** 30], nranks=4, nodes=2)
    row = next(ln for ln in text.splitlines() if ln.split()[:1] == [str(2 ** 30)])
    assert sorted(float(v) for v in row.split()[1:]) == \
        pytest.approx(sorted(round(r["busbw"], 2) for r in want), abs=0.006)
    assert predictions("raphael", [2 ** 30], 6, [4, 2]).strip() == (
        "== model (raphael): no prediction for this job: the ranks per node differ (4, 2): the "
        "model takes the same number on every node")


def test_bandwidth_counts_the_bytes_moved_when_a_size_does_not_divide(tmp_path):
    # 3 ranks, 100 B: reduce_scatter moves 24 floats (96 B, a multiple of 3), all_reduce 25
    proc = run(SWEEP + ["--backend", "gloo", "--nprocs", "3", "-b", "100", "-e", "100", "-w",
                        "1", "-n", "2", "-c", "all_reduce,reduce_scatter", "--out",
                        str(tmp_path / "s"), "--json", str(tmp_path / "r.json")], timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = json.loads((tmp_path / "r.json").read_text())
    moved = {"all_reduce": 100, "reduce_scatter": 96}
    for r in records:
        assert r["size"] == 100 and r["bytes"] == moved[r["collective"]]
        assert r["algbw"] == pytest.approx(r["bytes"] / (r["time_us"] * 1e-6) / 1e9, rel=1e-6)
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.strip().endswith(("0", "1"))
            and ln.split()[2:3] == ["float"]]
    assert sorted((int(r[0]), int(r[1])) for r in rows) == [(96, 24), (100, 25)]


def test_unreachable_hostfile_host_is_named(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nlocalhost slots=1\nno-such-node.invalid slots=4\n")
    proc = run(SWEEP + ["--backend", "gloo", "--launcher", "deepspeed", "--hostfile",
                        str(hostfile), "--out", str(tmp_path / "s")])
    assert proc.returncode == 2 and "'no-such-node.invalid' does not resolve" in proc.stderr


def test_a_rerun_into_the_same_out_does_not_report_the_earlier_nccl_logs(tmp_path):
    """--out holding a profile's NCCL log from an earlier run (here a working SHARP run), and
    this run's job failing before NCCL logged anything (NCCL on a machine without GPUs): the
    path printed must not be the earlier run's."""
    import shutil
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if not (os.access(beside, os.X_OK) or shutil.which("mpirun")):
        pytest.skip("no mpirun: pip install -e '.[test]' brings MPICH")
    old = tmp_path / "s" / "sharp_on" / "nccl.raphael001.41001.log"
    old.parent.mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "tests", "perf", "nccl_logs", "ib_collnet_sharp_2n4g.log"),
                old)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""), CUDA_VISIBLE_DEVICES="",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = run(SWEEP + ["--backend", "nccl", "--launcher", "mpirun", "--hostfile",
                        str(hostfile), "--profiles", "sharp_on", "-e", "8", "--timeout-s", "60",
                        "--out", str(tmp_path / "s")], env=env, timeout=300)
    assert proc.returncode == 1 and "profile sharp_on: job exited with status" in proc.stderr
    assert "# NCCL path" not in proc.stdout and "COLLNET_DIRECT" not in proc.stdout
    assert f"flag: profile sharp_on: no NCCL logs in {old.parent}" in proc.stdout
    assert not old.exists()


@pytest.mark.slow
def test_a_frozen_rank_is_named_and_partial_results_are_kept(tmp_path):
    import psutil

    out = tmp_path / "s"
    proc = subprocess.Popen(SWEEP + ["--backend", "gloo", "--nprocs", "2", "-b", "8",
                                     "-e", "8M", "-f", "2", "-n", "200", "--timeout-s", "6",
                                     "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        target = None
        while time.time() < deadline and target is None:
            time.sleep(0.2)
            rank0 = out / "default" / "rank0.jsonl"
            if rank0.exists() and rank0.read_text().count("\n") >= 2:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    try:
                        if child.environ().get("RANK") == "1":
                            target = child
                    except psutil.Error:
                        pass
        assert target is not None
        target.send_signal(signal.SIGSTOP)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    assert "ranks that stopped responding: 1 (" in stderr
    assert "ranks [0] alive but waiting in world all_reduce" in stderr
    assert "partial results in" in stderr
    records = (out / "default" / "rank0.jsonl").read_text().splitlines()
    assert len(records) >= 2 and (out / "results.csv").exists()
    assert not psutil.pid_exists(target.pid) or target.status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_mpirun_launcher_runs_a_profile_over_a_hostfile(tmp_path):
    import shutil
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    if not (os.access(beside, os.X_OK) or shutil.which("mpirun")):
        pytest.skip("no mpirun: pip install -e '.[test]' brings MPICH")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = run(SWEEP + ["--backend", "gloo", "--launcher", "mpirun", "--hostfile",
                        str(hostfile), "--profiles", "tree", "-b", "1K", "-e", "16K", "-f", "4",
                        "--out", str(tmp_path / "s"), "--json", str(tmp_path / "r.json")],
               env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = json.loads((tmp_path / "r.json").read_text())
    assert {r["world_size"] for r in records} == {2} and all(r["wrong"] == 0 for r in records)
    assert {r["profile"] for r in records} == {"tree"}


@pytest.mark.slow
def test_deepspeed_launcher_runs_two_profiles_over_a_local_hostfile(tmp_path):
    """The deepspeed launcher path (DeepSpeed's runner → launch.py → workers) on a hostfile
    that names only this machine: no ssh needed, results of both profiles merged."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    proc = run(SWEEP + ["--backend", "gloo", "--launcher", "deepspeed", "--hostfile",
                        str(hostfile), "--profiles", "ring,tree", "-b", "1K", "-e", "16K",
                        "-f", "4", "-c", "all_reduce,all_gather", "--out", str(tmp_path / "s"),
                        "--json", str(tmp_path / "r.json")], env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = json.loads((tmp_path / "r.json").read_text())
    assert {r["world_size"] for r in records} == {2} and all(r["wrong"] == 0 for r in records)
    assert {(r["profile"], r["collective"]) for r in records} == {
        (p, c) for p in ("ring", "tree") for c in ("all_reduce", "all_gather")}
    assert "deepspeed.launcher.launch" in (tmp_path / "s" / "ring" / "launcher.log").read_text()


def _bad_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- NCCL_ALGO\n- Ring\n")
    (tmp_path / "broken.yaml").write_text("env: {NCCL_ALGO: [\n")
    (tmp_path / "zero").write_text("localhost slots=0\n")


@pytest.mark.parametrize("args,line", [
    # before: a traceback (FileNotFoundError, AttributeError, yaml's ParserError)
    (["--launcher", "mpirun", "--hostfile", "{t}/none"],
     "error: hostfile {t}/none: cannot read it (No such file or directory)"),
    (["--profiles", "{t}/list.yaml"], "error: profile {t}/list.yaml: expected a mapping with "
     "description: TEXT and env: a mapping of NCCL_* settings"),
    (["--profiles", "{t}/broken.yaml"], "error: profile {t}/broken.yaml: not valid YAML "
     "(ParserError); expected description: TEXT and env: a mapping of NCCL_* settings"),
    # before: launched, and the job died (status -8)
    (["--launcher", "mpirun", "--hostfile", "{t}/zero"],
     "error: {t}/zero: cannot read 'localhost slots=0' (expected 'host slots=N', N at least 1)"),
    # before: 0 ran the default 2 ranks; -1 named "--ranks-per-node None"
    (["--nprocs", "0"], "error: --nprocs 0: at least 1 local rank"),
    (["--nprocs", "-1"], "error: --nprocs -1: at least 1 local rank"),
])
def test_unreadable_files_and_rank_counts_are_one_line(args, line, tmp_path):
    _bad_files(tmp_path)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    proc = run(SWEEP + ["--backend", "gloo", "-e", "8", "--out", str(tmp_path / "s")]
               + [a.format(t=tmp_path) for a in args], env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip() == line.format(t=tmp_path)
    assert "== profile" not in proc.stdout


def test_node_layout_of_the_intra_and_rail_splits():
    from perf.allreduce_sweep import node_sizes, ranks_per_node
    assert ranks_per_node([(0, 2), (1, 2), (0, 2), (1, 2)]) == 2
    assert ranks_per_node([(0, 1), (0, 1), (0, 1)]) == 1
    uneven = [(0, 2), (1, 2), (0, 1)]                       # hostfile slots 2 and 1
    assert ranks_per_node(uneven) is None and node_sizes(uneven) == [2, 1]
    assert ranks_per_node([(0, 2), (0, 2), (1, 2), (1, 2)]) is None   # ranks round-robin


def test_hostfile_with_unequal_slots_is_refused_for_the_node_splits(tmp_path):
    """Before, the sweep launched such a job: ranks on hosts of different sizes built different
    intra/rail groups and the whole job hung until --timeout-s killed it, world results too."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=2\n127.0.0.1 slots=1\n")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    proc = run(SWEEP + ["--backend", "gloo", "--launcher", "deepspeed", "--hostfile",
                        str(hostfile), "--splits", "world,intra", "--out", str(tmp_path / "s")],
               env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        f"error: --splits intra: hostfile {hostfile} gives its hosts different slots (2, 1); "
        "the intra and rail splits need the same number of ranks on every host: use --splits "
        "world or equal slots")
    assert "== profile" not in proc.stdout


@pytest.mark.slow
def test_ranks_on_nodes_of_different_sizes_stop_instead_of_hanging(tmp_path):
    """Workers as an uneven srun or mpirun would start them (node A: ranks 0, 1; node B: rank
    2) asked for the intra and rail splits: before, the ranks built different groups and hung
    until killed; now every rank exits 2 and rank 0 says why."""
    from tests.conftest import free_port
    port = free_port()
    procs = []
    try:
        for rank, local_rank, local_size in ((0, 0, 2), (1, 1, 2), (2, 0, 1)):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(local_rank),
                       LOCAL_WORLD_SIZE=str(local_size), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
            procs.append(subprocess.Popen(
                SWEEP + ["--worker", "--job-dir", str(tmp_path), "--backend", "gloo", "--sizes",
                         "64", "--collectives", "all_reduce", "--splits", "world,intra,rail", "-w",
                         "1", "-n", "1", "--timeout-s", "10"],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [2, 2, 2], [o[1][-1500:] for o in outs]
    assert ("error: --splits world,intra,rail: the intra and rail splits need the same number of "
            "ranks on every node, placed node by node; this job has 2, 1 ranks per node: use "
            "--splits world") in outs[0][1]


def test_the_timed_loop_runs_the_collective_and_nothing_else():
    """Ops each timed iteration adds, counted with a one-rank gloo group in this process:
    before, all_gather refilled its send buffer every iteration (a memset timed with it, one
    more kernel per op on a GPU); only the out-of-place all_reduce's copy into the receive
    buffer (the table says so) may join the collective."""
    import collections

    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    from perf.allreduce_sweep import COLLECTIVES, run_collective

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    def ops(name, inplace, iters):
        with Count() as count:
            r = run_collective(dist, torch, name, 256, None, 1, 0, torch.device("cpu"), 1,
                               iters, inplace, False)
        assert r["wrong"] == 0
        return count.ops

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        for name in COLLECTIVES:
            for inplace in (False, True):
                one, six = ops(name, inplace, 1), ops(name, inplace, 6)
                added = {op: six[op] - one[op] for op in six if six[op] != one[op]}
                c10d = [op for op in added if op.startswith("c10d.")]
                assert len(c10d) == 1 and added[c10d[0]] == 5, (name, inplace, added)
                allowed = {("all_reduce", False): {"aten.copy_"},
                           # inside gloo's reduce_scatter_tensor: it splits and copies itself
                           ("reduce_scatter", False): {"aten.split", "aten.copy_"},
                           ("reduce_scatter", True): {"aten.split", "aten.copy_"}}
                assert set(added) - set(c10d) <= allowed.get((name, inplace), set()), \
                    (name, inplace, added)
    finally:
        dist.destroy_process_group()


def test_help_says_what_docs_collectives_says():
    """Before, --help listed no collective, profile, split or size suffix, nor how algbw and
    busbw are computed: the options were bare names."""
    from perf.allreduce_sweep import COLLECTIVES, PROFILES_DIR, SPLITS
    from perf.topology import CLUSTERS
    proc = run(SWEEP + ["--help"])
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())                  # argparse wraps lines
    assert text.startswith("usage: python -m perf.allreduce_sweep")
    profiles = sorted(os.path.splitext(f)[0] for f in os.listdir(PROFILES_DIR))
    assert profiles and all(f"{p}," in text or f"{p} " in text for p in profiles)
    for word in list(COLLECTIVES) + list(SPLITS) + list(CLUSTERS):
        assert word in text, word
    for phrase in ("K, M or G suffixes are powers of 1024", "2(n-1)/n for all_reduce",
                   "(n-1)/n for reduce_scatter, all_gather and all_to_all, 1 for broadcast",
                   "the size is the whole buffer of n chunks", "averaged over the ranks",
                   "GB/s = 1e9 B/s", "'host slots=N'", "docs/collectives.md"):
        assert phrase in text, phrase


class _NextRanksChunk:
    """torch.distributed whose reduce_scatter hands each rank the next rank's chunk (an offset
    bug), computed with the real all_reduce; everything else is torch.distributed's own."""

    def __getattr__(self, name):
        import torch.distributed as dist
        return getattr(dist, name)

    def reduce_scatter_tensor(self, out, inp, group=None):
        import torch.distributed as dist
        total = inp.clone()
        dist.all_reduce(total, group=group)
        n = dist.get_world_size(group)
        out.copy_(total.view(n, -1)[(dist.get_rank(group) + 1) % n])

    reduce_scatter_single = reduce_scatter_tensor       # the name the sweep takes first


def _reduce_scatter_ranks(rank, port, out_dir):
    import torch
    import torch.distributed as dist

    from perf.allreduce_sweep import run_collective
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    wrong = {}
    for label, backend in (("real", dist), ("misplaced", _NextRanksChunk())):
        for inplace in (False, True):
            r = run_collective(backend, torch, "reduce_scatter", 64, None, 2, rank,
                               torch.device("cpu"), 1, 2, inplace, False)
            wrong[f"{label} {'in' if inplace else 'out'}"] = r["wrong"]
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as fh:
        json.dump(wrong, fh)
    dist.destroy_process_group()


@pytest.mark.slow
def test_reduce_scatter_check_tells_the_chunks_apart(tmp_path):
    """Before, every rank sent one value everywhere, so a reduce_scatter that returned another
    rank's chunk passed the check (#wrong 0); now chunk c holds rank + 1 + c."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port
    mp.spawn(_reduce_scatter_ranks, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        wrong = json.loads((tmp_path / f"{rank}.json").read_text())
        assert wrong["real out"] == wrong["real in"] == 0, wrong
        assert wrong["misplaced out"] == wrong["misplaced in"] == 8, wrong   # 64 B / 2 ranks


def test_tables_say_which_columns_time_the_same_op():
    """torch.distributed broadcasts only in place and has no in-place all_to_all: before, the
    broadcast table's out-of-place and the all_to_all table's in-place columns were labelled as
    such without saying that they repeat the other column's op."""
    from perf.allreduce_sweep import table
    rows = [{"profile": "p", "split": "world", "collective": c, "size": 64, "bytes": 64,
             "count": 16, "world_size": 2, "inplace": place, "time_us": 10.0, "algbw": 0.0064,
             "busbw": 0.0064, "wrong": 0}
            for c in ("all_reduce", "broadcast", "all_to_all", "all_gather") for place in (0, 1)]
    notes = {c: [ln for ln in table(rows, "p", "world", c).splitlines()
                 if "torch.distributed has no" in ln] for c in
             ("all_reduce", "broadcast", "all_to_all", "all_gather")}
    assert notes["broadcast"] == ["# out-of-place: torch.distributed has no out-of-place "
                                  "broadcast; both columns time the same in-place broadcast"]
    assert notes["all_to_all"] == ["# in-place: torch.distributed has no in-place all_to_all; "
                                   "both columns time the same all_to_all_single into a "
                                   "separate buffer"]
    assert len(notes["all_reduce"]) == 1 and notes["all_gather"] == []


def test_cluster_predictions_state_the_network_bound_they_assume():
    """raphael's model takes its four ports behind one PCIe host link (an assumption to check on
    a node), which caps every multi-node figure at ~53 GB/s per node: before, the sweep printed
    the figures without that bound, so a measurement near 4 × 48 GB/s read as 'above the
    model' with no hint why."""
    from perf.allreduce_sweep import predictions
    from perf.topology import CLUSTERS, gpu_net_GBps
    raphael = CLUSTERS["raphael"]
    text = predictions("raphael", [2 ** 30], 96, [4] * 24)
    assert (f"# per-GPU network share {gpu_net_GBps(raphael):.1f} GB/s, node injection "
            f"{4 * gpu_net_GBps(raphael):.1f} GB/s: 4 × 400 Gb/s ports, 4 per PCIe host link "
            "(52.8 GB/s), as perf/topology.py assumes") in text
    assert "1 per PCIe host link" in predictions("dgx_h100", [2 ** 30], 16, [8, 8])
    assert "node injection" not in predictions("raphael", [2 ** 30], 4, [4])   # NVLink only
