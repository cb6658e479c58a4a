"""The global field vocabulary: one column of the shared field embedding per physical field.

By default every (dataset, channel) pair is its own column (`euler_2d/pressure` and
`navier_stokes_2d/pressure` are different fields), as MPP does across its datasets; with
`shared=True` equal channel names share a column. The order is fixed by the order datasets and
channels are added, so a vocabulary saved with a checkpoint maps the same fields to the same
columns when fine-tuning adds new ones at the end.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from dsfm.errors import ConfigError


class FieldVocabulary:
    def __init__(self, keys: Iterable[str] = (), shared: bool = False):
        self.shared = shared
        self._ids: dict[str, int] = {}
        for key in keys:
            self._ids.setdefault(key, len(self._ids))

    def key(self, dataset: str, channel: str) -> str:
        return channel if self.shared else f"{dataset}/{channel}"

    def add(self, dataset: str, channels: Sequence[str]) -> list[int]:
        """Columns of `channels` of `dataset`, appending the ones not seen yet."""
        for c in channels:
            self._ids.setdefault(self.key(dataset, c), len(self._ids))
        return self.ids(dataset, channels)

    def ids(self, dataset: str, channels: Sequence[str]) -> list[int]:
        try:
            return [self._ids[self.key(dataset, c)] for c in channels]
        except KeyError as exc:
            raise ConfigError(f"field {exc.args[0]!r} is not in the vocabulary of "
                              f"{len(self)} fields; add it (fine-tuning) first") from None

    @property
    def keys(self) -> list[str]:
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def state_dict(self) -> dict:
        return {"keys": self.keys, "shared": self.shared}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FieldVocabulary":
        return cls(state["keys"], state.get("shared", False))
