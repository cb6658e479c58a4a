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

from dataclasses import dataclass

import numpy as np

from dsfm.data.handles import H5Pool
from dsfm.data.index import WindowIndex, count_windows
from dsfm.data.native import PLANE, NormalizeKernel
from dsfm.data.pdebench_format import FIELDS, PDEBenchFile, split_trajectories
from dsfm.data.well_format import FileLayout
from dsfm.errors import ConfigError, CorruptFileError


@dataclass(frozen=True)
class Block:
    """One stored array of a window.

    `path` is the HDF5 dataset path, with `{group}` replaced by the trajectory's group for
    PDEBench layouts that store one group per trajectory. `indexed` says whether the array has a
    leading trajectory axis. `shape` is the window's native shape, `bshape` the same data with a
    1 for every spatial axis it does not vary along and the components flattened last:
    [T, *spatial or 1, n_channels].
    """

    path: str
    indexed: bool
    shape: tuple[int, ...]
    bshape: tuple[int, ...]

    @property
    def n_channels(self) -> int:
        return self.bshape[-1]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


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

    @property
    def window_floats(self) -> int:
        return sum(b.size for b in self.blocks)

    @property
    def n_channels(self) -> int:
        return sum(b.n_channels for b in self.blocks)

    @property
    def assembled_floats(self) -> int:
        """Floats of one window once assembled: n_steps × C × spatial."""
        return self.n_steps * self.n_channels * int(np.prod(self.spatial_shape))

    def __len__(self) -> int:
        return len(self.index)

    def locate(self, window: int) -> tuple[int, int, int]:
        """(file index, stored trajectory index, first time step) of a window."""
        fi, traj, t0 = self.index.locate(window)
        return fi, self.trajectories[fi][traj], t0

    def read_batch(self, pool: H5Pool, windows, flat: np.ndarray) -> None:
        """Read `windows` into a flat float32 buffer, block after block (see `block_views`)."""
        views = block_views(flat, self, len(windows))
        for b, w in enumerate(windows):
            self.read(pool, int(w), [v[b] for v in views])

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
        name = block.path.replace("{group}", group) if group else block.path
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
                slab.read(lead, out)
            except (OSError, KeyError, TypeError, ValueError, CorruptFileError) as exc:
                raise self._failed(path, slab.dset.name.lstrip("/"), traj, t0, exc) from None

    def read_assembled(self, pool: H5Pool, windows, n_in: int, x: np.ndarray, y: np.ndarray,
                       shift: np.ndarray | None, scale: np.ndarray | None,
                       scratch: np.ndarray, check_finite: bool = True,
                       kernel: NormalizeKernel | None = None) -> int | None:
        """Read `windows` straight into x [B, T_in, C, *spatial] and y [B, T_out, C, *spatial],
        normalized (x − shift) / scale: the reader-side twin of the device assembler
        (`dsfm.data.prefetch.assemble`), with the same arithmetic. A scalar field that varies
        along every axis is one positioned read per window scattered over its T time-step
        slices of x and y (the layout change costs nothing); other blocks are read into
        `scratch` (`window_floats` floats). Each window is normalized right after it is read,
        while it is in cache: with `kernel` (`dsfm.data.native`) in one pass that also takes
        vector components apart and checks for NaN/Inf, else with NumPy. Returns the index of
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
                                    check_finite, kernel)
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
            scatter = slab.direct and block.n_channels == 1 and \
                block.bshape[1:-1] == self.spatial_shape
            try:
                if scatter:
                    slab.read_scatter(lead, list(xb[:, c]) + list(yb[:, c]))
                else:
                    slab.read(lead, native)
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
            per = int(np.prod(self.spatial_shape))
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
            cache[key] = np.array(rows, PLANE)
        return cache[key]

    def _read_fused(self, pool: H5Pool, windows, n_in: int, x: np.ndarray, y: np.ndarray,
                    shift: np.ndarray | None, scale: np.ndarray | None, scratch: np.ndarray,
                    check_finite: bool, kernel: NormalizeKernel) -> int | None:
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
        per = int(np.prod(spatial))
        bases = np.array([x.ctypes.data, y.ctypes.data, scratch.ctypes.data], np.uint64)
        bases_at, shift_at, scale_at = bases.ctypes.data, shift.ctypes.data, scale.ctypes.data
        x_at, y_at, x_step, y_step = x.ctypes.data, y.ctypes.data, x.strides[0], y.strides[0]
        staged = self._staged(scratch)
        pattern, planes = None, None
        for b, w in enumerate(windows):
            scattered = self._read_into_place(pool, int(w), x[b], y[b], staged)
            if scattered != pattern:        # files of one dataset rarely differ in layout
                pattern, planes = scattered, self.planes(n_in, tuple(scattered))
                planes_at, n_planes = planes.ctypes.data, len(planes)
            bases[0], bases[1] = x_at + b * x_step, y_at + b * y_step
            finite = kernel.run_raw(bases_at, planes_at, n_planes, per, shift_at, scale_at)
            if check_finite and not finite:
                return b
        return None


def well_source(layouts: list[FileLayout], n_in: int, n_out: int,
                stride: int = 1) -> WindowSource:
    """The time-varying fields of a Well dataset split (its files' layouts), one block each."""
    first = layouts[0]
    n = n_in + n_out
    windows = count_windows([(lay.path, lay.n_steps) for lay in layouts], n_in, n_out, stride)
    for lay in layouts:
        for fl in lay.variable_fields:
            if not fl.sample_varying:
                raise ConfigError(f"{lay.path}: /{fl.path} is time-varying but not "
                                  "sample-varying; the loader needs one value per trajectory")
    blocks = []
    for fl in first.variable_fields:
        spatial = tuple(s for s, used in zip(first.spatial_shape, fl.dim_varying) if used)
        shape = (n,) + spatial + (first.n_spatial_dims,) * fl.order
        bshape = (n,) + tuple(s if used else 1 for s, used in
                              zip(first.spatial_shape, fl.dim_varying)) + (fl.n_channels,)
        blocks.append(Block(fl.path, True, shape, bshape))
    return WindowSource(
        name=first.dataset_name, files=[lay.path for lay in layouts],
        index=WindowIndex([lay.n_trajectories for lay in layouts], windows),
        trajectories=[list(range(lay.n_trajectories)) for lay in layouts],
        groups=[[] for _ in layouts], blocks=blocks, n_steps=n, stride=stride,
        spatial_shape=first.spatial_shape,
        channel_names=[c for fl in first.variable_fields for c in fl.channel_names])


def pdebench_source(name: str, files: list[PDEBenchFile], split: str, n_in: int, n_out: int,
                    stride: int = 1, fractions=(0.8, 0.1, 0.1)) -> WindowSource:
    """A PDEBench layout as blocks: `data`, or `velocity` + `particles`, or one per variable."""
    first = files[0]
    n = n_in + n_out
    h, w = first.spatial_shape
    kind = first.kind
    trajectories = [list(split_trajectories(pf.n_trajectories, split, fractions)) for pf in files]
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
        spatial_shape=(h, w), channel_names=list(FIELDS[kind]))


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
    for b, w in enumerate(windows):
        for blk, (offset, k, shape, _, _) in zip(source.blocks, plan):
            per = k // len(windows)
            bad = ~np.isfinite(flat[offset + b * per:offset + (b + 1) * per].reshape(shape[1:]))
            if bad.any():
                fi, traj, t0 = source.locate(int(w))
                t = t0 + int(np.argwhere(bad)[0][0]) * source.stride
                group = source.groups[fi][traj] if source.groups[fi] else ""
                return (f"{source.files[fi]}: /{blk.path.replace('{group}', group)} has NaN/Inf "
                        f"at trajectory {traj}, time index {t}")
    return f"{source.name}: normalization produced NaN/Inf (check its stats.yaml)"
