"""Gray–Scott reaction–diffusion, as in The Well's `gray_scott_reaction_diffusion`.

    ∂A/∂t = δ_A ΔA − A B² + F (1 − A),   ∂B/∂t = δ_B ΔB + A B² − (F + k) B

on the periodic square [−L/2, L/2)², L = `length` (The Well: L = 2 at 128², grid spacing 1/64).
The linear part (diffusion, feed and kill) is integrated exactly in Fourier space by an
integrating-factor RK4 step; the constant feed and A B² are evaluated on the grid.
"""

import numpy as np

from dsfm.sim.base import Trajectories
from dsfm.sim.spectral import if_rk4_step, wavenumbers

DATASET_NAME = "gray_scott_reaction_diffusion"
DELTA_A = 2e-5
DELTA_B = 1e-5
REGIMES = {
    "gliders": {"F": 0.014, "k": 0.054},
    "bubbles": {"F": 0.098, "k": 0.057},
    "maze": {"F": 0.029, "k": 0.057},
    "worms": {"F": 0.058, "k": 0.065},
    "spirals": {"F": 0.018, "k": 0.051},
    "spots": {"F": 0.03, "k": 0.062},
}


class GrayScott:
    """Integrator for a batch of (A, B) states of shape [N, 2, n, n] on a square of side `length`."""

    def __init__(self, n: int, length: float, F: float, k: float):
        kx, ky = wavenumbers(n, length)
        k2 = kx**2 + ky**2
        self.n = n
        self.F = F
        self.linear = np.stack([-DELTA_A * k2 - F, -DELTA_B * k2 - (F + k)])

    def nonlinear(self, state_hat: np.ndarray) -> np.ndarray:
        """Reaction minus its linear part: (F − A B², A B²) in Fourier space."""
        a, b = np.moveaxis(np.fft.irfft2(state_hat, s=(self.n, self.n)), 1, 0)
        abb = a * b * b
        reaction = np.stack([self.F - abb, abb], axis=1)
        return np.fft.rfft2(reaction)

    def advance(self, state: np.ndarray, duration: float, dt: float) -> np.ndarray:
        """Integrate grid states over `duration` in equal steps of at most `dt`."""
        steps = max(1, int(np.ceil(duration / dt)))
        state_hat = np.fft.rfft2(state)
        for _ in range(steps):
            state_hat = if_rk4_step(state_hat, duration / steps, self.linear, self.nonlinear)
        state = np.fft.irfft2(state_hat, s=(self.n, self.n))
        if not np.all(np.isfinite(state)):
            raise FloatingPointError(
                f"gray_scott: A or B became non-finite (F={self.F}); lower the time step dt")
        return state


def initial_state(rng: np.random.Generator, n_trajectories: int, n: int, length: float,
                  n_seeds: int, seed_radius: float) -> np.ndarray:
    """A = 1, B = 0 except in `n_seeds` random square patches of half-width `seed_radius` where
    A = 1/2, B = 1/4 (Pearson's seeding), plus 1% noise inside the patches to break symmetry."""
    x = (np.arange(n) + 0.5) * length / n - length / 2
    state = np.empty((n_trajectories, 2, n, n))
    state[:, 0], state[:, 1] = 1.0, 0.0
    for i in range(n_trajectories):
        centres = rng.uniform(-length / 2, length / 2, size=(n_seeds, 2))
        inside = np.zeros((n, n), dtype=bool)
        for cx, cy in centres:
            dx = np.abs((x - cx + length / 2) % length - length / 2)
            dy = np.abs((x - cy + length / 2) % length - length / 2)
            inside |= (dx[:, None] < seed_radius) & (dy[None, :] < seed_radius)
        noise = 1.0 + 0.01 * rng.standard_normal((2, n, n))
        state[i, 0][inside] = 0.5 * noise[0][inside]
        state[i, 1][inside] = 0.25 * noise[1][inside]
    return state


def simulate(rng: np.random.Generator, n_trajectories: int, n: int, n_steps: int, *,
             F: float = 0.03, k: float = 0.062, length: float = 2.0, dt_save: float = 25.0,
             dt: float = 1.0, t_spinup: float = 0.0, n_seeds: int = 8,
             seed_radius: float = 0.04) -> Trajectories:
    """Gray–Scott patterns growing from random seeds (defaults: the "spots" regime).

    F, k: feed and kill rates (see REGIMES). length: domain side. dt_save: time between saved
    steps. dt: largest internal step (the reaction rates are O(1), so RK4 is accurate at 1).
    t_spinup: time integrated before the first saved step, to start from grown patterns.
    n_seeds, seed_radius: number and half-width of the seeded patches.
    """
    solver = GrayScott(n, length, F, k)
    state = initial_state(rng, n_trajectories, n, length, n_seeds, seed_radius)
    if t_spinup > 0:
        state = solver.advance(state, t_spinup, dt)
    fields = np.empty((n_trajectories, n_steps, 2, n, n), np.float32)
    for t in range(n_steps):
        if t > 0:
            state = solver.advance(state, dt_save, dt)
        fields[:, t] = state
    centres = ((np.arange(n) + 0.5) * length / n - length / 2).astype(np.float32)
    return Trajectories(
        time=(np.arange(n_steps) * dt_save).astype(np.float32),
        coords={"x": centres, "y": centres.copy()},
        t0_fields={"A": fields[:, :, 0], "B": fields[:, :, 1]},
        parameters={"F": float(F), "k": float(k)},
    )
