"""What NCCL actually did, read back from its own logs.

A sweep profile asks for SHARP, a list of HCAs, an algorithm or a NIC policy through NCCL_*
variables; NCCL may quietly do something else (the CollNet plugin did not load, the HCA names
matched nothing, the algorithm was not eligible). Run the job with

    NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,ENV,GRAPH,NET,TUNING,COLL NCCL_DEBUG_FILE=dir/%h.%p.log

and `parse_logs` turns the per-rank files (or one shared stdout) into a `LogReport`: NCCL
version, communicators, network plugin and HCAs, GPUDirect RDMA, the echoed NCCL_* variables,
the CollNet state, the topology graphs and connections, and for every collective call the byte
size and the algorithm/protocol NCCL chose (per communicator when the logs hold several), and
where the ranks disagree (NCCL version, CUDA driver, network or net plugin, an echoed NCCL_*
value, the algorithm chosen for one size by communicators of one shape). `verify` compares a
profile's environment with the report and returns one readable line per request that did not
take effect, and per disagreement.

    python -m perf.nccl_log runs/sweep/sharp_on/ [--profile sharp_on] [--json]

The line formats follow NCCL's source (NVIDIA/nccl), which changed over releases; both forms
are read where they differ:
  - prefix (debug.cc): "host:pid:tid [cudaDev] NCCL INFO msg"; WARN adds "file:line" (and
    "(func)" in recent releases) before "NCCL WARN", after an empty line;
  - COLL (enqueue.cc, every rank): "AllReduce: opCount %lx sendbuff %p recvbuff %p count %zu
    datatype %d op %d root %d comm %p [nranks=%d] stream %p" (RCCL appends "task %d globalrank
    %d"); bytes = count x ncclTypeSize(datatype);
  - TUNING (enqueue.cc, rank 0 of each communicator only): the 2.28 source prints "AllReduce:
    1048576 Bytes -> Algo RING proto SIMPLE channel{Lo..Hi}={0..7}" (later sources append
    fields; the form dates from about 2.23); the 2.19-2.22 sources print "1048576 Bytes -> Algo
    1 proto 2 time 39.8" without the collective name, AllGather and ReduceScatter counting
    nranks x the per-rank bytes; before 2.19 the line is TRACE only and is not read. Unnamed
    lines are matched to the same process's COLL lines by size;
  - TUNING for collectives that bypass the algorithm/protocol model (2.27+), with the size but
    no "Algo .. proto ..": symmetric kernels (src/scheduler/symmetric_sched.cc, formerly
    enqueue.cc) "AllReduce [Symmetric]: 1048576 Bytes -> Kernel AllReduce_AGxLLMC_R nchannels
    16 nthreads 512 nWorks 1" (2.27 without nWorks, later sources append " cgaClusterSize %d"),
    and the copy-engine collectives (enqueue.cc) "AllGather [Copy Engine]: 1048576 Bytes ->
    cudaMemcpy; CE synchronization with NVLS" and "AllGather [Hierarchical CE]: 1048576 Bytes
    -> RMA proxy + CE". They are reported as the paths SYMMETRIC (protocol: the kernel),
    COPY_ENGINE and HIERARCHICAL_CE; a symmetric line of nWorks > 1 covers that many calls.

What a real 2.28.9 log showed (one H200, one rank, no InfiniBand; tests/perf/nccl_logs/
h200_1gpu_socket_nccl2.28.9.log, trimmed from the sweep's per-rank file):
  - COLL lines exactly as above, ending "[nranks=1] stream (nil)", opCount staying 0;
  - no TUNING line at all, although TUNING was in NCCL_DEBUG_SUBSYS: on a 1-rank communicator
    taskAppend (enqueue.cc) hands every collective to ncclLaunchOneRank, a cudaMemcpyAsync (or
    nothing, in place), before any algorithm or protocol is chosen. Such calls are reported
    with nranks 1 and no algorithm (`call_nranks`, `single_rank`), not as missing TUNING lines;
  - NCCL's own transports are NET plugins too: "NET/IB : No device found.", "NET/IB : Using
    [RO]; OOB eth0:..." (printed with no device), "Failed to initialize NET plugin IB",
    "NET/Socket : Using [0]eth0:...", "Initialized NET plugin Socket", "Assigned NET plugin
    Socket to comm", "Using network Socket" (`nets_failed`, `net_assigned`, `network`); a
    failed built-in IB or Socket says nothing about an external (CollNet) plugin;
  - "64 coll channels, 64 collnet channels, 0 nvls channels, ...": recent init.cc (2.28
    included) prints the coll channel count twice, so the collnet figure says nothing about
    CollNet (older releases printed comm->collNetChannels);
  - no "set by environment" echo when no NCCL_* parameter is set (NCCL_DEBUG* are not echoed),
    and with one rank no "Channel .. via" connection and no "Connected all rings/trees" line;
    the ring/tree lines are "Channel 00/64 : 0", "Ring 00 : 0 -> 0 -> 0", "Tree 0 : -1 -> 0 ->
    -1/-1/-1" and one "Trees [0] -1/-1/-1->0->-1 [1] ..." line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field

from dsfm.helpfmt import HelpFormatter

# ncclDataType_t (nccl.h.in): value -> (name, bytes); the fp8 types 10-11 came with NCCL 2.24.
DATATYPES = {
    0: ("ncclInt8", 1), 1: ("ncclUint8", 1), 2: ("ncclInt32", 4), 3: ("ncclUint32", 4),
    4: ("ncclInt64", 8), 5: ("ncclUint64", 8), 6: ("ncclFloat16", 2), 7: ("ncclFloat32", 4),
    8: ("ncclFloat64", 8), 9: ("ncclBfloat16", 2), 10: ("ncclFloat8e4m3", 1),
    11: ("ncclFloat8e5m2", 1),
}
# NCCL_ALGO_* indices (src/include/plugin/nccl_tuner.h, formerly device.h/nccl_common.h) with
# the names ncclAlgoToString() prints (index order unchanged since CollNet split in two; PAT
# was appended last).
ALGORITHMS = ("TREE", "RING", "COLLNET_DIRECT", "COLLNET_CHAIN", "NVLS", "NVLS_TREE", "PAT")
PROTOCOLS = ("LL", "LL128", "SIMPLE")  # NCCL_PROTO_LL=0, LL128=1, SIMPLE=2
# Names NCCL_ALGO / NCCL_PROTO accept (ncclAlgoStr / ncclProtoStr, case-insensitive); "collnet"
# is the single CollNet algorithm of releases before 2.14.
_ALGO_NAMES = {"tree": {"TREE"}, "ring": {"RING"}, "collnetdirect": {"COLLNET_DIRECT"},
               "collnetchain": {"COLLNET_CHAIN"}, "nvls": {"NVLS"}, "nvlstree": {"NVLS_TREE"},
               "pat": {"PAT"}, "collnet": {"COLLNET_DIRECT", "COLLNET_CHAIN"}}
_PROTO_NAMES = {"ll": {"LL"}, "ll128": {"LL128"}, "simple": {"SIMPLE"}}
# NCCL_TOPO_PATTERN_* (src/include/graph.h)
PATTERNS = {1: "BALANCED_TREE", 2: "SPLIT_TREE", 3: "TREE", 4: "RING", 5: "NVLS",
            6: "COLLNET_DIRECT"}

_PREFIX = re.compile(r"(?P<host>[\w.\-]+):(?P<pid>\d+):(?P<tid>\d+) \[(?P<dev>\d+)\] "
                     r"(?:(?P<src>\S+:\d+)(?: \([^)]*\))? )?"
                     r"NCCL (?P<level>INFO|WARN) ?(?P<msg>.*)$")
_BARE = re.compile(r"(?:^|[\s\]>:])NCCL (?P<level>INFO|WARN) (?P<msg>.*)$")
_VERSION = re.compile(r"NCCL version (?P<v>\d+\.\d+\.\d+\S*)")
_COLL = re.compile(r"^(?P<func>[A-Za-z]+): opCount [0-9a-fA-F]+ sendbuff \S+ recvbuff \S+ "
                   r"count (?P<count>\d+) datatype (?P<dtype>\d+) op \d+ root -?\d+ "
                   r"comm (?P<comm>\S+) \[nranks=(?P<nranks>\d+)\]")
_COLL_START = re.compile(r"^[A-Za-z]+: opCount")
_TUNE_NAMED = re.compile(r"^(?:(?P<func>[A-Za-z]+): )?(?P<bytes>\d+) Bytes -> Algo "
                         r"(?P<algo>[A-Za-z][A-Za-z_]*) proto (?P<proto>[A-Za-z][A-Za-z0-9_]*)")
_TUNE_NUMERIC = re.compile(r"^(?:(?P<func>[A-Za-z]+): )?(?P<bytes>\d+) Bytes -> Algo "
                           r"(?P<algo>\d+) proto (?P<proto>\d+)")
_TUNE_START = re.compile(r"^(?:[A-Za-z]+: )?\d+ Bytes\b")
# "%s [Symmetric]: %ld Bytes -> Kernel %s ...", "%s [Copy Engine]: %ld Bytes -> cudaMemcpy%s",
# "%s [Hierarchical CE]: %ld Bytes -> RMA proxy + CE" (module docstring)
_TUNE_TAGGED = re.compile(r"^(?P<func>[A-Za-z]+) \[(?P<tag>[A-Za-z][^\]]*)\]: (?P<bytes>\d+) "
                          r"Bytes -> (?P<what>.*)$")
_TAGGED_START = re.compile(r"^[A-Za-z]+ \[[A-Za-z][^\]]*\]: \d+ Bytes\b")
_SYM_KERNEL = re.compile(r"^Kernel (?P<kernel>\w+) nchannels \d+ nthreads \d+"
                         r"(?: nWorks (?P<works>\d+))?")
# the paths of tagged TUNING lines: no NCCL_ALGO name, no protocol
ENGINE_PATHS = {"Symmetric": "SYMMETRIC", "Copy Engine": "COPY_ENGINE",
                "Hierarchical CE": "HIERARCHICAL_CE"}
_DRIVER = re.compile(r"cudaDriverVersion (?P<v>\d+)\s*$")
_ENV = re.compile(r"^(?P<name>NCCL_[A-Z0-9_]+) set (?:by environment )?to (?P<value>.*?)\s*$")
_COMM_INFO = re.compile(r"^comm (?P<comm>\S+) rank (?P<rank>\d+) nRanks (?P<nranks>\d+) "
                        r"nNodes (?P<nnodes>\d+) localRanks (?P<local>\d+)")
_COMM_INIT = re.compile(r"(?:^|\s)comm (?P<comm>\S+) rank (?P<rank>\d+) nranks (?P<nranks>\d+)"
                        r".* - Init (?P<phase>START|COMPLETE)")
_COMM_ID = re.compile(r"commId (0x[0-9a-fA-F]+)")
# init.cc: "comm %p rank %d nranks %d cudaDev %d busId %lx - Destroy COMPLETE"
_COMM_DESTROY = re.compile(r"(?:^|\s)comm (?P<comm>\S+) rank \d+ nranks \d+ .*- Destroy COMPLETE")
_NET_IB = re.compile(r"^NET/IB ?: Using(?P<devs>.*?)(?:; OOB \S+)?$")
_HCA = re.compile(r"\[\d+\] ?(?P<name>[\w.\-]+):(?P<port>\d+)/(?P<link>IB|RoCE)")
_GDR = re.compile(r"^NET/\S+ ?: GPU Direct RDMA (?P<state>Enabled|Disabled) for HCA \d+ ")
_CHAN_NET = re.compile(r"^Channel \d+(?:/\d+)? : \d+\[\w+\] -> \d+\[\w+\] \[(?:send|receive)\] "
                       r"via NET/(?P<net>[^/]+?)/\d+(?:\(\d+\))?(?P<flags>\S*)")
_CHAN_LOCAL = re.compile(r"^Channel \d+(?:/\d+)? : \d+\[\w+\] -> \d+\[\w+\] via "
                         r"(?P<kind>P2P|SHM)/(?P<how>[A-Za-z]+)")
_CHAN_COLLNET = re.compile(r"^Coll(?:Net)? \d+(?:/\d+)? : \d+ \[(?:send|receive)\] via "
                           r"COLLNET/(?P<net>[^/\s]+)/\d+")
_RING = re.compile(r"^Channel (?P<c>\d+)/(?P<n>\d+) :(?P<ranks>(?: +-?\d+)+) *$")
_GRAPH = re.compile(r"^Pattern (?P<pattern>\d+), crossNic (?P<cross>\d+), nChannels (?P<nch>\d+)"
                    r"(?:, (?:bw|speed) (?P<bwi>\d+(?:\.\d+)?)/(?P<bwe>\d+(?:\.\d+)?), type "
                    r"(?P<ti>\w+)/(?P<te>\w+))?")
_CHANNELS = re.compile(r"(?P<coll>\d+) coll channels, (?:(?P<collnet>\d+) collnet channels, )?"
                       r"(?:(?P<nvls>\d+) nvls channels, )?(?P<p2p>\d+) p2p channels")
# the name may hold spaces: "Loaded net plugin NCCL RDMA Plugin v8 (v8)" (HPC-X's plugin)
_PLUGIN_NET = re.compile(r"^NET/Plugin ?: Loaded net plugin (?P<name>.+?)(?: \(v\d+\))?\s*$")
_PLUGIN_COLL = re.compile(r"^NET/Plugin ?: Loaded coll(?:net)? plugin (?P<name>.+?)"
                          r"(?: \(v\d+\))?\s*$")
# 2.2x+: every NET plugin, NCCL's own IB and Socket included, is initialised and assigned by name
_NET_INIT = re.compile(r"^(?P<what>Initialized|Failed to initialize) NET plugin (?P<name>.+?)\s*$")
_NET_ASSIGNED = re.compile(r"^Assigned NET plugin (?P<name>.+?) to comm")
INTERNAL_NETS = ("IB", "Socket")   # ncclNetIb.name, ncclNetSocket.name
_PLUGIN_FAIL = re.compile(r"^(?:NET/Plugin ?: (?!Loaded|Plugin name set|Closing|Failed to find "
                          r"ncclNetPlugin_v)|Failed to initialize NET plugin|External network "
                          r"plugin .* is unsupported)")
_SHARP_INIT = re.compile(r"SHARP rank \d+/\d+ initialized")
# printed once NCCL's cross-rank CollNet check passed ("Connected Collnet Chains" in 2.23+); the
# COLLNET connection lines and the SHARP plugin's "initialized" come before that check
_COLLNET_SETUP = re.compile(r"^(?:(?:Connected )?Collnet Chains|Connected collnet|rank \d+ "
                            r"Connected CollNet)", re.IGNORECASE)
_NVLS = re.compile(r"^NVLS multicast support is (?P<not>not )?available")
# NCCL's and the SHARP plugin's ways of saying CollNet could not be set up
_COLLNET_FAIL = re.compile(r"Cannot initialize CollNet|CollNet is not supported|SHARP coll init "
                           r"error|SHARP group create|^SHARP: (?:Group size|Set to disable)")

_PENDING_WINDOW = 512   # unmatched COLL lines a TUNING line is looked up among (per process)
_PENDING_MAX = 4096     # oldest unmatched COLL lines are dropped beyond this (ranks != 0)


@dataclass
class CollNet:
    """CollNet (SHARP) as NCCL reported it. `requested` is NCCL's echo of NCCL_COLLNET_ENABLE:
    releases up to 2.22 echo it only when a CollNet plugin is present."""
    requested: bool | None = None
    plugin_loaded: bool = False
    initialized: bool = False
    reason: str | None = None
    plugin: str | None = None


@dataclass
class Graph:
    """One "Pattern %d, crossNic %d, nChannels %d, bw %f/%f, type %s/%s" line (graph/search.cc)."""
    pattern: int
    cross_nic: int
    n_channels: int
    bw_intra: float | None = None
    bw_inter: float | None = None
    type_intra: str | None = None
    type_inter: str | None = None

    @property
    def name(self) -> str:
        return PATTERNS.get(self.pattern, f"pattern {self.pattern}")


@dataclass
class Communicator:
    comm: str
    host: str
    pid: int
    rank: int | None = None
    nranks: int | None = None
    nnodes: int | None = None
    local_ranks: int | None = None
    comm_id: str | None = None
    complete: bool = False


@dataclass
class CommPath:
    """What one communicator did: its calls, and the algorithm/protocol NCCL chose for them
    (TUNING lines come from a communicator's rank 0 only, matched to its COLL lines there)."""
    comm_id: str | None                 # commId of its Init lines (None: not logged, or 0x0)
    comm: str | None                    # its address in the rank 0 process (None: unknown)
    rank0: str                          # host:pid of its rank 0, or of the ranks logged
    nranks: int | None = None
    nnodes: int | None = None
    local_ranks: int | None = None
    rank0_logged: bool = True           # False: only other ranks' lines (no TUNING to expect)
    calls: dict[tuple[str, int], int] = field(default_factory=dict)
    choices: dict[tuple[str, int], Counter] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return (f"commId {self.comm_id}" if self.comm_id else
                f"comm {self.comm} of {self.rank0}" if self.comm else
                f"calls not matched to a communicator on {self.rank0}")

    @property
    def label(self) -> str:
        name = self.name
        shape = ", ".join(p for p in (
            f"{self.nranks} rank(s)" if self.nranks else "",
            f"{self.nnodes} node(s)" if self.nnodes else "",
            "" if self.rank0_logged else "rank 0 not in these logs") if p)
        return f"{name} ({shape})" if shape else name


@dataclass
class _Record:
    """One process's lines about one communicator (a communicator address may be reused after
    a destroy: a new Init START begins a new record)."""
    proc: tuple
    ptr: str | None
    comm: Communicator | None = None
    nranks: int | None = None
    calls: Counter = field(default_factory=Counter)
    choices: dict = field(default_factory=lambda: defaultdict(Counter))


@dataclass
class LogReport:
    sources: list[str] = field(default_factory=list)
    nccl_lines: int = 0
    processes: int = 0
    version: str | None = None
    cuda_driver: str | None = None      # "cudaDriverVersion %d" (12040 = 12.4), every process
    network: str | None = None          # "Using network %s": IB, Socket, IBext_v8, ...
    net_plugin: str | None = None       # external net plugin that loaded
    nets_failed: list[str] = field(default_factory=list)  # "Failed to initialize NET plugin %s"
    net_assigned: str | None = None     # "Assigned NET plugin %s to comm" (2.2x+)
    transports: list[str] = field(default_factory=list)  # NET/IB, NET/Socket, P2P/CUMEM, ...
    hcas: list[str] = field(default_factory=list)        # "mlx5_0:1/IB" from NET/IB : Using
    merged_nics: bool = False           # NET/IB listed a merged device "[0]={...}"
    ib_missing: bool = False            # "NET/IB : No device found."
    gdr: bool | None = None             # GPUDirect RDMA on the network connections
    env: dict[str, str] = field(default_factory=dict)
    collnet: CollNet = field(default_factory=CollNet)
    graphs: list[Graph] = field(default_factory=list)
    rings: dict[int, list[int]] = field(default_factory=dict)
    trees: int = 0                      # "Trees [0] ..." lines
    channels: dict[str, int] = field(default_factory=dict)
    rings_connected: bool = False
    trees_connected: bool = False
    nvls_connected: bool = False
    nvls_available: bool | None = None
    communicators: list[Communicator] = field(default_factory=list)
    # per communicator (calls and choices); `calls` and `choices` below are all of them together
    comm_paths: list[CommPath] = field(default_factory=list)
    calls: dict[tuple[str, int], int] = field(default_factory=dict)
    # the communicator size of the COLL lines per (collective, bytes), the largest seen
    call_nranks: dict[tuple[str, int], int] = field(default_factory=dict)
    choices: dict[tuple[str, int], Counter] = field(default_factory=dict)
    nccl_warnings: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # where the ranks disagree (version, network, algorithm for a size): verify() flags them
    mismatches: list[str] = field(default_factory=list)

    @property
    def nnodes(self) -> int | None:
        counts = [c.nnodes for c in self.communicators if c.nnodes is not None]
        return max(counts) if counts else None

    @property
    def single_rank(self) -> bool:
        """Every collective ran on a 1-rank communicator: NCCL chose no algorithm for any."""
        return bool(self.call_nranks) and max(self.call_nranks.values()) == 1

    @property
    def algorithms(self) -> Counter:
        """Calls per algorithm over every collective that has a TUNING line."""
        total: Counter = Counter()
        for counter in self.choices.values():
            for (algo, _), n in counter.items():
                total[algo] += n
        return total

    def summary_rows(self) -> list[tuple[str, int, str, str, int]]:
        """(collective, bytes, algorithm, protocol, calls) over all communicators; "-" where no
        TUNING line said."""
        return _rows(self.calls, self.choices)

    def to_dict(self) -> dict:
        return {
            "sources": self.sources, "nccl_lines": self.nccl_lines, "processes": self.processes,
            "version": self.version, "cuda_driver": self.cuda_driver, "network": self.network,
            "net_plugin": self.net_plugin,
            "nets_failed": self.nets_failed, "net_assigned": self.net_assigned,
            "transports": self.transports, "hcas": self.hcas, "merged_nics": self.merged_nics,
            "ib_missing": self.ib_missing, "gdr": self.gdr, "env": self.env,
            "collnet": vars(self.collnet),
            "graphs": [dict(vars(g), name=g.name) for g in self.graphs],
            "rings": {str(k): v for k, v in sorted(self.rings.items())}, "trees": self.trees,
            "channels": self.channels, "rings_connected": self.rings_connected,
            "trees_connected": self.trees_connected, "nvls_connected": self.nvls_connected,
            "nvls_available": self.nvls_available, "nnodes": self.nnodes,
            "communicators": [vars(c) for c in self.communicators],
            "collectives": [{"collective": f, "bytes": b, "algorithm": a, "protocol": p,
                             "count": n, "nranks": self.call_nranks.get((f, b))}
                            for f, b, a, p, n in self.summary_rows()],
            "communicator_paths": [
                {"label": c.label, "comm_id": c.comm_id, "comm": c.comm, "rank0": c.rank0,
                 "nranks": c.nranks, "nnodes": c.nnodes, "local_ranks": c.local_ranks,
                 "rank0_logged": c.rank0_logged,
                 "collectives": [{"collective": f, "bytes": b, "algorithm": a, "protocol": p,
                                  "count": n} for f, b, a, p, n in _rows(c.calls, c.choices)]}
                for c in self.comm_paths],
            "nccl_warnings": self.nccl_warnings, "warnings": self.warnings,
            "mismatches": self.mismatches,
        }


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _rows(calls: dict, choices: dict) -> list[tuple[str, int, str, str, int]]:
    rows = []
    for key in sorted(set(calls) | set(choices)):
        chosen = choices.get(key)
        if chosen:
            for (algo, proto), n in sorted(chosen.items()):
                rows.append((key[0], key[1], algo, proto, n))
        else:
            rows.append((key[0], key[1], "-", "-", calls[key]))
    return rows


def _busiest(counts) -> dict[tuple[str, int], int]:
    """Calls per (collective, bytes) over several processes' or records' counts: every rank
    makes the same calls, so the busiest one counts them."""
    out: Counter = Counter()
    for per in counts:
        for key, n in per.items():
            out[key] = max(out[key], n)
    return dict(out)


def _together(choices) -> dict[tuple[str, int], Counter]:
    """Several records' TUNING choices per (collective, bytes), added up."""
    out: dict = defaultdict(Counter)
    for per in choices:
        for key, counter in per.items():
            out[key].update(counter)
    return dict(out)


def _canon_algo(name: str) -> str:
    if name.isdigit():
        i = int(name)
        return ALGORITHMS[i] if i < len(ALGORITHMS) else f"ALGO{i}"
    key = name.replace("_", "").lower()
    names = _ALGO_NAMES.get(key)
    return next(iter(names)) if names and len(names) == 1 else name.upper()


def _canon_proto(name: str) -> str:
    if name.isdigit():
        i = int(name)
        return PROTOCOLS[i] if i < len(PROTOCOLS) else f"PROTO{i}"
    return name.upper()


class _Parser:
    """Accumulates one LogReport over any number of sources; per-process state is keyed by
    (source, host, pid, cudaDev) so interleaved ranks in one file stay apart."""

    def __init__(self):
        self.r = LogReport()
        self.processes: set = set()
        self.transports: set = set()
        self.hcas: dict[str, None] = {}
        self.env_seen: dict[str, dict[tuple, str]] = defaultdict(dict)  # name -> proc -> value
        self.comms: dict[tuple, Communicator] = {}
        self.retired: list[Communicator] = []    # destroyed, their address reused
        self.versions: dict[tuple, str] = {}      # per process: "NCCL version %s"
        self.drivers: dict[tuple, str] = {}       # "cudaDriverVersion %d", every process
        self.networks: dict[tuple, str] = {}      # "Using network %s"
        self.plugins: dict[tuple, str] = {}       # the external net plugin that loaded
        self.records: dict[tuple, _Record] = {}   # (proc, address) -> current record
        self.all_records: list[_Record] = []
        self.pending: dict[tuple, deque] = defaultdict(deque)
        self.calls: dict[tuple, Counter] = defaultdict(Counter)
        self.call_nranks: dict[tuple, int] = {}
        self.nets_failed: dict[str, None] = {}
        self.graphs: dict[tuple, Graph] = {}
        self.gdr = {"channel": Counter(), "hca": Counter()}  # evidence -> {True: n, False: n}
        self.truncated = Counter()
        self.unknown_dtypes: set = set()
        self.collnet_setup = False        # CollNet connections or SHARP init were logged
        self.collnet_connected = False    # ... and a line after NCCL's check of them
        self.collnet_open: set = set()    # processes whose CollNet setup no COMPLETE followed
        self.collnet_completed = False    # a communicator finished initialising after one
        self.collnet_failed: list[str] = []
        self.plugin_failure: str | None = None
        self.collnet_symbol_missing = False
        self.warn_seen: set = set()
        self.skipped: list[str] = []      # files of a directory that held no NCCL line

    # ------------------------------------------------------------------ lines
    def feed(self, source: str, lines, optional: bool = False) -> None:
        """`optional`: a file found in a directory, listed as a source only if it holds NCCL
        lines (a sweep's job folder also holds the launcher log and the ranks' results)."""
        before = self.r.nccl_lines
        self._feed(source, lines)
        if not optional or self.r.nccl_lines > before:
            self.r.sources.append(source)
        else:
            self.skipped.append(source)

    def _feed(self, source: str, lines) -> None:
        for raw in lines:
            line = raw.rstrip("\r\n")
            if not line or line.startswith("#"):
                continue
            m = _PREFIX.search(line)
            if m:
                proc = (source, m["host"], int(m["pid"]), int(m["dev"]))
                host, pid, level, msg = m["host"], int(m["pid"]), m["level"], m["msg"]
            else:
                m = _BARE.search(line)
                if not m:
                    v = _VERSION.search(line)   # VERSION level prints the bare version string
                    if v and self.r.version is None:
                        self.r.version = v["v"]
                    continue
                proc = (source, "?", 0, 0)
                host, pid, level, msg = "?", 0, m["level"], m["msg"]
            self.r.nccl_lines += 1
            self.processes.add(proc)
            if level == "WARN":
                self._warn(host, msg.strip())
            else:
                self._info(proc, host, pid, msg.strip())

    def _warn(self, host: str, msg: str) -> None:
        if msg not in self.warn_seen:
            self.warn_seen.add(msg)
            self.r.nccl_warnings.append(f"{host}: {msg}")
        self._collnet_failure(msg)

    def _collnet_failure(self, msg: str) -> None:
        if _COLLNET_FAIL.search(msg) and msg not in self.collnet_failed:
            self.collnet_failed.append(msg)

    def _info(self, proc, host: str, pid: int, msg: str) -> None:
        if _COLL_START.match(msg):
            m = _COLL.match(msg)
            if m:
                self._coll(proc, m)
            else:
                self.truncated["COLL"] += 1
        elif _TUNE_START.match(msg):
            m = _TUNE_NAMED.match(msg) or _TUNE_NUMERIC.match(msg)
            if m:
                named = not m["algo"].isdigit()
                self._tuning(proc, m["func"], int(m["bytes"]), named,
                             (_canon_algo(m["algo"]), _canon_proto(m["proto"])))
            else:
                self.truncated["TUNING"] += 1
        elif _TAGGED_START.match(msg):
            self._tagged(proc, msg)
        else:
            self._collnet_failure(msg)
            self._init_line(proc, host, pid, msg)

    def _coll(self, proc, m) -> None:
        func, dtype, count = m["func"], int(m["dtype"]), int(m["count"])
        if dtype not in DATATYPES:
            self.unknown_dtypes.add(dtype)
            return
        nbytes, nranks = count * DATATYPES[dtype][1], int(m["nranks"])
        self.calls[proc][(func, nbytes)] += 1
        rec = self._record(proc, m["comm"], nranks)
        rec.calls[(func, nbytes)] += 1
        self.call_nranks[(func, nbytes)] = max(self.call_nranks.get((func, nbytes), 0), nranks)
        # TUNING lines come from rank 0 of a communicator only, and none for 1 rank: a call on
        # a communicator where this process is another rank (the world, when it is rank 0 of a
        # split) is never matched, and must not take a TUNING line of another communicator
        comm = self.comms.get((proc, m["comm"]))
        on_rank0 = comm is None or comm.rank in (None, 0)
        if func not in ("Send", "Recv") and nranks > 1 and on_rank0:
            pend = self.pending[proc]
            pend.append((func, nbytes, nranks, rec))
            if len(pend) > _PENDING_MAX:
                pend.popleft()

    def _tagged(self, proc, msg: str) -> None:
        """A TUNING line of a symmetric kernel or a copy-engine collective (module docstring)."""
        m = _TUNE_TAGGED.match(msg)
        path = ENGINE_PATHS.get(m["tag"].strip(), m["tag"].strip().upper().replace(" ", "_")) \
            if m else None
        works, proto = 1, ""
        if path == "SYMMETRIC":
            k = _SYM_KERNEL.match(m["what"])
            if not k:
                m = None
            else:
                # "AllReduce_AGxLLMC_R": the variant after the collective's name, as NCCL's
                # profiler shows it
                proto = k["kernel"].removeprefix(m["func"] + "_")
                works = int(k["works"] or 1)
        if not m:
            self.truncated["TUNING"] += 1
            return
        func, nbytes = m["func"], int(m["bytes"])
        if works > 1:
            # one kernel for `works` calls of one group: their sizes add up to the line's
            taken = self._take_group(proc, func, nbytes, works)
            if taken:
                for pbytes, rec in taken:
                    rec.choices[(func, pbytes)][(path, proto)] += 1
                return
        self._tuning(proc, func, nbytes, True, (path, proto))

    def _take_group(self, proc, func: str, nbytes: int, works: int) -> list[tuple]:
        """(size, record) of this process's first `works` pending calls of `func`, taken off
        the pending list, if they add up to `nbytes`; else nothing is taken."""
        pend = self.pending[proc]
        found = [i for i, entry in enumerate(pend)
                 if i < _PENDING_WINDOW and entry[0] == func][:works]
        if len(found) < works or sum(pend[i][1] for i in found) != nbytes:
            return []
        sizes = [(pend[i][1], pend[i][3]) for i in found]
        for i in reversed(found):
            del pend[i]
        return sizes

    def _tuning(self, proc, func: str | None, nbytes: int, named: bool, choice: tuple) -> None:
        pend = self.pending[proc]
        rec = None
        for i, (pfunc, pbytes, nranks, prec) in enumerate(pend):
            if i >= _PENDING_WINDOW:
                break
            if func is not None and pfunc != func:
                continue
            scaled = pfunc in ("AllGather", "ReduceScatter") and nbytes == pbytes * nranks
            if nbytes == pbytes or (not named and scaled):
                del pend[i]
                func, nbytes, rec = pfunc, pbytes, prec
                break
        key = (func or "?", nbytes)
        # a line matched to no COLL line: of this process, on a communicator unknown
        (rec or self._record(proc, None, None)).choices[key][choice] += 1

    def _init_line(self, proc, host: str, pid: int, msg: str) -> None:
        if m := _VERSION.match(msg):
            self.versions.setdefault(proc, m["v"])
            self.r.version = self.r.version or m["v"]
        elif m := _ENV.match(msg):
            value = m["value"]
            if re.fullmatch(r"-?\d+\.", value):
                value = value[:-1]
            self.r.env.setdefault(m["name"], value)
            self.env_seen[m["name"]].setdefault(proc, value)
        elif m := _DRIVER.match(msg):
            self.drivers.setdefault(proc, m["v"])
        elif msg.startswith("Using network "):
            self.r.network = msg[len("Using network "):].strip()   # "AWS Libfabric"
            self.networks[proc] = self.r.network
        elif m := _PLUGIN_NET.match(msg):
            self.r.net_plugin = self.plugins[proc] = m["name"]
        elif m := _PLUGIN_COLL.match(msg):
            self.r.collnet.plugin_loaded = True
            self.r.collnet.plugin = m["name"]
        elif msg.startswith("NET/Plugin") and "ncclCollNetPlugin" in msg:
            self.collnet_symbol_missing = True
        elif msg.startswith("Successfully loaded external network plugin"):
            self.r.net_plugin = self.r.net_plugin or msg.split()[-1]
            self.plugins.setdefault(proc, msg.split()[-1])
        elif m := _NET_INIT.match(msg):
            # NCCL's own IB or Socket failing says nothing about an external (CollNet) plugin
            if m["what"] == "Failed to initialize":
                self.nets_failed.setdefault(m["name"])
                if m["name"] not in INTERNAL_NETS and self.plugin_failure is None:
                    self.plugin_failure = msg
        elif m := _NET_ASSIGNED.match(msg):
            self.r.net_assigned = m["name"]
        elif _PLUGIN_FAIL.match(msg):
            if self.plugin_failure is None or "Using internal" in self.plugin_failure:
                self.plugin_failure = msg
        elif m := _NET_IB.match(msg):
            devs = m["devs"]
            self.r.merged_nics |= "={" in devs
            for h in _HCA.finditer(devs):
                self.hcas.setdefault(f"{h['name']}:{h['port']}/{h['link']}")
        elif msg.startswith("NET/IB : No device found"):
            self.r.ib_missing = True
        elif m := _GDR.match(msg):
            self.gdr["hca"][m["state"] == "Enabled"] += 1
        elif m := _CHAN_NET.match(msg):
            self.transports.add(f"NET/{m['net']}")
            self.gdr["channel"]["/GDRDMA" in m["flags"]] += 1
        elif m := _CHAN_LOCAL.match(msg):
            self.transports.add(f"{m['kind']}/{m['how']}")
        elif m := _CHAN_COLLNET.match(msg):
            self.transports.add(f"COLLNET/{m['net']}")
            self.collnet_setup = True
            self.collnet_open.add(proc)
        elif m := _RING.match(msg):
            self.r.rings.setdefault(int(m["c"]), [int(v) for v in m["ranks"].split()])
        elif msg.startswith("Trees "):
            self.r.trees += 1
        elif m := _GRAPH.match(msg):
            g = Graph(int(m["pattern"]), int(m["cross"]), int(m["nch"]),
                      float(m["bwi"]) if m["bwi"] else None, float(m["bwe"]) if m["bwe"] else None,
                      m["ti"], m["te"])
            self.graphs.setdefault((g.pattern, g.cross_nic, g.n_channels, g.bw_intra,
                                    g.bw_inter, g.type_intra, g.type_inter), g)
        elif msg.startswith("Connected all rings"):
            self.r.rings_connected = True
        elif msg.startswith("Connected all trees"):
            self.r.trees_connected = True
        elif msg.startswith("Connected NVLS"):
            self.r.nvls_connected = True
        elif _COLLNET_SETUP.match(msg):
            self.collnet_setup = self.collnet_connected = True
        elif _SHARP_INIT.search(msg):
            self.collnet_setup = True
            self.collnet_open.add(proc)
        elif m := _NVLS.match(msg):
            available = not m["not"]
            self.r.nvls_available = bool(self.r.nvls_available) or available
        elif m := _CHANNELS.search(msg):
            for k in ("coll", "collnet", "nvls", "p2p"):
                if m[k] is not None:
                    self.r.channels[k] = max(self.r.channels.get(k, 0), int(m[k]))
        elif m := _COMM_INFO.match(msg):
            c = self._comm(proc, host, pid, m["comm"])
            c.rank, c.nranks = int(m["rank"]), int(m["nranks"])
            c.nnodes, c.local_ranks = int(m["nnodes"]), int(m["local"])
        elif (m := _COMM_INIT.search(msg)) is not None:
            old = self.comms.get((proc, m["comm"]))
            if old is not None and old.complete and m["phase"] == "START":
                # the address of a destroyed communicator, reused by a new one
                self._retire(proc, m["comm"])
            c = self._comm(proc, host, pid, m["comm"])
            c.rank, c.nranks = int(m["rank"]), int(m["nranks"])
            if idm := _COMM_ID.search(msg):
                c.comm_id = idm[1]
            c.complete |= m["phase"] == "COMPLETE"
            if m["phase"] == "COMPLETE" and proc in self.collnet_open:
                self.collnet_open.discard(proc)
                self.collnet_completed = True
        elif m := _COMM_DESTROY.search(msg):
            self._retire(proc, m["comm"])

    def _comm(self, proc, host: str, pid: int, comm: str) -> Communicator:
        key = (proc, comm)
        if key not in self.comms:
            self.comms[key] = Communicator(comm=comm, host=host, pid=pid)
        return self.comms[key]

    def _retire(self, proc, ptr: str) -> None:
        """A destroyed communicator: a later one at its address is another."""
        if (proc, ptr) in self.comms:
            self.retired.append(self.comms.pop((proc, ptr)))
        self.records.pop((proc, ptr), None)

    def _record(self, proc, ptr: str | None, nranks: int | None) -> _Record:
        comm = self.comms.get((proc, ptr)) if ptr else None
        rec = self.records.get((proc, ptr))
        if rec is not None and rec.comm is None:
            rec.comm = comm                 # its Init lines came after its first call
        if rec is None or (comm is not None and rec.comm is not comm):
            rec = self.records[(proc, ptr)] = _Record(proc, ptr, comm)
            self.all_records.append(rec)
        rec.nranks = nranks or rec.nranks
        return rec

    def _comm_paths(self) -> list[CommPath]:
        """One CommPath per communicator: the records of its ranks joined by commId (where
        logged and not 0), else one per record. A communicator whose rank 0 is absent from the
        logs (another rank's file only) is listed only if its commId is known."""
        groups: dict = {}
        for rec in self.all_records:
            cid = rec.comm.comm_id if rec.comm is not None else None
            if cid is not None and int(cid, 16) == 0:
                cid = None
            groups.setdefault(("id", cid) if cid else ("rec", id(rec)), []).append(rec)
        paths = []
        for (kind, ident), recs in groups.items():
            cid = ident if kind == "id" else None
            rank0 = [r for r in recs if r.choices or r.ptr is None or r.nranks == 1
                     or (r.comm is not None and r.comm.rank == 0)]
            if not rank0 and kind == "rec":
                continue
            first = (rank0 or recs)[0]
            comms = [r.comm for r in recs if r.comm is not None]
            paths.append(CommPath(
                comm_id=cid, comm=first.ptr, rank0=f"{first.proc[1]}:{first.proc[2]}",
                nranks=next((c.nranks for c in comms if c.nranks), None) or first.nranks,
                nnodes=next((c.nnodes for c in comms if c.nnodes), None),
                local_ranks=next((c.local_ranks for c in comms if c.local_ranks), None),
                rank0_logged=bool(rank0), calls=_busiest(r.calls for r in recs),
                choices=_together(r.choices for r in rank0)))
        return sorted(paths, key=lambda c: (c.comm_id is None, c.comm_id or "", c.rank0,
                                            c.comm or ""))

    def _mismatches(self) -> list[str]:
        """Where the ranks disagree: NCCL version (printed by a communicator's rank 0), CUDA
        driver, network, net plugin or an echoed NCCL_* value per process; and the
        algorithm/protocol chosen for the same size by communicators of the same shape (ranks and
        nodes: the data-parallel groups of a job, the splits of its nodes), which differ only
        when the ranks' settings or machines do; a size for which one communicator itself chose
        two ways (grouped calls are tuned together) is left out."""
        out = []
        for what, per_proc in (("NCCL version", self.versions), ("CUDA driver", self.drivers),
                               ("network", self.networks), ("net plugin", self.plugins),
                               *sorted(self.env_seen.items())):
            where: dict[str, list[str]] = defaultdict(list)
            for proc, value in per_proc.items():
                if f"{proc[1]}:{proc[2]}" not in where[value]:
                    where[value].append(f"{proc[1]}:{proc[2]}")
            if len(where) > 1:
                out.append(f"{what} differs between processes: " + "; ".join(
                    f"{v} on {_few(hosts)}" for v, hosts in sorted(where.items())))
        shapes: dict[tuple, list[CommPath]] = defaultdict(list)
        for c in self.r.comm_paths:
            if c.choices and c.nranks and c.nnodes:
                shapes[(c.nranks, c.nnodes)].append(c)
        for (nranks, nnodes), comms in sorted(shapes.items()):
            differ: dict[str, list[int]] = defaultdict(list)
            for key in sorted({k for c in comms for k in c.choices}):
                # a communicator that chose two ways for one size (calls grouped with others
                # are tuned together) says nothing about the others
                steady = {next(iter(c.choices[key])) for c in comms
                          if len(c.choices.get(key, ())) == 1}
                if len(steady) > 1:
                    differ[key[0]].append(key[1])
            for func, sizes in sorted(differ.items()):
                out.append(
                    f"{func} on the communicators of {nranks} rank(s) on {nnodes} node(s) chose "
                    "differently for the same size: " + "; ".join(
                        f"{_size(b)}: " + ", ".join(
                            f"{_choice_label(c.choices[(func, b)], None)} on {c.name}"
                            for c in comms if (func, b) in c.choices) for b in sizes[:3])
                    + (f"; and {len(sizes) - 3} more size(s)" if len(sizes) > 3 else ""))
        return out

    def _note(self, text: str) -> None:
        if text not in self.r.warnings:
            self.r.warnings.append(text)

    # ------------------------------------------------------------------ result
    def finish(self) -> LogReport:
        r = self.r
        if not r.sources:
            r.sources = self.skipped
        r.processes = len(self.processes)
        r.transports = sorted(self.transports)
        r.hcas = list(self.hcas)
        # the connections say whether GDR was used; the per-HCA lines only whether it could be:
        # "Enabled for HCA" alone (a one-node job, no network connection) proves no use of it
        seen = self.gdr["channel"]
        if not seen and set(self.gdr["hca"]) == {False}:
            seen = self.gdr["hca"]
        r.gdr = None if not seen or len(seen) > 1 else next(iter(seen))
        r.graphs = list(self.graphs.values())
        r.communicators = sorted(list(self.comms.values()) + self.retired,
                                 key=lambda c: (c.comm_id or "", c.rank if c.rank is not None
                                                else -1, c.host, c.pid))
        r.calls = _busiest(self.calls.values())
        r.call_nranks = dict(self.call_nranks)
        r.nets_failed = list(self.nets_failed)
        r.choices = _together(rec.choices for rec in self.all_records)
        r.comm_paths = self._comm_paths()
        r.cuda_driver = next(iter(self.drivers.values()), None)
        r.mismatches = self._mismatches()
        self._collnet()
        if r.nccl_lines == 0:
            self._note("no NCCL INFO lines in " + (", ".join(r.sources) or "the input")
                       + " (was the job run with NCCL_DEBUG=INFO?)")
        for kind, n in sorted(self.truncated.items()):
            self._note(f"{n} truncated or unreadable {kind} line(s) skipped")
        if self.unknown_dtypes:
            self._note("COLL lines with unknown datatype(s) "
                       f"{sorted(self.unknown_dtypes)} skipped (newer NCCL than this parser?)")
        one_rank = [k for k in r.calls if k not in r.choices and r.call_nranks.get(k) == 1
                    and k[0] not in ("Send", "Recv")]
        if one_rank:
            self._note(f"{len(one_rank)} collective size(s) ran on 1-rank communicators only: NCCL "
                       "copies the buffer locally (ncclLaunchOneRank) and chooses no algorithm or "
                       "protocol, so there is no TUNING line for them")
        if r.calls and not r.choices and len(one_rank) < len(r.calls):
            self._note("COLL lines but no TUNING lines: algorithm and protocol unknown (add TUNING "
                       "to NCCL_DEBUG_SUBSYS; NCCL up to 2.18 prints them only at TRACE level)")
        if r.nccl_lines and r.version is None:
            self._note("no 'NCCL version' line: the log may start late or be an excerpt")
        return r

    def _collnet(self) -> None:
        cn = self.r.collnet
        echoed = self.r.env.get("NCCL_COLLNET_ENABLE")
        cn.requested = None if echoed is None else echoed.strip() == "1"
        if self.collnet_setup:
            cn.plugin_loaded = True
        chosen = any(a.startswith("COLLNET") for a in self.r.algorithms)
        confirmed = self.collnet_connected or chosen or (
            self.collnet_completed and not self.collnet_open)
        cn.initialized = self.collnet_setup and confirmed and not self.collnet_failed
        if cn.initialized:
            return
        if self.collnet_failed:
            cn.reason = "; ".join(self.collnet_failed[:2])
        elif self.collnet_setup:
            cn.reason = ("CollNet setup began (COLLNET connections or SHARP init logged) but was "
                         "never confirmed: no 'Connected CollNet' line, and "
                         f"{len(self.collnet_open)} process(es) logged no Init COMPLETE after it "
                         "(did the job hang or stop?)")
        elif not cn.plugin_loaded:
            if self.plugin_failure:
                cn.reason = f"no CollNet plugin loaded ({self.plugin_failure})"
            elif self.collnet_symbol_missing:
                cn.reason = "the net plugin that loaded has no CollNet symbol"
            elif self.r.net_plugin is None and self.r.network in INTERNAL_NETS:
                cn.reason = f"no CollNet plugin loaded (network {self.r.network} is NCCL's own)"
            elif self.r.net_plugin is None and self.r.network is not None:
                # 2.19-2.23 load the newest plugin version without a "Loaded" line
                cn.reason = (f"no CollNet setup in the logs (network {self.r.network} is an "
                             "external plugin's; NCCL logged no line saying whether it brought "
                             "CollNet)")
            else:
                cn.reason = "no CollNet plugin loaded"
        elif self.r.net_plugin and self.r.net_plugin in self.r.nets_failed:
            cn.reason = (f"the {self.r.net_plugin} net plugin that carries CollNet failed to "
                         f"initialize (NCCL used {self.r.network or 'another network'})")
        elif self.r.nnodes == 1:
            cn.reason = "single-node communicator (CollNet needs NCCL_COLLNET_NODE_THRESHOLD nodes)"
        else:
            cn.reason = "CollNet plugin loaded but no CollNet setup was logged"


def _open_sources(source) -> list[tuple[str, list[str], bool]]:
    """(name, lines, found in a directory) for a path, a directory of logs, a list of paths, or
    the log text itself."""
    if isinstance(source, os.PathLike):
        items = [os.fspath(source)]
    elif isinstance(source, str):
        if not source or "\n" in source or (not os.path.exists(source) and "NCCL" in source):
            return [("<text>", source.splitlines(), False)]
        items = [source]
    else:
        items = [os.fspath(s) for s in source]
    out = []
    for path in items:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if not n.startswith("."))
            paths = [os.path.join(path, n) for n in names
                     if os.path.isfile(os.path.join(path, n))]
        elif os.path.isfile(path):
            paths = [path]
        else:
            raise FileNotFoundError(f"NCCL log {path!r} does not exist")
        for p in paths:
            with open(p, encoding="utf-8", errors="replace") as fh:
                out.append((p, fh.read().splitlines(), os.path.isdir(path)))
    return out


