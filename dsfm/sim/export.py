"""The simulators' physics in PDEBench's layouts (`python -m dsfm.sim --format pdebench`).

Real PDEBench files are too large to ship; these give the PDEBench reader real physics in each
of its layouts: shallow water as `2D_rdb`, Gray–Scott as `2D_diff-react` (A, B as activator,
inhibitor), incompressible NS as `ns_incom` (velocity, with the passive tracer as `particles`),
compressible Euler as `2D_CFD` (one file per Mach number). All trajectories of a parameter set go
in one file; the reader splits them. File names carry `periodic`, which the reader honours.

Each file is written under a hidden temporary name and renamed into place when closed, and a
folder's old stats.yaml is removed before its first file is replaced (it is written again at the
end), so an interrupted export leaves no short file that reads as whole, nor statistics of other
data beside the new files.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm

from dsfm.data.pdebench_format import write_pdebench
from dsfm.sim.build import DatasetSpec, _remove_stale_partials, simulate_parameter_set


def _file_name(simulator: str, params: dict, n: int) -> tuple[str, str]:
    if simulator == "shallow_water":
        return "swe", f"2D_rdb_periodic_g{params['g']:g}.h5"
    if simulator == "gray_scott":
        return "diff_react", f"2D_diff-react_periodic_F{params['F']:g}_k{params['k']:g}.h5"
    if simulator == "navier_stokes":
        return "incomp_ns", f"ns_incom_periodic_2d_{n}_nu{params['viscosity']:g}.h5"
    return "comp_ns", f"2D_CFD_Rand_M{params['mach']:g}_Eta0_Zeta0_periodic_{n}_Train.hdf5"


def _fields(kind: str, traj) -> dict[str, np.ndarray]:
    t0, t1 = traj.t0_fields, traj.t1_fields
    if kind == "swe":
        return {"h": t0["height"]}
    if kind == "diff_react":
        return {"activator": t0["A"], "inhibitor": t0["B"]}
    if kind == "incomp_ns":
        return {"Vx": t1["velocity"][..., 0], "Vy": t1["velocity"][..., 1],
                "particles": t0["tracer"]}
    return {"Vx": t1["velocity"][..., 0], "Vy": t1["velocity"][..., 1],
            "density": t0["density"], "pressure": t0["pressure"]}


def export_pdebench(specs: dict[str, DatasetSpec], out: str, seed: int = 0,
                    progress: bool = True) -> list[str]:
    """Write one PDEBench-layout file per dataset and parameter set; returns the directories."""
    written = []
    jobs = [(key, spec, i) for key, spec in specs.items() for i in range(len(spec.parameter_sets))]
    for key, spec, i in tqdm(jobs, desc="simulating", unit="run", disable=not progress):
        traj = simulate_parameter_set(spec, i, seed)
        kind, name = _file_name(spec.simulator, spec.parameter_sets[i], spec.n)
        directory = os.path.join(out, kind)
        os.makedirs(directory, exist_ok=True)
        if directory not in written:
            written.append(directory)
            stats = os.path.join(directory, "stats.yaml")
            if os.path.lexists(stats):
                os.remove(stats)
        _remove_stale_partials(directory, name)
        tmp = os.path.join(directory, f".{name}.partial-{os.getpid()}")
        try:
            write_pdebench(tmp, kind, _fields(kind, traj), traj.coords["x"], traj.coords["y"],
                           traj.time)
            os.replace(tmp, os.path.join(directory, name))
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)
    return written
