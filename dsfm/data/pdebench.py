"""PDEBench's 2D HDF5 layouts, as Multiple Physics Pretraining used them, behind WellDataset's
sample interface.

Layouts (detected from the file, or named with `kind`):

    swe         2D_rdb_*.h5          one group per trajectory: data [T,H,W,1] (h), grid/{x,y,t}
    diff_react  2D_diff-react_*.h5   one group per trajectory: data [T,H,W,2] (activator,
                                     inhibitor), grid/{x,y,t}
    incomp_ns   ns_incom_*.h5        velocity [N,T,H,W,2], particles [N,T,H,W,1], force [N,H,W,2],
                                     t [N,T]
    comp_ns     2D_CFD_*.hdf5        Vx, Vy, density, pressure [N,T,H,W], t-coordinate [T+1],
                                     x-coordinate [H], y-coordinate [W]

Boundaries: shallow water uses transmissive (open) boundaries, diffusion–reaction no-flux
(wall), incompressible NS no-slip (wall); compressible NS is periodic unless its file name says
`outgoing`/`trans` (open). A file name with the word `periodic` marks any layout periodic
(words of the name split at `_`, `-` and `.`: `nonperiodic` is not it).
Trajectories are split into train/valid/test by the fractions `train_val_test`, within each
file (as MPP splits by sample) or, for incompressible NS (4 trajectories a file), over all the
files of the source in order (as MPP splits it by file), so the three splits never share one.

A source is named after its kind and its file or directory (`pdebench_comp_ns-2D_Train_Rand`),
so that several of one kind (MPP's CFD at 128² and 512², random and turbulent) can be mixed,
while their fields share the kind's columns of the field vocabulary, as MPP's sources of one
type share their embedding. Normalization statistics: `stats.yaml` in a directory source,
`<file stem>.stats.yaml` beside a file source (`write_pdebench_stats` writes either).
"""

from __future__ import annotations

import os

import h5py
import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from dsfm.data.handles import H5Pool
from dsfm.data.index import SPLITS, list_hdf5
from dsfm.data.normalization import resolve_normalization
from dsfm.data.pdebench_format import (
    BOUNDARY,
    DATASET_NAMES,
    FIELDS,
    PDEBenchFile,
    detect_kind,
    force_mismatch,
    inspect_pdebench,
    split_trajectories,
    stats_file,
    write_pdebench,
)
from dsfm.data.stats import RunningMoments, load_stats
from dsfm.data.well_format import BoundaryCondition, FieldLayout
from dsfm.data.windows import (
    WindowSource,
    assembly_plan,
    first_nonfinite,
    offset_wide_blocks,
    pdebench_source,
)
from dsfm.errors import ConfigError, EmptySplitError, NonFiniteError, SchemaError

__all__ = ["BOUNDARY", "DATASET_NAMES", "FIELDS", "PDEBenchDataset", "PDEBenchFile",
           "detect_kind", "inspect_pdebench", "source_name", "split_trajectories", "stats_file",
           "write_pdebench", "write_pdebench_stats"]


