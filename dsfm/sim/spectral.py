"""Fourier helpers shared by the pseudo-spectral simulators (Navier–Stokes, Gray–Scott).

Fields are real and periodic on an n × n grid, x on axis -2 and y on axis -1. Transforms are
`rfft2` over the last two axes, so spectra have shape (..., n, n // 2 + 1).
"""

from collections.abc import Callable

import numpy as np


def wavenumbers(n: int, length: float) -> tuple[np.ndarray, np.ndarray]:
    """Angular wavenumbers (kx [n, 1], ky [1, n // 2 + 1]) of rfft2 on a square of side `length`."""
    scale = 2 * np.pi / length
    kx = scale * np.fft.fftfreq(n, 1.0 / n)
    ky = scale * np.arange(n // 2 + 1)
    return kx[:, None], ky[None, :]


def dealias_mask(n: int) -> np.ndarray:
    """2/3 rule: keep modes with |index| < n/3 per direction, so quadratic products alias only
    onto modes that are discarded."""
    ix = np.abs(np.fft.fftfreq(n, 1.0 / n))[:, None]
    iy = np.arange(n // 2 + 1)[None, :]
    return (ix < n / 3) & (iy < n / 3)


def random_field(rng: np.random.Generator, shape: tuple[int, ...],
                 amplitude: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Real Gaussian random fields of `shape` (..., n, n) with Fourier amplitude `amplitude(|m|)`,
    m the integer wavenumber (cycles per domain), zero mean and unit rms per field.

    Filtering white noise keeps the Hermitian symmetry of a real field for free.
    """
    n = shape[-1]
    mx = np.fft.fftfreq(n, 1.0 / n)[:, None]
    my = np.arange(n // 2 + 1)[None, :]
    m = np.hypot(mx, my)
    filt = np.where(m > 0, amplitude(np.maximum(m, 1e-12)), 0.0)
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal(shape)) * filt, s=(n, n))
    return field / field.std(axis=(-2, -1), keepdims=True)


def if_rk4_step(v_hat: np.ndarray, dt: float, linear: np.ndarray,
                nonlinear: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """One integrating-factor RK4 step of dv/dt = linear * v + nonlinear(v) in Fourier space.

    The diagonal linear part (diffusion, damping) is integrated exactly, so it sets no time-step
    limit and a pure linear mode decays at its analytic rate to round-off.
    """
    half = np.exp(0.5 * dt * linear)
    full = half * half
    k1 = nonlinear(v_hat)
    k2 = nonlinear(half * (v_hat + 0.5 * dt * k1))
    k3 = nonlinear(half * v_hat + 0.5 * dt * k2)
    k4 = nonlinear(full * v_hat + dt * half * k3)
    return full * v_hat + dt / 6.0 * (full * k1 + 2.0 * half * (k2 + k3) + k4)
