"""Who is this process in the job? Rank discovery for every launcher dsfm runs under.

The trainer is started by the DeepSpeed launcher (pdsh over a hostfile, or `--num_gpus N`),
torchrun, mpirun, srun or plain `python`. Each says "you are rank r of n" differently.
`discover()` reads whichever form is present and returns one `DistEnv`; `export()` writes it back
as the variables torch's env:// rendezvous reads, so that
`deepspeed.init_distributed(dist_backend=..., auto_mpi_discovery=False)` behaves the same under
every launcher.

The first match wins, in an order chosen so that the launcher nearest the process decides:

1. RANK and WORLD_SIZE set: "torchrun" (torchrun, the DeepSpeed launcher, torch.distributed.launch
   set everything already).
2. An MPI launcher's variables (Open MPI, MPICH / Intel MPI hydra, MVAPICH, PMI / PMIx): "mpirun",
   through mpi4py. This comes before SLURM because inside an allocation mpirun starts its daemons
   with srun, so its ranks also carry SLURM step variables, describing the daemons, not the ranks.
   The exception is srun's own MPI plugins (`--mpi=pmix`, `--mpi=pmi2`): they set PMIX_RANK or
   PMI_RANK/PMI_SIZE in every task of an ordinary srun step, and those tasks are "srun" ranks.
3. SLURM_PROCID inside an srun step, i.e. with a normal SLURM_STEP_ID: "srun". The batch script
   (and salloc's interactive step) has SLURM_PROCID=0 and SLURM_NTASKS>1 as well, but no normal
   step id, so a bare `python dsfm/train.py` there is one process, not rank 0 of a job that never
   starts.
4. Otherwise "single": rank 0 of 1 on 127.0.0.1.
"""

import atexit
import ctypes
import os
import re
import socket
import sys
import threading
import traceback
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

from dsfm.errors import ConfigError
from dsfm.runtime.slurm import expand_nodelist, expand_tasks_per_node

LAUNCHERS = ("torchrun", "mpirun", "srun", "single")
DEFAULT_PORT = 29500
# Step ids above this are SLURM's special steps: batch script, extern, interactive, pending.
SLURM_MAX_NORMAL_STEP_ID = 0xFFFFFFF0
# srun ranks cannot talk before the rendezvous, so they agree on a port derived from the job id,
# unprivileged and below Linux's ephemeral range (32768+) where outgoing connections take ports.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000

# Set only by an MPI launcher's own process manager, never by srun's MPI plugins.
_MPIRUN_ONLY = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID",
                "MPI_LOCALNRANKS", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE")
# Set by MPI launchers and by srun --mpi=pmi2 / --mpi=pmix alike.
_PMI = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK")
_MPI_SIZE = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
_INT = re.compile(r"-?\d+")
# getaddrinfo's answers that a name does not exist, as against a resolver failing for now.
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


