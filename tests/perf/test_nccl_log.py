"""perf.nccl_log against NCCL log excerpts (tests/perf/nccl_logs/*.log): five composed from
NCCL's source formats (each header says which release's formats and that it was not captured on
hardware) and one captured on an H200 (NCCL 2.28.9, one rank, Socket): the facts each excerpt
holds, verify() on working and fallen-back runs, robustness to what real logs contain (other
output, cut lines, interleaved ranks, nothing), and the sweep's per-profile NCCL path."""

import json
import os
import random
import re
import sys
from collections import Counter

import pytest

from perf.nccl_log import (
    ALGORITHMS,
    DATATYPES,
    PROTOCOLS,
    main,
    parse_logs,
    path_lines,
    summary,
    verify,
)
from tests.conftest import run

LOGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nccl_logs")
SHARP_OK = os.path.join(LOGS, "ib_collnet_sharp_2n4g.log")
SHARP_FALLBACK = os.path.join(LOGS, "ib_collnet_fallback_2n4g.log")
SHARP_INITFAIL = os.path.join(LOGS, "ib_collnet_sharp_initfail_2n4g.log")
NVLINK = os.path.join(LOGS, "nvlink_1n4g.log")
SOCKET = os.path.join(LOGS, "socket_2n4g.log")
H200 = os.path.join(LOGS, "h200_1gpu_socket_nccl2.28.9.log")     # captured, not composed
SHARP_ON = {"NCCL_COLLNET_ENABLE": 1}          # perf/profiles/sharp_on.yaml
RAIL = {"NCCL_CROSS_NIC": 0, "NCCL_IB_HCA": "=mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_3:1"}
MiB = 1 << 20
PREFIX = re.compile(r"^([\w.\-]+):(\d+):\d+ \[\d+\] ")


def read(path):
    with open(path) as fh:
        return fh.read()


def choices(report):
    return {key: dict(counter) for key, counter in report.choices.items()}


def by_process(text):
    """The excerpt's NCCL lines grouped per host:pid, in their original order."""
    groups = {}
    for line in text.splitlines():
        m = PREFIX.match(line)
        if m:
            groups.setdefault(f"{m[1]}.{m[2]}", []).append(line)
    return groups


# ------------------------------------------------------------------------------ tables
def test_tables_follow_nccl_enums():
    assert {k: v[1] for k, v in DATATYPES.items()} == {
        0: 1, 1: 1, 2: 4, 3: 4, 4: 8, 5: 8, 6: 2, 7: 4, 8: 8, 9: 2, 10: 1, 11: 1}
    assert DATATYPES[7][0] == "ncclFloat32" and DATATYPES[9][0] == "ncclBfloat16"
    assert ALGORITHMS.index("TREE") == 0 and ALGORITHMS.index("RING") == 1
    assert ALGORITHMS.index("COLLNET_DIRECT") == 2 and ALGORITHMS.index("COLLNET_CHAIN") == 3
    assert ALGORITHMS.index("NVLS") == 4 and ALGORITHMS.index("NVLS_TREE") == 5
    assert ALGORITHMS.index("PAT") == 6
    assert PROTOCOLS == ("LL", "LL128", "SIMPLE")


def test_every_excerpt_says_whether_it_was_captured():
    names = sorted(os.listdir(LOGS))
    assert len(names) == 6 and all(n.endswith(".log") for n in names)
    for name in names:
        header = [ln for ln in read(os.path.join(LOGS, name)).splitlines() if ln.startswith("#")]
        text = " ".join(header)
        assert "NCCL 2." in text, name
        if name == os.path.basename(H200):
            assert "CAPTURED ON HARDWARE" in text and "NOT CAPTURED" not in text
        else:
            assert "NOT CAPTURED ON HARDWARE" in text, name


# ------------------------------------------------------------------------------ excerpts
def test_working_sharp_run():
    r = parse_logs(SHARP_OK)
    assert r.version == "2.28.3+cuda12.9"
    assert r.processes == 8 and r.nnodes == 2 and not r.warnings
    assert r.network == "IBext_v8" and r.net_plugin == "IBext_v8"
    assert r.hcas == [f"mlx5_{i}:1/IB" for i in range(4)] and not r.merged_nics
    assert r.transports == ["COLLNET/SHARP", "NET/IBext_v8", "P2P/CUMEM"]
    assert r.gdr is True
    assert r.env == {"NCCL_COLLNET_ENABLE": "1", "NCCL_SOCKET_IFNAME": "ib0"}
    cn = r.collnet
    assert (cn.requested, cn.plugin_loaded, cn.initialized, cn.reason, cn.plugin) == \
        (True, True, True, None, "SHARP")
    assert {(g.name, g.cross_nic, g.n_channels) for g in r.graphs} == {
        ("RING", 0, 4), ("BALANCED_TREE", 0, 4), ("TREE", 0, 4), ("COLLNET_DIRECT", 0, 4)}
    assert r.rings == {c: list(range(8)) for c in range(8)}
    assert r.trees == 8
    assert r.channels == {"coll": 8, "collnet": 8, "nvls": 0, "p2p": 8}
    assert (r.rings_connected, r.trees_connected, r.nvls_connected) == (True, True, False)
    assert r.nvls_available is False
    comms = r.communicators
    assert sorted(c.rank for c in comms) == list(range(8))
    assert {(c.nranks, c.nnodes, c.local_ranks, c.comm_id, c.complete) for c in comms} == {
        (8, 2, 4, "0x7f3a9c2b5d1e4f60", True)}
    # bytes = count x sizeof(float32); one TUNING line per call, on rank 0 only
    assert r.calls == {("Broadcast", MiB): 1, ("AllReduce", 4096): 2, ("AllReduce", MiB): 2,
                       ("AllReduce", 16 * MiB): 2, ("AllReduce", 256 * MiB): 2}
    assert choices(r) == {
        ("Broadcast", MiB): {("RING", "SIMPLE"): 1},
        ("AllReduce", 4096): {("TREE", "LL"): 2},
        ("AllReduce", MiB): {("COLLNET_CHAIN", "SIMPLE"): 2},
        ("AllReduce", 16 * MiB): {("COLLNET_DIRECT", "SIMPLE"): 2},
        ("AllReduce", 256 * MiB): {("COLLNET_DIRECT", "SIMPLE"): 2}}
    assert ("AllReduce", 256 * MiB, "COLLNET_DIRECT", "SIMPLE", 2) in r.summary_rows()


def test_fallback_run_older_numeric_tuning_format():
    r = parse_logs(SHARP_FALLBACK)
    assert r.version == "2.22.3+cuda12.4" and r.nnodes == 2
    assert r.network == "IB" and r.net_plugin is None and r.transports == ["NET/IB", "P2P/CUMEM"]
    assert r.hcas == [f"mlx5_{i}:1/IB" for i in range(4)] and r.gdr is True
    # NCCL <= 2.22 echoes NCCL_COLLNET_ENABLE only when a CollNet plugin is present
    assert "NCCL_COLLNET_ENABLE" not in r.env
    cn = r.collnet
    assert (cn.requested, cn.plugin_loaded, cn.initialized) == (None, False, False)
    assert "libsharp_coll.so.5: cannot open shared object file" in cn.reason
    assert r.channels["collnet"] == 0
    # "%ld Bytes -> Algo %d proto %d time %f": indices mapped, collective taken from the COLL
    # line; the AllGather TUNING line counts 8 ranks x 1 MiB but is reported per rank
    assert choices(r) == {
        ("AllReduce", 4096): {("TREE", "LL"): 2},
        ("AllReduce", MiB): {("TREE", "LL128"): 2},
        ("AllReduce", 16 * MiB): {("RING", "SIMPLE"): 2},
        ("AllReduce", 256 * MiB): {("RING", "SIMPLE"): 2},
        ("AllGather", MiB): {("RING", "SIMPLE"): 1}}
    assert not r.warnings


