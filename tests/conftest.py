"""Shared fixtures: the demo datasets, generated once per session by the real CLI."""

import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATASETS = ("navier_stokes_2d", "shallow_water_2d", "gray_scott_reaction_diffusion",
                 "euler_2d")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long-running test (runs in CI)")
    # One intra-op thread per process unless OMP_NUM_THREADS says otherwise: the suite runs two
    # pytest workers on two cores, and the ranks it launches (the DeepSpeed launcher sets no
    # thread count without --bind_cores_to_rank) each started a pool as wide as the machine,
    # whose threads spin waiting for work against the other processes. Measured on the CI VM
    # under `-n 2` (docs/performance.md): tests/test_train.py 1,668 CPU-seconds with two threads,
    # 1,488 with one (wall 902 s, 815 s); tests/runtime 365 and 260 (wall 199 s, 150 s).
    # The workers inherit the variable from the controller, the ranks from the tests.
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_sessionstart(session):
    """DeepSpeed compiles its CPU shared-memory communication op the first time a process group
    starts on CPU (minutes on two cores, then cached in ~/.cache/torch_extensions): build it
    once here, not inside whichever multi-rank test comes first and under its timeout."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        builder = accelerator.create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            builder.load()


def free_port() -> int:
    """A port for a launch's rendezvous: free now and below the kernel's ephemeral range, where
    no outgoing connection (gloo's own among them) can take it before the launch binds it. The
    OS's pick (bind to port 0) comes from that range and can be taken in the meantime."""
    low = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    low = max(low, 12000)
    for _ in range(200):
        port = random.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port in 10000-{low - 1} after 200 tries")


def wait_for_logged_steps(run_dir, n: int, timeout_s: float) -> bool:
    """Wait until a run's metrics.jsonl holds `n` lines (logged steps), at most `timeout_s`;
    whether it does."""
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout_s
    while time.time() < deadline and (not metrics.exists() or
                                      len(metrics.read_text().splitlines()) < n):
        time.sleep(0.1)
    return metrics.exists() and len(metrics.read_text().splitlines()) >= n


def run(args, **kwargs):
    """Run a command from the repository root, returning the CompletedProcess."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(args, cwd=REPO, **kwargs)


@pytest.fixture(scope="session")
def demo_base(tmp_path_factory):
    """`python -m dsfm.sim --preset demo --out BASE`, once per test session."""
    base = tmp_path_factory.mktemp("well")
    proc = run([sys.executable, "-m", "dsfm.sim", "--preset", "demo", "--out", str(base),
                "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return str(base)


@pytest.fixture(scope="session")
def pdebench_base(tmp_path_factory):
    """`python -m dsfm.sim --preset demo --format pdebench`, once per test session: the four
    PDEBench layouts under BASE/pdebench/{swe,diff_react,incomp_ns,comp_ns}. Read only."""
    base = tmp_path_factory.mktemp("pdebench")
    proc = run([sys.executable, "-m", "dsfm.sim", "--preset", "demo", "--format", "pdebench",
                "--out", str(base), "--quiet"])
    assert proc.returncode == 0, proc.stderr
    return base / "pdebench"


@pytest.fixture(scope="session")
def normalize_kernel():
    """dsfm's readers' C kernel (`dsfm.data.native`), built with this machine's C
    compiler. Skips only where there is no compiler at all (CI has one); a compiler that fails
    to build it, or a build that differs from NumPy, fails the test."""
    import shutil

    from dsfm.data import native

    if shutil.which(native.compiler()) is None:
        pytest.skip("no C compiler on PATH")
    kernel = native.load(True)
    assert kernel is not None, native.why_unavailable(True)
    return kernel
