"""The fused normalization kernel (dsfm/data/normalize.c through dsfm.data.native): NumPy's
values bit for bit, its NaN/Inf verdict, its build cache, and the fall-backs when it cannot be
built or is turned off."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dsfm.data import WellLoader, native
from dsfm.errors import ConfigError
from tests.conftest import REPO


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """This process forgets the kernel it loaded and builds into an empty cache; afterwards it
    forgets again, so later tests load the normal one."""
    monkeypatch.setenv("DSFM_CACHE_DIR", str(tmp_path / "cache"))
    native.forget()
    yield tmp_path / "cache" / "native"
    native.forget()


def numpy_reference(src: np.ndarray, stride: int, shift: np.float32, scale: np.float32):
    with np.errstate(all="ignore"):
        return (src[::stride] - shift) / scale


def plant_cached_library(tmp_path, c_source: str | None, *inputs: str) -> str:
    """Compile `c_source` (if any) and `inputs` (files, extra flags) with the kernel's flags
    into its cache path, as an older dsfm or someone else might have left a library there;
    returns that path."""
    path = native.library_path()
    os.makedirs(os.path.dirname(path))
    if c_source is not None:
        src = tmp_path / "planted.c"
        src.write_text(c_source)
        inputs += (str(src),)
    subprocess.run([shutil.which(native.compiler()), *native.FLAGS, *inputs, "-o", path],
                   check=True)
    return path


@pytest.mark.parametrize("n", [1, 3, 15, 16, 17, 64, 1001])
def test_planes_match_numpy_bit_for_bit_and_every_nonfinite_is_caught(normalize_kernel, n):
    """In-place, pairs, out-of-place with stride 1 and 3, at lengths that end inside a vector
    (the kernels' tail loops); a NaN/Inf anywhere in any plane, and only then, is reported."""
    rng = np.random.default_rng(n)
    shift = np.array([0.5, -2.0, 1e-4, 3.0], np.float32)
    scale = np.array([2.5, 0.3, 7.0, 1e-3], np.float32)
    strides = [1, 2, 1, 3]

    def run(bad_plane=None, bad_at=None, value=None):
        srcs = [(rng.standard_normal(k * n) * 50).astype(np.float32) for k in strides]
        if bad_plane is not None:
            srcs[bad_plane][bad_at * strides[bad_plane]] = value
        want = [numpy_reference(s, k, shift[c], scale[c]) for c, (s, k) in
                enumerate(zip(srcs, strides))]
        out = np.full((3, n), np.nan, np.float32)      # planes 1..3 are written out of place
        bases = np.array([s.ctypes.data for s in srcs] + [out.ctypes.data], np.uint64)
        planes = np.array([(0, 0, 0, 0, 1, 0), (0, 0, 4, 1, 2, 1), (4 * n, 0, 4, 2, 1, 2),
                           (8 * n, 0, 4, 3, 3, 3)], native.PLANE)
        finite = normalize_kernel(bases, planes, n, shift, scale)
        got = [srcs[0], out[0], out[1], out[2]]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.view(np.uint32)[~np.isnan(w)],
                                          w.view(np.uint32)[~np.isnan(w)])
            assert np.array_equal(np.isnan(g), np.isnan(w))
        return finite

    assert run() is True
    for plane in range(4):
        for at in sorted({0, n // 2, n - 1}):
            for value in (np.nan, np.inf, -np.inf):
                assert run(plane, at, value) is False, (plane, at, value)


def test_overflow_and_zero_scale_are_nonfinite(normalize_kernel):
    """Finite data can still normalize to Inf (a huge value, a zero scale): reported as NumPy
    would see it."""
    x = np.array([3e38, -3e38, 1.0, 0.0], np.float32)
    for scale, finite in ((np.float32(1e-3), False), (np.float32(0.0), False),
                          (np.float32(2.0), True)):
        buf = x.copy()
        bases = np.array([buf.ctypes.data], np.uint64)
        planes = np.array([(0, 0, 0, 0, 1, 0)], native.PLANE)
        assert normalize_kernel(bases, planes, 4, np.zeros(1, np.float32),
                                np.array([scale], np.float32)) is finite
        want = numpy_reference(x, 1, np.float32(0), scale)
        assert np.array_equal(np.isnan(buf), np.isnan(want))
        np.testing.assert_array_equal(buf[~np.isnan(want)], want[~np.isnan(want)])


def test_the_kernel_is_built_once_per_cache_and_reused(normalize_kernel, fresh_native):
    assert not fresh_native.exists()
    kernel = native.load(True)
    assert kernel is not None and os.path.dirname(kernel.path) == str(fresh_native)
    built = os.stat(kernel.path).st_mtime_ns
    assert os.listdir(fresh_native) == [os.path.basename(kernel.path)]   # no temporary left
    # another process finds it and does not rebuild it
    code = "from dsfm.data import native; k = native.load(True); print(k.path)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == kernel.path
    assert os.stat(kernel.path).st_mtime_ns == built


def test_without_a_compiler_the_loader_falls_back_to_numpy(demo_base, fresh_native,
                                                           monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native.load(True) is None
    assert "no C compiler" in native.why_unavailable(True)
    path = os.path.join(demo_base, "euler_2d")
    with pytest.raises(ConfigError, match="no C compiler"):
        WellLoader([path], batch_size=2, num_workers=1, native_kernel=True)
    with WellLoader([path], batch_size=2, num_workers=1, seed=3) as loader:
        assert not loader.native_kernel_used
        batch = next(loader)
    assert batch.x.shape[0] == 2 and bool(batch.x.isfinite().all())


def test_a_build_that_differs_from_numpy_is_refused(normalize_kernel, fresh_native,
                                                    monkeypatch, tmp_path):
    """A compiler configured for fast-math (here: a wrapper that appends -ffast-math) makes the
    division a multiplication by the reciprocal; the load-time check against NumPy refuses it
    rather than let batches change."""
    wrapper = tmp_path / "cc"
    real = shutil.which(native.compiler())
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@" -ffast-math\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    assert not native._flushes_subnormals()
    assert native.load(True) is None
    why = native.why_unavailable(True)
    assert "was refused" in why and ("floating-point mode" in why or "NumPy gives" in why), why
    # it was checked in a child process: this one still computes subnormals, nothing is cached
    assert not native._flushes_subnormals()
    assert not fresh_native.exists() or os.listdir(fresh_native) == []


def test_a_damaged_cached_kernel_is_built_again(normalize_kernel, fresh_native):
    path = native.library_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"\x7fELF truncated")
    kernel = native.load(True)
    assert kernel is not None, native.why_unavailable(True)
    assert os.path.getsize(path) > 1000


def test_a_cached_kernel_that_differs_from_numpy_is_refused_and_dropped(normalize_kernel,
                                                                       fresh_native, tmp_path):
    """A library at the cache path that gives other values (here: one that leaves the data as
    they are) is not used, and is removed so that the next process builds a good one."""
    path = plant_cached_library(
        tmp_path, "#include <stdint.h>\n"
        "int dsfm_normalize_planes(char *const *b, const void *p, int64_t n,\n"
        "    int64_t f, const float *s, const float *c) { return 0; }\n"
        "int64_t dsfm_read_windows(void) { return 0; }\n")
    assert native.load(True) is None
    assert "where NumPy gives" in native.why_unavailable(True)
    assert not os.path.exists(path)
    code = "from dsfm.data import native; k = native.load(True); print(k and k.path)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ))
    assert proc.returncode == 0 and proc.stdout.strip() == path, proc.stderr


def test_a_cached_kernel_of_an_older_source_is_refused_and_dropped(normalize_kernel,
                                                                  fresh_native, tmp_path):
    """A library at the cache path without the batch reader (built from another version of the
    source, or something else) is refused with its missing function named, and removed."""
    path = plant_cached_library(
        tmp_path, "#include <stdint.h>\n"
        "int dsfm_normalize_planes(char *const *b, const void *p, int64_t n,\n"
        "    int64_t f, const float *s, const float *c) { return 0; }\n")
    assert native.load(True) is None
    assert "lacks a function of the kernel (dsfm_read_windows)" in \
        native.why_unavailable(True)
    assert not os.path.exists(path)


def test_a_cached_kernel_whose_reads_are_wrong_is_refused(normalize_kernel, fresh_native,
                                                          tmp_path):
    """A library that normalizes right but whose batch reads do not read (here: they report
    success and leave the buffers alone) is refused at load by the read self-test."""
    real = str(tmp_path / "real.o")         # the real kernel, its batch reads renamed away
    subprocess.run([shutil.which(native.compiler()), "-O3", "-fPIC", "-fno-fast-math",
                    "-ffp-contract=off", "-c", "-Ddsfm_read_windows=real_read_windows",
                    native.SOURCE, "-o", real], check=True)
    plant_cached_library(
        tmp_path, "#include <stdint.h>\n"
        "int64_t dsfm_read_windows(const void *r, int64_t k, const void *p,\n"
        "    int64_t np, void *const *s, const int64_t *st, int32_t nb,\n"
        "    int64_t n, const void *pl, const int64_t *pf, int64_t npl,\n"
        "    int64_t f, const float *a, const float *b, int32_t c,\n"
        "    int32_t *status)\n"
        "{ status[0] = status[1] = 0; return n; }\n", real)
    path = native.library_path()
    assert native.load(True) is None
    assert "its reads put" in native.why_unavailable(True)
    assert not os.path.exists(path)


def test_concurrent_first_builds_all_succeed(normalize_kernel, fresh_native):
    """Ranks and readers starting together on an empty cache each build or find the kernel;
    none fails on another's temporary file, and none is left behind."""
    code = "from dsfm.data import native; k = native.load(True); print(k and k.path)"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ))
             for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert {o.strip() for o, _ in outs} == {native.library_path()}
    assert os.listdir(fresh_native) == [os.path.basename(native.library_path())]


