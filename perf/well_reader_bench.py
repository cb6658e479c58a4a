"""Per-sample cost of dsfm's WellDataset against upstream the_well's, single process:
`python -m perf.well_reader_bench --base BASE [--json FILE]`.

For each dataset under BASE, both readers serve the same windows (4 input + 1 output steps,
z-score normalization) in the same shuffled order after one warm-up pass over the files (page
cache warm for both). Prints samples/s, MB/s of field data and the ratio. The loader benchmark
with worker processes and batches is `perf.loader_bench` (issue 3).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from dsfm.data import WellDataset
from dsfm.data.index import SPLITS
from dsfm.helpfmt import HelpFormatter
from perf.cli import non_negative_int, positive_int, well_datasets
from perf.report import write_json


def _time(ds, order) -> tuple[float, int]:
    nbytes = 0
    t0 = time.perf_counter()
    for i in order:
        item = ds[int(i)]
        nbytes += item["input_fields"].nbytes + item["output_fields"].nbytes
    return time.perf_counter() - t0, nbytes


def bench(paths: list[str], split: str, n_items: int, seed: int) -> list[dict]:
    from the_well.data import WellDataset as UpstreamWellDataset
    from the_well.data.normalization import ZScoreNormalization

    rows = []
    for path in paths:
        name = os.path.basename(path)
        kw = dict(path=path, well_split_name=split, n_steps_input=4,
                  n_steps_output=1, use_normalization=True)
        ours = WellDataset(normalization_type="zscore", **kw)
        theirs = UpstreamWellDataset(normalization_type=ZScoreNormalization, **kw)
        order = np.random.default_rng(seed).permutation(len(ours))[:n_items]
        _time(ours, order[:20])
        _time(theirs, order[:20])
        t_up, nbytes = _time(theirs, order)
        t_ours, _ = _time(ours, order)
        shape = tuple(ours[0]["input_fields"].shape)
        rows.append({"dataset": name, "window": shape, "items": len(order),
                     "upstream_per_s": len(order) / t_up, "dsfm_per_s": len(order) / t_ours,
                     "upstream_mb_s": nbytes / t_up / 1e6, "dsfm_mb_s": nbytes / t_ours / 1e6,
                     "speedup": t_up / t_ours})
        ours.close()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.well_reader_bench",
                                 formatter_class=HelpFormatter,
                                 description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--base", required=True, help="Well base directory (e.g. from dsfm.sim)")
    ap.add_argument("--split", choices=SPLITS, default="train")
    ap.add_argument("--items", type=positive_int, default=400,
                    help="windows per dataset and reader")
    ap.add_argument("--seed", type=non_negative_int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = bench(well_datasets(ap, args.base, None), args.split, args.items, args.seed)
    print(f"{'dataset':32s} {'input window':>18s} {'upstream/s':>10s} {'dsfm/s':>8s} "
          f"{'up MB/s':>8s} {'dsfm MB/s':>9s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['dataset']:32s} {str(r['window']):>18s} {r['upstream_per_s']:10.0f} "
              f"{r['dsfm_per_s']:8.0f} {r['upstream_mb_s']:8.1f} {r['dsfm_mb_s']:9.1f} "
              f"{r['speedup']:5.1f}x")
    if args.json:
        write_json(args.json, {"base": args.base, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