def parse_logs(source) -> LogReport:
    """Parse NCCL logs: one path, a directory (every file in it), a list of paths, or the text.

    An empty or unrelated input gives a report whose `warnings` say so; it does not raise."""
    parser = _Parser()
    for name, lines, in_dir in _open_sources(source):
        parser.feed(name, lines, optional=in_dir)
    return parser.finish()


# ---------------------------------------------------------------------------------- verify
def _enabled(spec: str, names: dict[str, set], every: set) -> dict[str | None, set]:
    """NCCL's parseList() semantics (graph/tuning.cc): "a,b", "^a", and per-function entries
    "allreduce:tree;broadcast:ring" where a first entry without a prefix applies to all."""
    out: dict[str | None, set] = {}
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        prefix, _, elems = part.rpartition(":")
        negate = elems.strip().startswith("^")
        chosen: set = set()
        for tok in elems.strip().lstrip("^").split(","):
            chosen |= names.get(tok.strip().replace("_", "").lower(), set())
        out[prefix.strip().lower() or None] = (every - chosen) if negate else chosen
    return out


def _size(n: int) -> str:
    for unit, step in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= step and n % step == 0:
            return f"{n // step} {unit}"
    return f"{n} B"


def _listing(items: dict, fmt=str) -> str:
    return ", ".join(f"{fmt(k)} x{n}" for k, n in sorted(items.items()))


