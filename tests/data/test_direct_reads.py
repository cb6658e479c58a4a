"""Positioned reads of contiguous float32 datasets (`Slab` direct mode) against h5py itself."""

import os

import h5py
import numpy as np
import pytest

from dsfm.data import native
from dsfm.data.handles import H5Pool, Slab, direct_offset
from dsfm.data.index import list_hdf5, read_layouts
from dsfm.data.windows import well_source
from dsfm.errors import CorruptFileError


@pytest.fixture
def h5file(tmp_path):
    """Datasets that may and may not be read directly, filled with distinct values."""
    path = str(tmp_path / "f.h5")
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["contig"] = rng.normal(size=(3, 11, 6, 5, 2)).astype(np.float32)
        f["noindex"] = rng.normal(size=(11, 6, 5)).astype(np.float32)
        f.create_dataset("chunked", data=rng.normal(size=(3, 11, 6, 5)).astype(np.float32),
                         chunks=(1, 2, 6, 5))
        f.create_dataset("gzip", data=rng.normal(size=(3, 11, 6, 5)).astype(np.float32),
                         compression="gzip")
        f["double"] = rng.normal(size=(3, 11, 6, 5))
        f["bigendian"] = rng.normal(size=(3, 11, 6, 5)).astype(">f4")
        f.create_dataset("unwritten", shape=(3, 11, 6, 5), dtype=np.float32)
    return path


def test_only_plain_contiguous_native_float32_is_read_directly(h5file):
    with h5py.File(h5file) as f:
        assert direct_offset(f["contig"]) is not None
        assert direct_offset(f["noindex"]) is not None
        for name in ("chunked", "gzip", "double", "bigendian", "unwritten"):
            assert direct_offset(f[name]) is None, name
    pool = H5Pool()
    assert pool.slab(h5file, "contig").direct and not pool.slab(h5file, "gzip").direct
    assert not H5Pool(direct=False).slab(h5file, "contig").direct
    pool.close()


@pytest.mark.parametrize("name", ["contig", "chunked", "gzip", "double", "bigendian"])
def test_reads_equal_h5py_for_every_selection(h5file, name):
    pool = H5Pool()
    slab = pool.slab(h5file, name)
    with h5py.File(h5file) as f:
        d = f[name]
        for traj, t0, n, step in [(0, 0, 11, 1), (2, 3, 5, 1), (1, 1, 4, 3), (2, 10, 1, 5),
                                  (0, 2, 3, 2)]:
            want = d[traj, t0:t0 + (n - 1) * step + 1:step]
            out = np.full(want.shape, np.nan, np.float32)
            slab.read(((traj, 1, 1), (t0, n, step)), out)
            np.testing.assert_array_equal(out, want.astype(np.float32))
            out64 = np.empty(want.shape, np.float64)     # another memory type: through HDF5
            slab.read(((traj, 1, 1), (t0, n, step)), out64)
            np.testing.assert_array_equal(out64, want.astype(np.float64))
        whole = np.empty(d.shape, np.float32)
        slab.read((), whole)
        np.testing.assert_array_equal(whole, d[()].astype(np.float32))
    pool.close()


def test_scatter_puts_each_step_in_its_own_buffer(h5file):
    pool = H5Pool()
    slab = pool.slab(h5file, "noindex")
    with h5py.File(h5file) as f:
        want = f["noindex"][()]
    for t0, n, step in [(2, 4, 1), (0, 3, 4)]:
        dest = np.full((n, 2, 6, 5), np.nan, np.float32)      # steps land in dest[:, 1]
        slab.read_scatter(((t0, n, step),), list(dest[:, 1]))
        np.testing.assert_array_equal(dest[:, 1], want[t0:t0 + (n - 1) * step + 1:step])
        assert np.isnan(dest[:, 0]).all()
    pool.close()


