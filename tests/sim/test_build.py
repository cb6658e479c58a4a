"""`python -m dsfm.sim`: layout of the written datasets, splits, determinism, options."""

import dataclasses
import glob
import os
import sys

import h5py
import numpy as np
import pytest

from dsfm.data import WellDataset
from dsfm.sim.build import build, file_stem
from dsfm.sim.presets import PRESETS
from tests.conftest import DEMO_DATASETS, run


def read_all(root):
    """{relative file path: {dataset path: array}} for every HDF5 file under root."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*.hdf5"), recursive=True)):
        arrays = {}
        with h5py.File(path) as f:
            f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()])
                         if isinstance(obj, h5py.Dataset) else None)
        out[os.path.relpath(path, root)] = arrays
    return out


def assert_same_files(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=f"{name}:{k}")


def test_demo_layout(demo_base):
    assert sorted(os.listdir(demo_base)) == sorted(DEMO_DATASETS)
    for name in DEMO_DATASETS:
        spec = next(s for s in PRESETS["demo"].values() if s.dataset_name == name)
        assert os.path.isfile(os.path.join(demo_base, name, "stats.yaml"))
        for split, count in zip(("train", "valid", "test"), spec.splits):
            files = glob.glob(os.path.join(demo_base, name, "data", split, "*.hdf5"))
            assert len(files) == len(spec.parameter_sets)
            for params in spec.parameter_sets:
                path = os.path.join(demo_base, name, "data", split,
                                    file_stem(name, params) + ".hdf5")
                with h5py.File(path) as f:
                    assert f.attrs["n_trajectories"] == count
                    assert f.attrs["dataset_name"] == name
                    for k, v in params.items():
                        assert f.attrs[k] == pytest.approx(v)
                        assert f["scalars"][k][()] == pytest.approx(v)


def test_splits_hold_different_trajectories(demo_base):
    """Split by trajectory: no initial condition appears in two splits."""
    firsts = []
    for split in ("train", "valid", "test"):
        ds = WellDataset(path=os.path.join(demo_base, "euler_2d"), well_split_name=split,
                         full_trajectory_mode=True)
        firsts += [ds[i]["input_fields"][0].numpy() for i in range(len(ds))]
    for i in range(len(firsts)):
        for j in range(i):
            assert not np.array_equal(firsts[i], firsts[j])


def small_specs():
    """Two datasets of the demo preset, shrunk further, to keep repeated builds fast."""
    return {k: dataclasses.replace(PRESETS["demo"][k], n=16, n_steps=6)
            for k in ("navier_stokes", "euler")}


def test_deterministic_given_seed_and_independent_of_workers(tmp_path):
    build(small_specs(), str(tmp_path / "a"), seed=7, workers=1, progress=False)
    build(small_specs(), str(tmp_path / "b"), seed=7, workers=2, progress=False)
    build(small_specs(), str(tmp_path / "c"), seed=8, workers=2, progress=False)
    a, b, c = (read_all(str(tmp_path / x)) for x in "abc")
    assert_same_files(a, b)
    key = next(k for k in a if "navier" in k)
    assert not np.array_equal(a[key]["t0_fields/vorticity"], c[key]["t0_fields/vorticity"])


def test_a_parameter_set_made_alone_is_the_file_of_the_full_list(tmp_path):
    """docs/data.md: a run is seeded from (seed, dataset, parameter set) alone. It was seeded
    from the set's place in its list: Mach 1.0 made alone drew the default list's Mach 0.1
    start (the same t=0 density), not its own file's."""
    euler = small_specs()["euler"]
    build({"euler": euler}, str(tmp_path / "both"), seed=3, progress=False)
    alone = dataclasses.replace(euler, parameter_sets=[{"mach": 1.0}])
    build({"euler": alone}, str(tmp_path / "alone"), seed=3, progress=False)
    both, one = read_all(str(tmp_path / "both")), read_all(str(tmp_path / "alone"))
    assert one and set(one) < set(both)
    assert_same_files(one, {k: both[k] for k in one})
    mach1, mach01 = (next(k for k in both if f"mach_{m}" in k and "train" in k)
                     for m in ("1.", "0.1"))
    assert not np.array_equal(both[mach1]["t0_fields/density"][:, 0],
                              both[mach01]["t0_fields/density"][:, 0])


