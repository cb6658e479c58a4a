"""2D incompressible Navier–Stokes in vorticity–streamfunction form, pseudo-spectral, on [0, 2π)²,
carrying a passive tracer:

    ∂ω/∂t + u·∇ω = ν Δω + f,   ∂c/∂t + u·∇c = ν Δc,   Δψ = −ω,   u = ∂ψ/∂y,   v = −∂ψ/∂x,

with density 1, quadratic terms dealiased by the 2/3 rule and diffusion integrated exactly by an
integrating-factor RK4 step. The optional Kolmogorov forcing is the body force (A sin(4y), 0),
whose curl is f = −4 A cos(4y). Pressure is a diagnostic from Δp = −∇·(u·∇u), mean zero. The
tracer (Schmidt number 1) is the PDEBench `ns_incom` "particles" field. The domain side 2π makes
wavenumbers integers.
"""

import numpy as np

from dsfm.errors import SimulationError
from dsfm.sim.base import Trajectories, cell_centres, save_times
from dsfm.sim.batching import chunks
from dsfm.sim.spectral import dealias_mask, if_rk4_step, random_field, wavenumbers

DATASET_NAME = "navier_stokes_2d"
LENGTH = 2 * np.pi
FORCING_WAVENUMBER = 4
TRACER_K_PEAK = 2.0
CFL = 0.5
CHUNK_CELLS = 32768


