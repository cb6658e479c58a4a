"""One frame of every channel of every dataset under a base directory, as a PNG:
`python -m dsfm.sim.preview BASE --out frames.png [--split train] [--time -1]`."""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from dsfm.data.well import WellDataset  # noqa: E402
from dsfm.errors import DsfmError, first_line  # noqa: E402
from dsfm.helpfmt import HelpFormatter


def frames(base: str, split: str = "train", time_index: int = -1) -> list[tuple]:
    """(dataset, file, channel names, fields [*spatial, C] of saved step `time_index` of the
    file's first trajectory, its time) for every dataset under `base`."""
    if not os.path.isdir(base):
        raise ValueError(f"{base}: not a directory (give the base directory that holds the "
                         "datasets, the --out of python -m dsfm.sim)")
    names = sorted(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d,
                                                                             "stats.yaml")))
    if not names:
        raise ValueError(f"{base}: no dataset here (a folder holding stats.yaml); make some with "
                         f"python -m dsfm.sim --out {base}")
    rows = []
    for name in names:
        ds = WellDataset(path=os.path.join(base, name), well_split_name=split,
                         full_trajectory_mode=True)
        item = ds[0]
        # the whole trajectory: its first saved step is the window's input, the rest its output
        fields = torch.cat([item["input_fields"], item["output_fields"]])
        times = torch.cat([item["input_time_grid"], item["output_time_grid"]])
        if not -len(times) <= time_index < len(times):
            ds.close()
            raise ValueError(f"--time {time_index}: {name} has saved steps 0 to "
                             f"{len(times) - 1}")
        channels = [c for order in ds.field_names.values() for c in order]
        rows.append((name, ds.files_paths[0], channels, fields[time_index],
                     float(times[time_index])))
        ds.close()
    return rows


def preview(base: str, out: str, split: str = "train", time_index: int = -1) -> str:
    rows = frames(base, split, time_index)
    n_cols = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.6 * n_cols, 2.6 * len(rows)),
                             squeeze=False)
    for r, (name, path, channels, fields, t) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(channels):
                ax.axis("off")
                continue
            im = ax.imshow(fields[..., c].T.numpy(), origin="lower", cmap="RdBu_r"
                           if fields[..., c].min() < 0 < fields[..., c].max() else "viridis")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(channels[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{name}\n{os.path.basename(path)[len(name) + 1:-5]}\nt={t:g}",
                              fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsfm.sim.preview", description=__doc__,
                                 formatter_class=HelpFormatter)
    ap.add_argument("base")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--time", type=int, default=-1,
                    help="saved step to show, from 0 (default: -1, the last)")
    args = ap.parse_args(argv)
    try:
        print(preview(args.base, args.out, args.split, args.time))
    except (ValueError, DsfmError) as exc:       # e.g. a split with no files: EmptySplitError
        print(f"error: {first_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:                       # the image cannot be written
        print(f"error: --out {args.out}: cannot write it ({exc.strerror or exc})",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
