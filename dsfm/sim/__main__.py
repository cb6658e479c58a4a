"""Generate physics datasets: `python -m dsfm.sim --preset demo --out BASE`.

Writes `BASE/<dataset>/data/{train,valid,test}/*.hdf5` and `BASE/<dataset>/stats.yaml` in The
Well's format for each simulator of the preset (or, with `--format pdebench`, the same physics
in PDEBench's layouts under `BASE/pdebench/<kind>/`, with each folder's stats.yaml).
Deterministic given `--seed`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from dsfm.errors import DsfmError
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
    if mach is not None and "euler" in specs:
        specs["euler"] = dataclasses.replace(
            specs["euler"], parameter_sets=[{"mach": float(m)} for m in mach])
    if splits is not None:
        specs = {k: dataclasses.replace(v, splits=splits) for k, v in specs.items()}
    return specs


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
    ap = argparse.ArgumentParser(prog="python -m dsfm.sim", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--out", required=True, help="base directory (datasets go in BASE/<name>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--datasets", type=lambda s: [x for x in s.split(",") if x],
                    help=f"comma-separated subset of {', '.join(PRESETS['demo'])}")
    ap.add_argument("--mach", type=float, nargs="+",
                    help="Mach numbers of the Euler dataset, one file each (e.g. 0.1 1.0)")
    ap.add_argument("--splits", type=parse_splits, default=None, metavar="TRAIN,VALID,TEST",
                    help="trajectories per parameter set, instead of the preset's (a quicker, "
                    "smaller dataset of the same physics and grid)")
    ap.add_argument("--format", choices=("well", "pdebench"), default="well")
    ap.add_argument("--workers", type=int, default=None,
                    help="simulation processes (default: one per core)")
    ap.add_argument("--overwrite", action="store_true", help="regenerate existing datasets")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    specs = select_specs(args.preset, args.datasets, args.mach, args.splits)
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
    except DsfmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(f"wrote {len(written)} dataset(s) in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
