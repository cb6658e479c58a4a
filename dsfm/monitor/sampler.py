"""The background-thread skeleton shared by the GPU and system samplers.

A sampler reads its metrics every `interval_s` on a daemon thread and accumulates them;
`snapshot()` hands the train loop the mean of each metric over the samples taken since the
previous snapshot, so a log step sees what happened during its window rather than one instant.
Keys listed in `_LAST` are cumulative (reported as the latest value) and keys in `_OR` are
bitmasks (OR-ed over the window, since a mean of bits means nothing).
"""

from __future__ import annotations

import threading
import time
from typing import Callable


class BackgroundSampler:
    _LAST: frozenset[str] = frozenset()
    _OR: frozenset[str] = frozenset()
    name = "sampler"

    def __init__(self, interval_s: float, notice: Callable[[str], None] = print):
        if not interval_s > 0:
            raise ValueError(f"{self.name}: interval_s must be > 0, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self.notice = notice
        self.samples = 0
        self._lock = threading.Lock()
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._masks: dict[str, int] = {}
        self._latest: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def available(self) -> bool:
        return True

    def _read(self) -> dict[str, float]:
        """One reading of every metric (rates against the previous reading)."""
        raise NotImplementedError

    def _close(self) -> None:
        """Release what the sampler holds (called once by stop())."""

    def sample(self) -> dict[str, float]:
        """Take one sample now, in the calling thread; it also counts towards snapshot()."""
        if self._closed or not self.available:
            return {}
        values = self._read()
        with self._lock:
            self.samples += 1
            for key, value in values.items():
                self._latest[key] = value
                if key in self._OR:
                    self._masks[key] = self._masks.get(key, 0) | int(value)
                elif key not in self._LAST:
                    self._sums[key] = self._sums.get(key, 0.0) + value
                    self._counts[key] = self._counts.get(key, 0) + 1
        return values

    def snapshot(self) -> dict[str, float]:
        """Mean of each metric over the samples since the previous snapshot (cumulative keys:
        the latest value; bitmasks: OR). With no new sample in between, the latest values."""
        with self._lock:
            out = dict(self._latest)
            for key, total in self._sums.items():
                out[key] = total / self._counts[key]
            for key, mask in self._masks.items():
                out[key] = float(mask)
            self._sums.clear()
            self._counts.clear()
            self._masks.clear()
        return out

    def start(self) -> None:
        """Sample every interval_s on a daemon thread until stop() (no-op when unavailable)."""
        running = self._thread is not None and self._thread.is_alive()
        if self._closed or running or not self.available:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"dsfm-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and release the sampler's resources; a stopped sampler stays
        stopped (snapshot() still returns what was gathered)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
            self._thread = None
        if not self._closed:
            self._closed = True
            self._close()

    def _loop(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:  # a monitor must never take the training run down
                self.notice(f"{self.name}: sampling stopped after an unexpected error: "
                            f"{type(exc).__name__}: {exc}")
                with self._lock:          # no more values: a gap in the charts, not a flat
                    self._latest.clear()  # line of the last ones
                    self._sums.clear()
                    self._counts.clear()
                    self._masks.clear()
                return
            next_t += self.interval_s
            now = time.monotonic()
            if next_t < now:                        # fell behind (suspended, overloaded)
                next_t = now
            self._stop.wait(next_t - now)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
