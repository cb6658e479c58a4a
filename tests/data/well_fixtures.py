"""Well-format files that exercise what the simulators do not: t2 fields, 3D, constant fields,
non-square and sample-varying grids, wall and open boundaries, partially dim-varying fields."""

import glob
import os
import shutil

import h5py
import numpy as np

from dsfm.data.stats import write_stats
from dsfm.data.well_format import Boundary, Field, Scalar, boundaries_all, write_well_file


def _smooth(rng, shape):
    """Smooth-ish random data: a few random Fourier modes plus noise, float32."""
    grids = np.meshgrid(*[np.linspace(0, 2 * np.pi, n, endpoint=False) for n in shape],
                        indexing="ij")
    out = np.zeros(shape)
    for _ in range(3):
        k = rng.integers(1, 3, size=len(shape))
        out += rng.normal() * np.cos(sum(ki * g for ki, g in zip(k, grids)) + rng.uniform(0, 6))
    return (out + 0.1 * rng.normal(size=shape) + rng.normal()).astype(np.float32)


def _field(rng, lead, spatial, comps=()):
    return np.stack([_smooth(rng, spatial + comps) for _ in range(int(np.prod(lead)))]) \
        .reshape(lead + spatial + comps)


def rich_2d_file(path, rng, n_traj=3, n_steps=9, shape=(24, 16)):
    """Non-square 2D grid with t0/t1/t2 fields, constant fields (sample-varying and not),
    scalars of every kind, sample-varying x coordinates and time, wall and open boundaries."""
    nx, ny = shape
    x = np.linspace(0, 1, nx, dtype=np.float32)[None] * rng.uniform(1, 2, (n_traj, 1))
    y = np.linspace(-1, 1, ny, dtype=np.float32)
    t = np.arange(n_steps, dtype=np.float32)[None] * rng.uniform(0.5, 1.5, (n_traj, 1))
    wall_x = np.zeros(nx, bool)
    wall_x[[0, -1]] = True
    open_y = np.zeros(ny, bool)
    open_y[[0, -1]] = True
    write_well_file(
        path, dataset_name="rich_2d", spatial_dims=("x", "y"),
        coords={"x": x.astype(np.float32), "y": y}, time=t.astype(np.float32),
        n_trajectories=n_traj,
        fields=[
            Field("pressure", _field(rng, (n_traj, n_steps), shape)),
            Field("obstacle", _field(rng, (n_traj,), shape), time_varying=False),
            Field("bathymetry", _smooth(rng, shape), time_varying=False, sample_varying=False),
            Field("velocity", _field(rng, (n_traj, n_steps), shape, (2,)), order=1),
            Field("stress", _field(rng, (n_traj, n_steps), shape, (2, 2)), order=2,
                  symmetric=False),
        ],
        scalars=[Scalar("Re", np.float64(rng.uniform(100, 1000))),
                 Scalar("energy", rng.normal(size=(n_traj, n_steps)), time_varying=True,
                        sample_varying=True),
                 Scalar("forcing", rng.normal(size=n_steps).astype(np.float32),
                        time_varying=True)],
        boundaries=[Boundary("x_wall", "WALL", ("x",), wall_x),
                    Boundary("y_open", "open", ("y",), open_y)],
        simulation_parameters={"Re": 500.0})


def cube_3d_file(path, rng, n_traj=2, n_steps=7, shape=(8, 6, 5)):
    """3D grid, periodic, with t0, t1 (3 components), t2 (9 channels) and a constant field."""
    dims = ("x", "y", "z")
    coords = {d: np.linspace(0, 1, n, endpoint=False, dtype=np.float32)
              for d, n in zip(dims, shape)}
    write_well_file(
        path, dataset_name="cube_3d", spatial_dims=dims, coords=coords,
        time=np.linspace(0, 1, n_steps, dtype=np.float32), n_trajectories=n_traj,
        fields=[Field("density", _field(rng, (n_traj, n_steps), shape)),
                Field("temperature0", _field(rng, (n_traj,), shape), time_varying=False),
                Field("velocity", _field(rng, (n_traj, n_steps), shape, (3,)), order=1),
                Field("strain", _field(rng, (n_traj, n_steps), shape, (3, 3)), order=2,
                      symmetric=True)],
        scalars=[Scalar("gamma", np.float32(1.4))],
        boundaries=boundaries_all("PERIODIC", dims, shape),
        simulation_parameters={"gamma": 1.4})