@dataclass(frozen=True)
class DistEnv:
    """One process's place in the job, whatever started it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    def described(self) -> str:
        """The launcher for people: "torchrun" names how ranks were found (RANK and
        WORLD_SIZE), which the DeepSpeed launcher and torchrun both set."""
        if self.launcher == "torchrun":
            if "CROSS_RANK" in os.environ and "LOCAL_SIZE" in os.environ:
                return "the DeepSpeed launcher"
            if "TORCHELASTIC_RUN_ID" not in os.environ:
                return "RANK/WORLD_SIZE"
        return self.launcher

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside 0..{self.world_size - 1} "
                              f"(world_size {self.world_size}, launcher {self.launcher})")
        if not 0 <= self.local_rank < self.local_world_size <= self.world_size:
            raise ConfigError(f"local_rank {self.local_rank} / local_world_size "
                              f"{self.local_world_size} do not fit a world of {self.world_size} "
                              f"(launcher {self.launcher})")
        if not self.master_addr:
            raise ConfigError(f"master_addr is empty (launcher {self.launcher})")
        if not 0 < self.master_port < 65536:
            raise ConfigError(f"master_port {self.master_port} is not a TCP port "
                              f"(launcher {self.launcher})")


def discover(environ: Mapping[str, str] | None = None, mpi=None) -> DistEnv:
    """This process's rank, world and rendezvous address, from whichever launcher started it.

    `environ` defaults to os.environ. `mpi` is the mpi4py `MPI` module to use on the mpirun path
    (default: imported here, which initialises MPI); pass it when the caller already holds one.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env or "WORLD_SIZE" in env:
        for present, missing in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
            if missing not in env:
                raise ConfigError(f"{present}={env[present]!r} is set but {missing} is not: a "
                                  f"torchrun/deepspeed launch sets both. Export {missing} too, "
                                  f"or unset {present} to let dsfm find the launcher itself")
        return _from_torchrun(env)
    markers = [name for name in _MPIRUN_ONLY + _PMI if name in env]
    in_step = _in_srun_step(env)
    if markers and not (in_step and _srun_set_pmi(env, markers)):
        return _from_mpi(env, markers, mpi)
    if in_step:
        return _from_srun(env)
    return _single(env)


def check_master_addr(env: DistEnv, environ: Mapping[str, str] | None = None) -> None:
    """Refuse, in one line, a rendezvous host that this node cannot resolve.

    torch's store client retries a failed name lookup until the process group's timeout (10
    minutes under DeepSpeed), with a warning each time, on every rank: a mistyped
    `--master_addr` or MASTER_ADDR, or a SLURM node name that is no host name, was a long wait
    before an error. Only an answer that the name does not exist counts; a resolver that fails
    for now is left to torch's retries. `environ` (default os.environ, before `export`) tells
    where the address came from.
    """
    env_vars = os.environ if environ is None else environ
    try:
        socket.getaddrinfo(env.master_addr, None)
        return
    except socket.gaierror as e:
        if e.errno not in _NO_SUCH_NAME:
            return
        why = e.strerror
    if env.launcher == "torchrun" or env_vars.get("MASTER_ADDR", "").strip() == env.master_addr:
        source = "MASTER_ADDR"
    elif env.launcher == "srun":
        source = "the step's first node in SLURM's node list"
    else:
        source = "rank 0's host name"
    fix = ("pass one to the launcher (deepspeed --master_addr, torchrun --rdzv-endpoint or "
           "--master-addr) or set MASTER_ADDR" if env.launcher == "torchrun" else
           "set MASTER_ADDR to one")
    raise ConfigError(f"rendezvous host {env.master_addr!r} ({source}, {env.described()} launch) "
                      f"does not resolve on {socket.gethostname()} ({why}): rank 0's node needs "
                      f"a name or address that every node resolves; {fix}")


def export(env: DistEnv, environ: MutableMapping[str, str] = os.environ) -> None:
    """Write `env` as the env:// variables torch and deepspeed.init_distributed read.

    LOCAL_SIZE is DeepSpeed's own launcher's name for LOCAL_WORLD_SIZE (its CPU accelerator counts
    devices with it), so it is set too.
    """
    environ.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "LOCAL_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })


# --- reading variables -------------------------------------------------------------------------

def _int(env: Mapping[str, str], name: str, launcher: str, minimum: int = 0) -> int:
    raw = env[name]
    if not _INT.fullmatch(raw.strip()):
        raise ConfigError(f"{name}={raw!r} is not an integer ({launcher} launch); fix the launch "
                          f"command or unset {name}")
    value = int(raw)
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum} ({launcher} launch); fix "
                          f"the launch command or unset {name}")
    return value


def _first(env: Mapping[str, str], names: Sequence[str], launcher: str, why: str,
           fix: str | None = None) -> str:
    """The first of `names` that is set, or a ConfigError naming them all."""
    for name in names:
        if env.get(name, "").strip():
            return name
    by = "torchrun or the deepspeed launcher" if launcher == "torchrun" else launcher
    fix = fix or f"start the job with {by}, which sets it, or export {names[0]} yourself"
    raise ConfigError(f"{' or '.join(names)} is not set, although {why}; {fix}")


