"""Compressible Euler: conservation, sound speed, contacts, Mach scaling and positivity."""

import numpy as np
import pytest

from dsfm.errors import PositivityError
from dsfm.sim import euler
from tests.sim.waves import track_mode

GAMMA = 1.4


def test_mass_momentum_and_energy_are_conserved_through_shocks():
    n = 32
    system = euler.Euler(n, GAMMA)
    w = euler.initial_primitive(np.random.default_rng(0), 2, n, mach=1.0, gamma=GAMMA,
                                amplitude=0.2, k_peak=3.0)
    w[:, 1] += 0.4
    q = system.conserved(w)
    out = system.advance(q, 0.3)
    assert np.abs(out - q).max() > 0.3, "the flow must evolve for the test to mean anything"
    np.testing.assert_allclose(out.sum(axis=(-2, -1)), q.sum(axis=(-2, -1)), rtol=1e-13)


def test_acoustic_wave_travels_at_the_sound_speed():
    """A small isentropic wave (ρ' = ρ ε cos(k·x), p' = c² ρ', u' = c ρ'/ρ along k) turns its
    Fourier phase at ω = √(γ p / ρ) |k|, and keeps its amplitude over a period."""
    n, rho, p, m, eps = 64, 1.2, 0.8, (1, 1), 1e-4
    c = np.sqrt(GAMMA * p / rho)
    x = (np.arange(n) + 0.5) * euler.LENGTH / n
    xx, yy = np.meshgrid(x, x, indexing="ij")
    k = 2 * np.pi / euler.LENGTH * np.array(m, float)
    wave = eps * np.cos(k[0] * xx + k[1] * yy)
    speed = c * wave / np.linalg.norm(k)
    w = np.stack([rho * (1 + wave), speed * k[0], speed * k[1], p + c**2 * rho * wave])[None]
    system = euler.Euler(n, GAMMA)
    q = system.conserved(w)
    omega = c * np.linalg.norm(k)
    measured, amplitude = track_mode(system, q, m, omega)
    np.testing.assert_allclose(measured, omega, rtol=2e-3)
    np.testing.assert_allclose(amplitude, rho * eps, rtol=1e-2)


def test_stationary_contact_stays_sharp():
    """HLLC resolves a contact exactly: a density jump at uniform pressure and zero velocity does
    not move or smear (HLL would diffuse it at the sound speed)."""
    n = 16
    rho = np.where(np.arange(n)[:, None] < n // 2, 1.0, 0.25) * np.ones((n, n))
    w = np.stack([rho, np.zeros((n, n)), np.zeros((n, n)), np.ones((n, n))])[None]
    system = euler.Euler(n, GAMMA)
    out = system.primitive(system.advance(system.conserved(w), 0.5))
    np.testing.assert_allclose(out, w, rtol=0, atol=1e-13)


@pytest.mark.parametrize("mach", [0.1, 1.0])
def test_initial_mach_number_and_positivity(mach):
    traj = euler.simulate(np.random.default_rng(4), 3, 32, 12, mach=mach, dt_save=0.03)
    rho = traj.t0_fields["density"].astype(np.float64)
    p = traj.t0_fields["pressure"].astype(np.float64)
    vel = traj.t1_fields["velocity"].astype(np.float64)
    c_mean = np.sqrt(GAMMA * p[:, 0].mean(axis=(-2, -1)) / rho[:, 0].mean(axis=(-2, -1)))
    rms = np.sqrt(np.mean(np.sum(vel[:, 0] ** 2, axis=-1), axis=(-2, -1)))
    np.testing.assert_allclose(rms / c_mean, mach, rtol=1e-5)
    assert rho.min() > 0 and p.min() > 0
    energy = p / (GAMMA - 1) + 0.5 * rho * np.sum(vel**2, axis=-1)
    np.testing.assert_allclose(traj.t0_fields["energy"], energy, rtol=1e-5, atol=1e-6)


def test_negative_pressure_raises_a_positivity_error():
    system = euler.Euler(8, GAMMA)
    w = np.stack([np.ones((8, 8)), np.zeros((8, 8)), np.zeros((8, 8)), np.ones((8, 8))])[None]
    w[0, 3, 2, 6] = -0.1
    with pytest.raises(PositivityError, match=r"pressure fell to -0.1 in trajectory 0"):
        system.advance(system.conserved(w), 0.1)
