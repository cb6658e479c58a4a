"""Console output that outlives whatever reads it.

A rank's stdout and stderr are pipes to its launcher: to ssh under the DeepSpeed runner's pdsh,
to `tee` in `deepspeed ... | tee run.out`, to the launcher itself. When that reader goes first
(the runner, given SIGTERM by Slurm at the time limit, kills pdsh and with it the ssh sessions,
before it asks the ranks to stop), each later write raises BrokenPipeError: the rank used to die
of the first line it printed after the signal, the one saying it was checkpointing, and the
checkpoint was never written. `keep_going()` wraps `sys.stdout` and `sys.stderr` so that a
broken pipe points the file descriptor at /dev/null and the write goes on there: the rank
finishes what it was doing (the checkpoint), and train.log, written first, keeps every line.
Output to the descriptor itself (C code, DeepSpeed's logger, which holds the stream it found at
import, child processes started later) goes to /dev/null too from then on; child processes
already running keep the broken pipe. Writes to `sys.stdout.buffer` go around the wrapper.
"""

from __future__ import annotations

import io
import os
import sys


class _Survivor:
    """A text stream whose writes and flushes survive a broken pipe (see the module)."""

    def __init__(self, stream):
        self._stream = stream

    def _reader_gone(self) -> None:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, self._stream.fileno())
        finally:
            os.close(null)

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._reader_gone()     # what was buffered is flushed to /dev/null with the retry
            return self._stream.write(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()
            self._stream.flush()

    def __getattr__(self, name):    # isatty, fileno, encoding, buffer, ... of the stream
        if name == "_stream":       # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self._stream, name)


def keep_going() -> None:
    """Wrap `sys.stdout` and `sys.stderr` (once; a stream with no file descriptor is left as
    it is)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or isinstance(stream, _Survivor):
            continue
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            continue
        setattr(sys, name, _Survivor(stream))
