"""python -m perf.allreduce_sweep: collectives across the cluster, one job per NCCL profile.

Follows nccl-tests' conventions: sizes from -b to -e by factor -f; all_reduce, reduce_scatter,
all_gather, broadcast and all_to_all (where the backend has them); fp32; warmup and timed
iterations launched back to back (or synchronized after each op with --sync-each); out-of-place
and in-place; the time averaged over ranks; every result checked (#wrong); algbw = size / time and
busbw = algbw × 2(n-1)/n (all_reduce), (n-1)/n (reduce_scatter, all_gather, all_to_all), 1
(broadcast). Splits like NCCL_TESTS_SPLIT: the whole world, one communicator per node
(`intra`), one per local GPU index across nodes (`rail`), in the same run.

Each profile (perf/profiles/<name>.yaml: a set of NCCL environment variables) runs as its own job
over the hostfile (deepspeed launcher with pdsh, mpirun, srun) or as local processes; per-rank
results and progress are written to the output folder as they come (kept on a failure), then
merged into one comparison table, JSON, CSV, TensorBoard scalars and a PNG of busbw against size.
With NCCL, per-rank NCCL_DEBUG=INFO logs are parsed to show which algorithm, protocol and
transport NCCL took and to flag profiles whose request did not take effect.

    python -m perf.allreduce_sweep --backend gloo --nprocs 2          # CI: local CPU ranks
    python -m perf.allreduce_sweep --launcher deepspeed --hostfile hostfiles/raphael \\
        --profiles rail,semi_rail,sharp_on,sharp_off -b 8 -e 8G -f 2 --out runs/sweep
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from dsfm import subprocess_env
from dsfm.helpfmt import HelpFormatter
from dsfm.runtime.dist import exit_process

PROFILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all")
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
              "all_gather": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
              "broadcast": lambda n: 1.0}
SPLITS = ("world", "intra", "rail")
_SUFFIX = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}


class SweepError(Exception):
    """A bad request or a failed job, said in one line."""


# ----------------------------------------------------------------------------- inputs

def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", str(text).upper())
    if not m:
        raise SweepError(f"size {text!r}: expected a number of bytes with an optional K, M or G "
                         "suffix, e.g. 8, 64K, 128M, 8G")
    return int(m.group(1)) * _SUFFIX[m.group(2)]


def sizes_from(begin: str, end: str, factor: float) -> list[int]:
    lo, hi = parse_size(begin), parse_size(end)
    if lo < 1 or hi < lo:
        raise SweepError(f"sizes out of order: -b {begin} is above -e {end}" if hi < lo
                         else "-b must be at least 1 byte")
    if not (factor > 1 and math.isfinite(factor)):     # nan and inf compare False / True
        raise SweepError(f"-f {factor}: the step factor must be a finite number above 1")
    out, s = [], lo
    while s <= hi:
        out.append(int(s))
        s = max(int(s * factor), int(s) + 1)
    return out


def known_profiles() -> list[str]:
    """The names of the profiles in perf/profiles."""
    return sorted(os.path.splitext(f)[0] for f in os.listdir(PROFILES_DIR) if f.endswith(".yaml"))


def load_profile(name: str) -> dict:
    """A profile by name (perf/profiles/<name>.yaml) or path: {name, description, env}."""
    import yaml

    path = name if os.path.isfile(name) else os.path.join(PROFILES_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        raise SweepError(f"unknown profile {name!r}; known: {', '.join(known_profiles())} (or "
                         "give a YAML path)")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise SweepError(f"profile {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise SweepError(f"profile {path}: not valid YAML ({exc.__class__.__name__}); expected "
                         "description: TEXT and env: a mapping of NCCL_* settings") from None
    if not isinstance(data, dict) or not isinstance(data.get("env") or {}, dict):
        raise SweepError(f"profile {path}: expected a mapping with description: TEXT and env: a "
                         "mapping of NCCL_* settings")
    env = {str(k): str(v) for k, v in (data.get("env") or {}).items()}
    bad = [k for k in env if not k.startswith(("NCCL_", "UCX_", "SHARP_", "CUDA_"))]
    if bad:
        raise SweepError(f"profile {path}: env keys {bad} are not NCCL/UCX/SHARP/CUDA settings")
    return {"name": data.get("name", os.path.splitext(os.path.basename(path))[0]),
            "description": data.get("description", ""), "env": env}


def read_hostfile(path: str) -> list[tuple[str, int]]:
    hosts = []
    try:
        with open(path) as fh:
            lines = fh.readlines()
    except OSError as exc:
        raise SweepError(f"hostfile {path}: cannot read it ({exc.strerror})") from None
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", line)
        if not m or int(m.group(2)) < 1:
            raise SweepError(f"{path}: cannot read {raw.strip()!r} (expected 'host slots=N', N "
                             "at least 1)")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise SweepError(f"{path}: no hosts")
    return hosts


def ranks_per_node(layout: list[tuple[int, int]]) -> int | None:
    """Ranks per node when every node holds the same number of consecutive ranks (rank r is
    local rank r % L of a node of L), as the intra and rail splits take it; else None.
    `layout`: (local rank, ranks on its node) of every rank, in rank order."""
    sizes = {n for _, n in layout}
    if len(sizes) != 1:
        return None
    (per,) = sizes
    if per < 1 or len(layout) % per or any(lr != r % per for r, (lr, _) in enumerate(layout)):
        return None
    return per


def node_sizes(layout: list[tuple[int, int]]) -> list[int]:
    """Ranks on each node, a node starting at every local rank 0 (for messages)."""
    out: list[int] = []
    for local_rank, _ in layout:
        if local_rank == 0 or not out:
            out.append(0)
        out[-1] += 1
    return out


def is_local(host: str) -> bool:
    return host in ("localhost", "127.0.0.1", socket.gethostname())


def check_reachable(hosts: list[tuple[str, int]], timeout_s: float = 5.0) -> None:
    """Every host must resolve and accept ssh (pdsh and mpirun go through it)."""
    for host, _ in hosts:
        try:
            socket.gethostbyname(host)
        except OSError:
            raise SweepError(f"hostfile host {host!r} does not resolve") from None
        if is_local(host):
            continue
        try:
            with socket.create_connection((host, 22), timeout=timeout_s):
                pass
        except OSError as exc:
            raise SweepError(f"hostfile host {host!r} is not reachable on ssh port 22: "
                             f"{exc}") from None


# ----------------------------------------------------------------------------- worker

def _ops(dist):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return gather, scatter


def run_collective(dist, torch, name: str, size: int, group, n: int, rank: int, device,
                   warmup: int, iters: int, inplace: bool, sync_each: bool) -> dict | None:
    """Time one collective at one size on `group`; None when the backend lacks it."""
    gather, scatter = _ops(dist)
    per = 4                                              # float32
    if name in ("all_reduce", "broadcast"):
        count = size // per
    else:
        count = (size // (per * n)) * n                  # total elements, a multiple of n
    if count < (1 if name in ("all_reduce", "broadcast") else n):
        return None
    chunk = count // n
    value = float(rank + 1)

    def refill():                                        # the send data, before the check
        send.fill_(value)
    if name == "all_reduce":
        send = torch.full((count,), value, device=device)
        recv = send if inplace else torch.empty_like(send)
        expect = n * (n + 1) / 2

        def op():
            if inplace:
                dist.all_reduce(send, group=group)
            else:
                recv.copy_(send)
                dist.all_reduce(recv, group=group)
    elif name == "broadcast":
        send = torch.full((count,), value, device=device)
        expect = 1.0                                     # root 0 (global rank of the group)

        def op():
            dist.broadcast(send, src=dist.get_global_rank(group, 0) if group else 0,
                           group=group)
        recv = send
    elif name == "reduce_scatter":
        # chunk c holds rank + 1 + c, so rank r's result, n(n+1)/2 + n*r, tells the chunks
        # apart (with one value everywhere, another rank's chunk would pass the check)
        per_chunk = value + torch.arange(n, device=device, dtype=torch.float32).unsqueeze(1)
        send = torch.empty(count, device=device)

        def refill():
            send.view(n, chunk).copy_(per_chunk)
        refill()
        recv = send[rank * chunk:(rank + 1) * chunk] if inplace else \
            torch.empty(chunk, device=device)
        expect = n * (n + 1) / 2 + n * rank

        def op():
            scatter(recv, send, group=group)
    elif name == "all_gather":
        recv = torch.empty(count, device=device)
        send = recv[rank * chunk:(rank + 1) * chunk] if inplace else \
            torch.empty(chunk, device=device)
        send.fill_(value)      # once: all_gather leaves it as it is, in place too
        expect = None

        def op():
            gather(recv, send, group=group)
    else:
        send = torch.full((count,), value, device=device)
        recv = torch.empty_like(send)
        expect = None

        def op():
            dist.all_to_all_single(recv, send, group=group)
    try:
        for _ in range(warmup):
            op()
    except (RuntimeError, NotImplementedError) as exc:
        if "not supported" in str(exc).lower() or "not implemented" in str(exc).lower() \
                or isinstance(exc, NotImplementedError):
            return {"unsupported": str(exc).splitlines()[0][:200]}
        raise
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times = []
    if name == "all_reduce" and inplace:
        send.fill_(value)
    sync()
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(iters):
        if sync_each:
            t0 = time.perf_counter()
            op()
            sync()
            times.append(time.perf_counter() - t0)
        else:
            op()
    sync()
    elapsed = (sum(times) if sync_each else time.perf_counter() - start) / iters
    # in-place runs accumulated over the iterations: check one fresh run on every rank
    refill()
    op()
    sync()
    if name == "all_gather":
        want = torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat_interleave(chunk)
        wrong = int((recv != want).sum())
    elif name == "all_to_all":
        want = torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat_interleave(chunk)
        wrong = int((recv != want).sum())
    else:
        wrong = int((recv != expect).sum())
    return {"time_s": elapsed, "wrong": wrong, "count": count}


def _heartbeat(path: str, state: dict, every_s: float = 0.5) -> None:
    """A daemon thread rewriting `path` with what the rank is doing: a rank blocked in a
    collective keeps beating, a dead or frozen one stops, so the driver can tell them apart."""
    import threading

    def beat():
        while True:
            with open(path + ".tmp", "w") as fh:
                fh.write(f"{time.time()} {state['at']}\n")
            os.replace(path + ".tmp", path)
            time.sleep(every_s)
    threading.Thread(target=beat, daemon=True, name="sweep-heartbeat").start()


def worker(args) -> int:
    """One rank: every split, collective and size; writes results and progress as it goes."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from dsfm.runtime import dist as dsfm_dist

    env = dsfm_dist.discover()
    dsfm_dist.export(env)
    backend = args.backend
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s * 4))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_n = env.local_world_size
    out_path = os.path.join(args.job_dir, f"rank{rank}.jsonl")
    state = {"at": "start"}
    _heartbeat(os.path.join(args.job_dir, f"rank{rank}.alive"), state)
    sizes = [int(s) for s in args.sizes.split(",")]
    if {"intra", "rail"} & set(args.splits.split(",")):
        # The groups below are built from this rank's own local size: ranks on nodes of
        # different sizes (hostfile slots 4 and 2, an uneven srun) would call new_group with
        # different rank lists and hang. Every rank sees the same gathered layout and stops.
        mine = torch.tensor([env.local_rank, local_n], dtype=torch.int64, device=device)
        got = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(got, mine)
        layout = [(int(t[0]), int(t[1])) for t in got]
        if ranks_per_node(layout) is None:
            if rank == 0:
                print(f"error: --splits {args.splits}: the intra and rail splits need the same "
                      "number of ranks on every node, placed node by node; this job has "
                      f"{', '.join(map(str, node_sizes(layout)))} ranks per node: use --splits "
                      "world", file=sys.stderr, flush=True)
            dist.destroy_process_group()
            return 2
    groups = {"world": (None, world, rank)}
    nodes = world // local_n if local_n and world % local_n == 0 else 1
    if "intra" in args.splits and nodes >= 1 and local_n > 1:
        for node in range(nodes):
            ranks = list(range(node * local_n, (node + 1) * local_n))
            g = dist.new_group(ranks)
            if rank in ranks:
                groups["intra"] = (g, local_n, ranks.index(rank))
    if "rail" in args.splits and nodes > 1:
        for local in range(local_n):
            ranks = [node * local_n + local for node in range(nodes)]
            g = dist.new_group(ranks)
            if rank in ranks:
                groups["rail"] = (g, nodes, ranks.index(rank))
    with open(out_path, "a") as fh:
        for split in args.splits.split(","):
            if split not in groups:
                continue
            group, n, grank = groups[split]
            for name in args.collectives.split(","):
                for size in sizes:
                    state["at"] = f"{split} {name} {size} B"
                    rec = {"split": split, "collective": name, "size": size, "rank": rank,
                           "world_size": n}
                    for inplace in (False, True):
                        r = run_collective(dist, torch, name, size, group, n, grank, device,
                                           args.warmup, args.iters, inplace, args.sync_each)
                        key = "inplace" if inplace else "outofplace"
                        rec[key] = r
                        if r and "time_s" in r:     # mean time and total wrong over the group
                            t = torch.tensor([r["time_s"], float(r["wrong"])],
                                             dtype=torch.float64, device=device)
                            dist.all_reduce(t, group=group)
                            r["time_s"], r["wrong"] = float(t[0]) / n, int(t[1])
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------- driver

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_args(args, job_dir: str, sizes: list[int]) -> list[str]:
    return ["--worker", "--job-dir", job_dir, "--backend", args.backend,
            "--sizes", ",".join(map(str, sizes)), "--collectives", args.collectives,
            "--splits", args.splits, "-w", str(args.warmup), "-n", str(args.iters),
            "--timeout-s", str(args.timeout_s)] + (["--sync-each"] if args.sync_each else [])


