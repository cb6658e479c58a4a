"""Turn simulator output into Well-format datasets on disk.

For each dataset of a preset and each of its parameter sets, one simulator run produces the
trajectories of all three splits; they are divided by trajectory (never by time) into
`<base>/<dataset>/data/{train,valid,test}/<dataset>_<param>_<value>.hdf5`, and `stats.yaml` is
computed over the train split. Runs go to a process pool, each seeded from (seed, dataset,
parameter set) alone, so the files do not depend on the number of workers. A dataset is written
to a temporary directory and renamed into place when complete, so an interrupted run never leaves
a half-written dataset that looks finished.
"""

from __future__ import annotations

import contextlib
import importlib
import multiprocessing as mp
import os
import shutil
import signal
import zlib
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from dsfm.data.index import SPLITS
from dsfm.data.stats import write_stats
from dsfm.data.well_format import Field, Scalar, boundaries_all, write_well_file
from dsfm.errors import ConfigError
from dsfm.sim.base import Trajectories


@dataclass
class DatasetSpec:
    """How to generate one dataset: which simulator, grid, length, splits and parameter sets."""

    simulator: str                       # module name under dsfm.sim
    n: int                               # grid points per side
    n_steps: int                         # saved time steps per trajectory
    splits: tuple[int, int, int]         # trajectories per parameter set: train, valid, test
    parameter_sets: list[dict[str, float]]
    options: dict = field(default_factory=dict)   # fixed simulator settings (not parameters)

    @property
    def dataset_name(self) -> str:
        return importlib.import_module(f"dsfm.sim.{self.simulator}").DATASET_NAME


def file_stem(dataset_name: str, params: dict[str, float]) -> str:
    """<dataset>_<param>_<value>…, the Well's naming of files per parameter set."""
    parts = [dataset_name] + [f"{k}_{v:g}" for k, v in params.items()]
    return "_".join(parts)


def task_rng(seed: int, dataset_name: str, params: dict[str, float]) -> np.random.Generator:
    """A parameter set's stream, from (seed, dataset, the set's values) alone: it came from the
    set's place in its list, so `--mach 1.0` alone drew the default list's Mach 0.1 start, and
    two parameter sets made separately for a transfer study began from one field."""
    return np.random.default_rng([seed, zlib.crc32(file_stem(dataset_name, params).encode())])


def simulate_parameter_set(spec: DatasetSpec, index: int, seed: int) -> Trajectories:
    module = importlib.import_module(f"dsfm.sim.{spec.simulator}")
    params = spec.parameter_sets[index]
    return module.simulate(task_rng(seed, module.DATASET_NAME, params), sum(spec.splits), spec.n,
                           spec.n_steps, **spec.options, **params)


def write_trajectories(path: str, dataset_name: str, traj: Trajectories,
                       select: slice) -> None:
    """Write trajectories `select` of a simulator run as one Well file."""
    dims = tuple(traj.coords)
    shape = tuple(len(traj.coords[d]) for d in dims)
    fields = [Field(name, data[select], order=0) for name, data in traj.t0_fields.items()]
    fields += [Field(name, data[select], order=1) for name, data in traj.t1_fields.items()]
    n = fields[0].data.shape[0]
    scalars = [Scalar(k, np.float32(v)) for k, v in traj.parameters.items()]
    write_well_file(path, dataset_name=dataset_name, spatial_dims=dims, coords=traj.coords,
                    time=traj.time, n_trajectories=n, fields=fields, scalars=scalars,
                    boundaries=boundaries_all(traj.bc_type, dims, shape),
                    simulation_parameters={k: float(v) for k, v in traj.parameters.items()})


def _run(job: tuple[DatasetSpec, int, int, str]) -> tuple[str, int]:
    spec, index, seed, tmp_dir = job
    traj = simulate_parameter_set(spec, index, seed)
    name = spec.dataset_name
    stem = file_stem(name, spec.parameter_sets[index])
    start = 0
    for split, count in zip(SPLITS, spec.splits):
        if count:
            write_trajectories(os.path.join(tmp_dir, "data", split, stem + ".hdf5"), name, traj,
                               slice(start, start + count))
        start += count
    return name, index


def build(specs: dict[str, DatasetSpec], out: str, seed: int = 0, workers: int | None = None,
          overwrite: bool = False, progress: bool = True) -> list[str]:
    """Generate the datasets in `specs` under `out`; returns the dataset directories written.

    Datasets whose directory already holds a stats.yaml are kept unless `overwrite`.
    """
    os.makedirs(out, exist_ok=True)
    for spec in specs.values():     # else found only after simulating, when renamed into place
        final = os.path.join(out, spec.dataset_name)
        if os.path.lexists(final) and not os.path.isdir(final):
            raise ConfigError(f"{final}: exists and is not a directory, so dataset "
                              f"{spec.dataset_name} cannot be written there; move it away or "
                              "choose another --out")
    todo = {}
    for key, spec in specs.items():
        final = os.path.join(out, spec.dataset_name)
        if os.path.isfile(os.path.join(final, "stats.yaml")) and not overwrite:
            if progress:
                tqdm.write(f"{final}: exists, kept (use --overwrite to regenerate)")
            continue
        _remove_stale_partials(out, spec.dataset_name)
        tmp = os.path.join(out, f".{spec.dataset_name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        for split in SPLITS:
            os.makedirs(os.path.join(tmp, "data", split))
        todo[key] = (spec, tmp, final)
    jobs = [(spec, i, seed, tmp) for spec, tmp, _ in todo.values()
            for i in range(len(spec.parameter_sets))]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    bar = tqdm(total=len(jobs) + len(todo), desc="simulating", unit="run", disable=not progress)
    written = []
    try:
        if workers == 1:
            results = map(_run, jobs)
            _drain(results, bar)
        else:
            with mp.get_context("fork").Pool(workers, initializer=_worker_signals) as pool:
                _drain(pool.imap_unordered(_run, jobs), bar)
        bar.set_description("statistics")
        for spec, tmp, final in todo.values():
            write_stats(tmp, "train")
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            written.append(final)
            bar.update()
    finally:
        bar.close()
        for _, tmp, _ in todo.values():
            shutil.rmtree(tmp, ignore_errors=True)
    return written


def _worker_signals() -> None:
    """A simulation worker leaves Ctrl-C to its parent, which stops the pool and cleans up
    (each worker printed its own KeyboardInterrupt traceback), and ends at once on the pool's
    SIGTERM (not through a handler it inherited from the command line's)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _remove_stale_partials(out: str, dataset_name: str) -> None:
    """Remove `.<dataset>.partial-PID` directories (or, of a PDEBench export, files) left by a
    build whose process is gone (killed by SIGKILL or SIGTERM before its cleanup ran); a live
    build's are left alone."""
    prefix = f".{dataset_name}.partial-"
    for entry in os.listdir(out):
        pid = entry[len(prefix):]
        if not (entry.startswith(prefix) and pid.isdigit()) or int(pid) == os.getpid():
            continue
        if _alive(int(pid)):
            continue                       # that build is still running
        path = os.path.join(out, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(path)


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a killed build whose parent has not
    reaped it yet is gone all the same)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def _drain(results, bar) -> None:
    for name, index in results:
        bar.set_postfix_str(f"{name}[{index}]")
        bar.update()
