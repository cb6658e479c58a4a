"""Alpha-beta cost model of AllReduce on a GPU cluster: `python -m perf.topology --cluster NAME`.

Why: the collective sweep (perf.allreduce_sweep) measures; this says what the hardware should
allow, so a measurement far below the model points at a configuration problem rather than at the
fabric, and the model tells in advance which of ring / tree / hierarchical / SHARP should win on
a given layout (rail-optimized DGX versus raphael's semi-rail nodes).

Each algorithm's time is `alpha + size / bandwidth` for each NCCL protocol (LL: small latency,
quarter bandwidth; Simple: full bandwidth) and the faster protocol counts, as NCCL's own tuner
does. The bandwidth term is the busiest link per GPU: its NVLink (both directions used evenly)
and its share of the node's network injection, with the bytes each algorithm puts on each:

- ring: NCCL's rings over all n GPUs, one ring per NIC, each ring leaving a node through its own
  NIC. Per GPU, NVLink carries (g-1)/g and the GPU's NIC share 1/g of the ring traffic 2(n-1)/n*S,
  so the inter-node part is bounded by the per-GPU NIC share times g (the node's injection).
- tree: NCCL's double binary tree across nodes and a chain inside each node; moves ~2S per GPU
  and per node, with NCCL's 0.92 tree efficiency.
- hierarchical: reduce-scatter inside the node over NVLink, all-reduce of each 1/g shard across
  nodes on the GPU's own rail, all-gather inside the node, pipelined by chunks (as NCCL's
  NVLS-tree and CollNet-chain do): network bytes per node 2(N-1)/N*S instead of 2(n-1)/n*S.
  Built from three separate calls instead, the phases add up and it measures below this.
- sharp: CollNet-style in-network reduction. Inside the node a reduce-scatter/all-gather (or
  NVLink SHARP where the node has NVSwitch gen3); each node sends its data once up the SHARP tree
  and receives the result once, i.e. S per node instead of ring's ~2S: the in-switch reduction
  halves network traffic, and busbw is bounded by network injection (or by the intra-node part).

busbw follows nccl-tests (doc/PERFORMANCE.md): algbw = S/t, busbw = algbw * 2(n-1)/n for
all_reduce and (n-1)/n for reduce_scatter / all_gather, for every algorithm, SHARP included
(nccl-tests does not know the algorithm; NVIDIA/nccl-tests#366).

raphael's semi-rail layout: 4 × 400 Gb/s InfiniBand ports per node reach the host through ONE
adapter slot, so the four ports share that adapter's PCIe Gen5 x16 host link (~53 GB/s per
direction effective) instead of 4 × 48 GB/s: the node injects about a quarter of its nominal
port bandwidth, each GPU's network share is ~13 GB/s rather than ~48 GB/s, and every GPU's
network traffic converges on one PCIe link. `nics_per_host_link` models it; set it to 1 (one
adapter per port) for the rail-optimized variant. Whether raphael is really wired this way is an
assumption to confirm on a node (`lspci -tv`, `nvidia-smi topo -m`, `ib_write_bw` on all ports
at once).

Sources of the constants are next to each value below; "assumption" marks what no public source
gave.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass

import yaml

from dsfm.helpfmt import HelpFormatter

GB = 1e9  # nccl-tests' GB/s are 1e9 bytes per second
COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather")
ALGORITHMS = ("ring", "tree", "hierarchical", "sharp")
# Which algorithms the model has for each collective (tree and SHARP: all_reduce only here).
_COLLECTIVE_ALGORITHMS = {"all_reduce": ALGORITHMS, "reduce_scatter": ("ring", "hierarchical"),
                          "all_gather": ("ring", "hierarchical")}
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
              "all_gather": lambda n: (n - 1) / n}
_SUFFIX = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}


class TopologyError(ValueError):
    """A bad cluster description or request, said in one line."""


@dataclass(frozen=True)
class Cluster:
    """What the model needs to know about a cluster. Bandwidths are per direction."""

    name: str
    nodes: int
    gpus_per_node: int
    nvlink_GBps: float          # NVLink line rate per GPU, one direction
    nvlink_efficiency: float    # share of it NCCL gets (protocol overhead)
    nvls_algbw_GBps: float | None  # NVLink SHARP all-reduce algbw inside a node; None: no NVSwitch
    nics_per_node: int
    nic_Gbps: float             # line rate per NIC port
    nic_efficiency: float       # share of it NCCL gets
    rail_of_gpu: tuple[int, ...]  # local GPU index -> the NIC (rail) it sends through
    nics_per_host_link: int     # NIC ports behind one adapter's PCIe host link
    pcie_GBps: float            # effective PCIe Gen5 x16, one direction (GPU link, adapter link)
    nodes_per_leaf: int         # nodes whose same-rail ports meet on one leaf switch
    sharp: bool                 # in-network reduction (SHARP) available on the switches
    sharp_efficiency: float     # share of the injection bandwidth a SHARP all-reduce gets
    ll_base_us: float           # per-collective base latency, LL protocol
    ll_nvlink_step_us: float    # per step over NVLink, LL
    ll_net_step_us: float       # per step over the network, LL
    simple_base_us: float       # the same three for the Simple protocol
    simple_nvlink_step_us: float
    simple_net_step_us: float
    sharp_us: float             # one trip up and down the SHARP tree
    hop_us: float               # one switch hop

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


# NCCL's own tuning model, src/graph/tuning.cc (NVIDIA/nccl, commit b6475625): baseLat Ring
# LL 6.6 / Simple 8.4 µs; hwLat Ring NVLink LL 0.6 / Simple 3.4 µs, NET LL 2.7 / Simple 14.0 µs;
# CollNetDirect NET Simple 31 µs (the SHARP round trip).
_NCCL_LATENCY = dict(ll_base_us=6.6, ll_nvlink_step_us=0.6, ll_net_step_us=2.7,
                     simple_base_us=8.4, simple_nvlink_step_us=3.4, simple_net_step_us=14.0,
                     sharp_us=31.0)
# Same tuning.cc: LL runs at a quarter of the bandwidth on rings (1/3.8 on trees), trees at
# 0.92, CollNet on Hopper at 0.85.
_LL_FACTOR = {"ring": 1 / 4, "hierarchical": 1 / 4, "tree": 1 / 3.8}
_TREE_EFFICIENCY = 0.92

_H100 = dict(
    # NVLink4: 18 links, 900 GB/s both directions per H100, 450 GB/s one way (NVIDIA's NVSwitch
    # blog; "450GB/s is the line rate", sjeaugey in NVIDIA/nccl-tests#212). NCCL gets ~370 GB/s
    # of it after protocol overhead (same comment; ring busbw 365-370 GB/s in NVIDIA/nccl#1455).
    nvlink_GBps=450.0, nvlink_efficiency=round(370 / 450, 3),
    # NDR ConnectX-7: 400 Gb/s line; "CX-7 NICs at NDR rate should achieve up to 48-49GB/s per
    # NIC" (AddyLaddy, NVIDIA/nccl-tests#267 and #319): 48/50.
    nic_Gbps=400.0, nic_efficiency=0.96,
    # PCIe Gen5 x16: 32 GT/s × 16 lanes, 128b/130b = 63.0 GB/s raw per direction; measured on
    # H100: 52.8 GB/s device-to-host (nvbandwidth, NVIDIA/nvbandwidth#24), used as the
    # effective rate of any Gen5 x16 link here.
    pcie_GBps=52.8,
    # CollNetDirect on Hopper: busBw *= .85 in tuning.cc.
    sharp_efficiency=0.85,
    # Third-party figure: Quantum-2 cut-through latency ~330 ns port to port
    # (yobitel.com knowledge base on NVIDIA Quantum-2); not from NVIDIA's own documents.
    hop_us=0.33,
    **_NCCL_LATENCY,
)

CLUSTERS: dict[str, Cluster] = {
    # raphael (docs/cluster.md): 24 nodes × 4 H100 SXM5 joined by NVLink, 4 × 400 Gb/s InfiniBand,
    # semi-rail leaves, SHARP-capable switches.
    "raphael": Cluster(
        name="raphael", nodes=24, gpus_per_node=4,
        # Assumption: a 4-GPU H100 board links its GPUs directly (no NVSwitch), so no NVLink
        # SHARP, and NCCL reaches the same ~370 GB/s per GPU over those links.
        nvls_algbw_GBps=None,
        nics_per_node=4, rail_of_gpu=(0, 1, 2, 3),
        # From the issue: the 4 ports come through one dual-port adapter slot, so they share one
        # PCIe Gen5 x16 host link (see the module docstring).
        nics_per_host_link=4,
        # Assumption: all 4 ports of a node on one 64-port leaf with 32 ports down -> 8 nodes per
        # leaf, so a job of more than 8 nodes crosses leaf-spine-leaf (3 hops).
        nodes_per_leaf=8,
        sharp=True,
        **_H100),
    # DGX H100 SuperPOD style: 8 × H100 SXM5 on NVLink4 + NVSwitch gen3, 8 × ConnectX-7 400 Gb/s,
    # one per GPU, rail-optimized; SHARP (Quantum-2) available.
    "dgx_h100": Cluster(
        name="dgx_h100",
        # One DGX SuperPOD scalable unit: 32 DGX H100 (NVIDIA's SuperPOD reference architecture,
        # as summarised by introl.com's fat-tree article).
        nodes=32, gpus_per_node=8,
        # NVLink SHARP all-reduce on 8 GPUs: "peak busBw of ~480GB/s (algbw ~275GB/s)"
        # (sjeaugey, NVIDIA/nccl-tests#212).
        nvls_algbw_GBps=275.0,
        nics_per_node=8, rail_of_gpu=tuple(range(8)), nics_per_host_link=1,
        # Rail-optimized: each rail of a scalable unit meets on one 64-port NDR leaf (QM9700:
        # 64 × 400 Gb/s), 32 ports down -> 32 nodes per leaf.
        nodes_per_leaf=32,
        sharp=True,
        **_H100),
}


# ---------------------------------------------------------------------------------------------
# Cluster files


def cluster_to_dict(cluster: Cluster) -> dict:
    d = dataclasses.asdict(cluster)
    d["rail_of_gpu"] = list(cluster.rail_of_gpu)
    return d


def cluster_to_yaml(cluster: Cluster) -> str:
    return yaml.safe_dump(cluster_to_dict(cluster), sort_keys=False)


def load_cluster(path: str) -> Cluster:
    """A cluster from YAML: every field of Cluster, or `base: <built-in name>` plus the fields
    that differ (e.g. `nics_per_host_link: 1` for raphael with one adapter per port)."""
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except OSError as e:
        raise TopologyError(f"cluster file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise TopologyError(f"cluster file {path}: not valid YAML ({e.__class__.__name__})") \
            from None
    if not isinstance(data, dict):
        raise TopologyError(f"cluster file {path}: expected a mapping of Cluster fields")
    return cluster_from_dict(data, where=f"cluster file {path}")


def cluster_from_dict(data: dict, where: str = "cluster") -> Cluster:
    data = dict(data)
    names = [f.name for f in dataclasses.fields(Cluster)]
    base = data.pop("base", None)
    if base is not None:
        if base not in CLUSTERS:
            raise TopologyError(f"{where}: base {base!r} is not a built-in cluster "
                                f"({', '.join(CLUSTERS)})")
        data = {**cluster_to_dict(CLUSTERS[base]), **data}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise TopologyError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(names)})")
    missing = [n for n in names if n not in data]
    if missing:
        raise TopologyError(f"{where}: missing field {missing[0]!r} (or give `base: NAME`)")
    fields = {}
    for f in dataclasses.fields(Cluster):
        fields[f.name] = _coerce(f.name, f.type, data[f.name], where)
    cluster = Cluster(**fields)
    _validate(cluster, where)
    return cluster


def _coerce(name: str, kind: str, value, where: str):
    bad = TopologyError(f"{where}: {name} = {value!r} is not a valid {kind}")
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise bad
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if kind in ("float", "float | None"):
        if value is None and kind == "float | None":
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if kind == "tuple[int, ...]":
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad
        return tuple(value)
    raise AssertionError(kind)


def _validate(c: Cluster, where: str) -> None:
    def need(ok: bool, what: str):
        if not ok:
            raise TopologyError(f"{where}: {what}")

    for name in ("nodes", "gpus_per_node", "nics_per_node", "nics_per_host_link",
                 "nodes_per_leaf"):
        need(getattr(c, name) >= 1, f"{name} must be at least 1")
    for name in ("nvlink_GBps", "nic_Gbps", "pcie_GBps"):
        need(getattr(c, name) > 0, f"{name} must be positive")
    for name in ("nvlink_efficiency", "nic_efficiency", "sharp_efficiency"):
        need(0 < getattr(c, name) <= 1, f"{name} must be in (0, 1]")
    need(c.nvls_algbw_GBps is None or c.nvls_algbw_GBps > 0, "nvls_algbw_GBps must be positive "
         "or null")
    for name in ("ll_base_us", "ll_nvlink_step_us", "ll_net_step_us", "simple_base_us",
                 "simple_nvlink_step_us", "simple_net_step_us", "sharp_us", "hop_us"):
        need(getattr(c, name) >= 0, f"{name} must not be negative")
    need(len(c.rail_of_gpu) == c.gpus_per_node,
         f"rail_of_gpu has {len(c.rail_of_gpu)} entries for {c.gpus_per_node} GPUs per node")
    need(all(0 <= r < c.nics_per_node for r in c.rail_of_gpu),
         f"rail_of_gpu entries must be NIC indices 0..{c.nics_per_node - 1}")


# ---------------------------------------------------------------------------------------------
# Bandwidths


def gpu_net_GBps(cluster: Cluster, gpus: int | None = None) -> float:
    """Network bandwidth each of the first `gpus` GPUs of a node gets when all send at once:
    its NIC's share, its adapter host link's share, its own PCIe link; the slowest GPU sets the
    pace of a collective."""
    gpus = cluster.gpus_per_node if gpus is None else gpus
    rails = cluster.rail_of_gpu[:gpus]
    nic = cluster.nic_Gbps / 8 * cluster.nic_efficiency
    per_nic = {r: rails.count(r) for r in rails}
    link_of = {r: r // cluster.nics_per_host_link for r in rails}
    per_link = {}
    for r in rails:
        per_link[link_of[r]] = per_link.get(link_of[r], 0) + 1
    return min(min(nic / per_nic[r], cluster.pcie_GBps / per_link[link_of[r]], cluster.pcie_GBps)
               for r in rails)


def node_injection_GBps(cluster: Cluster) -> float:
    """What one node can put on the network at once (all its GPUs)."""
    return cluster.gpus_per_node * gpu_net_GBps(cluster)


def _shape(cluster: Cluster, nranks: int | None, nodes: int | None = None) -> tuple[int, int]:
    """(nodes, GPUs per node) for a job of nranks GPUs packed onto whole nodes, or spread
    evenly over `nodes` nodes when the job's layout is known (2 hosts x 2 ranks is 2 nodes'
    network, not one node's NVLink)."""
    g = cluster.gpus_per_node
    n = cluster.gpus if nranks is None else nranks
    if n < 1:
        raise TopologyError(f"nranks {n} must be at least 1")
    if nodes is not None:
        if nodes < 1 or nodes > cluster.nodes:
            raise TopologyError(f"{nodes} nodes: {cluster.name} has 1 to {cluster.nodes}")
        if n % nodes:
            raise TopologyError(f"nranks {n} do not spread evenly over {nodes} nodes")
        if n // nodes > g:
            raise TopologyError(f"{n // nodes} ranks per node: {cluster.name} nodes have {g} "
                                "GPUs")
        return nodes, n // nodes
    if n <= g:
        return 1, n
    if n % g:
        raise TopologyError(f"nranks {n} is not a whole number of {cluster.name} nodes of {g} GPUs")
    if n // g > cluster.nodes:
        raise TopologyError(f"nranks {n} needs {n // g} nodes; {cluster.name} has {cluster.nodes}")
    return n // g, g


