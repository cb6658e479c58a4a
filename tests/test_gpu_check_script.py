"""perf/gpu_check.sh runs only on a borrowed GPU machine with minutes to spare, so its plumbing is
checked here: valid bash, every test file it names exists, and every flag it passes to a dsfm or
perf command is one that command accepts (its --help lists it)."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = os.path.join(REPO, "perf", "gpu_check.sh")


def commands() -> list[list[str]]:
    """The script's python3 command lines (continuations joined), as argument lists."""
    text = open(SCRIPT).read().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.split(" #")[0]
        at = line.find("python3 ")
        if at < 0 or "pip install" in line or "python3 -c" in line:
            continue
        words = shlex.split(line[at:].split(">")[0].split("|")[0].rstrip(") &"))
        out.append(words[1:])
    return out


def test_the_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_named_test_files_exist():
    named = [w for cmd in commands() if cmd[:2] == ["-m", "pytest"] for w in cmd
             if w.startswith("tests/")]
    assert named and all(os.path.exists(os.path.join(REPO, w)) for w in named), named


@pytest.mark.parametrize("cmd", [c for c in commands() if c[:2] != ["-m", "pytest"]],
                         ids=lambda c: c[1] if c[0] == "-m" else c[0])
def test_every_flag_is_accepted(cmd):
    target = cmd[:2] if cmd[0] == "-m" else cmd[:1]
    flags = {w.split("=")[0] for w in cmd[len(target):] if re.match(r"^--?[A-Za-z]", w)}
    proc = subprocess.run([sys.executable, *target, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])",
                                                 proc.stdout)]
    assert not missing, f"{' '.join(target)} does not accept {missing}"


def test_the_training_overrides_are_valid_config_keys():
    from dsfm.config import load_config

    runs = [c for c in commands() if c[0] == "dsfm/train.py"]
    assert runs
    for cmd in runs:
        sets = [cmd[i + 1] for i, w in enumerate(cmd) if w == "--set"]
        load_config(None, sets)           # raises on an unknown key or a bad value
