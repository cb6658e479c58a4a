"""Gray–Scott reaction–diffusion, as in The Well's `gray_scott_reaction_diffusion`.

    ∂A/∂t = δ_A ΔA − A B² + F (1 − A),   ∂B/∂t = δ_B ΔB + A B² − (F + k) B

on the periodic square [−L/2, L/2)², L = `length` (The Well: L = 2 at 128², grid spacing 1/64).
The linear part (diffusion, feed and kill) is integrated exactly in Fourier space by an
integrating-factor RK4 step; the constant feed and A B² are evaluated on the grid.
"""

import numpy as np

from dsfm.errors import SimulationError
from dsfm.sim.base import Trajectories, cell_centres, save_times
from dsfm.sim.batching import chunks
from dsfm.sim.spectral import if_rk4_step, wavenumbers

DATASET_NAME = "gray_scott_reaction_diffusion"
DELTA_A = 2e-5
DELTA_B = 1e-5
CHUNK_CELLS = 32768
REGIMES = {
    "gliders": {"F": 0.014, "k": 0.054},
    "bubbles": {"F": 0.098, "k": 0.057},
    "maze": {"F": 0.029, "k": 0.057},
    "worms": {"F": 0.058, "k": 0.065},
    "spirals": {"F": 0.018, "k": 0.051},
    "spots": {"F": 0.03, "k": 0.062},
}


class GrayScott:
    """Integrator for batches of (A, B) states [N, 2, n, n] on a square of side `length`."""

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
            raise SimulationError(
                f"gray_scott: A or B became non-finite (F={self.F}); lower the time step dt")
        return state


def initial_state(rng: np.random.Generator, n_trajectories: int, n: int, length: float,
                  seed_density: float, seed_radius: float) -> np.ndarray:
    """A = 1, B = 0 with round(seed_density · length²) Gaussian patches of radius `seed_radius` at
    random centres that peak at A = B = 0.4.

    Pearson's patches (A = 1/2, B = 1/4) die out in the worms and bubbles regimes, whose patterns
    need B above the saddle value of the reaction (≈ 0.27 for bubbles); Gaussian rather than square
    patches keep the spectral solver from ringing.
    """
    n_seeds = max(1, round(seed_density * length**2))
    x = (np.arange(n) + 0.5) * length / n - length / 2
    bumps = np.zeros((n_trajectories, n, n))
    for i, centres in enumerate(rng.uniform(-length / 2, length / 2, (n_trajectories, n_seeds, 2))):
        for cx, cy in centres:
            dx = (x - cx + length / 2) % length - length / 2
            dy = (x - cy + length / 2) % length - length / 2
            bumps[i] = np.maximum(bumps[i], np.exp(-(dx[:, None] ** 2 + dy[None, :] ** 2)
                                                   / seed_radius**2))
    return np.stack([1.0 - 0.6 * bumps, 0.4 * bumps], axis=1)


def simulate(rng: np.random.Generator, n_trajectories: int, n: int, n_steps: int, *,
             F: float = 0.03, k: float = 0.062, length: float = 2.0, dt_save: float = 50.0,
             dt: float = 1.0, t_spinup: float = 0.0, seed_density: float = 32.0,
             seed_radius: float = 0.04) -> Trajectories:
    """Gray–Scott patterns growing from random seeds (defaults: the "spots" regime).

    F, k: feed and kill rates (see REGIMES). length: domain side. dt_save: time between saved
    steps; patterns take about 10³ time units to form from the seeds, so 24 steps of 50 show them
    grow and settle. dt: largest internal step (the reaction rates are O(1), so RK4 is accurate
    to 1e-3 at 1).
    t_spinup: time integrated before the first saved step, to start from grown patterns.
    seed_density, seed_radius: seeded patches per unit area and their radius.
    """
    solver = GrayScott(n, length, F, k)
    initial = initial_state(rng, n_trajectories, n, length, seed_density, seed_radius)
    fields = np.empty((n_trajectories, n_steps, 2, n, n), np.float32)
    for part in chunks(n_trajectories, n, CHUNK_CELLS):
        state = solver.advance(initial[part], t_spinup, dt) if t_spinup > 0 else initial[part]
        for t in range(n_steps):
            if t > 0:
                state = solver.advance(state, dt_save, dt)
            fields[part, t] = state
    centres = cell_centres(n, length, -length / 2)
    return Trajectories(
        time=save_times(n_steps, dt_save),
        coords={"x": centres, "y": centres.copy()},
        t0_fields={"A": np.ascontiguousarray(fields[:, :, 0]),
                   "B": np.ascontiguousarray(fields[:, :, 1])},
        parameters={"F": float(F), "k": float(k)},
    )