@dataclass(frozen=True)
class _Cost:
    """Seconds per byte on the busiest link, and latency steps for one algorithm."""

    per_byte: float
    launches: int = 1
    nvlink_steps: int = 0
    net_steps: int = 0
    sharp_trips: int = 0


def _cost(cluster: Cluster, collective: str, algorithm: str, nodes: int, g: int) -> _Cost:
    n = nodes * g
    b_nvl = cluster.nvlink_GBps * cluster.nvlink_efficiency * GB
    b_net = gpu_net_GBps(cluster, g) * GB

    def slowest(nvlink_bytes: float, net_bytes: float, net_bw: float = b_net) -> float:
        # Per-GPU bytes on NVLink and on its network share; the busier one sets the time.
        return max(nvlink_bytes / b_nvl, net_bytes / net_bw if net_bytes else 0.0)

    passes = 2 if collective == "all_reduce" else 1
    if algorithm == "ring":
        volume = passes * (n - 1) / n
        if nodes == 1:
            return _Cost(slowest(volume, 0), nvlink_steps=passes * (n - 1))
        inter = passes * nodes if collective == "all_reduce" else nodes - 1  # as tuning.cc
        return _Cost(slowest(volume * (g - 1) / g, volume / g),
                     nvlink_steps=passes * (n - 1) - inter, net_steps=inter)
    if algorithm == "hierarchical":
        intra = passes * (g - 1) / g
        inter = passes * (nodes - 1) / nodes / g
        return _Cost(slowest(intra, inter), nvlink_steps=passes * (g - 1),
                     net_steps=passes * (nodes - 1))
    if algorithm == "tree":
        bw = b_nvl if g > 1 else math.inf
        if nodes > 1:
            bw = min(bw, g * b_net)
        depth = math.ceil(math.log2(nodes)) if nodes > 1 else 0
        return _Cost(2 / (_TREE_EFFICIENCY * bw), nvlink_steps=2 * (g - 1), net_steps=2 * depth)
    if algorithm == "sharp":
        if cluster.nvls_algbw_GBps is not None and g > 1:
            intra = 1 / (cluster.nvls_algbw_GBps * GB)
        else:
            intra = 2 * (g - 1) / g / b_nvl
        net = 1 / g / (b_net * cluster.sharp_efficiency) if nodes > 1 else 0.0
        return _Cost(max(intra, net), nvlink_steps=2 if g > 1 else 0,
                     sharp_trips=1 if nodes > 1 else 0)
    raise AssertionError(algorithm)