def _check_choice(report: LogReport, var: str, spec: str, names: dict, every: tuple,
                  index: int, all_functions: bool) -> list[str]:
    allowed = _enabled(spec, names, set(every))
    bad: dict[str, Counter] = defaultdict(Counter)
    for (func, size), counter in report.choices.items():
        f = func.lower()
        if f in allowed:
            ok = allowed[f]
        elif None in allowed and (all_functions or f == "allreduce"):
            ok = allowed[None]
        else:
            continue
        for choice, n in counter.items():
            if index == 1 and choice[0] in ENGINE_PATHS.values():
                continue            # a symmetric kernel or a copy engine: no protocol
            if choice[index] not in ok:
                bad[f"{func} used {choice[index]}"][size] += n
    return [f"{var}={spec} but {what} for {_listing(sizes, _size)}"
            for what, sizes in sorted(bad.items())]


def _hca_allowed(spec: str, name: str, port: str) -> bool:
    """NCCL_IB_HCA matching (transport/net_ib): '^' excludes, '=' asks for exact names,
    otherwise each entry is a name prefix; ':port' restricts the port."""
    negate = spec.startswith("^")
    spec = spec.lstrip("^")
    exact = spec.startswith("=")
    hit = False
    for entry in spec.lstrip("=").split(","):
        ename, _, eport = entry.strip().partition(":")
        if not ename:
            continue
        name_ok = name == ename if exact else name.startswith(ename)
        if name_ok and (not eport or eport == port):
            hit = True
    return not hit if negate else hit


