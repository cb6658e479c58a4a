"""Which datasets a run reads: names or paths from the run config, generated when asked."""

from __future__ import annotations

import fcntl
import glob
import os

from dsfm.errors import ConfigError


def datasets_in(base: str, complete: bool = False) -> list[str]:
    """Names of the Well datasets directly under `base`: directories with a `data/` folder or
    a stats.yaml, hidden ones aside (one without stats.yaml is listed, so that the loader
    says what it lacks rather than the mixture leaving it out); `complete`: only those with
    both (what a finished simulation leaves)."""
    if not os.path.isdir(base):
        return []
    found = []
    for d in sorted(os.listdir(base)):
        if d.startswith("."):            # a build's .<name>.partial-PID, never a dataset
            continue
        marks = [os.path.exists(os.path.join(base, d, m)) for m in ("data", "stats.yaml")]
        if all(marks) if complete else any(marks):
            found.append(d)
    return found


def generate_if_missing(base: str, preset: str, progress: bool = False) -> None:
    """Simulate `preset` into `base` unless it already holds datasets; safe with concurrent
    ranks (the first takes a file lock and generates, the others wait and then find them)."""
    from dsfm.sim.build import build
    from dsfm.sim.presets import PRESETS

    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, ".generate.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not datasets_in(base, complete=True):
                build(PRESETS[preset], base, progress=progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def expand_patterns(entries: list[str]) -> tuple[list[str], list[str]]:
    """PDEBench entries with a wildcard (`2D_Train_Rand/*_128_*.hdf5`: one resolution of a
    folder that holds two) expand to their files, in order, each its own source, as MPP makes
    each file of such a folder a dataset; (paths, patterns that matched nothing)."""
    out, unmatched = [], []
    for entry in entries:
        if any(c in entry for c in "*?["):    # HDF5 files only: not their .stats.yaml
            found = sorted(f for f in glob.glob(entry)
                           if f.endswith((".h5", ".hdf5")) or os.path.isdir(f))
            out += found
            unmatched += [] if found else [f"{entry} (matches no file)"]
        else:
            out.append(entry)
    return out, unmatched


def _where_to_get(missing: list[str], base: str) -> str:
    """Where missing data is looked for and how to get it: dsfm's simulators make only their
    own datasets; The Well's and PDEBench's are downloaded. data.base is named only for what
    was looked for under it (data.datasets by name): PDEBench sources and datasets given as
    paths are taken as given."""
    from dsfm.sim.presets import PRESETS

    simulated = {spec.dataset_name for preset in PRESETS.values() for spec in preset.values()}
    under = [p for p in missing if os.path.normpath(os.path.dirname(p)) == os.path.normpath(base)]
    where = (f"data.base is {base!r}" if under else
             f"paths as given, from {os.getcwd()}" if any(not os.path.isabs(p) for p in missing)
             else "")
    fix = ("download them: The Well's with the_well's the-well-download --dataset NAME, "
           "PDEBench's from its DaRUS repository")
    if under and all(os.path.basename(p.rstrip(os.sep)) in simulated for p in missing):
        fix = (f"generate them with python -m dsfm.sim --preset demo --out {base}, or set "
               "data.generate: demo")
    elif under:
        fix = "point data.base (or $DSFM_DATA) at the directory that holds them, or " + fix
    return f"{where}; {fix}" if where else fix


def _refuse_missing(missing: list[str], base: str) -> None:
    if missing:
        raise ConfigError(f"data: not found: {', '.join(missing)} "
                          f"({_where_to_get(missing, base)})")


def _named(base: str, names: list[str]) -> list[str]:
    return [n if os.path.isabs(n) or os.sep in n else os.path.join(base, n) for n in names]


def check_to_generate(base: str, names: list[str], pdebench: list[str], preset: str) -> None:
    """With `base` still to be simulated from `preset`: what the simulation will not make
    must exist now (the PDEBench sources, datasets listed that the preset has none of). Before,
    they were found missing only after the process group started and the simulation ran (about
    17 minutes for `small` on 2 cores). Paths are compared resolved: a dataset listed by its
    absolute path under a relative `base` (or through a symbolic link) is one the preset
    makes."""
    from dsfm.sim.presets import PRESETS

    made = {os.path.realpath(os.path.join(base, spec.dataset_name))
            for spec in PRESETS[preset].values()}
    pdebench, unmatched = expand_patterns(pdebench)
    _refuse_missing([p for p in _named(base, names) if os.path.realpath(p) not in made
                     and not os.path.exists(p)]
                    + [p for p in pdebench if not os.path.exists(p)] + unmatched, base)


def check_preset_windows(base: str, names: list[str], preset: str, n_in: int, stride: int,
                         rollout: int | None) -> None:
    """With `base` still to be simulated from `preset`: the trajectories the preset will make
    (of the datasets the run takes) must hold a training window of `n_in` + 1 steps and, with
    `rollout` (None: no evaluation), an evaluation window of `n_in` + `rollout` steps, every
    `stride`-th. Found out after the simulation before (about 17 minutes for `small` on two
    cores), then as a data error, the run's exit code 1."""
    from dsfm.data.index import count_windows
    from dsfm.errors import TooShortError
    from dsfm.sim.presets import PRESETS

    specs = PRESETS[preset].values()
    if names:
        wanted = {os.path.realpath(p) for p in _named(base, names)}
        specs = [s for s in specs
                 if os.path.realpath(os.path.join(base, s.dataset_name)) in wanted]
    for spec in specs:
        what = [(f"the {preset} preset's {spec.dataset_name} (to be simulated into {base})",
                 spec.n_steps)]
        try:
            count_windows(what, n_in, 1, stride)
        except TooShortError as exc:
            raise ConfigError(f"data.n_steps_input={n_in}: {exc}; lower data.n_steps_input or "
                              "data.dt_stride") from None
        if rollout is not None:
            try:
                count_windows(what, n_in, rollout, stride)
            except TooShortError as exc:
                raise ConfigError(f"evaluation with train.rollout_steps={rollout}: {exc}; lower "
                                  "train.rollout_steps or set train.eval_batches=0") from None


def dataset_paths(base: str, names: list[str], pdebench: list[str],
                  generate: str | None = None, progress: bool = False) -> list[str]:
    """Paths of the Well datasets (by name under `base`, or given as paths) then the PDEBench
    sources; every one must exist."""
    if generate:
        generate_if_missing(base, generate, progress)
    names = names or datasets_in(base)
    paths = _named(base, names)
    pdebench, unmatched = expand_patterns(pdebench)
    _refuse_missing([p for p in paths + pdebench if not os.path.exists(p)] + unmatched, base)
    if not paths and not pdebench:
        raise ConfigError(f"data: no datasets in {base!r} and none listed; set data.datasets, "
                          "data.pdebench or data.generate")
    return paths + list(pdebench)
