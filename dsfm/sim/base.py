"""What every simulator hands to the dataset writer.

A simulator integrates one physical system for a batch of trajectories that share one set of
simulation parameters and one grid, and returns a `Trajectories`. The writer (`dsfm.sim.build`)
turns these into Well-format files, splits and stats; simulators never touch HDF5.
"""

from dataclasses import dataclass, field

import numpy as np


def cell_centres(n: int, length: float, origin: float = 0.0) -> np.ndarray:
    """Coordinates of the centres of n equal cells covering [origin, origin + length), float32."""
    return ((np.arange(n) + 0.5) * length / n + origin).astype(np.float32)


def save_times(n_steps: int, dt_save: float) -> np.ndarray:
    """Times of the saved steps, from 0, float32."""
    return (np.arange(n_steps) * dt_save).astype(np.float32)


@dataclass
class Trajectories:
    """N trajectories of one system at one parameter set.

    Arrays are float32. Spatial axes are ordered as `coords` (x first, then y): a field sampled on
    an nx × ny grid has shape [N, T, nx, ny]; vector (t1) fields add a trailing component axis
    [N, T, nx, ny, 2] in the order (x, y).
    """

    time: np.ndarray                                   # [T] saved times, starting at 0
    coords: dict[str, np.ndarray]                      # {"x": [nx], "y": [ny]} cell centres
    t0_fields: dict[str, np.ndarray]                   # name -> [N, T, nx, ny]
    t1_fields: dict[str, np.ndarray] = field(default_factory=dict)  # name -> [N, T, nx, ny, 2]
    parameters: dict[str, float] = field(default_factory=dict)      # simulation parameters
    bc_type: str = "PERIODIC"                          # every boundary of every dim