def _same(a: str, b: str) -> bool:
    a, b = a.strip(), b.strip()
    try:
        return int(a, 0) == int(b, 0)
    except ValueError:
        return a.lower() == b.lower()


def verify(report: LogReport, profile_env: dict) -> list[str]:
    """One readable line per request in `profile_env` (NCCL_* name -> value) that the logs show
    did not take effect, or cannot be confirmed from them, then one per disagreement between the
    ranks (`LogReport.mismatches`). An empty list means all held."""
    env = {k: str(v).strip() for k, v in profile_env.items() if v is not None}
    if report.nccl_lines == 0:
        return [f"no NCCL INFO lines in {', '.join(report.sources) or 'the logs'}: nothing can be "
                "verified (run with NCCL_DEBUG=INFO)"]
    flags = []
    for name, want in sorted(env.items()):
        got = report.env.get(name)
        if name.startswith("NCCL_") and got is not None and not _same(got, want):
            flags.append(f"{name}={want} requested but NCCL reported {name}={got}")
        elif got is None and report.env and name in ("NCCL_ALGO", "NCCL_PROTO"):
            flags.append(f"{name}={want} requested but NCCL never echoed {name} (did the "
                         "variable reach the ranks?)")
    flags += _verify_collnet(report, env)
    for var, names, every, index, all_functions in (
            ("NCCL_ALGO", _ALGO_NAMES, ALGORITHMS, 0, False),
            ("NCCL_PROTO", _PROTO_NAMES, PROTOCOLS, 1, True)):
        if var in env:
            if not report.choices:
                flags.append(f"{var}={env[var]} {_no_tuning(report)}")
            else:
                flags += _check_choice(report, var, env[var], names, every, index, all_functions)
    flags += _verify_ib(report, env)
    return flags + [f"ranks disagree: {m}" for m in report.mismatches]


