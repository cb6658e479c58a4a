"""Open HDF5 files once per process, keep a bounded number open, close them on exit.

Upstream reopens a file (and re-reads its attributes) for every sample. Here each process keeps
its handles: a file is opened on first use, stays open for later windows, and the least recently
used handle is closed when more than `max_open` would be open. Handles are never shared across a
fork: a pool used in a new process (a DataLoader worker) starts empty.
"""

from __future__ import annotations

import atexit
import itertools
import os
import secrets
import weakref
from collections import OrderedDict

import h5py
import numpy as np
from h5py import h5d, h5s, h5t

from dsfm.data.well_format import open_h5

_pools: "weakref.WeakSet[H5Pool]" = weakref.WeakSet()
_MEMORY_TYPES: dict[np.dtype, h5t.TypeID] = {}
_opens = itertools.count(1)     # numbers every open of a file (H5Pool.touch)
#: stands for this process in those numbers: random, and drawn again in a forked child, so that
#: a cache of descriptors that reaches another process (a pickle, a fork) never matches there
_process_token = secrets.randbits(64)


def _new_token() -> None:
    global _process_token
    _process_token = secrets.randbits(64)


os.register_at_fork(after_in_child=_new_token)


#: Set DSFM_HDF5_DIRECT=0 to read every hyperslab through the HDF5 library (for comparisons).
DIRECT_DEFAULT = os.environ.get("DSFM_HDF5_DIRECT", "1") not in ("0", "false", "no", "off")
_IOV_MAX = 1024
_NATIVE_F4 = np.dtype(np.float32)


def direct_offset(dset: h5py.Dataset) -> int | None:
    """Byte offset of a dataset's data in its file when plain positioned reads give exactly
    what HDF5 would (see `why_not_direct`). Otherwise None."""
    return None if why_not_direct(dset) else dset.id.get_offset()


def why_not_direct(dset: h5py.Dataset) -> str | None:
    """Why a dataset cannot be read with positioned reads, or None when it can: it must be
    stored contiguously and allocated, with no filters or external files, as native float32
    (so no type conversion), in a file opened with the default POSIX driver."""
    try:
        if dset.file.driver != "sec2":
            return f"the file is opened with the {dset.file.driver} driver"
        if dset.dtype != _NATIVE_F4:
            return f"stored as {dset.dtype.str}, not native float32"
        if dset.size == 0:
            return "empty"
        plist = dset.id.get_create_plist()
        if plist.get_layout() != h5d.CONTIGUOUS:
            chunks = f" in chunks of {dset.chunks}" if dset.chunks else ""
            filters = f", {dset.compression} compressed" if dset.compression else ""
            return f"stored{chunks}{filters}" if chunks or filters else "not contiguous"
        if plist.get_nfilters():
            return "filtered"
        if plist.get_external_count():
            return "stored in external files"
        if dset.id.get_offset() is None:
            return "not allocated (never written)"
        return None
    except (OSError, ValueError, AttributeError) as exc:
        return f"not inspectable ({exc})"


