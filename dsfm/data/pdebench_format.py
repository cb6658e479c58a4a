"""PDEBench's 2D HDF5 layouts: detection, per-file facts, trajectory splits and a writer.

Free of torch (reader processes import it); `dsfm.data.pdebench` builds the dataset on top.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import h5py
import numpy as np

from dsfm.data.index import SPLITS
from dsfm.data.well_format import open_h5
from dsfm.errors import ConfigError, SchemaError

FIELDS = {
    "swe": ("h",),
    "diff_react": ("activator", "inhibitor"),
    "incomp_ns": ("Vx", "Vy", "particles"),
    "comp_ns": ("Vx", "Vy", "density", "pressure"),
}
DATASET_NAMES = {"swe": "pdebench_swe", "diff_react": "pdebench_diff_react",
                 "incomp_ns": "pdebench_incomp_ns", "comp_ns": "pdebench_comp_ns"}
BOUNDARY = {"swe": "OPEN", "diff_react": "WALL", "incomp_ns": "WALL", "comp_ns": "PERIODIC"}


def detect_kind(f: h5py.File, path: str) -> str:
    keys = set(f.keys())
    if {"Vx", "Vy", "density", "pressure"} <= keys:
        return "comp_ns"
    if "velocity" in keys:
        return "incomp_ns"
    groups = [k for k in keys if isinstance(f[k], h5py.Group)]
    if groups:
        first = f[sorted(groups)[0]]
        data = first.get("data")
        if isinstance(data, h5py.Dataset) and data.ndim == 4:
            channels = data.shape[-1]
            if channels in (1, 2):
                return "swe" if channels == 1 else "diff_react"
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


def inspect_pdebench(path: str, kind: str | None = None, boundary: str | None = None
                     ) -> PDEBenchFile:
    with open_h5(path) as f:
        kind = kind or detect_kind(f, path)
        if kind not in FIELDS:
            raise ConfigError(f"kind {kind!r} is not one of {', '.join(FIELDS)}")
        groups: list[str] = []
        if kind in ("swe", "diff_react"):
            groups = sorted(k for k in f.keys() if isinstance(f[k], h5py.Group))
            shapes = set()
            for g in groups:
                d = f[g].get("data")
                if not isinstance(d, h5py.Dataset):
                    raise SchemaError(f"{path}: /{g}/data is missing")
                shapes.add(d.shape)
            if len(shapes) != 1:
                raise SchemaError(f"{path}: trajectory groups disagree on data shape: "
                                  f"{sorted(shapes)}")
            t, h, w, c = shapes.pop()
            if c != len(FIELDS[kind]):
                raise SchemaError(f"{path}: /{groups[0]}/data has {c} channels, {kind} has "
                                  f"{len(FIELDS[kind])} ({', '.join(FIELDS[kind])})")
            n = len(groups)
        elif kind == "incomp_ns":
            for name in ("velocity", "particles"):
                if name not in f:
                    raise SchemaError(f"{path}: dataset '/{name}' is missing")
            n, t, h, w, c = f["velocity"].shape
            if c != 2 or f["particles"].shape != (n, t, h, w, 1):
                raise SchemaError(f"{path}: velocity {f['velocity'].shape} and particles "
                                  f"{f['particles'].shape} must be [N,T,H,W,2] and [N,T,H,W,1]")
        else:
            shapes = {name: f[name].shape for name in FIELDS[kind]}
            if len(set(shapes.values())) != 1 or len(shapes["Vx"]) != 4:
                raise SchemaError(f"{path}: Vx, Vy, density, pressure must share one [N,T,H,W] "
                                  f"shape, got {shapes}")
            n, t, h, w = shapes["Vx"]
    if boundary is None:
        boundary = BOUNDARY[kind]
        name = os.path.basename(path).lower()
        if "periodic" in name:
            boundary = "PERIODIC"
        elif kind == "comp_ns" and ("outgoing" in name or "trans" in name):
            boundary = "OPEN"
    return PDEBenchFile(path, kind, n, t, (h, w), groups, boundary.upper())


def split_trajectories(n: int, split: str, fractions=(0.8, 0.1, 0.1)) -> range:
    """Trajectories of one split: ceil(fraction·n) for train and valid, the rest for test."""
    counts = [math.ceil(fractions[0] * n), math.ceil(fractions[1] * n)]
    counts.append(max(n - sum(counts), 0))
    start = sum(counts[:SPLITS.index(split)])
    return range(min(start, n), min(start + counts[SPLITS.index(split)], n))


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
