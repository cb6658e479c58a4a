"""PDEBench's 2D HDF5 layouts: detection, per-file facts, trajectory splits and a writer.

Free of torch (reader processes import it); `dsfm.data.pdebench` builds the dataset on top.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import h5py
import numpy as np

from dsfm.data.index import SPLITS
from dsfm.data.well_format import open_h5
from dsfm.errors import ConfigError, CorruptFileError, SchemaError

FIELDS = {
    "swe": ("h",),
    "diff_react": ("activator", "inhibitor"),
    "incomp_ns": ("Vx", "Vy", "particles"),
    "comp_ns": ("Vx", "Vy", "density", "pressure"),
}
DATASET_NAMES = {"swe": "pdebench_swe", "diff_react": "pdebench_diff_react",
                 "incomp_ns": "pdebench_incomp_ns", "comp_ns": "pdebench_comp_ns"}
BOUNDARY = {"swe": "OPEN", "diff_react": "WALL", "incomp_ns": "WALL", "comp_ns": "PERIODIC"}


#: what h5py raises for an object it cannot read (a damaged header or B-tree)
_H5_ERRORS = (OSError, KeyError, RuntimeError)


def _damaged(path: str, what: str, exc: Exception) -> CorruptFileError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CorruptFileError(f"{path}: {what} cannot be read ({reason.strip(chr(39))}); the file "
                            "is damaged, regenerate or re-download it")


def _member(parent: h5py.Group, name: str, path: str):
    """parent[name], None if there is no such member; one that cannot be opened (a damaged
    object header) is a CorruptFileError naming it, where h5py's get() would say None and a
    trajectory would silently go missing."""
    if name not in parent:
        return None
    try:
        return parent[name]
    except _H5_ERRORS as exc:
        raise _damaged(path, f"{parent.name.rstrip('/')}/{name}", exc) from None


def trajectory_groups(f: h5py.File, path: str) -> dict[str, h5py.Group]:
    """The root's groups (PDEBench's one per trajectory) by name, in name order: a file's
    listing, which `unsupported`, `detect_kind` and the layout check take, each member opened
    once (they used to list the file again each, opening every group each time)."""
    members = ((k, _member(f, k, path)) for k in sorted(f.keys()))
    return {k: m for k, m in members if isinstance(m, h5py.Group)}


def _first_data(groups: dict[str, h5py.Group], path: str
                ) -> tuple[str | None, h5py.Dataset | None]:
    """(name, `data`) of the first trajectory group holding a `data` array, (None, None) if
    none does. The layout is told from it: told from the first group alone, a file whose
    first group had lost its `data` was 'not a PDEBench 2D layout' (and a Well file with
    eleven problems to the checker) rather than one whose /0000/data is missing."""
    for name, group in groups.items():
        data = _member(group, "data", path)
        if isinstance(data, h5py.Dataset):
            return name, data
    return None, None


def unsupported(f: h5py.File, path: str, groups: dict[str, h5py.Group]) -> str | None:
    """What a PDEBench file dsfm does not read holds (1D, 3D, steady-state), if it is one;
    `groups`: its `trajectory_groups`."""
    keys = set(f.keys())
    vx = _member(f, "Vx", path)
    if "Vz" in keys or (isinstance(vx, h5py.Dataset) and vx.ndim == 5):
        return "3D compressible NS (Vx, Vy, Vz, density, pressure [N, T, X, Y, Z])"
    if {"Vx", "density", "pressure"} <= keys and "Vy" not in keys:
        return "1D compressible NS (Vx, density, pressure [N, T, X])"
    tensor = _member(f, "tensor", path)
    if isinstance(tensor, h5py.Dataset) and "x-coordinate" in keys:
        if tensor.ndim == 3:
            return "a 1D equation (tensor [N, T, X]: advection, Burgers, reaction-diffusion)"
        if "nu" in keys:
            return "a 2D steady state (tensor [N, 1, H, W] and nu: Darcy flow)"
    first, data = _first_data(groups, path)
    if data is not None and data.ndim in (3, 5):
        return (f"a {data.ndim - 2}D equation (one group per trajectory, /{first}/data "
                f"{list(data.shape)})")
    return None


def detect_kind(f: h5py.File, path: str, groups: dict[str, h5py.Group]) -> str:
    """The layout of a PDEBench 2D file; `groups`: its `trajectory_groups`."""
    keys = set(f.keys())
    if {"Vx", "Vy", "density", "pressure"} <= keys:
        return "comp_ns"
    if "velocity" in keys:
        return "incomp_ns"
    _, data = _first_data(groups, path)
    if data is not None and data.ndim == 4 and data.shape[-1] in (1, 2):
        return "swe" if data.shape[-1] == 1 else "diff_react"
    cfd = FIELDS["comp_ns"]
    if len(keys & set(cfd)) >= 2:       # most of a 2D CFD file: say what it lacks
        missing = [k for k in cfd if k not in keys]
        raise SchemaError(f"{path}: a 2D compressible NS file ({', '.join(cfd)}) without "
                          f"{', '.join(missing)}")
    raise SchemaError(f"{path}: not a PDEBench 2D layout (expected groups holding data[T,H,W,C], "
                      "'velocity' and 'particles', or 'Vx','Vy','density','pressure')")


@dataclass
class PDEBenchFile:
    path: str
    kind: str
    n_trajectories: int
    n_steps: int
    spatial_shape: tuple[int, int]
    groups: list[str]              # trajectory groups (swe, diff_react)
    boundary: str
    #: arrays (`data`, `velocity`, `Vx`, ...) stored in a type float32 cannot hold (float64):
    #: their normalization's shift is subtracted in float64 as they are read (`Block.offset`)
    wide: tuple[str, ...] = ()
    #: incompressible NS: the file holds `force` [N, H, W, 2] (items' constant_fields)
    force: bool = False


def _wide(dtype) -> bool:
    return not np.can_cast(dtype, np.float32)


def inspect_pdebench(path: str, kind: str | None = None, boundary: str | None = None
                     ) -> PDEBenchFile:
    with open_h5(path) as f:
        try:
            return _inspect(f, path, kind, boundary)
        except _H5_ERRORS as exc:          # (a member is named where it is opened)
            raise _damaged(path, "its layout", exc) from None


def _inspect(f: h5py.File, path: str, kind: str | None, boundary: str | None) -> PDEBenchFile:
    groups = trajectory_groups(f, path)
    other = unsupported(f, path, groups)
    if other:
        raise SchemaError(f"{path}: holds {other}, which dsfm does not read: it reads "
                          f"PDEBench's 2D time series ({', '.join(FIELDS)})")
    kind = kind or detect_kind(f, path, groups)
    if kind not in FIELDS:
        raise ConfigError(f"kind {kind!r} is not one of {', '.join(FIELDS)}")
    names: list[str] = []
    wide: set[str] = set()
    force = False
    if kind in ("swe", "diff_react"):
        if not groups:            # (a kind given for a file of another layout)
            raise SchemaError(f"{path}: no trajectory groups holding data [T,H,W,C], as {kind} "
                              "files have; is it another PDEBench layout?")
        names = list(groups)
        shapes = set()
        for g, group in groups.items():
            d = _member(group, "data", path)
            if not isinstance(d, h5py.Dataset):
                raise SchemaError(f"{path}: /{g}/data is missing")
            shapes.add(d.shape)
            if _wide(d.dtype):
                wide.add("data")
        if len(shapes) != 1:
            raise SchemaError(f"{path}: trajectory groups disagree on data shape: "
                              f"{sorted(shapes)}")
        t, h, w, c = shapes.pop()
        if c != len(FIELDS[kind]):
            raise SchemaError(f"{path}: /{names[0]}/data has {c} channels, {kind} has "
                              f"{len(FIELDS[kind])} ({', '.join(FIELDS[kind])})")
        n = len(names)
    elif kind == "incomp_ns":
        for name in ("velocity", "particles"):
            if name not in f:
                raise SchemaError(f"{path}: dataset '/{name}' is missing")
        n, t, h, w, c = f["velocity"].shape
        wide.update(name for name in ("velocity", "particles") if _wide(f[name].dtype))
        if c != 2 or f["particles"].shape != (n, t, h, w, 1):
            raise SchemaError(f"{path}: velocity {f['velocity'].shape} and particles "
                              f"{f['particles'].shape} must be [N,T,H,W,2] and [N,T,H,W,1]")
        force = "force" in f
        if force and f["force"].shape != (n, h, w, 2):
            raise SchemaError(f"{path}: force {f['force'].shape} must be [N,H,W,2], "
                              f"{(n, h, w, 2)} beside velocity {f['velocity'].shape}")
    else:
        missing = [name for name in FIELDS[kind] if not isinstance(_member(f, name, path),
                                                                  h5py.Dataset)]
        if missing:
            raise SchemaError(f"{path}: {', '.join(missing)} missing: {kind} files hold "
                              f"{', '.join(FIELDS[kind])} [N,T,H,W]; is it another PDEBench "
                              "layout?")
        shapes = {name: f[name].shape for name in FIELDS[kind]}
        if len(set(shapes.values())) != 1 or len(shapes["Vx"]) != 4:
            raise SchemaError(f"{path}: Vx, Vy, density, pressure must share one [N,T,H,W] "
                              f"shape, got {shapes}")
        n, t, h, w = shapes["Vx"]
        wide.update(name for name in FIELDS[kind] if _wide(f[name].dtype))
    _check_coordinates(f, path, kind, groups[names[0]] if names else None, n, t, h, w)
    if boundary is None:
        boundary = boundary_from_name(kind, path)
    return PDEBenchFile(path, kind, n, t, (h, w), names, boundary.upper(), tuple(sorted(wide)),
                        force)


def boundary_from_name(kind: str, path: str) -> str:
    """The boundary a PDEBench file's name gives (`..._periodic_128_Train.hdf5`; CFD's `trans`
    and `outgoing` are open), else the layout's own: whole words of the name, split at `_`,
    `-` and `.` (a substring match read `nonperiodic` as periodic and `transonic` as open)."""
    words = set(re.split(r"[_.\-]", os.path.basename(path).lower()))
    if "periodic" in words:
        return "PERIODIC"
    if kind == "comp_ns" and words & {"outgoing", "trans"}:
        return "OPEN"
    return BOUNDARY[kind]


def force_mismatch(a: PDEBenchFile, b: PDEBenchFile) -> str | None:
    """Two incompressible-NS files of one source, one with `force` and one without: their items
    would differ in keys (constant_fields), which no batch can join. One line, or None."""
    if a.kind != b.kind or a.force == b.force:
        return None
    said = {True: "present", False: "absent"}
    return (f"{b.path}: force [N,H,W,2] {said[b.force]} differs from {said[a.force]} in "
            f"{a.path}; the files of one source must agree (items with and without "
            "constant_fields cannot be batched): give those with force and those without as "
            "separate sources")


def _check_coordinates(f: h5py.File, path: str, kind: str, first: h5py.Group | None, n: int,
                       t: int, h: int, w: int) -> None:
    """The coordinates a file stores must fit its arrays' axes: an array stored in another
    axis order (say [N, H, W, T]) would otherwise be read as windows of garbage. `first` is the
    first trajectory group (swe, diff_react)."""
    def length(name: str, obj) -> int | None:
        return obj[name].shape[-1] if name in obj else None

    problems = []
    if kind == "comp_ns":
        for name, want in (("x-coordinate", (h,)), ("y-coordinate", (w,)),
                           ("t-coordinate", (t, t + 1))):
            got = length(name, f)
            if got is not None and got not in want:
                problems.append(f"{name} has {got} values, the arrays' axis {want[0]}")
    elif kind == "incomp_ns":
        got = length("t", f)
        if got is not None and got != t:
            problems.append(f"t has {got} values per trajectory, velocity {t} steps")
    elif "grid" in first:
        grid = first["grid"]
        got_t = length("t", grid)
        if got_t is not None and got_t != t:
            problems.append(f"{first.name}/grid/t has {got_t} values, data {t} steps")
        for name, want in (("x", h), ("y", w)):    # data [T, X, Y, C], as PDEBench writes it
            got = length(name, grid)
            if got is not None and got != want:
                problems.append(f"{first.name}/grid/{name} has {got} values, the data's axis "
                                f"{want}")
    if problems:
        raise SchemaError(f"{path}: {'; '.join(problems)} (is an array stored in another axis "
                          "order than PDEBench's [N, T, H, W]?)")


def stats_file(path: str) -> str:
    """Where a source's statistics live: stats.yaml in a directory, <stem>.stats.yaml beside a
    file (files of one folder are often separate sources: they must not share one)."""
    if os.path.isdir(path):
        return os.path.join(path, "stats.yaml")
    return os.path.splitext(path)[0] + ".stats.yaml"


def split_trajectories(n: int, split: str, fractions=(0.8, 0.1, 0.1)) -> range:
    """Trajectories of one split: ceil(fraction·n) for train and valid, the rest for test."""
    counts = [math.ceil(fractions[0] * n), math.ceil(fractions[1] * n)]
    counts.append(max(n - sum(counts), 0))
    start = sum(counts[:SPLITS.index(split)])
    return range(min(start, n), min(start + counts[SPLITS.index(split)], n))


#: kinds whose trajectories are split over all the files of a source rather than within each
#: file: PDEBench's incompressible NS holds 4 trajectories a file (a split within each would
#: leave valid and test empty), and MPP splits it by file
SPLIT_ACROSS_FILES = ("incomp_ns",)


def split_sets(files: list[PDEBenchFile], split: str,
               fractions=(0.8, 0.1, 0.1)) -> list[list[int]]:
    """Per file, the stored indices of its trajectories in `split`: within each file (as MPP
    splits by sample), or over the files' trajectories in order for SPLIT_ACROSS_FILES."""
    if not files or files[0].kind not in SPLIT_ACROSS_FILES:
        return [list(split_trajectories(pf.n_trajectories, split, fractions)) for pf in files]
    chosen = split_trajectories(sum(pf.n_trajectories for pf in files), split, fractions)
    out, start = [], 0
    for pf in files:
        out.append([i - start for i in chosen if start <= i < start + pf.n_trajectories])
        start += pf.n_trajectories
    return out


