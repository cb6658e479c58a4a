"""The readers' C kernel of `normalize.c`, built with the system C compiler on first use.

With NumPy, normalizing a window and checking it costs three passes over data that reading it
touched once (subtract, divide, isfinite into a temporary), plus a strided copy for every field
stored with its components last. The kernel does all of it in one pass per plane and gives the
same bits; it also reads a reader's whole batch with positioned reads in one call
(`dsfm_read_windows`), so no Python runs per window. It is compiled once per kind of CPU into a
cache directory (`DSFM_CACHE_DIR`, else `$XDG_CACHE_HOME/dsfm` or `~/.cache/dsfm`), checked in a
child process before it is cached and again at every load (NumPy's values, and the process's
floating-point mode left alone), and used by the reader processes. Without a working C
compiler, or with `DSFM_NATIVE=0`, dsfm reads window by window in Python and normalizes with
NumPy (same values, slower); `why_unavailable()` says why.

Torch-free: the readers import it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from dsfm import subprocess_env

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "normalize.c")
#: No fast-math (it would break the division's rounding and the Inf/NaN test) and no FMA
#: contraction: the results must be NumPy's, bit for bit.
FLAGS = ("-O3", "-shared", "-fPIC", "-fno-fast-math", "-ffp-contract=off")
#: Set DSFM_NATIVE=0 to normalize with NumPy instead (for comparisons).
ENABLED_DEFAULT = os.environ.get("DSFM_NATIVE", "1") not in ("0", "false", "no", "off")

#: One plane to normalize: mirrors `dsfm_plane` in normalize.c.
PLANE = np.dtype([("dst", "<i8"), ("src", "<i8"), ("dst_base", "<i4"), ("src_base", "<i4"),
                  ("stride", "<i4"), ("channel", "<i4")], align=True)
#: One destination range of a read (`dsfm_piece`): bytes at an offset from one of the window's
#: bases (for a CPU trainer 0: its row of x, 1: its row of y, 2: the staging buffer).
PIECE = np.dtype([("offset", "<i8"), ("bytes", "<i8"), ("base", "<i4"), ("pad", "<i4")],
                 align=True)
#: One positioned read (`dsfm_read`): consecutive file bytes into pieces first .. first + n - 1.
READ = np.dtype([("file_offset", "<i8"), ("fd", "<i4"), ("first", "<i4"), ("n", "<i4"),
                 ("pad", "<i4")], align=True)
#: Most pieces one read may fill (Linux's IOV_MAX), and most bases a window may have.
MAX_PIECES, MAX_BASES = 1024, 64

_loaded: dict[str, object] = {}     # per process: "kernel" and "why"


class NormalizeKernel:
    """`dsfm_normalize_planes` and `dsfm_read_windows` through ctypes. Calling it normalizes:
    with the plane bases (a uint64 array of addresses), a PLANE table, the floats per plane and
    float32 shift/scale per channel; it returns whether every result is finite.
    `read_windows` reads and normalizes a reader's batch."""

    def __init__(self, lib: ctypes.CDLL, path: str):
        self.path = path
        fn = lib.dsfm_normalize_planes
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_void_p]
        self._fn = fn
        rw = lib.dsfm_read_windows
        rw.restype = ctypes.c_int64
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        rw.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ctypes.c_int32, i64, ptr, ptr, i64, i64,
                       ptr, ptr, ctypes.c_int32, ptr]
        self._read_windows = rw
        self._lib = lib                 # keeps the library loaded

    def read_windows(self, reads: np.ndarray, reads_per_window: int, pieces: np.ndarray,
                     starts: np.ndarray, steps: np.ndarray, n_windows: int,
                     planes: np.ndarray, plane_first: np.ndarray | None, plane_floats: int,
                     shift: np.ndarray, scale: np.ndarray, check_finite: bool,
                     status: np.ndarray) -> int:
        """Read and normalize `n_windows` windows: window b's bases are starts + b * steps
        (uint64 addresses and int64 byte steps); the READ rows [b * reads_per_window, ...)
        fill its `pieces` (PIECE, relative to those bases), and after its read k the `planes`
        (PLANE, bases 0 to 2) [plane_first[k], plane_first[k + 1]) are normalized (int64,
        reads_per_window + 1 entries; None: no planes). Returns the first window that failed,
        or n_windows; `status` (two int32) then says why: 1 not finite (only with
        `check_finite`), 2 a read failed, with the errno (-1: the file ended first). The
        caller checks that every piece stays inside its buffer and that the file descriptors
        are open."""
        if plane_first is None and len(planes):
            raise ValueError("planes to normalize need plane_first: after which read each goes")
        if plane_first is None:
            plane_first = np.zeros(max(reads_per_window, 0) + 1, np.int64)
        if len(starts) > MAX_BASES or len(steps) != len(starts):
            raise ValueError(f"{len(starts)} bases and {len(steps)} steps (at most {MAX_BASES})")
        tables = ((reads, READ), (pieces, PIECE), (planes, PLANE), (starts, np.uint64),
                  (steps, np.int64), (status, np.int32), (plane_first, np.int64))
        if any(a.dtype != t or not a.flags.c_contiguous for a, t in tables) or \
                reads_per_window < 0 or reads.size < n_windows * reads_per_window or \
                status.size < 2 or plane_first.size != reads_per_window + 1 or \
                plane_first[0] != 0 or plane_first[-1] != len(planes):
            raise ValueError("read_windows takes contiguous READ, PIECE and PLANE tables, uint64 "
                             f"starts, int64 steps, 2 int32 of status, {n_windows} × "
                             f"{reads_per_window} reads and an int64 plane_first of "
                             f"{reads_per_window} + 1 entries from 0 to {len(planes)} planes")
        if len(planes) and (
                any(a.dtype != np.float32 or not a.flags.c_contiguous for a in (shift, scale))
                or int(planes["channel"].max()) >= min(shift.size, scale.size)):
            # (the kernel does not know how long shift and scale are)
            raise ValueError(f"planes of channels up to {int(planes['channel'].max())} need "
                             f"contiguous float32 shift and scale that long, not {shift.dtype} "
                             f"{shift.shape} and {scale.dtype} {scale.shape}")
        return self._read_windows(
            reads.ctypes.data, reads_per_window, pieces.ctypes.data, len(pieces),
            starts.ctypes.data, steps.ctypes.data, len(starts), n_windows, planes.ctypes.data,
            plane_first.ctypes.data, len(planes), plane_floats, shift.ctypes.data,
            scale.ctypes.data, int(bool(check_finite)), status.ctypes.data)

    def __call__(self, bases: np.ndarray, planes: np.ndarray, plane_floats: int,
                 shift: np.ndarray, scale: np.ndarray) -> bool:
        return self.run_raw(bases.ctypes.data, planes.ctypes.data, len(planes), plane_floats,
                            shift.ctypes.data, scale.ctypes.data)

    def run_raw(self, bases_addr: int, planes_addr: int, n_planes: int, plane_floats: int,
                shift_addr: int, scale_addr: int) -> bool:
        """The same with addresses computed by the caller (the readers' per-window call)."""
        return not self._fn(bases_addr, planes_addr, n_planes, plane_floats, shift_addr,
                            scale_addr)


