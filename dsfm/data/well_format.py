"""The Well's HDF5 format: what a file must hold, how to read its layout, how to write one.

One file holds `n_trajectories` simulations of one system on one grid:

    /  attrs dataset_name, grid_type, n_spatial_dims, n_trajectories, simulation_parameters,
           and one attribute per simulation parameter
    dimensions/            attrs spatial_dims; datasets time [T] or [N,T], x [nx] or [N,nx], …
    boundary_conditions/   one group per boundary: attrs bc_type, associated_dims, …; dataset mask
    scalars/               attrs field_names; datasets [N?, T?] with sample/time_varying flags
    t0_fields/ t1_fields/ t2_fields/
                           attrs field_names; datasets [N?, T?, *varying dims, *(D,)*order]
                           with flags sample_varying, time_varying, dim_varying

`inspect_file` reads this layout (no bulk data) into a `FileLayout` and lists every way a file
departs from it, so the reader can refuse a file with one clear line and the checker can list all
problems. `write_well_file` writes the format and validates shapes with the same rules.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Sequence

import h5py
import numpy as np

from dsfm.errors import CorruptFileError, MissingFileError, SchemaError

GROUPS = ("dimensions", "boundary_conditions", "scalars", "t0_fields", "t1_fields", "t2_fields")
ROOT_ATTRS = ("dataset_name", "grid_type", "n_spatial_dims", "n_trajectories",
              "simulation_parameters")


class BoundaryCondition(Enum):
    """Boundary codes, numbered as the upstream reader numbers them."""

    WALL = 0
    OPEN = 1
    PERIODIC = 2


def _text(value) -> str:
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else str(value)


def _names(value) -> list[str]:
    """An attribute holding a list of names (h5py gives arrays of str or bytes, or one str)."""
    if isinstance(value, (str, bytes)):
        return [_text(value)]
    return [_text(v) for v in np.asarray(value).ravel()]


@dataclass(frozen=True)
class FieldLayout:
    """One field dataset: its flags, stored shape and the channels it becomes."""

    name: str
    order: int                      # tensor order: 0 scalar, 1 vector, 2 tensor field
    time_varying: bool
    sample_varying: bool
    dim_varying: tuple[bool, ...]
    shape: tuple[int, ...]
    channel_names: tuple[str, ...]  # e.g. velocity_x, velocity_y; flattened row-major for t2
    #: stored in a type float32 cannot hold exactly (float64): files of one dataset may differ
    wide: bool = field(default=False, compare=False)

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def path(self) -> str:
        return f"t{self.order}_fields/{self.name}"


@dataclass(frozen=True)
class ScalarLayout:
    name: str
    time_varying: bool
    sample_varying: bool
    shape: tuple[int, ...]

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Its shape in one item, per time step: () a number, (1,) a [1] array (a constant
        stored with shape (1,))."""
        return self.shape[self.sample_varying + self.time_varying:]


@dataclass(frozen=True)
class BoundaryLayout:
    name: str
    bc_type: str                    # upper case: PERIODIC, WALL or OPEN
    associated_dims: tuple[str, ...]
    mask_shape: tuple[int, ...]