class PDEBenchDataset(Dataset):
    """Windows of PDEBench trajectories with WellDataset's keys and layout.

    `path` is a PDEBench file or a directory of files of one layout; items are dicts with
    `input_fields` [T_in, H, W, C], `output_fields` [T_out, H, W, C], `boundary_conditions`
    [2, 2], optionally `constant_fields` (incompressible NS forcing), `space_grid` and time grids.
    """

    def __init__(self, path: str, split: str = "train", n_steps_input: int = 1,
                 n_steps_output: int = 1, dt_stride: int = 1,
                 train_val_test: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 kind: str | None = None, boundary: str | None = None, return_grid: bool = True,
                 use_normalization: bool = False, normalization_type=None,
                 normalization_path: str | None = None, check_finite: bool = True,
                 max_open_files: int = 64):
        if split not in SPLITS:
            raise ConfigError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        if boundary is not None and boundary.upper() not in BoundaryCondition.__members__:
            raise ConfigError(f"boundary {boundary!r} is not one of PERIODIC, WALL, OPEN")
        if n_steps_input < 1 or n_steps_output < 0 or dt_stride < 1:
            raise ConfigError("need n_steps_input >= 1, n_steps_output >= 0, dt_stride >= 1")
        files = [path] if os.path.isfile(path) else list_hdf5(path)
        if not files:
            raise EmptySplitError(f"{path}: no PDEBench .h5/.hdf5 files")
        self.files = [inspect_pdebench(p, kind, boundary) for p in files]
        first = self.files[0]
        for pf in self.files[1:]:
            if (pf.kind, pf.spatial_shape) != (first.kind, first.spatial_shape):
                raise SchemaError(f"{pf.path}: {pf.kind} at {pf.spatial_shape} differs from "
                                  f"{first.kind} at {first.spatial_shape} in {first.path}; a "
                                  "source is files of one layout and grid: give each file as a "
                                  "source of its own (in a run config, a wildcard per grid in "
                                  "data.pdebench)")
            if line := force_mismatch(first, pf):
                raise SchemaError(line)
        self.kind = first.kind
        self.dataset_name = source_name(path, self.kind)
        self.field_names = {0: list(FIELDS[self.kind]), 1: [], 2: []}
        self.n_steps_input, self.n_steps_output = n_steps_input, n_steps_output
        self.dt_stride = dt_stride
        self.return_grid = return_grid
        self.check_finite = check_finite
        self.split = split
        self.source = pdebench_source(self.dataset_name, self.files, split, n_steps_input,
                                      n_steps_output, dt_stride, train_val_test,
                                      field_group=DATASET_NAMES[self.kind])
        self.trajectories = self.source.trajectories
        self.len = len(self.source)
        if not sum(len(t) for t in self.trajectories):
            n = sum(pf.n_trajectories for pf in self.files)
            raise EmptySplitError(
                f"{path}: the {split} split holds no trajectory: {n} trajectories split "
                f"{'/'.join(f'{f:g}' for f in train_val_test)} (train and valid take the "
                "fraction rounded up, test the rest); give train_val_test another split")
        self.norm = None
        self.shift = self.scale = None       # per channel: y = (x - shift) / scale
        self._read_shift = None              # what is left of `shift` after the reads' offsets
        if use_normalization and normalization_type:
            stats_path = normalization_path or stats_file(path)
            cls = resolve_normalization(normalization_type)
            stats = load_stats(stats_path, f"dsfm.data.pdebench.write_pdebench_stats({path!r})")
            self.norm = cls(stats, list(FIELDS[self.kind]), [])
            layouts = [FieldLayout(n, 0, True, True, (True, True), (), (n,))
                       for n in FIELDS[self.kind]]
            self.shift, self.scale = self.norm.channel_vectors(layouts)
            # an array stored as float64 in some file (a pressure of 1e5 varying by 0.01):
            # its shift is subtracted in float64 as it is read, as for The Well
            wide = [any(b.path.rsplit("/", 1)[-1] in pf.wide for pf in self.files)
                    for b in self.source.blocks]
            self.source.blocks = offset_wide_blocks(self.source.blocks, wide, self.shift)
            self._read_shift = (self.shift - self.source.read_offsets).astype(np.float32)
        self._pool = H5Pool(max_open_files)
        self._grid_cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.len

    def locate(self, index: int) -> tuple[int, int, int]:
        """(file index, trajectory index in the file, first time step) of window `index`."""
        return self.source.locate(index)

    def _read(self, window: int) -> np.ndarray:
        """One window, channel-last [T, H, W, C], normalized."""
        out = read_channels_last(self.source, self._pool, window, self.check_finite)
        if self.shift is not None:
            np.subtract(out, self._read_shift, out=out)
            np.divide(out, self.scale, out=out)
        return out

    def _grids(self, f: h5py.File, pf: PDEBenchFile, fi: int, traj: int, tsel: slice):
        """Space grid [H, W, 2] and the window's times from 0: the file's coordinates, each one
        it lacks (they are optional, as `inspect_pdebench` checks them) cell centres on [0, 1]
        or step numbers."""
        def stored(obj, name: str):
            return np.asarray(obj[name]) if obj is not None and name in obj else None

        if fi not in self._grid_cache:
            h, w = pf.spatial_shape
            if pf.kind in ("swe", "diff_react"):
                g = f[pf.groups[0]].get("grid")
                x, y = stored(g, "x"), stored(g, "y")
            elif pf.kind == "comp_ns":
                x, y = stored(f, "x-coordinate"), stored(f, "y-coordinate")
            else:
                x = y = None
            x = (np.arange(h) + 0.5) / h if x is None else x
            y = (np.arange(w) + 0.5) / w if y is None else y
            coords = [torch.as_tensor(np.asarray(c, dtype=np.float32)) for c in (x, y)]
            self._grid_cache[fi] = torch.stack(torch.meshgrid(*coords, indexing="ij"), -1)
        if pf.kind in ("swe", "diff_react"):
            t = stored(f[pf.groups[traj]].get("grid"), "t")
        elif pf.kind == "incomp_ns":
            t = np.asarray(f["t"][traj]) if "t" in f else None
        else:
            t = stored(f, "t-coordinate")
        t = np.arange(pf.n_steps) if t is None else t[:pf.n_steps]
        t = torch.as_tensor(np.asarray(t, dtype=np.float32)[tsel])
        return self._grid_cache[fi], t - t.min()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        fi, traj, t0 = self.locate(index)
        pf = self.files[fi]
        n_steps = self.n_steps_input + self.n_steps_output
        tsel = slice(t0, t0 + (n_steps - 1) * self.dt_stride + 1, self.dt_stride)
        fields = torch.from_numpy(self._read(index))
        f = self._pool.get(pf.path)
        n_in = self.n_steps_input
        sample = {"input_fields": fields[:n_in], "output_fields": fields[n_in:]}
        if pf.force:
            sample["constant_fields"] = torch.as_tensor(np.asarray(f["force"][traj],
                                                                   dtype=np.float32))
        sample["boundary_conditions"] = torch.full(
            (2, 2), float(BoundaryCondition[pf.boundary].value))
        if self.return_grid:
            space, time = self._grids(f, pf, fi, traj, tsel)
            sample["space_grid"] = space
            sample["input_time_grid"] = time[:n_in]
            sample["output_time_grid"] = time[n_in:]
        return {k: v for k, v in sample.items() if v.numel() > 0}

    def close(self) -> None:
        self._pool.close()