class Slab:
    """Repeated hyperslab reads of one dataset with the least per-read cost.

    h5py's read_direct rebuilds selection objects and looks up the memory type on every call,
    which costs more than copying a 1 MB window; here the file space, the memory spaces and the
    memory type are made once and only the hyperslab changes between reads. Better still, when
    the data are stored contiguously, unfiltered and as native float32 (HDF5's default layout,
    and how dsfm.sim writes The Well's and PDEBench's formats), a window is one byte range of
    the file: it is read with one positioned read (`preadv`) straight into its destination, with
    no HDF5 call at all, and can be scattered over several destination buffers by the same
    system call.
    """

    __slots__ = ("dset", "fspace", "mspaces", "fd", "offset", "dims", "axis_bytes", "watch")

    def __init__(self, dset: h5py.Dataset, fd: int | None = None,
                 watch: tuple[int, int] | None = None):
        """`fd`: a descriptor of the file for direct reads (None: through HDF5 only).
        `watch`: (a descriptor of the file, its size when opened): reads through HDF5 check
        that the file has not shrunk since, since HDF5 reads the bytes past a file's end as
        zeros, without an error."""
        self.dset = dset
        self.watch = watch
        self.fspace = dset.id.get_space()
        self.mspaces: dict[tuple, h5s.SpaceID] = {}
        self.dims = dset.shape
        self.offset = direct_offset(dset) if fd is not None else None
        self.fd = fd if self.offset is not None else None
        # bytes from one index to the next along each axis, and (last) of the whole dataset
        acc, steps = dset.dtype.itemsize, []
        for n in reversed(self.dims):
            steps.append(acc)
            acc *= n
        self.axis_bytes = tuple(reversed(steps)) + (acc,)

    @property
    def direct(self) -> bool:
        """Whether reads into float32 memory bypass the HDF5 library."""
        return self.fd is not None

    def _runs(self, lead: tuple[tuple[int, int, int], ...]) -> tuple[list[int], int]:
        """File byte offsets of the selection's contiguous runs, and the bytes of each run.
        All lead axes but the last select one index (a trajectory, a time window)."""
        if not lead:
            return [self.offset], self.axis_bytes[-1]
        base = self.offset
        for (a, n, k), dim, step_bytes in zip(lead, self.dims, self.axis_bytes):
            if a < 0 or n < 1 or k < 1 or a + (n - 1) * k >= dim:
                raise ValueError(f"selection {a}:{a + (n - 1) * k + 1}:{k} is out of range for "
                                 f"an axis of {dim} in /{self.dset.name.lstrip('/')} "
                                 f"{self.dims}")
            base += a * step_bytes
        _, count, step = lead[-1]
        inner = self.axis_bytes[len(lead) - 1]
        if step == 1 or count == 1:
            return [base], inner * count
        return [base + k * step * inner for k in range(count)], inner

    def _pread(self, buffers: list, offset: int, want: int) -> None:
        """Fill `buffers` (`want` bytes in all, in order) from the file starting at `offset`;
        a short read is an error naming the file's end."""
        if len(buffers) <= _IOV_MAX and os.preadv(self.fd, buffers, offset) == want:
            return
        done = 0                        # slow path: huge reads, many buffers, or the file ended
        for b in buffers:
            mv = memoryview(b).cast("B")
            pos = 0
            while pos < mv.nbytes:
                n = os.preadv(self.fd, [mv[pos:]], offset + done + pos)
                if n == 0:
                    raise OSError(f"the file ends before byte {offset + done + pos} of /"
                                  f"{self.dset.name.lstrip('/')} (truncated while open?)")
                pos += n
            done += mv.nbytes

    def read(self, lead: tuple[tuple[int, int, int], ...], out: np.ndarray) -> None:
        """Read (start, count, step) along the leading axes, every element of the others, into
        the C-contiguous array `out` (converting to its dtype)."""
        if self.fd is not None and out.dtype == _NATIVE_F4 and out.flags.c_contiguous and \
                all(n == 1 for _, n, _ in lead[:-1]):
            offsets, run = self._runs(lead)
            if out.nbytes != run * len(offsets):
                raise ValueError(f"destination of {out.shape} does not hold the selection "
                                 f"{lead} of /{self.dset.name.lstrip('/')} {self.dims}")
            if len(offsets) == 1:
                self._pread([out], offsets[0], out.nbytes)
            else:
                flat = out.reshape(-1).view(np.uint8)
                for k, off in enumerate(offsets):
                    self._pread([flat[k * run:(k + 1) * run]], off, run)
            return
        rest = self.dset.shape[len(lead):]
        self.fspace.select_hyperslab(tuple(a for a, _, _ in lead) + (0,) * len(rest),
                                     tuple(n for _, n, _ in lead) + rest,
                                     tuple(s for _, _, s in lead) + (1,) * len(rest))
        mspace = self.mspaces.get(out.shape)
        if mspace is None:
            mspace = self.mspaces[out.shape] = h5s.create_simple(out.shape or (1,))
        mtype = _MEMORY_TYPES.get(out.dtype)
        if mtype is None:
            mtype = _MEMORY_TYPES[out.dtype] = h5t.py_create(out.dtype)
        self.dset.id.read(mspace, self.fspace, out, mtype=mtype)
        if self.watch is not None:
            fd, size = self.watch
            now = os.fstat(fd).st_size
            if now < size:                 # what HDF5 read past the end is zeros
                raise OSError(f"the file shrank from {size} to {now} bytes while open, under "
                              f"a read of /{self.dset.name.lstrip('/')} (truncated while "
                              "open?)")

    def read_scatter(self, lead: tuple[tuple[int, int, int], ...], buffers: list) -> None:
        """Direct reads only: the selection's elements along the last lead axis, one
        C-contiguous float32 buffer each (a window's time steps into their places in a batch),
        in one system call when the steps are adjacent in the file."""
        if any(n != 1 for _, n, _ in lead[:-1]):
            raise ValueError("scattered reads select one index on all but the last lead axis")
        if len(buffers) != (lead[-1][1] if lead else 1):
            raise ValueError(f"{len(buffers)} buffers for {lead[-1][1]} selected elements")
        offsets, run = self._runs(lead)
        per = run // len(buffers) if len(offsets) == 1 else run
        if any(b.nbytes != per for b in buffers):
            raise ValueError(f"scattered read of /{self.dset.name.lstrip('/')}: every buffer "
                             f"must hold {per} bytes")
        if len(offsets) == 1:
            self._pread(buffers, offsets[0], run)
        else:
            for b, off in zip(buffers, offsets):
                self._pread([b], off, run)

