"""SLURM allocation helpers: hostlist expansion and DeepSpeed hostfiles.

SLURM names nodes in a compressed hostlist syntax (`gpu[001-003,007],login1`); rank discovery
(dsfm.runtime.dist) needs the first host of a step, and the DeepSpeed launcher needs one
`host slots=N` line per node. Both are parsed here, strictly: a malformed list is an error, not
a guess, because a wrong host list makes a 96-rank job wait for ranks that never come.

    python -m dsfm.runtime.slurm [--out FILE] [--slots N]

writes the hostfile of the current allocation for `deepspeed --hostfile FILE`.
"""

import argparse
import itertools
import os
import re
import sys
from collections.abc import Iterable, Mapping

from dsfm.errors import ConfigError
from dsfm.helpfmt import HelpFormatter

DEFAULT_SLOTS = 4          # GPUs per node on the 24 x 4 H100 cluster
_HOST_TEXT = re.compile(r"[A-Za-z0-9._-]*")
_BOUND = re.compile(r"\d+")
_TASKS_ITEM = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def _split_top_level(s: str) -> list[str]:
    """Split on the commas that are not inside brackets, checking that brackets balance."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ConfigError(f"hostlist {s!r}: nested '[' at position {i}; SLURM hostlists "
                                  "allow one level of brackets, e.g. gpu[001-004]")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"hostlist {s!r}: ']' at position {i} closes no '['")
        elif ch == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    if depth:
        raise ConfigError(f"hostlist {s!r}: a '[' is never closed")
    parts.append(s[start:])
    return parts


def _expand_group(group: str, where: str) -> list[str]:
    """`001-003,007` → ['001', '002', '003', '007'], keeping the lower bound's zero padding."""
    out = []
    for item in group.split(","):
        lo, sep, hi = item.partition("-")
        if not _BOUND.fullmatch(lo) or (sep and not _BOUND.fullmatch(hi)):
            raise ConfigError(f"hostlist {where!r}: bad range {item!r} in [{group}]; expected "
                              "N or N-M with decimal numbers, e.g. [001-004,007]")
        if not sep:
            out.append(lo)
            continue
        first, last = int(lo), int(hi)
        if last < first:
            raise ConfigError(f"hostlist {where!r}: reversed range {item!r} in [{group}]; "
                              f"write {hi}-{lo}")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(first, last + 1))
    return out


def _expand_item(item: str, where: str) -> list[str]:
    """One host pattern with any number of bracket groups → the cartesian product of names."""
    pieces: list[list[str]] = []
    rest = item
    while rest:
        text, bracket, rest = rest.partition("[")
        if not _HOST_TEXT.fullmatch(text):
            raise ConfigError(f"hostlist {where!r}: {text!r} is not a host name (letters, digits, "
                              "'.', '-' and '_' only)")
        pieces.append([text])
        if bracket:
            group, _, rest = rest.partition("]")
            if not group:
                raise ConfigError(f"hostlist {where!r}: empty brackets '[]' in {item!r}")
            pieces.append(_expand_group(group, where))
    return ["".join(parts) for parts in itertools.product(*pieces)]


def expand_nodelist(s: str) -> list[str]:
    """Expand a SLURM hostlist (`gpu[001-003,007],login1`, `a[1-2]-ib[3-4]`) into host names.

    Names come out in SLURM's order (left to right, the first bracket group varying slowest),
    duplicates kept, so the first name is the node SLURM lists first: where rank 0 runs.
    """
    if not isinstance(s, str) or not s.strip():
        raise ConfigError(f"hostlist {s!r} is empty; expected e.g. raphael[001-024]")
    s = s.strip()
    hosts = []
    for item in _split_top_level(s):
        if not item:
            raise ConfigError(f"hostlist {s!r}: empty entry (two commas in a row, or a leading "
                              "or trailing comma)")
        hosts.extend(_expand_item(item, s))
    return hosts


def expand_tasks_per_node(s: str) -> list[int]:
    """Expand SLURM's tasks-per-node notation (`4(x24)`, `2(x3),1`) into one count per node."""
    counts = []
    for item in s.split(","):
        m = _TASKS_ITEM.fullmatch(item.strip())
        if not m:
            raise ConfigError(f"tasks per node {s!r}: bad entry {item!r}; expected N or N(xM), "
                              "e.g. 4(x24)")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts


def hostfile_lines(hosts: Iterable[str], slots: int | list[int]) -> list[str]:
    """DeepSpeed hostfile lines, `host slots=N`; DeepSpeed refuses a host listed twice.
    `slots`: one count for every host, or one per host."""
    hosts = list(hosts)
    if not hosts:
        raise ConfigError("no hosts to write: the hostfile would be empty")
    per_host = slots if isinstance(slots, list) else [slots] * len(hosts)
    if len(per_host) != len(hosts):
        raise ConfigError(f"{len(per_host)} slot counts for {len(hosts)} hosts")
    for n in per_host:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"slots={n!r}: must be a positive integer (GPUs per node)")
    seen = set()
    for host in hosts:
        if host in seen:
            raise ConfigError(f"host {host!r} is listed twice; DeepSpeed's launcher rejects "
                              "duplicate hostfile entries")
        seen.add(host)
    return [f"{host} slots={n}" for host, n in zip(hosts, per_host)]


