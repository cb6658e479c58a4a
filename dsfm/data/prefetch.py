"""`WellLoader`: reader processes → shared ring → (pinned) → device, for multi-physics batches.

    sampler (rank, step → dataset, windows)
      → reader processes: persistent HDF5 handles, one read per stored array per window
        (a positioned read of its byte range where the array allows, through the C kernel for
        a whole batch when it builds, else an HDF5 hyperslab), straight into a slot of a
        shared-memory ring (native layout, no copies, no torch)
      → CUDA: the ring is page-locked once (cudaHostRegister); a side stream copies a slot to the
        device without blocking and assembles it there; an event per batch makes the compute
        stream wait only when data is late, and a slot is reused only after its copy finished
      → on the device: layout [B, T, C, *spatial], broadcasting, normalization (stats.yaml)

Without CUDA the readers assemble and normalize each batch in its slot (the CPU default) or
the device path runs on CPU tensors (assemble_on="device"). Processes, not threads: h5py
serialises every call behind one lock. The ring lives in a file under /dev/shm that is unlinked
the moment it is created (readers inherit its open descriptor), so no crash or signal can leak
it; readers ignore
Ctrl-C, SIGTERM and SIGUSR1/2 (Slurm signals every process of a job step; the trainer decides),
are killed by the kernel if the training process dies (PR_SET_PDEATHSIG, when the loader was
built on the main thread: Linux sends it when the starting *thread* exits) and also exit when
their parent is gone. One loader serves one thread.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence

import numpy as np
import torch

from dsfm import errors, subprocess_env
from dsfm.data import native
from dsfm.data.fields import FieldVocabulary
from dsfm.data.handles import H5Pool
from dsfm.data.index import SPLITS, list_hdf5
from dsfm.data.pdebench import PDEBenchDataset
from dsfm.data.readers import FLOAT_BYTES, IGNORED_SIGNALS, assembled_views
from dsfm.data.sampler import MixtureSampler
from dsfm.data.well import WellDataset
from dsfm.data.well_format import BoundaryCondition
from dsfm.data.windows import (
    WindowSource,
    assembly_plan,
    first_nonfinite,
    offset_wide_blocks,
    well_source,
)
from dsfm.errors import ConfigError, DataError, NonFiniteError

POLL_S = 0.2
#: bytes of a task message beyond its window ids (header, pickled tuple), with room to spare
TASK_OVERHEAD = 256
#: how long `close` lets readers finish the batch in hand before killing them (they only read)
CLOSE_GRACE_S = 1.0


class WorkerError(DataError):
    """A reader process died or stopped answering."""


@dataclass
class Batch:
    """One micro-batch, all from one dataset.

    x [B, T_in, C, *spatial] and y [B, T_out, C, *spatial] are fp32 and normalized;
    field_ids [C] are the columns of the global field vocabulary; bcs [B, n_dims, 2] are boundary
    codes (0 wall, 1 open, 2 periodic) per axis and side, on the batch's device; bcs_host is
    the same on the CPU, so a model can branch on them without waiting for the GPU.
    """

    x: torch.Tensor
    y: torch.Tensor
    field_ids: torch.Tensor
    bcs: torch.Tensor
    dataset: str
    step: int
    windows: np.ndarray = field(repr=False)
    bcs_host: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class _Dataset:
    """Main-process view of one source: the reader part plus what the device needs."""

    source: WindowSource
    boundary_codes: np.ndarray            # [n_files, n_dims, 2]
    shift: np.ndarray | None              # [C] or None (no normalization)
    scale: np.ndarray | None
    field_ids: list[int]
    physical_shift: np.ndarray | None = None    # `shift` before the reads' offsets (affine)
    device_cache: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------- sources


def _is_well_dataset(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "data"))


def _well_dataset(path: str, split: str, n_in: int, n_out: int, stride: int,
                  normalization: str | None) -> tuple[WindowSource, np.ndarray, Any, Any]:
    ds = WellDataset(path=path, well_split_name=split, n_steps_input=n_in, n_steps_output=n_out,
                     min_dt_stride=stride, use_normalization=bool(normalization),
                     normalization_type=normalization)
    source = well_source(ds.layouts, n_in, n_out, stride)
    codes = np.stack([lay.boundary_codes for lay in ds.layouts])
    shift, scale = ds.norm.channel_vectors(ds.layouts[0].variable_fields) if ds.norm \
        else (None, None)
    if shift is not None:       # a field stored as float64 in some file: the shift is
        source.blocks = offset_wide_blocks(                 # subtracted in float64 as it is read
            source.blocks, [any(lay.variable_fields[k].wide for lay in ds.layouts)
                            for k in range(len(source.blocks))], shift)
    return source, codes, shift, scale


def _pdebench_dataset(path: str, split: str, n_in: int, n_out: int, stride: int,
                      normalization: str | None) -> tuple[WindowSource, np.ndarray, Any, Any]:
    ds = PDEBenchDataset(path, split, n_in, n_out, stride, return_grid=False,
                         use_normalization=bool(normalization), normalization_type=normalization)
    codes = np.stack([np.full((2, 2), BoundaryCondition[pf.boundary].value, np.float32)
                      for pf in ds.files])
    return ds.source, codes, ds.shift, ds.scale


@dataclass(frozen=True)
class IndexedDataset:
    """One dataset's split as `index_dataset` indexed it for the arguments in `key` (split,
    n_steps_input, n_steps_output, dt_stride, normalization). WellLoader takes it in place of
    the path, for the same arguments, and does not index it again."""

    path: str
    key: tuple
    source: WindowSource
    boundary_codes: np.ndarray            # [n_files, n_dims, 2]
    shift: Any                            # [C] or None (no normalization)
    scale: Any


def index_dataset(path: str, split: str, n_steps_input: int, n_steps_output: int,
                  dt_stride: int = 1, normalization: str | None = None) -> IndexedDataset:
    """One dataset's split indexed as WellLoader indexes it (name, fields, windows; `.source`),
    from the files' metadata (and with `normalization`, its stats.yaml) alone, no reader
    started: a DataError or ConfigError for what WellLoader would refuse in it."""
    key = (split, n_steps_input, n_steps_output, dt_stride, normalization)
    if _is_well_dataset(path):
        return IndexedDataset(path, key, *_well_dataset(path, *key))
    _refuse_what_is_no_source(path)
    try:
        return IndexedDataset(path, key, *_pdebench_dataset(path, *key))
    except DataError:
        _refuse_part_of_a_well_dataset(path)
        raise


def refuse_one_name_twice(indexed: Sequence[IndexedDataset]) -> None:
    """Two folders whose files give one dataset name (two resolutions of euler_2d, say): the
    name is what tells datasets apart (batches, losses, metrics, field columns, sampler state),
    so they cannot be mixed. The same folder twice is left to the sampler ('raise its weight')."""
    names = [entry.source.name for entry in indexed]
    for i, entry in enumerate(indexed):
        first = names.index(entry.source.name)
        if first != i and os.path.realpath(indexed[first].path) != \
                os.path.realpath(entry.path):
            raise ConfigError(
                f"{indexed[first].path} and {entry.path} are both dataset "
                f"{entry.source.name!r} (the name their files give, which names a dataset's "
                "losses, metrics, field columns and sampler state): two datasets of one name "
                "cannot be mixed; leave one out, or give one's files another dataset_name (a "
                "PDEBench source is named after its file or folder: rename that)")


def _refuse_what_is_no_source(path: str) -> None:
    """What is neither a Well dataset directory nor PDEBench data, said as such: anything not
    a Well dataset used to be read as PDEBench, and a typo in a path, or a directory of
    datasets, was 'no PDEBench .h5/.hdf5 files'."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file or directory")
    if not os.path.isdir(path) or list_hdf5(path):
        return
    _refuse_part_of_a_well_dataset(path)
    inside = sorted(name for name in os.listdir(path)
                    if _is_well_dataset(os.path.join(path, name)))
    kind = "Well datasets"
    if not inside:
        inside = sorted(name for name in os.listdir(path)
                        if os.path.isdir(os.path.join(path, name))
                        and list_hdf5(os.path.join(path, name)))
        kind = "folders of .h5/.hdf5 files"
    if inside:
        first = os.path.join(path, inside[0])
        raise ConfigError(f"{path} is a directory of {kind} ({', '.join(inside)}), not one: "
                          f"give each one's directory ({first}, ...)")
    raise ConfigError(f"{path} is neither a Well dataset (no data/ directory) nor PDEBench data "
                      "(no .h5/.hdf5 files)")


