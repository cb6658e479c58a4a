"""SLURM hostlists, tasks-per-node lists and DeepSpeed hostfiles, read back by DeepSpeed."""

import os
import sys

import pytest
from deepspeed.launcher.runner import _parse_hostfile

from dsfm.errors import ConfigError
from dsfm.runtime.slurm import (
    expand_nodelist,
    expand_tasks_per_node,
    hostfile_lines,
    main,
    slots_from_env,
)
from tests.conftest import REPO, run


@pytest.mark.parametrize("text, hosts", [
    ("login1", ["login1"]),
    ("gpu[001-003,007],login1", ["gpu001", "gpu002", "gpu003", "gpu007", "login1"]),
    ("a[1-2]-ib[3-4]", ["a1-ib3", "a1-ib4", "a2-ib3", "a2-ib4"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("n[98-101]", ["n98", "n99", "n100", "n101"]),
    ("rack1-n[1-2].ib,x[5]", ["rack1-n1.ib", "rack1-n2.ib", "x5"]),
    (" raphael[001-002] ", ["raphael001", "raphael002"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


def test_expand_nodelist_keeps_the_cluster_order_and_size():
    hosts = expand_nodelist("raphael[001-024]")
    assert len(hosts) == 24 and hosts[0] == "raphael001" and hosts[-1] == "raphael024"


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("   ", "empty"),
    ("gpu[001-003", "never closed"),
    ("gpu001-003]", "closes no"),
    ("gpu[1-[2]]", "nested"),
    ("gpu[5-3]", "reversed"),
    ("gpu[]", "empty brackets"),
    ("gpu[a-c]", "bad range"),
    ("gpu[1-]", "bad range"),
    ("gpu[1,,2]", "bad range"),
    ("a,,b", "empty entry"),
    ("a,b,", "empty entry"),
    ("gpu 1", "not a host name"),
])
def test_malformed_nodelists_are_errors(text, words):
    with pytest.raises(ConfigError, match=words):
        expand_nodelist(text)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("4(x24)") == [4] * 24
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    with pytest.raises(ConfigError, match="bad entry"):
        expand_tasks_per_node("4x2")


def test_hostfile_lines_and_their_errors():
    assert hostfile_lines(["a", "b"], 4) == ["a slots=4", "b slots=4"]
    with pytest.raises(ConfigError, match="listed twice"):
        hostfile_lines(["a", "a"], 4)
    with pytest.raises(ConfigError, match="empty"):
        hostfile_lines([], 4)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="positive integer"):
            hostfile_lines(["a"], bad)
    assert hostfile_lines(["a", "b"], [4, 2]) == ["a slots=4", "b slots=2"]


@pytest.mark.parametrize("environ, slots", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "2"}, (4, "SLURM_GPUS_ON_NODE")),
    # an allocation for DeepSpeed's own launcher: one task per node, four GPUs, four slots
    ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_PER_NODE": "4"}, (4, "SLURM_GPUS_PER_NODE")),
    ({"SLURM_NTASKS_PER_NODE": "2"}, (2, "SLURM_NTASKS_PER_NODE")),             # CPU nodes
    ({"SLURM_GPUS_PER_NODE": "h100:4"}, (4, "SLURM_GPUS_PER_NODE")),
    ({"SLURM_GPUS_PER_NODE": "gpu:h100:8"}, (8, "SLURM_GPUS_PER_NODE")),
    ({}, (4, "default")),
    # --gres=gpu:4 in an salloc shell: no GPU count, the allocated GPUs' ids
    ({"SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_GPUS": "0,1,2,3"}, (4, "SLURM_JOB_GPUS")),
    # -n/-N alone, CPU nodes: the tasks SLURM places on each node (they took 4 before)
    ({"SLURM_TASKS_PER_NODE": "2"}, ([2], "SLURM_TASKS_PER_NODE")),
    ({"SLURM_TASKS_PER_NODE": "4(x3),2"}, ([4, 4, 4, 2], "SLURM_TASKS_PER_NODE")),
    # one task per node (DeepSpeed's launcher, whole nodes without --gres): the default
    ({"SLURM_TASKS_PER_NODE": "1(x24)"}, (4, "default")),
])
def test_slots_from_the_allocation(environ, slots):
    assert slots_from_env(environ) == slots


