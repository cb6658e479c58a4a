"""Measuring a small travelling wave in a finite-volume run, shared by the wave-speed tests."""

import numpy as np


def track_mode(system, q: np.ndarray, m: tuple[int, int], omega: float,
               samples: int = 11) -> tuple[float, float]:
    """Advance `q` over one expected period 2π/ω and follow Fourier mode `m` of variable 0:
    returns (measured angular frequency from the phase slope, amplitude at the end)."""
    n = q.shape[-1]
    times = np.linspace(0, 2 * np.pi / omega, samples)
    phases, amps = [], []
    for i, t in enumerate(times):
        if i:
            q = system.advance(q, t - times[i - 1])
        coeff = np.fft.fft2(q[0, 0])[m] / (n * n / 2)
        phases.append(np.angle(coeff))
        amps.append(np.abs(coeff))
    return -np.polyfit(times, np.unwrap(phases), 1)[0], amps[-1]