def _below(name: str, value: int, limit_name: str, limit: int, launcher: str) -> None:
    if value >= limit:
        raise ConfigError(f"{name}={value} is not below {limit_name}={limit} ({launcher} launch): "
                          "the launcher's variables contradict each other; check for values "
                          "exported by hand or left over from another job")


def _at_most(name: str, value: int, limit_name: str, limit: int, launcher: str) -> None:
    if value > limit:
        raise ConfigError(f"{name}={value} is more than {limit_name}={limit} ({launcher} launch): "
                          "a node cannot hold more ranks than the job; check for values exported "
                          "by hand or left over from another job")


def _port(env: Mapping[str, str], name: str, launcher: str) -> int:
    port = _int(env, name, launcher, minimum=1)
    if port > 65535:
        raise ConfigError(f"{name}={env[name]!r} is not a TCP port (1-65535) ({launcher} launch)")
    return port


def _free_port() -> int:
    """A port nobody listens on now (the OS picks it); 29500 where no socket can be bound."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("", 0))
            return s.getsockname()[1]
    except OSError:
        return DEFAULT_PORT


# --- the launchers -----------------------------------------------------------------------------

def _from_torchrun(env: Mapping[str, str]) -> DistEnv:
    launcher, why = "torchrun", "RANK and WORLD_SIZE are set (a torchrun or deepspeed launch)"
    rank = _int(env, "RANK", launcher)
    world = _int(env, "WORLD_SIZE", launcher, minimum=1)
    _below("RANK", rank, "WORLD_SIZE", world, launcher)
    local_rank = _int(env, _first(env, ("LOCAL_RANK",), launcher, why), launcher)
    local_name = _first(env, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"), launcher, why)
    local_world = _int(env, local_name, launcher, minimum=1)
    _below("LOCAL_RANK", local_rank, local_name, local_world, launcher)
    _at_most(local_name, local_world, "WORLD_SIZE", world, launcher)
    addr = env[_first(env, ("MASTER_ADDR",), launcher, why)].strip()
    port = _port(env, _first(env, ("MASTER_PORT",), launcher, why), launcher)
    return DistEnv(rank, world, local_rank, local_world, addr, port, launcher)


def _in_srun_step(env: Mapping[str, str]) -> bool:
    """True inside a task of an srun step; False in the batch script or salloc's shell."""
    if "SLURM_PROCID" not in env:
        return False
    name = next((n for n in ("SLURM_STEP_ID", "SLURM_STEPID") if n in env), None)
    if name is None:
        return False
    raw = env[name].strip()
    if not _INT.fullmatch(raw):
        raise ConfigError(f"{name}={env[name]!r} is not an integer step id; unset it if it was "
                          "exported by hand")
    # Special steps carry ids near 2**32 (printed unsigned) or negative (printed signed).
    return 0 <= int(raw) <= SLURM_MAX_NORMAL_STEP_ID