def test_single_node_nvlink_run():
    r = parse_logs(NVLINK)
    assert r.version == "2.28.3+cuda12.9" and r.processes == 4 and r.nnodes == 1
    assert r.transports == ["P2P/CUMEM"] and r.gdr is None
    assert not r.collnet.plugin_loaded and not r.collnet.initialized
    assert r.nvls_available is False and not r.nvls_connected
    assert r.rings_connected and r.trees_connected
    assert r.rings == {c: [0, 1, 2, 3] for c in range(4)}
    assert [(g.name, g.n_channels) for g in r.graphs] == [("RING", 16), ("BALANCED_TREE", 16)]
    assert choices(r) == {
        ("AllReduce", 4096): {("RING", "LL"): 2},
        ("AllReduce", MiB): {("RING", "LL128"): 2},
        ("AllReduce", 256 * MiB): {("RING", "SIMPLE"): 2},
        ("ReduceScatter", 4 * MiB): {("RING", "SIMPLE"): 1},
        ("AllGather", 4 * MiB): {("RING", "SIMPLE"): 1}}     # 2097152 bfloat16 = 4 MiB


def test_socket_run():
    r = parse_logs(SOCKET)
    assert r.network == "Socket" and r.ib_missing and r.hcas == []
    assert r.transports == ["NET/Socket", "P2P/CUMEM"] and r.gdr is False
    assert r.env["NCCL_IB_HCA"] == RAIL["NCCL_IB_HCA"] and r.env["NCCL_CROSS_NIC"] == "0"
    assert set(choices(r)) == {("AllReduce", 4096), ("AllReduce", MiB), ("AllReduce", 256 * MiB)}


def test_sharp_plugin_loads_but_collnet_setup_fails():
    r = parse_logs(SHARP_INITFAIL)
    cn = r.collnet
    assert cn.requested is True and cn.plugin_loaded and not cn.initialized
    assert "Cannot create SHARP job" in cn.reason
    assert len(r.nccl_warnings) == 2
    assert any("Cannot initialize CollNet" in w for w in r.nccl_warnings)


# ------------------------------------------------------------------------------ verify
def test_verify_passes_the_working_run_and_flags_the_fallback():
    assert verify(parse_logs(SHARP_OK), SHARP_ON) == []
    flags = verify(parse_logs(SHARP_FALLBACK), SHARP_ON)
    assert len(flags) == 2
    assert "CollNet was not initialized" in flags[0] and "libsharp_coll" in flags[0]
    assert "no collective used COLLNET_DIRECT or COLLNET_CHAIN" in flags[1]
    assert "RING x5" in flags[1] and "TREE x4" in flags[1]


def test_verify_collnet_setup_failure_and_collnet_disabled():
    flags = verify(parse_logs(SHARP_INITFAIL), SHARP_ON)
    assert any("not initialized" in f and "SHARP job" in f for f in flags)
    flags = verify(parse_logs(SHARP_OK), {"NCCL_COLLNET_ENABLE": 0})
    assert any("reported NCCL_COLLNET_ENABLE=1" in f for f in flags)
    assert any("COLLNET_ENABLE=0 but CollNet was set up and used" in f for f in flags)
    assert verify(parse_logs(SHARP_FALLBACK), {"NCCL_COLLNET_ENABLE": 0}) == []


def test_verify_algorithm_and_protocol_requests():
    r = parse_logs(NVLINK)
    flags = verify(r, {"NCCL_ALGO": "Tree"})
    assert flags == [
        "NCCL_ALGO=Tree requested but NCCL never echoed NCCL_ALGO (did the variable reach the "
        "ranks?)",
        "NCCL_ALGO=Tree but AllReduce used RING for 4 KiB x2, 1 MiB x2, 256 MiB x2"]
    # NCCL_ALGO applies to AllReduce unless a function prefix says otherwise
    assert verify(r, {"NCCL_ALGO": "Ring"})[1:] == []
    assert verify(r, {"NCCL_ALGO": "^Tree"})[1:] == []
    assert "AllGather used RING" in verify(r, {"NCCL_ALGO": "ring;allgather:pat"})[1]
    flags = verify(r, {"NCCL_PROTO": "^LL128"})[1:]
    assert flags == ["NCCL_PROTO=^LL128 but AllReduce used LL128 for 1 MiB x2"]
    ok = parse_logs(SHARP_OK)
    assert verify(ok, {"NCCL_ALGO": "Tree,CollnetDirect,CollnetChain,Ring"})[1:] == []


def test_verify_hca_and_cross_nic_requests():
    assert verify(parse_logs(SHARP_OK), RAIL) == []
    assert verify(parse_logs(SOCKET), RAIL) == [
        f"NCCL_IB_HCA={RAIL['NCCL_IB_HCA']} requested but NCCL used the Socket transport; "
        "NET/IB : No device found"]
    flags = verify(parse_logs(SHARP_OK), {"NCCL_IB_HCA": "=mlx5_0:1,mlx5_1:1"})
    assert flags == ["NCCL_IB_HCA==mlx5_0:1,mlx5_1:1 requested but NCCL listed mlx5_2:1/IB, "
                     "mlx5_3:1/IB"]
    assert verify(parse_logs(SHARP_OK), {"NCCL_IB_HCA": "mlx5"}) == []
    assert verify(parse_logs(SHARP_OK), {"NCCL_IB_HCA": "^mlx5_4"}) == []
    crossed = read(SHARP_OK).replace("Pattern 4, crossNic 0", "Pattern 4, crossNic 1")
    flags = verify(parse_logs(crossed), RAIL)
    assert flags == ["NCCL_CROSS_NIC=0 but the RING graph was built with crossNic 1"]
    # one node: no NIC in the graph, nothing to compare
    assert verify(parse_logs(NVLINK), {"NCCL_CROSS_NIC": 1}) == []


def test_verify_merge_nics():
    merged = read(SHARP_FALLBACK).replace(
        "Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB",
        "Using [0]={[0] mlx5_0:1/IB, [1] mlx5_1:1/IB}")
    r = parse_logs(merged)
    assert r.merged_nics and r.hcas[:2] == ["mlx5_0:1/IB", "mlx5_1:1/IB"]
    assert verify(r, {"NCCL_IB_MERGE_NICS": 0}) == [
        "NCCL_IB_MERGE_NICS=0 but NET/IB listed merged devices"]
    assert verify(r, {"NCCL_IB_MERGE_NICS": 1}) == []


def test_verify_without_tuning_lines_cannot_confirm():
    text = "\n".join(ln for ln in read(SHARP_OK).splitlines() if "Bytes -> Algo" not in ln)
    r = parse_logs(text)
    assert r.calls and not r.choices
    assert any("no TUNING lines" in w for w in r.warnings)
    assert ("AllReduce", 4096, "-", "-", 2) in r.summary_rows()
    flags = verify(r, dict(SHARP_ON, NCCL_ALGO="Ring"))
    assert any("NCCL_COLLNET_ENABLE=1 cannot be confirmed" in f for f in flags)
    assert any("NCCL_ALGO=Ring cannot be confirmed" in f for f in flags)


# ------------------------------------------------------------------------------ robustness
def test_per_rank_files_equal_the_interleaved_file(tmp_path):
    text = read(SHARP_OK)
    for name, lines in by_process(text).items():
        (tmp_path / f"nccl.{name}.log").write_text("\n".join(lines) + "\n")
    whole = parse_logs(SHARP_OK)
    split = parse_logs(sorted(str(p) for p in tmp_path.iterdir()))
    by_dir = parse_logs(str(tmp_path))
    for r in (split, by_dir):
        assert len(r.sources) == 8 and r.processes == 8
        assert choices(r) == choices(whole) and r.calls == whole.calls
        assert r.collnet == whole.collnet and r.env == whole.env and r.hcas == whole.hcas
        assert r.version == whole.version and r.rings == whole.rings


def test_ranks_interleaved_in_any_order():
    groups = list(by_process(read(SHARP_FALLBACK)).values())
    rng = random.Random(7)
    cursors = [0] * len(groups)
    mixed = []
    while any(c < len(g) for c, g in zip(cursors, groups)):
        i = rng.choice([i for i, g in enumerate(groups) if cursors[i] < len(g)])
        mixed.append(groups[i][cursors[i]])
        cursors[i] += 1
    r = parse_logs("\n".join(mixed))
    assert choices(r) == choices(parse_logs(SHARP_FALLBACK))


