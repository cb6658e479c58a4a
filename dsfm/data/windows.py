"""Windows as the prefetcher's reader processes see them: which stored arrays make a window and
how to read each with one read straight into shared memory.

A `WindowSource` describes one dataset split (The Well or a PDEBench layout) as a list of
`Block`s, one per stored array (a Well field, PDEBench's `data`, `velocity`, ...). For a GPU
trainer a window of block k is read in its native layout [T, *stored spatial axes, *components]
into the slot, block after block (`read_batch`), and the layout change to [T, C, H, W],
broadcasting of axes a field does not vary along, and normalization happen on the device. For a
CPU trainer `read_assembled` reads each window straight into its place in [B, T, C, H, W] and
normalizes it there. Torch-free, so reader processes stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from dsfm.data.handles import H5Pool
from dsfm.data.index import WindowIndex, count_windows
from dsfm.data.native import MAX_BASES, MAX_PIECES, PIECE, PLANE, READ, NormalizeKernel
from dsfm.data.pdebench_format import FIELDS, PDEBenchFile, split_sets
from dsfm.data.well_format import FileLayout, channel_clash
from dsfm.errors import ConfigError, CorruptFileError


@dataclass(frozen=True)
class Block:
    """One stored array of a window.

    `path` is the HDF5 dataset path, with `{group}` replaced by the trajectory's group for
    PDEBench layouts that store one group per trajectory. `indexed` says whether the array has a
    leading trajectory axis. `shape` is the window's native shape, `bshape` the same data with a
    1 for every spatial axis it does not vary along and the components flattened last:
    [T, *spatial or 1, n_channels].

    `offset` (per channel, or None) is subtracted in float64 as the array is read, before its
    values become float32: for an array stored wider than float32 (float64) with the
    normalization's shift (say a pressure of 1e5 Pa varying by 0.01), whose values float32
    could not hold apart; the normalization then subtracts what is left of its shift (0).
    Such a block is read through HDF5 from every file, never with positioned reads.
    """

    path: str
    indexed: bool
    shape: tuple[int, ...]
    bshape: tuple[int, ...]
    offset: tuple[float, ...] | None = None

    @property
    def n_channels(self) -> int:
        return self.bshape[-1]

    @cached_property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def name_in(self, group: str) -> str:
        """The HDF5 path of this array for a trajectory stored in `group` ("" if none)."""
        return self.path.replace("{group}", group) if group else self.path

    def read(self, slab, lead: tuple, out: np.ndarray) -> None:
        """The window's selection of this array into `out` (float32, native shape), less
        `offset` in float64 first if there is one."""
        if self.offset is None:
            slab.read(lead, out)
            return
        wide = np.empty(out.shape, np.float64)
        slab.read(lead, wide)
        np.subtract(wide.reshape(-1, self.n_channels), np.array(self.offset, np.float64),
                    out=out.reshape(-1, self.n_channels), casting="unsafe")


@dataclass(frozen=True)
class _BatchPlan:
    """How `dsfm_read_windows` reads each window of a batch (`WindowSource._batch_plan`)."""

    pieces: np.ndarray      # PIECE: destinations, relative to a window's bases
    block_of: np.ndarray    # per read of a window: its block,
    time_of: np.ndarray     # the time steps from the window's first one to the read's,
    first: np.ndarray       # its first piece
    count: np.ndarray       # and how many
    planes: np.ndarray      # PLANE: the normalization after the reads (none for the device)
    plane_first: np.ndarray  # those of read r: planes[plane_first[r]:plane_first[r + 1]]
    indexed: np.ndarray     # per block: 1 if it has a trajectory axis


@dataclass
class WindowSource:
    """Everything a reader process needs to read windows of one dataset split."""

    name: str
    files: list[str]
    index: WindowIndex
    trajectories: list[list[int]]      # per file: stored index of each trajectory of the split
    groups: list[list[str]]            # per file: trajectory groups ({group} in Block.path)
    blocks: list[Block]
    n_steps: int                       # n_steps_input + n_steps_output
    stride: int
    spatial_shape: tuple[int, ...]
    channel_names: list[str]
    #: whose columns of the field vocabulary these channels take ("" : the dataset's own);
    #: PDEBench sources of one kind share theirs, as MPP's sources of one type do
    field_group: str = ""
    #: the dataset's time-invariant fields (The Well's constant fields, PDEBench's incompressible
    #: NS `force`): not read, and no input of the model, which takes time-varying fields only
    unused_fields: tuple[str, ...] = ()

    @property
    def vocabulary_name(self) -> str:
        return self.field_group or self.name

    def __getstate__(self):
        """Pickled without its caches (file descriptors, offsets, plans): they are this
        process's, and a reader process makes its own."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    # (cached: readers use them per batch; a source's blocks do not change)
    @cached_property
    def window_floats(self) -> int:
        return sum(b.size for b in self.blocks)

    @cached_property
    def n_channels(self) -> int:
        return sum(b.n_channels for b in self.blocks)

    @cached_property
    def read_offsets(self) -> np.ndarray:
        """Per channel, float64: what the reads subtract (`Block.offset`; 0 for most)."""
        return np.concatenate([np.zeros(0)] + [
            np.zeros(b.n_channels) if b.offset is None else np.array(b.offset, np.float64)
            for b in self.blocks])

    @cached_property
    def plane_floats(self) -> int:
        """Floats of one time step of one channel: the product of the spatial shape."""
        return int(np.prod(self.spatial_shape))

    @cached_property
    def assembled_floats(self) -> int:
        """Floats of one window once assembled: n_steps × C × spatial."""
        return self.n_steps * self.n_channels * self.plane_floats

    def __len__(self) -> int:
        return len(self.index)

    def locate(self, window: int) -> tuple[int, int, int]:
        """(file index, stored trajectory index, first time step) of a window."""
        fi, traj, t0 = self.index.locate(window)
        return fi, self.trajectories[fi][traj], t0

    def read_batch(self, pool: H5Pool, windows, flat: np.ndarray,
                   kernel: NormalizeKernel | None = None, batch_reads: bool = True) -> None:
        """Read `windows` into a flat float32 buffer, block after block (see `block_views`);
        with `kernel`, where the files allow positioned reads, all in one call of it
        (`batch_reads=False`: window by window even then, for comparisons)."""
        views = block_views(flat, self, len(windows))
        start = 0
        fits = flat.dtype == np.float32 and flat.flags.c_contiguous and \
            flat.flags.aligned and flat.flags.writeable    # else HDF5 converts, per window
        plan = None if kernel is None or not batch_reads or not fits else \
            self._batch_plan(None)
        reads = None if plan is None else self._batch_reads(pool, windows, plan)
        if reads is not None:
            starts = np.array([v.ctypes.data for v in views], np.uint64)
            steps = np.array([4 * blk.size for blk in self.blocks], np.int64)
            status = np.zeros(2, np.int32)
            start = kernel.read_windows(reads, len(plan.block_of), plan.pieces, starts, steps,
                                        len(windows), plan.planes, None, 0,
                                        np.zeros(0, np.float32), np.zeros(0, np.float32), False,
                                        status)
        for b in range(start, len(windows)):    # a failed read is read again here, to name it
            self.read(pool, int(windows[b]), [v[b] for v in views])

    def _where(self, window: int) -> tuple[str, int, int, tuple, str]:
        """(file, stored trajectory, first step, time selection, group) of a window."""
        fi, traj, t0 = self.locate(window)
        group = self.groups[fi][traj] if self.groups[fi] else ""
        return self.files[fi], traj, t0, (t0, self.n_steps, self.stride), group

    def _slabs(self, pool: H5Pool, path: str, traj: int, t0: int):
        """The file's name → Slab lookup, failures named with the window's place."""
        try:
            return pool.slabs(path)
        except (OSError, KeyError, TypeError, ValueError, CorruptFileError) as exc:
            raise self._failed(path, "", traj, t0, exc) from None

    def _slab(self, slabs, path: str, block: Block, traj: int, t0: int, group: str,
              time: tuple):
        name = block.name_in(group)
        lead = ((traj, 1, 1), time) if block.indexed else (time,)
        try:
            return slabs(name), lead
        except (OSError, KeyError, TypeError, ValueError, CorruptFileError) as exc:
            raise self._failed(path, name, traj, t0, exc) from None

    def _failed(self, path: str, name: str, traj: int, t0: int, exc: Exception) -> Exception:
        what = f"/{name} " if name else ""
        where = (f"reading {what}trajectory {traj} time index {t0} (steps "
                 f"{t0}..{t0 + (self.n_steps - 1) * self.stride} every {self.stride})")
        if isinstance(exc, CorruptFileError):
            return CorruptFileError(f"{exc} [while {where}]")
        return CorruptFileError(f"{path}: {where} failed: {str(exc).splitlines()[0]}")

    def read(self, pool: H5Pool, window: int, dest: list[np.ndarray]) -> None:
        """Read window `window` into `dest` (one float32 array per block, native shapes)."""
        path, traj, t0, time, group = self._where(window)
        slabs = self._slabs(pool, path, traj, t0)
        for block, out in zip(self.blocks, dest):
            slab, lead = self._slab(slabs, path, block, traj, t0, group, time)
            try:
                block.read(slab, lead, out)
            except (OSError, KeyError, TypeError, ValueError, CorruptFileError) as exc:
                raise self._failed(path, slab.dset.name.lstrip("/"), traj, t0, exc) from None

    def read_assembled(self, pool: H5Pool, windows, n_in: int, x: np.ndarray, y: np.ndarray,
                       shift: np.ndarray | None, scale: np.ndarray | None,
                       scratch: np.ndarray, check_finite: bool = True,
                       kernel: NormalizeKernel | None = None,
                       batch_reads: bool = True) -> int | None:
        """Read `windows` straight into x [B, T_in, C, *spatial] and y [B, T_out, C, *spatial],
        normalized (x − shift) / scale: the reader-side twin of the device assembler
        (`dsfm.data.prefetch.assemble`), with the same arithmetic. A scalar field that varies
        along every axis is one positioned read per window scattered over its T time-step
        slices of x and y (the layout change costs nothing); other blocks are read into
        `scratch` (`window_floats` floats). Each window is normalized right after it is read,
        while it is in cache: with `kernel` (`dsfm.data.native`) in one pass that also takes
        vector components apart and checks for NaN/Inf, else with NumPy. With `kernel`, where
        the files allow positioned reads, the whole batch is read and normalized in one call
        of it (`batch_reads=False`: window by window, for comparisons). Returns the index of
        the first window with a NaN/Inf after normalization (when `check_finite`), else None."""
        if scratch.dtype != np.float32 or scratch.size < self.window_floats:
            raise ValueError(f"scratch holds {scratch.size} {scratch.dtype} values, a window of "
                             f"{self.name} needs {self.window_floats} float32")
        if len(windows) > min(len(x), len(y)):
            raise ValueError(f"{len(windows)} windows for x {x.shape} and y {y.shape}")
        if kernel is not None and self.fusable and \
                all(v is None or (isinstance(v, np.ndarray) and v.dtype == np.float32 and
                                  v.size == self.n_channels) for v in (shift, scale)):
            # (other shift/scale, a broadcast scalar or float64, keep NumPy's own semantics)
            return self._read_fused(pool, windows, n_in, x, y, shift, scale, scratch,
                                    check_finite, kernel, batch_reads)
        spatial = self.spatial_shape
        view = (1, -1) + (1,) * len(spatial)
        shift_v = None if shift is None else shift.reshape(view)
        scale_v = None if scale is None else scale.reshape(view)
        staged = self._staged(scratch)
        for b, w in enumerate(windows):
            in_place = self._read_into_place(pool, int(w), x[b], y[b], staged)
            c = 0
            for block, native, done in zip(self.blocks, staged, in_place):
                c1 = c + block.n_channels
                if not done:
                    t = np.broadcast_to(np.moveaxis(native.reshape(block.bshape), -1, 1),
                                        (self.n_steps, c1 - c) + spatial)
                    x[b, :, c:c1] = t[:n_in]
                    y[b, :, c:c1] = t[n_in:]
                c = c1
            for part in (x[b], y[b]):
                if shift_v is not None:
                    np.subtract(part, shift_v, out=part)
                if scale_v is not None:
                    np.divide(part, scale_v, out=part)
            if check_finite and not (np.isfinite(x[b]).all() and np.isfinite(y[b]).all()):
                return b
        return None

    @property
    def fusable(self) -> bool:
        """Whether the fused kernel applies: every block varies along every spatial axis
        (a field constant along an axis is broadcast, which only the NumPy path does)."""
        return all(b.bshape[1:-1] == self.spatial_shape for b in self.blocks)

    def _staged(self, scratch: np.ndarray) -> list[np.ndarray]:
        """Each block's place in `scratch`, in its native layout, block after block."""
        views, at = [], 0
        for block in self.blocks:
            views.append(scratch[at:at + block.size].reshape(block.shape))
            at += block.size
        return views

    def _read_into_place(self, pool: H5Pool, window: int, xb: np.ndarray, yb: np.ndarray,
                         staged: list[np.ndarray]) -> list[bool]:
        """Read one window's blocks: a scalar field that varies along every axis, where the file
        allows positioned reads, straight into its time-step slices of xb [T_in, C, *spatial]
        and yb [T_out, C, *spatial] (one system call); every other block into its place in
        `staged`. Returns, per block, whether it went straight into place."""
        path, traj, t0, time, group = self._where(window)
        slabs = self._slabs(pool, path, traj, t0)
        c, in_place = 0, []
        for block, native in zip(self.blocks, staged):
            slab, lead = self._slab(slabs, path, block, traj, t0, group, time)
            scatter = slab.direct and block.n_channels == 1 and block.offset is None and \
                block.bshape[1:-1] == self.spatial_shape
            try:
                if scatter:
                    slab.read_scatter(lead, list(xb[:, c]) + list(yb[:, c]))
                else:
                    block.read(slab, lead, native)
            except (OSError, KeyError, TypeError, ValueError, CorruptFileError) as exc:
                raise self._failed(path, slab.dset.name.lstrip("/"), traj, t0, exc) from None
            in_place.append(scatter)
            c += block.n_channels
        return in_place

    def planes(self, n_in: int, scattered: tuple[bool, ...]) -> np.ndarray:
        """The fused kernel's work for one window (`dsfm.data.native.PLANE` rows): per time
        step and channel, the output plane in x (base 0) or y (base 1) and its input, the plane
        itself for a block read straight into place (`scattered`), else the block's native
        [T, *spatial, k] copy in scratch (base 2, every k-th float). Made once per pattern."""
        cache = self.__dict__.setdefault("_planes", {})
        key = (n_in, scattered)
        if key not in cache:
            per = self.plane_floats
            rows, c, staged = [], 0, 0
            for block, in_place in zip(self.blocks, scattered):
                k = block.n_channels
                for t in range(self.n_steps):
                    base, tt = (0, t) if t < n_in else (1, t - n_in)
                    for j in range(k):
                        dst = 4 * (tt * self.n_channels + c + j) * per
                        if in_place:
                            rows.append((dst, dst, base, base, 1, c + j))
                        else:
                            rows.append((dst, 4 * (staged + t * per * k + j), base, 2, k, c + j))
                staged += block.size
                c += k
            table = np.array(rows, PLANE)
            # nothing may be read or written outside x's or y's row of a window or scratch
            # (the kernel checks none of it: the per-window path hands it addresses)
            limits = np.array([4 * n_in * self.n_channels * per,
                               4 * (self.n_steps - n_in) * self.n_channels * per,
                               4 * self.window_floats], np.int64)
            if len(table) and (
                    (table["dst"] + 4 * per > limits[table["dst_base"]]).any() or
                    (table["src"] + 4 * (table["stride"].astype(np.int64) * (per - 1) + 1) >
                     limits[table["src_base"]]).any()):
                raise AssertionError(f"{self.name}: a normalization plan overruns a buffer")
            cache[key] = table
        return cache[key]

    def _read_fused(self, pool: H5Pool, windows, n_in: int, x: np.ndarray, y: np.ndarray,
                    shift: np.ndarray | None, scale: np.ndarray | None, scratch: np.ndarray,
                    check_finite: bool, kernel: NormalizeKernel,
                    batch_reads: bool = True) -> int | None:
        spatial = self.spatial_shape
        n_out = self.n_steps - n_in
        tail = (self.n_channels,) + spatial
        if x.shape[1:] != (n_in,) + tail or y.shape[1:] != (n_out,) + tail or \
                not all(a.flags.c_contiguous and a.flags.aligned and a.flags.writeable
                        for a in (x, y, scratch)) or not x.dtype == y.dtype == np.float32:
            raise ValueError(f"x {x.shape} and y {y.shape} must be aligned, writable, "
                             f"C-contiguous float32 [B, T, {', '.join(map(str, tail))}]")
        shift = np.zeros(self.n_channels, np.float32) if shift is None else \
            np.ascontiguousarray(shift, np.float32).reshape(-1)
        scale = np.ones(self.n_channels, np.float32) if scale is None else \
            np.ascontiguousarray(scale, np.float32).reshape(-1)
        bad, start = self._read_batched(pool, windows, n_in, x, y, shift, scale, scratch,
                                        check_finite, kernel) if batch_reads else (None, 0)
        if start == len(windows):
            return bad
        # per window from `start`: a block HDF5 must read, or a read that failed in the batch
        # (read again here, to fail with the window's file, array, trajectory and time)
        per = self.plane_floats
        bases = np.array([x.ctypes.data, y.ctypes.data, scratch.ctypes.data], np.uint64)
        bases_at, shift_at, scale_at = bases.ctypes.data, shift.ctypes.data, scale.ctypes.data
        x_at, y_at, x_step, y_step = x.ctypes.data, y.ctypes.data, x.strides[0], y.strides[0]
        staged = self._staged(scratch)
        pattern, planes = None, None
        for b in range(start, len(windows)):
            scattered = self._read_into_place(pool, int(windows[b]), x[b], y[b], staged)
            if scattered != pattern:        # files of one dataset rarely differ in layout
                pattern, planes = scattered, self.planes(n_in, tuple(scattered))
                planes_at, n_planes = planes.ctypes.data, len(planes)
            bases[0], bases[1] = x_at + b * x_step, y_at + b * y_step
            finite = kernel.run_raw(bases_at, planes_at, n_planes, per, shift_at, scale_at)
            if check_finite and not finite:
                return b
        return None

    def _read_batched(self, pool: H5Pool, windows, n_in: int, x: np.ndarray, y: np.ndarray,
                      shift: np.ndarray, scale: np.ndarray, scratch: np.ndarray,
                      check_finite: bool, kernel: NormalizeKernel) -> tuple[int | None, int]:
        """The fused path's whole batch in one kernel call (`dsfm_read_windows`) when every
        block of every window can be read with positioned reads: the file offsets are worked
        out for all windows at once, and each window is read and normalized in C. Returns
        (first window with NaN/Inf or None, windows done): fewer than all when some window must
        take the per-window path (0: all of them)."""
        plan = self._batch_plan(n_in)
        reads = None if plan is None else self._batch_reads(pool, windows, plan)
        if reads is None:
            return None, 0
        status = np.zeros(2, np.int32)
        starts = np.array([x.ctypes.data, y.ctypes.data, scratch.ctypes.data], np.uint64)
        steps = np.array([x.strides[0], y.strides[0], 0], np.int64)
        n = len(windows)
        done = kernel.read_windows(reads, len(plan.block_of), plan.pieces, starts, steps, n,
                                   plan.planes, plan.plane_first, self.plane_floats, shift,
                                   scale, check_finite, status)
        if done == n:
            return None, n
        return (done, n) if status[0] == 1 else (None, done)

    def _batch_plan(self, n_in: int | None) -> "_BatchPlan | None":
        """How the kernel reads one window (made once per n_in). For a CPU trainer (n_in
        given): a scalar field straight into its time-step slices of the window's rows of x and
        y (bases 0 and 1), other blocks into their place in the staging buffer (base 2), and
        the planes that normalize it. For a GPU trainer (None): block k into base k, in its
        native layout. None when the kernel's reads cannot do it (more steps than one read may
        scatter, more blocks than bases, or a field the reader must broadcast)."""
        cache = self.__dict__.setdefault("_batch_plans", {})
        if n_in in cache:
            return cache[n_in]
        scatters = n_in is not None and self.stride == 1 and \
            any(b.n_channels == 1 for b in self.blocks)      # n_steps pieces in one read
        if (scatters and self.n_steps > MAX_PIECES) or \
                (n_in is None and len(self.blocks) > MAX_BASES) or \
                (n_in is not None and not self.fusable):
            cache[n_in] = None
            return None
        per = self.plane_floats
        if n_in is None:
            limits = {k: 4 * block.size for k, block in enumerate(self.blocks)}
        else:
            limits = {0: 4 * n_in * self.n_channels * per,
                      1: 4 * (self.n_steps - n_in) * self.n_channels * per,
                      2: 4 * self.window_floats}
        pieces, reads, c, staged = [], [], 0, 0
        plane_first = [0]       # the planes of read r: the block and steps it read (CPU trainer)
        for k, block in enumerate(self.blocks):
            step_bytes = 4 * (block.size // self.n_steps)
            runs = [(0, self.n_steps)] if self.stride == 1 else \
                [(t, 1) for t in range(self.n_steps)]
            for t_first, count in runs:
                plane_first.append(plane_first[-1] + (0 if n_in is None else
                                                      count * block.n_channels))
                first = len(pieces)
                if n_in is None:                    # native layout, block after block
                    pieces.append((t_first * step_bytes, count * step_bytes, k, 0))
                elif block.n_channels == 1:         # straight into place, step by step
                    for t in range(t_first, t_first + count):
                        base, tt = (0, t) if t < n_in else (1, t - n_in)
                        pieces.append((4 * (tt * self.n_channels + c) * per, 4 * per, base, 0))
                else:
                    pieces.append((4 * staged + t_first * step_bytes, count * step_bytes, 2, 0))
                reads.append((k, t_first * self.stride, first, len(pieces) - first))
            staged += block.size
            c += block.n_channels
        table = np.array(pieces, PIECE)
        for base, limit in limits.items():          # nothing may land outside its buffer
            mine = table[table["base"] == base]
            if len(mine) and int((mine["offset"] + mine["bytes"]).max()) > limit:
                raise AssertionError(f"{self.name}: a read plan overruns buffer {base}")
        block_of, time_of, first, count = (np.array(col, np.int64) for col in zip(*reads))
        planes = np.zeros(0, PLANE) if n_in is None else \
            self.planes(n_in, tuple(b.n_channels == 1 for b in self.blocks))
        if plane_first[-1] != len(planes):
            raise AssertionError(f"{self.name}: {plane_first[-1]} planes read, {len(planes)} made")
        lo = np.cumsum([0] + [b.n_channels for b in self.blocks])
        for r, k in enumerate(block_of):        # each read's planes are of the block it read
            ch = planes["channel"][plane_first[r]:plane_first[r + 1]]
            if len(ch) and not (lo[k] <= ch.min() and ch.max() < lo[k + 1]):
                raise AssertionError(f"{self.name}: read {r} of block {k} normalizes channels "
                                     f"{ch.min()}..{ch.max()}")
        cache[n_in] = _BatchPlan(table, block_of, time_of, first.astype(np.int32),
                                 count.astype(np.int32), planes,
                                 np.array(plane_first, np.int64),
                                 np.array([b.indexed for b in self.blocks], np.int64))
        return cache[n_in]

    def _batch_reads(self, pool: H5Pool, windows, plan: "_BatchPlan") -> np.ndarray | None:
        """The READ table of `windows` (`plan.block_of` reads per window): file descriptors
        and offsets for all windows at once. None when some window must take the per-window
        path: a block not readable with positioned reads, a file that cannot be opened or that
        changed since it was indexed (that path says what is wrong), or more files than the
        pool keeps open."""
        n = len(windows)
        if n == 0:
            return None
        fi, traj, t0 = self.index.locate_many(windows)
        stored = self._stored_trajectories(fi, traj)
        keys = list(zip(fi.tolist(), np.where(self._grouped_files()[fi], stored, -1).tolist()))
        if len(set(fi.tolist())) > pool.max_open:
            return None                 # opening them all would close some before the reads
        tables = {k: self._direct_rows(pool, *k) for k in dict.fromkeys(keys)}
        if any(t is None for t in tables.values()):
            return None
        rows = np.stack([tables[k] for k in keys])           # [B, blocks, 6]
        t_idx = stored[:, None] * plan.indexed               # along arrays with that axis
        last = t0 + (self.n_steps - 1) * self.stride
        if not ((t_idx < rows[..., 4]).all() and (last[:, None] < rows[..., 5]).all()):
            return None
        start = rows[..., 1] + t_idx * rows[..., 2] + t0[:, None] * rows[..., 3]
        reads = np.zeros((n, len(plan.block_of)), READ)
        reads["file_offset"] = start[:, plan.block_of] + \
            plan.time_of * rows[:, plan.block_of, 3]
        reads["fd"] = rows[:, plan.block_of, 0]
        reads["first"], reads["n"] = plan.first, plan.count
        return reads

    def _stored_trajectories(self, fi: np.ndarray, traj: np.ndarray) -> np.ndarray:
        """`trajectories[fi][traj]` for arrays of windows."""
        table = self.__dict__.get("_traj_table")
        if table is None:
            counts = [len(t) for t in self.trajectories]
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            flat = np.array([i for t in self.trajectories for i in t], np.int64)
            table = self.__dict__["_traj_table"] = (starts, flat)
        starts, flat = table
        return flat[starts[fi] + traj]

    def _grouped_files(self) -> np.ndarray:
        """Per file, whether its arrays live in a group per trajectory (`{group}` paths)."""
        grouped = self.__dict__.get("_grouped")
        if grouped is None:
            grouped = self.__dict__["_grouped"] = np.array(
                [bool(g) and any("{group}" in b.path for b in self.blocks)
                 for g in self.groups], bool)
        return grouped

    def _direct_rows(self, pool: H5Pool, fi: int, traj: int) -> np.ndarray | None:
        """Where the blocks of file `fi` lie for positioned reads (of trajectory `traj`'s group,
        for a layout with a group per trajectory; -1 otherwise), per block as int64: (file
        descriptor, byte offset of the array, bytes per trajectory, bytes per time step,
        trajectories, time steps). None when some block cannot be read that way or the file
        cannot be opened (the per-window path then reads it, or says what failed). Kept per
        open of the file (`H5Pool.touch`): a file closed and opened again gets new rows."""
        path = self.files[fi]
        try:
            serial = pool.touch(path)
        except (OSError, KeyError, TypeError, ValueError, CorruptFileError):
            return None
        group = self.groups[fi][traj] if traj >= 0 else ""
        cache = self.__dict__.setdefault("_direct", {})
        hit = cache.get((fi, group))
        if hit is not None and hit[0] == serial:
            return hit[1]
        lookup = pool.slabs(path)
        rows: list[tuple[int, ...]] | None = []
        for block in self.blocks:
            try:
                slab = lookup(block.name_in(group))
            except (OSError, KeyError, TypeError, ValueError, CorruptFileError):
                rows = None
                break
            lead = 2 if block.indexed else 1
            dims, steps = slab.dims, slab.axis_bytes
            if not slab.direct or block.offset is not None or len(dims) < lead or \
                    steps[lead - 1] != 4 * (block.size // self.n_steps):
                rows = None
                break
            rows.append((slab.fd, slab.offset, steps[0], steps[1], dims[0], dims[1])
                        if block.indexed else (slab.fd, slab.offset, 0, steps[0], 1, dims[0]))
        table = None if rows is None else np.array(rows, np.int64)
        cache[(fi, group)] = (serial, table)
        return table


def offset_wide_blocks(blocks: list[Block], wide: list[bool], shift: np.ndarray) -> list[Block]:
    """`blocks` with their channels of the normalization's `shift` as `offset` where the array is
    stored wider than float32 in some file (`wide`, per block) and the shift is not zero there:
    the reads subtract it in float64, before the values become float32 (`Block.offset`)."""
    bounds = np.cumsum([0] + [b.n_channels for b in blocks])
    return [replace(b, offset=tuple(map(float, shift[bounds[k]:bounds[k + 1]])))
            if w and shift[bounds[k]:bounds[k + 1]].any() else b
            for k, (b, w) in enumerate(zip(blocks, wide))]


def well_source(layouts: list[FileLayout], n_in: int, n_out: int,
                stride: int = 1) -> WindowSource:
    """The time-varying fields of a Well dataset split (its files' layouts), one block each. A
    field stored without a trajectory axis (`sample_varying` false: one forcing shared by every
    trajectory) is read from its time axis alone for every trajectory; it must be stored so in
    every file of the split, as the blocks are the same for all of them."""
    first = layouts[0]
    n = n_in + n_out
    if not first.variable_fields:
        raise ConfigError(f"{first.path}: no time-varying field (every field of /t0_fields, "
                          "/t1_fields and /t2_fields has time_varying false): x and y would "
                          "have no channels; leave this dataset out of the loader")
    windows = count_windows([(lay.path, lay.n_steps) for lay in layouts], n_in, n_out, stride)
    for lay in layouts[1:]:
        for fl, fl0 in zip(lay.variable_fields, first.variable_fields):
            if fl.sample_varying != fl0.sample_varying:
                raise ConfigError(
                    f"{lay.path}: /{fl.path} has sample_varying={fl.sample_varying}, but "
                    f"{fl0.sample_varying} in {first.path}; the loader reads a field alike from "
                    "every file of a dataset: store it with (or without) its trajectory axis "
                    "in all of them")
    clash = channel_clash(first)
    if clash:
        raise ConfigError(clash)
    blocks = []
    for fl in first.variable_fields:
        spatial = tuple(s for s, used in zip(first.spatial_shape, fl.dim_varying) if used)
        shape = (n,) + spatial + (first.n_spatial_dims,) * fl.order
        bshape = (n,) + tuple(s if used else 1 for s, used in
                              zip(first.spatial_shape, fl.dim_varying)) + (fl.n_channels,)
        blocks.append(Block(fl.path, fl.sample_varying, shape, bshape))
    return WindowSource(
        name=first.dataset_name, files=[lay.path for lay in layouts],
        index=WindowIndex([lay.n_trajectories for lay in layouts], windows),
        trajectories=[list(range(lay.n_trajectories)) for lay in layouts],
        groups=[[] for _ in layouts], blocks=blocks, n_steps=n, stride=stride,
        spatial_shape=first.spatial_shape,
        channel_names=[c for fl in first.variable_fields for c in fl.channel_names],
        unused_fields=tuple(fl.name for fl in first.constant_fields))


def pdebench_source(name: str, files: list[PDEBenchFile], split: str, n_in: int, n_out: int,
                    stride: int = 1, fractions=(0.8, 0.1, 0.1), field_group: str = "",
                    trajectories: list[list[int]] | None = None) -> WindowSource:
    """A PDEBench layout as blocks: `data`, or `velocity` + `particles`, or one per variable.
    `trajectories`: per file, those of the split (default: `split_sets`)."""
    first = files[0]
    n = n_in + n_out
    h, w = first.spatial_shape
    kind = first.kind
    if trajectories is None:
        trajectories = split_sets(files, split, fractions)
    windows = count_windows([(pf.path, pf.n_steps) for pf in files], n_in, n_out, stride)
    if kind in ("swe", "diff_react"):
        c = len(FIELDS[kind])
        blocks = [Block("{group}/data", False, (n, h, w, c), (n, h, w, c))]
    elif kind == "incomp_ns":
        blocks = [Block("velocity", True, (n, h, w, 2), (n, h, w, 2)),
                  Block("particles", True, (n, h, w, 1), (n, h, w, 1))]
    else:
        blocks = [Block(v, True, (n, h, w), (n, h, w, 1)) for v in FIELDS[kind]]
    return WindowSource(
        name=name, files=[pf.path for pf in files],
        index=WindowIndex([len(t) for t in trajectories], windows), trajectories=trajectories,
        groups=[pf.groups for pf in files], blocks=blocks, n_steps=n, stride=stride,
        spatial_shape=(h, w), channel_names=list(FIELDS[kind]), field_group=field_group,
        unused_fields=("force",) if kind == "incomp_ns" and first.force else ())


def assembly_plan(source: WindowSource, batch: int) -> list[tuple[int, int, tuple, int, int]]:
    """Per block: (offset, length, [batch, *bshape], first channel, last channel) in a flat
    buffer holding `batch` windows block after block. The one description of the native slot
    layout, shared by the readers and the torch assembler (the device)."""
    plan, offset, c = [], 0, 0
    for blk in source.blocks:
        k = batch * blk.size
        plan.append((offset, k, (batch,) + blk.bshape, c, c + blk.n_channels))
        offset += k
        c += blk.n_channels
    return plan


def block_views(flat: np.ndarray, source: WindowSource, batch: int) -> list[np.ndarray]:
    """Per block, a [batch, *native shape] view of a flat float32 buffer (blocks in order)."""
    return [flat[offset:offset + k].reshape((batch,) + blk.shape)
            for blk, (offset, k, _, _, _) in zip(source.blocks, assembly_plan(source, batch))]


def first_nonfinite(source: WindowSource, windows, flat: np.ndarray) -> str:
    """Name the first NaN/Inf in native blocks of `windows` (file, array, trajectory, time);
    if the stored data are finite, the normalization made it."""
    plan = assembly_plan(source, len(windows))
    largest = (-1.0, "")

    def where(w, blk, values, flat_index) -> tuple[str, str]:
        fi, traj, t0 = source.locate(int(w))
        t = t0 + int(np.unravel_index(flat_index, values.shape)[0]) * source.stride
        group = source.groups[fi][traj] if source.groups[fi] else ""
        # an array without a trajectory axis or group (a Well field every trajectory shares)
        shared = not blk.indexed and "{group}" not in blk.path
        return (f"{source.files[fi]}: /{blk.name_in(group)}",
                f"{'all trajectories' if shared else f'trajectory {traj}'}, time index {t}")

    for b, w in enumerate(windows):
        for blk, (offset, k, shape, _, _) in zip(source.blocks, plan):
            per = k // len(windows)
            values = flat[offset + b * per:offset + (b + 1) * per].reshape(shape[1:])
            bad = ~np.isfinite(values)
            if bad.any():
                array, at = where(w, blk, values, int(np.flatnonzero(bad)[0]))
                return f"{array} has NaN/Inf at {at}"
            if values.size:
                i = int(np.abs(values).argmax())
                if abs(float(values.flat[i])) > largest[0]:
                    array, at = where(w, blk, values, i)
                    largest = (abs(float(values.flat[i])), f"{array} at {at}")
    # finite when stored: normalizing overflowed (a huge stored value) or divided by a zero
    # scale; the largest stored value says where to look first
    return (f"{source.name}: normalization produced NaN/Inf from finite stored values; the "
            f"largest, {largest[0]:.3g}, is in {largest[1]} (a damaged value, or a zero or "
            "tiny scale in its stats.yaml)")
