"""PDEBench layouts, written by `python -m dsfm.sim --format pdebench`, read with the Well's
sample interface."""

import glob
import os
import sys
from collections import Counter

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
from dsfm.errors import EmptySplitError, SchemaError


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
    n_in_files = len(glob.glob(str(path / "*.h*5")))          # beside stats.yaml
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
        try:
            ds = PDEBenchDataset(path, split, n_steps_input=2)
        except EmptySplitError:         # 12 trajectories a file: ceil(9.6) + ceil(1.2), no test
            assert split == "test" and split_trajectories(12, "test") == range(12, 12)
            continue
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


def refused_by_both(folder, line: str) -> None:
    """The drop-in PDEBenchDataset and the loader's indexing refuse `folder` with `line`."""
    from dsfm.data.prefetch import index_dataset

    for make in (lambda: PDEBenchDataset(str(folder), "train", n_steps_input=2),
                 lambda: index_dataset(str(folder), "train", 2, 1, 1, None)):
        with pytest.raises(SchemaError) as exc:
            make()
        assert str(exc.value) == line


def test_incompressible_files_with_and_without_forcing_are_refused(tmp_path, capsys):
    """A source of two incompressible-NS files, one with `force` and one without: before, the
    items of the one had constant_fields and those of the other none, so a DataLoader batch of
    both dropped the forcing silently (first item without it) or raised KeyError (first item
    with it), mid-training, and the checker called the folder valid. Now PDEBenchDataset, the
    loader's indexing and the checker refuse it in one line naming both files; a force that is
    not [N, H, W, 2] is refused too (it was read as whatever it held)."""
    from dsfm.data.check import main

    rng = np.random.default_rng(3)
    n, t, h, w = 3, 5, 8, 8
    paths = [tmp_path / f"ns_incom_inhom_2d_8-{i}.h5" for i in range(2)]
    for path, force in zip(paths, (None, rng.normal(size=(n, h, w, 2)))):
        fields = {k: rng.normal(size=(n, t, h, w)) for k in ("Vx", "Vy", "particles")}
        write_pdebench(str(path), "incomp_ns", fields, np.arange(h), np.arange(w), np.arange(t),
                       force=force)
    line = (f"{paths[1]}: force [N,H,W,2] present differs from absent in {paths[0]}; the files "
            "of one source must agree (items with and without constant_fields cannot be "
            "batched): give those with force and those without as separate sources")
    refused_by_both(tmp_path, line)
    assert main([str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines() == [line]
    assert PDEBenchDataset(str(paths[1]), "train", n_steps_input=2)[0]["constant_fields"] \
        .shape == (h, w, 2)

    with h5py.File(paths[1], "r+") as f:
        del f["force"]
        f.create_dataset("force", data=np.ones((n, h, w), np.float32))
    with pytest.raises(SchemaError, match=r"force \(3, 8, 8\) must be \[N,H,W,2\], "
                                          r"\(3, 8, 8, 2\) beside velocity"):
        PDEBenchDataset(str(paths[1]), "train", n_steps_input=2)

def test_unknown_layout_is_refused(tmp_path):
    path = tmp_path / "mystery.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("tensor", data=np.zeros((2, 3, 4)))
    with pytest.raises(SchemaError, match="not a PDEBench 2D layout"):
        PDEBenchDataset(str(path))


def test_too_short_trajectories_are_refused(pdebench_base):
    with pytest.raises(SchemaError, match="not enough"):
        PDEBenchDataset(str(pdebench_base / "swe"), n_steps_input=30)


def _cfd_file(path, n, t, h, w, seed, scale=1.0):
    """A 2D CFD file as PDEBench writes one: Vx, Vy, density, pressure [N, T, H, W], coordinates
    (the writer gives t-coordinate its T + 1 values)."""
    rng = np.random.default_rng(seed)
    fields = {k: scale * rng.normal(1 + i, 1 + i, (n, t, h, w))
              for i, k in enumerate(FIELDS["comp_ns"])}
    write_pdebench(str(path), "comp_ns", fields, np.linspace(0, 1, h), np.linspace(0, 1, w),
                   np.linspace(0, 1, t))
    return fields


def test_a_split_without_trajectories_is_refused_not_empty(tmp_path):
    """6 trajectories split 0.8/0.1/0.1 (train and valid rounded up) leave test none: the
    dataset had length 0 and raised nothing, where The Well's reader refuses an empty split."""
    _cfd_file(tmp_path / "cfd.h5", 6, 5, 4, 4, seed=0)
    assert len(PDEBenchDataset(str(tmp_path / "cfd.h5"), "valid")) > 0
    with pytest.raises(EmptySplitError) as exc:
        PDEBenchDataset(str(tmp_path / "cfd.h5"), "test")
    assert str(exc.value) == (f"{tmp_path / 'cfd.h5'}: the test split holds no trajectory: 6 "
                              "trajectories split 0.8/0.1/0.1 (train and valid take the "
                              "fraction rounded up, test the rest); give train_val_test "
                              "another split")
    assert len(PDEBenchDataset(str(tmp_path / "cfd.h5"), "test",
                               train_val_test=(0.5, 0.2, 0.3))) > 0       # 3, 2, 1


def test_sources_of_one_kind_mix_with_their_own_stats_and_shared_fields(tmp_path):
    """MPP mixes 2D CFD at 128² and 512² from one PDEBench folder: each file its own source,
    named after it, normalized with its own statistics, its fields on the kind's shared
    columns of the vocabulary. The files used to collide (one name per kind, one stats.yaml
    per folder: the second file's statistics silently normalized the first)."""
    from dsfm.data import WellLoader
    a = tmp_path / "2D_CFD_Rand_M0.1_periodic_16_Train.hdf5"
    b = tmp_path / "2D_CFD_Rand_M0.1_periodic_32_Train.hdf5"
    _cfd_file(a, 10, 6, 16, 16, seed=0)
    _cfd_file(b, 10, 6, 32, 32, seed=1, scale=50.0)
    stats = [write_pdebench_stats(str(p)) for p in (a, b)]
    assert stats == [str(a)[:-5] + ".stats.yaml", str(b)[:-5] + ".stats.yaml"]
    with WellLoader([str(a), str(b)], n_steps_input=2, batch_size=4, num_workers=1,
                    seed=0) as loader:
        names = [d.source.name for d in loader.datasets]
        assert names == ["pdebench_comp_ns-2D_CFD_Rand_M0.1_periodic_16_Train",
                         "pdebench_comp_ns-2D_CFD_Rand_M0.1_periodic_32_Train"]
        assert loader.datasets[0].field_ids == loader.datasets[1].field_ids == [0, 1, 2, 3]
        sums = {n: [] for n in names}
        for _, batch in zip(range(40), loader):
            sums[batch.dataset].append(batch.x.double().mean((0, 1, 3, 4)))
        for n in names:                         # each normalized by its own statistics
            assert sums[n] and torch.stack(sums[n]).mean(0).abs().max() < 0.5, n


def test_incompressible_ns_is_split_across_its_files(tmp_path):
    """PDEBench's ns_incom files hold 4 trajectories each: split within each file, train took
    all 4 and valid and test none. They are split over the folder's files, in order."""
    rng = np.random.default_rng(2)
    for i in range(3):
        fields = {k: rng.normal(size=(4, 5, 8, 8)) for k in ("Vx", "Vy", "particles")}
        write_pdebench(str(tmp_path / f"ns_incom_inhom_2d_8-{i}.h5"), "incomp_ns", fields,
                       np.arange(8), np.arange(8), np.arange(5))
    sets = {s: PDEBenchDataset(str(tmp_path), s, n_steps_input=2).trajectories
            for s in ("train", "valid")}
    with pytest.raises(EmptySplitError, match="the test split holds no trajectory: 12"):
        PDEBenchDataset(str(tmp_path), "test", n_steps_input=2)
    flat = {s: [(fi, t) for fi, ts in enumerate(v) for t in ts] for s, v in sets.items()}
    flat["test"] = []
    assert len(flat["train"]) == 10 and len(flat["valid"]) == 2       # ceil(9.6), ceil(1.2)
    assert flat["valid"] == [(2, 2), (2, 3)]
    every = flat["train"] + flat["valid"] + flat["test"]
    assert sorted(every) == [(f, t) for f in range(3) for t in range(4)]


def test_statistics_read_in_chunks_equal_the_whole_trajectories(tmp_path, monkeypatch):
    """Statistics are taken a few frames at a time (a real ns_incom trajectory is 3 GB), with
    one frame of overlap for the one-step differences: the same numbers as at once."""
    import yaml

    from dsfm.data import pdebench
    path = tmp_path / "2D_diff-react_NA_NA.h5"
    rng = np.random.default_rng(3)
    fields = {"activator": rng.normal(2, 3, (10, 11, 8, 8)),
              "inhibitor": rng.gamma(2, 1, (10, 11, 8, 8))}
    write_pdebench(str(path), "diff_react", fields, np.arange(8), np.arange(8), np.arange(11))
    monkeypatch.setattr(pdebench, "STATS_CHUNK_BYTES", 4 * 2 * 8 * 8 * 4)   # 4 frames a read
    got = yaml.safe_load(open(write_pdebench_stats(str(path))))
    train = slice(0, 8)                                   # ceil(0.8 · 10) trajectories
    for name, arr in fields.items():
        x = arr[train].astype(np.float32).astype(np.float64)
        d = np.diff(x, axis=1)
        for key, want in (("mean", x.mean()), ("std", x.std()), ("rms", np.sqrt((x ** 2).mean())),
                          ("mean_delta", d.mean()), ("std_delta", d.std()),
                          ("rms_delta", np.sqrt((d ** 2).mean()))):
            assert got[key][name] == pytest.approx(want, rel=1e-6, abs=1e-9), (key, name)


def test_coordinates_that_do_not_fit_the_arrays_are_refused(tmp_path):
    """A CFD file converted with its time axis last ([N, H, W, T]) used to be read as
    windows of garbage; its coordinates say which axis is which."""
    path = tmp_path / "2D_CFD_converted.hdf5"
    with h5py.File(path, "w") as f:
        for k in FIELDS["comp_ns"]:
            f.create_dataset(k, data=np.zeros((2, 8, 6, 8), np.float32))      # [N, H, W, T]
        f.create_dataset("t-coordinate", data=np.arange(9.0))
        f.create_dataset("x-coordinate", data=np.arange(8.0))
        f.create_dataset("y-coordinate", data=np.arange(6.0))
    with pytest.raises(SchemaError, match="x-coordinate has 8 values.*another axis order"):
        PDEBenchDataset(str(path))


def test_compressed_chunked_files_as_pdebench_ships_them(tmp_path):
    """Real ns_incom and diffusion-reaction files are chunked and lzf-compressed (the
    simulators' own files are not): the loader reads them through HDF5, value for value; shallow
    water, named without 'periodic', takes open boundaries."""
    from dsfm.data import WellLoader
    rng = np.random.default_rng(4)
    ns = tmp_path / "ns" / "ns_incom_inhom_2d_16-0.h5"
    ns.parent.mkdir()
    velocity = rng.normal(size=(4, 6, 16, 16, 2)).astype(np.float32)
    particles = rng.random((4, 6, 16, 16, 1)).astype(np.float32)
    with h5py.File(ns, "w") as f:
        for name, data in (("velocity", velocity), ("particles", particles)):
            f.create_dataset(name, data=data, chunks=(1, 1, 16, 16, data.shape[-1]),
                             compression="lzf", shuffle=True)
        f.create_dataset("force", data=rng.normal(size=(4, 16, 16, 2)).astype(np.float32))
        f.create_dataset("t", data=np.tile(np.arange(6, dtype=np.float32), (4, 1)))
    swe = tmp_path / "swe" / "2D_rdb_NA_NA.h5"
    swe.parent.mkdir()
    h = rng.random((5, 6, 16, 16, 1)).astype(np.float32)
    with h5py.File(swe, "w") as f:
        for i in range(5):
            g = f.create_group(f"{i:04d}")
            g.create_dataset("data", data=h[i], chunks=(1, 16, 16, 1), compression="lzf")
            grid = g.create_group("grid")
            for axis, n in (("x", 16), ("y", 16), ("t", 6)):
                grid.create_dataset(axis, data=np.linspace(0, 1, n, dtype=np.float32))
    raw = {"ns": np.concatenate([velocity, particles], -1), "swe": h}
    with WellLoader([str(ns.parent), str(swe.parent)], n_steps_input=2, batch_size=2,
                    num_workers=1, normalization=None) as loader:
        seen = set()
        for _, batch in zip(range(30), loader):
            key = "ns" if "incomp" in batch.dataset else "swe"
            seen.add(key)
            ds = next(d for d in loader.datasets if d.source.name == batch.dataset)
            for b, w in enumerate(batch.windows):
                fi, j, t0 = ds.source.locate(int(w))
                traj = ds.source.trajectories[fi][j]
                want = np.moveaxis(raw[key][traj, t0:t0 + 3], -1, 1)          # [T, C, H, W]
                got = torch.cat([batch.x[b], batch.y[b]]).numpy()
                np.testing.assert_array_equal(got, want)
            if key == "swe":
                assert batch.bcs_host.unique().tolist() == [1.0]            # open
        assert seen == {"ns", "swe"}


def test_a_wildcard_makes_each_matching_file_a_source(tmp_path):
    """MPP's preset takes one resolution of a folder that holds two (`*_128_*`): each
    matching file becomes a source of its own, as in MPP; a pattern that matches nothing is
    named among the missing paths."""
    from dsfm.data.prepare import dataset_paths
    from dsfm.errors import ConfigError
    for res in (16, 32):
        for m in ("0.1", "1.0"):
            _cfd_file(tmp_path / f"2D_CFD_Rand_M{m}_periodic_{res}_Train.hdf5", 2, 4, res, res,
                      seed=res)
    write_pdebench_stats(str(tmp_path / "2D_CFD_Rand_M0.1_periodic_16_Train.hdf5"))
    assert dataset_paths(str(tmp_path / "none"), [], [str(tmp_path / "*M0.1_periodic_16*")]) \
        == [str(tmp_path / "2D_CFD_Rand_M0.1_periodic_16_Train.hdf5")]   # not its .stats.yaml
    paths = dataset_paths(str(tmp_path / "none"), [], [str(tmp_path / "*_16_*.hdf5"),
                                                       str(tmp_path / "*_32_*.hdf5")])
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "2D_CFD_Rand_M0.1_periodic_16_Train.hdf5", "2D_CFD_Rand_M1.0_periodic_16_Train.hdf5",
        "2D_CFD_Rand_M0.1_periodic_32_Train.hdf5", "2D_CFD_Rand_M1.0_periodic_32_Train.hdf5"]
    with pytest.raises(ConfigError, match=r"\*_64_\*.hdf5 \(matches no file\)"):
        dataset_paths(str(tmp_path / "none"), [], [str(tmp_path / "*_64_*.hdf5")])


def _pressure_cfd_file(path, pressure_dtype, rng, n=5, t=6, h=8, w=12):
    """A 2D CFD file as PDEBench lays it out ([N, T, H, W] per variable, t-coordinate of T + 1
    values), its pressure 1e5 varying by about 0.01 (Pa, say) stored as `pressure_dtype`:
    float32 cannot hold such values apart. Returns the arrays as stored, in float64."""
    arrays = {"Vx": rng.normal(0, 1, (n, t, h, w)), "Vy": rng.normal(0, 1, (n, t, h, w)),
              "density": rng.normal(1, 0.1, (n, t, h, w)),
              "pressure": 1e5 + 0.01 * rng.standard_normal((n, t, h, w))}
    with h5py.File(path, "w") as f:
        for name, a in arrays.items():
            f.create_dataset(name, data=a.astype(pressure_dtype if name == "pressure"
                                                 else np.float32))
        f.create_dataset("t-coordinate", data=np.arange(t + 1, dtype=np.float32) * 0.05)
        f.create_dataset("x-coordinate", data=np.linspace(0, 1, h, dtype=np.float32))
        f.create_dataset("y-coordinate", data=np.linspace(0, 1, w, dtype=np.float32))
        f.attrs["M"], f.attrs["eta"], f.attrs["zeta"] = 0.1, 0.01, 0.01
        return {k: np.asarray(f[k], np.float64) for k in FIELDS["comp_ns"]}



def test_a_folder_of_two_grids_says_what_to_do(tmp_path):
    """A folder of CFD files at two grids (PDEBench's 2D_Train_Rand at 128² and 512²) given as
    one source: the line named both files and grids, but not what to do; now it says to give
    each file as a source of its own, a wildcard per grid in a run config."""
    rng = np.random.default_rng(6)
    first, other = tmp_path / "a_periodic.hdf5", tmp_path / "b_periodic.hdf5"
    _pressure_cfd_file(first, np.float32, rng)
    _pressure_cfd_file(other, np.float32, rng, h=16, w=16)
    line = (f"{other}: comp_ns at (16, 16) differs from comp_ns at (8, 12) in {first}; a "
            "source is files of one layout and grid: give each file as a source of its own (in "
            "a run config, a wildcard per grid in data.pdebench)")
    refused_by_both(tmp_path, line)

@pytest.mark.parametrize("assemble_on", ["readers", "device"])
def test_a_float64_pressure_with_a_large_mean_keeps_its_values(tmp_path, assemble_on):
    """PDEBench arrays stored as float64 were read as float32 before anything else: a pressure
    of 1e5 ± 0.01 came out as a few distinct values, its statistics were those of the rounded
    values (std 3% off) and its normalized windows off by 0.4 of a standard deviation. Now the
    statistics are taken in float64 and the shift is subtracted in float64 as the array is read,
    as for The Well: every normalized value is NumPy's float64 (x - shift) / scale within float32
    rounding, in the drop-in reader and the loader, in a folder whose other file stores its
    pressure as float32."""
    import yaml

    from dsfm.data import WellLoader
    rng = np.random.default_rng(7)
    folder = tmp_path / "2D_CFD_pressure"
    folder.mkdir()
    stored = [_pressure_cfd_file(folder / "a_periodic.hdf5", np.float64, rng),
              _pressure_cfd_file(folder / "b_periodic.hdf5", np.float32, rng)]
    stats = yaml.safe_load(open(write_pdebench_stats(str(folder))))
    p = np.concatenate([s["pressure"][:4] for s in stored])     # train: ceil(0.8 · 5) each
    d = np.diff(p, axis=1)
    for key, want in (("mean", p.mean()), ("std", p.std()), ("std_delta", d.std())):
        assert stats[key]["pressure"] == pytest.approx(want, rel=1e-9), key

    ds = PDEBenchDataset(str(folder), "train", 2, 1, use_normalization=True,
                         normalization_type="zscore")
    shift, scale = ds.shift.astype(np.float64), ds.scale.astype(np.float64)

    def truth(fi, traj, t0):
        return (np.stack([stored[fi][k][traj, t0:t0 + 3] for k in FIELDS["comp_ns"]], -1)
                - shift) / scale

    for i in range(len(ds)):
        fi, traj, t0 = ds.locate(i)
        item = ds[i]
        got = torch.cat([item["input_fields"], item["output_fields"]]).double().numpy()
        np.testing.assert_allclose(got, truth(fi, traj, t0), rtol=0, atol=2e-6)
        if fi == 0:                              # (file b's float32 pressure is itself coarse)
            assert len(np.unique(got[..., 3])) == got[..., 3].size
    with WellLoader([str(folder)], n_steps_input=2, batch_size=4, num_workers=1, seed=1,
                    normalization="zscore", assemble_on=assemble_on) as loader:
        source = loader.datasets[0].source
        for _, batch in zip(range(6), loader):
            for b, w in enumerate(batch.windows):
                fi, traj, t0 = source.locate(int(w))
                got = torch.cat([batch.x[b], batch.y[b]]).double().movedim(1, -1).numpy()
                np.testing.assert_allclose(got, truth(fi, traj, t0), rtol=0, atol=2e-6)


def _swe_file_with_a_damaged_group(path, n, damaged):
    """A shallow-water file of `n` trajectory groups (0000, 0001, ...) whose group `damaged`
    has its object header overwritten."""
    with h5py.File(path, "w") as f:
        for i in range(n):
            f.create_dataset(f"{i:04d}/data", data=np.zeros((5, 8, 8, 1), np.float32))
    with h5py.File(path) as f:
        header = h5py.h5o.get_info(f[damaged].id).addr
    with open(path, "r+b") as fh:
        fh.seek(header)
        fh.write(b"\xff" * 16)
    return path


def test_a_damaged_trajectory_group_is_named(tmp_path):
    """A shallow-water file (one group per trajectory) whose group 0002 has a damaged object
    header: opening the source used to end in h5py's KeyError traceback (and h5py's get() would
    have skipped the trajectory silently); now one line names the file and the group."""
    from dsfm.errors import CorruptFileError
    path = _swe_file_with_a_damaged_group(tmp_path / "2D_rdb_NA_NA.h5", 4, "0002")
    with pytest.raises(CorruptFileError) as err:
        PDEBenchDataset(str(path))
    assert str(err.value).startswith(f"{path}: /0002 cannot be read (")
    assert "damaged" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("dims", [1, 3])
def test_1d_and_3d_cfd_files_are_refused_as_such(tmp_path, dims):
    """PDEBench's 1D and 3D compressible NS files (Vx, density, pressure [N, T, X]; with Vy,
    Vz [N, T, X, Y, Z]) sit beside the 2D ones: the 3D one used to be refused as a 2D file whose
    arrays 'must share one [N,T,H,W] shape' (they do share one), the 1D one as 'not a PDEBench
    2D layout'. One line now says what the file holds and what dsfm reads."""
    names = ["density", "pressure", "Vx"] + ["Vy", "Vz"][:dims - 1]
    path = tmp_path / f"{dims}D_CFD_Rand_Eta0.01_Zeta0.01_periodic_Train.hdf5"
    with h5py.File(path, "w") as f:
        for name in names:
            f.create_dataset(name, data=np.ones((2, 5) + (4,) * dims, np.float32))
        for axis in "xyz"[:dims]:
            f.create_dataset(f"{axis}-coordinate", data=np.arange(4, dtype=np.float32))
        f.create_dataset("t-coordinate", data=np.arange(6, dtype=np.float32))
    for kind in (None, "comp_ns"):
        with pytest.raises(SchemaError) as err:
            PDEBenchDataset(str(path), kind=kind)
        assert str(err.value).startswith(f"{path}: holds {dims}D compressible NS (")
        assert "dsfm does not read: it reads PDEBench's 2D time series" in str(err.value)


def test_a_cfd_file_without_one_of_its_arrays_is_named_as_such(tmp_path, capsys):
    """A 2D CFD file without `pressure` was 'not a PDEBench 2D layout' to the dataset and
    eleven Well-format problems to the checker; both now say which array it lacks."""
    from dsfm.data.check import main
    folder = tmp_path / "cfd"
    folder.mkdir()
    _pressure_cfd_file(folder / "a_periodic.hdf5", np.float32, np.random.default_rng(3))
    with h5py.File(folder / "a_periodic.hdf5", "r+") as f:
        del f["pressure"]
    line = (f"{folder / 'a_periodic.hdf5'}: a 2D compressible NS file (Vx, Vy, density, "
            "pressure) without pressure")
    with pytest.raises(SchemaError) as exc:
        PDEBenchDataset(str(folder))
    assert str(exc.value) == line
    assert main([str(folder)]) == 1
    out, _ = capsys.readouterr()
    assert out.splitlines() == [line]


def test_the_checker_checks_pdebench_files_as_pdebench(tmp_path, capsys):
    """`python -m dsfm.data.check` on PDEBench files used to list eleven Well-format problems
    per file (root attributes, groups), valid or not. It now checks them as PDEBenchDataset
    reads them: a valid folder passes; NaN is named with file, array, trajectory and time; a
    damaged or a 3D file takes one line. A file of another grid in the folder is said on stderr:
    such a folder (PDEBench's 2D_Train_Rand) is read as one source per file, each with its own
    statistics, which are then checked."""
    from dsfm.data.check import main
    rng = np.random.default_rng(8)
    folder = tmp_path / "cfd"
    folder.mkdir()
    for name in ("a_periodic.hdf5", "b_periodic.hdf5"):
        _pressure_cfd_file(folder / name, np.float32, rng)
    assert main([str(folder)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "checked 2 file(s): valid" in err
    assert "stats.yaml: missing; normalization needs it" in err         # a note, not a problem
    with h5py.File(folder / "b_periodic.hdf5", "r+") as f:
        f["density"][3, 4, 1, 2] = np.nan
    assert main([str(folder)]) == 1
    out, _ = capsys.readouterr()
    assert out.splitlines() == [f"{folder}/b_periodic.hdf5: /density: 1 non-finite values, "
                                "first NaN at trajectory 3, time index 4"]
    with h5py.File(folder / "b_periodic.hdf5", "r+") as f:
        f["density"][3, 4, 1, 2] = 1.0
    _pressure_cfd_file(folder / "c_periodic.hdf5", np.float32, rng, h=16, w=16)
    for name in ("a_periodic", "b_periodic", "c_periodic"):
        write_pdebench_stats(str(folder / f"{name}.hdf5"))
    with open(folder / "c_periodic.stats.yaml", "a") as fh:
        fh.write("mean_delta: []\n")
    assert main([str(folder)]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{folder}/c_periodic.stats.yaml: key 'mean_delta' is missing"]
    assert f"note: {folder}: comp_ns at (8, 12) (a_periodic.hdf5) and comp_ns at (16, 16) " \
        "(c_periodic.hdf5): not one source" in err
    cube = tmp_path / "3D_CFD_Rand_periodic_Train.hdf5"
    with h5py.File(cube, "w") as f:
        for name in ("density", "pressure", "Vx", "Vy", "Vz"):
            f.create_dataset(name, data=np.ones((2, 3, 4, 4, 4), np.float32))
    swe = _swe_file_with_a_damaged_group(tmp_path / "2D_rdb_NA_NA.h5", 3, "0001")
    assert main([str(cube), str(swe)]) == 1
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{cube}: holds 3D compressible NS")
    assert lines[1].startswith(f"{swe}: /0001 cannot be read")


@pytest.mark.parametrize("kind", ["swe", "comp_ns"])
def test_files_without_coordinates_get_default_grids(tmp_path, kind):
    """Coordinates are optional (the layout check skips those a file lacks), but an item of a
    shallow-water file whose grid held only t, or of a CFD file with no coordinates, ended in
    h5py's KeyError traceback. Each missing coordinate is now cell centres on
    [0, 1] (space) or step numbers (time); the stored ones are used as they are."""
    h, w, t = 4, 6, 5
    path = tmp_path / {"swe": "2D_rdb_NA_NA.h5", "comp_ns": "2D_CFD_Rand_periodic_Train.hdf5"}[kind]
    with h5py.File(path, "w") as f:
        if kind == "swe":
            for i in range(3):
                f.create_dataset(f"{i:04d}/data", data=np.ones((t, h, w, 1), np.float32))
                f.create_dataset(f"{i:04d}/grid/t", data=0.5 * np.arange(t, dtype=np.float32))
        else:
            for name in FIELDS[kind]:
                f.create_dataset(name, data=np.ones((3, t, h, w), np.float32))
    item = PDEBenchDataset(str(path), "train", 2, 1)[1]
    centres = np.stack(np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w,
                                   indexing="ij"), -1)
    np.testing.assert_allclose(item["space_grid"].numpy(), centres, rtol=1e-6)
    step = 0.5 if kind == "swe" else 1.0                       # stored t, or step numbers
    assert item["input_time_grid"].tolist() == [0.0, step]
    assert item["output_time_grid"].tolist() == [2 * step]


def test_a_grid_that_does_not_fit_its_data_axes_is_refused(tmp_path):
    """Shallow water and diffusion-reaction store data [T, X, Y, C] beside grid/x [X] and
    grid/y [Y]. The check took x and y as a set within {X, Y}: on a 4 × 6 grid, x and y of 4
    values each passed, and items came with a 4 × 4 space grid beside 4 × 6 fields."""
    path = tmp_path / "2D_diff-react_NA_NA.h5"
    with h5py.File(path, "w") as f:
        for i in range(3):
            f.create_dataset(f"{i:04d}/data", data=np.ones((5, 4, 6, 2), np.float32))
            for axis, n in (("x", 4), ("y", 4), ("t", 5)):
                f.create_dataset(f"{i:04d}/grid/{axis}", data=np.arange(n, dtype=np.float32))
    with pytest.raises(SchemaError, match="/0000/grid/y has 4 values, the data's axis 6"):
        PDEBenchDataset(str(path))


def test_a_file_is_listed_once_and_each_trajectory_group_opened_once(tmp_path):
    """Inspecting a shallow-water file (one group per trajectory) listed its groups in
    `unsupported`, in `detect_kind` and in the layout check, opening every group each time (the
    first 8 times, the others 3 times in a file of 4). `trajectory_groups` now lists them once,
    the others take that listing (given none, they see none), and each group is opened once,
    as h5py's opens of the file's root members say."""
    from dsfm.data.pdebench_format import (
        detect_kind,
        inspect_pdebench,
        trajectory_groups,
        unsupported,
    )
    path = str(tmp_path / "2D_rdb_NA_NA.h5")
    write_pdebench(path, "swe", {"h": np.zeros((4, 5, 8, 8))}, np.arange(8), np.arange(8),
                   np.arange(5))
    names = ["0000", "0001", "0002", "0003"]
    with h5py.File(path) as f:
        groups = trajectory_groups(f, path)
        assert list(groups) == names and all(g.name == f"/{k}" for k, g in groups.items())
        assert unsupported(f, path, groups) is None and detect_kind(f, path, groups) == "swe"
        with pytest.raises(SchemaError, match="not a PDEBench 2D layout"):
            detect_kind(f, path, {})
    opened = Counter()

    def count_root_opens(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_name == "__getitem__" and \
                code.co_filename.endswith(os.path.join("h5py", "_hl", "group.py")) and \
                frame.f_locals["self"].name == "/":
            opened[frame.f_locals["name"]] += 1

    sys.setprofile(count_root_opens)
    try:
        pf = inspect_pdebench(path)
    finally:
        sys.setprofile(None)
    assert pf.kind == "swe" and pf.groups == names
    assert opened == {name: 1 for name in names}


def test_a_first_trajectory_group_without_data_is_named(tmp_path, capsys):
    """A shallow-water file whose first group (0000) has lost its `data`: the layout was told
    from that group alone, so the file was 'not a PDEBench 2D layout' to the dataset and the
    loader, and a Well file with eleven problems to the checker. The layout is now told from
    the first group holding data, and the line names the group without it, as for any other."""
    from dsfm.data.check import main
    path = tmp_path / "2D_rdb_NA_NA.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("0000/grid/t", data=np.arange(5, dtype=np.float32))
        for i in range(1, 4):
            f.create_dataset(f"{i:04d}/data", data=np.ones((5, 8, 8, 1), np.float32))
    refused_by_both(path, f"{path}: /0000/data is missing")
    assert main([str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{path}: /0000/data is missing"]


@pytest.mark.parametrize("kind", ["comp_ns", "swe"])
def test_a_kind_of_another_layout_is_said_as_such(tmp_path, kind):
    """`kind=` naming another layout than the file's: a shallow-water file read as comp_ns was
    'damaged, regenerate or re-download it' (h5py's KeyError for Vx), a CFD file read as swe
    one whose 'trajectory groups disagree on data shape: []'. Each now says what the kind
    needs and the file lacks."""
    path = tmp_path / "2D_rdb_NA_NA.h5"
    if kind == "comp_ns":
        write_pdebench(str(path), "swe", {"h": np.zeros((3, 5, 8, 8))}, np.arange(8),
                       np.arange(8), np.arange(5))
        line = (f"{path}: Vx, Vy, density, pressure missing: comp_ns files hold Vx, Vy, "
                "density, pressure [N,T,H,W]; is it another PDEBench layout?")
    else:
        path = tmp_path / "2D_CFD_Rand_periodic_Train.hdf5"
        _cfd_file(path, 3, 5, 8, 8, seed=0)
        line = (f"{path}: no trajectory groups holding data [T,H,W,C], as swe files have; is "
                "it another PDEBench layout?")
    with pytest.raises(SchemaError) as err:
        PDEBenchDataset(str(path), kind=kind)
    assert str(err.value) == line


def test_the_boundary_comes_from_whole_words_of_the_file_name():
    """A substring match read `nonperiodic` as periodic and `transonic` as open."""
    from dsfm.data.pdebench_format import boundary_from_name

    assert boundary_from_name("diff_react", "/d/2D_diff-react_NA_NA.h5") == "WALL"
    assert boundary_from_name("swe", "/d/2D_rdb_NA_periodic.h5") == "PERIODIC"
    assert boundary_from_name(
        "comp_ns", "/d/2D_CFD_Rand_M0.1_Eta0.01_Zeta0.01_periodic_128_Train.hdf5") == "PERIODIC"
    assert boundary_from_name("comp_ns", "/d/2D_CFD_Shock_trans_Train.hdf5") == "OPEN"
    assert boundary_from_name("comp_ns", "/d/2D_CFD_outgoing-512.hdf5") == "OPEN"
    assert boundary_from_name("swe", "/d/2D_rdb_nonperiodic.h5") == "OPEN"
    assert boundary_from_name("incomp_ns", "/periodic/ns_aperiodic_512.h5") == "WALL"
    assert boundary_from_name("comp_ns", "/d/2D_CFD_transonic_periodic.hdf5") == "PERIODIC"
    assert boundary_from_name("comp_ns", "/d/2D_CFD_transonic.hdf5") == "PERIODIC"


def test_the_checker_takes_the_folder_of_pdebench_folders_the_simulators_write(tmp_path, capsys):
    """`python -m dsfm.sim --format pdebench --out BASE` writes BASE/pdebench/<kind>/; the
    checker given BASE/pdebench (or BASE) said "no HDF5 files and no dataset directories" and
    failed, and only BASE/pdebench/* checked. A problem in one of the folders is still found."""
    from dsfm.data.check import main

    rng = np.random.default_rng(0)
    n, t, h, w = 4, 5, 8, 8
    top = tmp_path / "pdebench"
    dr, ns = top / "diff_react", top / "incomp_ns"
    for folder in (dr, ns):
        folder.mkdir(parents=True)
    write_pdebench(str(dr / "2D_diff-react_NA_NA.h5"), "diff_react",
                   {k: rng.normal(size=(n, t, h, w)) for k in ("activator", "inhibitor")},
                   np.arange(h), np.arange(w), np.arange(t))
    write_pdebench(str(ns / "ns_incom_inhom_2d_8-0.h5"), "incomp_ns",
                   {k: rng.normal(size=(n, t, h, w)) for k in ("Vx", "Vy", "particles")},
                   np.arange(h), np.arange(w), np.arange(t), force=rng.normal(size=(n, h, w, 2)))
    for folder in (dr, ns):
        write_pdebench_stats(str(folder))
    # the forcing is not a model input; the trainer's log names it (WindowSource.unused_fields)
    assert PDEBenchDataset(str(ns), "train", n_steps_input=2).source.unused_fields == ("force",)
    assert PDEBenchDataset(str(dr), "train", n_steps_input=2).source.unused_fields == ()
    for path in (top, tmp_path):
        assert main([str(path)]) == 0, capsys.readouterr()
        assert "checked 2 file(s)" in capsys.readouterr().err
    (dr / "2D_diff-react_NA_NA.h5").write_bytes(b"not HDF5")
    assert main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert str(dr / "2D_diff-react_NA_NA.h5") in out and str(ns) not in out, out