def test_the_fused_path_refuses_more_windows_than_rows_and_defers_odd_stats(normalize_kernel,
                                                                            demo_base):
    """Only what the kernel can do exactly goes to it: a batch too small for the windows is an
    error (not a write past the array), and a scalar or float64 shift/scale keeps NumPy's
    broadcasting and precision."""
    from dsfm.data.handles import H5Pool
    from dsfm.data.index import list_hdf5, read_layouts
    from dsfm.data.windows import well_source

    root = os.path.join(demo_base, "euler_2d", "data", "train")
    source = well_source(read_layouts(list_hdf5(root)), 2, 1)
    pool = H5Pool()
    scratch = np.empty(source.window_floats, np.float32)
    shape = (source.n_channels,) + source.spatial_shape
    x, y = np.empty((1, 2) + shape, np.float32), np.empty((1, 1) + shape, np.float32)
    with pytest.raises(ValueError, match="3 windows"):
        source.read_assembled(pool, [0, 1, 2], 2, x, y, None, None, scratch,
                              kernel=normalize_kernel)
    for shift, scale in ((np.float32([0.5]), np.float32([2.0])),
                         (np.full(source.n_channels, 0.1), np.full(source.n_channels, 3.0))):
        got = [np.empty((2, 2) + shape, np.float32), np.empty((2, 1) + shape, np.float32)]
        want = [np.empty_like(a) for a in got]
        source.read_assembled(pool, [3, 9], 2, *got, shift, scale, scratch,
                              kernel=normalize_kernel)
        source.read_assembled(pool, [3, 9], 2, *want, shift, scale, scratch)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    pool.close()