class SpectralFlow:
    """Right-hand side, stable time step and diagnostics for batches of spectra
    [N, 2, n, n // 2 + 1] holding vorticity (channel 0) and tracer (channel 1)."""

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
        self.forcing_hat = np.zeros((2, n, n // 2 + 1), complex)
        self.forcing_hat[0] = np.fft.rfft2(np.broadcast_to(curl, (n, n)))

    def to_grid(self, spec: np.ndarray) -> np.ndarray:
        return np.fft.irfft2(spec, s=(self.n, self.n))

    def velocity(self, state_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) on the grid from the dealiased streamfunction."""
        psi = state_hat[:, 0] * self.psi_factor
        return self.to_grid(self.iky * psi), self.to_grid(-self.ikx * psi)

    def nonlinear(self, state_hat: np.ndarray) -> np.ndarray:
        """−u·∇(ω, c) + (f, 0) in Fourier space; products of 2/3-truncated fields truncated again,
        which is the exact Galerkin projection, so inviscid energy, enstrophy and tracer variance
        are conserved."""
        u, v = self.velocity(state_hat)
        masked = state_hat * self.mask
        advection = (u[:, None] * self.to_grid(self.ikx * masked)
                     + v[:, None] * self.to_grid(self.iky * masked))
        return -np.fft.rfft2(advection) * self.mask + self.forcing_hat

    def step(self, state_hat: np.ndarray, dt: float) -> np.ndarray:
        return if_rk4_step(state_hat, dt, self.linear, self.nonlinear)

    def max_dt(self, state_hat: np.ndarray) -> float:
        """Advective CFL limit; RK4 on the dealiased advection is stable to about 1.3 dx/|u|."""
        u, v = self.velocity(state_hat)
        speed = float(np.max(np.abs(u) + np.abs(v)))
        self._check_finite(speed)
        return CFL * self.dx / speed if speed > 0 else np.inf

    def advance(self, state_hat: np.ndarray, duration: float) -> np.ndarray:
        """Integrate over `duration` in equal substeps below the CFL limit."""
        steps = max(1, int(np.ceil(duration / self.max_dt(state_hat))))
        for _ in range(steps):
            state_hat = self.step(state_hat, duration / steps)
        self._check_finite(np.abs(state_hat).max())
        return state_hat

    def _check_finite(self, value: float) -> None:
        if not np.isfinite(value):
            raise SimulationError(
                f"navier_stokes: the flow became non-finite on the {self.n}² grid; raise the "
                "viscosity or the resolution")

    def pressure(self, state_hat: np.ndarray) -> np.ndarray:
        """Mean-zero p from Δp = −∇·(u·∇u) = −(u_x² + 2 u_y v_x + v_y²) = −2 (u_x² + u_y v_x),
        using v_y = −u_x; the quadratic source is dealiased like the dynamics."""
        psi = state_hat[:, 0] * self.psi_factor
        ux = self.to_grid(self.ikx * self.iky * psi)
        uy = self.to_grid(self.iky * self.iky * psi)
        vx = self.to_grid(-self.ikx * self.ikx * psi)
        source_hat = np.fft.rfft2(-2.0 * (ux**2 + uy * vx)) * self.mask
        return self.to_grid(-source_hat * self.inv_k2)


def initial_state(rng: np.random.Generator, n_trajectories: int, n: int,
                  k_peak: float) -> np.ndarray:
    """Spectra of random vorticity with energy spectrum E(k) ∝ k⁴ exp(−2 (k/k_peak)²) and rms
    speed 1, and of a random tracer blob pattern (Gaussian spectrum of width 2, zero mean, rms 1).

    E(k) sums |û|² over a shell of circumference ∝ k and |ω̂| = k |û|, so
    |ω̂(k)| ∝ k^(5/2) exp(−(k/k_peak)²).
    """
    mask = dealias_mask(n)
    w = random_field(rng, (n_trajectories, n, n), lambda k: k**2.5 * np.exp(-(k / k_peak) ** 2))
    c = random_field(rng, (n_trajectories, n, n), lambda k: np.exp(-(k / TRACER_K_PEAK) ** 2))
    state_hat = np.fft.rfft2(np.stack([w, c], axis=1)) * mask
    u, v = SpectralFlow(n, 0.0).velocity(state_hat)
    state_hat[:, 0] /= np.sqrt(np.mean(u**2 + v**2, axis=(-2, -1)))[:, None, None]
    return state_hat


def simulate(rng: np.random.Generator, n_trajectories: int, n: int, n_steps: int, *,
             viscosity: float = 4e-2, forcing: float = 0.0, dt_save: float = 0.1,
             k_peak: float = 2.0) -> Trajectories:
    """Decaying (or Kolmogorov-forced) 2D turbulence from random vorticity with rms speed 1.

    viscosity: kinematic viscosity ν, also the tracer diffusivity. The grid resolves the flow
    while the enstrophy dissipation wavenumber k_d = (β/ν³)^(1/6), β = ν⟨|∇ω|²⟩, stays well
    inside the 2/3-rule cutoff k_max = n/3: the defaults keep k_max/k_d ≈ 1.8 at n = 32 and the
    vorticity within 2% of the same flow on a grid twice as fine; finer grids afford less, about
    1e-2 at n = 64 (k_peak = 3) and 4e-3 at n = 128 (k_peak = 4). Below that, enstrophy piles up
    at the cutoff instead of being dissipated: ν = 1e-2 at n = 32 with k_peak = 3 has
    k_max/k_d ≈ 0.9 and strays 20% from the refined flow within 2 time units.
    forcing: amplitude A of the body force (A sin(4y), 0); 0 gives freely decaying turbulence.
    dt_save: time between saved steps (an eddy turns over in about 1/k_peak). k_peak:
    wavenumber of the peak of the initial energy spectrum.
    """
    flow = SpectralFlow(n, viscosity, forcing)
    initial = initial_state(rng, n_trajectories, n, k_peak)
    shape = (n_trajectories, n_steps, n, n)
    vorticity, tracer, pressure = (np.empty(shape, np.float32) for _ in range(3))
    velocity = np.empty(shape + (2,), np.float32)
    for part in chunks(n_trajectories, n, CHUNK_CELLS):
        state_hat = initial[part]
        for t in range(n_steps):
            if t > 0:
                state_hat = flow.advance(state_hat, dt_save)
            grid = flow.to_grid(state_hat)
            vorticity[part, t], tracer[part, t] = grid[:, 0], grid[:, 1]
            pressure[part, t] = flow.pressure(state_hat)
            velocity[part, t] = np.stack(flow.velocity(state_hat), axis=-1)
    centres = cell_centres(n, LENGTH)
    return Trajectories(
        time=save_times(n_steps, dt_save),
        coords={"x": centres, "y": centres.copy()},
        t0_fields={"vorticity": vorticity, "pressure": pressure, "tracer": tracer},
        t1_fields={"velocity": velocity},
        parameters={"viscosity": float(viscosity), "forcing": float(forcing)},
    )