def test_existing_datasets_are_kept_unless_overwrite(tmp_path):
    specs = {"euler": small_specs()["euler"]}
    build(specs, str(tmp_path), seed=1, progress=False)
    stats = tmp_path / "euler_2d" / "stats.yaml"
    stamp = stats.stat().st_mtime_ns
    build(specs, str(tmp_path), seed=2, progress=False)
    assert stats.stat().st_mtime_ns == stamp
    build(specs, str(tmp_path), seed=2, overwrite=True, progress=False)
    assert stats.stat().st_mtime_ns != stamp
    assert sorted(os.listdir(tmp_path)) == ["euler_2d"]       # no partial directories left


def test_cli_mach_numbers_and_dataset_subset(tmp_path):
    proc = run([sys.executable, "-m", "dsfm.sim", "--preset", "demo", "--out", str(tmp_path),
                "--datasets", "euler", "--mach", "0.1", "1.0", "2.0", "--seed", "3"])
    assert proc.returncode == 0, proc.stderr
    assert "simulating" in proc.stderr                        # the progress bar
    files = sorted(os.listdir(tmp_path / "euler_2d" / "data" / "train"))
    assert files == ["euler_2d_mach_0.1.hdf5", "euler_2d_mach_1.hdf5", "euler_2d_mach_2.hdf5"]
    for name in files:
        with h5py.File(tmp_path / "euler_2d" / "data" / "train" / name) as f:
            u = f["t1_fields/velocity"][:, 0]
            rho, p = f["t0_fields/density"][:, 0], f["t0_fields/pressure"][:, 0]
            mach = np.sqrt((u ** 2).sum(-1).mean((1, 2))) / np.sqrt(
                1.4 * p.mean((1, 2)) / rho.mean((1, 2)))
            np.testing.assert_allclose(mach, f.attrs["mach"], rtol=1e-4)
    assert os.listdir(tmp_path) == ["euler_2d"]


def test_cli_rejects_unknown_dataset(tmp_path):
    proc = run([sys.executable, "-m", "dsfm.sim", "--out", str(tmp_path), "--datasets", "mhd"])
    assert proc.returncode != 0 and "unknown dataset 'mhd'" in proc.stderr


def test_cli_splits_set_the_trajectories_per_parameter_set(tmp_path):
    proc = run([sys.executable, "-m", "dsfm.sim", "--preset", "small", "--out", str(tmp_path),
                "--datasets", "shallow_water", "--splits", "2,1,0", "--quiet"])
    assert proc.returncode == 0, proc.stderr
    data = tmp_path / "shallow_water_2d" / "data"
    for split, want in (("train", 2), ("valid", 1)):
        for name in os.listdir(data / split):
            with h5py.File(data / split / name) as f:
                assert f.attrs["n_trajectories"] == want
                assert f["t0_fields/height"].shape[1:3] == (60, 64)   # the preset's length, grid
    assert os.listdir(data / "test") == []
    proc = run([sys.executable, "-m", "dsfm.data.check", str(tmp_path)])   # its own checker
    assert proc.returncode == 0, proc.stdout + proc.stderr                # agrees
    for bad in ("8,1", "0,1,1", "a,b,c", "8,-1,1"):
        proc = run([sys.executable, "-m", "dsfm.sim", "--out", str(tmp_path / "x"),
                    "--splits", bad])
        assert proc.returncode == 2 and "TRAIN,VALID,TEST" in proc.stderr, bad


def test_cli_refuses_bad_arguments_in_one_line(tmp_path):
    """A negative seed, a non-finite or negative Mach number, two Mach numbers writing one file
    name, --mach without euler, --workers 0 and an --out that is a file: one line, no traceback,
    nothing written."""
    afile = tmp_path / "afile"
    afile.write_text("")
    out = str(tmp_path / "out")
    cases = [["--out", out, "--seed", "-1"],
             ["--out", out, "--datasets", "euler", "--mach", "nan"],
             ["--out", out, "--datasets", "euler", "--mach", "-0.5"],
             ["--out", out, "--datasets", "euler", "--mach", "0.1", "0.1"],
             ["--out", out, "--datasets", "euler", "--mach", "0.1", "0.10000001"],
             ["--out", out, "--datasets", "shallow_water", "--mach", "0.5"],
             ["--out", out, "--workers", "0"],
             ["--out", str(afile)]]
    for args in cases:
        proc = run([sys.executable, "-m", "dsfm.sim", "--quiet", *args])
        assert proc.returncode in (1, 2), args
        assert "Traceback" not in proc.stderr and "error:" in proc.stderr.splitlines()[-1], args
    assert not os.path.exists(out)