def slots_from_env(environ: Mapping[str, str]) -> tuple[int | list[int], str]:
    """GPUs (ranks) per node from the allocation, and the variable it came from. GPU counts
    come first: DeepSpeed's launcher starts one rank per slot itself, so an allocation made
    for it (`--ntasks-per-node=1 --gpus-per-node=4`, or `--gres=gpu:4`) has one task per
    node but four slots. SLURM_GPUS_ON_NODE is set in batch scripts, SLURM_GPUS_PER_NODE
    only for --gpus-per-node, and SLURM_JOB_GPUS (the allocated GPUs' ids, counted) in batch
    scripts and salloc shells, also for --gres. Without any, the task counts: --ntasks-per-node,
    else SLURM_TASKS_PER_NODE (always set; one count per node, `4(x3),2`), for allocations
    that name no GPUs (CPU nodes). One task on every node is what an allocation for DeepSpeed's
    launcher has (one launcher per node) whether or not it names its GPUs (`--exclusive`
    whole nodes): that takes the cluster's default."""
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_JOB_GPUS",
                 "SLURM_NTASKS_PER_NODE"):
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        if name == "SLURM_JOB_GPUS":            # ids: 0,1,2,3
            ids = raw.split(",")
            if not all(i.strip().isdigit() for i in ids):
                raise ConfigError(f"{name}={raw!r}: expected GPU ids such as 0,1,2,3; pass "
                                  "--slots N to choose the slots yourself")
            return len(ids), name
        count = raw.rsplit(":", 1)[-1]          # --gpus-per-node may be `h100:4`
        if "," in raw or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"{name}={raw!r}: expected a positive count such as 4 or h100:4; "
                              "pass --slots N to choose the slots yourself")
        return int(count), name
    raw = environ.get("SLURM_TASKS_PER_NODE", "").strip()
    if raw:
        counts = expand_tasks_per_node(raw)
        if any(n < 1 for n in counts):
            raise ConfigError(f"SLURM_TASKS_PER_NODE={raw!r}: a node with no task; pass "
                              "--slots N to choose the slots yourself")
        if set(counts) != {1}:
            return counts, "SLURM_TASKS_PER_NODE"           # one per host: checked there
    return DEFAULT_SLOTS, "default"


def raw_counts(counts: list[int]) -> str:
    """SLURM's own notation of per-node counts: [4, 4, 4, 2] -> 4(x3),2."""
    runs = [(n, len(list(group))) for n, group in itertools.groupby(counts)]
    return ",".join(f"{n}(x{k})" if k > 1 else str(n) for n, k in runs)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter,
        prog="python -m dsfm.runtime.slurm",
        description="Write a DeepSpeed hostfile (`host slots=N` per node) for the current SLURM "
                    "allocation, for `deepspeed --hostfile FILE dsfm/train.py ...`.")
    parser.add_argument("--out", help="file to write (default: hostfile-<SLURM_JOB_ID> in the "
                                      "current directory)")
    parser.add_argument("--slots", type=int, help="slots (GPUs) per node (default: "
                        "the first set of SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, the count "
                        "of SLURM_JOB_GPUS, SLURM_NTASKS_PER_NODE and SLURM_TASKS_PER_NODE "
                        "(per node; task counts of 1 on every node, one launcher per node, "
                        f"fall through), else {DEFAULT_SLOTS})")
    args = parser.parse_args(argv)

    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        print("error: not inside a SLURM allocation (SLURM_JOB_NODELIST is not set). Run this in "
              "an sbatch script or an salloc shell, or use a fixed hostfile such as "
              "hostfiles/raphael.", file=sys.stderr)
        return 2
    try:
        hosts = expand_nodelist(nodelist)
        if args.slots is not None:
            slots, source = args.slots, "--slots"
        else:
            slots, source = slots_from_env(env)
        lines = hostfile_lines(hosts, slots)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    job = env.get("SLURM_JOB_ID", "unknown")
    out = args.out or f"hostfile-{job}"
    header = [f"# DeepSpeed hostfile for SLURM job {job}: SLURM_JOB_NODELIST={nodelist}",
              f"# slots from {source}; written by python -m dsfm.runtime.slurm"]
    try:
        with open(out, "w") as f:
            f.write("\n".join(header + lines) + "\n")
    except OSError as e:
        print(f"error: cannot write the hostfile {out}: {e.strerror or e}; pass --out FILE, a "
              "file in an existing folder you can write to", file=sys.stderr)
        return 2
    if isinstance(slots, list) and len(set(slots)) == 1:
        slots = slots[0]
    shape = (f"{len(hosts)} hosts x {slots} slots" if isinstance(slots, int) else
             f"{len(hosts)} hosts, {sum(slots)} slots ({raw_counts(slots)})")
    print(f"wrote {shape} to {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
