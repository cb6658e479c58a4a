"""The main job: `deepspeed dsfm/train.py --ds_config ds_configs/zero2.json`.

With no data given, it makes sure the embedded `demo` datasets exist (generating them once, under
a file lock so that every rank of a multi-process launch finds them complete) and reports what it
found. Pretraining the AViT under DeepSpeed lands with issue 4; until then the run stops after
the data step.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys

if __package__ in (None, ""):      # run as a script (deepspeed dsfm/train.py): make dsfm importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsfm.data.index import SPLITS  # noqa: E402
from dsfm.data.well import WellDataset  # noqa: E402
from dsfm.errors import DsfmError  # noqa: E402

DEFAULT_DATA = os.environ.get("DSFM_DATA", os.path.join("data", "demo"))


def datasets_in(base: str) -> list[str]:
    return sorted(d for d in os.listdir(base)
                  if os.path.isfile(os.path.join(base, d, "stats.yaml")))


def ensure_demo_data(base: str, rank: int) -> list[str]:
    """Generate the demo datasets under `base` if it holds no dataset; safe with concurrent
    ranks (the first takes a file lock and generates, the others wait and find them)."""
    from dsfm.sim.build import build
    from dsfm.sim.presets import PRESETS

    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, ".generate.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not datasets_in(base):
            build(PRESETS["demo"], base, progress=rank == 0)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return datasets_in(base)


def describe(base: str, name: str) -> str:
    parts = []
    for split in SPLITS:
        ds = WellDataset(path=os.path.join(base, name), well_split_name=split, n_steps_input=4,
                         n_steps_output=1)
        parts.append(f"{split} {sum(ds.n_trajectories_per_file)} traj/{len(ds)} windows")
        fields = [c for order in ds.field_names.values() for c in order]
        res = "×".join(map(str, ds.size_tuple))
        ds.close()
    return f"{name:32s} {res:>8s}  {len(fields)} ch ({', '.join(fields)})  " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ds_config", required=True, help="DeepSpeed JSON config")
    ap.add_argument("--data-dir", default=DEFAULT_DATA,
                    help=f"Well base directory (default {DEFAULT_DATA}; demo data is generated "
                         "there if missing)")
    ap.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    try:
        with open(args.ds_config) as fh:
            ds_config = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"error: --ds_config {args.ds_config}: {exc}", file=sys.stderr)
        return 2
    try:
        names = ensure_demo_data(args.data_dir, rank)
        if rank == 0:
            print(f"data: {args.data_dir} ({len(names)} datasets)")
            for name in names:
                print("  " + describe(args.data_dir, name))
            zero = ds_config.get("zero_optimization", {}).get("stage", 0)
            print(f"deepspeed config: {args.ds_config} (ZeRO stage {zero}, micro-batch "
                  f"{ds_config.get('train_micro_batch_size_per_gpu')})")
            print("training: not implemented yet (issue 4); stopping after the data step")
    except DsfmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