def _refuse_part_of_a_well_dataset(path: str) -> None:
    """A file, split directory or data/ directory of a Well dataset: name the dataset."""
    parts = os.path.abspath(path).split(os.sep)
    for depth in (1, 2, 3):             # <dataset>/data[/<split>[/<file>]]
        up, below = os.sep.join(parts[:-depth]), parts[-depth:]
        if below[0] == "data" and (depth == 1 or below[1] in SPLITS) and _is_well_dataset(up):
            raise ConfigError(f"{path} is part of the Well dataset {up}: give the dataset's "
                              f"directory, {up} (the one holding data/<split>/)")


# ------------------------------------------------------------------------------- ring


class _Ring:
    """n_slots × slot_bytes of shared memory: a file under /dev/shm (so that its size counts
    against the shared memory the machine or container has), unlinked as soon as it is created
    and kept open (`fd`) for the readers to inherit and map."""

    def __init__(self, n_slots: int, slot_bytes: int):
        self.n_slots, self.slot_bytes = n_slots, slot_bytes
        self.nbytes = n_slots * slot_bytes
        root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        self.path = os.path.join(root, f"dsfm-ring-{os.getpid()}-{secrets.token_hex(4)}")
        fd = None
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        finally:
            if fd is not None:
                self.unlink()           # nameless from here on: nothing left to leak
        try:
            os.ftruncate(fd, self.nbytes)
            self._reserve(fd, root)
            self._mm = mmap.mmap(fd, self.nbytes)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd                    # closed once the readers have mapped it
        self.array = np.frombuffer(self._mm, dtype=np.uint8)
        self.array[::mmap.PAGESIZE] = 0      # map every page here: memory is taken up front
        self.pinned = False

    def _reserve(self, fd: int, root: str) -> None:
        """Allocate the whole ring now. A sparse file would take its pages as readers first
        write them, and a too small /dev/shm (a container's 64 MB default) would then kill a
        reader with SIGBUS in the middle of training instead of failing here."""
        try:
            os.posix_fallocate(fd, 0, self.nbytes)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return                           # a file system without fallocate: stay sparse
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                free = shutil.disk_usage(root).free
                raise ConfigError(
                    f"the loader's ring needs {self.nbytes / 2**20:.0f} MiB of shared memory "
                    f"but {root} has {free / 2**20:.0f} MiB free; lower ring_slots or "
                    "batch_size, or give the machine or container more shared memory "
                    "(docker run --shm-size)") from None
            raise

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def slot(self, i: int) -> np.ndarray:
        return self.array[i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def pin(self) -> None:
        """Page-lock the whole ring once, so host-to-device copies run at full speed."""
        ptr = self.array.ctypes.data
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0)
        if int(err) != 0:
            raise WorkerError(f"cudaHostRegister of the {self.nbytes / 2**20:.0f} MiB loader ring "
                              f"failed (error {int(err)}); lower ring_slots or batch size")
        self.pinned = True

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.array.ctypes.data)
            self.pinned = False
        self.close_fd()
        self.array = None
        try:
            self._mm.close()
        except BufferError:       # a tensor still views the ring; the mapping dies with it
            pass


