"""The contract every simulator keeps with the dataset writer: shapes, dtypes, determinism."""

import numpy as np
import pytest

from dsfm.sim import euler, gray_scott, navier_stokes, shallow_water

N_TRAJ, N, N_STEPS = 3, 16, 4

CASES = {
    "navier_stokes_2d": (navier_stokes, {"dt_save": 0.05}, ["vorticity", "pressure", "tracer"],
                         ["velocity"], {"viscosity", "forcing"}),
    "shallow_water_2d": (shallow_water, {"dt_save": 0.01},
                         ["height"], ["velocity"], {"g", "mean_depth", "amplitude"}),
    "gray_scott_reaction_diffusion": (gray_scott, {"length": 0.25, "dt_save": 5.0},
                                      ["A", "B"], [], {"F", "k"}),
    "euler_2d": (euler, {"dt_save": 0.01}, ["density", "pressure", "energy"], ["velocity"],
                 {"mach", "gamma"}),
}


def run(name, seed):
    module, params, *_ = CASES[name]
    return module.simulate(np.random.default_rng(seed), N_TRAJ, N, N_STEPS, **params)


@pytest.mark.parametrize("name", CASES)
def test_shapes_dtypes_and_metadata(name):
    module, params, t0, t1, parameters = CASES[name]
    assert module.DATASET_NAME == name
    traj = run(name, 0)
    assert sorted(traj.t0_fields) == sorted(t0)
    assert sorted(traj.t1_fields) == sorted(t1)
    for field in traj.t0_fields.values():
        assert field.shape == (N_TRAJ, N_STEPS, N, N) and field.dtype == np.float32
        assert np.all(np.isfinite(field))
    for field in traj.t1_fields.values():
        assert field.shape == (N_TRAJ, N_STEPS, N, N, 2) and field.dtype == np.float32
        assert np.all(np.isfinite(field))
    assert traj.time.dtype == np.float32 and traj.time.shape == (N_STEPS,)
    np.testing.assert_allclose(traj.time, np.arange(N_STEPS) * params["dt_save"], rtol=1e-6)
    for axis in ("x", "y"):
        x = traj.coords[axis]
        assert x.dtype == np.float32 and x.shape == (N,)
        np.testing.assert_allclose(np.diff(x), x[1] - x[0], rtol=1e-5)
    assert set(traj.parameters) == parameters
    assert all(type(v) is float for v in traj.parameters.values())
    assert traj.bc_type == "PERIODIC"


@pytest.mark.parametrize("name", CASES)
def test_deterministic_given_seed(name):
    a, b, c = run(name, 7), run(name, 7), run(name, 8)
    for key in a.t0_fields:
        np.testing.assert_array_equal(a.t0_fields[key], b.t0_fields[key])
        assert not np.array_equal(a.t0_fields[key], c.t0_fields[key])
    for key in a.t1_fields:
        np.testing.assert_array_equal(a.t1_fields[key], b.t1_fields[key])


@pytest.mark.parametrize("name", CASES)
def test_fields_evolve_and_trajectories_differ(name):
    traj = run(name, 0)
    for key, field in traj.t0_fields.items():
        change = np.abs(field[:, -1] - field[:, 0]).max()
        assert change > 1e-3 * np.abs(field[:, 0]).max(), f"{key} does not evolve"
        assert not np.allclose(field[0], field[1]), f"{key}: trajectories are identical"
