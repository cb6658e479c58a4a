"""Dataset presets for `python -m dsfm.sim --preset NAME`.

`demo` is tiny (32², a few trajectories per parameter set): the default training run and every
test use it, and all four datasets generate in well under two minutes on two cores. `small`
(64² to 128², tens of trajectories) is enough for a meaningful pretraining run on one node.
The Navier–Stokes viscosities and initial scales are as turbulent as each grid resolves (see
`navier_stokes.simulate`); less viscous flows would pile enstrophy up at the grid's cutoff.
"""

from dsfm.sim.build import DatasetSpec
from dsfm.sim.gray_scott import REGIMES

PRESETS: dict[str, dict[str, DatasetSpec]] = {
    "demo": {
        "navier_stokes": DatasetSpec(
            "navier_stokes", n=32, n_steps=24, splits=(4, 1, 1),
            parameter_sets=[{"viscosity": 4e-2}, {"viscosity": 8e-2}],
            options={"dt_save": 0.1, "k_peak": 2.0}),
        "shallow_water": DatasetSpec(
            "shallow_water", n=32, n_steps=24, splits=(4, 1, 1),
            parameter_sets=[{"g": 1.0}, {"g": 4.0}]),
        "gray_scott": DatasetSpec(
            "gray_scott", n=32, n_steps=24, splits=(4, 1, 1),
            parameter_sets=[REGIMES["spots"], REGIMES["maze"]],
            options={"length": 0.5}),
        "euler": DatasetSpec(
            "euler", n=32, n_steps=24, splits=(4, 1, 1),
            parameter_sets=[{"mach": 0.1}, {"mach": 1.0}]),
    },
    "small": {
        "navier_stokes": DatasetSpec(
            "navier_stokes", n=128, n_steps=60, splits=(32, 4, 4),
            parameter_sets=[{"viscosity": 4e-3}, {"viscosity": 8e-3}],
            options={"dt_save": 0.1, "k_peak": 4.0}),
        "shallow_water": DatasetSpec(
            "shallow_water", n=64, n_steps=60, splits=(32, 4, 4),
            parameter_sets=[{"g": 1.0}, {"g": 4.0}]),
        "gray_scott": DatasetSpec(
            "gray_scott", n=128, n_steps=60, splits=(16, 2, 2),
            parameter_sets=[REGIMES["spots"], REGIMES["maze"], REGIMES["gliders"],
                            REGIMES["worms"]]),
        "euler": DatasetSpec(
            "euler", n=64, n_steps=60, splits=(32, 4, 4),
            parameter_sets=[{"mach": 0.1}, {"mach": 1.0}]),
    },
}
