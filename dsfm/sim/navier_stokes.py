"""2D incompressible Navier–Stokes in vorticity–streamfunction form, pseudo-spectral, on [0, 2π)².

    ∂ω/∂t + u·∇ω = ν Δω + f,   Δψ = −ω,   u = ∂ψ/∂y,   v = −∂ψ/∂x,

with density 1, quadratic terms dealiased by the 2/3 rule and the viscous term integrated exactly
by an integrating-factor RK4 step. The optional Kolmogorov forcing is the body force
(A sin(4y), 0), whose curl is f = −4 A cos(4y). Pressure is a diagnostic from Δp = −∇·(u·∇u), mean
zero. The domain side 2π makes wavenumbers integers.
"""

import numpy as np

from dsfm.sim.base import Trajectories
from dsfm.sim.spectral import dealias_mask, if_rk4_step, random_field, wavenumbers

DATASET_NAME = "navier_stokes_2d"
LENGTH = 2 * np.pi
FORCING_WAVENUMBER = 4
CFL = 0.5


class VorticitySolver:
    """Right-hand side, stable time step and diagnostics for a batch of vorticity spectra."""

    def __init__(self, n: int, viscosity: float, forcing: float = 0.0):
        kx, ky = wavenumbers(n, LENGTH)
        self.n = n
        self.dx = LENGTH / n
        self.ikx, self.iky = 1j * kx, 1j * ky
        k2 = kx**2 + ky**2
        self.mask = dealias_mask(n)
        self.inv_k2 = np.zeros_like(k2)
        self.inv_k2[k2 > 0] = 1.0 / k2[k2 > 0]
        self.psi_factor = self.inv_k2 * self.mask
        self.linear = -viscosity * k2
        y = (np.arange(n) + 0.5) * self.dx
        curl = -FORCING_WAVENUMBER * forcing * np.cos(FORCING_WAVENUMBER * y)[None, :]
        self.forcing_hat = np.fft.rfft2(np.broadcast_to(curl, (n, n)))

    def to_grid(self, spec: np.ndarray) -> np.ndarray:
        return np.fft.irfft2(spec, s=(self.n, self.n))

    def velocity(self, w_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) on the grid from the dealiased streamfunction."""
        psi = w_hat * self.psi_factor
        return self.to_grid(self.iky * psi), self.to_grid(-self.ikx * psi)

    def nonlinear(self, w_hat: np.ndarray) -> np.ndarray:
        """−u·∇ω + f in Fourier space; products of 2/3-truncated fields truncated again, which is
        the exact Galerkin projection, so inviscid energy and enstrophy are conserved."""
        u, v = self.velocity(w_hat)
        wm = w_hat * self.mask
        advection = u * self.to_grid(self.ikx * wm) + v * self.to_grid(self.iky * wm)
        return -np.fft.rfft2(advection) * self.mask + self.forcing_hat

    def step(self, w_hat: np.ndarray, dt: float) -> np.ndarray:
        return if_rk4_step(w_hat, dt, self.linear, self.nonlinear)

    def max_dt(self, w_hat: np.ndarray) -> float:
        """Advective CFL limit; RK4 on the dealiased advection is stable to about 1.3 dx/|u|."""
        u, v = self.velocity(w_hat)
        speed = float(np.max(np.abs(u) + np.abs(v)))
        return CFL * self.dx / speed if speed > 0 else np.inf

    def advance(self, w_hat: np.ndarray, duration: float) -> np.ndarray:
        """Integrate over `duration` in equal substeps below the CFL limit."""
        steps = max(1, int(np.ceil(duration / self.max_dt(w_hat))))
        for _ in range(steps):
            w_hat = self.step(w_hat, duration / steps)
        if not np.all(np.isfinite(w_hat)):
            raise FloatingPointError(
                f"navier_stokes: vorticity became non-finite (n={self.n}); lower dt_save or raise "
                "the viscosity")
        return w_hat

    def pressure(self, w_hat: np.ndarray) -> np.ndarray:
        """Mean-zero p from Δp = −∇·(u·∇u) = −(u_x² + 2 u_y v_x + v_y²) = −2 (u_x² + u_y v_x),
        using v_y = −u_x; the quadratic source is dealiased like the dynamics."""
        psi = w_hat * self.psi_factor
        ux = self.to_grid(self.ikx * self.iky * psi)
        uy = self.to_grid(self.iky * self.iky * psi)
        vx = self.to_grid(-self.ikx * self.ikx * psi)
        source_hat = np.fft.rfft2(-2.0 * (ux**2 + uy * vx)) * self.mask
        return self.to_grid(-source_hat * self.inv_k2)


def initial_vorticity(rng: np.random.Generator, n_trajectories: int, n: int,
                      k_peak: float) -> np.ndarray:
    """Random vorticity spectra with energy spectrum E(k) ∝ k⁴ exp(−2 (k/k_peak)²), rms speed 1.

    E(k) sums |û|² over a shell of circumference ∝ k and |ω̂| = k |û|, so |ω̂(k)| ∝ k^(5/2) e^(−(k/k_peak)²).
    """
    w = random_field(rng, (n_trajectories, n, n), lambda k: k**2.5 * np.exp(-(k / k_peak) ** 2))
    w_hat = np.fft.rfft2(w) * dealias_mask(n)
    solver = VorticitySolver(n, 0.0)
    u, v = solver.velocity(w_hat)
    rms = np.sqrt(np.mean(u**2 + v**2, axis=(-2, -1)))
    return w_hat / rms[:, None, None]


def simulate(rng: np.random.Generator, n_trajectories: int, n: int, n_steps: int, *,
             viscosity: float = 1e-3, forcing: float = 0.0, dt_save: float = 0.1,
             k_peak: float = 4.0) -> Trajectories:
    """Decaying (or Kolmogorov-forced) 2D turbulence from random vorticity with rms speed 1.

    viscosity: kinematic viscosity ν. forcing: amplitude A of the body force (A sin(4y), 0); 0
    gives freely decaying turbulence. dt_save: time between saved steps (an eddy turnover is about
    1/k_peak). k_peak: wavenumber of the peak of the initial energy spectrum.
    """
    solver = VorticitySolver(n, viscosity, forcing)
    w_hat = initial_vorticity(rng, n_trajectories, n, k_peak)
    shape = (n_trajectories, n_steps, n, n)
    vorticity, pressure = np.empty(shape, np.float32), np.empty(shape, np.float32)
    velocity = np.empty(shape + (2,), np.float32)
    for t in range(n_steps):
        if t > 0:
            w_hat = solver.advance(w_hat, dt_save)
        vorticity[:, t] = solver.to_grid(w_hat)
        pressure[:, t] = solver.pressure(w_hat)
        u, v = solver.velocity(w_hat)
        velocity[:, t, ..., 0], velocity[:, t, ..., 1] = u, v
    centres = ((np.arange(n) + 0.5) * LENGTH / n).astype(np.float32)
    return Trajectories(
        time=(np.arange(n_steps) * dt_save).astype(np.float32),
        coords={"x": centres, "y": centres.copy()},
        t0_fields={"vorticity": vorticity, "pressure": pressure},
        t1_fields={"velocity": velocity},
        parameters={"viscosity": float(viscosity), "forcing": float(forcing)},
    )
