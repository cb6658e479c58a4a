"""Generate physics datasets: `python -m dsfm.sim --preset demo --out BASE`.

Writes `BASE/<dataset>/data/{train,valid,test}/*.hdf5` and `BASE/<dataset>/stats.yaml` in The
Well's format for each simulator of the preset (or, with `--format pdebench`, the same physics
in PDEBench's layouts under `BASE/pdebench/<kind>/`, with each folder's stats.yaml).
Deterministic given `--seed`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
import time

from dsfm.errors import DsfmError
from dsfm.helpfmt import HelpFormatter
from dsfm.sim.presets import PRESETS


def select_specs(preset: str, datasets: list[str] | None, mach: list[float] | None,
                 splits: tuple[int, int, int] | None = None) -> dict:
    specs = dict(PRESETS[preset])
    if datasets:
        unknown = [d for d in datasets if d not in specs]
        if unknown:
            raise SystemExit(f"error: unknown dataset {unknown[0]!r}; choose from "
                             f"{', '.join(specs)}")
        specs = {k: specs[k] for k in datasets}
    if mach is not None:
        if "euler" not in specs:
            raise SystemExit("error: --mach sets the Mach numbers of the euler dataset, which "
                             "--datasets leaves out")
        bad = [m for m in mach if not (math.isfinite(m) and m >= 0)]
        if bad:
            raise SystemExit(f"error: --mach {bad[0]!r}: a Mach number is finite and at least 0")
        specs["euler"] = dataclasses.replace(
            specs["euler"], parameter_sets=[{"mach": float(m)} for m in mach])
    if splits is not None:
        specs = {k: dataclasses.replace(v, splits=splits) for k, v in specs.items()}
    from dsfm.sim.build import file_stem
    for spec in specs.values():      # one file per parameter set: two sets of one name collide
        stems = [file_stem(spec.dataset_name, p) for p in spec.parameter_sets]
        dup = next((s for s in stems if stems.count(s) > 1), None)
        if dup is not None:
            raise SystemExit(f"error: two parameter sets of {spec.dataset_name} would both be "
                             f"written as {dup}.hdf5; give distinct values")
    return specs


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number, at least 0")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number, at least 1")
    return value


def parse_splits(text: str) -> tuple[int, int, int]:
    """`--splits 8,1,1`: trajectories per parameter set for train, valid and test."""
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        counts = ()
    if len(counts) != 3 or min(counts) < 0 or counts[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: three counts TRAIN,VALID,TEST, "
                                         "train at least 1 (e.g. 8,1,1)")
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsfm.sim", description=__doc__.split("\n")[0],
                                 formatter_class=HelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--out", required=True,
                    help="base directory (datasets go in BASE/<name>; with --format pdebench, "
                    "the files go in BASE/pdebench/<kind>/)")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--datasets", type=lambda s: [x for x in s.split(",") if x],
                    help=f"comma-separated subset of {', '.join(PRESETS['demo'])}")
    ap.add_argument("--mach", type=float, nargs="+",
                    help="Mach numbers of the Euler dataset, one file each (e.g. 0.1 1.0)")
    ap.add_argument("--splits", type=parse_splits, default=None, metavar="TRAIN,VALID,TEST",
                    help="trajectories per parameter set, instead of the preset's (a quicker, "
                    "smaller dataset of the same physics and grid)")
    ap.add_argument("--format", choices=("well", "pdebench"), default="well")
    ap.add_argument("--workers", type=positive_int, default=None,
                    help="simulation processes (default: one per core)")
    ap.add_argument("--overwrite", action="store_true", help="regenerate existing datasets")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.datasets == []:
        ap.error("argument --datasets: no dataset named")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"error: --out {args.out}: exists and is not a directory", file=sys.stderr)
        return 1

    specs = select_specs(args.preset, args.datasets, args.mach, args.splits)
    try:        # before simulating: an --out that cannot be made fails now, in one line
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        print(f"error: --out {args.out}: cannot create it ({exc.strerror or exc}); choose a "
              "directory this process may write to", file=sys.stderr)
        return 1
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # SIGTERM (a job's time limit, `timeout`) unwinds like Ctrl-C: the build's cleanup removes
        # its temporary directories and stops its worker processes
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    start = time.perf_counter()
    try:
        if args.format == "well":
            from dsfm.sim.build import build
            written = build(specs, args.out, seed=args.seed, workers=args.workers,
                            overwrite=args.overwrite, progress=not args.quiet)
        else:
            from dsfm.data.pdebench import write_pdebench_stats
            from dsfm.sim.export import export_pdebench
            written = export_pdebench(specs, os.path.join(args.out, "pdebench"), seed=args.seed,
                                      progress=not args.quiet)
            for directory in written:        # each folder one source: its stats.yaml
                write_pdebench_stats(directory)
    except KeyboardInterrupt:           # the build has removed its temporary directories
        print("interrupted: nothing written for the datasets not yet finished",
              file=sys.stderr)
        return 130
    except DsfmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:              # a full disk, a file where a dataset's folder goes
        path = getattr(exc, "filename2", None) or exc.filename    # a rename names its target
        where = f" {path}" if path else ""
        print(f"error: --out {args.out}: cannot write{where} ({exc.strerror or exc}); nothing "
              "written for the datasets not yet finished", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(f"wrote {len(written)} dataset(s) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
