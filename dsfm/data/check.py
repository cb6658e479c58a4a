"""Validate Well-format files and dataset directories: `python -m dsfm.data.check PATH...`.

PATH may be an HDF5 file, a directory of HDF5 files, a dataset directory
(`<dataset>/data/{train,valid,test}/*.hdf5` and `<dataset>/stats.yaml`) or a directory of datasets.
Prints one line per problem, naming the file, the group or dataset, and what is wrong, and exits
1 if there was any; exits 0 when everything is valid. On stderr it also says how the training
loader will read the time-varying fields: with positioned reads of the file (contiguous, native
float32) or through the HDF5 library (chunked, compressed, other types), which is slower, and
whether readers use the C kernel (batch reads, fused normalization) or Python and NumPy (and why).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import yaml

from dsfm.data import native
from dsfm.data.handles import why_not_direct
from dsfm.data.index import SPLITS, list_hdf5
from dsfm.data.stats import time_blocks
from dsfm.data.well_format import FileLayout, inspect_file, layout_mismatch, open_h5
from dsfm.errors import CorruptFileError


def _scan_finite(f, lay: FileLayout) -> list[str]:
    """The first non-finite value of each field, if any, and how many its trajectory holds; a
    trajectory is read a few time steps at a time (`stats.time_blocks`)."""
    problems = []
    for fl in lay.fields:
        dset = f[fl.path]
        for i in range(lay.n_trajectories) if fl.sample_varying else [None]:
            lead = () if i is None else (i,)
            if fl.time_varying:
                frame = int(np.prod(dset.shape[len(lead) + 1:], dtype=np.int64))
                blocks = [lead + (slice(a, b),) for a, b in
                          time_blocks(dset.shape[len(lead)], frame)]
            else:
                blocks = [lead if lead else ()]
            count, first = 0, None
            for block in blocks:
                x = np.asarray(dset[block])
                bad = ~np.isfinite(x)
                n = int(bad.sum())
                if n and first is None:
                    idx = np.argwhere(bad)[0]
                    kind = "NaN" if np.isnan(x[tuple(idx)]) else "Inf"
                    if fl.time_varying:
                        idx[0] += block[-1].start
                    first = (idx, kind)
                count += n
            if first is not None:
                idx, kind = first
                where = [f"trajectory {i}"] if i is not None else []
                if fl.time_varying:
                    where.append(f"time index {int(idx[0])}")
                problems.append(f"{lay.path}: /{fl.path}: {count} non-finite values, "
                                f"first {kind} at {', '.join(where) or 'index ' + str(idx)}")
                break
    return problems


#: how the loader will read each time-varying array checked: (file, array, None or why not direct)
READ_PATHS: list[tuple[str, str, str | None]] = []


def check_file(path: str, scan_data: bool = True) -> tuple[FileLayout | None, list[str]]:
    """Problems of one file (schema, and NaN/Inf unless scan_data is False)."""
    try:
        f = open_h5(path)
    except (CorruptFileError, FileNotFoundError) as exc:
        return None, [str(exc) if isinstance(exc, CorruptFileError) else f"{path}: not found"]
    with f:
        try:
            layout, problems = inspect_file(f, path)
            if layout is not None and scan_data and not problems:
                problems += _scan_finite(f, layout)
            if layout is not None and not problems:
                READ_PATHS.extend((path, fl.path, why_not_direct(f[fl.path]))
                                  for fl in layout.variable_fields)
        except (OSError, KeyError) as exc:
            return None, [f"{path}: unreadable while checking ({exc}); the file is damaged"]
    return layout, problems


def _check_consistency(layouts: list[FileLayout]) -> list[str]:
    problems = []
    first = layouts[0]
    for lay in layouts[1:]:
        if lay.signature() != first.signature():
            problems.append(layout_mismatch(first, lay))
    return problems


def check_stats(path: str, layout: FileLayout) -> list[str]:
    """stats.yaml must hold mean/std/rms for every field and *_delta for time-varying ones,
    each a number, a D-list or a D×D list as the tensor order says."""
    if not os.path.isfile(path):
        return [f"{path}: missing (normalization needs mean, std, rms and *_delta per field)"]
    try:
        with open(path) as fh:
            stats = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        return [f"{path}: not valid YAML ({str(exc).splitlines()[0]})"]
    if not isinstance(stats, dict):
        return [f"{path}: expected a mapping of statistics, got {type(stats).__name__}"]
    problems = []
    for key in ("mean", "std", "rms", "mean_delta", "std_delta", "rms_delta"):
        table = stats.get(key)
        if not isinstance(table, dict):
            problems.append(f"{path}: key '{key}' is missing")
            continue
        for fl in layout.fields:
            if key.endswith("_delta") and not fl.time_varying:
                continue
            if fl.name not in table:
                problems.append(f"{path}: '{key}' has no entry for field '{fl.name}'")
                continue
            try:
                value = np.asarray(table[fl.name], dtype=np.float64)
            except (TypeError, ValueError):
                problems.append(f"{path}: '{key}.{fl.name}' is not numeric")
                continue
            want = (layout.n_spatial_dims,) * fl.order
            if value.shape != want:
                problems.append(f"{path}: '{key}.{fl.name}' has shape {list(value.shape)}, "
                                f"expected {list(want)} for a t{fl.order} field")
            elif not np.isfinite(value).all():
                problems.append(f"{path}: '{key}.{fl.name}' is not finite")
            elif key.startswith(("std", "rms")) and (value < 0).any():
                problems.append(f"{path}: '{key}.{fl.name}' is negative")
    return problems


def check_directory(path: str, scan_data: bool = True) -> tuple[int, list[str]]:
    """Check a plain directory of HDF5 files, a dataset directory or a directory of datasets."""
    if os.path.isdir(os.path.join(path, "data")):
        return check_dataset(path, scan_data)
    files = list_hdf5(path)
    if files:
        layouts, problems = [], []
        for p in files:
            lay, probs = check_file(p, scan_data)
            problems += probs
            if lay is not None and not probs:
                layouts.append(lay)
        if layouts:
            problems += _check_consistency(layouts)
        return len(files), problems
    subs = sorted(d for d in os.listdir(path) if not d.startswith(".")    # .<name>.partial-PID
                  and os.path.isdir(os.path.join(path, d, "data")))
    if not subs:
        return 0, [f"{path}: no HDF5 files and no dataset directories (<name>/data/<split>/)"]
    n, problems = 0, []
    for d in subs:
        k, probs = check_dataset(os.path.join(path, d), scan_data)
        n += k
        problems += probs
    return n, problems


def check_dataset(path: str, scan_data: bool = True) -> tuple[int, list[str]]:
    problems: list[str] = []
    layouts: list[FileLayout] = []
    n = 0
    for split in SPLITS:
        split_dir = os.path.join(path, "data", split)
        if not os.path.isdir(split_dir):
            problems.append(f"{split_dir}: split directory is missing")
            continue
        files = list_hdf5(split_dir)
        if not files and split == "train":
            problems.append(f"{split_dir}: split directory has no .h5 or .hdf5 files")
        elif not files:     # allowed (`dsfm.sim --splits 8,1,0` writes one), and said: training
            print(f"note: {split_dir}: empty split", file=sys.stderr)   # refuses an evaluation
            #                                                             it cannot serve
        for p in files:
            n += 1
            lay, probs = check_file(p, scan_data)
            problems += probs
            if lay is not None and not probs:
                layouts.append(lay)
    if layouts:
        problems += _check_consistency(layouts)
        problems += check_stats(os.path.join(path, "stats.yaml"), layouts[0])
    return n, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsfm.data.check",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", metavar="PATH")
    ap.add_argument("--no-data", action="store_true",
                    help="check the layout only, skip scanning field data for NaN/Inf")
    args = ap.parse_args(argv)
    READ_PATHS.clear()
    n_files, problems = 0, []
    for path in args.paths:
        if os.path.isdir(path):
            k, probs = check_directory(path, not args.no_data)
        elif os.path.exists(path):
            k, probs = 1, check_file(path, not args.no_data)[1]
        else:
            k, probs = 0, [f"{path}: no such file or directory"]
        n_files += k
        problems += probs
    for line in problems:
        print(line)
    slow = [(p, a, why) for p, a, why in READ_PATHS if why]
    if READ_PATHS:
        print(f"read path: {len(READ_PATHS) - len(slow)} of {len(READ_PATHS)} time-varying "
              "arrays take positioned reads" + ("; through the HDF5 library (slower):" if slow
                                                else ""), file=sys.stderr)
        for p, a, why in slow[:8]:
            print(f"  {p}: /{a}: {why}", file=sys.stderr)
        if len(slow) > 8:
            print(f"  ... and {len(slow) - 8} more", file=sys.stderr)
        why = native.why_unavailable()
        print("readers: " + (
            "the C kernel reads each batch (CPU training: and normalizes it)" if why is None
            else f"Python reads window by window, NumPy normalizes (C kernel: {why})"),
            file=sys.stderr)
    status = f"{len(problems)} problem(s)" if problems else "valid"
    print(f"checked {n_files} file(s): {status}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
