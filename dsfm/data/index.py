"""Where windows live: splits, file lists, layouts of a dataset, and window → (file, trajectory,
time) arithmetic. Free of torch, so reader processes that import it start fast and stay small."""

from __future__ import annotations

import bisect
import glob
import os
from typing import Sequence

import numpy as np

from dsfm.data.well_format import FileLayout, layout_mismatch, open_h5, read_layout
from dsfm.errors import SchemaError, TooShortError

SPLITS = ("train", "valid", "test")


def list_hdf5(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "*.h5"))
                  + glob.glob(os.path.join(directory, "*.hdf5")))


def windows_per_trajectory(n_steps: int, n_in: int, n_out: int, stride: int) -> int:
    """Start times t0 such that n_in + n_out steps, `stride` apart, fit in the trajectory."""
    return max(0, n_steps - (1 + stride * (n_in + n_out - 1)) + 1)


def count_windows(files: Sequence[tuple[str, int]], n_in: int, n_out: int,
                  stride: int) -> list[int]:
    """Windows per trajectory of each (path, steps per trajectory); refuses a file too short
    for even one window, naming it."""
    counts = []
    for path, n_steps in files:
        w = windows_per_trajectory(n_steps, n_in, n_out, stride)
        if w <= 0:
            raise TooShortError(f"{path}: {n_steps} time steps are not enough for {n_in} input "
                                f"and {n_out} output steps with a stride of {stride}")
        counts.append(w)
    return counts


def max_stride_at(time_idx: int, n_steps: int, n_in: int, n_out: int) -> int:
    """Largest stride that still fits n_in + n_out steps starting at time_idx."""
    return max(0, (n_steps - time_idx - 1) // (n_in + n_out - 1))


def read_layouts(paths: Sequence[str]) -> list[FileLayout]:
    """Layouts of the files of one dataset, refusing files that disagree with the first."""
    layouts = []
    for path in paths:
        with open_h5(path) as f:
            try:
                layouts.append(read_layout(f, path))
            except (KeyError, OSError) as exc:
                raise SchemaError(f"{path}: unreadable metadata ({exc})") from None
    for lay in layouts[1:]:
        if lay.signature() != layouts[0].signature():
            raise SchemaError(layout_mismatch(layouts[0], lay))
    return layouts


class WindowIndex:
    """Windows numbered file by file, trajectory by trajectory, start time by start time
    (upstream the_well's order)."""

    def __init__(self, n_trajectories: Sequence[int], windows: Sequence[int]):
        self.n_trajectories = list(n_trajectories)
        self.windows = list(windows)
        counts = np.array([n * w for n, w in zip(self.n_trajectories, self.windows)],
                          dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._per_file = np.array(self.windows, dtype=np.int64)
        self._bounds = self.offsets.tolist()     # bisect on a list: readers locate per window

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int, int]:
        """(file index, trajectory, window within the trajectory) of window `index`."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} windows")
        index %= n
        file_idx = bisect.bisect_right(self._bounds, index) - 1
        local = index - self._bounds[file_idx]
        w = self.windows[file_idx]
        return file_idx, local // w, local % w

    def locate_many(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`locate` for an array of windows at once: int64 arrays (file, trajectory, window
        within the trajectory)."""
        given = np.asarray(indices)
        if given.dtype.kind not in "iu" and given.size:
            raise TypeError(f"window indices must be integers, got {given.dtype}")
        if given.dtype.kind == "u" and given.size and given.max() > np.iinfo(np.int64).max:
            raise IndexError(f"index {given.max()} out of range for {len(self)} windows")
        idx = given.astype(np.int64, copy=False)
        n = len(self)
        if idx.size and not (0 <= idx.min() and idx.max() < n):
            bad = idx[(idx < -n) | (idx >= n)]
            if bad.size:
                raise IndexError(f"index {bad[0]} out of range for {n} windows")
            idx = idx % n
        file_idx = np.searchsorted(self.offsets, idx, side="right") - 1
        local = idx - self.offsets[file_idx]
        w = self._per_file[file_idx]
        return file_idx, local // w, local % w
