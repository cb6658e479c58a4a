"""Field normalization from a dataset's stats.yaml (z-score or RMS), upstream-compatible.

`ZScoreNormalization` and `RMSNormalization` take the constructor arguments of the_well's classes
of the same names and give bit-identical results (per field, and through the `*_flattened`
methods on channel-last tensors that the_well's Trainer calls); they also hand out per-channel
(shift, scale) vectors so the loaders can normalize a whole window, or a batch on the GPU, in one
operation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dsfm.errors import ConfigError, StatsError

MIN_DENOM = 1e-4


class _Normalization:
    required: tuple[str, ...] = ()
    delta_keys: tuple[str, ...] = ()

    def __init__(self, stats: dict, core_field_names: Sequence[str],
                 core_constant_field_names: Sequence[str], min_denom: float = MIN_DENOM):
        self.path = stats.get("__path__", "stats.yaml")
        self.core_field_names = list(core_field_names)
        self.core_constant_field_names = list(core_constant_field_names)
        self.min_denom = min_denom
        missing = [k for k in self.required if k not in stats]
        if missing:
            raise StatsError(f"{self.path}: missing key '{missing[0]}' "
                             f"({type(self).__name__} needs {', '.join(self.required)})")
        self._stats = stats

    def _get(self, key: str, name: str, default=None) -> torch.Tensor:
        table = self._stats[key]
        if not isinstance(table, dict) or (name not in table and default is None):
            raise StatsError(f"{self.path}: '{key}' has no entry for field '{name}'")
        try:
            value = torch.as_tensor(table.get(name, default), dtype=torch.float32)
        except (TypeError, ValueError):
            raise StatsError(f"{self.path}: '{key}.{name}' is not a number or nested list of "
                             f"numbers: {table.get(name)!r}") from None
        # as dsfm.data.check refuses them: a negative scale was taken as min_denom (the field
        # scaled up 10^4 times), an infinite one made the field zeros, a NaN made it NaN
        if not torch.isfinite(value).all():
            raise StatsError(f"{self.path}: '{key}.{name}' is not finite: {table.get(name)!r}")
        if key.startswith(("std", "rms")) and (value < 0).any():
            raise StatsError(f"{self.path}: '{key}.{name}' is negative: {table.get(name)!r}")
        return value

    # per-field tensors, filled by subclasses: shift and scale such that y = (x - shift) / scale
    shift: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]
    delta_shift: dict[str, torch.Tensor]
    delta_scale: dict[str, torch.Tensor]

    def normalize(self, x: torch.Tensor, field: str) -> torch.Tensor:
        return (x - self.shift[field]) / self.scale[field]

    def denormalize(self, x: torch.Tensor, field: str) -> torch.Tensor:
        return x * self.scale[field] + self.shift[field]

    def delta_normalize(self, x: torch.Tensor, field: str) -> torch.Tensor:
        return (x - self.delta_shift[field]) / self.delta_scale[field]

    # ------------------------------------------------ upstream's API on channel-last tensors
    # (the_well's Trainer calls these on a dataset's `norm`): the statistics of the fields in
    # core order, flattened; a mode with no fields gets upstream's placeholder [1.0]; constant
    # fields have no delta statistics, upstream uses min_denom for both their shift and scale.

    def _flat(self, mode: str, delta: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if mode not in ("variable", "constant"):
            raise ValueError(f"normalization mode {mode!r} is not 'variable' or 'constant'")
        key = (mode, delta)
        cache = self.__dict__.setdefault("_flat_cache", {})
        if key not in cache:
            names = self.core_field_names if mode == "variable" else \
                self.core_constant_field_names
            if delta and mode == "constant":
                shifts = [torch.full_like(self.shift[n], self.min_denom) for n in names]
                scales = [torch.full_like(self.scale[n], self.min_denom) for n in names]
            else:
                shifts = [(self.delta_shift if delta else self.shift)[n] for n in names]
                scales = [(self.delta_scale if delta else self.scale)[n] for n in names]
            cache[key] = tuple(torch.cat([t.flatten() for t in ts]) if ts else torch.tensor([1.0])
                               for ts in (shifts, scales))
        return cache[key]

    def _flat_on(self, x: torch.Tensor, mode: str, delta: bool):
        shift, scale = self._flat(mode, delta)
        if x.shape[-1] != scale.shape[-1]:
            raise ValueError(f"{self.path}: {mode} statistics cover {scale.shape[-1]} channels, "
                             f"the tensor has {x.shape[-1]} (last dimension)")
        return shift.to(x.device), scale.to(x.device)

    def _flat_forward(self, x: torch.Tensor, mode: str, delta: bool) -> torch.Tensor:
        shift, scale = self._flat_on(x, mode, delta)
        return (x - shift) / scale

    def _flat_inverse(self, x: torch.Tensor, mode: str, delta: bool) -> torch.Tensor:
        shift, scale = self._flat_on(x, mode, delta)
        return x * scale + shift

    def normalize_flattened(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        return self._flat_forward(x, mode, False)

    def denormalize_flattened(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        return self._flat_inverse(x, mode, False)

    def delta_normalize_flattened(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        return self._flat_forward(x, mode, True)

    def delta_denormalize_flattened(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        return self._flat_inverse(x, mode, True)

    def channel_vectors(self, fields, delta: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(shift, scale) per channel, float32, for FieldLayouts in channel order."""
        shifts, scales = [], []
        for fl in fields:
            shift = (self.delta_shift if delta else self.shift)[fl.name]
            scale = (self.delta_scale if delta else self.scale)[fl.name]
            n = fl.n_channels
            for t in (shift, scale):
                if t.numel() not in (1, n):
                    raise StatsError(f"{self.path}: statistics of '{fl.name}' have {t.numel()} "
                                     f"values, the field has {n} channels")
            shifts.append(shift.reshape(-1).expand(n))
            scales.append(scale.reshape(-1).expand(n))
        if not shifts:
            return np.zeros(0, np.float32), np.ones(0, np.float32)
        return torch.cat(shifts).numpy().copy(), torch.cat(scales).numpy().copy()