#: HDF5 chunk cache per open file: enough for a window of a chunked 256² multi-field dataset.
CHUNK_CACHE_BYTES = 64 * 1024 * 1024


class H5Pool:
    """An LRU set of read-only h5py.File handles, owned by the process that opened them."""

    def __init__(self, max_open: int = 64, chunk_cache_bytes: int = CHUNK_CACHE_BYTES,
                 direct: bool | None = None):
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = max_open
        self.chunk_cache_bytes = chunk_cache_bytes
        self.direct = DIRECT_DEFAULT if direct is None else direct
        self._files: OrderedDict[str, h5py.File] = OrderedDict()
        # plain descriptors: for direct reads, and for the size checks of HDF5's reads
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, int] = {}        # each file's size when it was opened
        self._datasets: dict[str, dict[str, Slab]] = {}
        self._serials: dict[str, tuple[int, int]] = {}
        self._pid = os.getpid()
        _pools.add(self)

    def get(self, path: str) -> h5py.File:
        if self._pid != os.getpid():          # inherited through fork: not ours to use or close
            self._files, self._datasets, self._serials = OrderedDict(), {}, {}
            self._drop_fds()
            self._pid = os.getpid()
        f = self._files.get(path)
        if f is not None and f.id.valid:
            self._files.move_to_end(path)
            return f
        if f is not None:                     # closed behind our back: open it afresh
            self._forget(path)
        while len(self._files) >= self.max_open:
            self._forget(next(iter(self._files)))
        f = open_h5(path, rdcc_nbytes=self.chunk_cache_bytes)
        self._files[path] = f
        fd = self._fds[path] = os.open(path, os.O_RDONLY)
        self._sizes[path] = os.fstat(fd).st_size
        self._datasets[path] = {}
        self._serials[path] = (_process_token, next(_opens))
        return f

    def _forget(self, path: str) -> None:
        """Close a file's handle and descriptor and drop what was kept for this open of it."""
        old = self._files.pop(path)
        self._datasets.pop(path, None)
        self._serials.pop(path, None)
        if old.id.valid:
            old.close()
        fd = self._fds.pop(path, None)
        self._sizes.pop(path, None)
        if fd is not None:
            os.close(fd)

    def touch(self, path: str) -> tuple[int, int]:
        """Open `path` (or mark it used) and return what stands for this open of it, unique
        across opens and processes: what a cache of its descriptor and offsets is valid for."""
        self.get(path)
        return self._serials[path]

    def dataset(self, path: str, name: str) -> h5py.Dataset:
        """A dataset of an open file, looked up once per open (h5py lookups cost tens of µs)."""
        return self.slab(path, name).dset

    def slab(self, path: str, name: str) -> Slab:
        """A `Slab` reader of a dataset of an open file, made once per open."""
        return self.slabs(path)(name)

    def slabs(self, path: str):
        """Open `path` (or mark it used) once and return a lookup name → `Slab` for it: for
        reading several arrays of one file without paying for the file lookup each time."""
        f = self.get(path)
        table = self._datasets[path]
        fd = self._fds.get(path)
        watch = None if fd is None else (fd, self._sizes[path])

        def lookup(name: str) -> Slab:
            d = table.get(name)
            if d is None:
                d = table[name] = Slab(f[name], fd if self.direct else None, watch)
            return d
        return lookup

    @property
    def n_open(self) -> int:
        return sum(1 for f in self._files.values() if f.id.valid) \
            if self._pid == os.getpid() else 0

    def _drop_fds(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds, self._sizes = {}, {}

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                if f.id.valid:
                    f.close()
        self._drop_fds()
        self._files, self._datasets, self._serials = OrderedDict(), {}, {}

    def __getstate__(self):
        return {"max_open": self.max_open, "chunk_cache_bytes": self.chunk_cache_bytes,
                "direct": self.direct}

    def __setstate__(self, state):
        self.__init__(**state)


@atexit.register
def _close_all() -> None:
    for pool in list(_pools):
        pool.close()