def launch(args, profile: dict, job_dir: str, sizes: list[int]) -> list[subprocess.Popen]:
    """Start one profile's job; returns the processes to wait for."""
    env = subprocess_env(dict(os.environ, **profile["env"]))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if args.backend == "nccl":
        env.setdefault("NCCL_DEBUG", "INFO")
        env.setdefault("NCCL_DEBUG_SUBSYS", "INIT,ENV,GRAPH,NET,TUNING,COLL")
        env["NCCL_DEBUG_FILE"] = os.path.join(job_dir, "nccl.%h.%p.log")
    wargs = worker_args(args, job_dir, sizes)
    stdout = open(os.path.join(job_dir, "launcher.log"), "w")
    if args.launcher == "local":
        port = _free_port()
        procs = []
        per_node = args.ranks_per_node or args.nprocs
        for r in range(args.nprocs):
            renv = dict(env, RANK=str(r), WORLD_SIZE=str(args.nprocs),
                        LOCAL_RANK=str(r % per_node), LOCAL_WORLD_SIZE=str(per_node),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, "-m", "perf.allreduce_sweep"]
                                          + wargs, env=renv, cwd=repo, stdout=stdout,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        return procs
    if args.launcher == "deepspeed":
        cmd = ["deepspeed", "--hostfile", args.hostfile, "--master_port", str(_free_port())]
        hosts = read_hostfile(args.hostfile)
        if len(hosts) == 1 and is_local(hosts[0][0]):
            # this machine only: DeepSpeed launches locally, so skip its ssh probe of the host
            cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1"]
        cmd += ["--no_local_rank", "--module", "perf.allreduce_sweep"] + wargs   # LOCAL_RANK: env
    elif args.launcher == "mpirun":
        hosts = read_hostfile(args.hostfile)
        keys = list(profile["env"]) + ["PYTHONPATH"] + \
            (["NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_DEBUG_FILE"] if args.backend == "nccl"
             else [])
        cmd = mpirun_command(hosts, keys) + [sys.executable, "-m", "perf.allreduce_sweep"] \
            + wargs
    else:                                                # srun inside an allocation
        cmd = ["srun", "--export=ALL", sys.executable, "-m", "perf.allreduce_sweep"] + wargs
    return [subprocess.Popen(cmd, env=env, cwd=repo, stdout=stdout, stderr=subprocess.STDOUT,
                             start_new_session=True)]