@dataclass
class FileLayout:
    """Everything about a file except its bulk data."""

    path: str
    dataset_name: str
    grid_type: str
    n_spatial_dims: int
    n_trajectories: int
    simulation_parameters: dict[str, float]
    spatial_dims: tuple[str, ...]
    spatial_shape: tuple[int, ...]
    n_steps: int
    time_sample_varying: bool
    coord_sample_varying: dict[str, bool]
    fields: list[FieldLayout] = field(default_factory=list)
    scalars: list[ScalarLayout] = field(default_factory=list)
    boundaries: list[BoundaryLayout] = field(default_factory=list)
    boundary_codes: np.ndarray | None = None   # [n_spatial_dims, 2] float32, padding convention

    @property
    def variable_fields(self) -> list[FieldLayout]:
        return [f for f in self.fields if f.time_varying]

    @property
    def constant_fields(self) -> list[FieldLayout]:
        return [f for f in self.fields if not f.time_varying]

    def agreed(self) -> tuple[tuple[str, object], ...]:
        """What must agree between files of one dataset, by name (`layout_mismatch`)."""
        return (("dataset_name", self.dataset_name), ("n_spatial_dims", self.n_spatial_dims),
                ("spatial_dims", self.spatial_dims), ("spatial resolution", self.spatial_shape),
                ("fields", tuple((f.name, "/" + f.path, f.order, f.time_varying, f.dim_varying)
                                 for f in self.fields)),
                ("scalars", tuple((s.name, f"/scalars/{s.name}", s.time_varying, s.item_shape)
                                  for s in self.scalars)))

    def signature(self) -> tuple:
        """What must agree between files of one dataset."""
        return tuple(value for _, value in self.agreed())


def channel_names(name: str, order: int, spatial_dims: Sequence[str]) -> tuple[str, ...]:
    """Channel names of a field: `u` (t0), `u_x, u_y` (t1), `u_xx, u_xy, u_yx, u_yy` (t2)."""
    if order == 0:
        return (name,)
    return tuple(f"{name}_{''.join(c)}" for c in itertools.product(spatial_dims, repeat=order))


def expected_field_shape(n_trajectories: int, n_steps: int, spatial_shape: Sequence[int],
                         order: int, time_varying: bool, sample_varying: bool,
                         dim_varying: Sequence[bool]) -> tuple[int, ...]:
    """The stored shape the flags imply: [N?, T?, *varying dims, *(D,)*order]."""
    shape: tuple[int, ...] = ()
    if sample_varying:
        shape += (n_trajectories,)
    if time_varying:
        shape += (n_steps,)
    shape += tuple(n for n, used in zip(spatial_shape, dim_varying) if used)
    return shape + (len(spatial_shape),) * order


def _flag(obj, key: str, where: str, problems: list[str]) -> bool | None:
    if key not in obj.attrs:
        problems.append(f"{where}: missing attribute '{key}'")
        return None
    return bool(np.asarray(obj.attrs[key]).all())


def _count(f: h5py.File, key: str, path: str, problems: list[str]) -> int | None:
    """A root attribute holding a whole number (n_spatial_dims, n_trajectories), or None with
    the problem listed."""
    value = np.asarray(f.attrs[key])
    if value.shape == () and (value.dtype.kind in "iu" or (
            value.dtype.kind == "f" and np.isfinite(value) and float(value).is_integer())):
        return int(value)
    shown = value.item() if value.shape == () else value.tolist()
    shown = _text(shown) if isinstance(shown, bytes) else shown
    problems.append(f"{path}: root attribute '{key}' is {shown!r}, expected an integer")
    return None


def open_h5(path: str, **kwargs) -> h5py.File:
    """Open read-only, turning HDF5's low-level failures into one readable line."""
    try:
        return h5py.File(path, "r", **kwargs)
    except FileNotFoundError:
        # a dataset's file listing can hold a name that cannot be opened: a file deleted or
        # moved since, or a symlink whose target is gone (HDF5's own message is a paragraph)
        target = os.readlink(path) if os.path.islink(path) else None
        raise MissingFileError(f"{path}: not found" + (
            f" (a symlink to {target}, which does not exist)" if target else "")) from None
    except OSError as exc:
        reason = str(exc).split("(", 1)[-1].rstrip(")") if "(" in str(exc) else str(exc)
        # HDF5 puts the time (ctime, with its newline) in some of its messages: one line
        reason = " ".join(re.sub(r"time = [^,]*,\s*", "", reason).split())
        if "unable to lock file" in reason:
            # HDF5's file locking: a writer elsewhere holds the file (a notebook with it open
            # in "r+" or "a"), or the file system refuses locks; the file itself is fine
            raise CorruptFileError(
                f"{path}: cannot be opened for reading while another process has it open for "
                f"writing ({reason}); close it there, or, if nothing writes it (a file system "
                "without locks), set HDF5_USE_FILE_LOCKING=FALSE") from None
        found = re.search(r"errno = (\d+)", reason)
        code = exc.errno or (int(found[1]) if found else None)
        if code in (errno.EACCES, errno.EPERM):
            # the file's permissions, not its contents: it was called truncated or corrupt
            raise CorruptFileError(
                f"{path}: permission denied: this process (user id {os.geteuid()}) may not "
                "read it; make it readable (chmod, chown) or run as a user who may") from None
        if code == errno.EISDIR:
            raise CorruptFileError(f"{path} is a directory, not an HDF5 file; move it out of "
                                   "the dataset's folder") from None
        raise CorruptFileError(
            f"{path}: cannot be opened as HDF5 ({reason}); the file is truncated or corrupt, "
            "regenerate or re-download it") from None