# ------------------------------------------------------------------------------- assembly


def assemble(flat: torch.Tensor, source: WindowSource, batch: int, n_in: int,
             shift: torch.Tensor | None, scale: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot contents (float32, native block layouts) → normalized x [B, T_in, C, *spatial] and
    y [B, T_out, C, *spatial], on `flat`'s device: the torch twin of
    `WindowSource.read_assembled`. The layout change and the subtraction are one pass (written
    straight into x and y), the division a second."""
    n, spatial, c_total = source.n_steps, source.spatial_shape, source.n_channels
    x = torch.empty((batch, n_in, c_total) + spatial, dtype=torch.float32, device=flat.device)
    y = torch.empty((batch, n - n_in, c_total) + spatial, dtype=torch.float32, device=flat.device)
    view = (1, 1, -1) + (1,) * len(spatial)
    for offset, k, shape, c0, c1 in assembly_plan(source, batch):
        t = flat[offset:offset + k].view(shape).movedim(-1, 2)
        t = t.expand((batch, n, c1 - c0) + spatial)
        for out, part in ((x, t[:, :n_in]), (y, t[:, n_in:])):
            if shift is None:
                out[:, :, c0:c1].copy_(part)
            else:
                torch.sub(part, shift[c0:c1].view(view), out=out[:, :, c0:c1])
    if scale is not None:
        x.div_(scale.view(view))
        y.div_(scale.view(view))
    return x, y


def all_finite(*tensors: torch.Tensor) -> torch.Tensor | bool:
    """Every element is finite: a 0-d bool tensor on a GPU (no host sync), a bool on the CPU
    (where NumPy's check is several times faster than torch's)."""
    if tensors[0].device.type == "cpu":
        return all(bool(np.isfinite(t.numpy()).all()) for t in tensors)
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


# ------------------------------------------------------------------------------- loader


def _enlarge_pipe(fd: int, nbytes: int) -> int:
    """Ask Linux for a pipe buffer of at least `nbytes` (capped by its limits); the size it has."""
    size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    if nbytes > size:
        try:
            cap = int(open("/proc/sys/fs/pipe-max-size").read())
            size = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, min(nbytes, cap))
        except (OSError, ValueError):
            pass                             # over the user's pipe quota: keep what it has
    return size


def _dist_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return (torch.distributed.get_rank() if rank is None else rank,
                torch.distributed.get_world_size() if world_size is None else world_size)
    if rank is None and world_size not in (None, 1):
        raise ConfigError(f"world_size={world_size} without a rank, and no process group to "
                          "ask: every process would read rank 0's windows; give rank too")
    return rank or 0, world_size or 1


class WellLoader:
    """Endless micro-batches from a mixture of Well datasets and PDEBench sources.

    datasets: Well dataset directories (`<base>/<name>` with `data/<split>/` and `stats.yaml`)
    and PDEBench files or directories, or what `index_dataset` returned for them with this
    loader's arguments (not indexed again). Each micro-batch comes from one dataset (MPP
    balancing), drawn with `weights` (uniform by default), the same on all ranks if
    `same_dataset_across_ranks`. rank/world_size default to torch.distributed's (or 0/1).
    device: where batches go (default: this rank's CUDA device if CUDA is available, else CPU).
    normalization: "zscore", "rms" or None, from each source's statistics (stats.yaml, or
    <stem>.stats.yaml beside a PDEBench file), on the device with CUDA, in the readers on CPU.
    ring_slots: micro-batches read ahead of the trainer (default 2·num_workers + 2), each in a
    slot of the shared-memory ring (ring_slots × the largest micro-batch) until it is handed out
    or, on CUDA, copied to the device, where at most ring_slots batches wait; nothing else grows.
    assemble_on: where the layout change, broadcasting and normalization run. "device" (the
    default with CUDA): readers only read and the device assembles; "readers" (the default on
    CPU): readers assemble in parallel and batches are handed out without a copy, leasing their
    ring slot until their tensors are freed (.clone() what you keep for long).
    direct_reads: read arrays stored contiguously as float32 with positioned reads of the file
    instead of through the HDF5 library (same values, less overhead; default on, or
    DSFM_HDF5_DIRECT=0 to turn off).
    reader_cpus: CPU ids the reader processes may run on (default: wherever this process may),
    for instance the cores of the GPU's NUMA node that the training process does not use.
    native_kernel: readers run each batch's positioned reads with one call of the C kernel of
    `dsfm.data.native` (built with the system C compiler on first use) and, when they
    assemble, normalize and check each window in one pass with it (the same values as NumPy).
    None (default): if it builds, else Python and NumPy; DSFM_NATIVE=0 turns it off; True: a
    ConfigError saying why when it cannot be used. `native_kernel_used` tells what ran.
    """

    def __init__(self, datasets: Sequence[str | IndexedDataset], split: str = "train",
                 n_steps_input: int = 4, n_steps_output: int = 1, batch_size: int = 8,
                 num_workers: int = 2,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 device: str | torch.device | None = None, normalization: str | None = "zscore",
                 weights: Sequence[float] | None = None, same_dataset_across_ranks: bool = False,
                 dt_stride: int = 1, ring_slots: int | None = None, check_finite: bool = True,
                 vocabulary: FieldVocabulary | None = None, max_open_files: int = 64,
                 assemble_on: str = "auto", direct_reads: bool | None = None,
                 reader_cpus: Sequence[int] | None = None, native_kernel: bool | None = None,
                 worker_start_timeout_s: float = 120.0, read_timeout_s: float = 600.0):
        if split not in SPLITS:
            raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        # counts reach the ring's size, range() and the readers: a float or a bool there was a
        # TypeError from deep inside, a max_open_files < 1 a traceback from every reader
        for what, value, least in (("n_steps_input", n_steps_input, 1),
                                   ("n_steps_output", n_steps_output, 0),
                                   ("dt_stride", dt_stride, 1), ("num_workers", num_workers, 1),
                                   ("ring_slots", 2 if ring_slots is None else ring_slots, 2),
                                   ("max_open_files", max_open_files, 1)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"{what} must be an integer, got {value!r}")
            if value < least:
                raise ConfigError(f"{what} must be >= {least}, got {value}")
        for what, value in (("worker_start_timeout_s", worker_start_timeout_s),
                            ("read_timeout_s", read_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                    or not value > 0:
                raise ConfigError(f"{what} must be a positive number of seconds, got {value!r}")
        if isinstance(datasets, (str, os.PathLike, IndexedDataset)):
            datasets = [datasets]               # one dataset, not a list of them
        self.n_steps_input, self.n_steps_output = n_steps_input, n_steps_output
        self.batch_size, self.num_workers = batch_size, num_workers
        self.check_finite = check_finite
        self.read_timeout_s = read_timeout_s
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) \
                if torch.cuda.is_available() else torch.device("cpu")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if assemble_on not in ("auto", "readers", "device"):
            raise ConfigError(f"assemble_on {assemble_on!r} is not one of auto, readers, device")
        if self.cuda and assemble_on == "readers":
            raise ConfigError("assemble_on='readers' is for CPU training; on CUDA the device "
                              "assembles")
        self.direct_reads = direct_reads
        self.reader_cpus = None if reader_cpus is None else sorted(set(int(c) for c in
                                                                        reader_cpus))
        if self.reader_cpus is not None:
            allowed = os.sched_getaffinity(0)
            if not self.reader_cpus or not set(self.reader_cpus) <= allowed:
                raise ConfigError(f"reader_cpus {self.reader_cpus} must be a non-empty subset of "
                                  f"the CPUs this process may use ({sorted(allowed)})")
        self.readers_assemble = assemble_on == "readers" or (assemble_on == "auto"
                                                             and not self.cuda)
        # built here once, so that the readers only load it
        self._use_native = native.load(native_kernel) is not None
        if native_kernel and not self._use_native:
            raise ConfigError(f"native_kernel=True, but the kernel is unavailable: "
                              f"{native.why_unavailable(True)}")
        self.native_kernel_used = False          # set from the readers once they are up
        self.vocabulary = vocabulary if vocabulary is not None else FieldVocabulary()

        self.datasets: list[_Dataset] = []
        key = (split, n_steps_input, n_steps_output, dt_stride, normalization)
        indexed = []
        for entry in datasets:
            if not isinstance(entry, IndexedDataset):
                entry = index_dataset(os.fspath(entry), *key)
            elif entry.key != key:
                raise ConfigError(f"{entry.path} was indexed for (split, n_steps_input, "
                                  f"n_steps_output, dt_stride, normalization) {entry.key}, "
                                  f"this loader reads {key}")
            indexed.append(entry)
        refuse_one_name_twice(indexed)
        for entry in indexed:
            source = entry.source
            ids = self.vocabulary.add(source.vocabulary_name, source.channel_names)
            shift = entry.shift      # less what the reads subtract already (Block.offset)
            if shift is not None and source.read_offsets.any():
                shift = (shift - source.read_offsets).astype(np.float32)
            self.datasets.append(_Dataset(source, entry.boundary_codes, shift, entry.scale,
                                          ids, entry.shift))
        names = [d.source.name for d in self.datasets]
        rank, world_size = _dist_rank_world(rank, world_size)
        self.sampler = MixtureSampler([len(d.source) for d in self.datasets], batch_size, seed,
                                      rank, world_size, weights, same_dataset_across_ranks, names)

        per_window = [d.source.assembled_floats if self.readers_assemble
                      else d.source.window_floats for d in self.datasets]
        slot_bytes = max(per_window) * batch_size * FLOAT_BYTES
        slot_bytes = -(-slot_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self.ring_slots = 2 * num_workers + 2 if ring_slots is None else ring_slots
        if self.ring_slots < 2:
            raise ConfigError(f"ring_slots must be >= 2, got {self.ring_slots}")
        self._ring = _Ring(self.ring_slots, slot_bytes)
        self._workers: list[subprocess.Popen] = []
        self._inflight: dict[int, tuple] = {}     # step -> (slot, dataset, windows, worker, t0)
        self._closed = False
        self._stopped_by: str | None = None      # why next() closed the loader
        self._owner = os.getpid()
        try:
            self._start_workers(max_open_files, worker_start_timeout_s)
            if self.cuda:
                self._ring.pin()
                self._stream = torch.cuda.Stream(self.device)
        except BaseException:
            self.close()
            raise
        self._free = list(range(self.ring_slots))
        # slot -> weak references to the arrays of the CPU batch it holds. Polled, not called
        # back: a Ctrl-C that lands in a finalizer callback is printed and dropped by Python,
        # which once left a trainer running on after SIGINT.
        self._leases: dict[int, tuple[weakref.ref, ...]] = {}
        self._outstanding = [0] * num_workers
        self._done: set[int] = set()
        # steps whose reader reported an error before they were due: raised when they are
        self._failed: dict[int, Exception] = {}
        self._ready: dict[int, tuple] = {}        # step -> (Batch, copy event) on CUDA
        self._copying: list[tuple[Any, int]] = []  # (copy event, slot)
        self._snapshots: dict[int, dict] = {}
        self._next_submit = 0
        self._next_yield = 0
        self._pending_check: tuple | None = None
        # CUDA: where the previous batch's finiteness flag lands (pinned: copied without a sync)
        self._flag_host = (torch.zeros((), dtype=torch.bool).pin_memory() if self.cuda
                           else None)
        self._state = self.sampler.state_dict()
        self.wait_s = 0.0                          # trainer time spent waiting for data
        self.next_s = 0.0                          # trainer time in __next__, all of it
        self.launch_s = 0.0                        # ... of which issuing copies and assembly
        self.batches_out = 0
        self.last_wait_s = 0.0
        self.time_copies = False                   # CUDA: time each host-to-device copy
        self.copies: list[tuple[int, Any, Any]] = []   # (bytes, start event, end event)
        self.read_s = [0.0] * num_workers          # per reader: seconds busy with batches
        self.windows_read = [0] * num_workers

    # ---------------------------------------------------------------- workers

    def _start_workers(self, max_open_files: int, timeout_s: float) -> None:
        sources = [d.source for d in self.datasets]
        env = subprocess_env()
        self._tasks: list[Connection] = []
        self._results: list[Connection] = []
        # a task message carries its window ids; a send to a stalled reader must never block
        # (the trainer would hang past read_timeout_s), so each reader gets no more tasks at
        # once than its pipe holds: the pipe is enlarged to hold ring_slots of them if it may
        task_bytes = 8 * self.batch_size + TASK_OVERHEAD
        self._tasks_per_reader = self.ring_slots
        for wid in range(self.num_workers):
            # this process's ends are kept (and closed by close()) before the reader starts: a
            # Ctrl-C that lands in Popen after its fork loses the Popen, and a reader whose task
            # pipe stayed open here waited for its first message as long as this process lived
            task_r, task_w = os.pipe()
            self._tasks.append(Connection(task_w, readable=False))
            res_r, res_w = os.pipe()
            self._results.append(Connection(res_r, writable=False))
            self._tasks_per_reader = min(self._tasks_per_reader,
                                         _enlarge_pipe(task_w, self.ring_slots * task_bytes)
                                         // task_bytes - 1)
            # a reader ignores Slurm's signals only once its interpreter has started and imported
            # its modules (a fraction of a second): until then exec has reset this process's
            # handlers (the trainer's checkpoint request, from an evaluation's loader) to the
            # default, and a SIGUSR1 or SIGTERM to the job step killed it, and the run with it
            # ("died (killed by signal 10) while starting"). Blocked here, they stay blocked in
            # the reader (exec keeps the mask) until it ignores them; this thread gets its own
            # as the mask is restored.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, IGNORED_SIGNALS)
            try:
                try:
                    # Linux's parent-death signal follows the thread that starts the child: only
                    # the main thread lives as long as the process
                    pdeath = int(threading.current_thread() is threading.main_thread())
                    proc = subprocess.Popen([sys.executable, "-m", "dsfm.data.readers",
                                             str(task_r), str(res_w), str(pdeath)],
                                            pass_fds=(task_r, res_w, self._ring.fd), env=env)
                finally:
                    os.close(task_r)
                    os.close(res_w)
                self._workers.append(proc)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            try:
                self._tasks[-1].send(("init", wid, self._ring.fd, self._ring.nbytes,
                                      self._ring.slot_bytes, sources, os.getpid(),
                                      max_open_files, self.readers_assemble, self.n_steps_input,
                                      [(d.shift, d.scale) for d in self.datasets],
                                      self.check_finite, self.direct_reads, self.reader_cpus,
                                      self._use_native))
            except (BrokenPipeError, ConnectionResetError):
                pass        # it died before reading it: the wait below reports how
        waiting = set(range(self.num_workers))
        kernels = [False] * self.num_workers
        deadline = time.monotonic() + timeout_s
        while waiting:
            for conn in wait([self._results[w] for w in waiting], timeout=POLL_S):
                wid = self._results.index(conn)
                try:
                    msg = conn.recv()
                except EOFError:
                    msg = ("eof",)
                if msg[0] == "ready":
                    waiting.discard(wid)
                    kernels[wid] = msg[3]
            self._check_alive("starting")
            if waiting and time.monotonic() > deadline:
                raise WorkerError(f"reader processes did not start within {timeout_s:.0f} s")
        self.native_kernel_used = all(kernels)
        self._ring.close_fd()        # every reader has it mapped

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._workers]

    def _check_alive(self, doing: str) -> None:
        for wid, p in enumerate(self._workers):
            if p.poll() is not None:
                what = [f"step {s} ({self.datasets[v[1]].source.name})"
                        for s, v in self._inflight.items() if v[3] == wid]
                code = p.returncode
                how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
                self.close()
                raise WorkerError(
                    f"reader process {wid} (pid {p.pid}) died ({how}) while {doing}"
                    + (f"; it was reading {', '.join(what)}" if what else "")
                    + ("; SIGKILL usually means the machine ran out of memory" if code == -9
                       else ""))

    def _reader_gone(self, wid: int, doing: str) -> None:
        """A reader's pipe broke: wait briefly for its exit status, then report it."""
        try:
            self._workers[wid].wait(2.0)
        except subprocess.TimeoutExpired:
            pass
        self._check_alive(doing)
        self.close()
        raise WorkerError(f"reader process {wid} (pid {self._workers[wid].pid}) closed its "
                          f"pipe while {doing}")

    def _submit(self) -> None:
        for slot, parts in list(self._leases.items()):    # leased CPU batches since freed
            if all(part() is None for part in parts):
                del self._leases[slot]
                self._free.append(slot)
        if not self._free and self._next_yield == self._next_submit:
            self.close()
            raise ConfigError(
                f"all {self.ring_slots} ring slots are held by batches that are still "
                "referenced; .clone() the tensors of batches you keep, or raise ring_slots")
        # at most ring_slots micro-batches ahead of the trainer: on CUDA a slot returns to the
        # ring once its copy is done, and without this cap the readers would keep filling it
        # and the device would hold every batch they assembled, without bound
        while self._free and self._next_submit - self._next_yield < self.ring_slots:
            wid = int(np.argmin(self._outstanding))
            if self._outstanding[wid] and self._outstanding[wid] >= self._tasks_per_reader:
                break                        # every reader's task pipe is as full as it may be
            slot = self._free.pop()
            d, windows = self.sampler.next()
            step = self._next_submit
            self._snapshots[step] = self.sampler.state_dict()
            self._outstanding[wid] += 1
            self._inflight[step] = (slot, d, windows, wid, time.monotonic())
            self._next_submit += 1
            try:
                # the window ids as raw int64 bytes: pickling a NumPy array costs the two
                # processes about 6 µs more per batch
                ids = windows.astype(np.int64, copy=False).tobytes()
                self._tasks[wid].send((step, slot, d, ids))
            except OSError:                  # its pipe is closed: the reader has died
                self._reader_gone(wid, f"being sent step {step}")

    def _poll(self, timeout: float) -> bool:
        """Take the messages the readers have sent; False if none came within `timeout`."""
        ready = wait(self._results, timeout=timeout)
        if not ready:
            self._check_alive(f"the trainer waited for step {self._next_yield}")
            _, d, _, wid, t0 = self._inflight[self._next_yield]
            if time.monotonic() - t0 > self.read_timeout_s:
                self.close()
                raise WorkerError(f"reader process {wid} has not finished step "
                                  f"{self._next_yield} ({self.datasets[d].source.name}) in "
                                  f"{self.read_timeout_s:.0f} s; is the file system stalled?")
            return False
        for conn in ready:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self._reader_gone(self._results.index(conn),
                                  f"the trainer waited for step {self._next_yield}")
            kind, wid, step = msg[0], msg[1], msg[2]
            if kind == "error":
                exc_name, text = msg[4], msg[5]
                cls = getattr(errors, exc_name, None)
                if not (isinstance(cls, type) and issubclass(cls, errors.DsfmError)):
                    cls = DataError
                exc = cls(f"{text} (reader process {wid}, step {step})")
                if step == self._next_yield:
                    self.close()
                    raise exc
                # a batch read ahead of the one due: its error comes when it is due, so that
                # the batches before it are handed out (it used to come with whichever next()
                # took the message: the batch a trainer stopped at depended on the readers'
                # timing), and the reader carries on with its other tasks meanwhile
                self._outstanding[wid] -= 1
                self._failed[step] = exc
                self._done.add(step)
                continue
            self._outstanding[wid] -= 1
            self.read_s[wid] += msg[4]
            self.windows_read[wid] += len(self._inflight[step][2])
            self._done.add(step)
            if self.cuda:
                self._launch_copy(step)
        return True

    # ---------------------------------------------------------------- device

    def _device_tensors(self, ds: _Dataset):
        cache = ds.device_cache
        if "ids" not in cache:
            cache["ids"] = torch.tensor(ds.field_ids, dtype=torch.long, device=self.device)
            cache["shift"] = None if ds.shift is None else torch.from_numpy(ds.shift).to(
                self.device)
            cache["physical_shift"] = cache["shift"] if ds.physical_shift is ds.shift else \
                torch.from_numpy(ds.physical_shift).to(self.device)
            cache["scale"] = None if ds.scale is None else torch.from_numpy(ds.scale).to(
                self.device)
            cache["codes"] = torch.from_numpy(ds.boundary_codes)
        return cache

    def _bcs(self, ds: _Dataset, windows: np.ndarray) -> torch.Tensor:
        files = ds.source.index.locate_many(windows)[0]
        return self._device_tensors(ds)["codes"][torch.from_numpy(files)]

    def _make_batch(self, step: int, flat: torch.Tensor) -> Batch:
        slot, d, windows, _, _ = self._inflight[step]
        ds = self.datasets[d]
        dev = self._device_tensors(ds)
        x, y = assemble(flat, ds.source, len(windows), self.n_steps_input, dev["shift"],
                        dev["scale"])
        host = self._bcs(ds, windows)
        # from pinned memory: a copy from pageable memory may make the driver wait for the
        # side stream (the slot's copy and the assembly queued before it) to stage it
        bcs = host.pin_memory().to(self.device, non_blocking=True) if self.cuda else host
        return Batch(x, y, dev["ids"], bcs, ds.source.name, step, windows, host)

    def _slot_tensor(self, step: int) -> torch.Tensor:
        slot, d, windows, _, _ = self._inflight[step]
        n = len(windows) * self.datasets[d].source.window_floats
        return torch.from_numpy(self._ring.slot(slot)[:n * FLOAT_BYTES].view(np.float32))

    def _launch_copy(self, step: int) -> None:
        """CUDA: copy the slot to the device and assemble the batch there, on the side stream."""
        began_s = time.perf_counter()
        host = self._slot_tensor(step)
        with torch.cuda.stream(self._stream):
            # the destination first, so that a timed copy's events bracket the copy alone and
            # not also the host's allocation between them
            flat = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            if self.time_copies:
                began = torch.cuda.Event(enable_timing=True)
                began.record(self._stream)
            flat.copy_(host, non_blocking=True)
            copied = torch.cuda.Event(enable_timing=self.time_copies)
            copied.record(self._stream)
            if self.time_copies:
                self.copies.append((host.numel() * FLOAT_BYTES, began, copied))
            batch = self._make_batch(step, flat)
            ready = torch.cuda.Event()
            ready.record(self._stream)
        self._copying.append((copied, self._inflight[step][0]))
        self._ready[step] = (batch, ready)
        self.launch_s += time.perf_counter() - began_s

    def _reclaim(self, block: bool) -> None:
        """Return slots whose host-to-device copy has finished."""
        still = []
        for event, slot in self._copying:
            if event.query():
                self._free.append(slot)
            else:
                still.append((event, slot))
        self._copying = still
        if block and not self._free and self._copying:
            event, slot = self._copying.pop(0)
            event.synchronize()
            self._free.append(slot)

    # ---------------------------------------------------------------- iteration

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if os.getpid() != self._owner:
            # a forked child's copy shares the parent's pipes: drawing from it sent tasks to the
            # parent's readers and took their answers, so the parent waited read_timeout_s for
            # batches it never got, and the child was told a reader had died (exit code 0)
            raise WorkerError(f"this loader was built in process {self._owner} and its readers "
                              f"serve that process alone; build a loader in this process "
                              f"({os.getpid()}, a forked child) instead")
        if self._closed:
            # an endless loader ends only by close(): a StopIteration here ended a for loop
            # over a closed loader silently, as if training were done
            why = self._stopped_by or "close() was called (or its with block ended)"
            raise WorkerError(f"this loader was closed when {why}; build a new one (its "
                              "state_dict() continues where this one stopped)")
        try:
            return self._next()
        except BaseException as exc:
            # an interrupt (Ctrl-C) can land anywhere, even within a message from a reader:
            # the loader cannot continue, and iterating on would hang, so it closes; so did
            # every error of its own already
            self._stopped_by = f"next() raised {type(exc).__name__} at step {self._next_yield}"
            self.close()
            raise

    def _next(self) -> Batch:
        entered = time.perf_counter()
        if self.cuda:
            self._check_deferred()
            # slots whose copy has finished; if every slot is still being copied and no read
            # is pending, wait for the oldest copy (without the finiteness check nothing else
            # would, and _submit would report the ring as held)
            self._reclaim(block=self._next_yield == self._next_submit)
        self._submit()
        step = self._next_yield
        start = time.perf_counter()
        while step not in self._done:
            self._poll(POLL_S)
        while self._poll(0):            # drain finished work so its copies start early
            pass
        failed = self._failed.pop(step, None)
        if failed is not None:
            raise failed                # (__next__ closes the loader)
        self.last_wait_s = time.perf_counter() - start
        self.wait_s += self.last_wait_s
        slot = self._inflight[step][0]
        if self.cuda:
            batch, ready = self._ready.pop(step)
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            for t in (batch.x, batch.y, batch.bcs):
                t.record_stream(compute)
            if self.check_finite:
                # computed and copied to the host on the compute stream, read at the next
                # next() after the event recorded here, which waits for the work issued before
                # this batch but not for its step: reading the device flag itself would
                # synchronize the whole compute stream, the step just issued included
                self._flag_host.copy_(all_finite(batch.x, batch.y), non_blocking=True)
                flagged = torch.cuda.Event()
                flagged.record(compute)
                self._pending_check = (flagged, step, self._inflight[step])
        elif self.readers_assemble:
            batch = self._lease(step, slot)
        else:                           # CPU device: the device path without the copy engine
            batch = self._make_batch(step, self._slot_tensor(step))
            if self.check_finite and not bool(all_finite(batch.x, batch.y)):
                self._explain_nonfinite(self._inflight[step])
            self._free.append(slot)
        self._done.discard(step)
        if not (self.cuda and self.check_finite):
            del self._inflight[step]
        self._state = self._snapshots.pop(step)
        self._next_yield += 1
        self.batches_out += 1
        self.next_s += time.perf_counter() - entered
        return batch

    def reset_trainer_costs(self) -> None:
        """Start `trainer_costs` afresh (after a warm-up, say)."""
        self.next_s = self.wait_s = self.launch_s = 0.0
        self.batches_out = 0

    def trainer_costs(self) -> dict[str, float]:
        """Milliseconds per batch handed out, of the training thread's time in `next()`: all
        of it; the part spent waiting for the readers (which includes issuing the copies of
        batches that arrive meanwhile); and (CUDA) the time spent issuing copies and device
        assembly, wherever it fell. What `next_ms` has beyond the wait is bookkeeping."""
        n = max(self.batches_out, 1)
        return {"next_ms": 1e3 * self.next_s / n, "wait_ms": 1e3 * self.wait_s / n,
                "launch_ms": 1e3 * self.launch_s / n}

    def _lease(self, step: int, slot: int) -> Batch:
        """CPU: the readers assembled the batch in its slot; hand it out without copying and
        return the slot to the ring when the batch's tensors are garbage-collected."""
        _, d, windows, _, _ = self._inflight[step]
        ds = self.datasets[d]
        x_np, y_np = assembled_views(self._ring.slot(slot), ds.source, len(windows),
                                     self.n_steps_input)
        self._leases[slot] = (weakref.ref(x_np), weakref.ref(y_np))
        dev = self._device_tensors(ds)
        bcs = self._bcs(ds, windows)
        return Batch(torch.from_numpy(x_np), torch.from_numpy(y_np), dev["ids"], bcs,
                     ds.source.name, step, windows, bcs)

    def check_last(self) -> None:
        """Raise NonFiniteError if the last batch handed out holds NaN/Inf. On a GPU its check
        is deferred to the next next() (reading the flag at once would synchronize the step);
        a finite use of the loader (evaluation) calls this after its last batch, which would
        otherwise go unchecked. On the CPU every batch was checked as it was handed out."""
        if self.cuda and not self._closed:
            self._check_deferred()

    def _check_deferred(self) -> None:
        """CUDA: look at the previous batch's finiteness flag, waiting (if at all) only for the
        flag, which the compute stream reached before that batch's step."""
        if self._pending_check is None:
            return
        flagged, step, info = self._pending_check
        self._pending_check = None
        self._inflight.pop(step, None)
        flagged.synchronize()
        if not bool(self._flag_host):
            self._explain_nonfinite(info)

    def _explain_nonfinite(self, info: tuple) -> None:
        """Find and name the first NaN/Inf of a batch by rereading its windows on the host."""
        _, d, windows, _, _ = info
        source = self.datasets[d].source
        flat = np.empty(len(windows) * source.window_floats, np.float32)
        pool = H5Pool(4)
        try:
            source.read_batch(pool, windows, flat)
        finally:
            pool.close()
        self.close()
        raise NonFiniteError(first_nonfinite(source, windows, flat))

    def affine(self, dataset: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(scale, shift) of `dataset`'s normalization on this loader's device, shaped to
        broadcast over fields [..., C, *space] (None where the normalization has none):
        physical = normalized · scale + shift (the loss and the metrics in physical units)."""
        ds = next((d for d in self.datasets if d.source.name == dataset), None)
        if ds is None:
            raise ConfigError(f"dataset {dataset!r} is not in this loader")
        cache = self._device_tensors(ds)
        if "affine" not in cache:
            view = (-1,) + (1,) * len(ds.source.spatial_shape)
            cache["affine"] = tuple(None if cache[k] is None else cache[k].view(view)
                                    for k in ("scale", "physical_shift"))
        return cache["affine"]

    def stand_in(self, dataset: str | None = None) -> Batch:
        """A micro-batch of zeros shaped like `dataset`'s (the first dataset's if None), on
        this loader's device, from the loader's metadata alone: what a rank whose loader
        failed (a NaN in a window, a damaged file, a dead reader) feeds its model so that it
        still joins the collectives its peers are in (ZeRO's reductions, ZeRO-3's gathers:
        every input calls the same modules), its output then thrown away. Its `step` is -1 and
        it holds no window. Works after the failure: it reads no file."""
        ds = self.datasets[0] if dataset is None else next(
            (d for d in self.datasets if d.source.name == dataset), None)
        if ds is None:
            raise ConfigError(f"dataset {dataset!r} is not in this loader")
        src, dev = ds.source, self._device_tensors(ds)
        b, spatial = self.batch_size, src.spatial_shape
        x = torch.zeros((b, self.n_steps_input, src.n_channels) + spatial, device=self.device)
        y = torch.zeros((b, src.n_steps - self.n_steps_input, src.n_channels) + spatial,
                        device=self.device)
        host = dev["codes"][:1].expand((b,) + tuple(dev["codes"].shape[1:])).clone()
        bcs = host.to(self.device) if self.cuda else host
        return Batch(x, y, dev["ids"], bcs, src.name, -1, np.empty(0, np.int64), host)

    def next_or_stand_in(self, failed: DataError | None, dataset: str | None = None
                         ) -> tuple[Batch, DataError | None]:
        """(the next batch, None) while this loader serves; once it has failed, now or at an
        earlier call (`failed`: the error that call returned), (a `stand_in` of `dataset`,
        the error): a caller that must stay in its peers' collectives draws with this."""
        if failed is None:
            try:
                return next(self), None
            except DataError as exc:
                failed = exc
        return self.stand_in(dataset), failed

    # ---------------------------------------------------------------- state and lifetime

    def state_dict(self) -> dict:
        """Sampler state after the last batch handed out: a resumed loader continues there."""
        return {"sampler": dict(self._state)}

    def load_state_dict(self, state: dict) -> None:
        if self._next_submit:
            raise ConfigError("load_state_dict must be called before the first batch is drawn")
        if not isinstance(state, dict) or "sampler" not in state:
            # the sampler's own state, given here, was a bare KeyError('sampler')
            if not isinstance(state, dict):
                given = type(state).__name__
            elif "cursors" in state:
                given = "the sampler's state"
            else:
                given = f"dict {sorted(state)}"
            raise ConfigError("WellLoader.load_state_dict takes what WellLoader.state_dict() "
                              f"returned ({{'sampler': ...}}), not {given}")
        self.sampler.load_state_dict(state["sampler"])
        self._state = self.sampler.state_dict()

    def copy_bandwidth(self, skip: int = 0) -> float:
        """GB/s of the timed host-to-device copies so far (set time_copies = True first),
        the first `skip` of them left out."""
        torch.cuda.synchronize(self.device)
        copies = self.copies[skip:]
        nbytes = sum(b for b, _, _ in copies)
        seconds = sum(s.elapsed_time(e) for _, s, e in copies) / 1e3
        return nbytes / seconds / 1e9 if seconds else float("nan")

    @property
    def ring_bytes(self) -> int:
        return self._ring.nbytes

    def close(self) -> None:
        """Stop the readers, release the ring. Safe to call more than once; in a forked child
        (its copy of the loader, or that copy's finalizer) it leaves the parent's readers be."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._owner:
            return
        try:
            for conn in getattr(self, "_tasks", []):
                try:
                    conn.send(None)
                except OSError:
                    pass
            deadline = time.monotonic() + CLOSE_GRACE_S
            for p in self._workers:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            # also when a second Ctrl-C lands in the grace above: that used to leave a reader
            # stuck in a read running, and the ring and pipes open, with close() done for good
            for p in self._workers:
                if p.poll() is None:
                    p.kill()
            for p in self._workers:
                try:
                    p.wait(5.0)
                except subprocess.TimeoutExpired:
                    pass            # in a read that ignores even SIGKILL: gone when it returns
            if self.cuda and getattr(self, "_stream", None) is not None:
                self._stream.synchronize()
            getattr(self, "_ready", {}).clear()
            self._ring.close()
            for conn in list(getattr(self, "_tasks", [])) + list(getattr(self, "_results", [])):
                conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if not getattr(self, "_closed", True):
            self.close()