def test_unrelated_output_and_launcher_prefixes():
    lines = []
    for i, line in enumerate(read(SHARP_OK).splitlines()):
        if line.startswith("#"):
            continue
        lines.append(f"[{i % 8}]<stdout>:{line}" if i % 3 == 0 else line)
        if i % 10 == 0:
            lines.append("#       size         count      type   redop    root     time   algbw")
            lines.append("Traceback (most recent call last): NCCL is fine, this line is not it")
            lines.append("[rank3]: loss 2.31 step 40 NCCL_ALGO=Tree in the app's own banner")
    r = parse_logs("\n".join(lines))
    assert choices(r) == choices(parse_logs(SHARP_OK))
    assert r.collnet.initialized and "NCCL_ALGO" not in r.env and not r.warnings


def test_truncated_lines_are_skipped_and_counted():
    lines = read(NVLINK).splitlines()
    coll = next(i for i, ln in enumerate(lines) if "opCount" in ln)
    tune = next(i for i, ln in enumerate(lines) if "Bytes -> Algo" in ln)
    lines[coll] = lines[coll][:lines[coll].index("count ")]          # cut mid-line
    lines[tune] = lines[tune][:lines[tune].index(" proto")]
    lines.append(lines[-1][:25])                                      # and at the very end
    r = parse_logs("\n".join(lines))
    assert "1 truncated or unreadable COLL line(s) skipped" in r.warnings
    assert "1 truncated or unreadable TUNING line(s) skipped" in r.warnings
    assert r.choices[("AllReduce", 4096)] == Counter({("RING", "LL"): 1})
    assert r.choices[("AllReduce", MiB)] == Counter({("RING", "LL128"): 2})


def test_empty_or_unrelated_input_reports_instead_of_raising(tmp_path):
    empty = tmp_path / "nccl.empty.log"
    empty.write_text("")
    for source in (str(empty), "", "hello\nworld\n"):
        r = parse_logs(source)
        assert r.nccl_lines == 0 and r.choices == {} and r.version is None
        assert any("no NCCL INFO lines" in w for w in r.warnings)
        assert verify(r, SHARP_ON)[0].startswith("no NCCL INFO lines")
    with pytest.raises(FileNotFoundError, match="nccl.missing.log"):
        parse_logs([str(empty), str(tmp_path / "nccl.missing.log")])


def test_other_releases_line_variants():
    text = "\n".join([
        "h:1:1 [0] NCCL INFO NCCL version 2.16.2+cuda11.8",
        "h:1:1 [0] NCCL INFO NET/Plugin : No plugin found (libnccl-net.so), using internal "
        "implementation",
        "h:1:1 [0] NCCL INFO NET/IB : Using [0]mlx5_0:1/RoCE ; OOB eth0:10.0.0.1<0>",
        # RCCL appends task/globalrank to the COLL line
        "h:1:1 [0] NCCL INFO AllGather: opCount 0 sendbuff 0x7f00 recvbuff 0x7f80 count 1024 "
        "datatype 9 op 0 root 0 comm 0x55 [nranks=4] stream 0x56 task 0 globalrank 0",
        # later releases append fields to the named TUNING line
        "h:1:1 [0] NCCL INFO AllGather: 2048 Bytes -> Algo PAT proto SIMPLE "
        "channel{Lo..Hi}={0..0} cgaClusterSize 1",
        "h:1:1 [0] NCCL INFO Reduce: opCount 1 sendbuff 0x7f00 recvbuff 0x7f80 count 8 "
        "datatype 8 op 0 root 0 comm 0x55 [nranks=4] stream 0x56",
        "h:1:1 [0] NCCL INFO 64 Bytes -> Algo 1 proto 0 time 9.5",
        "h:1:1 [0] NCCL INFO Connected NVLS tree",
        "h:1:1 [0] NCCL INFO NVLS multicast support is available on dev 0",
    ])
    r = parse_logs(text)
    assert r.version == "2.16.2+cuda11.8"
    assert r.hcas == ["mlx5_0:1/RoCE"] and r.nvls_connected and r.nvls_available
    assert "No plugin found" in r.collnet.reason
    assert choices(r) == {("AllGather", 2048): {("PAT", "SIMPLE"): 1},
                          ("Reduce", 64): {("RING", "LL"): 1}}