def inspect_file(f: h5py.File, path: str) -> tuple[FileLayout | None, list[str]]:
    """Read a file's layout and list every problem found (each names the item and the issue).

    Returns (layout, problems); the layout is None when the file is too broken to describe.
    """
    problems: list[str] = []
    missing_root = [a for a in ROOT_ATTRS if a not in f.attrs]
    for a in missing_root:
        problems.append(f"{path}: root attribute '{a}' is missing")
    missing_groups = [g for g in GROUPS if not isinstance(f.get(g), h5py.Group)]
    for g in missing_groups:
        problems.append(f"{path}: group '/{g}' is missing")
    if "dimensions" in missing_groups or {"n_spatial_dims", "n_trajectories"} & set(missing_root):
        return None, problems

    n_dims = _count(f, "n_spatial_dims", path, problems)
    n_traj = _count(f, "n_trajectories", path, problems)
    if n_dims is None or n_traj is None:
        return None, problems
    dataset_name = _text(f.attrs.get("dataset_name", ""))
    # any grid_type: the spec names cartesian and spherical, upstream's reader takes any value
    # into its metadata (its augmentations and plots look at it), and so does dsfm
    grid_type = _text(f.attrs.get("grid_type", "cartesian"))
    params: dict[str, float] = {}
    for p in _names(f.attrs.get("simulation_parameters", [])):
        if p not in f.attrs:
            problems.append(f"{path}: simulation parameter '{p}' is listed in "
                            "'simulation_parameters' but has no root attribute")
        else:
            params[p] = np.asarray(f.attrs[p]).item() if np.asarray(f.attrs[p]).size == 1 \
                else np.asarray(f.attrs[p]).tolist()

    dims = f["dimensions"]
    if "spatial_dims" not in dims.attrs:
        problems.append(f"{path}: /dimensions: missing attribute 'spatial_dims'")
        return None, problems
    spatial_dims = tuple(_names(dims.attrs["spatial_dims"]))
    if len(spatial_dims) != n_dims:
        problems.append(f"{path}: /dimensions: spatial_dims {list(spatial_dims)} has "
                        f"{len(spatial_dims)} entries but n_spatial_dims is {n_dims}")
        return None, problems
    for name in ("time",) + spatial_dims:
        if not isinstance(dims.get(name), h5py.Dataset):
            problems.append(f"{path}: dataset '/dimensions/{name}' is missing")
    if any(p.startswith(f"{path}: dataset '/dimensions/") for p in problems):
        return None, problems

    def sample_flag(name: str) -> bool:
        d = dims[name]
        flag = _flag(d, "sample_varying", f"{path}: /dimensions/{name}", problems)
        if flag is None:
            flag = d.ndim == 2
        expected_ndim = 2 if flag else 1
        if d.ndim != expected_ndim or (flag and d.shape[0] != n_traj):
            problems.append(
                f"{path}: /dimensions/{name} has shape {d.shape}, expected "
                f"{'[n_trajectories=' + str(n_traj) + ', n]' if flag else '[n]'} "
                f"(sample_varying={flag})")
        if bool(np.asarray(d.attrs.get("time_varying", False)).all()) and name != "time":
            problems.append(f"{path}: /dimensions/{name}: time-varying grids are not supported")
        return flag

    time_sv = sample_flag("time")
    coord_sv = {d: sample_flag(d) for d in spatial_dims}
    if any(dims[name].ndim == 0 for name in ("time",) + spatial_dims):
        return None, problems           # a single number: no length to take the grid from
    spatial_shape = tuple(int(dims[d].shape[-1]) for d in spatial_dims)
    n_steps = int(dims["time"].shape[-1])
    if n_steps < 1:
        problems.append(f"{path}: /dimensions/time is empty")

    layout = FileLayout(path=path, dataset_name=dataset_name, grid_type=grid_type,
                        n_spatial_dims=n_dims, n_trajectories=n_traj,
                        simulation_parameters=params, spatial_dims=spatial_dims,
                        spatial_shape=spatial_shape, n_steps=n_steps,
                        time_sample_varying=time_sv, coord_sample_varying=coord_sv)

    for order in range(3):
        gname = f"t{order}_fields"
        if gname in missing_groups:
            continue
        group = f[gname]
        if "field_names" not in group.attrs:
            problems.append(f"{path}: /{gname}: missing attribute 'field_names'")
            continue
        for name in _names(group.attrs["field_names"]):
            where = f"{path}: /{gname}/{name}"
            dset = group.get(name)
            if not isinstance(dset, h5py.Dataset):
                problems.append(f"{where}: listed in field_names but the dataset is missing")
                continue
            tv = _flag(dset, "time_varying", where, problems)
            sv = _flag(dset, "sample_varying", where, problems)
            if "dim_varying" not in dset.attrs:
                problems.append(f"{where}: missing attribute 'dim_varying'")
                continue
            dv = tuple(bool(v) for v in np.atleast_1d(np.asarray(dset.attrs["dim_varying"])))
            if tv is None or sv is None:
                continue
            if len(dv) != n_dims:
                problems.append(f"{where}: dim_varying has {len(dv)} entries, expected "
                                f"{n_dims} (one per spatial dim)")
                continue
            want = expected_field_shape(n_traj, n_steps, spatial_shape, order, tv, sv, dv)
            if tuple(dset.shape) != want:
                problems.append(f"{where}: shape {tuple(dset.shape)} contradicts its flags "
                                f"(sample_varying={sv}, time_varying={tv}, dim_varying="
                                f"{list(dv)}, tensor order {order}): expected {want}")
                continue
            if dset.dtype.kind != "f":
                problems.append(f"{where}: dtype {dset.dtype} is not floating point")
                continue
            layout.fields.append(FieldLayout(name, order, tv, sv, dv, tuple(dset.shape),
                                             channel_names(name, order, spatial_dims),
                                             not np.can_cast(dset.dtype, np.float32)))

    if "scalars" not in missing_groups:
        group = f["scalars"]
        if "field_names" not in group.attrs:      # upstream reads the scalars by this list
            problems.append(f"{path}: /scalars: missing attribute 'field_names'")
        for name in _names(group.attrs.get("field_names", [])):
            where = f"{path}: /scalars/{name}"
            dset = group.get(name)
            if not isinstance(dset, h5py.Dataset):
                problems.append(f"{where}: listed in field_names but the dataset is missing")
                continue
            tv = _flag(dset, "time_varying", where, problems)
            sv = _flag(dset, "sample_varying", where, problems)
            if tv is None or sv is None:
                continue
            want = (n_traj,) * sv + (n_steps,) * tv
            shape = tuple(dset.shape)
            if shape != want and not (want == () and shape == (1,)):
                problems.append(f"{where}: shape {shape} contradicts its flags "
                                f"(sample_varying={sv}, time_varying={tv}): expected {want}")
                continue
            if dset.dtype.kind not in "biufc":
                problems.append(f"{where}: dtype {dset.dtype} is not numeric")
                continue
            layout.scalars.append(ScalarLayout(name, tv, sv, shape))
        # an item's constant scalars are one tensor: a () scalar (or a sample-varying one)
        # gives each item a number, a (1,) one a [1] array, which upstream cannot join
        constant = [s for s in layout.scalars if not s.time_varying]
        boxed = [s for s in constant if s.shape == (1,) and not s.sample_varying]
        bare = [s for s in constant if s.shape != (1,) or s.sample_varying]
        if boxed and bare:
            problems.append(
                f"{path}: /scalars/{boxed[0].name} has shape (1,) beside /scalars/"
                f"{bare[0].name}, which is one number per item: the_well's reader cannot join "
                "a [1] array and a number into constant_scalars (an error at every item); store "
                "every constant scalar of the file with shape () (or every one with shape (1,))")

    if "boundary_conditions" not in missing_groups:
        codes = np.ones((n_dims, 2), dtype=np.float32)      # open unless a boundary says otherwise
        for name, bc in f["boundary_conditions"].items():
            where = f"{path}: /boundary_conditions/{name}"
            if not isinstance(bc, h5py.Group):
                problems.append(f"{where}: expected a group")
                continue
            missing = [a for a in ("bc_type", "associated_dims") if a not in bc.attrs]
            if missing:
                problems.append(f"{where}: missing attribute '{missing[0]}'")
                continue
            bc_type = _text(bc.attrs["bc_type"]).upper()
            if bc_type not in BoundaryCondition.__members__:
                problems.append(f"{where}: bc_type '{_text(bc.attrs['bc_type'])}' is not one of "
                                "PERIODIC, WALL, OPEN")
                continue
            assoc = tuple(_names(bc.attrs["associated_dims"]))
            unknown = [d for d in assoc if d not in spatial_dims]
            if unknown:
                problems.append(f"{where}: associated_dims {list(assoc)} names "
                                f"{unknown[0]!r}, not a spatial dim {list(spatial_dims)}")
                continue
            mask = bc.get("mask")
            if not isinstance(mask, h5py.Dataset):
                problems.append(f"{where}: dataset 'mask' is missing")
                continue
            want = tuple(spatial_shape[spatial_dims.index(d)] for d in assoc)
            if tuple(mask.shape) != want:
                problems.append(f"{where}/mask: shape {tuple(mask.shape)}, expected {want} "
                                f"(the sizes of {list(assoc)})")
                continue
            if mask.dtype.kind not in "biuf":
                problems.append(f"{where}/mask: dtype {mask.dtype} is not boolean")
                continue
            layout.boundaries.append(BoundaryLayout(name, bc_type, assoc, want))
            _apply_boundary(codes, bc_type, assoc, np.asarray(mask[()]), spatial_dims)
        layout.boundary_codes = codes

    if n_traj < 1:
        problems.append(f"{path}: root attribute 'n_trajectories' is {n_traj}, expected >= 1")
    return layout, problems