def read_channels_last(source: WindowSource, pool: H5Pool, window: int,
                       check_finite: bool = True, dtype=np.float32) -> np.ndarray:
    """A window of a PDEBench source as [T, H, W, C]: its blocks (one hyperslab each) side by
    side in channel order; NaN/Inf refused with file, array, trajectory and time. `dtype`
    float64 keeps the values of arrays stored as float64 (statistics)."""
    flat = np.empty(source.window_floats, dtype)
    source.read_batch(pool, [window], flat)
    if check_finite and not np.isfinite(flat).all():
        raise NonFiniteError(first_nonfinite(source, [window], flat))
    out = np.empty((source.n_steps,) + source.spatial_shape + (source.n_channels,), dtype)
    for offset, k, shape, c0, c1 in assembly_plan(source, 1):
        out[..., c0:c1] = flat[offset:offset + k].reshape(shape[1:])
    return out


def source_name(path: str, kind: str) -> str:
    """The dataset name of a PDEBench source: its kind's and its file's or directory's."""
    base = os.path.basename(os.path.normpath(path))
    if os.path.isfile(path):
        base = os.path.splitext(base)[0]
    return f"{DATASET_NAMES[kind]}-{base}"


#: frames read at once when computing statistics (a real incompressible-NS trajectory is
#: 1000 frames of 512² × 3, 3 GB)
STATS_CHUNK_BYTES = 256 * 2 ** 20


def write_pdebench_stats(path: str, split: str = "train", kind: str | None = None,
                         train_val_test=(0.8, 0.1, 0.1)) -> str:
    """Per-field mean/std/rms (and of one-step differences) over one split, as the source's
    stats file (`stats_file`), with the names PDEBenchDataset uses. Trajectories are read in
    chunks of frames (`STATS_CHUNK_BYTES`), overlapping by one frame so that every one-step
    difference is counted once."""
    ds = PDEBenchDataset(path, split, 1, 0, kind=kind, train_val_test=train_val_test,
                         return_grid=False)
    names = FIELDS[ds.kind]
    mom, dmom = RunningMoments(len(names)), RunningMoments(len(names))
    for pf, trajectories in zip(ds.files, ds.trajectories):
        # float64 arrays are read as float64: their values apart (1e5 ± 0.01) and their moments
        dtype = np.float64 if pf.wide else np.float32
        frame_bytes = np.dtype(dtype).itemsize * len(names) * pf.spatial_shape[0] * \
            pf.spatial_shape[1]
        k = max(2, min(pf.n_steps, STATS_CHUNK_BYTES // frame_bytes))
        source = pdebench_source(ds.dataset_name, [pf], split, k, 0, 1, train_val_test,
                                 trajectories=[trajectories])
        per_trajectory = pf.n_steps - k + 1       # windows of k frames in one trajectory
        for j in range(len(trajectories)):
            done = 0                              # frames counted so far
            while done < pf.n_steps:
                start = min(max(done - 1, 0), pf.n_steps - k)
                x = read_channels_last(source, ds._pool, j * per_trajectory + start,
                                       dtype=dtype)
                mom.update(x[done - start:])
                dmom.update(np.diff(x[max(done - start - 1, 0):], axis=0))
                done = start + k
    ds.close()
    stats: dict[str, dict] = {}
    for key, m in (("", mom), ("_delta", dmom)):
        stats["mean" + key] = dict(zip(names, map(float, m.mean)))
        stats["std" + key] = dict(zip(names, map(float, m.std)))
        stats["rms" + key] = dict(zip(names, map(float, m.rms)))
    out = stats_file(path)
    with open(out, "w") as fh:
        yaml.safe_dump(stats, fh, sort_keys=True)
    return out
