"""Where a run's numbers go: TensorBoard scalars, metrics.jsonl and train.log in the run
directory, and the console. Rank 0 writes; the other ranks hold a logger that does nothing."""

from __future__ import annotations

import json
import math
import os
import sys
import time


class MetricsLogger:
    def __init__(self, run_dir: str, rank: int, echo: bool = True):
        self.enabled = rank == 0
        self.echo = echo
        self._tb = None
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        tb = os.path.join(run_dir, "tb")
        # event files of an earlier process in this run directory
        self._earlier_events = os.path.isdir(tb) and any(
            name.startswith("events.out.tfevents.") for name in os.listdir(tb))
        self._tb = SummaryWriter(tb)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        self._log = open(os.path.join(run_dir, "train.log"), "a")

    def resume_at(self, step: int, redo_eval: bool = False) -> int:
        """A run resumed from the checkpoint of `step` trains the steps after it again: their
        records from before (logged after that checkpoint, then lost with the process) are
        dropped from metrics.jsonl, and TensorBoard is told to purge them from its older event
        files (`purge_step`), so that each step has one value and no curve doubles back.

        `redo_eval`: the run evaluates `step` again (the dead run stopped before writing its
        eval JSON, perhaps after logging its scalars): that step's evaluation records go too.
        TensorBoard purges whole steps, so it purges `step` itself and is given the step's
        other scalars again, as metrics.jsonl holds them (with their wall times).

        `step` -1: the run starts from scratch, so every earlier record goes (those of a run
        that died here before its first checkpoint; step 0's evaluation too, which the new run
        makes again); in a new run directory, nothing happens. Returns how many metrics.jsonl
        records were dropped."""
        if not self.enabled:
            return 0
        from torch.utils.tensorboard import SummaryWriter

        self._jsonl.close()
        path = os.path.join(self.run_dir, "metrics.jsonl")
        with open(path) as fh:
            records = [(line, _step_of(line)) for line in fh if line.strip()]
        if step < 0 and not records and not self._earlier_events:
            self._jsonl = open(path, "a")
            return 0
        # a line cut short is dropped, and every kept one ends its line, so that the records
        # appended next stay lines of their own
        kept = [(line.rstrip("\n") + "\n", at) for line, at in records if at is not None and
                at <= step and not (redo_eval and at == step and _is_eval(line))]
        self._tb.close()
        self._tb = SummaryWriter(os.path.join(self.run_dir, "tb"),
                                 purge_step=step if redo_eval else step + 1)
        if redo_eval:
            for line, at in kept:
                if at == step:
                    record = json.loads(line)
                    self._add(step, {k: v for k, v in record.items() if k not in ("step", "time")},
                              record.get("time"))
        with open(path + ".tmp", "w") as fh:
            fh.writelines(line for line, _ in kept)
        os.replace(path + ".tmp", path)
        self._jsonl = open(path, "a")
        return len(records) - len(kept)

    def _add(self, step: int, values: dict, walltime: float | None = None) -> None:
        """TensorBoard's points of `values`: the finite numbers (a missing value is None, a
        non-finite one no point)."""
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self._tb.add_scalar(tag, value, step, walltime=walltime)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._add(step, values)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._jsonl.flush()

    def custom_scalars(self, layout: dict) -> None:
        """The TensorBoard custom_scalars dashboard layout (written once, at start)."""
        if self.enabled:
            self._tb.add_custom_scalars(layout)

    def text(self, message: str, console: bool = True) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        for line in message.splitlines():
            self._log.write(f"{stamp} {line}\n")
        self._log.flush()
        if console and self.echo:
            from tqdm import tqdm
            tqdm.write(message, file=sys.stdout)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self._log.close()
            self.enabled = False


def _step_of(line: str) -> int | None:
    """The step of one metrics.jsonl record; None for a line that is not one (cut short by a
    node that went down while it was written, or the NUL bytes a crash can leave)."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return None


def _is_eval(line: str) -> bool:
    """Whether a metrics.jsonl record is an evaluation's (its scalars are eval/...)."""
    try:
        return any(key.startswith("eval/") for key in json.loads(line))
    except (ValueError, TypeError):
        return False