def _apply_boundary(codes: np.ndarray, bc_type: str, assoc: Sequence[str], mask: np.ndarray,
                    spatial_dims: Sequence[str]) -> None:
    """Padding convention (as upstream): per axis and side, a wall needs the whole face masked,
    open or periodic need any point of it."""
    agg = np.min if bc_type == "WALL" else np.max
    value = BoundaryCondition[bc_type].value
    for axis, dim in enumerate(assoc):
        for side, pos in ((0, 0), (1, -1)):
            face = np.take(mask, pos, axis=axis)
            if agg(face):
                codes[spatial_dims.index(dim), side] = value


#: the end of every line saying that two files of one dataset disagree: what to do
AGREE = ("all files of one dataset must agree: fix or regenerate this file, or move it to a "
         "dataset of its own")


def _members_differ(kind: str, labels: Sequence[str], a: Sequence[tuple], b: Sequence[tuple],
                    there: str) -> str:
    """How the fields (or scalars) `b` of a file first differ from `a` of the file `there`: one
    missing or extra, one whose property differs (labels[i] names item[i + 2]), or their order
    (for fields, that of the channels). Items are (name, HDF5 path, *properties)."""
    first, other = {m[0]: m for m in a}, {m[0]: m for m in b}
    for name, m in first.items():
        if name not in other:
            return f"{m[1]} is missing, which {there} has"
    for name, m in other.items():
        if name not in first:
            return f"{m[1]} is not in {there}"
    for name, m in first.items():
        for label, x, y in zip(labels, m[2:], other[name][2:]):
            if x != y:
                return f"{other[name][1]}: {label} {y} differs from {x} in {there}"
    return (f"{kind} order {[m[0] for m in b]} differs from {[m[0] for m in a]} in {there}"
            + (" (the order of the channels)" if kind == "field" else ""))


