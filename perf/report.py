"""What every benchmark records beside its figures: where and when they were measured."""

from __future__ import annotations

import json
import os
import platform
from datetime import date


def write_json(path: str, payload: dict) -> None:
    """Write `payload` with the machine, core count and date added."""
    record = {"machine": platform.node(), "cpus": os.cpu_count(), "date": str(date.today()),
              **payload}
    with open(path, "w") as fh:
        json.dump(record, fh, indent=1)