def _no_tuning(report: LogReport) -> str:
    """Why no collective can be checked against a request for an algorithm or CollNet."""
    if report.single_rank:
        return ("did not apply: every collective ran on a 1-rank communicator, where NCCL "
                "copies locally and chooses no algorithm or protocol (no TUNING lines)")
    return "cannot be confirmed: the logs have no TUNING lines (add TUNING to NCCL_DEBUG_SUBSYS)"


def _verify_collnet(report: LogReport, env: dict) -> list[str]:
    want = env.get("NCCL_COLLNET_ENABLE")
    if want is None:
        return []
    cn = report.collnet
    used = {a: n for a, n in report.algorithms.items() if a.startswith("COLLNET")}
    flags = []
    if want == "1":
        if not cn.initialized:
            flags.append(f"NCCL_COLLNET_ENABLE=1 but CollNet was not initialized: {cn.reason}")
        if not report.choices:
            flags.append(f"NCCL_COLLNET_ENABLE=1 {_no_tuning(report)}")
        elif not used:
            flags.append("NCCL_COLLNET_ENABLE=1 but no collective used COLLNET_DIRECT or "
                         f"COLLNET_CHAIN (chosen: {_listing(report.algorithms)})")
    elif want == "0" and (used or cn.initialized):
        flags.append("NCCL_COLLNET_ENABLE=0 but CollNet was set up"
                     + (f" and used ({_listing(used)})" if used else ""))
    return flags


