"""Which windows each rank reads at each step: MPP-style balanced multi-dataset sampling.

Every micro-batch comes from one dataset, drawn with configurable weights (uniform by default),
optionally the same dataset on all ranks at a given step. Each rank reads a dataset's windows in
epochs, a fresh shuffle each, and no two ranks ever read one window at once:

- with the same dataset on all ranks, the ranks move through a dataset's epochs together, and
  each epoch deals the whole dataset anew (rank r takes every world_size-th window of the
  epoch's shuffle; the size // world_size · world_size dealt change every epoch, so every window
  is read over epochs);
- with independent draws, the ranks' epochs of a dataset drift apart, so a new deal per epoch
  would hand one rank windows another is still reading: the dataset is dealt once (rank r keeps
  every world_size-th window of a fixed shuffle, all of them dealt) and each rank reshuffles its
  own part every epoch.

A dataset that runs out starts its next epoch. Everything is a function of (seed, step, rank,
per-dataset epoch and cursor), so `state_dict()` / `load_state_dict()` make a resumed run
continue with exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dsfm.errors import ConfigError

_DATASET_STREAM = 0x5EED      # separates the dataset-choice stream from the shuffles
_DEAL_STREAM = 0xDEA1         # the fixed deal (independent draws) and the shuffles of its parts


class MixtureSampler:
    def __init__(self, sizes: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, weights: Sequence[float] | None = None,
                 same_dataset_across_ranks: bool = False, names: Sequence[str] | None = None):
        for what, value in (("batch_size", batch_size), ("seed", seed), ("rank", rank),
                            ("world_size", world_size)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ConfigError(f"{what} must be an integer, got {value!r}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        self.sizes = [int(s) for s in sizes]
        self.names = list(names) if names is not None else [str(i) for i in range(len(sizes))]
        if not self.sizes:
            raise ConfigError("no datasets to sample from")
        if len(self.names) != len(self.sizes) or min(self.sizes) < 0:
            raise ConfigError(f"sizes {self.sizes} must be non-negative, one per dataset "
                              f"({', '.join(self.names)})")
        twice = sorted({n for n in self.names if self.names.count(n) > 1})
        if twice:
            raise ConfigError(f"dataset {', '.join(twice)} is listed more than once "
                              f"({', '.join(self.names)}); raise its weight instead")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        w = np.ones(len(self.sizes)) if weights is None else np.asarray(weights, dtype=float)
        if (w.shape != (len(self.sizes),) or not np.isfinite(w).all() or (w < 0).any()
                or w.max() <= 0):
            raise ConfigError(f"weights {[float(x) for x in w.ravel()]} must be "
                              f"{len(self.sizes)} finite non-negative numbers with a positive "
                              f"sum, one per dataset ({', '.join(self.names)})")
        for name, size, weight in zip(self.names, self.sizes, w):
            if weight > 0 and size // world_size < batch_size:    # weight 0: never drawn
                raise ConfigError(
                    f"dataset {name} has {size} windows: fewer than batch_size {batch_size} per "
                    f"rank with {world_size} ranks; lower the batch size or add data")
        if w.max() > np.finfo(float).max / len(w):     # finite, but their sum could overflow
            w = w / w.max()
        self.weights = w / w.sum()
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.same_dataset_across_ranks = same_dataset_across_ranks
        self.step = 0
        self.epochs = [0] * len(self.sizes)
        self.cursors = [0] * len(self.sizes)
        self._shards: dict[int, np.ndarray] = {}
        self._parts: dict[int, np.ndarray] = {}     # independent draws: this rank's deal

    def shard(self, dataset: int, epoch: int) -> np.ndarray:
        """This rank's windows of `dataset` in epoch `epoch`, in reading order (a copy: the
        whole shuffle is not kept alive by a view of it)."""
        size, world = self.sizes[dataset], self.world_size
        if self.same_dataset_across_ranks:
            perm = np.random.default_rng([self.seed, dataset, epoch]).permutation(size)
            return perm[self.rank::world][:size // world].copy()
        part = self._parts.get(dataset)
        if part is None:
            deal = np.random.default_rng([self.seed, _DEAL_STREAM, dataset]).permutation(size)
            part = self._parts[dataset] = deal[self.rank::world].copy()
        order = np.random.default_rng([self.seed, _DEAL_STREAM, dataset, self.rank, epoch])
        return part[order.permutation(len(part))]

    def _current_shard(self, dataset: int) -> np.ndarray:
        key = dataset
        cached = self._shards.get(key)
        if cached is None or cached[0] != self.epochs[dataset]:
            cached = (self.epochs[dataset], self.shard(dataset, self.epochs[dataset]))
            self._shards[key] = cached
        return cached[1]

    def choose_dataset(self, step: int) -> int:
        if len(self.sizes) == 1:
            return 0                    # what the draw gives, without its 30 µs
        key = [self.seed, _DATASET_STREAM, step]
        if not self.same_dataset_across_ranks:
            key.append(self.rank)
        return int(np.random.default_rng(key).choice(len(self.sizes), p=self.weights))

    def next(self) -> tuple[int, np.ndarray]:
        """(dataset index, window ids) of the next micro-batch; advances the state."""
        d = self.choose_dataset(self.step)
        shard = self._current_shard(d)
        if self.cursors[d] + self.batch_size > len(shard):
            self.epochs[d] += 1
            self.cursors[d] = 0
            shard = self._current_shard(d)
        ids = shard[self.cursors[d]:self.cursors[d] + self.batch_size]
        self.cursors[d] += self.batch_size
        self.step += 1
        return d, ids

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {"step": self.step, "epochs": list(self.epochs), "cursors": list(self.cursors),
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "sizes": list(self.sizes), "batch_size": self.batch_size,
                "weights": self.weights.tolist(),
                "same_dataset_across_ranks": self.same_dataset_across_ranks,
                "names": list(self.names)}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in self.state_dict() if k != "names" and k not in state]
        if missing:
            raise ConfigError(f"sampler state lacks {', '.join(missing)}: not a state_dict() "
                              "of this sampler")
        for key in ("seed", "rank", "world_size", "sizes", "batch_size",
                    "same_dataset_across_ranks") + (("names",) if "names" in state else ()):
            if state[key] != getattr(self, key):
                raise ConfigError(f"sampler state has {key}={state[key]!r} but this run has "
                                  f"{getattr(self, key)!r}: resume with the same data and layout")
        if not np.allclose(state["weights"], self.weights):
            raise ConfigError(f"sampler state has weights {state['weights']} but this run has "
                              f"{self.weights.tolist()}")
        n = len(self.sizes)
        if (len(state["epochs"]) != n or len(state["cursors"]) != n
                or min(state["epochs"]) < 0 or min(state["cursors"]) < 0
                or int(state["step"]) < 0):
            raise ConfigError(f"sampler state has epochs {state['epochs']} and cursors "
                              f"{state['cursors']}: not {n} non-negative positions")
        self.step = int(state["step"])
        self.epochs = [int(e) for e in state["epochs"]]
        self.cursors = [int(c) for c in state["cursors"]]
