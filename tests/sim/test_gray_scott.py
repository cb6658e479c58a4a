"""Gray–Scott: linear decay around the homogeneous state and the physical range of patterns."""

import numpy as np
import pytest

from dsfm.sim import gray_scott as gs

N, LENGTH = 32, 0.5
F, K = gs.REGIMES["spirals"]["F"], gs.REGIMES["spirals"]["k"]


def mode(field, mx, my):
    """Amplitude of the Fourier mode (mx, my), half the amplitude of a cosine."""
    return np.abs(np.fft.fft2(field)[..., mx, my]) / field.shape[-1] ** 2


def plane_wave(mx, my):
    x = (np.arange(N) + 0.5) * LENGTH / N - LENGTH / 2
    xx, yy = np.meshgrid(x, x, indexing="ij")
    k = 2 * np.pi / LENGTH * np.array([mx, my])
    return np.cos(k[0] * xx + k[1] * yy), float(k @ k)


def test_perturbation_of_A_decays_at_feed_plus_diffusion_rate():
    """With B = 0 the A equation is linear: a mode of A decays as exp(−(F + δ_A |k|²) t)."""
    wave, k2 = plane_wave(3, 2)
    eps, t = 1e-2, 40.0
    state = np.stack([1.0 + eps * wave, np.zeros_like(wave)])[None]
    out = gs.GrayScott(N, LENGTH, F, K).advance(state, t, dt=1.0)
    np.testing.assert_allclose(mode(out[0, 0], 3, 2), eps / 2 * np.exp(-(F + gs.DELTA_A * k2) * t),
                               rtol=1e-10)
    np.testing.assert_allclose(out[0, 1], 0.0, atol=0)


def test_perturbation_of_B_decays_at_feed_plus_kill_plus_diffusion_rate():
    """Around A = 1, B = 0 the B equation is linear to first order: its mean decays as
    exp(−(F + k) t) and a mode of wavevector k as exp(−(F + k + δ_B |k|²) t); the A B² term is
    smaller by a factor ~ eps."""
    wave, k2 = plane_wave(1, 4)
    eps, t = 1e-10, 40.0
    state = np.stack([np.ones_like(wave), eps * (1.0 + wave)])[None]
    out = gs.GrayScott(N, LENGTH, F, K).advance(state, t, dt=1.0)[0, 1]
    np.testing.assert_allclose(out.mean(), eps * np.exp(-(F + K) * t), rtol=1e-7)
    np.testing.assert_allclose(mode(out, 1, 4), eps / 2 * np.exp(-(F + K + gs.DELTA_B * k2) * t),
                               rtol=1e-7)


@pytest.mark.parametrize("regime", sorted(gs.REGIMES))
def test_every_regime_grows_patterns_in_the_physical_range(regime):
    """Seeded patterns survive in every regime of The Well (none decays to A = 1, B = 0), and
    concentrations stay in [0, 1] up to the spectral ringing of the steep fronts (~1e-4)."""
    traj = gs.simulate(np.random.default_rng(0), 2, N, 6, length=LENGTH, **gs.REGIMES[regime])
    a, b = traj.t0_fields["A"], traj.t0_fields["B"]
    assert a.min() > -1e-3 and a.max() < 1 + 1e-3
    assert b.min() > -1e-3 and b.max() < 1
    assert np.all(b[:, -1].max(axis=(-2, -1)) > 0.1)
    assert np.all(a[:, -1].min(axis=(-2, -1)) < 0.6)


def test_internal_step_is_converged():
    """dt = 1 (the default) agrees with dt = 1/4 to well below the pattern amplitude."""
    kwargs = dict(length=LENGTH, dt_save=25.0, **gs.REGIMES["gliders"])
    coarse = gs.simulate(np.random.default_rng(3), 1, N, 5, dt=1.0, **kwargs).t0_fields["B"]
    fine = gs.simulate(np.random.default_rng(3), 1, N, 5, dt=0.25, **kwargs).t0_fields["B"]
    assert np.abs(coarse - fine).max() < 1e-3


def test_spinup_shifts_the_saved_window():
    """Integrating t_spinup before saving equals dropping the first saved steps."""
    kwargs = dict(length=LENGTH, dt_save=20.0, **gs.REGIMES["maze"])
    full = gs.simulate(np.random.default_rng(5), 2, N, 5, **kwargs).t0_fields["B"]
    late = gs.simulate(np.random.default_rng(5), 2, N, 3, t_spinup=40.0, **kwargs).t0_fields["B"]
    np.testing.assert_allclose(late, full[:, 2:], rtol=0, atol=1e-6)
