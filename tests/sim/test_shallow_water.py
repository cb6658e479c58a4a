"""Shallow water: conservation, the linear gravity-wave speed and the positivity guard."""

import numpy as np
import pytest

from dsfm.errors import PositivityError
from dsfm.sim import shallow_water as sw
from tests.sim.waves import track_mode


def travelling_wave(n, g, depth, m, eps):
    """Small gravity wave h' = eps H cos(k·x) of integer wavevector m, moving along k with
    |u| = √(g/H) h'."""
    x = (np.arange(n) + 0.5) * sw.LENGTH / n
    xx, yy = np.meshgrid(x, x, indexing="ij")
    k = 2 * np.pi / sw.LENGTH * np.asarray(m, float)
    wave = eps * np.cos(k[0] * xx + k[1] * yy)
    speed = np.sqrt(g * depth) * wave / np.linalg.norm(k)
    return np.stack([depth * (1 + wave), speed * k[0], speed * k[1]])[None], np.linalg.norm(k)


def test_mass_and_momentum_are_conserved_to_round_off():
    n, g = 32, 9.81
    system = sw.ShallowWater(n, g)
    h = sw.initial_depth(np.random.default_rng(0), 2, n, 1.0, 0.3, 3)
    drift = np.array([0.3, -0.2])[None, :, None, None]
    q = system.conserved(np.concatenate([h[:, None], np.broadcast_to(drift, (2, 2, n, n))], 1))
    total0 = q.sum(axis=(-2, -1))
    out = system.advance(q, 0.1)
    assert np.abs(out - q).max() > 0.05, "the flow must evolve for the test to mean anything"
    np.testing.assert_allclose(out.sum(axis=(-2, -1)), total0, rtol=1e-13)


def test_linear_gravity_wave_travels_at_the_shallow_water_speed():
    """A small diagonal wave's Fourier phase turns at ω = √(g H) |k| (2nd-order scheme: 0.06%
    phase error at 64 cells per wavelength) and keeps its amplitude."""
    n, g, depth, m, eps = 64, 2.0, 1.5, (1, 1), 1e-4
    system = sw.ShallowWater(n, g)
    w, k = travelling_wave(n, g, depth, m, eps)
    q = system.conserved(w)
    omega = np.sqrt(g * depth) * k
    measured, amplitude = track_mode(system, q, m, omega)
    np.testing.assert_allclose(measured, omega, rtol=2e-3)
    np.testing.assert_allclose(amplitude, depth * eps, rtol=1e-2)


def test_simulated_depth_keeps_its_mean_and_the_fluid_starts_at_rest():
    traj = sw.simulate(np.random.default_rng(1), 2, 32, 3, amplitude=0.3, dt_save=0.05)
    h, vel = traj.t0_fields["height"], traj.t1_fields["velocity"]
    mean_depth = h.astype(np.float64).mean(axis=(-2, -1))
    np.testing.assert_allclose(mean_depth, mean_depth[:, :1].repeat(3, axis=1), rtol=1e-6)
    assert np.abs(vel[:, 0]).max() == 0.0 and np.abs(vel[:, -1]).max() > 1e-2
    assert h.min() > 0


def test_vanishing_depth_raises_a_positivity_error():
    system = sw.ShallowWater(8, 1.0)
    q = system.conserved(np.stack([np.ones((8, 8)), np.zeros((8, 8)), np.zeros((8, 8))])[None])
    q[0, 0, 3, 5] = -1e-3
    with pytest.raises(PositivityError, match=r"depth h .* trajectory 0 at cell \(3, 5\)"):
        system.advance(q, 0.1)


@pytest.mark.parametrize("n_steps", [1, 2])
def test_too_deep_a_dip_is_reported_not_integrated(n_steps):
    """Also when the state is only saved, never stepped from: a run of one saved step used to
    return the negative depth as data."""
    with pytest.raises(PositivityError, match="depth h fell to"):
        sw.simulate(np.random.default_rng(0), 4, 16, n_steps, amplitude=3.0)
