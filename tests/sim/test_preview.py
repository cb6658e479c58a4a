"""`python -m dsfm.sim.preview`: which saved step it shows."""

import os
import sys

import h5py
import numpy as np

from dsfm.sim.build import file_stem
from dsfm.sim.presets import PRESETS
from dsfm.sim.preview import frames
from tests.conftest import run


def test_time_index_counts_saved_steps_from_zero(demo_base):
    """--time 0 is the initial state and --time T-1 the last saved step (it used to show saved
    step 1 for --time 0, labelled with its time, and die with an IndexError for T-1)."""
    spec = PRESETS["demo"]["shallow_water"]
    path = os.path.join(demo_base, spec.dataset_name, "data", "train",
                        file_stem(spec.dataset_name, spec.parameter_sets[0]) + ".hdf5")
    with h5py.File(path) as f:
        height, time = f["t0_fields/height"][0], f["dimensions/time"][()]
    for index in (0, 1, spec.n_steps - 1, -1):
        row = next(r for r in frames(demo_base, time_index=index) if r[0] == spec.dataset_name)
        assert row[2][0] == "height" and row[4] == float(time[index])
        np.testing.assert_array_equal(row[3][..., 0].numpy(), height[index])
    proc = run([sys.executable, "-m", "dsfm.sim.preview", demo_base, "--out", os.devnull,
                "--time", str(spec.n_steps)])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: --time {spec.n_steps}: euler_2d has saved steps 0 "
                                   f"to {spec.n_steps - 1}")


def test_bad_base_split_or_out_is_one_line(tmp_path):
    """A base that does not exist or holds no dataset, a split with no files and an --out in a
    missing folder: one line, no traceback (before: FileNotFoundError, "max() arg is an empty
    sequence", EmptySplitError's and savefig's tracebacks)."""
    import dataclasses

    from dsfm.sim.build import build
    base = tmp_path / "base"
    spec = dataclasses.replace(PRESETS["demo"]["euler"], splits=(1, 0, 1),
                               parameter_sets=[{"mach": 0.1}])
    build({"euler": spec}, str(base), workers=1, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    png = str(tmp_path / "frames.png")
    cases = [([str(tmp_path / "missing"), "--out", png], "not a directory"),
             ([str(empty), "--out", png], "no dataset here"),
             ([str(base), "--out", png, "--split", "valid"], "no .h5 or .hdf5 files"),
             ([str(base), "--out", str(tmp_path / "no" / "frames.png")], "cannot write it")]
    for args, said in cases:
        proc = run([sys.executable, "-m", "dsfm.sim.preview", *args])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("error: ") and said in lines[0], lines
    assert not os.path.exists(png)