class ZScoreNormalization(_Normalization):
    """(x - mean) / max(std, min_denom), per field and tensor component."""

    required = ("mean", "std", "mean_delta", "std_delta")

    def __init__(self, stats, core_field_names, core_constant_field_names, min_denom=MIN_DENOM):
        super().__init__(stats, core_field_names, core_constant_field_names, min_denom)
        names = self.core_field_names + self.core_constant_field_names
        self.shift = {n: self._get("mean", n) for n in names}
        self.scale = {n: torch.clip(self._get("std", n), min=min_denom) for n in names}
        self.delta_shift = {n: self._get("mean_delta", n) for n in self.core_field_names}
        self.delta_scale = {n: torch.clip(self._get("std_delta", n, min_denom), min=min_denom)
                            for n in self.core_field_names}


class RMSNormalization(_Normalization):
    """x / max(rms, min_denom), per field and tensor component."""

    required = ("rms", "rms_delta")

    def __init__(self, stats, core_field_names, core_constant_field_names, min_denom=MIN_DENOM):
        super().__init__(stats, core_field_names, core_constant_field_names, min_denom)
        names = self.core_field_names + self.core_constant_field_names
        self.scale = {n: torch.clip(self._get("rms", n), min=min_denom) for n in names}
        self.shift = {n: torch.zeros_like(v) for n, v in self.scale.items()}
        self.delta_scale = {n: torch.clip(self._get("rms_delta", n, min_denom), min=min_denom)
                            for n in self.core_field_names}
        self.delta_shift = {n: torch.zeros_like(v) for n, v in self.delta_scale.items()}

    def normalize(self, x: torch.Tensor, field: str) -> torch.Tensor:
        return x / self.scale[field]

    # upstream's RMS ignores the shift, also constant fields' min_denom placeholder for delta
    def _flat_forward(self, x: torch.Tensor, mode: str, delta: bool) -> torch.Tensor:
        return x / self._flat_on(x, mode, delta)[1]

    def _flat_inverse(self, x: torch.Tensor, mode: str, delta: bool) -> torch.Tensor:
        return x * self._flat_on(x, mode, delta)[1]


NORMALIZATIONS = {"zscore": ZScoreNormalization, "rms": RMSNormalization}


def resolve_normalization(kind) -> type | None:
    """Map "zscore"/"rms", dsfm's classes or upstream's classes of the same names to a class.

    Any other class with upstream's constructor and `normalize(x, field)` is used as given.
    """
    if kind is None:
        return None
    if isinstance(kind, str):
        try:
            return NORMALIZATIONS[kind.lower()]
        except KeyError:
            raise ConfigError(f"normalization_type {kind!r} is not one of "
                              f"{', '.join(NORMALIZATIONS)}") from None
    name = getattr(kind, "__name__", "")
    if name == "ZScoreNormalization":
        return ZScoreNormalization
    if name == "RMSNormalization":
        return RMSNormalization
    if callable(kind):
        return kind
    raise ConfigError(f"normalization_type must be 'zscore', 'rms' or a normalization class, "
                      f"got {kind!r}")