def _srun_set_pmi(env: Mapping[str, str], markers: list[str]) -> bool:
    """Whether the MPI variables of an srun task come from srun's own PMI plugin.

    Decided by variables every rank reads alike (never by comparing ranks), so that all ranks of
    one job take the same path.
    """
    if any(name in _MPIRUN_ONLY for name in markers):
        return False
    if "PMI_SIZE" in env:
        ntasks = next((n for n in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") if n in env), None)
        return ntasks is not None and env["PMI_SIZE"].strip() == env[ntasks].strip()
    return True


def _from_srun(env: Mapping[str, str]) -> DistEnv:
    launcher, why = "srun", "SLURM_PROCID and SLURM_STEP_ID are set (a task of an srun step)"
    rank = _int(env, "SLURM_PROCID", launcher)
    world_name = _first(env, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"),
                        launcher, why)
    world = _int(env, world_name, launcher, minimum=1)
    _below("SLURM_PROCID", rank, world_name, world, launcher)
    local_rank = _int(env, _first(env, ("SLURM_LOCALID",), launcher, why), launcher)
    local_name, local_world = _slurm_local_world(env, why)
    _below("SLURM_LOCALID", local_rank, local_name, local_world, launcher)
    _at_most(local_name, local_world, world_name, world, launcher)

    if env.get("MASTER_ADDR", "").strip():
        addr = env["MASTER_ADDR"].strip()
    else:
        list_name = _first(env, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"),
                           launcher, why)
        try:
            addr = expand_nodelist(env[list_name])[0]
        except ConfigError as e:
            raise ConfigError(f"{list_name}: {e}") from None
    if env.get("MASTER_PORT", "").strip():
        port = _port(env, "MASTER_PORT", launcher)
    else:
        job_name = _first(env, ("SLURM_JOB_ID", "SLURM_JOBID"), launcher, why,
                          "the rendezvous port is derived from the job id: set MASTER_PORT")
        job = _int(env, job_name, launcher)
        step_name = "SLURM_STEP_ID" if "SLURM_STEP_ID" in env else "SLURM_STEPID"
        step = _int(env, step_name, launcher)
        # The step id is mixed in so that two concurrent steps of one job do not collide.
        port = SLURM_PORT_BASE + (job * 31 + step) % SLURM_PORT_SPAN
    return DistEnv(rank, world, local_rank, local_world, addr, port, launcher)


def _slurm_local_world(env: Mapping[str, str], why: str) -> tuple[str, int]:
    """Tasks on this node: the step's tasks-per-node list at this node's index, or the request."""
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if not env.get(name, "").strip():
            continue
        try:
            counts = expand_tasks_per_node(env[name])
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None
        if "SLURM_NODEID" in env:
            node = _int(env, "SLURM_NODEID", "srun")
            _below("SLURM_NODEID", node, f"the node count of {name}", len(counts), "srun")
            count = counts[node]
        elif len(set(counts)) == 1:
            count = counts[0]
        else:
            raise ConfigError(f"{name}={env[name]!r} differs between nodes and SLURM_NODEID is "
                              "not set (srun launch), so this node's task count is unknown; "
                              "set SLURM_NODEID or give every node the same --ntasks-per-node")
        if count < 1:
            raise ConfigError(f"{name}={env[name]!r} gives this node {count} tasks (srun launch)")
        return name, count
    name = _first(env, ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE",
                        "SLURM_NTASKS_PER_NODE"), "srun", why)
    return name, _int(env, name, "srun", minimum=1)


def _import_mpi(markers: list[str]):
    found = ", ".join(markers)
    try:
        from mpi4py import MPI
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "mpi4py":
            raise ConfigError(
                f"started by an MPI launcher ({found} set) but mpi4py is not installed: pip "
                "install mpi4py (or pip install -e '.[mpi]'), with an MPI library: the cluster's "
                "MPI module, or pip install mpich") from None
        raise ConfigError(f"started by an MPI launcher ({found} set) but mpi4py failed to load: "
                          f"{e}; load the cluster's MPI module or pip install mpich") from e
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"started by an MPI launcher ({found} set) but mpi4py could not load an "
                          f"MPI library: {e}; load the cluster's MPI module or pip install "
                          "mpich") from e
    return MPI


