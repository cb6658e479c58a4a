"""Shared fixtures: the demo datasets, generated once per session by the real CLI."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DATASETS = ("navier_stokes_2d", "shallow_water_2d", "gray_scott_reaction_diffusion",
                 "euler_2d")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long-running test (runs in CI)")


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
