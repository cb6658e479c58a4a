"""How a multi-rank probe hands its per-rank JSON record to the test that launched it.

Every rank writes into one pipe, and a record of a few kilobytes is not written to it in one
piece: two ranks' lines came back interleaved in CI (rank 1's record, then rank 0's, on one
line), and the test failed on JSON it could not parse. So when the launching test names a folder
in ``DSFM_PROBE_RECORDS``, each record goes to a file of its own there, written whole and then
renamed into place; the one-line stdout form stays for running a probe by hand."""

from __future__ import annotations

import json
import os
import sys

ENV = "DSFM_PROBE_RECORDS"


def emit(tag: str, record: dict) -> None:
    """Hand `record` (which has a "rank") to the test, or print it when run by hand."""
    text = json.dumps(record)
    folder = os.environ.get(ENV)
    if not folder:
        sys.stdout.write(f"{tag} {text}\n")
        sys.stdout.flush()
        return
    name = os.path.join(folder, f"{tag}.{record['rank']}.{os.getpid()}.json")
    with open(name + ".part", "w") as f:
        f.write(text)
    os.replace(name + ".part", name)          # a reader never sees half a record
    sys.stdout.write(f"{tag} rank {record['rank']} written to {name}\n")
    sys.stdout.flush()


def read(folder: str, tag: str) -> list[dict]:
    """Every record `tag` written into `folder`, in no particular order."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(tag + ".") and name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                out.append(json.load(f))
    return out
