"""Spectral helpers: the dealiasing rule and random fields."""

import numpy as np
import pytest

from dsfm.sim.spectral import dealias_mask, random_field, wavenumbers


@pytest.mark.parametrize("n", [24, 32, 48, 64])
def test_dealias_mask_keeps_exactly_the_alias_free_band(n):
    """Sums of two kept wavenumbers alias only outside the kept band, and the band is the widest
    for which that holds."""
    mask = dealias_mask(n)
    index = np.abs(np.fft.fftfreq(n, 1.0 / n))
    kept = int(index[mask[:, 0]].max())
    assert n - 2 * kept > kept
    assert n - 2 * (kept + 1) <= kept + 1
    expected = (index[:, None] <= kept) & (np.arange(n // 2 + 1)[None, :] <= kept)
    np.testing.assert_array_equal(mask, expected)


def test_wavenumbers_scale_with_the_domain():
    kx, ky = wavenumbers(8, 0.5)
    np.testing.assert_allclose(kx[:, 0], 4 * np.pi * np.array([0, 1, 2, 3, -4, -3, -2, -1]))
    np.testing.assert_allclose(ky[0], 4 * np.pi * np.arange(5))


def test_random_field_has_zero_mean_unit_rms_and_the_requested_band():
    fields = random_field(np.random.default_rng(0), (3, 32, 32), lambda k: (k <= 4.0) * 1.0)
    np.testing.assert_allclose(fields.mean(axis=(-2, -1)), 0.0, atol=1e-12)
    np.testing.assert_allclose(fields.std(axis=(-2, -1)), 1.0, rtol=1e-12)
    power = np.abs(np.fft.fft2(fields)) ** 2
    m = np.fft.fftfreq(32, 1.0 / 32)
    outside = np.hypot(m[:, None], m[None, :]) > 4.0
    assert power[:, outside].max() < 1e-20 * power.max()
