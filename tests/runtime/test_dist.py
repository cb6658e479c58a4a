"""Rank discovery: each launcher's variables as explicit environments, then real launches.

The unit tests hand discover() the environment a launcher would set (as a dict: real input). The
slow tests start tests/runtime/dist_probe.py under the real launchers (plain python, torchrun,
deepspeed, mpirun); every rank joins a gloo group and all-reduces its rank.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from dsfm.errors import ConfigError
from dsfm.runtime.dist import (
    SLURM_PORT_BASE,
    SLURM_PORT_SPAN,
    DistEnv,
    check_master_addr,
    discover,
    export,
)
from tests.conftest import REPO, free_port, run
from tests.runtime import records as probe_files

PROBE = os.path.join("tests", "runtime", "dist_probe.py")
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "raphael001", "MASTER_PORT": "29500"}
# A task of `srun --nodes=24 --ntasks-per-node=4 python dsfm/train.py` in an sbatch job.
SRUN = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "6",
        "SLURM_LOCALID": "2", "SLURM_NODEID": "1", "SLURM_NTASKS": "96",
        "SLURM_STEP_NUM_TASKS": "96", "SLURM_TASKS_PER_NODE": "4(x24)",
        "SLURM_STEP_TASKS_PER_NODE": "4(x24)", "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_JOB_NODELIST": "raphael[001-024]", "SLURM_STEP_NODELIST": "raphael[001-024]"}
# The batch script of the same job: the same kind of variables, but no srun step.
BATCH = {"SLURM_JOB_ID": "123456", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
         "SLURM_NODEID": "0", "SLURM_NTASKS": "96", "SLURM_TASKS_PER_NODE": "4(x24)",
         "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NODELIST": "raphael[001-024]"}


def without(environ, *names):
    return {k: v for k, v in environ.items() if k not in names}


# --- torchrun / deepspeed launcher -------------------------------------------------------------

def test_torchrun_variables_are_taken_as_they_are():
    assert discover(TORCHRUN) == DistEnv(3, 8, 1, 2, "raphael001", 29500, "torchrun")


def test_deepspeed_launchers_local_size_counts_as_local_world_size():
    environ = dict(without(TORCHRUN, "LOCAL_WORLD_SIZE"), LOCAL_SIZE="2", CROSS_RANK="1")
    assert discover(environ).local_world_size == 2


@pytest.mark.parametrize("changes, names", [
    ({"RANK": "8"}, ["RANK=8", "WORLD_SIZE=8"]),
    ({"RANK": "-1"}, ["RANK='-1'", "at least 0"]),
    ({"RANK": "one"}, ["RANK='one'", "not an integer"]),
    ({"WORLD_SIZE": "0"}, ["WORLD_SIZE='0'"]),
    ({"LOCAL_RANK": "2"}, ["LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"]),
    ({"LOCAL_WORLD_SIZE": "16"}, ["LOCAL_WORLD_SIZE=16", "WORLD_SIZE=8"]),
    ({"MASTER_PORT": "70000"}, ["MASTER_PORT='70000'", "TCP port"]),
    ({"MASTER_PORT": "29500.0"}, ["MASTER_PORT='29500.0'"]),
])
def test_inconsistent_torchrun_values_name_the_variable(changes, names):
    with pytest.raises(ConfigError) as e:
        discover({**TORCHRUN, **changes})
    for name in names:
        assert name in str(e.value)


@pytest.mark.parametrize("missing", ["LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"])
def test_a_missing_torchrun_variable_is_named(missing):
    with pytest.raises(ConfigError, match=missing):
        discover(without(TORCHRUN, missing))


@pytest.mark.parametrize("present, missing", [("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")])
def test_half_of_rank_and_world_size_is_an_error(present, missing):
    with pytest.raises(ConfigError, match=f"{present}=.* but {missing} is not"):
        discover({present: "0"})


def test_torchrun_takes_priority_over_slurm_and_mpi():
    """torchrun started by srun, or by mpirun, on each node: torchrun's ranks are the real ones."""
    assert discover({**SRUN, **TORCHRUN, "OMPI_COMM_WORLD_SIZE": "24"}).launcher == "torchrun"


# --- srun ----------------------------------------------------------------------------------------