def cache_dir() -> str:
    """Where built kernels are kept (`_build` creates it)."""
    root = os.environ.get("DSFM_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "dsfm")
    return os.path.join(root, "native")


def compiler() -> str:
    """$CC (which may carry arguments: `ccache gcc`), else the first of cc, gcc and clang on
    PATH (cc when none is)."""
    if os.environ.get("CC", "").strip():
        return os.environ["CC"].strip()
    return next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), "cc")


def _cpu_features() -> str:
    """The CPU's feature flags (Linux), so that nodes of another CPU type get a build of their
    own: a compiler wrapper that adds -march=native (Cray, Spack) would otherwise hand them
    instructions they lack, and a load would die of SIGILL instead of falling back."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def library_path(directory: str | None = None) -> str:
    """The built kernel's file: named by a hash of the source, the compiler, the flags, the
    machine type and its CPU features, so a changed source or another kind of node gets a
    build of its own."""
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read())
    key.update(repr((compiler(), FLAGS, platform.machine(), platform.system(),
                     _cpu_features())).encode())
    return os.path.join(directory or cache_dir(), f"normalize-{key.hexdigest()[:16]}.so")


def _build(path: str) -> str | None:
    """Compile SOURCE into `path`. The build goes to a temporary file of its own (concurrent
    builders, even with equal PIDs in different containers, never share one), is loaded and
    checked in a child process (`verify`: a bad build must not touch this process), and only
    then renamed into place. Returns None, or why it failed."""
    cmd = shlex.split(compiler())
    if not cmd or shutil.which(cmd[0]) is None:
        return (f"no C compiler: {compiler()!r} is not on PATH (install gcc or clang, or set "
                "CC)")
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        return f"cannot create {directory}: {exc.strerror}"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot create files in {directory}: not writable"
    try:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                   dir=directory)
        os.close(fd)
    except OSError as exc:
        return f"cannot create files in {directory}: {exc.strerror}"
    try:
        why = "no build attempted"
        # per-vector-width clones first; a compiler without target_clones gets one plain build
        for extra in ((), ("-DDSFM_NO_CLONES",)):
            try:
                done = subprocess.run([*cmd, *FLAGS, *extra, SOURCE, "-o", tmp],
                                      capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as exc:
                why = str(exc)
                continue
            if done.returncode != 0:
                lines = (done.stderr or done.stdout).strip().splitlines()
                why = lines[-1] if lines else f"exit code {done.returncode}"
                continue
            why = _verify_in_child(tmp)
            if why is None:
                os.replace(tmp, path)
                return None
            return f"the build of {os.path.basename(SOURCE)} with {compiler()} was refused: {why}"
        return f"{compiler()} could not build {os.path.basename(SOURCE)}: {why}"
    except OSError as exc:
        return f"cannot install the build in {directory}: {exc}"
    finally:
        if os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _verify_in_child(path: str) -> str | None:
    """Load the library at `path` in a fresh Python and run `verify` there."""
    code = "import sys; from dsfm.data import native; sys.exit(native.verify(sys.argv[1]))"
    try:
        done = subprocess.run([sys.executable, "-c", code, path], capture_output=True,
                              text=True, timeout=120, env=subprocess_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"could not check it: {exc}"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"loading and running it killed a process with signal {-done.returncode}"
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"its check exited with code {done.returncode}"


def verify(path: str) -> str | None:
    """Load the library at `path` into this process and check it (`_load_checked`); the child
    process of `_build` runs this. Returns None, or why not (also printed)."""
    _, why = _load_checked(path)
    if why is not None:
        print(why, file=sys.stderr)
    return why


def _flushes_subnormals() -> bool:
    """Whether this process's floating-point mode flushes subnormal float32 results or inputs
    to zero (FTZ/DAZ), as a library built with fast-math switches it when it is loaded."""
    tiny = np.array([1e-39], np.float32)
    return bool((tiny * np.float32(1.0))[0] == 0 or (tiny + np.float32(0.0))[0] == 0)


def _fenv():
    """The C library's fegetenv/fesetenv and a buffer holding the current environment, or
    None where they cannot be had."""
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        env = ctypes.create_string_buffer(256)          # larger than any fenv_t
        if libm.fegetenv(env) != 0:
            return None
        return libm, env
    except (OSError, AttributeError):
        return None


def _load_checked(path: str) -> tuple[NormalizeKernel | None, str | None]:
    """Load the library and check it: it must leave the process's floating-point mode alone
    (a fast-math build turns on flush-to-zero when loaded, for NumPy and torch too; the mode is
    put back and the library refused), agree with NumPy (`_self_test`) and read a file right
    (`_read_self_test`)."""
    before = _flushes_subnormals()
    saved = _fenv()
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return None, f"cannot load {path}: {exc}"
    if _flushes_subnormals() != before:
        if saved is not None:
            libm, env = saved
            libm.fesetenv(env)
        return None, (f"loading {path} changed this process's floating-point mode (subnormals "
                      "flushed to zero: built with fast-math?)" +
                      ("; mode restored" if saved is not None and not _flushes_subnormals()
                       else "; could not restore it"))
    try:
        kernel = NormalizeKernel(lib, path)
    except AttributeError as exc:       # a library of another dsfm version, or another source
        return None, f"{path} lacks a function of the kernel ({str(exc).split(': ')[-1]})"
    why = _self_test(kernel) or _read_self_test(kernel)
    return (None, why) if why is not None else (kernel, None)


def _private_fallback() -> tuple[str, str | None]:
    """The kernel's path in a directory of this user's own under the temporary directory, built
    if missing, and None or why not. A shared /tmp is writable by everyone: a directory that
    someone else created, or that others may write to, could hold a library planted for us to
    load, and is refused."""
    directory = os.path.join(tempfile.gettempdir(), f"dsfm-native-{os.getuid()}")
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return "", f"cannot create {directory}: {exc.strerror}"
    st = os.lstat(directory)
    if not os.path.isdir(directory) or os.path.islink(directory) or \
            st.st_uid != os.getuid() or st.st_mode & 0o022:
        return "", (f"{directory} is not a directory of this user's that only they can write "
                    "to; not building or loading a library there")
    path = library_path(directory)
    return path, (None if os.path.exists(path) else _build(path))


def _self_test(kernel: NormalizeKernel) -> str | None:
    """Compare the kernel with NumPy on in-place, paired and strided planes, bit for bit, and
    its Inf/NaN verdict. Returns None, or what differed."""
    rng = np.random.default_rng(0)
    n = 1000
    shift = np.array([0.0, -3.0, 1e-3], np.float32)
    scale = np.array([3.0, 0.7, 1e-30], np.float32)
    specials = np.array([0.0, -0.0, 1e-45, -3e-45, -1e-38, 1e38, 1.0, -7.5], np.float32)
    cases = [(None, 0)] + [(bad, where) for bad in (np.inf, np.nan, -np.inf)
                           for where in range(3)]
    for bad, where in cases:
        inplace = (rng.standard_normal(n) * 100).astype(np.float32)
        pairs = (rng.standard_normal(2 * n) * 1e3).astype(np.float32)
        triples = rng.standard_normal(3 * n).astype(np.float32)
        inplace[:len(specials)] = specials
        pairs[1:2 * len(specials):2] = specials
        if bad is not None:              # the last element of one plane's input
            [inplace, pairs[1::2], triples[2::3]][where][-1] = bad
        with np.errstate(all="ignore"):
            want = [(inplace - shift[0]) / scale[0], (pairs[1::2] - shift[1]) / scale[1],
                    (triples[2::3] - shift[2]) / scale[2]]
            should = all(np.isfinite(w).all() for w in want)
        out = np.zeros((2, n), np.float32)
        bases = np.array([inplace.ctypes.data, pairs.ctypes.data, triples.ctypes.data,
                          out.ctypes.data], np.uint64)
        planes = np.array([(0, 0, 0, 0, 1, 0), (0, 4, 3, 1, 2, 1), (4 * n, 8, 3, 2, 3, 2)],
                          PLANE)
        finite = kernel(bases, planes, n, shift, scale)
        got = [inplace, out[0], out[1]]
        if finite != should:
            return f"its finite check said {finite} where NumPy says {should}"
        for g, w in zip(got, want):
            same = (g.view(np.uint32) == w.view(np.uint32)) | (np.isnan(g) & np.isnan(w))
            if not same.all():
                i = int(np.flatnonzero(~same)[0])
                return f"it gives {g[i]!r} where NumPy gives {w[i]!r}"
    return None


def _read_self_test(kernel: NormalizeKernel) -> str | None:
    """One batch of two windows read by `read_windows` from an in-memory file, scattered over
    two buffers: the bytes must be the file's. Returns None, or what differed."""
    data = np.arange(64, dtype=np.float32)
    try:
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create("dsfm-self-test")
        else:
            fd, name = tempfile.mkstemp()
            os.unlink(name)
    except OSError as exc:
        return f"cannot make a file to test its reads on: {exc}"
    try:
        os.pwrite(fd, data.tobytes(), 0)
        a, b = np.zeros((2, 8), np.float32), np.zeros((2, 4), np.float32)
        pieces = np.array([(4, 12, 0, 0), (0, 16, 1, 0)], PIECE)
        reads = np.array([[(40, fd, 0, 2, 0)], [(160, fd, 0, 2, 0)]], READ)
        status = np.zeros(2, np.int32)
        none = np.zeros(0, np.float32)
        done = kernel.read_windows(reads, 1, pieces, np.array([a.ctypes.data, b.ctypes.data],
                                   np.uint64), np.array([32, 16], np.int64), 2,
                                   np.zeros(0, PLANE), None, 0, none, none, False, status)
        if done != 2 or status.tolist() != [0, 0]:
            return f"its reads failed (window {done}, status {status.tolist()})"
        for w, first in enumerate((10, 40)):
            got = np.concatenate([a[w, 1:4], b[w]])
            if not np.array_equal(got, data[first:first + 7]) or a[w, 0] or a[w, 4:].any():
                return f"its reads put {got.tolist()} where the file holds " \
                    f"{data[first:first + 7].tolist()}"
    finally:
        os.close(fd)
    return None