def partial_dims_file(path, rng, n_traj=2, n_steps=6, shape=(10, 7)):
    """A profile that varies along x only (dim_varying [True, False]) beside a full field."""
    coords = {"x": np.arange(shape[0], dtype=np.float32),
              "y": np.arange(shape[1], dtype=np.float32)}
    write_well_file(
        path, dataset_name="partial", spatial_dims=("x", "y"), coords=coords,
        time=np.arange(n_steps, dtype=np.float32), n_trajectories=n_traj,
        fields=[Field("u", _field(rng, (n_traj, n_steps), shape)),
                Field("profile", rng.normal(size=(n_traj, n_steps, shape[0])).astype(np.float32),
                      dim_varying=(True, False))],
        boundaries=boundaries_all("PERIODIC", ("x", "y"), shape))


def shared_forcing_file(path, rng, n_traj=3, n_steps=8, shape=(12, 10), shared=True):
    """Time-varying fields that every trajectory shares (sample_varying false, stored without
    a trajectory axis: a forcing, a wind; `shared=False` stores them per trajectory) beside
    per-trajectory ones, t0 and t1, on a wall/periodic grid."""
    lead = (n_steps,) if shared else (n_traj, n_steps)
    coords = {"x": np.linspace(0, 1, shape[0], dtype=np.float32),
              "y": np.linspace(0, 2, shape[1], dtype=np.float32)}
    write_well_file(
        path, dataset_name="shared_forcing", spatial_dims=("x", "y"), coords=coords,
        time=np.arange(n_steps, dtype=np.float32), n_trajectories=n_traj,
        fields=[Field("u", _field(rng, (n_traj, n_steps), shape)),
                Field("forcing", _field(rng, lead, shape), sample_varying=not shared),
                Field("velocity", _field(rng, (n_traj, n_steps), shape, (2,)), order=1),
                Field("wind", _field(rng, lead, shape, (2,)), order=1,
                      sample_varying=not shared)],
        boundaries=boundaries_all("WALL", ("x",), shape[:1]) +
        boundaries_all("PERIODIC", ("y",), shape[1:]))


def make_dataset(base, name, writer, seed=0, files_per_split=2, **kwargs):
    """A dataset directory <base>/<name> with train/valid/test files and stats.yaml."""
    rng = np.random.default_rng(seed)
    root = os.path.join(base, name)
    for split in ("train", "valid", "test"):
        os.makedirs(os.path.join(root, "data", split), exist_ok=True)
        for i in range(files_per_split):
            writer(os.path.join(root, "data", split, f"{name}_{i}.hdf5"), rng, **kwargs)
    write_stats(root)
    return root


def nan_pressure_copy(demo_base, tmp_path, time_index=7):
    """A copy of the demo euler_2d whose training files hold NaN pressure at `time_index` of
    every trajectory: what a loader must name by array and time."""
    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    for p in (ds / "data" / "train").glob("*.hdf5"):
        with h5py.File(p, "r+") as f:
            f["t0_fields/pressure"][:, time_index] = np.nan
    return ds


def nan_point_copy(demo_base, tmp_path):
    """A copy of the demo euler_2d whose first training file holds one NaN (pressure,
    trajectory 0, time index 3, cell (5, 5)): a few windows, read by one rank of two.
    Returns the dataset folder and that file."""
    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    first = sorted((ds / "data" / "train").glob("*.hdf5"))[0]
    with h5py.File(first, "r+") as f:
        f["t0_fields/pressure"][0, 3, 5, 5] = np.nan
    return ds, first


def mixed_boundaries_dataset(base, name, shape, n_traj=4, n_steps=10):
    """A dataset whose first file is periodic and second has walls, in every split: its
    micro-batches mix the two (one attention path for uniform batches, another for mixed)."""
    rng = np.random.default_rng(0)
    root = os.path.join(base, name)
    coords = {d: np.linspace(0, 1, n, dtype=np.float32) for d, n in zip(("x", "y"), shape)}
    for split in ("train", "valid", "test"):
        os.makedirs(os.path.join(root, "data", split), exist_ok=True)
        for i, kind in enumerate(("PERIODIC", "WALL")):
            write_well_file(
                os.path.join(root, "data", split, f"{name}_{i}.hdf5"), dataset_name=name,
                spatial_dims=("x", "y"), coords=coords,
                time=np.arange(n_steps, dtype=np.float32), n_trajectories=n_traj,
                fields=[Field(f, _field(rng, (n_traj, n_steps), shape)) for f in ("u", "v")],
                boundaries=boundaries_all(kind, ("x", "y"), shape))
    write_stats(root)
    return root


def store_fields_as(root, dtype):
    """Every field of every file of dataset `root` stored as `dtype` (write_well_file stores
    float32), and its stats.yaml computed again from the stored values."""
    for path in glob.glob(os.path.join(root, "data", "*", "*.hdf5")):
        with h5py.File(path, "r+") as f:
            for order in range(3):
                group = f[f"t{order}_fields"]
                for name in list(group):
                    attrs, data = dict(group[name].attrs), group[name][()]
                    del group[name]
                    group.create_dataset(name, data=data.astype(dtype)).attrs.update(attrs)
    write_stats(root)
