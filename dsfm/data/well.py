"""`WellDataset`: a drop-in for `the_well.data.WellDataset` that reads each window once.

Same arguments (the common ones), same length, same window order and, at every index, the same
keys, shapes and values as upstream. What differs is the cost of a sample: upstream reopens the
file and re-reads its attributes per item, reads each field, normalizes, tiles and concatenates
on the CPU. Here the layout of every file is read once at construction, files stay open in a
bounded per-process pool, and each field of a window is one hyperslab read into a buffer that is
normalized straight into its channels of the output array.

Beyond upstream: fields that do not vary along some spatial axis (`dim_varying` False) are
broadcast correctly (upstream's tiling garbles them), every error names the file and item, and
windows are checked for NaN/Inf (`check_finite`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dsfm.data.handles import H5Pool
from dsfm.data.index import (
    SPLITS,
    WindowIndex,
    count_windows,
    list_hdf5,
    max_stride_at,
    read_layouts,
)
from dsfm.data.normalization import resolve_normalization
from dsfm.data.stats import load_stats
from dsfm.data.well_format import FieldLayout, FileLayout, layout_mismatch
from dsfm.errors import (
    ConfigError,
    CorruptFileError,
    EmptySplitError,
    NonFiniteError,
    SchemaError,
)


@dataclass
class WellMetadata:
    """Dataset-level facts, with the attribute names upstream's WellMetadata uses."""

    dataset_name: str
    n_spatial_dims: int
    spatial_resolution: tuple[int, ...]
    scalar_names: list[str]
    constant_scalar_names: list[str]
    field_names: dict[int, list[str]]
    constant_field_names: dict[int, list[str]]
    boundary_condition_types: list[str]
    n_files: int
    n_trajectories_per_file: list[int]
    n_steps_per_trajectory: list[int]
    grid_type: str = "cartesian"

    @property
    def n_scalars(self) -> int:
        return len(self.scalar_names)

    @property
    def n_constant_scalars(self) -> int:
        return len(self.constant_scalar_names)

    @property
    def n_fields(self) -> int:
        return sum(map(len, self.field_names.values()))

    @property
    def n_constant_fields(self) -> int:
        return sum(map(len, self.constant_field_names.values()))

    @property
    def sample_shapes(self) -> dict[str, list[int]]:
        res = list(self.spatial_resolution)
        return {"input_fields": [*res, self.n_fields], "output_fields": [*res, self.n_fields],
                "constant_fields": [*res, self.n_constant_fields],
                "input_scalars": [self.n_scalars], "output_scalars": [self.n_scalars],
                "constant_scalars": [self.n_constant_scalars],
                "space_grid": [*res, self.n_spatial_dims]}