def _time_s(cluster: Cluster, cost: _Cost, size: int, algorithm: str, nodes: int) -> float:
    hops = 1 if nodes <= cluster.nodes_per_leaf else 3
    protocols = [("simple", 1.0)]
    if algorithm in _LL_FACTOR:  # NCCL's CollNet/NVLS run Simple only
        protocols.append(("ll", _LL_FACTOR[algorithm]))
    best = math.inf
    for proto, bw_factor in protocols:
        alpha = (cost.launches * getattr(cluster, f"{proto}_base_us")
                 + cost.nvlink_steps * getattr(cluster, f"{proto}_nvlink_step_us")
                 + cost.net_steps * (getattr(cluster, f"{proto}_net_step_us")
                                     + hops * cluster.hop_us)
                 + cost.sharp_trips * (cluster.sharp_us + 2 * hops * cluster.hop_us))
        best = min(best, alpha * 1e-6 + size * cost.per_byte / bw_factor)
    return best


def algorithms_for(cluster: Cluster, collective: str) -> tuple[str, ...]:
    algs = _COLLECTIVE_ALGORITHMS[collective]
    return tuple(a for a in algs if a != "sharp" or cluster.sharp)


def predict(cluster: Cluster, collective: str, sizes, algorithms=None,
            nranks: int | None = None, nodes: int | None = None) -> list[dict]:
    """Model predictions, one record per (algorithm, size), for a job of `nranks` GPUs (default:
    the whole cluster) packed onto whole nodes, or spread evenly over `nodes` nodes."""
    if collective not in COLLECTIVES:
        raise TopologyError(f"collective {collective!r}: the model has {', '.join(COLLECTIVES)}")
    available = algorithms_for(cluster, collective)
    algorithms = available if algorithms is None else tuple(algorithms)
    for a in algorithms:
        if a not in available:
            why = ("no SHARP on this cluster" if a == "sharp" and cluster.sharp is False
                   and collective == "all_reduce" else f"not modelled for {collective}")
            raise TopologyError(f"algorithm {a!r}: {why} (available: {', '.join(available)})")
    nodes, g = _shape(cluster, nranks, nodes)
    n = nodes * g
    factor = BUS_FACTOR[collective](n)
    records = []
    for algorithm in algorithms:
        cost = _cost(cluster, collective, algorithm, nodes, g)
        for size in sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise TopologyError(f"size {size!r} must be a positive whole number of bytes")
            t = _time_s(cluster, cost, size, algorithm, nodes)
            algbw = size / t / GB
            records.append({"collective": collective, "algorithm": algorithm, "size": size,
                            "algbw": algbw, "busbw": algbw * factor, "time_us": t * 1e6,
                            "cluster": cluster.name, "nodes": nodes, "gpus": n})
    return records


