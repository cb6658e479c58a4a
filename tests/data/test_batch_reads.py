"""A reader's whole batch in one call of the C kernel (`dsfm_read_windows`): the same bytes as
reading window by window, for every layout dsfm reads, and the per-window path (with its
errors naming file, array, trajectory and time) wherever the batch cannot be read that way."""

import os
import pickle
import shutil

import h5py
import numpy as np
import pytest

from dsfm.data.handles import H5Pool
from dsfm.data.index import WindowIndex, list_hdf5, read_layouts
from dsfm.data.pdebench import PDEBenchDataset
from dsfm.data.windows import WindowSource, block_views, well_source
from dsfm.errors import CorruptFileError
from tests.conftest import DEMO_DATASETS
from tests.data.well_fixtures import cube_3d_file, make_dataset


def sources(demo_base, pdebench_base, tmp_path, n_in, n_out, stride):
    """Every layout: the Well demo datasets (scalar and vector fields), a 3D Well dataset, and
    the four PDEBench layouts (a group per trajectory, channel-last data, velocity + particles,
    an array per variable)."""
    well = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    well.append(make_dataset(str(tmp_path), "cube_3d", cube_3d_file))
    out = [well_source(read_layouts(list_hdf5(os.path.join(r, "data", "train"))), n_in, n_out,
                       stride) for r in well]
    out += [PDEBenchDataset(str(pdebench_base / p), "train", n_in, n_out, dt_stride=stride).source
            for p in ("swe", "diff_react", "incomp_ns", "comp_ns")]
    return out


def per_window_forbidden(m):
    """Make the per-window read paths fail, to show that the batch call did it all."""
    def refuse(*args, **kwargs):
        raise AssertionError("the per-window path ran")
    m.setattr(WindowSource, "read", refuse)
    m.setattr(WindowSource, "_read_into_place", refuse)


def by_window(source, pool, windows, n_in, shift, scale):
    """Reference: native layout read window by window in Python, and the batch assembled and
    normalized window by window with NumPy."""
    flat = np.full(len(windows) * source.window_floats, np.nan, np.float32)
    source.read_batch(pool, windows, flat)
    x, y = batch_arrays(source, len(windows), n_in)
    scratch = np.empty(source.window_floats, np.float32)
    assert source.read_assembled(pool, windows, n_in, x, y, shift, scale, scratch) is None
    return flat, x, y


def batch_arrays(source, batch, n_in):
    tail = (source.n_channels,) + source.spatial_shape
    return (np.full((batch, n_in) + tail, np.nan, np.float32),
            np.full((batch, source.n_steps - n_in) + tail, np.nan, np.float32))


@pytest.mark.parametrize("n_in,n_out,stride", [(3, 2, 1), (2, 1, 2), (1, 0, 1)])
def test_one_call_per_batch_reads_what_window_by_window_reads(
        demo_base, pdebench_base, tmp_path, normalize_kernel, monkeypatch, n_in, n_out,
        stride):
    """Bit for bit, in the device's native layout and assembled and normalized for a CPU
    trainer, for every layout, time strides 1 and 2, and no output steps; windows from several
    files and trajectories in one batch, repeats included."""
    rng = np.random.default_rng(1)
    pool = H5Pool()
    for source in sources(demo_base, pdebench_base, tmp_path, n_in, n_out, stride):
        windows = rng.choice(len(source), 7, replace=len(source) < 7)
        windows[-1] = windows[0]
        shift = rng.normal(size=source.n_channels).astype(np.float32)
        scale = rng.uniform(0.5, 2, size=source.n_channels).astype(np.float32)
        want_flat, want_x, want_y = by_window(source, pool, windows, n_in, shift, scale)
        with monkeypatch.context() as m:
            per_window_forbidden(m)
            flat = np.full_like(want_flat, np.nan)
            source.read_batch(pool, windows, flat, normalize_kernel)
            x, y = batch_arrays(source, len(windows), n_in)
            scratch = np.empty(source.window_floats, np.float32)
            assert source.read_assembled(pool, windows, n_in, x, y, shift, scale, scratch,
                                         kernel=normalize_kernel) is None
        np.testing.assert_array_equal(flat, want_flat, err_msg=source.name)
        np.testing.assert_array_equal(x, want_x, err_msg=source.name)
        np.testing.assert_array_equal(y, want_y, err_msg=source.name)
    pool.close()