#: per list of `FileLayout.agreed`: what its items are, and what their properties are called
_MEMBERS = {"fields": ("field", ("tensor order", "time_varying", "dim_varying")),
            "scalars": ("scalar", ("time_varying", "shape per item"))}


def channel_clash(layout: FileLayout) -> str | None:
    """One line when two fields of a file give a channel of one name (a t0 `velocity_x` beside
    a t1 `velocity`, whose x component is also `velocity_x`): a channel's name is its field
    column and names its metrics, so the model could not tell the two apart."""
    made_by: dict[str, str] = {}
    for fl in layout.variable_fields:
        for c in fl.channel_names:
            if c in made_by:
                return (f"{layout.path}: /{made_by[c]} and /{fl.path} both give a channel named "
                        f"{c!r}; a channel's name is its field column (and names its metrics), "
                        "so two channels cannot share one: rename one of the fields")
            made_by[c] = fl.path
    return None


def layout_mismatch(a: FileLayout, b: FileLayout) -> str:
    """One line naming the first way two files of one dataset disagree: the property, its value
    in each file and what to do (a field or scalar by name, not the whole list of them)."""
    for (what, x), (_, y) in zip(a.agreed(), b.agreed()):
        if x == y:
            continue
        if what in _MEMBERS:
            said = _members_differ(*_MEMBERS[what], x, y, a.path)
        else:
            said = f"{what} {y} differs from {x} in {a.path}"
        return f"{b.path}: {said}; {AGREE}"
    return f"{b.path}: layout differs from {a.path}; {AGREE}"


