"""python -m dsfm.runtime.export RUN_DIR [--tag stepNNNNNNNN] [--out FILE]

Consolidates a run's checkpoint (ZeRO partitions of any stage and world size, or a checkpoint
without ZeRO) into one fp32 state dict with the model shape and field vocabulary beside it: what
`train.init_from` loads to fine-tune, and what an inference script needs. Runs on CPU, no
process group needed.
"""

from __future__ import annotations

import argparse
import os
import sys

from dsfm.errors import DsfmError
from dsfm.helpfmt import HelpFormatter
from dsfm.runtime.checkpoint import export_fp32, run_dir_of, split_tag_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsfm.runtime.export",
                                 formatter_class=HelpFormatter,
                                 description=__doc__.split("\n\n")[1])
    ap.add_argument("run_dir", help="run directory (or its checkpoints/ folder, or one "
                    "checkpoint's folder: that checkpoint)")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    ap.add_argument("--out", default=None, help="output file (default RUN_DIR/export/"
                    "model_fp32.pt)")
    args = ap.parse_args(argv)
    # given its checkpoints/ folder, the export goes beside it, where train.init_from=RUN_DIR
    # looks (it was written to checkpoints/export/, which nothing reads)
    try:
        source, tag = split_tag_dir(args.run_dir, args.tag)
        out = args.out or os.path.join(run_dir_of(source), "export", "model_fp32.pt")
        tag = export_fp32(source, out, tag)
    except DsfmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({tag})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
