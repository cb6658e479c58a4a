"""One frame of every channel of every dataset under a base directory, as a PNG:
`python -m dsfm.sim.preview BASE --out frames.png [--split train] [--time -1]`."""

from __future__ import annotations

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dsfm.data.well import WellDataset  # noqa: E402


def preview(base: str, out: str, split: str = "train", time_index: int = -1) -> str:
    names = sorted(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d,
                                                                             "stats.yaml")))
    rows = []
    for name in names:
        ds = WellDataset(path=os.path.join(base, name), well_split_name=split,
                         full_trajectory_mode=True)
        item = ds[0]
        frames = item["output_fields"][time_index]
        channels = [c for order in ds.field_names.values() for c in order]
        t = float(item["output_time_grid"][time_index])
        rows.append((name, ds.files_paths[0], channels, frames, t))
        ds.close()
    n_cols = max(len(r[2]) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.6 * n_cols, 2.6 * len(rows)),
                             squeeze=False)
    for r, (name, path, channels, frames, t) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(channels):
                ax.axis("off")
                continue
            im = ax.imshow(frames[..., c].T.numpy(), origin="lower", cmap="RdBu_r"
                           if frames[..., c].min() < 0 < frames[..., c].max() else "viridis")
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
    ap = argparse.ArgumentParser(prog="python -m dsfm.sim.preview", description=__doc__)
    ap.add_argument("base")
    ap.add_argument("--out", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--time", type=int, default=-1, help="saved step to show (default: last)")
    args = ap.parse_args(argv)
    print(preview(args.base, args.out, args.split, args.time))
    return 0


if __name__ == "__main__":
    sys.exit(main())
