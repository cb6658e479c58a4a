"""PDEBench layouts, written by `python -m dsfm.sim --format pdebench`, read with the Well's
sample interface."""

import glob

import h5py
import numpy as np
import pytest
import torch

from dsfm.data.pdebench import (
    FIELDS,
    PDEBenchDataset,
    split_trajectories,
    write_pdebench,
    write_pdebench_stats,
)
from dsfm.errors import SchemaError


def raw_window(pf_path, kind, traj, t0, n):
    """The same window read naively with h5py, channel-last."""
    with h5py.File(pf_path) as f:
        if kind in ("swe", "diff_react"):
            return f[sorted(f)[traj]]["data"][t0:t0 + n]
        if kind == "incomp_ns":
            return np.concatenate([f["velocity"][traj, t0:t0 + n],
                                   f["particles"][traj, t0:t0 + n]], -1)
        return np.stack([f[k][traj, t0:t0 + n] for k in FIELDS[kind]], -1)


@pytest.mark.parametrize("kind", ["swe", "diff_react", "incomp_ns", "comp_ns"])
def test_layouts_read_back_exactly(pdebench_base, kind):
    path = pdebench_base / kind
    ds = PDEBenchDataset(str(path), "train", n_steps_input=3, n_steps_output=2)
    assert ds.kind == kind
    assert ds.field_names[0] == list(FIELDS[kind])
    n_in_files = len(glob.glob(str(path / "*")))
    assert len(ds.files) == n_in_files
    for i in range(0, len(ds), 7):
        item = ds[i]
        fi, traj, t0 = ds.locate(i)
        want = raw_window(ds.files[fi].path, kind, traj, t0, 5)
        got = torch.cat([item["input_fields"], item["output_fields"]]).numpy()
        np.testing.assert_array_equal(got, want)
        assert item["input_fields"].shape == (3, 32, 32, len(FIELDS[kind]))
        assert item["boundary_conditions"].tolist() == [[2.0, 2.0], [2.0, 2.0]]   # "periodic"
        assert item["space_grid"].shape == (32, 32, 2)
        assert item["input_time_grid"][0] == 0


def test_splits_are_disjoint_and_complete(pdebench_base):
    path = str(pdebench_base / "comp_ns")
    seen = {}
    for split in ("train", "valid", "test"):
        ds = PDEBenchDataset(path, split, n_steps_input=2)
        for fi, trajs in enumerate(ds.trajectories):
            for t in trajs:
                assert (fi, t) not in seen, f"trajectory {t} of file {fi} in {split} and {seen}"
                seen[(fi, t)] = split
    n_total = sum(pf.n_trajectories for pf in ds.files)
    assert len(seen) == n_total
    assert split_trajectories(10, "train") == range(0, 8)
    assert split_trajectories(10, "valid") == range(8, 9)
    assert split_trajectories(10, "test") == range(9, 10)


def test_default_boundaries_and_normalization(tmp_path):
    rng = np.random.default_rng(0)
    n, t, h, w = 5, 6, 8, 8
    fields = {"activator": rng.normal(2, 3, (n, t, h, w)),
              "inhibitor": rng.normal(size=(n, t, h, w))}
    path = tmp_path / "2D_diff-react_NA_NA.h5"
    write_pdebench(str(path), "diff_react", fields, np.arange(h), np.arange(w), np.arange(t))
    ds = PDEBenchDataset(str(path), "train", n_steps_input=2)
    assert ds[0]["boundary_conditions"].tolist() == [[0.0, 0.0], [0.0, 0.0]]   # no-flux: wall
    write_pdebench_stats(str(path))
    norm = PDEBenchDataset(str(path), "train", n_steps_input=1, n_steps_output=0,
                           use_normalization=True, normalization_type="zscore")
    x = torch.cat([norm[i]["input_fields"] for i in range(len(norm))]).double()
    torch.testing.assert_close(x.mean((0, 1, 2)), torch.zeros(2, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std((0, 1, 2), unbiased=False),
                               torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)


def test_incompressible_forcing_is_a_constant_field(tmp_path):
    rng = np.random.default_rng(1)
    n, t, h, w = 3, 5, 8, 8
    fields = {k: rng.normal(size=(n, t, h, w)) for k in ("Vx", "Vy", "particles")}
    force = rng.normal(size=(n, h, w, 2))
    path = tmp_path / "ns_incom_inhom_2d_8-0.h5"
    write_pdebench(str(path), "incomp_ns", fields, np.arange(h), np.arange(w), np.arange(t),
                   force=force)
    ds = PDEBenchDataset(str(path), "train", n_steps_input=2)
    fi, traj, _ = ds.locate(0)
    np.testing.assert_array_equal(ds[0]["constant_fields"].numpy(), force[traj].astype(np.float32))
    assert ds[0]["boundary_conditions"].tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_unknown_layout_is_refused(tmp_path):
    path = tmp_path / "mystery.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("tensor", data=np.zeros((2, 3, 4)))
    with pytest.raises(SchemaError, match="not a PDEBench 2D layout"):
        PDEBenchDataset(str(path))


def test_too_short_trajectories_are_refused(pdebench_base):
    with pytest.raises(SchemaError, match="not enough"):
        PDEBenchDataset(str(pdebench_base / "swe"), n_steps_input=30)