def _verify_ib(report: LogReport, env: dict) -> list[str]:
    flags = []
    spec = env.get("NCCL_IB_HCA")
    socket = (report.network or "").lower() == "socket" or (
        "NET/Socket" in report.transports and not any(
            t.startswith("NET/") and t != "NET/Socket" for t in report.transports))
    if spec:
        if socket:
            why = "; NET/IB : No device found" if report.ib_missing else ""
            flags.append(f"NCCL_IB_HCA={spec} requested but NCCL used the Socket transport{why}")
        elif report.hcas:
            stray = [h for h in report.hcas
                     if not _hca_allowed(spec, *h.split("/")[0].split(":"))]
            if stray:
                flags.append(f"NCCL_IB_HCA={spec} requested but NCCL listed "
                             f"{', '.join(stray)}")
        elif report.network is None:
            flags.append(f"NCCL_IB_HCA={spec} cannot be confirmed: no NET lines in the logs (add "
                         "NET to NCCL_DEBUG_SUBSYS)")
    cross = env.get("NCCL_CROSS_NIC")
    if cross in ("0", "1") and (report.nnodes or 2) > 1 and len(report.hcas) > 1:
        graphs = [g for g in report.graphs if g.pattern in (1, 2, 4)]
        if not graphs:
            flags.append(f"NCCL_CROSS_NIC={cross} cannot be confirmed: no GRAPH lines in the logs")
        for g in graphs:
            if g.cross_nic != int(cross):
                flags.append(f"NCCL_CROSS_NIC={cross} but the {g.name} graph was built with "
                             f"crossNic {g.cross_nic}")
    if env.get("NCCL_IB_MERGE_NICS") == "0" and report.merged_nics:
        flags.append("NCCL_IB_MERGE_NICS=0 but NET/IB listed merged devices")
    return flags