def _from_mpi(env: Mapping[str, str], markers: list[str], mpi) -> DistEnv:
    """Rank and size from MPI, local rank from a node-local communicator, rendezvous from rank 0."""
    if mpi is None:
        mpi = _import_mpi(markers)
    comm = mpi.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    for name in _MPI_SIZE:
        if name in env and env[name].strip() != str(size):
            library = mpi.Get_library_version().splitlines()[0].strip()
            raise ConfigError(
                f"{name}={env[name]!r} but mpi4py's MPI ({library}) sees {size} process(es): the "
                "mpirun that started this job and the MPI library mpi4py loaded are different "
                "implementations. Use the mpirun that belongs to mpi4py's library (with pip's "
                "mpich, the one next to the python executable)")
    local = comm.Split_type(mpi.COMM_TYPE_SHARED, key=rank)
    try:
        local_rank, local_size = local.Get_rank(), local.Get_size()
    finally:
        local.Free()
    # Only rank 0 knows where it runs and which port it can listen on. Any problem travels in the
    # broadcast, so every rank raises instead of the others waiting forever.
    choice = _rank0_rendezvous(env, single_node=local_size == size) if rank == 0 else None
    addr, port, problem = comm.bcast(choice, root=0)
    if problem:
        raise ConfigError(problem)
    return DistEnv(rank, size, local_rank, local_size, addr, port, "mpirun")


def _rank0_rendezvous(env: Mapping[str, str], single_node: bool) -> tuple[str, int, str | None]:
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        addr = "127.0.0.1" if single_node else socket.gethostname()
    if not env.get("MASTER_PORT", "").strip():
        return addr, _free_port(), None
    try:
        return addr, _port(env, "MASTER_PORT", "mpirun"), None
    except ConfigError as e:
        return addr, 0, f"rank 0: {e}"


def _single(env: Mapping[str, str]) -> DistEnv:
    if env.get("MASTER_PORT", "").strip():
        port = _port(env, "MASTER_PORT", "single")
    else:
        port = _free_port()
    return DistEnv(0, 1, 0, 1, "127.0.0.1", port, "single")


def exit_process(rc: int | None) -> NoReturn:
    """End a process that used a process group, skipping only the interpreter's teardown.

    What Python's exit does before the teardown comes first: threads that are not daemons are
    waited for (after the shutdown hooks of `concurrent.futures` stop idle executor workers, such
    as the compile pool of torch.compile's inductor) and the exit handlers run (logging,
    TensorBoard writers, open HDF5 files). After a success MPI is finalized if mpi4py started it
    (after a failure not: it waits for every rank, and mpirun ends the job on the exit code).
    Python's and C's output buffers are flushed, and then the process exits at once with `rc`
    (None: 0, as for `sys.exit`; an error in these steps is printed and makes a 0 a 1).

    Why: gloo's worker threads outlive `destroy_process_group` (the groups' `shutdown()` is a
    no-op for gloo in torch 2.13, and DeepSpeed keeps references to the groups, on its
    parameters among others, so they are not destroyed either), and such a thread can release
    the last C++ reference to a tensor that still has a Python object a moment after the
    collective that used it returned. If that moment falls in the teardown, CPython ends the
    thread with pthread_exit, whose unwinding through a C++ noexcept frame aborts the process
    ("terminate called without an active exception", SIGABRT) after a run that had succeeded:
    a rank of a 2-rank DeepSpeed probe, once in CI and once in 263 runs on the 2-core
    development machine; and a rank in every run of `tests/runtime/exit_probe.py`, which leaves
    collectives to gloo's threads at the end. Call it from `__main__` only: it never returns."""
    code = 0 if rc is None else int(rc)
    try:
        threading._shutdown()           # what Python's exit calls (CPython 3.8 on)
        atexit._run_exitfuncs()
        mpi = sys.modules.get("mpi4py.MPI")     # its MPI_Finalize hook is C's, which this skips
        if (code == 0 and mpi is not None and sys.modules["mpi4py"].rc.finalize is not False
                and mpi.Is_initialized() and not mpi.Is_finalized()):
            mpi.Finalize()
    except BaseException:           # noqa: BLE001 - leave anyway, and say so
        traceback.print_exc()
        code = code or 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass            # closed or replaced: nothing of ours is left in it
        try:
            ctypes.CDLL(None).fflush(None)      # C's stdio buffers (NCCL_DEBUG's lines, say)
        except (OSError, AttributeError):
            pass
        os._exit(code)
