"""`python -m dsfm.sim --format pdebench`: what an interrupted export leaves behind."""

import dataclasses
import os
import subprocess
import sys

import h5py
import pytest

from dsfm.sim.__main__ import main
from dsfm.sim.export import export_pdebench
from dsfm.sim.presets import PRESETS


def test_interrupted_export_leaves_no_short_file_and_no_stale_stats(tmp_path, monkeypatch):
    """Ctrl-C while a file is written: h5py closes it on the way out, and the file used to stay
    under its final name holding the trajectories written so far, which the reader takes for a
    whole file, beside the stats.yaml of the previous export. Now the previous file is intact,
    no temporary file is left, the folder has no stats.yaml until an export completes, and a
    killed export's temporary file is removed by the next."""
    out = tmp_path / "base"
    args = ["--out", str(out), "--format", "pdebench", "--datasets", "shallow_water",
            "--splits", "3,0,0", "--quiet"]
    assert main(args) == 0
    swe = out / "pdebench" / "swe"
    before = sorted(os.listdir(swe))
    assert before == ["2D_rdb_periodic_g1.h5", "2D_rdb_periodic_g4.h5", "stats.yaml"]

    create_group = h5py.Group.create_group

    def interrupted(self, name, *a, **kw):          # Ctrl-C as the second trajectory is written
        if name == "0001":
            raise KeyboardInterrupt
        return create_group(self, name, *a, **kw)

    monkeypatch.setattr(h5py.Group, "create_group", interrupted)
    spec = dataclasses.replace(PRESETS["demo"]["shallow_water"], splits=(3, 0, 0))
    with pytest.raises(KeyboardInterrupt):
        export_pdebench({"shallow_water": spec}, str(out / "pdebench"), seed=1, progress=False)
    monkeypatch.undo()
    assert sorted(os.listdir(swe)) == ["2D_rdb_periodic_g1.h5", "2D_rdb_periodic_g4.h5"]
    for name in before[:2]:
        with h5py.File(swe / name) as f:
            assert sorted(f) == ["0000", "0001", "0002"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (swe / f".2D_rdb_periodic_g1.h5.partial-{dead.pid}").write_bytes(b"")   # a killed export's
    assert main(args) == 0                           # a complete export writes the stats again
    assert sorted(os.listdir(swe)) == before
