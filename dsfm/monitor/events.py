"""The last step already written to a TensorBoard log directory, read from the ends of its
event files only.

A standalone monitor started again into the same `--logdir` continues after the step its
previous run reached, instead of counting from 0 again (TensorBoard would draw the second run
over the first, its curves doubling back). Reading whole event files for that takes about
40 µs per scalar (a day of one host and eight GPUs at 1 Hz is some 13 million), so only the
tail of each file is read: an event file is a sequence of TFRecords (u64 length, masked CRC-32C
of the length, data, masked CRC-32C of the data), and the first offset in the tail where a
record's two checksums hold starts the chain of whole records up to the end of the file (a
record cut short by a killed writer ends the chain).
"""

from __future__ import annotations

import os
import re
import struct

TAIL_BYTES = 1 << 16        # some hundred samples of a host and a GPU


def _record_end(buf: bytes, i: int, crc) -> int | None:
    """Where the data of the record at offset `i` ends, if a whole record whose two checksums
    hold starts there; None otherwise."""
    if i + 12 > len(buf):
        return None
    (length,) = struct.unpack_from("<Q", buf, i)
    end = i + 12 + length
    if (end + 4 > len(buf) or struct.unpack_from("<I", buf, i + 8)[0] != crc(buf[i:i + 8])
            or struct.unpack_from("<I", buf, end)[0] != crc(buf[i + 12:end])):
        return None
    return end


def _records(buf: bytes):
    """The whole records of `buf`, from the first offset where one starts; a record cut short
    (the writer was killed) ends them."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    i = next((i for i in range(len(buf)) if _record_end(buf, i, masked_crc32c) is not None),
             len(buf))
    while (end := _record_end(buf, i, masked_crc32c)) is not None:
        yield buf[i + 12:end]
        i = end + 4


def last_step(logdir: str, tags: str, tail_bytes: int = TAIL_BYTES) -> int | None:
    """The highest step of a scalar whose tag matches the regular expression `tags` in the
    last `tail_bytes` of each event file directly in `logdir` (None when there is none)."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    pattern = re.compile(tags)
    try:
        names = [n for n in os.listdir(logdir) if n.startswith("events.out.tfevents.")]
    except OSError:                                 # not there yet: nothing written
        return None
    best = None
    for name in names:
        try:
            with open(os.path.join(logdir, name), "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(fh.tell() - tail_bytes, 0))
                buf = fh.read()
        except OSError:
            continue
        for data in _records(buf):
            try:
                event = Event.FromString(data)
            except DecodeError:
                break
            if any(pattern.match(v.tag) for v in event.summary.value):
                best = event.step if best is None else max(best, event.step)
    return best
