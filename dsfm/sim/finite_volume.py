"""Finite-volume core shared by the shallow-water and Euler solvers.

A state is a batch of conserved cell averages q [N, V, nx, ny] on a periodic square grid, x on
axis -2 and y on axis -1, variable 0 a density (ρ or h) and variables 1, 2 the x and y momenta.
Primitive variables w (density, u, v, ...) are reconstructed to cell faces by MUSCL with the van
Leer limiter, fluxes come from a system-specific approximate Riemann solver and time stepping is
SSP-RK3 under a CFL limit. Because fluxes are differenced between neighbouring faces, the totals
of all conserved variables change only by round-off.
"""

from collections.abc import Callable

import numpy as np

from dsfm.errors import PositivityError
from dsfm.sim.batching import chunks

AXES = (-2, -1)
FLOOR = 1e-10
CHUNK_CELLS = 8192


def van_leer_slopes(w: np.ndarray, axis: int) -> np.ndarray:
    """Limited cell slopes: the harmonic mean of the one-sided differences, zero at extrema, so
    face values stay between neighbouring cell values and positive quantities stay positive."""
    back = w - np.roll(w, 1, axis)
    fwd = np.roll(back, -1, axis)
    prod = back * fwd
    return np.divide(2.0 * prod, back + fwd, out=np.zeros_like(w), where=prod > 0)


def face_states(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Left and right states at face i+1/2 (stored at index i) along `axis`."""
    half = 0.5 * van_leer_slopes(w, axis)
    return w + half, np.roll(w - half, -1, axis)


def hll_flux(ql: np.ndarray, qr: np.ndarray, fl: np.ndarray, fr: np.ndarray, sl: np.ndarray,
             sr: np.ndarray) -> np.ndarray:
    """HLL flux from left/right conserved states, physical fluxes and wave-speed bounds; the
    clipped speeds make one formula cover the supersonic cases."""
    sl = np.minimum(sl, 0.0)[:, None]
    sr = np.maximum(sr, 0.0)[:, None]
    return (sr * fl - sl * fr + sl * sr * (qr - ql)) / (sr - sl)


class FiniteVolume:
    """Semi-discrete conservation law on [0, length)², advanced with SSP-RK3.

    Subclasses define the variables (`primitive`, `conserved`), which primitive variables must
    stay positive (`positive`: index → name), the fastest signal speed per direction and the
    Riemann solver, which gets face states rotated so that variable 1 is the normal velocity.
    """

    name = "finite_volume"
    positive: dict[int, str] = {0: "density"}
    cfl = 0.4

    def __init__(self, n: int, length: float):
        self.n = n
        self.dx = length / n
        self.time = 0.0
        self.first_trajectory = 0

    def primitive(self, q: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def conserved(self, w: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def signal_speeds(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """|u| + c and |v| + c per cell."""
        raise NotImplementedError

    def riemann(self, wl: np.ndarray, wr: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def check(self, w: np.ndarray) -> None:
        """Raise PositivityError, naming where and when, before a sqrt of a negative makes NaN."""
        for index, quantity in self.positive.items():
            x = w[:, index]
            bad = ~(x > FLOOR * np.abs(x).mean(axis=(-2, -1), keepdims=True))
            if bad.any():
                traj, ix, iy = np.argwhere(bad)[0]
                raise PositivityError(
                    f"{self.name}: {quantity} fell to {x[traj, ix, iy]:.3g} in trajectory "
                    f"{self.first_trajectory + traj} "
                    f"at cell ({ix}, {iy}), t ≈ {self.time:.4g} (n={self.n}); the flow is too "
                    "violent for this grid: lower the amplitude or Mach number, or refine the grid")

    def rhs(self, q: np.ndarray) -> np.ndarray:
        """−∇·F(q) by flux differences; y faces are solved in a frame with u and v swapped."""
        w = self.primitive(q)
        self.check(w)
        swap = np.arange(q.shape[1])
        swap[[1, 2]] = [2, 1]
        dq = np.zeros_like(q)
        for axis in AXES:
            wl, wr = face_states(w, axis)
            if axis == -1:
                flux = self.riemann(wl[:, swap], wr[:, swap])[:, swap]
            else:
                flux = self.riemann(wl, wr)
            dq -= (flux - np.roll(flux, 1, axis)) / self.dx
        return dq

    def max_dt(self, q: np.ndarray) -> float:
        w = self.primitive(q)
        self.check(w)
        sx, sy = self.signal_speeds(w)
        return self.cfl * self.dx / float(np.max(sx + sy))

    def step(self, q: np.ndarray, dt: float) -> np.ndarray:
        """Shu–Osher SSP-RK3: convex combinations of forward-Euler steps keep their positivity."""
        q1 = q + dt * self.rhs(q)
        q2 = 0.75 * q + 0.25 * (q1 + dt * self.rhs(q1))
        return q / 3.0 + 2.0 / 3.0 * (q2 + dt * self.rhs(q2))

    def advance(self, q: np.ndarray, duration: float) -> np.ndarray:
        """Integrate over `duration`, re-evaluating the CFL step every step, landing on the end."""
        remaining = duration
        while remaining > 0:
            dt = min(self.max_dt(q), remaining)
            q = self.step(q, dt)
            remaining = remaining - dt if dt < remaining else 0.0
            self.time += dt
        return q

    def run(self, q: np.ndarray, n_steps: int, dt_save: float,
            record: Callable[[slice, int, np.ndarray, np.ndarray], None]) -> None:
        """Advance trajectories q through `n_steps` saved times, calling
        record(trajectories, t_index, q, w) at each; chunks of trajectories run one after another,
        each with its own CFL steps. Every saved state is checked first: the last step's result
        is otherwise never looked at (the next step's check never comes), nor is a run's only
        saved state."""
        for part in chunks(len(q), self.n, CHUNK_CELLS):
            qc, self.time, self.first_trajectory = q[part], 0.0, part.start
            for t in range(n_steps):
                if t > 0:
                    qc = self.advance(qc, dt_save)
                w = self.primitive(qc)
                self.check(w)
                record(part, t, qc, w)