@pytest.mark.parametrize("value", ["h100:x", "0", "a100:2,h100:2"])
def test_unreadable_slot_counts_are_errors(value):
    with pytest.raises(ConfigError, match="SLURM_GPUS_PER_NODE"):
        slots_from_env({"SLURM_GPUS_PER_NODE": value})
    with pytest.raises(ConfigError, match="SLURM_JOB_GPUS='0,gpu1': expected GPU ids"):
        slots_from_env({"SLURM_JOB_GPUS": "0,gpu1"})
    with pytest.raises(ConfigError, match="SLURM_TASKS_PER_NODE='2,0': a node with no task"):
        slots_from_env({"SLURM_TASKS_PER_NODE": "2,0"})


def test_per_node_slots_reach_the_hostfile(tmp_path, capsys):
    environ = {"SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n[1-4]",
               "SLURM_TASKS_PER_NODE": "4(x3),2"}
    assert main(["--out", str(tmp_path / "h")], environ=environ) == 0
    pool = _parse_hostfile((tmp_path / "h").read_text().splitlines())
    assert dict(pool) == {"n1": 4, "n2": 4, "n3": 4, "n4": 2}
    assert "wrote 4 hosts, 14 slots (4(x3),2)" in capsys.readouterr().out
    environ["SLURM_TASKS_PER_NODE"] = "4(x3)"                 # not one count per host
    assert main(["--out", str(tmp_path / "h")], environ=environ) == 2
    assert "3 slot counts for 4 hosts" in capsys.readouterr().err


def test_cli_writes_a_hostfile_deepspeed_reads(tmp_path):
    out = tmp_path / "hosts"
    env = dict(os.environ, PYTHONPATH=REPO, SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="raphael[001-003,010]", SLURM_GPUS_PER_NODE="h100:4")
    env.pop("SLURM_GPUS_ON_NODE", None)
    env.pop("SLURM_NTASKS_PER_NODE", None)
    proc = run([sys.executable, "-m", "dsfm.runtime.slurm", "--out", str(out)], env=env)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "4 hosts x 4 slots" in proc.stdout
    text = out.read_text()
    assert text.startswith("# ") and "4242" in text               # the comment header
    pool = _parse_hostfile(text.splitlines())
    assert list(pool.items()) == [("raphael001", 4), ("raphael002", 4), ("raphael003", 4),
                                  ("raphael010", 4)]


def test_cli_default_output_and_slots_option(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    environ = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "g[1-2]", "SLURM_GPUS_ON_NODE": "4"}
    assert main(["--slots", "2"], environ=environ) == 0
    pool = _parse_hostfile((tmp_path / "hostfile-77").read_text().splitlines())
    assert dict(pool) == {"g1": 2, "g2": 2}
    assert str(tmp_path / "hostfile-77") in capsys.readouterr().out


def test_cli_outside_an_allocation_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = REPO
    proc = run([sys.executable, "-m", "dsfm.runtime.slurm", "--out", str(tmp_path / "h")],
               env=env)
    assert proc.returncode == 2
    assert "not inside a SLURM allocation" in proc.stderr and "SLURM_JOB_NODELIST" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "h").exists()


def test_cli_rejects_a_malformed_nodelist(tmp_path, capsys):
    environ = {"SLURM_JOB_NODELIST": "gpu[3-1]"}
    assert main(["--out", str(tmp_path / "h")], environ=environ) == 2
    assert "reversed range" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_cli_says_in_one_line_when_the_hostfile_cannot_be_written(tmp_path, capsys):
    """--out in a folder that does not exist, or naming a folder: that was an OSError's
    traceback after the nodelist had been read."""
    environ = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "g[1-2]"}
    for out, why in ((tmp_path / "missing" / "h", "No such file or directory"),
                     (tmp_path, "Is a directory")):
        assert main(["--out", str(out)], environ=environ) == 2
        err = capsys.readouterr().err
        assert err == f"error: cannot write the hostfile {out}: {why}; pass --out FILE, a file " \
                      "in an existing folder you can write to\n"
    assert not (tmp_path / "missing").exists()


def test_the_cluster_hostfile_is_24_nodes_of_4_slots():
    with open(os.path.join(REPO, "hostfiles", "raphael")) as f:
        lines = f.read().splitlines()
    assert any(line.startswith("#") for line in lines)                # documented in place
    pool = _parse_hostfile(lines)
    assert list(pool) == expand_nodelist("raphael[001-024]")
    assert set(pool.values()) == {4}
