"""The README's two set-up commands, CI, and the package metadata stay in step."""

import os
import re
from importlib.metadata import requires

from tests.conftest import REPO


def readme_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    return re.findall(r"```(?:bash|sh)\n(.*?)\n```", text, flags=re.S)


def test_readme_opens_with_exactly_two_setup_commands():
    text = open(os.path.join(REPO, "README.md")).read()
    blocks = readme_commands()
    assert len(blocks) >= 2
    main, tests = blocks[:2]
    assert "\n" not in main and "\n" not in tests, "each set-up command is one line"
    assert "deepspeed dsfm/train.py --ds_config ds_configs/zero2.json" in main
    assert "pytest" in tests and ".[test]" in tests and " -n 2 " in tests
    first_section = text.split("\n## ", 2)[1]
    assert first_section.count("```bash") == 2, "the opening section holds just the two commands"


def test_ci_runs_the_readme_test_command_verbatim():
    tests = readme_commands()[1]
    ci = open(os.path.join(REPO, ".ci", "run")).read().splitlines()
    assert tests in ci, f"{tests!r} is not a line of .ci/run"
    assert os.access(os.path.join(REPO, ".ci", "run"), os.X_OK)


def test_declared_dependencies():
    reqs = requires("dsfm")
    base = {re.split(r"[<>=;\[ ]", r)[0].lower() for r in reqs if "extra ==" not in r}
    assert {"deepspeed", "torch", "h5py", "numpy", "nvidia-ml-py", "tensorboard",
            "pyyaml"} <= base
    assert not {"timm", "torchvision"} & base
    extras = {r.split("extra == ")[1].strip("\"'"): r for r in reqs if "extra ==" in r}
    assert any(r.startswith("mpi4py") and 'extra == "mpi"' in r for r in reqs), extras
    assert any(r.startswith("the-well") and 'extra == "test"' in r for r in reqs)
    assert any(r.startswith("pytest") and 'extra == "test"' in r for r in reqs)
    # the README's test command runs two workers
    assert any(r.startswith("pytest-xdist") and 'extra == "test"' in r for r in reqs)


def test_top_level_layout():
    for name in ("setup.py", "README.md", "dsfm", "ds_configs", "perf", "hostfiles", "tests",
                 "docs"):
        assert os.path.exists(os.path.join(REPO, name)), name


def test_every_directory_of_modules_is_a_package_setup_py_installs():
    """setup.py lists its packages with find_packages, which skips a directory without an
    __init__.py: dsfm/sim had none, so a wheel or `pip install .` (not -e) left the simulators
    out, and `python -m dsfm.sim` and the demo run's data generation failed there."""
    from setuptools import find_packages

    found = set(find_packages(where=REPO, include=["dsfm", "dsfm.*", "perf", "perf.*"]))
    with_modules = set()
    for top in ("dsfm", "perf"):
        for folder, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            if any(f.endswith(".py") for f in files):
                with_modules.add(os.path.relpath(folder, REPO).replace(os.sep, "."))
    assert sorted(with_modules - found) == []
