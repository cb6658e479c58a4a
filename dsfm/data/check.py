"""Validate Well-format files and dataset directories: `python -m dsfm.data.check PATH...`.

PATH may be an HDF5 file, a directory of HDF5 files, a dataset directory
(`<dataset>/data/{train,valid,test}/*.hdf5` and `<dataset>/stats.yaml`) or a directory of datasets.
A file in none of The Well's layout and in one of PDEBench's is checked as PDEBenchDataset reads
it (`check_pdebench_file`), a directory of them as one source.
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

from dsfm.data import native
from dsfm.data.handles import why_not_direct
from dsfm.data.index import SPLITS, list_hdf5
from dsfm.data.pdebench_format import (
    FIELDS,
    PDEBenchFile,
    detect_kind,
    force_mismatch,
    inspect_pdebench,
    stats_file,
    trajectory_groups,
    unsupported,
)
from dsfm.data.stats import KEYS, load_stats, time_blocks
from dsfm.data.well_format import (
    GROUPS,
    ROOT_ATTRS,
    FieldLayout,
    FileLayout,
    channel_clash,
    inspect_file,
    layout_mismatch,
    open_h5,
)
from dsfm.errors import ConfigError, CorruptFileError, DataError, DsfmError, StatsError
from dsfm.helpfmt import HelpFormatter


def _count_nonfinite(dset, lead: tuple, time_varying: bool):
    """(how many, (index of the first, "NaN" or "Inf") or None) of dset[lead] (one trajectory
    of an array, or all of it), read a few time steps at a time (`stats.time_blocks`)."""
    if time_varying:
        frame = int(np.prod(dset.shape[len(lead) + 1:], dtype=np.int64))
        blocks = [lead + (slice(a, b),) for a, b in time_blocks(dset.shape[len(lead)], frame)]
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
            if time_varying:
                idx[0] += block[-1].start
            first = (idx, kind)
        count += n
    return count, first


def _scan_finite(f, lay: FileLayout) -> list[str]:
    """The first non-finite value of each field, if any, and how many its trajectory holds."""
    problems = []
    for fl in lay.fields:
        dset = f[fl.path]
        for i in range(lay.n_trajectories) if fl.sample_varying else [None]:
            lead = () if i is None else (i,)
            count, first = _count_nonfinite(dset, lead, fl.time_varying)
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


def _pdebench_arrays(f, pf: PDEBenchFile):
    """(array, trajectory, dataset, index of the trajectory in it) of each trajectory of each
    time-varying array of a PDEBench file."""
    if pf.groups:
        for i, g in enumerate(pf.groups):
            yield f"{g}/data", i, f[g]["data"], ()
        return
    for name in ("velocity", "particles") if pf.kind == "incomp_ns" else FIELDS[pf.kind]:
        for i in range(pf.n_trajectories):
            yield name, i, f[name], (i,)


def is_pdebench(f, path: str) -> bool:
    """Whether a file is in none of The Well's layout and in one of PDEBench's (read or not)."""
    if any(a in f.attrs for a in ROOT_ATTRS) or any(g in f for g in GROUPS):
        return False
    try:
        groups = trajectory_groups(f, path)
        if unsupported(f, path, groups):
            return True
        if len(set(f.keys()) & set(FIELDS["comp_ns"])) >= 2:
            return True         # a 2D CFD file, whole or not: its problems are PDEBench's
        detect_kind(f, path, groups)
    except CorruptFileError:
        return True             # a damaged member of a file in no Well layout: said as such
    except DataError:
        return False
    return True


def check_pdebench_file(f, path: str, scan_data: bool = True
                        ) -> tuple[PDEBenchFile | None, list[str]]:
    """Problems of a PDEBench file, as PDEBenchDataset sees them (layout, coordinates), and
    NaN/Inf (unless scan_data is False), the first per array with its trajectory and time."""
    try:
        pf = inspect_pdebench(path)
    except (DataError, ConfigError) as exc:
        return None, [str(exc)]
    problems: dict[str, str] = {}               # per array, its first trajectory with NaN/Inf
    for name, i, dset, lead in _pdebench_arrays(f, pf):
        if lead in ((), (0,)):
            READ_PATHS.append((path, name, why_not_direct(dset)))
        if not scan_data or name in problems:
            continue
        try:
            count, first = _count_nonfinite(dset, lead, True)
        except (OSError, KeyError, RuntimeError) as exc:
            problems[name] = (f"{path}: /{name}: reading trajectory {i} failed "
                              f"({str(exc).splitlines()[0]}); the file is damaged")
            continue
        if first is not None:
            problems[name] = (f"{path}: /{name}: {count} non-finite values, first {first[1]} at "
                              f"trajectory {i}, time index {int(first[0][0])}")
    return pf, list(problems.values())


def check_file(path: str, scan_data: bool = True
               ) -> tuple[FileLayout | PDEBenchFile | None, list[str]]:
    """Problems of one file (schema, and NaN/Inf unless scan_data is False): a Well file, or a
    PDEBench one (`check_pdebench_file`)."""
    try:
        f = open_h5(path)
    except (CorruptFileError, FileNotFoundError) as exc:
        return None, [str(exc) if isinstance(exc, DsfmError) else f"{path}: not found"]
    with f:
        try:
            if is_pdebench(f, path):
                return check_pdebench_file(f, path, scan_data)
            layout, problems = inspect_file(f, path)
            clash = channel_clash(layout) if layout is not None and not problems else None
            problems += [clash] if clash else []
            if layout is not None and scan_data and not problems:
                problems += _scan_finite(f, layout)
            if layout is not None and not problems:
                READ_PATHS.extend((path, fl.path, why_not_direct(f[fl.path]))
                                  for fl in layout.variable_fields)
        except (OSError, KeyError) as exc:
            return None, [f"{path}: unreadable while checking ({exc}); the file is damaged"]
    return layout, problems


def _check_consistency(layouts: list) -> list[str]:
    """Well files of one dataset must agree on their layout, and a folder holds one format
    (`_check_pdebench_folder` for PDEBench files)."""
    pdebench = [lay for lay in layouts if isinstance(lay, PDEBenchFile)]
    if pdebench and len(pdebench) < len(layouts):
        well = next(lay for lay in layouts if not isinstance(lay, PDEBenchFile))
        return [f"{pdebench[0].path}: a PDEBench file beside The Well's {well.path}: a folder "
                "is one dataset, of one format"]
    if pdebench:
        return [line for pf in pdebench[1:] if (line := force_mismatch(pdebench[0], pf))]
    problems = []
    first = layouts[0]
    for lay in layouts[1:]:
        if lay.signature() != first.signature():
            problems.append(layout_mismatch(first, lay))
    return problems


def _check_pdebench_folder(path: str, files: list[PDEBenchFile]) -> list[str]:
    """A folder of PDEBench files is one source, with its stats.yaml, when they agree on layout
    and grid; files that do not (PDEBench's 2D_Train_Rand holds CFD at 128² and 512²) can only
    be sources of their own (a wildcard per grid in data.pdebench), each with its
    <stem>.stats.yaml: said on stderr, as is a missing statistics file."""
    first = files[0]
    other = next((pf for pf in files if (pf.kind, pf.spatial_shape) !=
                  (first.kind, first.spatial_shape)), None)
    if other is None and (os.path.isfile(stats_file(path)) or
                          not all(os.path.isfile(stats_file(pf.path)) for pf in files)):
        return _pdebench_stats(path, first)
    if other is not None:
        print(f"note: {path}: {first.kind} at {first.spatial_shape} "
              f"({os.path.basename(first.path)}) and {other.kind} at {other.spatial_shape} "
              f"({os.path.basename(other.path)}): not one source; each file can be one (a "
              "wildcard per grid in data.pdebench)", file=sys.stderr)
    return [line for pf in files for line in _pdebench_stats(pf.path, pf)]


def _pdebench_stats(source: str, pf: PDEBenchFile) -> list[str]:
    """A PDEBench source's statistics file, if it has one (normalization needs it)."""
    path = stats_file(source)
    if not os.path.isfile(path):
        print(f"note: {path}: missing; normalization needs it (dsfm.data.pdebench."
              f"write_pdebench_stats({source!r}))", file=sys.stderr)
        return []
    fields = [FieldLayout(n, 0, True, True, (True, True), (), (n,)) for n in FIELDS[pf.kind]]
    return _check_stats_fields(path, fields, 2)


def check_stats(path: str, layout: FileLayout) -> list[str]:
    """stats.yaml must hold mean/std/rms for every field and *_delta for time-varying ones,
    each a number, a D-list or a D×D list as the tensor order says."""
    if not os.path.isfile(path):
        return [f"{path}: missing (normalization needs mean, std, rms and *_delta per field)"]
    return _check_stats_fields(path, layout.fields, layout.n_spatial_dims)


def _check_stats_fields(path: str, fields: list[FieldLayout], n_spatial_dims: int) -> list[str]:
    try:
        stats = load_stats(path)          # the loader's reading, and its one-line problems
    except StatsError as exc:
        return [str(exc)]
    problems = []
    for key in KEYS:
        table = stats.get(key)
        if not isinstance(table, dict):
            problems.append(f"{path}: key '{key}' is missing")
            continue
        for fl in fields:
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
            want = (n_spatial_dims,) * fl.order
            if value.shape != want:
                problems.append(f"{path}: '{key}.{fl.name}' has shape {list(value.shape)}, "
                                f"expected {list(want)} for a t{fl.order} field")
            elif not np.isfinite(value).all():
                problems.append(f"{path}: '{key}.{fl.name}' is not finite")
            elif key.startswith(("std", "rms")) and (value < 0).any():
                problems.append(f"{path}: '{key}.{fl.name}' is negative")
    return problems


def check_directory(path: str, scan_data: bool = True, depth: int = 2) -> tuple[int, list[str]]:
    """Check a plain directory of HDF5 files, a dataset directory or a directory of datasets,
    and folders of HDF5 files under it up to `depth` levels down (PDEBench's, as `dsfm.sim
    --format pdebench` writes them)."""
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
            if all(isinstance(lay, PDEBenchFile) for lay in layouts) and not problems:
                problems += _check_pdebench_folder(path, layouts)
        return len(files), problems
    names = sorted(d for d in os.listdir(path) if not d.startswith(".")   # .<name>.partial-PID
                   and os.path.isdir(os.path.join(path, d)))
    subs = [d for d in names if os.path.isdir(os.path.join(path, d, "data"))]
    # folders of HDF5 files beside them, one or two levels down: `dsfm.sim --format pdebench`
    # writes BASE/pdebench/<kind>/, which was "no HDF5 files and no dataset directories"
    folders = [d for d in names if d not in subs and _holds_hdf5(os.path.join(path, d), depth)]
    if not subs and not folders:
        return 0, [f"{path}: no HDF5 files and no dataset directories (<name>/data/<split>/)"]
    n, problems = 0, []
    for d in subs:
        k, probs = check_dataset(os.path.join(path, d), scan_data)
        n += k
        problems += probs
    for d in folders:
        k, probs = check_directory(os.path.join(path, d), scan_data, depth - 1)
        n += k
        problems += probs
    return n, problems


def _holds_hdf5(path: str, depth: int) -> bool:
    """Whether `path` holds HDF5 files, or (`depth` > 1) a folder of its own does."""
    if depth < 1:
        return False
    if list_hdf5(path):
        return True
    try:
        names = [d for d in os.listdir(path) if not d.startswith(".")]
    except OSError:
        return False
    return any(os.path.isdir(os.path.join(path, d)) and _holds_hdf5(os.path.join(path, d),
                                                                    depth - 1) for d in names)


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
            #                 refuses an evaluation it cannot serve
            print(f"note: {split_dir}: empty split"
                  + ("; training evaluates on the valid split: train with "
                     "--set train.eval_batches=0" if split == "valid" else ""), file=sys.stderr)
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
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="python -m dsfm.data.check",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", metavar="PATH",
                    help="Well files, folders of them, dataset directories, directories of "
                    "datasets; PDEBench files, or a folder of them as one source")
    ap.add_argument("--no-data", action="store_true",
                    help="check the layout only, skip scanning field data for NaN/Inf")
    args = ap.parse_args(argv)
    READ_PATHS.clear()
    n_files, problems = 0, []
    for path in args.paths:
        if os.path.isdir(path):
            k, probs = check_directory(path, not args.no_data)
        elif os.path.exists(path):
            lay, probs = check_file(path, not args.no_data)
            if isinstance(lay, PDEBenchFile) and not probs:
                probs = _pdebench_stats(path, lay)
            k = 1
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