# ---------------------------------------------------------------------------------- CLI
def summary(report: LogReport) -> str:
    cn = report.collnet
    state = "initialized" if cn.initialized else (
        "plugin loaded, not initialized" if cn.plugin_loaded else "no plugin")
    lines = [
        f"NCCL {report.version or '?'}"
        + (f" (CUDA driver {report.cuda_driver})" if report.cuda_driver else "")
        + f": {report.nccl_lines} lines from {report.processes} "
        f"process(es), {len(report.sources)} source(s), nodes {report.nnodes or '?'}",
        f"network {report.network or '?'}"
        + (f" (plugin {report.net_plugin})" if report.net_plugin else "")
        + (f", failed: {', '.join(report.nets_failed)}" if report.nets_failed else "")
        + f"; transports {', '.join(report.transports) or '-'}; GDR "
        + {None: "?", True: "yes", False: "no"}[report.gdr],
        f"HCAs {', '.join(report.hcas) or '-'}" + (" (merged)" if report.merged_nics else ""),
        f"CollNet: {state}" + (f" [{cn.plugin}]" if cn.plugin else "")
        + (f" - {cn.reason}" if cn.reason and not cn.initialized else ""),
        "graphs: " + ("; ".join(f"{g.name} crossNic {g.cross_nic} nChannels {g.n_channels}"
                                for g in report.graphs) or "-"),
        f"connected: rings {report.rings_connected}, trees {report.trees_connected}, "
        f"NVLS {report.nvls_connected}",
        "env: " + (", ".join(f"{k}={v}" for k, v in sorted(report.env.items())) or "-"),
    ]
    head = (f"{'collective':<14s} {'bytes':>12s} {'size':>9s} {'algorithm':<15s} "
            f"{'protocol':<8s} {'count':>6s} {'nranks':>6s}")
    paths = _shown_paths(report)
    tables = [("", report.calls, report.choices, report.call_nranks.get)] if len(paths) < 2 \
        else [(f"communicator {c.label}", c.calls, c.choices, lambda _, c=c: c.nranks)
              for c in paths]
    for title, calls, chosen, nranks_of in tables:
        lines += ["", title, head] if title else ["", head]
        for func, nbytes, algo, proto, n in _rows(calls, chosen):
            nranks = nranks_of((func, nbytes))
            lines.append(f"{func:<14s} {nbytes:12d} {_size(nbytes):>9s} {algo:<15s} "
                         f"{proto or '-':<8s} {n:6d} {nranks if nranks is not None else '-':>6}")
    lines += [f"NCCL WARN {w}" for w in report.nccl_warnings]
    lines += [f"mismatch: {m}" for m in report.mismatches]
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)


