"""rank0_first: the other ranks wait for rank 0's work (simulating the demo data) however long it
takes, not only as long as the process group's timeout, and learn when it failed. told_by: what
one rank saw (a data error) told to every rank.

Two real processes join a gloo group whose collective timeout is 2 s; rank 0's work takes 5 s.
A barrier in its place (the control) times out; rank0_first does not.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import datetime, json, os, sys, time
    import torch, torch.distributed as td
    from dsfm.errors import DsfmError
    from dsfm.runtime.engine import rank0_first, told_by

    mode = sys.argv[1]
    td.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    rank = td.get_rank()

    def work():
        time.sleep(5)
        if mode == "fail":
            raise DsfmError("no space left on /data\\nsecond line")
        return "made"

    out = {"rank": rank}
    try:
        if mode == "told":
            seen = "/data/ω.hdf5: NaN at time index 3" if rank == 1 else "not read"
            out["result"] = [told_by(1, seen, "cpu"), told_by(1, seen, "cpu", limit=7),
                             told_by(0, None, "cpu")]
        elif mode == "barrier":
            if rank == 0:
                work()
            td.barrier()
        elif mode == "exit":     # rank 0 refuses what it made at once, and exits
            out["result"] = rank0_first(work, "test")
            print("RESULT " + json.dumps(out), flush=True)
            os._exit(0)
        else:
            out["result"] = rank0_first(work, "test")
        t = torch.tensor([rank + 1])
        td.all_reduce(t)                 # the group still works afterwards
        out["sum"] = int(t)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    print("RESULT " + json.dumps(out), flush=True)
    td.destroy_process_group() if "error" not in out else None
""")


def launch(mode):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "WORLD_SIZE": "2", "PYTHONPATH": REPO}
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, mode], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = {}
    for p in procs:
        out, _ = p.communicate(timeout=120)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        assert lines, out
        r = json.loads(lines[-1][len("RESULT "):])
        results[r["rank"]] = r
    return results


def test_the_others_wait_for_rank_0_longer_than_the_collective_timeout():
    control = launch("barrier")
    assert "Timed out" in control[1].get("error", ""), control     # what a barrier does
    got = launch("ok")
    assert got[0] == {"rank": 0, "result": "made", "sum": 3}
    assert got[1] == {"rank": 1, "result": None, "sum": 3}


def test_a_failure_on_rank_0_stops_the_others_with_its_message():
    got = launch("fail")
    assert got[0]["error"] == "DsfmError: no space left on /data\nsecond line"
    assert got[1]["error"] == "DsfmError: rank 0 failed: no space left on /data"


def test_rank_0_exiting_right_after_its_work_leaves_the_others_its_verdict():
    """Rank 0 hosts the store: exiting right after its work (a check of the data it simulated
    failing at once), it left the others, asleep between polls, to find the store gone: "rank
    0 stopped while this rank waited for it", after a C++ stack trace of torch's store client.
    It waits (bounded) until they have read its verdict, as it did when its work failed."""
    got = launch("exit")
    assert got[0] == {"rank": 0, "result": "made"}
    assert got[1] == {"rank": 1, "result": None}


def test_one_ranks_text_is_told_to_every_rank():
    """The failing rank's message, on every rank, whatever the others pass; cut at `limit`
    bytes (here inside the two-byte ω: the half character is replaced, not an error)."""
    got = launch("told")
    for rank in (0, 1):
        assert got[rank]["result"] == ["/data/ω.hdf5: NaN at time index 3", "/data/\ufffd", ""]
        assert got[rank]["sum"] == 3