# ------------------------------------------------------------------------------------ writing


def write_pdebench(path: str, kind: str, fields: dict[str, np.ndarray], x: np.ndarray,
                   y: np.ndarray, t: np.ndarray, force: np.ndarray | None = None) -> None:
    """Write trajectories in a PDEBench layout. `fields` maps FIELDS[kind] names to [N,T,H,W]."""
    names = FIELDS[kind]
    missing = [n for n in names if n not in fields]
    if missing:
        raise ConfigError(f"{kind} needs fields {names}, missing {missing}")
    arrays = [np.asarray(fields[n], dtype=np.float32) for n in names]
    n = arrays[0].shape[0]
    with h5py.File(path, "w") as f:
        if kind in ("swe", "diff_react"):
            stacked = np.stack(arrays, axis=-1)
            for i in range(n):
                g = f.create_group(f"{i:04d}")
                g.create_dataset("data", data=stacked[i])
                grid = g.create_group("grid")
                grid.create_dataset("x", data=np.asarray(x, np.float32))
                grid.create_dataset("y", data=np.asarray(y, np.float32))
                grid.create_dataset("t", data=np.asarray(t, np.float32))
        elif kind == "incomp_ns":
            f.create_dataset("velocity", data=np.stack(arrays[:2], axis=-1))
            f.create_dataset("particles", data=arrays[2][..., None])
            f.create_dataset("t", data=np.broadcast_to(np.asarray(t, np.float32),
                                                       (n, len(t))).copy())
            if force is not None:
                f.create_dataset("force", data=np.asarray(force, np.float32))
        else:
            for name, arr in zip(names, arrays):
                f.create_dataset(name, data=arr)
            dt = float(t[1] - t[0]) if len(t) > 1 else 1.0
            f.create_dataset("t-coordinate", data=np.append(t, t[-1] + dt).astype(np.float32))
            f.create_dataset("x-coordinate", data=np.asarray(x, np.float32))
            f.create_dataset("y-coordinate", data=np.asarray(y, np.float32))