def _path(algo: str, proto: str) -> str:
    """RING/SIMPLE, SYMMETRIC/AGxLLMC_R; a copy engine has no protocol."""
    return f"{algo}/{proto}" if proto else algo


def _shown_paths(report: LogReport) -> list[CommPath]:
    """The communicators that made calls or got TUNING lines; with two or more, the report is
    given per communicator (all together, the same size on a world and on a node's split would
    read as one collective with two algorithms)."""
    return [c for c in report.comm_paths if c.calls or c.choices]


def _choice_label(chosen: Counter | None, nranks: int | None) -> str:
    if chosen:
        if len(chosen) == 1:
            return _path(*next(iter(chosen)))
        return " + ".join(f"{_path(a, p)} x{n}" for (a, p), n in sorted(chosen.items()))
    if nranks == 1:
        return "no algorithm (1 rank: local copy)"
    return "algorithm unknown (no TUNING line)"


def path_lines(report: LogReport) -> list[str]:
    """The path NCCL took, in a few lines: the setup, then per collective the algorithm/protocol
    over ranges of sizes (or why there is none), then the parser's warnings. The sweep prints
    these for every profile."""
    if report.nccl_lines == 0:
        return list(report.warnings)
    cn = report.collnet
    nranks = max((c.nranks for c in report.communicators if c.nranks), default=None)
    lines = [
        f"NCCL {report.version or '?'}, {nranks or '?'} rank(s) on {report.nnodes or '?'} "
        f"node(s); network {report.network or '?'}"
        + (f" (plugin {report.net_plugin})" if report.net_plugin else "")
        + (f", failed: {', '.join(report.nets_failed)}" if report.nets_failed else "")
        + f"; transports {', '.join(report.transports) or '-'}; GDR "
        + {None: "?", True: "yes", False: "no"}[report.gdr] + "; CollNet "
        + ("initialized" if cn.initialized else f"not initialized: {cn.reason}")]
    paths = _shown_paths(report)
    if len(paths) < 2:
        lines += _collective_lines(report.calls, report.choices, report.call_nranks.get)
    else:
        for c in paths:
            lines.append(f"communicator {c.label}:")
            lines += ["  " + ln for ln in _collective_lines(c.calls, c.choices,
                                                            lambda _, c=c: c.nranks)]
    return lines + [f"mismatch: {m}" for m in report.mismatches] + list(report.warnings)


def _collective_lines(calls: dict, choices: dict, nranks_of) -> list[str]:
    """Per collective, the algorithm/protocol over ranges of sizes (or why there is none)."""
    lines = []
    keys = set(calls) | set(choices)
    for func in sorted({f for f, _ in keys}):
        runs: list[list] = []                      # [label, first size, last size]
        for size in sorted(b for f, b in keys if f == func):
            label = _choice_label(choices.get((func, size)), nranks_of((func, size)))
            if runs and runs[-1][0] == label:
                runs[-1][2] = size
            else:
                runs.append([label, size, size])
        lines.append(f"{func}: " + "; ".join(
            _size(lo) + (f"-{_size(hi)}" if hi != lo else "") + f": {label}"
            for label, lo, hi in runs))
    return lines


def _profile_env(name: str) -> dict:
    import yaml

    path = name if os.path.exists(name) else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "profiles", f"{name}.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--profile {name!r}: no such file or perf/profiles/{name}.yaml")
    with open(path) as fh:
        doc = yaml.safe_load(fh) or {}
    if not isinstance(doc.get("env"), dict):
        raise ValueError(f"profile {path}: needs an 'env' mapping of NCCL_* variables")
    return doc["env"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter,
        prog="python -m perf.nccl_log",
        description="Summarise NCCL_DEBUG=INFO logs: what NCCL chose per collective, which "
                    "requests did not take effect, where the ranks disagree. Exit status 1 "
                    "when a request or a disagreement is flagged.")
    ap.add_argument("logs", nargs="+", help="per-rank log files or directories of them")
    ap.add_argument("--profile", help="sweep profile name or YAML whose env is verified "
                                      "(default: the NCCL_* values NCCL itself echoed)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="a requested variable to verify (repeatable; adds to --profile)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    try:
        report = parse_logs(args.logs)
        env = _profile_env(args.profile) if args.profile else dict(report.env)
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--env {item!r}: expected NAME=VALUE")
            env[name.strip()] = value
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flags = verify(report, env)
    if args.json:
        print(json.dumps(dict(report.to_dict(), requested=env, flags=flags), indent=1,
                         default=str))
    else:
        print(summary(report))
        for f in flags:
            print(f"flag: {f}")
    return 1 if flags else 0


if __name__ == "__main__":
    sys.exit(main())