def mpirun_command(hosts: list[tuple[str, int]], env_keys: list[str]) -> list[str]:
    """mpirun's host list and environment forwarding in its own dialect: Open MPI (-H, -x) or
    MPICH/Intel MPI's Hydra (-hosts, -genvlist)."""
    total = sum(s for _, s in hosts)
    hostlist = ",".join(f"{h}:{s}" for h, s in hosts)
    try:
        version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SweepError(f"--launcher mpirun: cannot run mpirun ({exc})") from None
    if "Open MPI" in version or "OpenRTE" in version:
        cmd = ["mpirun", "-np", str(total), "-H", hostlist]
        for key in env_keys:
            cmd += ["-x", key]
        return cmd
    return ["mpirun", "-np", str(total), "-hosts", hostlist, "-genvlist", ",".join(env_keys)]


def _progress(job_dir: str) -> dict[int, int]:
    """rank → records written so far."""
    out = {}
    for path in glob.glob(os.path.join(job_dir, "rank*.jsonl")):
        rank = int(re.search(r"rank(\d+)\.jsonl$", path).group(1))
        with open(path) as fh:
            out[rank] = sum(1 for _ in fh)
    return out


def wait(procs: list[subprocess.Popen], job_dir: str, expected_ranks: int,
         timeout_s: float) -> str | None:
    """Wait for the job; None when it finished, else a report of what did not."""
    last, last_change = _progress(job_dir), time.time()
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        now = _progress(job_dir)
        if now != last:
            last, last_change = now, time.time()
        if time.time() - last_change > timeout_s:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return stuck_report(job_dir, expected_ranks, timeout_s)
    bad = [p.returncode for p in procs if p.returncode]
    if bad:
        return f"job exited with status {bad[0]}; see {os.path.join(job_dir, 'launcher.log')}"
    return None