def read_layout(f: h5py.File, path: str) -> FileLayout:
    """The layout of a valid file; raises SchemaError naming the first problem otherwise."""
    layout, problems = inspect_file(f, path)
    if problems:
        more = f" (and {len(problems) - 1} more problems: run python -m dsfm.data.check {path})" \
            if len(problems) > 1 else ""
        raise SchemaError(problems[0] + more)
    assert layout is not None
    return layout


# --------------------------------------------------------------------------------------------
# Writing


@dataclass
class Field:
    """A field to write. `data` has the stored shape its flags imply (see expected_field_shape)."""

    name: str
    data: np.ndarray
    order: int = 0
    time_varying: bool = True
    sample_varying: bool = True
    dim_varying: tuple[bool, ...] | None = None      # None: varies along every spatial dim
    symmetric: bool = False                          # t2 only: the tensor is symmetric


@dataclass
class Scalar:
    name: str
    data: np.ndarray | float
    time_varying: bool = False
    sample_varying: bool = False


@dataclass
class Boundary:
    name: str
    bc_type: str
    associated_dims: tuple[str, ...]
    mask: np.ndarray


def boundaries_all(bc_type: str, spatial_dims: Sequence[str],
                   spatial_shape: Sequence[int]) -> list[Boundary]:
    """One boundary per axis, both faces of the given type (e.g. a fully periodic box)."""
    out = []
    for dim, n in zip(spatial_dims, spatial_shape):
        mask = np.zeros(n, dtype=bool)
        mask[[0, -1]] = True
        out.append(Boundary(f"{dim}_{bc_type.lower()}", bc_type.upper(), (dim,), mask))
    return out