def copy_dataset(demo_base, tmp_path, name="euler_2d"):
    root = tmp_path / name
    shutil.copytree(os.path.join(demo_base, name), root)
    return root, list_hdf5(str(root / "data" / "train"))


def test_a_read_failing_in_the_batch_is_named_by_the_per_window_path(demo_base, tmp_path,
                                                                      normalize_kernel):
    """A file cut while open: the windows before the failure are read by the batch call, the
    failing one is read again window by window and fails with file, array, trajectory and
    time, in both layouts."""
    root, files = copy_dataset(demo_base, tmp_path)
    source = well_source(read_layouts(files), 3, 1)
    pool = H5Pool()
    first = [w for w in range(len(source)) if source.locate(w)[0] == 0]
    last = [w for w in range(len(source)) if source.locate(w)[0] == 1]
    windows = np.array(last[:2] + first[-1:] + last[2:4])
    flat = np.empty(len(windows) * source.window_floats, np.float32)
    source.read_batch(pool, windows, flat, normalize_kernel)         # opens both files
    with h5py.File(files[0]) as f:
        cut = min(f[b.path].id.get_offset() for b in source.blocks) + 100
    os.truncate(files[0], cut)
    x, y = batch_arrays(source, len(windows), 3)
    scratch = np.empty(source.window_floats, np.float32)
    want = np.empty_like(flat)
    clean = well_source(read_layouts(list_hdf5(os.path.join(demo_base, "euler_2d", "data",
                                                            "train"))), 3, 1)
    clean.read_batch(H5Pool(), windows, want)
    for attempt in ("native", "assembled"):
        flat[:] = np.nan
        with pytest.raises(CorruptFileError) as exc:
            if attempt == "native":
                source.read_batch(pool, windows, flat, normalize_kernel)
            else:
                source.read_assembled(pool, windows, 3, x, y, None, None, scratch,
                                      kernel=normalize_kernel)
        msg = str(exc.value)
        fi, traj, t0 = source.locate(int(windows[2]))
        assert files[0] in msg and f"trajectory {traj} time index {t0}" in msg, msg
        assert "file ends" in msg
        if attempt == "native":     # the windows before the failure: read by the batch call
            for got, ref in zip(block_views(flat, source, len(windows)),
                                block_views(want, source, len(windows))):
                np.testing.assert_array_equal(got[:2], ref[:2])
                assert np.isnan(got[3:]).all()
    pool.close()