def test_cli_out_that_cannot_be_written_is_one_line_before_simulating(tmp_path):
    """An --out below a file, or one holding a file where a dataset's folder goes: one line
    naming the path, no traceback (before, os.makedirs's traceback; for the second, raised by
    the rename after the whole simulation, leaving the dataset unwritten)."""
    afile = tmp_path / "afile"
    afile.write_text("")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "euler_2d").write_text("not a dataset")
    for out, said in ((afile / "sub", "Not a directory"),
                      (taken, f"{taken / 'euler_2d'}: exists and is not a directory")):
        proc = run([sys.executable, "-m", "dsfm.sim", "--quiet", "--out", str(out),
                    "--datasets", "euler", "--mach", "0.1", "--splits", "1,0,0"])
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], lines
    assert sorted(os.listdir(taken)) == ["euler_2d"]          # no .euler_2d.partial-PID left
    assert (taken / "euler_2d").read_text() == "not a dataset"


def test_sigterm_mid_generation_leaves_nothing_behind(tmp_path):
    """SIGTERM (a job's time limit, `timeout`) unwinds like Ctrl-C: no .<name>.partial-PID
    directory is left to be taken for a dataset, and no worker process keeps running."""
    import signal
    import subprocess
    import time
    out = tmp_path / "base"
    proc = subprocess.Popen([sys.executable, "-m", "dsfm.sim", "--out", str(out), "--quiet",
                             "--datasets", "euler,shallow_water", "--splits", "60,1,1",
                             "--workers", "2"], cwd=os.path.dirname(os.path.dirname(
                                 os.path.dirname(os.path.abspath(__file__)))),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out.is_dir() and any(p.name.startswith(".") for p in out.iterdir())):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(1.0)                                   # the workers are simulating
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert os.listdir(out) == []


def test_ctrl_c_mid_generation_is_one_line_and_leaves_nothing_behind(tmp_path):
    """Ctrl-C reaches the whole foreground process group, workers included: the parent stops
    the pool and removes its temporary directories, and says so in one line (each worker used
    to print its own KeyboardInterrupt traceback)."""
    import signal
    import subprocess
    import time
    out = tmp_path / "base"
    proc = subprocess.Popen([sys.executable, "-m", "dsfm.sim", "--out", str(out), "--quiet",
                             "--datasets", "euler,shallow_water", "--splits", "60,1,1",
                             "--workers", "2"], cwd=os.path.dirname(os.path.dirname(
                                 os.path.dirname(os.path.abspath(__file__)))),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,     # its own group, Ctrl-C as a terminal's:
                            # a job a shell starts in the background (CI) inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (out.is_dir() and any(p.name.startswith(".") for p in out.iterdir())):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    time.sleep(1.0)                                   # the workers are simulating
    os.killpg(proc.pid, signal.SIGINT)                # as a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == ["interrupted: nothing written for the datasets not yet "
                                        "finished"], err[-2000:]
    assert os.listdir(out) == []


def test_stale_partial_directory_is_no_dataset_and_is_removed(tmp_path):
    """A build killed by SIGKILL leaves .<name>.partial-PID: the run's dataset list and the
    checker ignore it, and the next build of that dataset removes it."""
    import subprocess

    from dsfm.data.check import main as check_main
    from dsfm.data.prepare import datasets_in
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".euler_2d.partial-{dead.pid}"
    for split in ("train", "valid", "test"):
        (stale / "data" / split).mkdir(parents=True)
    spec = dataclasses.replace(PRESETS["demo"]["euler"], splits=(1, 1, 1),
                               parameter_sets=[{"mach": 0.1}])
    assert datasets_in(str(tmp_path)) == []
    build({"euler": spec}, str(tmp_path), workers=1, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["euler_2d"]
    stale.mkdir()
    (stale / "data").mkdir()
    assert datasets_in(str(tmp_path)) == ["euler_2d"]
    assert check_main([str(tmp_path), "--no-data"]) == 0
