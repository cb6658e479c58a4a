"""The main-job command on the embedded default: generates the demo data once, reports it."""

import os
import sys

import pytest

from tests.conftest import run


def test_main_job_generates_and_reports_demo_data(tmp_path):
    env = dict(os.environ, DSFM_DATA=str(tmp_path / "demo"))
    proc = run([sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero2.json"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert "(4 datasets)" in proc.stdout
    for name in ("navier_stokes_2d", "shallow_water_2d", "gray_scott_reaction_diffusion",
                 "euler_2d"):
        assert name in proc.stdout
        assert (tmp_path / "demo" / name / "stats.yaml").is_file()
    again = run([sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero2.json"], env=env)
    assert again.returncode == 0 and "simulating" not in again.stderr     # reused, not rebuilt


def test_main_job_rejects_a_missing_ds_config(tmp_path):
    proc = run([sys.executable, "dsfm/train.py", "--ds_config", str(tmp_path / "nope.json"),
                "--data-dir", str(tmp_path)])
    assert proc.returncode == 2 and "nope.json" in proc.stderr


@pytest.mark.slow
def test_readme_command_under_the_deepspeed_launcher_with_two_ranks(tmp_path):
    """Two ranks race for the data: one generates under the lock, both find it complete."""
    env = dict(os.environ, DSFM_DATA=str(tmp_path / "demo"))
    proc = run(["deepspeed", "--num_gpus", "2", "dsfm/train.py", "--ds_config",
                "ds_configs/zero2.json"], env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("(4 datasets)") == 1            # rank 0 reports
    assert "exits successfully" in proc.stdout + proc.stderr