# ------------------------------------------------------------------------------ command line
def test_cli_table_flags_and_exit_status(capsys, tmp_path):
    profile = tmp_path / "sharp_on.yaml"
    profile.write_text("description: SHARP through CollNet\nenv:\n  NCCL_COLLNET_ENABLE: 1\n")
    assert main([SHARP_OK]) == 0
    out = capsys.readouterr().out
    assert "CollNet: initialized [SHARP]" in out
    assert re.search(r"AllReduce\s+268435456\s+256 MiB COLLNET_DIRECT\s+SIMPLE\s+2", out)
    assert "flag:" not in out
    assert main([SHARP_FALLBACK, "--profile", str(profile)]) == 1
    out = capsys.readouterr().out
    assert out.count("flag: NCCL_COLLNET_ENABLE=1") == 2
    assert main([NVLINK, "--env", "NCCL_ALGO=Tree"]) == 1
    assert "flag: NCCL_ALGO=Tree but AllReduce used RING" in capsys.readouterr().out
    assert main([os.path.join(LOGS, "nope.log")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_json_as_a_module():
    proc = run([sys.executable, "-m", "perf.nccl_log", SOCKET, "--json", "--env",
                f"NCCL_IB_HCA={RAIL['NCCL_IB_HCA']}", "--env", "NCCL_CROSS_NIC=0"])
    assert proc.returncode == 1, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["network"] == "Socket" and doc["version"] == "2.28.3+cuda12.9"
    assert doc["requested"]["NCCL_CROSS_NIC"] == "0"
    assert doc["flags"] == [f"NCCL_IB_HCA={RAIL['NCCL_IB_HCA']} requested but NCCL used the "
                            "Socket transport; NET/IB : No device found"]
    assert {"collective": "AllReduce", "bytes": 4096, "algorithm": "TREE", "protocol": "LL",
            "count": 2, "nranks": 8} in doc["collectives"]


# ------------------------------------------------------------------------------ captured log
# tests/perf/nccl_logs/h200_1gpu_socket_nccl2.28.9.log: 156 verbatim lines of a real run (one
# H200, one rank, no InfiniBand) of `perf.allreduce_sweep --backend nccl --nprocs 1 -e 64M -c
# all_reduce,all_gather`; every value below can be read off the excerpt.
NO_PLUGIN = "no CollNet plugin loaded (NET/Plugin: Could not find: libnccl-net.so)"
ONE_RANK_NOTE = ("10 collective size(s) ran on 1-rank communicators only: NCCL copies the buffer "
                 "locally (ncclLaunchOneRank) and chooses no algorithm or protocol, so there is "
                 "no TUNING line for them")
DID_NOT_APPLY = ("did not apply: every collective ran on a 1-rank communicator, where NCCL "
                 "copies locally and chooses no algorithm or protocol (no TUNING lines)")


def test_captured_h200_setup():
    r = parse_logs(H200)
    assert r.sources == [H200] and r.nccl_lines == 156 and r.processes == 1
    assert r.version == "2.28.9+cuda13.0" and r.nnodes == 1
    # NCCL's IB finds no device and fails to initialise; its Socket transport is used
    assert r.network == "Socket" and r.net_assigned == "Socket" and r.nets_failed == ["IB"]
    assert r.net_plugin is None and r.ib_missing and r.hcas == [] and not r.merged_nics
    # one rank: no connection at all ("Channel .. via" lines), so no transport; the only GDR
    # evidence is "NET/Socket : GPU Direct RDMA Disabled for HCA 0 'eth0'"
    assert r.transports == [] and r.gdr is False
    assert r.env == {}                      # profile 'default' sets no NCCL_* parameter
    cn = r.collnet
    assert (cn.requested, cn.plugin_loaded, cn.initialized, cn.plugin, cn.reason) == \
        (None, False, False, None, NO_PLUGIN)
    assert [(g.name, g.cross_nic, g.n_channels, g.bw_intra, g.bw_inter, g.type_intra,
             g.type_inter) for g in r.graphs] == [("RING", 0, 32, 60.0, 60.0, "LOC", "PIX"),
                                                  ("TREE", 0, 32, 60.0, 60.0, "LOC", "PIX")]
    assert r.rings == {0: [0], 1: [0], 62: [0], 63: [0]} and r.trees == 1
    # 2.28 prints the coll channel count as the collnet one: no CollNet behind the 64
    assert r.channels == {"coll": 64, "collnet": 64, "nvls": 0, "p2p": 64}
    assert (r.rings_connected, r.trees_connected, r.nvls_connected) == (False, False, False)
    assert r.nvls_available is None
    [c] = r.communicators
    assert (c.comm, c.host, c.pid, c.rank, c.nranks, c.nnodes, c.local_ranks, c.comm_id,
            c.complete) == ("0x44c660d0", "vm", 888, 0, 1, 1, 1, "0x696dabc6e54df94d", True)
    assert r.nccl_warnings == []


def test_captured_h200_calls_have_no_algorithm():
    r = parse_logs(H200)
    text = "\n".join(ln for ln in read(H200).splitlines() if not ln.startswith("#"))
    assert "Bytes -> Algo" not in text and text.count(" opCount 0 ") == 89
    # bytes = count x 4 (float32, datatype 7), except the sweep's 2 x float64 stats (16 B);
    # AllReduce 4 B is torch's barrier, 8 B one whole sweep unit (5 + 21) and 2 in-place calls
    assert r.calls == {
        ("AllReduce", 4): 17, ("AllReduce", 8): 28, ("AllReduce", 16): 16,
        ("AllReduce", 4096): 4, ("AllReduce", MiB): 4, ("AllReduce", 64 * MiB): 4,
        ("AllGather", 8): 4, ("AllGather", 4096): 4, ("AllGather", MiB): 4,
        ("AllGather", 64 * MiB): 4}
    assert sum(r.calls.values()) == 89
    assert set(r.call_nranks.values()) == {1} and r.single_rank
    assert r.choices == {} and r.algorithms == Counter()
    assert {(a, p) for _, _, a, p, _ in r.summary_rows()} == {("-", "-")}
    assert r.warnings == [ONE_RANK_NOTE]
    doc = r.to_dict()
    assert {"collective": "AllGather", "bytes": 64 * MiB, "algorithm": "-", "protocol": "-",
            "count": 4, "nranks": 1} in doc["collectives"]


def test_captured_h200_verify():
    r = parse_logs(H200)
    assert verify(r, {}) == []             # profile 'default': nothing requested
    assert verify(r, SHARP_ON) == [
        f"NCCL_COLLNET_ENABLE=1 but CollNet was not initialized: {NO_PLUGIN}",
        f"NCCL_COLLNET_ENABLE=1 {DID_NOT_APPLY}"]
    assert verify(r, {"NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple"}) == [
        f"NCCL_ALGO=Ring {DID_NOT_APPLY}", f"NCCL_PROTO=Simple {DID_NOT_APPLY}"]
    assert verify(r, RAIL) == [
        f"NCCL_IB_HCA={RAIL['NCCL_IB_HCA']} requested but NCCL used the Socket transport; "
        "NET/IB : No device found"]
    assert verify(r, {"NCCL_COLLNET_ENABLE": 0}) == []


def test_captured_h200_path_lines_and_cli(capsys):
    r = parse_logs(H200)
    assert path_lines(r) == [
        "NCCL 2.28.9+cuda13.0, 1 rank(s) on 1 node(s); network Socket, failed: IB; transports "
        f"-; GDR no; CollNet not initialized: {NO_PLUGIN}",
        "AllGather: 8 B-64 MiB: no algorithm (1 rank: local copy)",
        "AllReduce: 4 B-64 MiB: no algorithm (1 rank: local copy)",
        ONE_RANK_NOTE]
    assert main([H200]) == 0
    out = capsys.readouterr().out
    assert "network Socket, failed: IB; transports -; GDR no" in out
    assert re.search(r"AllGather\s+67108864\s+64 MiB -\s+-\s+4\s+1\n", out)
    assert main([H200, "--profile", "sharp_on"]) == 1
    assert capsys.readouterr().out.count("flag: NCCL_COLLNET_ENABLE=1") == 2


def test_path_lines_of_multi_rank_runs():
    assert path_lines(parse_logs(SHARP_OK))[1:] == [
        "AllReduce: 4 KiB: TREE/LL; 1 MiB: COLLNET_CHAIN/SIMPLE; 16 MiB-256 MiB: "
        "COLLNET_DIRECT/SIMPLE",
        "Broadcast: 1 MiB: RING/SIMPLE"]
    assert path_lines(parse_logs(SHARP_OK))[0].startswith(
        "NCCL 2.28.3+cuda12.9, 8 rank(s) on 2 node(s); network IBext_v8 (plugin IBext_v8); "
        "transports COLLNET/SHARP, NET/IBext_v8, P2P/CUMEM; GDR yes; CollNet initialized")
    untuned = "\n".join(ln for ln in read(NVLINK).splitlines() if "Bytes -> Algo" not in ln)
    lines = path_lines(parse_logs(untuned))
    assert "AllReduce: 4 KiB-256 MiB: algorithm unknown (no TUNING line)" in lines
    assert any(ln.startswith("COLL lines but no TUNING lines") for ln in lines)
    assert not any("1-rank" in ln for ln in lines)


def test_directory_lists_only_files_with_nccl_lines(tmp_path):
    """A sweep job folder holds the per-rank NCCL log beside the launcher log and results."""
    (tmp_path / "nccl.vm.888.log").write_text(read(H200))
    (tmp_path / "launcher.log").write_text("UserWarning: barrier(): using the device under "
                                           "current context.\n")
    (tmp_path / "rank0.jsonl").write_text('{"split": "world", "size": 8}\n')
    r = parse_logs(str(tmp_path))
    assert r.sources == [str(tmp_path / "nccl.vm.888.log")]
    assert r.calls == parse_logs(H200).calls and r.warnings == [ONE_RANK_NOTE]


def test_nccl_2_28_net_plugin_lines():
    """2.2x+ initialise every NET plugin by name: a failure of NCCL's own IB says nothing about
    CollNet; an external plugin that loads and then fails to initialise does."""
    own = "\n".join(f"h:1:1 [0] NCCL INFO {m}" for m in (
        "NCCL version 2.28.9+cuda13.0", "NCCL_NET_PLUGIN set by environment to none",
        "NET/IB : No device found.", "Failed to initialize NET plugin IB",
        "NET/Socket : Using [0]eth0:192.0.2.2<0>", "Initialized NET plugin Socket",
        "Assigned NET plugin Socket to comm", "Using network Socket"))
    r = parse_logs(own)
    assert r.nets_failed == ["IB"] and r.net_assigned == "Socket" and r.net_plugin is None
    assert r.collnet.reason == "no CollNet plugin loaded (network Socket is NCCL's own)"
    external = [
        "NET/Plugin: Loaded net plugin SPCX (v12)", "NET/IB : No device found.",
        "Failed to initialize NET plugin SPCX", "Failed to initialize NET plugin IB",
        "Initialized NET plugin Socket", "Assigned NET plugin Socket to comm",
        "Using network Socket"]
    r = parse_logs("\n".join(f"h:1:1 [0] NCCL INFO {m}" for m in external))
    assert r.nets_failed == ["SPCX", "IB"] and r.net_plugin == "SPCX"
    assert r.collnet.reason == "no CollNet plugin loaded (Failed to initialize NET plugin SPCX)"
    external.insert(1, "NET/Plugin: Loaded collnet plugin SHARP (v12)")
    r = parse_logs("\n".join(f"h:1:1 [0] NCCL INFO {m}" for m in external))
    assert r.collnet.plugin_loaded and not r.collnet.initialized
    assert r.collnet.reason == ("the SPCX net plugin that carries CollNet failed to initialize "
                                "(NCCL used Socket)")


def test_net_plugin_name_with_spaces():
    """HPC-X's RDMA/SHARP plugin names itself "NCCL RDMA Plugin v8" (NCCL 2.20-2.24 logs, e.g.
    NVIDIA/nccl#1357, #1584): the whole name is the plugin, and a failure to initialise it is
    recognised by that name."""
    lines = [
        "NCCL version 2.24.3+cuda12.2", "NET/Plugin: Failed to find ncclNetPlugin_v9 symbol.",
        "NET/Plugin: Loaded net plugin NCCL RDMA Plugin v8 (v8)",
        "NET/Plugin: Failed to find ncclCollNetPlugin_v9 symbol.",
        "NET/Plugin: Loaded collnet plugin SHARP (v8)",
        "Failed to initialize NET plugin NCCL RDMA Plugin v8", "NET/IB : No device found.",
        "Failed to initialize NET plugin IB", "Initialized NET plugin Socket",
        "Using network Socket"]
    r = parse_logs("\n".join(f"h:1:1 [0] NCCL INFO {m}" for m in lines))
    assert r.net_plugin == "NCCL RDMA Plugin v8" and r.collnet.plugin == "SHARP"
    assert r.nets_failed == ["NCCL RDMA Plugin v8", "IB"]
    assert r.collnet.reason == ("the NCCL RDMA Plugin v8 net plugin that carries CollNet failed "
                                "to initialize (NCCL used Socket)")
    assert "network Socket (plugin NCCL RDMA Plugin v8)" in path_lines(r)[0]
    # 2.14-2.18 print the older "(v5)" form and "coll plugin"
    r = parse_logs("h:1:1 [0] NCCL INFO NET/Plugin: Loaded net plugin NCCL RDMA Plugin (v5)\n"
                   "h:1:1 [0] NCCL INFO NET/Plugin: Loaded coll plugin SHARP (v5)")
    assert (r.net_plugin, r.collnet.plugin) == ("NCCL RDMA Plugin", "SHARP")


def test_external_network_without_a_loaded_line_is_not_called_nccls_own():
    """NCCL 2.19-2.23 load the newest version of an external plugin without a "Loaded net
    plugin" line (a 2.23.4 run with the HPC-X SHARP plugin, NVIDIA/nccl-tests#311): the
    network's name is the only trace, and it is not NCCL's own IB or Socket."""
    lines = [
        "NCCL version 2.23.4+cuda12.4",
        "Plugin Path : /opt/hpcx/nccl_rdma_sharp_plugin/lib/libnccl-net.so",
        "P2P plugin v8 IBext_v8",
        "NET/IB : Using [0]mlx5_0:1/IB/SHARP [1]mlx5_1:1/IB/SHARP [RO]; OOB ib0:10.1.0.34<0>",
        "PROFILER/Plugin: Could not find: libnccl-profiler.so.", "Using network IBext_v8"]
    r = parse_logs("\n".join(f"gpu34:23654:23684 [0] NCCL INFO {m}" for m in lines))
    assert r.network == "IBext_v8" and r.hcas == ["mlx5_0:1/IB", "mlx5_1:1/IB"]
    assert "NCCL's own" not in r.collnet.reason
    assert r.collnet.reason.startswith("no CollNet setup in the logs (network IBext_v8 is an "
                                       "external plugin's")
    flags = verify(r, SHARP_ON)
    assert flags[0] == f"NCCL_COLLNET_ENABLE=1 but CollNet was not initialized: {r.collnet.reason}"
    # NCCL's own transports keep their reason
    r = parse_logs(lines[0] + "\nh:1:1 [0] NCCL INFO Using network IB")
    assert r.collnet.reason == "no CollNet plugin loaded (network IB is NCCL's own)"


def test_tuning_line_is_matched_on_its_own_communicator():
    """A process that is rank 4 of the world and rank 0 of its node's split (the sweep's
    `intra`): NCCL 2.19-2.22 print the unnamed TUNING line on rank 0 of a communicator only and
    count AllGather as nranks x the per-rank bytes, so the split's 4 x 2 MiB must not be taken
    for the world's earlier 8 x 1 MiB call, which got no TUNING line in this process."""
    p = "node02:2004:2004 [0] NCCL INFO "
    coll = ("AllGather: opCount {op} sendbuff 0x7f01 recvbuff 0x7f02 count {count} datatype 7 "
            "op 0 root 0 comm {comm} [nranks={n}] stream 0x5603")
    text = "\n".join(p + m for m in (
        "NCCL version 2.21.5+cuda12.4",
        "ncclCommInitRank comm 0x5601 rank 4 nranks 8 cudaDev 0 nvmlDev 0 busId 1a000 commId "
        "0x11 - Init COMPLETE",
        "ncclCommInitRank comm 0x5602 rank 0 nranks 4 cudaDev 0 nvmlDev 0 busId 1a000 commId "
        "0x22 - Init COMPLETE",
        coll.format(op=0, count=262144, comm="0x5601", n=8),        # world, 1 MiB per rank
        coll.format(op=0, count=524288, comm="0x5602", n=4),        # intra, 2 MiB per rank
        "8388608 Bytes -> Algo 1 proto 2 time 120.5"))
    r = parse_logs(text)
    assert choices(r) == {("AllGather", 2 * MiB): {("RING", "SIMPLE"): 1}}
    assert r.calls == {("AllGather", MiB): 1, ("AllGather", 2 * MiB): 1}
    # and the report is per communicator (the world's rank 0 wrote another file)
    assert path_lines(r)[1:] == [
        "communicator commId 0x11 (8 rank(s), rank 0 not in these logs):",
        "  AllGather: 1 MiB: algorithm unknown (no TUNING line)",
        "communicator commId 0x22 (4 rank(s)):", "  AllGather: 2 MiB: RING/SIMPLE"]


def test_collnet_setup_that_never_completed_is_not_initialized():
    """A 4-node SHARP job that hung in CollNet setup (NCCL 2.23.4, NVIDIA/nccl-tests#311): the
    COLLNET connections and the plugin's "SHARP rank .. initialized" come before NCCL's
    cross-rank check, and nothing followed them. Only a line after that check, a CollNet TUNING
    choice or the communicator's Init COMPLETE confirms CollNet."""
    started = []
    for node, (pid, rail) in enumerate([(23654, 1), (15433, 5), (2899, 0), (63046, 1)]):
        p = f"gpu{34 + node}:{pid}:{pid + 30} [0] NCCL INFO "
        started += [
            p + "NCCL_COLLNET_ENABLE set by environment to 1.",
            p + f"ncclCommInitRank comm 0x5a{node} rank {2 * node} nranks 8 cudaDev 0 nvmlDev 0 "
                "busId 7000 commId 0x4570 - Init START",
            p + f"comm 0x5a{node} rank {2 * node} nRanks 8 nNodes 4 localRanks 2 localRank 0 "
                "MNNVL 0",
            p + f"CollNet 00/0 : {2 * node} [receive] via COLLNET/SHARP/{rail}/GDRDMA",
            "",
            f"gpu{34 + node}:{pid}:{pid + 50} [0] sharp_plugin.c:382 NCCL WARN SHARP "
            "int8,uint8,bfloat16 Datatypes not supported",
            f"gpu{34 + node}:{pid}:{pid + 50} [0] NCCL INFO SHARP rank {node}/4 initialized on "
            "mlx5_0:1"]
    hung = parse_logs("\n".join(started))
    cn = hung.collnet
    assert cn.requested and cn.plugin_loaded and not cn.initialized
    assert cn.reason.startswith("CollNet setup began") and "4 process(es)" in cn.reason
    assert verify(hung, SHARP_ON)[0].startswith("NCCL_COLLNET_ENABLE=1 but CollNet was not "
                                                "initialized: CollNet setup began")
    # the same setup followed by each rank's Init COMPLETE (2.23+ print no other line until a
    # CollNet algorithm is first used) or by 2.23's "Connected Collnet Chains"
    done = started + [ln.replace("Init START", "Init COMPLETE") for ln in started
                      if "Init START" in ln]
    assert parse_logs("\n".join(done)).collnet.initialized
    chains = started + ["gpu34:23654:23684 [0] NCCL INFO Connected Collnet Chains  [0] 1->0->-1"]
    assert parse_logs("\n".join(chains)).collnet.initialized
    # one process still in setup when the log ends: not confirmed
    assert not parse_logs("\n".join(done[:-1])).collnet.initialized


def test_network_name_with_a_space():
    """aws-ofi-nccl's network is "AWS Libfabric" (NVIDIA/nccl#1597, aws/aws-ofi-nccl#715): the
    whole name, and its connections, GPUDirect RDMA included."""
    p = "8h200-2:14630:14695 [1] NCCL INFO "
    r = parse_logs("\n".join(p + m for m in (
        "NET/OFI Selected Provider is efa (found 4 nics)", "Using network AWS Libfabric",
        "Channel 05/0 : 0[0] -> 1[1] [receive] via NET/AWS Libfabric/1/GDRDMA",
        "Channel 00/0 : 1[1] -> 0[0] [send] via NET/AWS Libfabric/1/GDRDMA")))
    assert r.network == "AWS Libfabric" and r.transports == ["NET/AWS Libfabric"]
    assert r.gdr is True
    assert path_lines(r)[0].startswith("NCCL ?, ? rank(s) on ? node(s); network AWS Libfabric; "
                                       "transports NET/AWS Libfabric; GDR yes")


def test_gdr_capable_hca_without_a_network_connection_is_not_gdr_used():
    """One node on an IB machine: NCCL says the HCA could do GPUDirect RDMA, but every
    connection is NVLink (P2P), so no GDR was used; only a NET connection's /GDRDMA says so."""
    p = "node01:1000:1050 [0] NCCL INFO "
    lines = [p + m for m in (
        "NCCL version 2.21.5+cuda12.4",
        "NET/IB : Using [0]mlx5_0:1/IB [1]mlx5_1:1/IB [RO]; OOB ib0:10.0.0.1<0>",
        "NET/IB : GPU Direct RDMA Enabled for HCA 0 'mlx5_0'",
        "NET/IB : GPU Direct RDMA Enabled for HCA 1 'mlx5_1'", "Using network IB",
        "comm 0x5501 rank 0 nRanks 4 nNodes 1 localRanks 4 localRank 0 MNNVL 0",
        "Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM/read", "Connected all rings")]
    r = parse_logs("\n".join(lines))
    assert r.transports == ["P2P/CUMEM"] and r.gdr is None
    assert "; GDR ?;" in path_lines(r)[0]
    r = parse_logs("\n".join(lines + [
        p + "Channel 00/0 : 4[0] -> 0[0] [receive] via NET/IB/0/GDRDMA"]))
    assert r.gdr is True


def test_garbled_graph_line_does_not_raise():
    """Two ranks writing one stdout can splice a line; a bandwidth that is not a number is
    not one, and the rest of the report stands."""
    r = parse_logs("h:1:1 [0] NCCL INFO Pattern 4, crossNic 0, nChannels 16, bw 40.000000/"
                   ".40.000000, type NVL/PIX, sameChannels 1\n"
                   "h:1:1 [0] NCCL INFO Pattern 1, crossNic 0, nChannels 2, bw 1..25/2.5, type "
                   "NVL/SYS, sameChannels 1")
    assert [(g.name, g.n_channels, g.bw_intra) for g in r.graphs] == [("RING", 16, None),
                                                                      ("BALANCED_TREE", 2, None)]


def test_sweep_prints_the_nccl_path_of_every_profile(tmp_path, monkeypatch, capsys):
    """perf.allreduce_sweep with --backend nccl: after a profile's tables, the path NCCL took
    (from its logs) and, at the end, the flags. The job is faked: the 'ranks' leave the captured
    log and one result record where real ones would."""
    from perf import allreduce_sweep as sweep

    def fake_launch(args, profile, job_dir, sizes):
        with open(os.path.join(job_dir, "nccl.vm.888.log"), "w") as fh:
            fh.write(read(H200))
        with open(os.path.join(job_dir, "rank0.jsonl"), "w") as fh:
            fh.write(json.dumps({"split": "world", "collective": "all_reduce", "size": 8,
                                 "rank": 0, "world_size": 1,
                                 "outofplace": {"time_s": 4e-5, "wrong": 0, "count": 2},
                                 "inplace": {"time_s": 2e-5, "wrong": 0, "count": 2}}) + "\n")
        return []

    monkeypatch.setattr(sweep, "launch", fake_launch)
    monkeypatch.setattr(sweep, "wait", lambda procs, job_dir, expected, timeout_s: None)
    out_dir = tmp_path / "sweep"
    # one rank on this host through the deepspeed launcher, which is installed wherever dsfm
    # is (srun was only where Slurm is, so elsewhere the sweep refused the job before the point
    # of this test; a local launch refuses NCCL without GPUs); the launch itself is faked
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n")
    assert sweep.main(["--backend", "nccl", "--launcher", "deepspeed", "--hostfile",
                       str(hostfile), "-e", "8", "--out", str(out_dir),
                       "--profiles", "sharp_on,ring"]) == 0
    out = capsys.readouterr().out
    table = out.index("# profile sharp_on | split world | all_reduce | nranks 1")
    path = out.index("# NCCL path, profile sharp_on (perf.nccl_log):")
    assert table < path < out.index("== profile ring")
    assert "#   NCCL 2.28.9+cuda13.0, 1 rank(s) on 1 node(s); network Socket, failed: IB" in out
    assert out.count("#   AllReduce: 4 B-64 MiB: no algorithm (1 rank: local copy)\n") == 2
    assert out.count("#   AllGather: 8 B-64 MiB: no algorithm (1 rank: local copy)\n") == 2
    flags = [ln for ln in out.splitlines() if ln.startswith("flag: ")]
    assert flags == [
        f"flag: profile sharp_on: NCCL_COLLNET_ENABLE=1 but CollNet was not initialized: "
        f"{NO_PLUGIN}",
        f"flag: profile sharp_on: NCCL_COLLNET_ENABLE=1 {DID_NOT_APPLY}",
        "flag: profile ring: NCCL_ALGO=Ring " + DID_NOT_APPLY]
    # the sweep's own nccl_report, as drive() uses it
    path, flags = sweep.nccl_report(str(out_dir / "ring"), sweep.load_profile("ring"))
    assert path == path_lines(parse_logs(H200)) and len(flags) == 1
    assert sweep.nccl_report(str(tmp_path), {"name": "x", "env": {}}) == (
        [], [f"profile x: no NCCL logs in {tmp_path}"])


# ------------------------------------------------------------------------------ 2.27+ TUNING
# A rank 0 on one 8-GPU node (NCCL 2.28.9): COLL lines as enqueue.cc prints them, TUNING lines
# in the forms of NVIDIA/nccl's sources: src/scheduler/symmetric_sched.cc "%s [Symmetric]: %ld
# Bytes -> Kernel %s nchannels %d nthreads %d nWorks %d" (2.27's enqueue.cc: without nWorks;
# kernel names from src/include/sym_kernels.h ncclSymKernelStr), enqueue.cc "%s [Copy Engine]:
# %ld Bytes -> cudaMemcpy%s" and "%s [Hierarchical CE]: %ld Bytes -> RMA proxy + CE", and the
# classic "%s: %ld Bytes -> Algo %s proto %s channel{Lo..Hi}={%d..%d} cgaClusterSize %d".
H100 = "h100-01:5101:5101 [0] NCCL INFO "
SYM_COMM = "0x55d0c1e2a0"


def coll_line(func, count, dtype, comm=SYM_COMM, nranks=8, op=0):
    return (f"{func}: opCount {op:x} sendbuff 0x7f21a0000000 recvbuff 0x7f21a8000000 count "
            f"{count} datatype {dtype} op 0 root 0 comm {comm} [nranks={nranks}] stream "
            "0x55d0c1f000")


def test_tagged_tuning_lines_of_symmetric_kernels_and_copy_engines():
    """NCCL 2.27+ print no "Algo .. proto .." for a collective that a symmetric kernel or the
    copy engine runs, but a line tagged [Symmetric] / [Copy Engine] with its size. Before, such
    calls read as 'algorithm unknown (no TUNING line)' and NCCL_ALGO could not be checked
    against them; now they are the SYMMETRIC (kernel) and COPY_ENGINE paths, one symmetric
    line of nWorks 2 covers its two calls, and the classic line is read as before."""
    text = "\n".join(H100 + m for m in (
        "NCCL version 2.28.9+cuda13.0",
        f"ncclCommInitRankConfig comm {SYM_COMM} rank 0 nranks 8 cudaDev 0 nvmlDev 0 busId "
        "18000 commId 0x5be7c6c1a2d3e4f5 - Init COMPLETE",
        coll_line("AllReduce", 1024, 7, op=0),
        "AllReduce [Symmetric]: 4096 Bytes -> Kernel AllReduce_AGxLL_R nchannels 2 nthreads 512",
        coll_line("AllReduce", 262144, 7, op=1),
        "AllReduce [Symmetric]: 1048576 Bytes -> Kernel AllReduce_AGxLLMC_R nchannels 16 "
        "nthreads 512 nWorks 1",
        coll_line("AllGather", 1048576, 9, op=2),
        "AllGather [Copy Engine]: 2097152 Bytes -> cudaMemcpy; CE synchronization with NVLS",
        coll_line("ReduceScatter", 65536, 7, op=3),
        coll_line("ReduceScatter", 131072, 7, op=4),
        "ReduceScatter [Symmetric]: 786432 Bytes -> Kernel ReduceScatter_LDMC nchannels 8 "
        "nthreads 512 nWorks 2",
        coll_line("AllReduce", 16777216, 7, op=5),
        "AllReduce: 67108864 Bytes -> Algo NVLS proto SIMPLE channel{Lo..Hi}={0..15} "
        "cgaClusterSize 4"))
    r = parse_logs(text)
    assert choices(r) == {
        ("AllReduce", 4096): {("SYMMETRIC", "AGxLL_R"): 1},
        ("AllReduce", MiB): {("SYMMETRIC", "AGxLLMC_R"): 1},
        ("AllGather", 2 * MiB): {("COPY_ENGINE", ""): 1},
        ("ReduceScatter", 256 << 10): {("SYMMETRIC", "LDMC"): 1},
        ("ReduceScatter", 512 << 10): {("SYMMETRIC", "LDMC"): 1},
        ("AllReduce", 64 * MiB): {("NVLS", "SIMPLE"): 1}}
    assert not r.warnings
    lines = path_lines(r)
    assert "AllGather: 2 MiB: COPY_ENGINE" in lines
    assert "AllReduce: 4 KiB: SYMMETRIC/AGxLL_R; 1 MiB: SYMMETRIC/AGxLLMC_R; 64 MiB: " \
        "NVLS/SIMPLE" in lines
    assert "ReduceScatter: 256 KiB-512 KiB: SYMMETRIC/LDMC" in lines
    assert verify(r, {"NCCL_ALGO": "nvls"}) == [
        "NCCL_ALGO=nvls but AllReduce used SYMMETRIC for 4 KiB x1, 1 MiB x1"]
    assert verify(r, {"NCCL_PROTO": "Simple"}) == []     # a kernel or copy engine: no protocol
    r = parse_logs(H100 + "AllGather [Hierarchical CE]: 8388608 Bytes -> RMA proxy + CE\n"
                   + H100 + "AllReduce [Symmetric]: 1048576 Bytes -> Kern")
    assert choices(r) == {("AllGather", 8 * MiB): {("HIERARCHICAL_CE", ""): 1}}
    assert "1 truncated or unreadable TUNING line(s) skipped" in r.warnings


# ------------------------------------------------------------------------------ communicators
# Two nodes x 4 GPUs, a world communicator and a split per node (as torch's process groups make
# them), NCCL 2.28 formats from init.cc: "%s comm %p rank %d nranks %d cudaDev %d nvmlDev %d
# busId %lx commId 0x%llx - Init START|COMPLETE" (a split's COMPLETE line prints "parent %p
# splitCount %d color %d key %d" and no commId), "comm %p rank %d nRanks %d nNodes %d localRanks
# %d localRank %d MNNVL %d", "comm %p rank %d nranks %d cudaDev %d busId %lx - Destroy
# COMPLETE"; each process is rank 0 of its node's split, node01's also of the world.
WORLD_ID = "0x9a1c44e02b7d6f31"


def two_node_job(node02_split_choice="NVLS proto SIMPLE channel{Lo..Hi}={0..15}",
                 node02_version="2.28.3+cuda12.9", node02_network="IB"):
    lines = []
    for host, pid, world, split, rank, color in (("node01", 1000, "0x5601a0", "0x5602b0", 0, 0),
                                                  ("node02", 2000, "0x7f10c0", "0x7f20d0", 4, 1)):
        p = f"{host}:{pid}:{pid} [0] NCCL INFO "
        version = "2.28.3+cuda12.9" if host == "node01" else node02_version
        network = "IB" if host == "node01" else node02_network
        lines += [p + m for m in (
            f"NCCL version {version}",      # printed by rank 0 of a ncclCommInitRank only; the
            f"Using network {network}",     # splits make each process a rank 0 here
            f"ncclCommInitRankConfig comm {world} rank {rank} nranks 8 cudaDev 0 nvmlDev 0 busId "
            f"18000 commId {WORLD_ID} - Init START",
            f"comm {world} rank {rank} nRanks 8 nNodes 2 localRanks 4 localRank 0 MNNVL 0",
            f"ncclCommInitRankConfig comm {world} rank {rank} nranks 8 cudaDev 0 nvmlDev 0 busId "
            f"18000 commId {WORLD_ID} - Init COMPLETE",
            f"comm {split} rank 0 nRanks 4 nNodes 1 localRanks 4 localRank 0 MNNVL 0",
            f"ncclCommSplit comm {split} rank 0 nranks 4 cudaDev 0 nvmlDev 0 busId 18000 parent "
            f"{world} splitCount 1 color {color} key 0 - Init COMPLETE",
            coll_line("AllReduce", 262144, 7, comm=world, nranks=8),
            coll_line("AllReduce", 262144, 7, comm=split, nranks=4))]
        if host == "node01":        # the world's rank 0, then its split's
            lines.insert(-1, p + "AllReduce: 1048576 Bytes -> Algo TREE proto LL128 "
                                 "channel{Lo..Hi}={0..7}")
            lines.append(p + "AllReduce: 1048576 Bytes -> Algo NVLS proto SIMPLE "
                             "channel{Lo..Hi}={0..15}")
        else:
            lines.append(p + f"AllReduce: 1048576 Bytes -> Algo {node02_split_choice}")
    return lines


def test_several_communicators_are_reported_apart():
    """A log with several communicators: before, their choices were merged by size (the
    world's TREE and the node splits' NVLS for the same 1 MiB read 'NVLS/SIMPLE x2 + TREE/LL128
    x1' for one collective); now the path is given per communicator (the world joined over its
    ranks by commId, a split by its rank 0), also in the table and the JSON, and a destroyed
    communicator's address reused by a new one is another communicator."""
    r = parse_logs("\n".join(two_node_job()))
    assert [c.label for c in r.comm_paths] == [
        f"commId {WORLD_ID} (8 rank(s), 2 node(s))",
        "comm 0x5602b0 of node01:1000 (4 rank(s), 1 node(s))",
        "comm 0x7f20d0 of node02:2000 (4 rank(s), 1 node(s))"]
    assert [dict(c.calls) for c in r.comm_paths] == [{("AllReduce", MiB): 1}] * 3
    assert path_lines(r)[1:] == [
        f"communicator commId {WORLD_ID} (8 rank(s), 2 node(s)):",
        "  AllReduce: 1 MiB: TREE/LL128",
        "communicator comm 0x5602b0 of node01:1000 (4 rank(s), 1 node(s)):",
        "  AllReduce: 1 MiB: NVLS/SIMPLE",
        "communicator comm 0x7f20d0 of node02:2000 (4 rank(s), 1 node(s)):",
        "  AllReduce: 1 MiB: NVLS/SIMPLE"]
    table = summary(r)
    assert f"communicator commId {WORLD_ID} (8 rank(s), 2 node(s))\n" in table
    assert re.search(r"AllReduce\s+1048576\s+1 MiB TREE\s+LL128\s+1\s+8\n", table)
    assert len(re.findall(r"AllReduce\s+1048576\s+1 MiB NVLS\s+SIMPLE\s+1\s+4", table)) == 2
    doc = r.to_dict()["communicator_paths"]
    assert [(c["comm_id"], c["nranks"], c["collectives"]) for c in doc][:2] == [
        (WORLD_ID, 8, [{"collective": "AllReduce", "bytes": MiB, "algorithm": "TREE",
                        "protocol": "LL128", "count": 1}]),
        (None, 4, [{"collective": "AllReduce", "bytes": MiB, "algorithm": "NVLS",
                    "protocol": "SIMPLE", "count": 1}])]
    # node01's split destroyed, a new communicator at its address: two communicators
    p = "node01:1000:1000 [0] NCCL INFO "
    reused = two_node_job() + [p + m for m in (
        "comm 0x5602b0 rank 0 nranks 4 cudaDev 0 busId 18000 - Destroy COMPLETE",
        "ncclCommInitRankConfig comm 0x5602b0 rank 0 nranks 2 cudaDev 0 nvmlDev 0 busId 18000 "
        "commId 0x31d2c0ffee5eed01 - Init START",
        "comm 0x5602b0 rank 0 nRanks 2 nNodes 2 localRanks 1 localRank 0 MNNVL 0",
        coll_line("AllReduce", 262144, 7, comm="0x5602b0", nranks=2),
        "AllReduce: 1048576 Bytes -> Algo RING proto SIMPLE channel{Lo..Hi}={0..1}")]
    r = parse_logs("\n".join(reused))
    assert {c.label: {k: dict(v) for k, v in c.choices.items()} for c in r.comm_paths} == {
        f"commId {WORLD_ID} (8 rank(s), 2 node(s))": {("AllReduce", MiB): {("TREE", "LL128"): 1}},
        "commId 0x31d2c0ffee5eed01 (2 rank(s), 2 node(s))": {
            ("AllReduce", MiB): {("RING", "SIMPLE"): 1}},
        "comm 0x5602b0 of node01:1000 (4 rank(s), 1 node(s))": {
            ("AllReduce", MiB): {("NVLS", "SIMPLE"): 1}},
        "comm 0x7f20d0 of node02:2000 (4 rank(s), 1 node(s))": {
            ("AllReduce", MiB): {("NVLS", "SIMPLE"): 1}}}


def test_ranks_that_disagree_are_flagged(capsys, tmp_path):
    """Two nodes of one job on different NCCL releases, networks, net plugins, and node splits
    of the same shape (4 ranks, 1 node) that chose differently for the same size: before, the
    report took the first version and the last network it read and said nothing; now each
    disagreement is a `mismatch` of the report and a flag of verify() (exit status 1). The
    world (8 ranks on 2 nodes) is not compared with the splits."""
    job = two_node_job(node02_split_choice="RING proto LL128 channel{Lo..Hi}={0..3}",
                       node02_version="2.27.5+cuda12.9", node02_network="IBext_v8")
    # the HPC-X plugin in two builds (names as NCCL 2.20+ and 2.14-2.18 print them)
    job += ["node01:1000:1000 [0] NCCL INFO NET/Plugin: Loaded net plugin NCCL RDMA Plugin v8 (v8)",
            "node02:2000:2000 [0] NCCL INFO NET/Plugin: Loaded net plugin NCCL RDMA Plugin (v5)"]
    r = parse_logs("\n".join(job))
    assert r.mismatches == [
        "NCCL version differs between processes: 2.27.5+cuda12.9 on node02:2000; "
        "2.28.3+cuda12.9 on node01:1000",
        "network differs between processes: IB on node01:1000; IBext_v8 on node02:2000",
        "net plugin differs between processes: NCCL RDMA Plugin on node02:2000; NCCL RDMA "
        "Plugin v8 on node01:1000",
        "AllReduce on the communicators of 4 rank(s) on 1 node(s) chose differently for the "
        "same size: 1 MiB: NVLS/SIMPLE on comm 0x5602b0 of node01:1000, RING/LL128 on comm "
        "0x7f20d0 of node02:2000"]
    assert verify(r, {}) == [f"ranks disagree: {m}" for m in r.mismatches]
    assert [ln for ln in path_lines(r) if ln.startswith("mismatch: ")] == [
        f"mismatch: {m}" for m in r.mismatches]
    assert r.to_dict()["mismatches"] == r.mismatches
    # a split that itself chose two ways for 1 MiB (grouped calls are tuned together) is not
    # compared for that size
    p = "node02:2000:2000 [0] NCCL INFO "
    grouped = job + [p + coll_line("AllReduce", 262144, 7, comm="0x7f20d0", nranks=4, op=1),
                     p + "AllReduce: 1048576 Bytes -> Algo NVLS proto SIMPLE "
                         "channel{Lo..Hi}={0..15}"]
    assert parse_logs("\n".join(grouped)).mismatches == r.mismatches[:3]
    # the same job where the nodes agree: nothing to say
    agreeing = parse_logs("\n".join(two_node_job()))
    assert agreeing.mismatches == [] and verify(agreeing, {}) == []
    (tmp_path / "job.log").write_text("\n".join(job) + "\n")
    assert main([str(tmp_path / "job.log")]) == 1
    assert "flag: ranks disagree: NCCL version differs between processes" in \
        capsys.readouterr().out


def test_ranks_with_another_cuda_driver_or_nccl_setting_are_flagged():
    """A node on another CUDA driver, and a node where a requested NCCL_* value did not arrive:
    before, the driver line was not read at all, and an echoed NCCL_* value that differed from
    the first rank's was only a warning, so verify() passed a profile whose setting held on
    rank 0 alone; now both are mismatches and flags (NCCL echoes each set parameter, and the
    driver, once per process)."""
    def job(node02_driver, node02_hca):
        head = []
        for host, pid, driver, hca in (("node01", 1000, "12040", "mlx5_0,mlx5_1"),
                                       ("node02", 2000, node02_driver, node02_hca)):
            p = f"{host}:{pid}:{pid} [0] NCCL INFO "
            head += [p + f"cudaDriverVersion {driver}",
                     p + f"NCCL_IB_HCA set by environment to {hca}"]
        return "\n".join(head + two_node_job())

    r = parse_logs(job("12020", "mlx5_0"))
    assert r.cuda_driver == "12040" and r.env["NCCL_IB_HCA"] == "mlx5_0,mlx5_1"
    assert r.mismatches == [
        "CUDA driver differs between processes: 12020 on node02:2000; 12040 on node01:1000",
        "NCCL_IB_HCA differs between processes: mlx5_0 on node02:2000; mlx5_0,mlx5_1 on "
        "node01:1000"]
    assert verify(r, {"NCCL_IB_HCA": "mlx5_0,mlx5_1"})[-2:] == [
        f"ranks disagree: {m}" for m in r.mismatches]
    assert summary(r).startswith("NCCL 2.28.3+cuda12.9 (CUDA driver 12040): ")
    assert r.to_dict()["cuda_driver"] == "12040"
    # the same values on both nodes: nothing to say
    agreeing = parse_logs(job("12040", "mlx5_0,mlx5_1"))
    assert agreeing.mismatches == [] and verify(agreeing, {"NCCL_IB_HCA": "mlx5_0,mlx5_1"}) == []
