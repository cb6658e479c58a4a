"""stats.yaml: per-field mean, std and RMS, and the same for one-step differences (`*_delta`).

Statistics run per tensor component (a t1 field gets a list of D numbers, a t2 field a D×D nested
list) over every trajectory, time step and grid point of the given files, accumulated in float64
with Chan's pairwise update so large means do not swamp small variances. Differences are taken
between consecutive saved steps of each trajectory, for time-varying fields only (constant fields
have no `*_delta` entry, as in The Well's published files).
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np
import yaml

from dsfm.data.well_format import FieldLayout, open_h5, read_layout
from dsfm.errors import EmptySplitError, StatsError

KEYS = ("mean", "std", "rms", "mean_delta", "std_delta", "rms_delta")


def load_stats(path: str, writer: str = "dsfm.data.stats.write_stats") -> dict:
    """Read a stats.yaml, with errors that name the file (and `writer`, what writes one)."""
    if not os.path.isfile(path):
        raise StatsError(f"{path}: stats file not found; normalization needs it "
                         f"(write it with {writer}, or turn normalization "
                         "off: data.normalization=null in a run config, "
                         "use_normalization=False for WellDataset, normalization=None for "
                         "WellLoader)")
    try:
        with open(path) as fh:
            stats = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise StatsError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as exc:     # not readable by this user, a directory,
        # bytes that are not text: a traceback before
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise StatsError(f"{path}: cannot read the stats file ({why})") from None
    if not isinstance(stats, dict):
        raise StatsError(f"{path}: expected a mapping with keys mean, std, rms, ..., got "
                         f"{type(stats).__name__}")
    stats["__path__"] = path
    return stats


class RunningMoments:
    """Count, mean and sum of squared deviations per channel, mergeable chunk by chunk."""

    def __init__(self, n_channels: int):
        self.n = 0
        self.mean = np.zeros(n_channels)
        self.m2 = np.zeros(n_channels)

    def update(self, x: np.ndarray) -> None:
        """x: [..., n_channels]"""
        x = x.reshape(-1, x.shape[-1]).astype(np.float64, copy=False)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(axis=0)
        m2_b = ((x - mean_b) ** 2).sum(axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * n_b / n
        self.m2 = self.m2 + m2_b + delta ** 2 * self.n * n_b / n
        self.n = n

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1))

    @property
    def rms(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.n, 1) + self.mean ** 2)


def _shaped(values: np.ndarray, fl: FieldLayout, n_dims: int):
    """Plain Python numbers shaped as the field's tensor: float, [D] or [[D]*D]."""
    if fl.order == 0:
        return float(values[0])
    return np.asarray(values).reshape((n_dims,) * fl.order).tolist()


#: float32 bytes of an array read at once when all of it is scanned (statistics, checks): one
#: trajectory of The Well's MHD_256 magnetic field (256³ × 100 steps × 3) is 20 GB
READ_BLOCK_BYTES = 256 * 2 ** 20


def time_blocks(n_steps: int, frame_floats: int, overlap: int = 0):
    """(start, stop) ranges of time steps covering 0..n_steps, each of at most READ_BLOCK_BYTES
    of float32 frames (but at least 1 + overlap frames), consecutive ones sharing `overlap`."""
    k = max(1 + overlap, min(n_steps, READ_BLOCK_BYTES // max(4 * frame_floats, 1)))
    start = 0
    while True:
        stop = min(start + k, n_steps)
        yield start, stop
        if stop >= n_steps:
            return
        start = stop - overlap


def _pieces(dset, fl: FieldLayout, n_trajectories: int):
    """(float64 block, frames already counted at its start) over a field, a trajectory and a
    few time steps at a time; consecutive blocks of a trajectory overlap by one step, so every
    one-step difference is taken once and every step counted once."""
    trajectories = range(n_trajectories) if fl.sample_varying else [None]
    for i in trajectories:
        lead = () if i is None else (i,)
        if not fl.time_varying:
            yield np.asarray(dset[lead] if lead else dset[()], dtype=np.float64), 0
            continue
        frame = int(np.prod(dset.shape[len(lead) + 1:], dtype=np.int64))
        for start, stop in time_blocks(dset.shape[len(lead)], frame, overlap=1):
            yield np.asarray(dset[lead + (slice(start, stop),)], dtype=np.float64), int(start > 0)


def compute_stats(paths: Iterable[str]) -> dict:
    """Statistics of every field over the given Well files (one dataset)."""
    moments: dict[str, RunningMoments] = {}
    deltas: dict[str, RunningMoments] = {}
    layouts: dict[str, FieldLayout] = {}
    n_dims = 0
    for path in paths:
        with open_h5(path) as f:
            lay = read_layout(f, path)
            n_dims = lay.n_spatial_dims
            for fl in lay.fields:
                layouts.setdefault(fl.name, fl)
                mom = moments.setdefault(fl.name, RunningMoments(fl.n_channels))
                dset = f[fl.path]
                for x, overlap in _pieces(dset, fl, lay.n_trajectories):
                    x = x.reshape(x.shape[:x.ndim - fl.order] + (fl.n_channels,))
                    mom.update(x[overlap:])
                    if fl.time_varying and x.shape[0] > 1:
                        d = deltas.setdefault(fl.name, RunningMoments(fl.n_channels))
                        d.update(np.diff(x, axis=0))
    stats: dict[str, dict] = {k: {} for k in KEYS}
    for name, fl in layouts.items():
        m = moments[name]
        stats["mean"][name] = _shaped(m.mean, fl, n_dims)
        stats["std"][name] = _shaped(m.std, fl, n_dims)
        stats["rms"][name] = _shaped(m.rms, fl, n_dims)
        if name in deltas:
            d = deltas[name]
            stats["mean_delta"][name] = _shaped(d.mean, fl, n_dims)
            stats["std_delta"][name] = _shaped(d.std, fl, n_dims)
            stats["rms_delta"][name] = _shaped(d.rms, fl, n_dims)
    return stats


def write_stats(dataset_dir: str, split: str = "train") -> str:
    """Compute stats over one split of a dataset directory and write <dataset_dir>/stats.yaml."""
    from dsfm.data.index import list_hdf5

    files = list_hdf5(os.path.join(dataset_dir, "data", split))
    if not files:
        raise EmptySplitError(f"{os.path.join(dataset_dir, 'data', split)}: no HDF5 files to "
                              "compute statistics from")
    stats = compute_stats(files)
    out = os.path.join(dataset_dir, "stats.yaml")
    with open(out, "w") as fh:
        yaml.safe_dump(stats, fh, sort_keys=True)
    return out