def stuck_report(job_dir: str, expected_ranks: int, timeout_s: float) -> str:
    """Which ranks did not finish, and what each was doing, from the heartbeat files."""
    now = time.time()
    silent, waiting, missing = [], {}, []
    for r in range(expected_ranks):
        path = os.path.join(job_dir, f"rank{r}.alive")
        try:
            with open(path) as fh:
                stamp, at = fh.read().strip().split(" ", 1)
        except (OSError, ValueError):
            missing.append(r)
            continue
        if now - float(stamp) > min(5.0, timeout_s / 2):
            silent.append(f"{r} (last seen {now - float(stamp):.0f} s ago at {at})")
        else:
            waiting.setdefault(at, []).append(r)
    parts = []
    if silent:
        parts.append("ranks that stopped responding: " + ", ".join(silent))
    if missing:
        parts.append(f"ranks that never started: {missing}")
    for at, ranks in waiting.items():
        parts.append(f"ranks {ranks} alive but waiting in {at}")
    return (f"no progress for {timeout_s:.0f} s; " + "; ".join(parts)
            + f" (job killed; partial results in {job_dir})")


def merge(job_dir: str, profile: str) -> list[dict]:
    """Rank 0's records of a job as flat result rows (one per split/collective/size/place)."""
    rows = []
    path = os.path.join(job_dir, "rank0.jsonl")
    if not os.path.isfile(path):
        return rows
    with open(path) as fh:
        for line in fh:
            rec = json.loads(line)
            n = rec["world_size"]
            for place in ("outofplace", "inplace"):
                r = rec.get(place)
                if not r or "time_s" not in r:
                    continue
                # the bytes really moved: the count is rounded down to whole float32
                # elements (and for reduce_scatter, all_gather, all_to_all to a multiple of n)
                nbytes = r.get("count", rec["size"] // 4) * 4
                algbw = nbytes / r["time_s"] / 1e9
                rows.append({"profile": profile, "split": rec["split"],
                             "collective": rec["collective"], "size": rec["size"],
                             "bytes": nbytes, "count": nbytes // 4,
                             "world_size": n, "inplace": place == "inplace",
                             "time_us": r["time_s"] * 1e6, "algbw": algbw,
                             "busbw": algbw * BUS_FACTOR[rec["collective"]](n),
                             "wrong": r["wrong"]})
    return rows


def table(rows: list[dict], profile: str, split: str, collective: str) -> str:
    """nccl-tests' layout: out-of-place then in-place columns, and the average busbw."""
    sel = [r for r in rows if (r["profile"], r["split"], r["collective"]) ==
           (profile, split, collective)]
    if not sel:
        return ""
    by_size: dict[int, dict] = {}
    for r in sel:
        by_size.setdefault(r["size"], {})["in" if r["inplace"] else "out"] = r
    n = sel[0]["world_size"]
    lines = [f"# profile {profile} | split {split} | {collective} | nranks {n}",
             f"# {'size':>12s} {'count':>12s} {'type':>6s}   "
             f"{'time':>9s} {'algbw':>7s} {'busbw':>7s} {'#wrong':>6s}   "
             f"{'time':>9s} {'algbw':>7s} {'busbw':>7s} {'#wrong':>6s}",
             f"# {'(B)':>12s} {'(elements)':>12s} {'':>6s}   "
             f"{'(us)':>9s} {'(GB/s)':>7s} {'(GB/s)':>7s} {'':>6s}   "
             f"{'(us)':>9s} {'(GB/s)':>7s} {'(GB/s)':>7s}"]
    if collective == "all_reduce":
        lines.insert(1, "# out-of-place: torch.distributed has no out-of-place all_reduce; "
                        "timed as a copy into the receive buffer plus an in-place all_reduce")
    elif collective == "broadcast":
        lines.insert(1, "# out-of-place: torch.distributed has no out-of-place broadcast; "
                        "both columns time the same in-place broadcast")
    elif collective == "all_to_all":
        lines.insert(1, "# in-place: torch.distributed has no in-place all_to_all; both columns "
                        "time the same all_to_all_single into a separate buffer")
    busbws = []
    for size in sorted(by_size):
        cells = []
        for place in ("out", "in"):
            r = by_size[size].get(place)
            if r:
                busbws.append(r["busbw"])
                cells.append(f"{r['time_us']:9.2f} {r['algbw']:7.3f} {r['busbw']:7.3f} "
                             f"{r['wrong']:6d}")
            else:
                cells.append(f"{'n/a':>9s} {'':7s} {'':7s} {'':6s}")
        first = next(iter(by_size[size].values()))       # the bytes moved, as nccl-tests
        lines.append(f"  {first['bytes']:12d} {first['count']:12d} {'float':>6s}   "
                     + "   ".join(cells))
    wrong = sum(r["wrong"] for r in sel)
    lines.append(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
    lines.append(f"# Avg bus bandwidth    : {sum(busbws) / max(len(busbws), 1):.4f} GB/s")
    return "\n".join(lines)


def average_busbw(rows: list[dict]) -> float:
    vals = [r["busbw"] for r in rows]
    return sum(vals) / len(vals) if vals else 0.0


def comparison(rows: list[dict]) -> str:
    """One line per (profile, split, collective): average and peak busbw, #wrong."""
    keys = sorted({(r["profile"], r["split"], r["collective"]) for r in rows})
    out = [f"{'profile':14s} {'split':6s} {'collective':15s} {'ranks':>5s} {'avg busbw':>10s} "
           f"{'peak busbw':>10s} {'#wrong':>6s}"]
    for key in keys:
        sel = [r for r in rows if (r["profile"], r["split"], r["collective"]) == key]
        out.append(f"{key[0]:14s} {key[1]:6s} {key[2]:15s} {sel[0]['world_size']:5d} "
                   f"{average_busbw(sel):10.3f} {max(r['busbw'] for r in sel):10.3f} "
                   f"{sum(r['wrong'] for r in sel):6d}")
    return "\n".join(out)


def curve_inplace(collective: str) -> bool:
    """Which column the TensorBoard and PNG curves take: the backend's own operation, so
    all_reduce's in-place one (its out-of-place column adds a copy: torch.distributed has no
    out-of-place all_reduce), the out-of-place one of the others (as nccl-tests' first)."""
    return collective == "all_reduce"


def write_outputs(rows: list[dict], out_dir: str, args) -> None:
    records = [{"backend": args.backend,
                **{k: r[k] for k in ("profile", "split", "collective", "size", "bytes",
                                     "world_size", "inplace", "algbw", "busbw", "time_us",
                                     "wrong")}}
               for r in rows]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
    with open(args.csv or os.path.join(out_dir, "results.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(records[0]) if records else ["profile"])
        w.writeheader()
        w.writerows(records)
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(args.tb or os.path.join(out_dir, "tb")) as tb:
        for r in rows:
            if r["inplace"] == curve_inplace(r["collective"]):
                tag = f"sweep/{r['profile']}/{r['split']}/{r['collective']}/busbw"
                tb.add_scalar(tag, r["busbw"], r["size"])
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colls = sorted({r["collective"] for r in rows})
    fig, axes = plt.subplots(1, max(len(colls), 1), figsize=(5 * max(len(colls), 1), 4),
                             squeeze=False, constrained_layout=True)
    for ax, coll in zip(axes[0], colls):
        for key in sorted({(r["profile"], r["split"]) for r in rows if r["collective"] == coll}):
            sel = sorted((r for r in rows if r["collective"] == coll
                          and r["inplace"] == curve_inplace(coll)
                          and (r["profile"], r["split"]) == key), key=lambda r: r["size"])
            ax.plot([r["size"] for r in sel], [r["busbw"] for r in sel], marker="o", ms=3,
                    label=f"{key[0]} / {key[1]}")
        ax.set(xscale="log", xlabel="size (B)", ylabel="busbw (GB/s)",
               title=f"{coll} ({'in-place' if curve_inplace(coll) else 'out-of-place'}, "
                     f"{args.backend})")
        ax.legend(fontsize=7)
    fig.savefig(args.png or os.path.join(out_dir, "busbw.png"), dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from perf.topology import CLUSTERS

    ap = argparse.ArgumentParser(formatter_class=HelpFormatter,
        prog="python -m perf.allreduce_sweep", description=__doc__.split("\n\n")[0],
        epilog="algbw = bytes moved / time, busbw = algbw x 2(n-1)/n for all_reduce, (n-1)/n "
        "for reduce_scatter, all_gather and all_to_all, 1 for broadcast (nccl-tests' "
        "doc/PERFORMANCE.md; GB/s = 1e9 B/s); for reduce_scatter, all_gather and all_to_all the "
        "size is the whole buffer of n chunks. The time is the mean of the timed iterations, "
        "averaged over the ranks (nccl-tests' default); every result is checked (#wrong). "
        "More: docs/collectives.md.")
    ap.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    ap.add_argument("--launcher", default="local", choices=("local", "deepspeed", "mpirun",
                                                             "srun"),
                    help="local: --nprocs processes here (default); deepspeed (pdsh) or mpirun "
                    "(Open MPI, MPICH): over --hostfile; srun: inside a SLURM allocation")
    ap.add_argument("--nprocs", type=int, default=None, help="local ranks (default: GPUs, or 2)")
    ap.add_argument("--ranks-per-node", type=int, default=None, help="local launcher: group "
                    "the ranks into pretend nodes of this size (exercises the intra/rail "
                    "splits on one machine)")
    ap.add_argument("--hostfile", default=None, help="one 'host slots=N' line per node "
                    "(DeepSpeed's format), for --launcher deepspeed and mpirun")
    ap.add_argument("--profiles", default=None, help="comma-separated profiles, each run as "
                    f"its own job: {', '.join(known_profiles())} (perf/profiles/NAME.yaml: NCCL "
                    "settings), or YAML paths (default: none, the environment as it is)")
    ap.add_argument("-b", "--minbytes", default="8", help="smallest size in bytes; K, M or G "
                    "suffixes are powers of 1024 (default 8)")
    ap.add_argument("-e", "--maxbytes", default="32M", help="largest size (default 32M)")
    ap.add_argument("-f", "--stepfactor", type=float, default=2.0, help="factor between "
                    "sizes (default 2)")
    ap.add_argument("-c", "--collectives", default="all_reduce", help="comma-separated: "
                    f"{', '.join(COLLECTIVES)} (default all_reduce; those the backend lacks "
                    "are reported, not failed)")
    ap.add_argument("-w", "--warmup", type=int, default=5, help="untimed iterations first "
                    "(default 5)")
    ap.add_argument("-n", "--iters", type=int, default=20, help="timed iterations, launched "
                    "back to back (default 20)")
    ap.add_argument("--sync-each", action="store_true", help="synchronize after every op")
    ap.add_argument("--splits", default="world", help="comma-separated communicators: world "
                    "(all ranks, the default), intra (one per node: NVLink), rail (one per local "
                    "GPU index across nodes: one rail of the fabric)")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="per size: a job that makes "
                    "no progress for this long is killed and the ranks behind are named")
    ap.add_argument("--out", default=None, help="output folder (default runs/sweep-<time>)")
    ap.add_argument("--json", default=None, help="also write the records (one per profile, "
                    "split, collective, size and place) to this JSON file")
    ap.add_argument("--csv", default=None, help="the records as CSV (default OUT/results.csv)")
    ap.add_argument("--tb", default=None, help="TensorBoard folder (default OUT/tb)")
    ap.add_argument("--png", default=None, help="busbw against size (default OUT/busbw.png)")
    ap.add_argument("--cluster", default=None, help="print perf.topology's all_reduce "
                    f"predictions for the job measured ({', '.join(CLUSTERS)})")
    ap.add_argument("--min-busbw", type=float, default=None, help="exit 1 when the average "
                    "busbw (GB/s) of any profile falls below this")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--job-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        return drive(args)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def drive(args) -> int:
    import torch

    args.backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if args.backend not in ("nccl", "gloo"):
        raise SweepError(f"--backend {args.backend!r}: nccl or gloo")
    if args.backend == "nccl" and not torch.cuda.is_available() and args.launcher == "local":
        raise SweepError("--backend nccl needs GPUs; use --backend gloo on CPU")
    for c in args.collectives.split(","):
        if c not in COLLECTIVES:
            raise SweepError(f"unknown collective {c!r}; known: {', '.join(COLLECTIVES)}")
    for s in args.splits.split(","):
        if s not in SPLITS:
            raise SweepError(f"unknown split {s!r}; known: {', '.join(SPLITS)}")
    sizes = sizes_from(args.minbytes, args.maxbytes, args.stepfactor)
    if args.iters < 1 or args.warmup < 0:
        raise SweepError(f"-n {args.iters} -w {args.warmup}: at least one timed iteration "
                         "and no negative warmup")
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        raise SweepError(f"--ranks-per-node {args.ranks_per_node}: must be at least 1")
    if args.cluster:             # checked now, not after the sweep (which then wrote nothing)
        from perf.topology import CLUSTERS
        if args.cluster not in CLUSTERS:
            raise SweepError(f"--cluster {args.cluster!r}: known {', '.join(CLUSTERS)}")
    profiles = [load_profile(p) for p in args.profiles.split(",")] if args.profiles else \
        [{"name": "default", "description": "environment as it is", "env": {}}]
    if args.launcher != "local" and shutil.which(args.launcher) is None:
        raise SweepError(f"--launcher {args.launcher}: no {args.launcher} command on PATH")
    if args.launcher == "local":
        if args.nprocs is None:          # 0 is a bad request, not "the default"
            args.nprocs = torch.cuda.device_count() if args.backend == "nccl" else 2
        if args.nprocs < 1:
            raise SweepError(f"--nprocs {args.nprocs}: at least 1 local rank")
        if args.ranks_per_node and args.nprocs % args.ranks_per_node:
            raise SweepError(f"--nprocs {args.nprocs} is not a multiple of --ranks-per-node "
                             f"{args.ranks_per_node}")
        expected = args.nprocs
        per_node = [args.nprocs]             # one machine, whatever --ranks-per-node pretends
    else:
        if args.launcher in ("deepspeed", "mpirun"):
            if not args.hostfile:
                raise SweepError(f"--launcher {args.launcher} needs --hostfile")
            hosts = read_hostfile(args.hostfile)
            slots = [s for _, s in hosts]
            split_by_node = [s for s in args.splits.split(",") if s in ("intra", "rail")]
            if split_by_node and len(set(slots)) > 1:
                raise SweepError(f"--splits {','.join(split_by_node)}: hostfile {args.hostfile} "
                                 f"gives its hosts different slots ({', '.join(map(str, slots))}"
                                 "); the intra and rail splits need the same number of ranks on "
                                 "every host: use --splits world or equal slots")
            check_reachable(hosts)
            expected = sum(s for _, s in hosts)
            per_node = [s for _, s in hosts]
        else:
            expected = int(os.environ.get("SLURM_NTASKS", "0")) or 1
            nnodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES")
                         or 0)
            per_node = [expected // nnodes] * nnodes if nnodes and expected % nnodes == 0 \
                else None
    missing = absent_splits(args.splits.split(","), expected, args.ranks_per_node
                            if args.launcher == "local" else None, per_node)
    if len(missing) == len(args.splits.split(",")):
        raise SweepError(f"--splits {args.splits}: no communicator of them in this job ("
                         + "; ".join(f"{k}: {v}" for k, v in missing.items()) + ")")
    for split, why in missing.items():
        print(f"note: --splits {split}: {why}; not measured", file=sys.stderr)
    out_dir = args.out or os.path.join("runs", f"sweep-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out_dir, exist_ok=True)
    print(f"== backend {args.backend}, launcher {args.launcher}, {expected} ranks"
          + ("" if args.backend == "nccl" else
             ": gloo over TCP, on CPU tensors; gloo chooses its own algorithms and logs none "
             "(the NCCL path report applies to --backend nccl only)"), flush=True)
    rows, failures, flags = [], [], []
    for profile in profiles:
        job_dir = os.path.join(out_dir, profile["name"])
        os.makedirs(job_dir, exist_ok=True)
        # an earlier run into the same --out left its results and its ranks' NCCL logs (named
        # by host and pid): read with this run's, they would report the earlier run's path
        for old in glob.glob(os.path.join(job_dir, "rank*.*")) + \
                glob.glob(os.path.join(job_dir, "nccl.*.log")):
            os.remove(old)
        print(f"== profile {profile['name']}: {profile['description']} "
              f"{' '.join(f'{k}={v}' for k, v in profile['env'].items())}", flush=True)
        procs = launch(args, profile, job_dir, sizes)
        problem = wait(procs, job_dir, expected, args.timeout_s)
        got = merge(job_dir, profile["name"])
        rows += got
        if problem:
            failures.append(f"profile {profile['name']}: {problem}")
            print(f"error: profile {profile['name']}: {problem}", file=sys.stderr)
        for split in args.splits.split(","):
            for coll in args.collectives.split(","):
                text = table(got, profile["name"], split, coll)
                if text:
                    print(text)
        if args.backend == "nccl":
            path, found = nccl_report(job_dir, profile)
            if path:
                print(f"# NCCL path, profile {profile['name']} (perf.nccl_log):")
                print("\n".join(f"#   {line}" for line in path), flush=True)
            flags += found
    if not rows and not failures:
        raise SweepError(f"no size from -b {args.minbytes} to -e {args.maxbytes} holds a float32 "
                         "element (4 B; reduce_scatter, all_gather and all_to_all: 4 B per rank)"
                         ": nothing was measured")
    if rows:
        print("\n== comparison")
        print(comparison(rows))
        if args.cluster:
            print(predictions(args.cluster, sizes, expected, per_node))
            if args.backend != "nccl":
                print(f"# the model is of NCCL on {args.cluster}'s GPUs and links; this job "
                      f"measured {args.backend} on this machine's CPUs: not comparable")
        write_outputs(rows, out_dir, args)
        print(f"results: {out_dir}")
    for f in flags:
        print(f"flag: {f}")
    if failures:
        return 1
    if args.min_busbw is not None:
        for profile in profiles:
            avg = average_busbw([r for r in rows if r["profile"] == profile["name"]])
            if avg < args.min_busbw:
                print(f"error: profile {profile['name']}: average busbw {avg:.3f} GB/s is "
                      f"below --min-busbw {args.min_busbw}", file=sys.stderr)
                return 1
    return 0


def absent_splits(splits: list[str], ranks: int, local: int | None,
                  per_node: list[int] | None) -> dict[str, str]:
    """The requested splits this job has no communicator for, and why: intra needs more than
    one rank on a node, rail more than one node. `local`: the local launcher's
    --ranks-per-node (its pretend nodes); `per_node`: the hosts' slots, where known (None under
    srun without SLURM's counts: then nothing is said)."""
    if local:
        per_node = [local] * (ranks // local)
    if not per_node:
        return {}
    out = {}
    if "intra" in splits and max(per_node) < 2:
        out["intra"] = f"one rank per node ({len(per_node)} nodes): an intra-node group needs 2"
    if "rail" in splits and len(per_node) < 2:
        out["rail"] = (f"one node ({per_node[0]} ranks): a rail links the same local rank on "
                       "2 nodes or more (--ranks-per-node N pretends nodes on one machine)")
    return out


def nccl_report(job_dir: str, profile: dict) -> tuple[list[str], list[str]]:
    """What the NCCL logs say NCCL did (perf.nccl_log.path_lines: setup, then algorithm and
    protocol per collective and size, or why there is none), and the flags where that differs
    from what the profile asked for."""
    from perf.nccl_log import parse_logs, path_lines, verify

    logs = sorted(glob.glob(os.path.join(job_dir, "nccl.*.log")))
    if not logs:
        return [], [f"profile {profile['name']}: no NCCL logs in {job_dir}"]
    report = parse_logs(logs)
    return path_lines(report), [f"profile {profile['name']}: {m}"
                                for m in verify(report, profile["env"])]


def predictions(cluster: str, sizes: list[int], nranks: int,
                per_node: list[int] | None = None) -> str:
    """perf.topology's all_reduce busbw for the job measured: its ranks on `len(per_node)`
    nodes (the hostfile's hosts and slots) where known, else packed onto whole nodes."""
    try:
        from perf.topology import CLUSTERS, TopologyError, gpu_net_GBps, predict
    except ImportError:
        return ""
    if cluster not in CLUSTERS:
        raise SweepError(f"--cluster {cluster!r}: known {', '.join(CLUSTERS)}")
    try:                          # the job measured, not the whole cluster
        if per_node and len(set(per_node)) > 1:
            raise TopologyError(f"the ranks per node differ ({', '.join(map(str, per_node))}): "
                                "the model takes the same number on every node")
        recs = predict(CLUSTERS[cluster], "all_reduce", sizes, nranks=nranks,
                       nodes=len(per_node) if per_node else None)
    except TopologyError as exc:
        return f"\n== model ({cluster}): no prediction for this job: {exc}"
    if recs[0]["nodes"] == 1:      # NCCL's CollNet (SHARP) is for jobs across nodes
        recs = [r for r in recs if r["algorithm"] != "sharp"]
    c, g = CLUSTERS[cluster], recs[0]["gpus"] // recs[0]["nodes"]
    lines = [f"\n== model ({cluster}, all_reduce, {recs[0]['nodes']} node(s) × "
             f"{g} GPUs = {recs[0]['gpus']} ranks, perf.topology)"]
    if recs[0]["nodes"] > 1:     # what bounds every network figure below, and its assumption
        lines.append(f"# per-GPU network share {gpu_net_GBps(c, g):.1f} GB/s, node injection "
                     f"{g * gpu_net_GBps(c, g):.1f} GB/s: {c.nics_per_node} × {c.nic_Gbps:g} "
                     f"Gb/s ports, {c.nics_per_host_link} per PCIe host link "
                     f"({c.pcie_GBps:g} GB/s), as perf/topology.py assumes; a measurement above "
                     "the model's busbw says the node is not built as assumed")
    lines.append(f"{'size':>12s} " + " ".join(f"{a:>14s}" for a in
                                             sorted({r['algorithm'] for r in recs})))
    for size in sizes:
        sel = {r["algorithm"]: r["busbw"] for r in recs if r["size"] == size}
        lines.append(f"{size:12d} " + " ".join(f"{sel[a]:14.2f}" for a in sorted(sel)))
    return "\n".join(lines)


if __name__ == "__main__":
    exit_process(main())