def test_out_of_range_selections_are_refused_not_read_from_neighbours(h5file):
    pool = H5Pool()
    slab = pool.slab(h5file, "contig")
    out = np.empty((5, 6, 5, 2), np.float32)
    for lead in [((0, 1, 1), (8, 5, 1)), ((3, 1, 1), (0, 5, 1)), ((0, 1, 1), (0, 5, 3))]:
        with pytest.raises(ValueError, match="out of range"):
            slab.read(lead, out)
    with pytest.raises(ValueError, match="does not hold"):      # larger than the selection
        slab.read(((0, 1, 1), (0, 4, 1)), out)
    with pytest.raises(ValueError, match="every buffer"):
        slab.read_scatter(((0, 1, 1), (0, 2, 1)), [out[0], out[1:3]])
    pool.close()


@pytest.mark.parametrize("direct", [True, False])
def test_a_file_truncated_while_open_is_named(demo_base, tmp_path, direct):
    """The library would notice a short file when opening it; a read of a file cut after it
    was opened must still fail with file, array, trajectory and time, not return stale or
    partial data: a positioned read finds the file's end; through the HDF5 library (float64
    fields, direct_reads=False, DSFM_HDF5_DIRECT=0) the bytes past the cut came back as
    zeros, with no error, so reads there check that the file has not shrunk since it was
    opened."""
    src_dir = os.path.join(demo_base, "euler_2d", "data", "train")
    path = tmp_path / "euler.hdf5"
    path.write_bytes(open(list_hdf5(src_dir)[0], "rb").read())
    source = well_source(read_layouts([str(path)]), 3, 1)
    pool = H5Pool(direct=direct)
    dest = [np.empty(b.shape, np.float32) for b in source.blocks]
    source.read(pool, 0, dest)
    assert all(pool.slab(str(path), b.path).direct == direct for b in source.blocks)
    with h5py.File(path) as f:
        offsets = [f[b.path].id.get_offset() for b in source.blocks]
    cut = (min if direct else max)(offsets) + 100
    os.truncate(path, cut)
    with pytest.raises(CorruptFileError) as exc:
        source.read(pool, len(source) - 1, dest)
    msg = str(exc.value)
    assert str(path) in msg and "trajectory" in msg and "time index" in msg
    assert "\n" not in msg
    if direct:
        assert "file ends" in msg
    else:
        assert "shrank" in msg and f"to {cut} bytes while open" in msg
    pool.close()


def test_descriptors_follow_the_handles(h5file, tmp_path):
    """An evicted or closed file closes its plain descriptor too (no descriptor leak)."""
    paths = []
    for k in range(3):
        p = str(tmp_path / f"c{k}.h5")
        with h5py.File(p, "w") as f:
            f["a"] = np.arange(10, dtype=np.float32)
        paths.append(p)
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = fds()
    pool = H5Pool(max_open=2)
    for p in paths * 3:
        assert isinstance(pool.slab(p, "a"), Slab)
    assert pool.n_open == 2
    pool.close()
    assert fds() == before


def test_the_checker_says_which_arrays_miss_the_fast_read_path(demo_base, tmp_path):
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO

    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    check = [sys.executable, "-m", "dsfm.data.check", "--no-data", str(ds)]
    proc = subprocess.run(check, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "read path:" in proc.stderr
    n = int(proc.stderr.split("read path: ")[1].split()[0])
    assert f"{n} of {n} time-varying arrays take positioned reads" in proc.stderr
    if shutil.which(native.compiler()):      # CI has a compiler
        assert "readers: the C kernel reads each batch (CPU training: and normalizes it)" in \
            proc.stderr
    off = subprocess.run(check, cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, DSFM_NATIVE="0"))
    assert "readers: Python reads window by window, NumPy normalizes (C kernel: turned off" \
        in off.stderr
    path = list_hdf5(str(ds / "data" / "train"))[0]
    with h5py.File(path, "r+") as f:             # the same values, stored chunked and gzipped
        data, attrs = f["t0_fields/density"][()], dict(f["t0_fields/density"].attrs)
        del f["t0_fields/density"]
        d = f.create_dataset("t0_fields/density", data=data, chunks=(1, 4) + data.shape[2:],
                             compression="gzip")
        d.attrs.update(attrs)
    proc = subprocess.run(check, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout          # slower, not wrong
    assert f"{n - 1} of {n} time-varying arrays take positioned reads" in proc.stderr
    assert f"{path}: /t0_fields/density: stored in chunks of" in proc.stderr
    assert "gzip compressed" in proc.stderr