def load(enabled: bool | None = None) -> NormalizeKernel | None:
    """The kernel, building it if needed (once per process), or None when it is turned off or
    cannot be built; `why_unavailable()` then says why."""
    if not (ENABLED_DEFAULT if enabled is None else enabled):
        return None
    if "kernel" in _loaded:
        return _loaded["kernel"]  # type: ignore[return-value]
    kernel, why = None, None
    path = library_path()
    if not os.path.exists(path):
        why = _build(path)
        if why is not None and why.startswith("cannot create"):
            # a read-only home: build per user in the temporary directory instead
            path, why = _private_fallback()
    if why is None:
        kernel, why = _load_checked(path)
        if kernel is None and why.startswith("cannot load"):
            # a damaged cached file, of which nothing got loaded: build it again, once
            why = _build(path)
            if why is None:
                kernel, why = _load_checked(path)
        elif kernel is None:
            # loaded but refused (left by an older dsfm, or put there by hand): this process
            # uses NumPy, and the next one builds afresh
            try:
                os.unlink(path)
            except OSError:
                pass
    _loaded["kernel"], _loaded["why"] = kernel, why
    return kernel


def why_unavailable(enabled: bool | None = None) -> str | None:
    """None when `load()` gives the kernel; otherwise the reason."""
    if not (ENABLED_DEFAULT if enabled is None else enabled):
        return "turned off (DSFM_NATIVE=0 or native_kernel=False)"
    load(True)
    return _loaded.get("why")  # type: ignore[return-value]


def forget() -> None:
    """Drop this process's memo of the kernel (tests: load again under other settings)."""
    _loaded.clear()