# ---------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> int:
    """nccl-tests' sizes: bytes with an optional K, M or G suffix (powers of 1024)."""
    t = text.strip()
    suffix = t[-1:].upper() if t[-1:].isalpha() else ""
    digits = t[:-1] if suffix else t
    if suffix not in _SUFFIX or not digits.isdigit() or int(digits) < 1:
        raise TopologyError(f"size {text!r}: expected a positive number of bytes with an "
                            "optional K, M or G suffix (e.g. 8, 64K, 128M, 8G)")
    return int(digits) * _SUFFIX[suffix]


def size_range(minbytes: str, maxbytes: str, factor: str) -> list[int]:
    lo, hi = parse_size(minbytes), parse_size(maxbytes)
    if lo > hi:
        raise TopologyError(f"sizes out of order: -b {minbytes} is larger than -e {maxbytes}")
    if not factor.isdigit() or int(factor) < 2:
        raise TopologyError(f"-f {factor!r}: the step factor must be a whole number of at least 2")
    sizes, s = [], lo
    while s <= hi:
        sizes.append(s)
        s *= int(factor)
    return sizes


def format_table(cluster: Cluster, collective: str, records: list[dict]) -> str:
    algs = list(dict.fromkeys(r["algorithm"] for r in records))
    nodes, gpus = records[0]["nodes"], records[0]["gpus"]
    g = gpus // nodes
    lines = [
        f"# perf.topology: {collective} on {cluster.name}, {nodes} node(s) × "
        f"{g} GPUs = {gpus} ranks (alpha-beta model, not a measurement)",
        f"# per-GPU network share {gpu_net_GBps(cluster, g):.1f} GB/s, node injection "
        f"{g * gpu_net_GBps(cluster, g):.1f} GB/s "
        f"({cluster.nics_per_node} × {cluster.nic_Gbps:g} Gb/s ports, "
        f"{cluster.nics_per_host_link} per PCIe host link), NVLink "
        f"{cluster.nvlink_GBps * cluster.nvlink_efficiency:.0f} GB/s per GPU"
        f"{', NVLink SHARP' if cluster.nvls_algbw_GBps else ''}"
        f"{', SHARP switches' if cluster.sharp else ''}",
        "#" + " " * 12 + "".join(f"{a:^28s}" for a in algs),
        f"# {'size (B)':>11s}" + f"{'time(us)':>10s}{'algbw':>9s}{'busbw':>9s}" * len(algs),
    ]
    by = {(r["algorithm"], r["size"]): r for r in records}
    for size in dict.fromkeys(r["size"] for r in records):
        row = f"{size:13d}"
        for a in algs:
            r = by[(a, size)]
            row += f"{r['time_us']:10.1f}{r['algbw']:9.2f}{r['busbw']:9.2f}"
        lines.append(row)
    lines.append("# algbw = size / time, busbw = algbw × " +
                 ("2(n-1)/n" if collective == "all_reduce" else "(n-1)/n") +
                 " (nccl-tests); GB/s = 1e9 B/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.topology", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--cluster", default=None,
                     help=f"built-in cluster: {', '.join(CLUSTERS)} (default raphael)")
    src.add_argument("--cluster-file", help="a cluster described in YAML (fields of Cluster, or "
                     "`base: NAME` plus the fields that differ)")
    ap.add_argument("--nodes", type=int, default=None, help="model a job on this many nodes")
    ap.add_argument("--collective", default="all_reduce", help=", ".join(COLLECTIVES))
    ap.add_argument("--algorithms", default=None, help="comma-separated subset of "
                    f"{', '.join(ALGORITHMS)} (default: all the cluster has)")
    ap.add_argument("-b", "--minbytes", default="8")
    ap.add_argument("-e", "--maxbytes", default="8G")
    ap.add_argument("-f", "--stepfactor", default="2")
    ap.add_argument("--json", help="write the records (a JSON list) here")
    args = ap.parse_args(argv)
    try:
        if args.cluster_file:
            cluster = load_cluster(args.cluster_file)
        else:
            name = args.cluster or "raphael"
            if name not in CLUSTERS:
                raise TopologyError(f"unknown cluster {name!r} (built in: {', '.join(CLUSTERS)}; "
                                    "or --cluster-file FILE)")
            cluster = CLUSTERS[name]
        sizes = size_range(args.minbytes, args.maxbytes, args.stepfactor)
        nranks = None
        if args.nodes is not None:
            if not 1 <= args.nodes <= cluster.nodes:
                raise TopologyError(f"--nodes {args.nodes}: {cluster.name} has 1 to "
                                    f"{cluster.nodes} nodes")
            nranks = args.nodes * cluster.gpus_per_node
        algorithms = None if args.algorithms is None else [
            a.strip() for a in args.algorithms.split(",") if a.strip()]
        records = predict(cluster, args.collective, sizes, algorithms, nranks)
    except TopologyError as e:
        print(f"perf.topology: error: {e}", file=sys.stderr)
        return 2
    print(format_table(cluster, args.collective, records))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)
        print(f"# wrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