class WellDataset(Dataset):
    """Windows of Well-format trajectories: `n_steps_input` steps in, `n_steps_output` out.

    Items are dicts of tensors in upstream's layout: `input_fields` [T_in, *spatial, C],
    `output_fields` [T_out, *spatial, C], `constant_fields` [*spatial, C_const], scalars,
    `boundary_conditions` [n_dims, 2] (0 wall, 1 open, 2 periodic), `space_grid` and time grids.
    Empty entries are left out, as upstream does.

    dsfm additions: `check_finite` (raise NonFiniteError naming file, field, trajectory and time on
    NaN/Inf) and `max_open_files` (bound on open handles per process).
    """

    def __init__(self, path: str | None = None, normalization_path: str | None = None,
                 well_base_path: str | None = None, well_dataset_name: str | None = None,
                 well_split_name: str | None = None, include_filters: Sequence[str] = (),
                 exclude_filters: Sequence[str] = (), use_normalization: bool = False,
                 normalization_type: Any = None, max_rollout_steps: int = 100,
                 n_steps_input: int = 1, n_steps_output: int = 1, min_dt_stride: int = 1,
                 max_dt_stride: int = 1, flatten_tensors: bool = True, return_grid: bool = True,
                 normalize_time_grid: bool = True, boundary_return_type: str | None = "padding",
                 full_trajectory_mode: bool = False, start_output_steps_at_t: int = -1,
                 name_override: str | None = None, *, check_finite: bool = True,
                 max_open_files: int = 64):
        super().__init__()
        if path is None and (well_base_path is None or well_dataset_name is None):
            raise ConfigError("WellDataset needs `path`, or `well_base_path` and "
                              "`well_dataset_name`")
        if well_split_name is not None and well_split_name not in SPLITS:
            raise ConfigError(f"well_split_name {well_split_name!r} is not one of "
                              f"{', '.join(SPLITS)}")
        if boundary_return_type not in ("padding", None):
            raise ConfigError(f"boundary_return_type {boundary_return_type!r}: only 'padding' "
                              "or None are supported")
        if not flatten_tensors:
            raise ConfigError("flatten_tensors=False is not supported: tensor fields are "
                              "flattened into channels")
        for name, value in (("n_steps_input", n_steps_input), ("min_dt_stride", min_dt_stride)):
            if int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if n_steps_output < 0:
            raise ConfigError(f"n_steps_output must be >= 0, got {n_steps_output}")
        if full_trajectory_mode and min_dt_stride < max_dt_stride:
            raise ConfigError("full_trajectory_mode needs a fixed stride (min_dt_stride == "
                              "max_dt_stride)")
        if (full_trajectory_mode and start_output_steps_at_t >= 0
                and (n_steps_input + 1) * min_dt_stride > start_output_steps_at_t):
            raise ConfigError(
                f"start_output_steps_at_t={start_output_steps_at_t} is too early: the first "
                f"possible output step is {(n_steps_input + 1) * min_dt_stride} with "
                f"n_steps_input={n_steps_input} and min_dt_stride={min_dt_stride}")

        if path is not None:
            trunk = path
            self.data_path = os.path.join(path, "data", well_split_name) if well_split_name \
                else path
        else:
            trunk = os.path.join(well_base_path, well_dataset_name)
            self.data_path = os.path.join(trunk, "data", well_split_name or "")
        norm_rel = normalization_path or "stats.yaml"
        self.normalization_path = norm_rel if os.path.isabs(norm_rel) else \
            os.path.join(trunk, str(norm_rel).removeprefix(str(trunk)).lstrip("./"))

        self.well_dataset_name = well_dataset_name
        self.use_normalization = use_normalization
        self.normalization_type = normalization_type
        self.n_steps_input = int(n_steps_input)
        self.n_steps_output = int(n_steps_output)
        self.min_dt_stride = int(min_dt_stride)
        self.max_dt_stride = int(max_dt_stride)
        self.max_rollout_steps = int(max_rollout_steps)
        self.return_grid = return_grid
        self.normalize_time_grid = normalize_time_grid
        self.boundary_return_type = boundary_return_type
        self.full_trajectory_mode = full_trajectory_mode
        self.start_output_steps_at_t = start_output_steps_at_t
        self.check_finite = check_finite

        if not os.path.isdir(self.data_path):
            raise EmptySplitError(f"{self.data_path}: directory not found "
                                  "(expected <base>/<dataset>/data/<split>/*.hdf5)")
        files = list_hdf5(self.data_path)
        if include_filters:
            files = [f for f in files if any(s in f for s in include_filters)]
        for s in exclude_filters:
            files = [f for f in files if s not in f]
        if not files:
            raise EmptySplitError(f"{self.data_path}: no .h5 or .hdf5 files"
                                  + (" match the include/exclude filters" if include_filters
                                     or exclude_filters else ""))
        self.files_paths = files
        self._layouts = read_layouts(files)
        if well_split_name:
            self._check_other_splits(os.path.dirname(self.data_path), well_split_name)
        self._build_index()
        self.metadata = self._metadata()
        if name_override is not None:
            self.dataset_name = name_override

        self.norm = None
        if use_normalization and normalization_type:
            cls = resolve_normalization(normalization_type)
            stats = load_stats(self.normalization_path)
            self.norm = cls(stats, self.core_field_names, self.core_constant_field_names)
        self._pool = H5Pool(max_open_files)
        self._file_cache: list[dict[str, Any]] = [{} for _ in files]
        self._vectors: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def _check_other_splits(self, data_dir: str, split: str) -> None:
        """All files of one dataset agree, across its splits too: a valid split at another
        resolution is refused when the train split is indexed, not met at the first
        evaluation. Reads the metadata of the first file of each other split."""
        for other in SPLITS:
            files = list_hdf5(os.path.join(data_dir, other)) if other != split and \
                os.path.isdir(os.path.join(data_dir, other)) else []
            if files:
                [lay] = read_layouts(files[:1])
                if lay.signature() != self._layouts[0].signature():
                    raise SchemaError(layout_mismatch(self._layouts[0], lay))

    # ---------------------------------------------------------------- index

    def _build_index(self) -> None:
        first = self._layouts[0]
        n_in, n_out, stride = self.n_steps_input, self.n_steps_output, self.min_dt_stride
        self.n_trajectories_per_file = [lay.n_trajectories for lay in self._layouts]
        self.n_steps_per_trajectory = [lay.n_steps for lay in self._layouts]
        windows = count_windows([(lay.path, lay.n_steps) for lay in self._layouts], n_in, n_out,
                                stride)
        lowest = min(self.n_steps_per_trajectory)
        if self.full_trajectory_mode:
            self.n_steps_output = (lowest - max(n_in * stride, self.start_output_steps_at_t)) \
                // stride
            if self.n_steps_output <= 0:
                raise ConfigError(f"{self.data_path}: full_trajectory_mode leaves no output step "
                                  f"(shortest trajectory has {lowest} steps)")
            windows = [1] * len(self._layouts)
            self.n_steps_per_trajectory = [lowest] * len(self._layouts)
        self.n_windows_per_trajectory = windows
        self.index = WindowIndex(self.n_trajectories_per_file, windows)
        self.len = len(self.index)

        self.dataset_name = first.dataset_name
        self.n_spatial_dims = first.n_spatial_dims
        self.size_tuple = first.spatial_shape
        self._var_fields = first.variable_fields
        self._const_fields = first.constant_fields
        self.field_names = {i: [c for f in self._var_fields if f.order == i
                                for c in f.channel_names] for i in range(3)}
        self.constant_field_names = {i: [c for f in self._const_fields if f.order == i
                                         for c in f.channel_names] for i in range(3)}
        self.core_field_names = list(dict.fromkeys(f.name for f in self._var_fields))
        self.core_constant_field_names = [
            n for n in dict.fromkeys(f.name for f in self._const_fields)
            if n not in self.core_field_names]
        self.scalar_names = [s.name for s in first.scalars if s.time_varying]
        self.constant_scalar_names = [s.name for s in first.scalars if not s.time_varying]
        self.bc_types = sorted({b.bc_type for lay in self._layouts for b in lay.boundaries})
        self.num_bcs = len(self.bc_types)

    def _metadata(self) -> WellMetadata:
        first = self._layouts[0]
        return WellMetadata(
            dataset_name=self.dataset_name, n_spatial_dims=self.n_spatial_dims,
            spatial_resolution=self.size_tuple, scalar_names=self.scalar_names,
            constant_scalar_names=self.constant_scalar_names, field_names=self.field_names,
            constant_field_names=self.constant_field_names,
            boundary_condition_types=self.bc_types, n_files=len(self.files_paths),
            n_trajectories_per_file=self.n_trajectories_per_file,
            n_steps_per_trajectory=self.n_steps_per_trajectory, grid_type=first.grid_type)

    @property
    def layouts(self) -> list[FileLayout]:
        """The layout of every file, in index order."""
        return self._layouts

    def locate(self, index: int) -> tuple[int, int, int]:
        """(file index, trajectory, first time step) of window `index`, in upstream's order."""
        return self.index.locate(index)

    def __len__(self) -> int:
        return self.len

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.data_path}>"

    # ---------------------------------------------------------------- reading

    def _stride(self, file_idx: int, time_idx: int) -> int:
        dt = self.min_dt_stride
        if self.max_dt_stride > self.min_dt_stride:
            top = min(max_stride_at(time_idx, self.n_steps_per_trajectory[file_idx],
                                    self.n_steps_input, self.n_steps_output), self.max_dt_stride)
            if top > self.min_dt_stride:
                # the global NumPy generator, as upstream, so seeded runs draw the same strides
                dt = np.random.randint(self.min_dt_stride, top + 1)
        return dt

    def _norm_vectors(self, fields: list[FieldLayout], key: str):
        if key not in self._vectors:
            self._vectors[key] = self.norm.channel_vectors(fields)
        return self._vectors[key]

    def _read_fields(self, lay: FileLayout, fields: list[FieldLayout], sample_idx: int,
                     tsel: slice | None, n_t: int, key: str) -> np.ndarray:
        """Read `fields` (one hyperslab each) into one channel-last array, normalized."""
        lead = (n_t,) if tsel is not None else ()
        slabs = [self._pool.slab(lay.path, fl.path) for fl in fields]
        n_ch = sum(fl.n_channels for fl in fields)
        dtype = np.result_type(np.float32, *(slab.dset.dtype for slab in slabs))
        out = np.empty(lead + lay.spatial_shape + (n_ch,), dtype=dtype)
        shift = scale = None
        generic = self.norm is not None and not hasattr(self.norm, "channel_vectors")
        if self.norm is not None and not generic:
            shift, scale = self._norm_vectors(fields, key)
        c = 0
        for fl, slab in zip(fields, slabs):
            sel = ((sample_idx, 1, 1),) * fl.sample_varying + (
                ((tsel.start, n_t, tsel.step),) if tsel is not None else ())
            stored = lead + tuple(n for n, used in zip(lay.spatial_shape, fl.dim_varying) if used)
            # a float16 field is read as float32 and normalized in float32, as the loader
            # does (in place in float16 it was rounded after the subtraction too); any other
            # normalization class than dsfm's two gets the stored type, as upstream gives it
            buf = np.empty(stored + (lay.n_spatial_dims,) * fl.order, dtype=slab.dset.dtype
                           if generic else np.result_type(np.float32, slab.dset.dtype))
            try:
                if buf.size:
                    slab.read(sel, buf)
            except OSError as exc:
                raise CorruptFileError(
                    f"{lay.path}: reading /{fl.path} trajectory {sample_idx} "
                    f"time {_describe(tsel)} failed ({exc}); the file is damaged") from None
            if generic:
                buf = self.norm.normalize(torch.from_numpy(buf), fl.name).numpy()
            bshape = lead + tuple(n if used else 1 for n, used in
                                  zip(lay.spatial_shape, fl.dim_varying)) + (fl.n_channels,)
            view = buf.reshape(bshape)
            if shift is not None:        # in place on the contiguous buffer: the fast passes
                np.subtract(view, shift[c:c + fl.n_channels], out=view)
                np.divide(view, scale[c:c + fl.n_channels], out=view)
            out[..., c:c + fl.n_channels] = view
            c += fl.n_channels
        if self.check_finite and not np.isfinite(out).all():
            self._raise_nonfinite(self._pool.get(lay.path), lay, fields, sample_idx, tsel)
        return out

    def _raise_nonfinite(self, f, lay, fields, sample_idx, tsel):
        for fl in fields:
            sel = (sample_idx,) * fl.sample_varying + ((tsel,) if tsel is not None else ())
            raw = np.asarray(f[fl.path][sel] if sel else f[fl.path][()])
            bad = ~np.isfinite(raw)
            if bad.any():
                first = np.argwhere(bad)[0]
                where = f"trajectory {sample_idx}" if fl.sample_varying else "all trajectories"
                if tsel is not None:
                    where += f", time index {tsel.start + int(first[0]) * (tsel.step or 1)}"
                kind = "NaN" if np.isnan(raw[tuple(first)]) else "Inf"
                raise NonFiniteError(f"{lay.path}: /{fl.path} has {kind} at {where} "
                                     f"({int(bad.sum())} non-finite values in this window)")
        raise NonFiniteError(f"{lay.path}: normalization produced NaN/Inf for trajectory "
                             f"{sample_idx} (check {self.normalization_path})")

    def _scalars(self, f, lay: FileLayout, file_idx: int, sample_idx: int, tsel: slice):
        cache = self._file_cache[file_idx]
        if "scalars" not in cache:
            cache["scalars"] = {s.name: np.asarray(f["scalars"][s.name][()]) for s in lay.scalars}
        variable, constant = [], []
        for s in lay.scalars:
            data = cache["scalars"][s.name]
            if s.sample_varying:
                data = data[sample_idx]
            if s.time_varying:
                variable.append(torch.as_tensor(data[tsel]).unsqueeze(-1))
            else:
                constant.append(torch.as_tensor(data).unsqueeze(-1))
        return (torch.cat(variable, -1) if variable else torch.tensor([]),
                torch.cat(constant, -1) if constant else torch.tensor([]))

    def _grids(self, f, lay: FileLayout, file_idx: int, sample_idx: int, tsel: slice):
        cache = self._file_cache[file_idx]
        if "time" not in cache:
            cache["time"] = torch.tensor(f["dimensions"]["time"][()])
        time = cache["time"][sample_idx] if lay.time_sample_varying else cache["time"]
        time = time[tsel]
        if self.normalize_time_grid:
            time = time - time.min()
        space = cache.get("space")
        if space is None:
            coords = [torch.tensor(f["dimensions"][d][sample_idx] if lay.coord_sample_varying[d]
                                   else f["dimensions"][d][()]) for d in lay.spatial_dims]
            space = torch.stack(torch.meshgrid(*coords, indexing="ij"), -1)
            if not any(lay.coord_sample_varying.values()):
                cache["space"] = space
        return space, time

    def _constant_fields(self, f, lay: FileLayout, file_idx: int, sample_idx: int):
        fields = lay.constant_fields
        if not fields:
            return torch.tensor([])
        sample_varying = any(fl.sample_varying for fl in fields)
        cache = self._file_cache[file_idx]
        if not sample_varying and "constant" in cache:
            return cache["constant"]
        out = torch.from_numpy(self._read_fields(lay, fields, sample_idx, None, 0, "const"))
        if not sample_varying:
            cache["constant"] = out
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        file_idx, sample_idx, time_idx = self.locate(index)
        lay = self._layouts[file_idx]
        dt = self._stride(file_idx, time_idx)
        n_out = min(self.n_steps_output, self.max_rollout_steps)
        if self.full_trajectory_mode and self.start_output_steps_at_t >= 0:
            time_idx = self.start_output_steps_at_t - self.n_steps_input * dt
        n_steps = self.n_steps_input + n_out
        tsel = slice(time_idx, min(time_idx + n_steps * dt, lay.n_steps), dt)
        n_t = len(range(tsel.start, tsel.stop, tsel.step))
        f = self._pool.get(lay.path)
        fields = torch.from_numpy(self._read_fields(lay, lay.variable_fields, sample_idx, tsel, n_t,
                                                    "var"))
        var_scalars, const_scalars = self._scalars(f, lay, file_idx, sample_idx, tsel)
        n_in = self.n_steps_input
        sample = {
            "input_fields": fields[:n_in],
            "output_fields": fields[n_in:],
            "constant_fields": self._constant_fields(f, lay, file_idx, sample_idx),
            "input_scalars": var_scalars[:n_in],
            "output_scalars": var_scalars[n_in:],
            "constant_scalars": const_scalars,
        }
        if self.boundary_return_type is not None:
            sample["boundary_conditions"] = torch.from_numpy(lay.boundary_codes.copy())
        if self.return_grid:
            space, time = self._grids(f, lay, file_idx, sample_idx, tsel)
            sample["space_grid"] = space
            sample["input_time_grid"] = time[:n_in]
            sample["output_time_grid"] = time[n_in:]
        return {k: v for k, v in sample.items() if v.numel() > 0}

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Close this process's open files (they reopen on the next read)."""
        self._pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _describe(tsel: slice | None) -> str:
    if tsel is None:
        return "(time-invariant)"
    return f"{tsel.start}:{tsel.stop}:{tsel.step}"