def write_well_file(path: str, *, dataset_name: str, spatial_dims: Sequence[str],
                    coords: dict[str, np.ndarray], time: np.ndarray, n_trajectories: int,
                    fields: Iterable[Field], scalars: Iterable[Scalar] = (),
                    boundaries: Iterable[Boundary] = (),
                    simulation_parameters: dict[str, float] | None = None,
                    grid_type: str = "cartesian") -> None:
    """Write one Well-format file. Coordinates or time given as 2-D arrays are sample-varying."""
    spatial_dims = tuple(spatial_dims)
    time = np.asarray(time)
    shape = tuple(int(np.asarray(coords[d]).shape[-1]) for d in spatial_dims)
    n_steps = int(time.shape[-1])
    params = dict(simulation_parameters or {})
    with h5py.File(path, "w") as f:
        f.attrs["dataset_name"] = dataset_name
        f.attrs["grid_type"] = grid_type
        f.attrs["n_spatial_dims"] = len(spatial_dims)
        f.attrs["n_trajectories"] = n_trajectories
        f.attrs["simulation_parameters"] = list(params)
        for k, v in params.items():
            f.attrs[k] = v

        dims = f.create_group("dimensions")
        dims.attrs["spatial_dims"] = list(spatial_dims)
        t = dims.create_dataset("time", data=time.astype(np.float32))
        t.attrs["sample_varying"] = time.ndim == 2
        for d in spatial_dims:
            c = np.asarray(coords[d], dtype=np.float32)
            ds = dims.create_dataset(d, data=c)
            ds.attrs["sample_varying"] = c.ndim == 2
            ds.attrs["time_varying"] = False

        bcs = f.create_group("boundary_conditions")
        for b in boundaries:
            g = bcs.create_group(b.name)
            g.attrs["associated_dims"] = list(b.associated_dims)
            g.attrs["associated_fields"] = []
            g.attrs["bc_type"] = b.bc_type.upper()
            g.attrs["sample_varying"] = False
            g.attrs["time_varying"] = False
            g.create_dataset("mask", data=np.asarray(b.mask, dtype=bool))

        sg = f.create_group("scalars")
        scalars = list(scalars)
        sg.attrs["field_names"] = [s.name for s in scalars]
        for s in scalars:
            data = np.asarray(s.data)
            want = (n_trajectories,) * s.sample_varying + (n_steps,) * s.time_varying
            if data.shape != want:
                raise SchemaError(f"{path}: scalar '{s.name}' has shape {data.shape}, "
                                  f"its flags imply {want}")
            ds = sg.create_dataset(s.name, data=data)
            ds.attrs["time_varying"] = s.time_varying
            ds.attrs["sample_varying"] = s.sample_varying

        groups = [f.create_group(f"t{i}_fields") for i in range(3)]
        by_order: list[list[Field]] = [[], [], []]
        for fl in fields:
            by_order[fl.order].append(fl)
        for order, group in enumerate(groups):
            group.attrs["field_names"] = [fl.name for fl in by_order[order]]
            for fl in by_order[order]:
                dv = tuple(fl.dim_varying) if fl.dim_varying is not None \
                    else (True,) * len(spatial_dims)
                want = expected_field_shape(n_trajectories, n_steps, shape, order,
                                            fl.time_varying, fl.sample_varying, dv)
                if tuple(fl.data.shape) != want:
                    raise SchemaError(f"{path}: field '{fl.name}' has shape {fl.data.shape}, "
                                      f"its flags imply {want}")
                ds = group.create_dataset(fl.name, data=np.asarray(fl.data, dtype=np.float32))
                ds.attrs["dim_varying"] = np.array(dv, dtype=bool)
                ds.attrs["sample_varying"] = fl.sample_varying
                ds.attrs["time_varying"] = fl.time_varying
                if order == 2:
                    ds.attrs["symmetric"] = fl.symmetric
                    ds.attrs["antisymmetric"] = False
