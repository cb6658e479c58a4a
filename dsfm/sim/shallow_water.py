"""Nonlinear shallow-water equations in conservative form on the periodic square [0, 1)²:

    ∂h/∂t + ∇·(h u) = 0,   ∂(h u)/∂t + ∇·(h u ⊗ u) + ∇(g h² / 2) = 0,

finite volumes with MUSCL reconstruction of (h, u, v), HLL fluxes and SSP-RK3. The fluid starts at
rest on a mean depth with a few random Gaussian bumps and dips, which radiate interfering gravity
waves (speed √(g h)) that steepen into bores at larger amplitudes.
"""

import numpy as np

from dsfm.sim.base import Trajectories, cell_centres, save_times
from dsfm.sim.finite_volume import FiniteVolume, hll_flux

DATASET_NAME = "shallow_water_2d"
LENGTH = 1.0


class ShallowWater(FiniteVolume):
    """Shallow water with gravity g; conserved (h, hu, hv), primitive (h, u, v)."""

    name = "shallow_water"
    positive = {0: "depth h"}

    def __init__(self, n: int, g: float):
        super().__init__(n, LENGTH)
        self.g = g

    def primitive(self, q):
        h = q[:, 0]
        return np.stack([h, q[:, 1] / h, q[:, 2] / h], axis=1)

    def conserved(self, w):
        h = w[:, 0]
        return np.stack([h, h * w[:, 1], h * w[:, 2]], axis=1)

    def signal_speeds(self, w):
        c = np.sqrt(self.g * w[:, 0])
        return np.abs(w[:, 1]) + c, np.abs(w[:, 2]) + c

    def _flux(self, w):
        h, un, ut = w[:, 0], w[:, 1], w[:, 2]
        mass = h * un
        return np.stack([mass, mass * un + 0.5 * self.g * h * h, mass * ut], axis=1)

    def riemann(self, wl, wr):
        """HLL with Davis wave-speed bounds u ∓ √(g h)."""
        cl, cr = np.sqrt(self.g * wl[:, 0]), np.sqrt(self.g * wr[:, 0])
        sl = np.minimum(wl[:, 1] - cl, wr[:, 1] - cr)
        sr = np.maximum(wl[:, 1] + cl, wr[:, 1] + cr)
        return hll_flux(self.conserved(wl), self.conserved(wr), self._flux(wl), self._flux(wr),
                        sl, sr)


def initial_depth(rng: np.random.Generator, n_trajectories: int, n: int, mean_depth: float,
                  amplitude: float, n_bumps: int) -> np.ndarray:
    """h = H (1 + Σ a_j exp(−r_j²/(2σ_j²))), |a_j| in [amplitude/2, amplitude] with random sign,
    σ_j in [0.04, 0.1], at random centres (distances periodic)."""
    x = (np.arange(n) + 0.5) * LENGTH / n
    h = np.ones((n_trajectories, n, n))
    for i in range(n_trajectories):
        centres = rng.uniform(0, LENGTH, (n_bumps, 2))
        widths = rng.uniform(0.04, 0.1, n_bumps)
        heights = amplitude * rng.uniform(0.5, 1.0, n_bumps) * rng.choice([-1.0, 1.0], n_bumps)
        for (cx, cy), sigma, a in zip(centres, widths, heights, strict=True):
            dx = (x - cx + LENGTH / 2) % LENGTH - LENGTH / 2
            dy = (x - cy + LENGTH / 2) % LENGTH - LENGTH / 2
            h[i] += a * np.exp(-(dx[:, None] ** 2 + dy[None, :] ** 2) / (2 * sigma**2))
    return mean_depth * h


def simulate(rng: np.random.Generator, n_trajectories: int, n: int, n_steps: int, *,
             g: float = 1.0, mean_depth: float = 1.0, amplitude: float = 0.2,
             n_bumps: int = 3, dt_save: float = 0.02) -> Trajectories:
    """Gravity waves from random bumps on a fluid at rest.

    g: gravitational acceleration. mean_depth: undisturbed depth H (waves cross the unit domain in
    time 1/√(g H)). amplitude: largest bump height relative to H (keep n_bumps · amplitude < 1 so
    the depth stays positive). n_bumps: bumps per trajectory. dt_save: time between saved steps.
    """
    system = ShallowWater(n, g)
    h = initial_depth(rng, n_trajectories, n, mean_depth, amplitude, n_bumps)
    q = np.stack([h, np.zeros_like(h), np.zeros_like(h)], axis=1)
    height = np.empty((n_trajectories, n_steps, n, n), np.float32)
    velocity = np.empty((n_trajectories, n_steps, n, n, 2), np.float32)

    def record(part, t, q, w):
        height[part, t] = w[:, 0]
        velocity[part, t] = np.moveaxis(w[:, 1:3], 1, -1)

    system.run(q, n_steps, dt_save, record)
    centres = cell_centres(n, LENGTH)
    return Trajectories(
        time=save_times(n_steps, dt_save),
        coords={"x": centres, "y": centres.copy()},
        t0_fields={"height": height},
        t1_fields={"velocity": velocity},
        parameters={"g": float(g), "mean_depth": float(mean_depth), "amplitude": float(amplitude)},
    )
