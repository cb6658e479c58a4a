"""Argument checks shared by the benchmarks: a bad value is one argparse error (exit 2) naming
the option, before any data is read, process started or process group joined."""

from __future__ import annotations

import argparse
import os


def _number(text: str, kind, least: float, strict: bool, what: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value != value or (value <= least if strict else value < least):
        raise argparse.ArgumentTypeError(f"{text!r}: {what}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, 1, False, "a whole number, at least 1")


def non_negative_int(text: str) -> int:
    return _number(text, int, 0, False, "a whole number, at least 0")


def positive_float(text: str) -> float:
    return _number(text, float, 0.0, True, "a number greater than 0")


def avit_size(text: str) -> str:
    """One of the AViT's published sizes (Ti, S, B, L; any case), spelled as the model's."""
    from dsfm.models.avit import SIZES

    for size in SIZES:
        if size.lower() == text.lower():
            return size
    raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(SIZES)}")


def well_datasets(ap: argparse.ArgumentParser, base: str, names: list[str] | None) -> list[str]:
    """Paths of the Well datasets `names` (under `base`, or paths) or of all those under
    `base` when None: each a directory with a stats.yaml, as `python -m dsfm.sim` writes;
    else `ap.error`."""
    if names is None:
        if not os.path.isdir(base):
            ap.error(f"--base {base}: not a directory (make one with python -m dsfm.sim "
                     f"--preset demo --out {base})")
        names = sorted(d for d in os.listdir(base)
                       if os.path.isfile(os.path.join(base, d, "stats.yaml")))
        if not names:
            ap.error(f"--base {base}: no Well dataset in it (a directory with a stats.yaml; "
                     f"python -m dsfm.sim --preset demo --out {base} makes four)")
    paths = [n if os.path.isabs(n) or os.sep in n else os.path.join(base, n) for n in names]
    missing = [p for p in paths if not os.path.isfile(os.path.join(p, "stats.yaml"))]
    if missing:
        ap.error(f"--datasets: no Well dataset at {', '.join(missing)} (a directory with a "
                 "stats.yaml)")
    return paths
