"""Open HDF5 files once per process, keep a bounded number open, close them on exit.

Upstream reopens a file (and re-reads its attributes) for every sample. Here each process keeps
its handles: a file is opened on first use, stays open for later windows, and the least recently
used handle is closed when more than `max_open` would be open. Handles are never shared across a
fork: a pool used in a new process (a DataLoader worker) starts empty.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections import OrderedDict

import h5py
import numpy as np
from h5py import h5s, h5t

from dsfm.data.well_format import open_h5

_pools: "weakref.WeakSet[H5Pool]" = weakref.WeakSet()
_MEMORY_TYPES: dict[np.dtype, h5t.TypeID] = {}


class Slab:
    """Repeated hyperslab reads of one dataset with the least per-read cost.

    h5py's read_direct rebuilds selection objects and looks up the memory type on every call,
    which costs more than copying a 1 MB window; here the file space, the memory spaces and the
    memory type are made once and only the hyperslab changes between reads.
    """

    __slots__ = ("dset", "fspace", "mspaces")

    def __init__(self, dset: h5py.Dataset):
        self.dset = dset
        self.fspace = dset.id.get_space()
        self.mspaces: dict[tuple, h5s.SpaceID] = {}

    def read(self, lead: tuple[tuple[int, int, int], ...], out: np.ndarray) -> None:
        """Read (start, count, step) along the leading axes, every element of the others, into
        the C-contiguous array `out` (converting to its dtype)."""
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

#: HDF5 chunk cache per open file: enough for a window of a chunked 256² multi-field dataset.
CHUNK_CACHE_BYTES = 64 * 1024 * 1024


class H5Pool:
    """An LRU set of read-only h5py.File handles, owned by the process that opened them."""

    def __init__(self, max_open: int = 64, chunk_cache_bytes: int = CHUNK_CACHE_BYTES):
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.max_open = max_open
        self.chunk_cache_bytes = chunk_cache_bytes
        self._files: OrderedDict[str, h5py.File] = OrderedDict()
        self._datasets: dict[str, dict[str, Slab]] = {}
        self._pid = os.getpid()
        _pools.add(self)

    def get(self, path: str) -> h5py.File:
        if self._pid != os.getpid():          # inherited through fork: not ours to use or close
            self._files, self._datasets = OrderedDict(), {}
            self._pid = os.getpid()
        f = self._files.get(path)
        if f is not None and f.id.valid:
            self._files.move_to_end(path)
            return f
        while len(self._files) >= self.max_open:
            old_path, old = self._files.popitem(last=False)
            self._datasets.pop(old_path, None)
            old.close()
        f = open_h5(path, rdcc_nbytes=self.chunk_cache_bytes)
        self._files[path] = f
        self._datasets[path] = {}
        return f

    def dataset(self, path: str, name: str) -> h5py.Dataset:
        """A dataset of an open file, looked up once per open (h5py lookups cost tens of µs)."""
        return self.slab(path, name).dset

    def slab(self, path: str, name: str) -> Slab:
        """A `Slab` reader of a dataset of an open file, made once per open."""
        f = self.get(path)
        table = self._datasets[path]
        d = table.get(name)
        if d is None:
            d = table[name] = Slab(f[name])
        return d

    @property
    def n_open(self) -> int:
        return sum(1 for f in self._files.values() if f.id.valid) \
            if self._pid == os.getpid() else 0

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                if f.id.valid:
                    f.close()
        self._files, self._datasets = OrderedDict(), {}

    def __getstate__(self):
        return {"max_open": self.max_open, "chunk_cache_bytes": self.chunk_cache_bytes}

    def __setstate__(self, state):
        self.__init__(**state)


@atexit.register
def _close_all() -> None:
    for pool in list(_pools):
        pool.close()