def test_reopened_files_get_fresh_offsets_and_too_many_files_go_window_by_window(
        demo_base, tmp_path, normalize_kernel, monkeypatch):
    """Offsets and descriptors are cached per open of a file: a file closed, replaced by one
    with its arrays elsewhere and opened again is read at its new offsets (not through a stale
    or reused descriptor). A batch spanning more files than the pool keeps open takes the
    per-window path and still reads the right values."""
    root, files = copy_dataset(demo_base, tmp_path)
    source = well_source(read_layouts(files), 3, 1)
    windows = np.arange(0, len(source), max(1, len(source) // 6))
    pool = H5Pool(max_open=1)
    flat = np.empty(len(windows) * source.window_floats, np.float32)
    with monkeypatch.context() as m:
        per_window_forbidden(m)
        one_file = windows[[source.locate(int(w))[0] == 0 for w in windows]]
        source.read_batch(pool, one_file, flat, normalize_kernel)
    want = np.empty_like(flat)
    source.read_batch(H5Pool(), windows, want)
    spread = np.full_like(flat, np.nan)
    source.read_batch(pool, windows, spread, normalize_kernel)      # 2 files, 1 handle
    np.testing.assert_array_equal(spread, want)

    pool.close()
    before = {b.path: h5py.File(files[0])[b.path].id.get_offset() for b in source.blocks}
    moved = str(tmp_path / "moved.hdf5")
    with h5py.File(files[0]) as src, h5py.File(moved, "w") as dst:
        dst.create_dataset("padding", data=np.zeros(50_000, np.float32))
        for key in src:
            src.copy(src[key], dst, name=key)
        for k, v in src.attrs.items():
            dst.attrs[k] = v
    os.replace(moved, files[0])
    with h5py.File(files[0]) as f:
        assert all(f[p].id.get_offset() != off for p, off in before.items())
    got = np.full(len(one_file) * source.window_floats, np.nan, np.float32)
    with monkeypatch.context() as m:
        per_window_forbidden(m)
        source.read_batch(pool, one_file, got, normalize_kernel)
    ref = np.empty_like(got)
    source.read_batch(H5Pool(), one_file, ref)      # the moved file, read by HDF5 positions
    np.testing.assert_array_equal(got, ref)
    was = np.empty_like(got)
    well_source(read_layouts(list_hdf5(os.path.join(demo_base, "euler_2d", "data", "train"))),
                3, 1).read_batch(H5Pool(), one_file, was)
    np.testing.assert_array_equal(got, was)         # the same values as before the move
    pool.close()


def test_a_batch_with_an_array_hdf5_must_read_goes_window_by_window(demo_base, tmp_path,
                                                                    normalize_kernel):
    """One file of the dataset stored chunked and compressed: batches touching it are read
    through the library, window by window, with the same values."""
    root, files = copy_dataset(demo_base, tmp_path)
    source = well_source(read_layouts(files), 3, 1)
    windows = np.arange(len(source))[::5]
    want = np.empty(len(windows) * source.window_floats, np.float32)
    source.read_batch(H5Pool(), windows, want)
    with h5py.File(files[1], "r+") as f:
        name = source.blocks[0].path
        data, attrs = f[name][()], dict(f[name].attrs)
        del f[name]
        f.create_dataset(name, data=data, chunks=(1, 1) + data.shape[2:], compression="gzip")
        f[name].attrs.update(attrs)
    pool = H5Pool()
    got = np.full_like(want, np.nan)
    source.read_batch(pool, windows, got, normalize_kernel)
    np.testing.assert_array_equal(got, want)
    assert not pool.slab(files[1], name).direct and pool.slab(files[0], name).direct
    pool.close()


def test_locate_many_agrees_with_locate():
    index = WindowIndex([3, 1, 4], [5, 2, 7])
    every = np.arange(-len(index), len(index))
    fi, traj, t = index.locate_many(every)
    assert [tuple(v) for v in zip(fi, traj, t)] == [index.locate(int(i)) for i in every]
    for bad in ([len(index)], [0, -len(index) - 1], np.array([2**64 - 1], np.uint64)):
        with pytest.raises(IndexError, match="out of range"):
            index.locate_many(bad)


def test_caches_of_descriptors_stay_in_their_process(demo_base, normalize_kernel):
    """A source pickled after batch reads (as sources travel to reader processes) leaves its
    descriptors and offsets behind, and reads correctly with a pool of its own."""
    source = well_source(read_layouts(list_hdf5(os.path.join(demo_base, "euler_2d", "data",
                                                             "train"))), 3, 1)
    windows = np.arange(0, len(source), 3)[:6]
    pool = H5Pool()
    flat = np.empty(len(windows) * source.window_floats, np.float32)
    source.read_batch(pool, windows, flat, normalize_kernel)
    assert source.__dict__.get("_direct")
    copy = pickle.loads(pickle.dumps(source))
    assert not [k for k in copy.__dict__ if k.startswith("_")]
    again = np.empty_like(flat)
    copy.read_batch(H5Pool(), windows, again, normalize_kernel)
    np.testing.assert_array_equal(again, flat)
    pool.close()


def test_a_float64_or_strided_destination_is_read_window_by_window(demo_base, normalize_kernel):
    """The kernel writes float32 into contiguous memory only; other destinations take the
    per-window path (HDF5 converts), as without the kernel."""
    source = well_source(read_layouts(list_hdf5(os.path.join(demo_base, "euler_2d", "data",
                                                             "train"))), 3, 1)
    windows = np.array([1, 7, 4])
    want = np.empty(len(windows) * source.window_floats, np.float32)
    source.read_batch(H5Pool(), windows, want, normalize_kernel)
    as64 = np.empty(want.size, np.float64)
    source.read_batch(H5Pool(), windows, as64, normalize_kernel)
    np.testing.assert_array_equal(as64, want.astype(np.float64))


def test_a_handle_closed_elsewhere_is_reopened_with_a_fresh_descriptor(demo_base):
    """A pool whose h5py handle was closed by someone else opens the file again as the most
    recently used one, closing the old descriptor (none leaks) and invalidating caches."""
    files = list_hdf5(os.path.join(demo_base, "euler_2d", "data", "train"))
    pool = H5Pool(max_open=2)
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    first = pool.touch(files[0])
    pool.touch(files[1])
    before = fds()
    pool.get(files[0]).close()
    again = pool.touch(files[0])
    assert again != first and fds() == before
    assert list(pool._files) == [files[1], files[0]]
    pool.close()
