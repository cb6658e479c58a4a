"""Time dataset generation: `python -m perf.sim_bench --preset demo [--json FILE]`.

Runs `dsfm.sim`'s builder on a fresh directory, once per dataset with one process (the cost of
each simulator) and once for the whole preset with every core (what a user waits for), and prints
a table: seconds, trajectories, MB written, and MB/s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from dsfm.helpfmt import HelpFormatter
from dsfm.sim.build import build
from dsfm.sim.presets import PRESETS
from perf.cli import positive_int
from perf.report import write_json


def _size_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e6


def run(preset: str, workers: int | None) -> list[dict]:
    specs = PRESETS[preset]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, spec in specs.items():
            out = os.path.join(tmp, "one")
            t0 = time.perf_counter()
            build({key: spec}, out, workers=1, progress=False)
            dt = time.perf_counter() - t0
            rows.append({"dataset": spec.dataset_name, "workers": 1, "seconds": dt,
                         "trajectories": sum(spec.splits) * len(spec.parameter_sets),
                         "grid": f"{spec.n}x{spec.n}", "steps": spec.n_steps,
                         "mb": _size_mb(out)})
            shutil.rmtree(out)
        out = os.path.join(tmp, "all")
        n = workers or os.cpu_count() or 1
        t0 = time.perf_counter()
        build(specs, out, workers=n, progress=False)
        dt = time.perf_counter() - t0
        rows.append({"dataset": f"all ({preset})", "workers": n, "seconds": dt,
                     "trajectories": sum(r["trajectories"] for r in rows), "grid": "-",
                     "steps": "-", "mb": _size_mb(out)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="python -m perf.sim_bench",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    ap.add_argument("--workers", type=positive_int, default=None,
                    help="processes for the whole preset (default: one per core)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    rows = run(args.preset, args.workers)
    print(f"{'dataset':32s} {'grid':>8s} {'steps':>5s} {'traj':>5s} {'workers':>7s} "
          f"{'seconds':>8s} {'MB':>7s} {'MB/s':>6s}")
    for r in rows:
        print(f"{r['dataset']:32s} {r['grid']:>8s} {str(r['steps']):>5s} {r['trajectories']:5d} "
              f"{r['workers']:7d} {r['seconds']:8.2f} {r['mb']:7.1f} {r['mb'] / r['seconds']:6.1f}")
    if args.json:
        write_json(args.json, {"preset": args.preset, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
