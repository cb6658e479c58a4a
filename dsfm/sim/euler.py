"""2D compressible Euler equations of an ideal gas on the periodic square [0, 1)²:

    ∂ρ/∂t + ∇·(ρu) = 0,   ∂(ρu)/∂t + ∇·(ρu ⊗ u + p I) = 0,   ∂E/∂t + ∇·((E + p) u) = 0,
    E = p / (γ − 1) + ρ |u|² / 2,

finite volumes with MUSCL reconstruction of (ρ, u, v, p), HLLC fluxes and SSP-RK3. Initial
conditions are smooth random perturbations of ρ = p = 1 with a random velocity field scaled to a
given Mach number: at M = 0.1 sound waves run through a slowly drifting flow, at M = 1 shocks form.
"""

import numpy as np

from dsfm.sim.base import Trajectories, cell_centres, save_times
from dsfm.sim.finite_volume import FiniteVolume
from dsfm.sim.spectral import random_field

DATASET_NAME = "euler_2d"
LENGTH = 1.0


class Euler(FiniteVolume):
    """Ideal-gas Euler; conserved (ρ, ρu, ρv, E), primitive (ρ, u, v, p)."""

    name = "euler"
    positive = {0: "density", 3: "pressure"}

    def __init__(self, n: int, gamma: float):
        super().__init__(n, LENGTH)
        self.gamma = gamma

    def primitive(self, q):
        rho, u, v = q[:, 0], q[:, 1] / q[:, 0], q[:, 2] / q[:, 0]
        p = (self.gamma - 1.0) * (q[:, 3] - 0.5 * rho * (u * u + v * v))
        return np.stack([rho, u, v, p], axis=1)

    def conserved(self, w):
        rho, u, v, p = w[:, 0], w[:, 1], w[:, 2], w[:, 3]
        energy = p / (self.gamma - 1.0) + 0.5 * rho * (u * u + v * v)
        return np.stack([rho, rho * u, rho * v, energy], axis=1)

    def sound_speed(self, w):
        return np.sqrt(self.gamma * w[:, 3] / w[:, 0])

    def signal_speeds(self, w):
        c = self.sound_speed(w)
        return np.abs(w[:, 1]) + c, np.abs(w[:, 2]) + c

    def riemann(self, wl, wr):
        """HLLC (Toro): HLL with the contact restored, so shear and entropy waves are not smeared
        by acoustic dissipation; Davis wave-speed bounds.

        Each face needs only the side of the contact it samples: F_K + s_K (U*_K − U_K) with s_K
        clipped at 0, which is F_K itself when the fan does not straddle the face.
        """
        cl, cr = self.sound_speed(wl), self.sound_speed(wr)
        ul, ur = wl[:, 1], wr[:, 1]
        sl = np.minimum(ul - cl, ur - cr)
        sr = np.maximum(ul + cl, ur + cr)
        ml, mr = wl[:, 0] * (sl - ul), wr[:, 0] * (sr - ur)
        star = (wr[:, 3] - wl[:, 3] + ul * ml - ur * mr) / (ml - mr)
        left = star >= 0
        w = np.where(left[:, None], wl, wr)
        s = np.where(left, sl, sr)
        m = np.where(left, ml, mr)
        clipped = np.where(left, np.minimum(sl, 0.0), np.maximum(sr, 0.0))
        q = self.conserved(w)
        un, p = w[:, 1], w[:, 3]
        flux = q * un[:, None]
        flux[:, 1] += p
        flux[:, 3] += p * un
        scale = m / (s - star)
        q_star = np.stack([scale, scale * star, scale * w[:, 2],
                           scale * (q[:, 3] / w[:, 0] + (star - un) * (star + p / m))], axis=1)
        return flux + clipped[:, None] * (q_star - q)


def initial_primitive(rng: np.random.Generator, n_trajectories: int, n: int, mach: float,
                      gamma: float, amplitude: float, k_peak: float) -> np.ndarray:
    """(ρ, u, v, p): ρ and p are 1 plus independent smooth fields of rms `amplitude`; u and v are
    smooth fields scaled so rms|u| / √(γ p̄ / ρ̄) equals `mach` exactly (bars: domain means)."""
    def smooth(shape):
        return random_field(rng, shape, lambda k: np.exp(-((k / k_peak) ** 2)))

    rho = 1.0 + amplitude * smooth((n_trajectories, n, n))
    p = 1.0 + amplitude * smooth((n_trajectories, n, n))
    vel = smooth((n_trajectories, 2, n, n))
    c_mean = np.sqrt(gamma * p.mean(axis=(-2, -1)) / rho.mean(axis=(-2, -1)))
    rms = np.sqrt(np.mean(np.sum(vel**2, axis=1), axis=(-2, -1)))
    vel *= (mach * c_mean / rms)[:, None, None, None]
    return np.stack([rho, vel[:, 0], vel[:, 1], p], axis=1)


def simulate(rng: np.random.Generator, n_trajectories: int, n: int, n_steps: int, *,
             mach: float = 0.5, gamma: float = 1.4, amplitude: float = 0.1, k_peak: float = 3.0,
             dt_save: float = 0.02) -> Trajectories:
    """Compressible flow from random smooth perturbations at a given rms Mach number.

    mach: rms speed over the mean sound speed √(γ p̄ / ρ̄) ≈ 1.18 at t = 0. gamma: ratio of
    specific heats. amplitude: rms of the relative density and pressure perturbations. k_peak:
    wavenumber scale (cycles per domain) of all initial fields. dt_save: time between saved steps
    (sound crosses the domain in about 0.85).
    """
    system = Euler(n, gamma)
    q = system.conserved(initial_primitive(rng, n_trajectories, n, mach, gamma, amplitude, k_peak))
    shape = (n_trajectories, n_steps, n, n)
    density, pressure, energy = (np.empty(shape, np.float32) for _ in range(3))
    velocity = np.empty(shape + (2,), np.float32)

    def record(part, t, q, w):
        density[part, t], pressure[part, t], energy[part, t] = w[:, 0], w[:, 3], q[:, 3]
        velocity[part, t] = np.moveaxis(w[:, 1:3], 1, -1)

    system.run(q, n_steps, dt_save, record)
    centres = cell_centres(n, LENGTH)
    return Trajectories(
        time=save_times(n_steps, dt_save),
        coords={"x": centres, "y": centres.copy()},
        t0_fields={"density": density, "pressure": pressure, "energy": energy},
        t1_fields={"velocity": velocity},
        parameters={"mach": float(mach), "gamma": float(gamma)},
    )