def test_DSFM_NATIVE_0_turns_the_kernel_off(demo_base):
    code = ("import os, sys; from dsfm.data import WellLoader, native\n"
            "l = WellLoader([sys.argv[1]], batch_size=2, num_workers=1)\n"
            "next(l); print(l.native_kernel_used, native.why_unavailable()); l.close()")
    env = dict(os.environ, DSFM_NATIVE="0")
    proc = subprocess.run([sys.executable, "-c", code, os.path.join(demo_base, "euler_2d")],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[0] == "False" and "turned off" in proc.stdout


def test_an_unwritable_cache_falls_back_to_a_private_temporary_directory(
        normalize_kernel, fresh_native, monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setenv("DSFM_CACHE_DIR", "/dev/null/cache")       # cannot be created
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    private = tmp_path / f"dsfm-native-{os.getuid()}"
    kernel = native.load(True)
    assert kernel is not None and os.path.dirname(kernel.path) == str(private)
    assert private.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("problem", ["others may write", "owned by someone else", "a link"])
def test_a_temporary_directory_others_control_is_refused(normalize_kernel, fresh_native,
                                                         monkeypatch, tmp_path, problem):
    """A shared /tmp: a directory planted under our name could hold a library for us to load."""
    import tempfile

    monkeypatch.setenv("DSFM_CACHE_DIR", "/dev/null/cache")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    private = tmp_path / f"dsfm-native-{os.getuid()}"
    if problem == "a link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        private.symlink_to(tmp_path / "elsewhere")
    else:
        private.mkdir(mode=0o700)
        if problem == "others may write":
            private.chmod(0o777)
        elif os.getuid() == 0:
            os.chown(private, 65534, 65534)
        else:
            pytest.skip("only root can give a directory to someone else")
    assert native.load(True) is None
    assert "not a directory of this user's" in native.why_unavailable(True)
    assert not any(p.name.endswith(".so") for p in tmp_path.rglob("*"))


def test_a_cached_fast_math_build_cannot_change_this_process(normalize_kernel, fresh_native,
                                                              tmp_path):
    """GCC links a fast-math library with code that switches the whole process to flushing
    subnormals to zero as it loads (NumPy and torch included). One found in the cache (left by
    an older dsfm: new builds are checked in a child process first) is refused, and the
    process's floating-point mode is put back."""
    path = plant_cached_library(tmp_path, None, native.SOURCE, "-ffast-math")
    assert not native._flushes_subnormals()
    assert native.load(True) is None
    why = native.why_unavailable(True)
    assert not native._flushes_subnormals()
    assert "floating-point mode" in why or "NumPy gives" in why, why
    assert not os.path.exists(path)


def test_read_windows_scatters_reads_and_reports_failures(normalize_kernel, tmp_path):
    """`dsfm_read_windows` on a plain file: each window's reads land in their pieces at the
    window's bases; the end of the file, a closed descriptor and a piece naming a base the
    window lacks are reported (window, errno), not read past or written through."""
    import errno

    data = np.arange(4096, dtype=np.float32)
    path = tmp_path / "plain.bin"
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        a, b = np.full((3, 40), np.nan, np.float32), np.full((3, 8), np.nan, np.float32)
        # per window: 10 floats split over a[.., 0:4], b[.., 0:2], a[.., 20:24], then 3 floats
        # into b[.., 5:8] from elsewhere in the file
        pieces = np.array([(0, 16, 0, 0), (0, 8, 1, 0), (80, 16, 0, 0), (20, 12, 1, 0)],
                          native.PIECE)
        reads = np.zeros((3, 2), native.READ)
        reads["fd"] = fd
        reads["file_offset"] = [[4 * (100 * w), 4 * (2000 + w)] for w in range(3)]
        reads["first"], reads["n"] = [0, 3], [3, 1]
        starts = np.array([a.ctypes.data, b.ctypes.data], np.uint64)
        steps = np.array([a.strides[0], b.strides[0]], np.int64)
        status = np.zeros(2, np.int32)
        none = np.zeros(0, native.PLANE)
        f32 = np.zeros(0, np.float32)

        def run(n=3):
            return normalize_kernel.read_windows(reads, 2, pieces, starts, steps, n, none,
                                                 None, 0, f32, f32, False, status)
        assert run() == 3 and status.tolist() == [0, 0]
        for w in range(3):
            got = np.concatenate([a[w, 0:4], b[w, 0:2], a[w, 20:24], b[w, 5:8]])
            np.testing.assert_array_equal(got[:10], data[100 * w:100 * w + 10])
            np.testing.assert_array_equal(got[10:], data[2000 + w:2003 + w])
        assert np.isnan(a[:, 4:20]).all() and np.isnan(b[:, 2:5]).all()

        reads["file_offset"][1, 1] = 4 * 4094            # window 1's second read: 2 of 3 floats
        a[:], b[:] = np.nan, np.nan
        assert run() == 1 and status.tolist() == [2, -1]
        assert not np.isnan(a[0, :4]).any() and np.isnan(a[2]).all()   # stopped at window 1
        reads["file_offset"][1, 1] = 0
        pieces["base"][3] = 2                             # a base the windows do not have
        assert run() == 0 and status.tolist() == [2, errno.EINVAL]
        pieces["base"][3] = 1
        reads["first"][0, 1] = 4                          # a piece past the table's end
        assert run() == 0 and status.tolist() == [2, errno.EINVAL]
        reads["first"][0, 1] = 3
        pieces["offset"][0] = -4                          # before the window's base
        assert run() == 0 and status.tolist() == [2, errno.EINVAL]
        pieces["offset"][0] = 0
        assert run() == 3 and status.tolist() == [0, 0]
        one = np.zeros(1, native.PLANE)                   # planes over bases these lack
        f1 = np.ones(1, np.float32)
        assert normalize_kernel.read_windows(reads, 2, pieces, starts, steps, 3, one,
                                             np.array([0, 1, 1], np.int64), 1, f1, f1,
                                             False, status) == 0
        assert status.tolist() == [2, errno.EINVAL]
        for bad in (-1, 5):                               # a base before or past the window's
            planes = np.array([(0, 0, bad, 0, 1, 0)], native.PLANE)
            starts3, steps3 = np.append(starts, starts[:1]), np.append(steps, steps[:1])
            assert normalize_kernel.read_windows(reads, 2, pieces, starts3, steps3, 3, planes,
                                                 np.array([0, 1, 1], np.int64), 1, f1, f1,
                                                 False, status) == 0
            assert status.tolist() == [2, errno.EINVAL]
        with pytest.raises(ValueError, match="shift and scale"):   # a channel they lack
            normalize_kernel.read_windows(reads, 2, pieces, starts, steps, 3, one,
                                          np.array([0, 1, 1], np.int64), 1, f32, f32,
                                          False, status)
        for plane_first in (None, np.array([0, 0, 0], np.int64)):   # planes no read is before
            with pytest.raises(ValueError, match="plane_first"):
                normalize_kernel.read_windows(reads, 2, pieces, starts, steps, 3, one,
                                              plane_first, 1, f32, f32, False, status)
        reads["fd"][0, 0] = -1                            # not an open descriptor
        assert run() == 0 and status.tolist() == [2, errno.EBADF]
        with pytest.raises(ValueError, match="READ, PIECE and PLANE"):
            normalize_kernel.read_windows(reads, 2, pieces.view(native.READ), starts, steps, 3,
                                          none, None, 0, f32, f32, False, status)
    finally:
        os.close(fd)