def test_srun_task_maps_slurm_variables():
    env = discover(SRUN)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (6, 96, 2, 4)
    assert env.master_addr == "raphael001" and env.launcher == "srun"
    assert SLURM_PORT_BASE <= env.master_port < SLURM_PORT_BASE + SLURM_PORT_SPAN


def test_srun_ranks_agree_on_the_port_and_steps_differ():
    ports = {discover({**SRUN, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r % 4),
                       "SLURM_NODEID": str(r // 4)}).master_port for r in range(96)}
    assert len(ports) == 1
    assert discover({**SRUN, "SLURM_STEP_ID": "1"}).master_port not in ports
    assert discover({**SRUN, "SLURM_JOB_ID": "123457"}).master_port not in ports


def test_srun_uses_the_step_nodelist_and_explicit_master_variables():
    step = {**SRUN, "SLURM_STEP_NODELIST": "raphael[013-024]", "SLURM_STEP_NUM_TASKS": "48"}
    assert discover(step).master_addr == "raphael013"
    env = discover({**SRUN, "MASTER_ADDR": "raphael001-ib0", "MASTER_PORT": "31000"})
    assert (env.master_addr, env.master_port) == ("raphael001-ib0", 31000)


def test_srun_with_uneven_tasks_per_node_reads_this_nodes_count():
    environ = {**without(SRUN, "SLURM_NTASKS_PER_NODE"), "SLURM_STEP_NUM_TASKS": "7",
               "SLURM_NTASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
               "SLURM_PROCID": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "3"}
    assert discover(environ).local_world_size == 1
    environ["SLURM_NODEID"] = "4"
    with pytest.raises(ConfigError, match="SLURM_NODEID=4"):
        discover(environ)
    with pytest.raises(ConfigError, match="SLURM_NODEID is not set"):
        discover(without(environ, "SLURM_NODEID"))


def test_srun_falls_back_to_the_requested_tasks_per_node():
    environ = without(SRUN, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    assert discover(environ).local_world_size == 4
    with pytest.raises(ConfigError, match="SLURM_STEP_TASKS_PER_NODE or SLURM_TASKS_PER_NODE"):
        discover(without(environ, "SLURM_NTASKS_PER_NODE"))


@pytest.mark.parametrize("changes, names", [
    ({"SLURM_PROCID": "96"}, ["SLURM_PROCID=96", "SLURM_STEP_NUM_TASKS=96"]),
    ({"SLURM_PROCID": "x"}, ["SLURM_PROCID='x'"]),
    ({"SLURM_LOCALID": "4"}, ["SLURM_LOCALID=4", "SLURM_STEP_TASKS_PER_NODE"]),
    ({"SLURM_LOCALID": "-1"}, ["SLURM_LOCALID='-1'"]),
    ({"SLURM_STEP_NODELIST": "raphael[024-001]"}, ["SLURM_STEP_NODELIST", "reversed"]),
    ({"SLURM_STEP_TASKS_PER_NODE": "4x24"}, ["SLURM_STEP_TASKS_PER_NODE"]),
    ({"SLURM_STEP_ID": "zero"}, ["SLURM_STEP_ID='zero'"]),
    ({"SLURM_STEP_TASKS_PER_NODE": "128(x24)"}, ["SLURM_STEP_TASKS_PER_NODE=128"]),
])
def test_inconsistent_slurm_values_name_the_variable(changes, names):
    with pytest.raises(ConfigError) as e:
        discover({**SRUN, **changes})
    for name in names:
        assert name in str(e.value)


def test_srun_without_job_id_or_master_port_says_what_to_set():
    with pytest.raises(ConfigError, match="SLURM_JOB_ID or SLURM_JOBID.*set MASTER_PORT"):
        discover(without(SRUN, "SLURM_JOB_ID"))
    assert discover(without(SRUN, "SLURM_JOB_ID") | {"MASTER_PORT": "29501"}).master_port == 29501


@pytest.mark.parametrize("step", [
    None,              # the batch script: Slurm sets no step id there
    "4294967291",      # SLURM_BATCH_SCRIPT (0xfffffffb), should one be printed unsigned
    "4294967294",      # the batch step's id before Slurm 20.11 (0xfffffffe)
    "4294967290",      # salloc's interactive step (0xfffffffa)
    "-5",              # the same ids printed as signed integers
])
def test_bare_python_in_the_batch_script_is_a_single_process(step):
    environ = dict(BATCH) if step is None else {**BATCH, "SLURM_STEP_ID": step}
    env = discover(environ)
    assert (env.launcher, env.rank, env.world_size, env.master_addr) == ("single", 0, 1,
                                                                           "127.0.0.1")


def test_srun_mpi_plugins_variables_keep_srun_in_charge():
    """srun --mpi=pmix / --mpi=pmi2 set PMIX_RANK or PMI_RANK/PMI_SIZE in plain srun tasks."""
    assert discover({**SRUN, "PMIX_RANK": "6"}).launcher == "srun"
    assert discover({**SRUN, "PMI_RANK": "6", "PMI_SIZE": "96", "PMI_FD": "5"}).launcher == "srun"
    # the old obsolete spelling of the step id works too
    assert discover({**without(SRUN, "SLURM_STEP_ID"), "SLURM_STEPID": "0"}).launcher == "srun"


def test_single_process_defaults():
    env = discover({})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert (env.master_addr, env.launcher) == ("127.0.0.1", "single")
    assert 0 < env.master_port < 65536
    assert discover({"MASTER_PORT": "29555"}).master_port == 29555
    with pytest.raises(ConfigError, match="MASTER_PORT='0'"):
        discover({"MASTER_PORT": "0"})


# --- mpirun: routing and failure messages --------------------------------------------------------

def test_mpi_launch_without_mpi4py_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)      # what Python does when it is absent
    with pytest.raises(ConfigError, match=r"OMPI_COMM_WORLD_SIZE.*pip install mpi4py"):
        discover({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"})


def _discover_in_fresh_process(environ):
    """discover(environ) in a new interpreter, so that MPI initialises there, not in pytest."""
    code = ("import sys\nfrom dsfm.runtime.dist import discover\nfrom dsfm.errors import "
            f"ConfigError\ntry:\n    print(discover({environ!r}))\nexcept ConfigError as e:\n"
            "    print('ConfigError:', e)\n")
    return run([sys.executable, "-c", code], env=dict(_clean_env()), stdin=subprocess.DEVNULL,
               timeout=120)


def test_mpirun_under_slurm_is_routed_to_mpi_not_to_the_daemons_srun_step():
    """Open MPI's mpirun starts one daemon per node with srun; its ranks inherit that step's
    SLURM_PROCID (the node index) and SLURM_NTASKS (the node count). MPI must decide."""
    pytest.importorskip("mpi4py")
    environ = {**SRUN, "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "24",
               "SLURM_STEP_NUM_TASKS": "24", "SLURM_STEP_TASKS_PER_NODE": "1(x24)",
               "OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "96", "PMIX_RANK": "5"}
    proc = _discover_in_fresh_process(environ)
    # This interpreter was not started by mpirun: its MPI is a world of one, which discover()
    # must notice instead of training as rank 0 of 1 while 95 others wait.
    assert proc.returncode == 0, proc.stderr
    assert "ConfigError: OMPI_COMM_WORLD_SIZE='96'" in proc.stdout
    assert "sees 1 process" in proc.stdout


def test_hydra_variables_under_a_slurm_step_are_mpirun():
    pytest.importorskip("mpi4py")
    environ = {**SRUN, "SLURM_NTASKS": "24", "SLURM_STEP_NUM_TASKS": "24",
               "PMI_RANK": "6", "PMI_SIZE": "96", "MPI_LOCALRANKID": "2"}
    proc = _discover_in_fresh_process(environ)
    assert proc.returncode == 0, proc.stderr
    assert "ConfigError: PMI_SIZE='96'" in proc.stdout


# --- the rendezvous host ------------------------------------------------------------------------

# RFC 6761 reserves .invalid: no resolver knows a name under it.
UNRESOLVABLE = "raphael001.invalid"


def resolver_refuses(name: str) -> bool:
    """Whether this machine's resolver answers that `name` does not exist (not: fails for now)."""
    try:
        socket.getaddrinfo(name, None)
    except socket.gaierror as e:
        return e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
    return False


@pytest.mark.parametrize("environ, source", [
    ({**TORCHRUN, "MASTER_ADDR": UNRESOLVABLE}, "(MASTER_ADDR, "),
    ({**SRUN, "SLURM_STEP_NODELIST": "raphael[001-002].invalid"}, "(the step's first node"),
    ({**SRUN, "MASTER_ADDR": UNRESOLVABLE}, "(MASTER_ADDR, srun launch)"),
])
def test_a_rendezvous_host_that_does_not_resolve_is_named_with_its_source(environ, source):
    if not resolver_refuses(UNRESOLVABLE):
        pytest.skip(f"this machine's resolver does not refuse {UNRESOLVABLE}")
    env = discover(environ)
    with pytest.raises(ConfigError) as e:
        check_master_addr(env, environ)
    message = str(e.value)
    assert message.startswith(f"rendezvous host {UNRESOLVABLE!r} {source}") and "\n" not in message
    assert f"does not resolve on {socket.gethostname()}" in message
    assert ("--master_addr" in message) == (env.launcher == "torchrun")


def test_resolvable_rendezvous_hosts_pass():
    for addr in ("127.0.0.1", "localhost", socket.gethostname()):
        check_master_addr(DistEnv(0, 2, 0, 2, addr, 29500, "mpirun"), {})
    check_master_addr(discover({}), {})


# --- export ------------------------------------------------------------------------------------

def test_export_round_trips_through_the_torchrun_reader():
    for env in (discover(SRUN), discover({}), DistEnv(5, 8, 1, 4, "h", 1234, "mpirun")):
        environ = {"UNRELATED": "kept"}
        export(env, environ)
        assert environ["UNRELATED"] == "kept" and environ["LOCAL_SIZE"] == environ[
            "LOCAL_WORLD_SIZE"]
        back = discover(environ)
        assert back == DistEnv(env.rank, env.world_size, env.local_rank, env.local_world_size,
                               env.master_addr, env.master_port, "torchrun")


@pytest.mark.parametrize("fields, words", [
    ((2, 2, 0, 1, "h", 1, "single"), "rank 2"),
    ((0, 4, 4, 4, "h", 1, "srun"), "local_rank 4"),
    ((0, 4, 0, 8, "h", 1, "srun"), "local_world_size"),
    ((0, 1, 0, 1, "", 1, "single"), "master_addr"),
    ((0, 1, 0, 1, "h", 65536, "single"), "master_port"),
    ((0, 1, 0, 1, "h", 1, "pdsh"), "launcher"),
])
def test_dist_env_rejects_impossible_values(fields, words):
    with pytest.raises(ConfigError, match=words):
        DistEnv(*fields)


# --- real launches ------------------------------------------------------------------------------

def _clean_env(**extra):
    """This environment without any launcher's variables, with the repository importable."""
    prefixes = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "MV2_", "PRTE_")
    names = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "GROUP_RANK", "ROLE_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(prefixes)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _launcher(name):
    """A launcher installed with this Python (pip puts console scripts beside it), else PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.access(beside, os.X_OK) else shutil.which(name)


def probe_records(cmd, env, tag: str, ranks: int, timeout: int = 300) -> list[dict]:
    """Run a probe (a command whose ranks each hand back a JSON record `tag` through
    `tests.runtime.records.emit`); it must succeed and every rank report exactly once: the
    records, by rank. They come through files, not the ranks' shared stdout (see records)."""
    with tempfile.TemporaryDirectory(prefix="probe_records_") as folder:
        proc = run(cmd, env={**env, probe_files.ENV: folder}, stdin=subprocess.DEVNULL,
                   timeout=timeout)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-4000:]
        got = sorted(probe_files.read(folder, tag), key=lambda r: r["rank"])
    assert [r["rank"] for r in got] == list(range(ranks)), out[-4000:]
    return got


def _launch(cmd, env, ranks):
    records = probe_records(cmd, env, "DIST_PROBE", ranks)
    for r in records:
        assert r["world_size"] == r["group_size"] == ranks
        assert r["group_rank"] == r["rank"]
        assert r["rank_sum"] == sum(range(ranks))                      # the all-reduce ran
    assert len({(r["master_addr"], r["master_port"]) for r in records}) == 1
    return records


@pytest.mark.slow
def test_plain_python_is_a_single_process():
    [record] = _launch([sys.executable, PROBE], _clean_env(), 1)
    assert record["launcher"] == "single" and record["master_addr"] == "127.0.0.1"


@pytest.mark.slow
def test_plain_python_in_a_batch_script_environment_is_a_single_process():
    [record] = _launch([sys.executable, PROBE], _clean_env(**BATCH), 1)
    assert record["launcher"] == "single"


@pytest.mark.slow
def test_torchrun_two_ranks():
    torchrun = _launcher("torchrun")
    assert torchrun, "torchrun is installed with torch; it is missing beside python and on PATH"
    records = _launch([torchrun, "--standalone", "--nproc_per_node", "2", PROBE], _clean_env(), 2)
    assert {r["launcher"] for r in records} == {"torchrun"}
    assert [(r["local_rank"], r["local_world_size"]) for r in records] == [(0, 2), (1, 2)]


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks():
    deepspeed = _launcher("deepspeed")
    assert deepspeed, "deepspeed's launcher is missing beside python and on PATH"
    port = free_port()
    records = _launch([deepspeed, "--num_gpus", "2", "--master_port", str(port), PROBE,
                       "--init", "deepspeed"], _clean_env(), 2)
    assert {r["launcher"] for r in records} == {"torchrun"}
    assert {r["master_port"] for r in records} == {port}
    assert [r["local_rank"] for r in records] == [0, 1]


def _mpirun():
    mpirun = _launcher("mpirun") or _launcher("mpiexec")
    if mpirun is None:
        pytest.skip("no mpirun/mpiexec beside python or on PATH: pip install mpi4py mpich")
    pytest.importorskip("mpi4py", reason="mpirun found but mpi4py missing: pip install mpi4py")
    return mpirun


# Open MPI refuses to run as root without these; MPICH ignores them. CI runs as root.
_AS_ROOT = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@pytest.mark.slow
def test_mpirun_two_ranks_through_mpi4py():
    records = _launch([_mpirun(), "-np", "2", sys.executable, PROBE, "--init", "deepspeed"],
                      _clean_env(**_AS_ROOT), 2)
    assert {r["launcher"] for r in records} == {"mpirun"}
    assert [(r["local_rank"], r["local_world_size"]) for r in records] == [(0, 2), (1, 2)]
    assert records[0]["master_addr"] == "127.0.0.1"                  # one node: loopback


@pytest.mark.slow
def test_mpirun_keeps_a_master_port_given_by_the_user():
    port = free_port()
    records = _launch([_mpirun(), "-np", "2", sys.executable, PROBE],
                      _clean_env(MASTER_PORT=str(port), **_AS_ROOT), 2)
    assert {r["master_port"] for r in records} == {port}


def test_ranks_per_node_are_checked_against_the_visible_gpus():
    from dsfm.runtime.engine import check_devices

    def node(local_world):
        return DistEnv(0, 4 * local_world, 0, local_world, "h", 29500, "srun")

    assert check_devices(node(4), 4) == []
    assert check_devices(node(1), 1) == []
    assert check_devices(node(2), 0) == []          # CPU
    # --gpus-per-task=1: each rank sees one GPU, but DeepSpeed would open cuda:LOCAL_RANK
    with pytest.raises(ConfigError, match="4 ranks on this node .* but this rank sees 1 GPU: "
                                          "DeepSpeed puts each rank on cuda:LOCAL_RANK"):
        check_devices(node(4), 1)
    with pytest.raises(ConfigError, match="8 ranks on this node .* but 4 GPUs visible"):
        check_devices(node(8), 4)
    [warning] = check_devices(node(1), 4)
    assert warning.startswith("warning:") and "3 will idle" in warning


def test_probe_records_come_whole_through_files_while_the_pipe_interleaves(tmp_path):
    """Two ranks of a few kilobytes each: written into one pipe they can come back on one line
    (CI saw it); through `records.emit` each comes back whole, by rank, and a probe run by hand
    still prints its one line."""
    big = {"pad": "x" * 20000}
    folder = tmp_path / "records"
    folder.mkdir()
    code = ("import os, sys; from tests.runtime.records import emit; "
            "emit('T', {'rank': int(sys.argv[1]), 'pad': 'x' * 20000})")
    env = _clean_env(**{probe_files.ENV: str(folder)})
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], env=env, cwd=REPO)
             for r in (1, 0)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    got = sorted(probe_files.read(str(folder), "T"), key=lambda r: r["rank"])
    assert got == [{"rank": 0, **big}, {"rank": 1, **big}]
    assert probe_files.read(str(folder), "OTHER") == []
    by_hand = run([sys.executable, "-c", code, "3"], env=_clean_env(), timeout=60)
    assert by_hand.stdout == "T " + json.dumps({"rank": 3, **big}) + "\n"
