"""dsfm.data.WellDataset against upstream the_well.data.WellDataset, index by index."""

import os

import numpy as np
import pytest
import torch

from dsfm.data import RMSNormalization, WellDataset, ZScoreNormalization
from tests.conftest import DEMO_DATASETS
from tests.data.well_fixtures import (
    cube_3d_file,
    make_dataset,
    partial_dims_file,
    rich_2d_file,
    shared_forcing_file,
    store_fields_as,
)

upstream = pytest.importorskip("the_well.data")
upstream_norm = pytest.importorskip("the_well.data.normalization")


def assert_same_items(ours, theirs, indices=None, reseed=False):
    assert len(ours) == len(theirs)
    for i in indices if indices is not None else range(len(theirs)):
        if reseed:
            np.random.seed(i)
        b = theirs[i]
        if reseed:
            np.random.seed(i)
        a = ours[i]
        assert list(a) == list(b), f"index {i}: keys {list(a)} != {list(b)}"
        for k in b:
            assert a[k].shape == b[k].shape, f"index {i} {k}: {a[k].shape} != {b[k].shape}"
            assert a[k].dtype == b[k].dtype, f"index {i} {k}: {a[k].dtype} != {b[k].dtype}"
            assert torch.equal(a[k], b[k]), f"index {i} {k}: values differ"


NORMALIZATIONS = [
    pytest.param({}, id="raw"),
    pytest.param({"use_normalization": True, "normalization_type": "zscore"},
                 id="zscore-string"),
    pytest.param({"use_normalization": True, "normalization_type": "rms"}, id="rms-string"),
    pytest.param({"use_normalization": True, "normalization_type": ZScoreNormalization},
                 id="zscore-dsfm-class"),
    pytest.param({"use_normalization": True,
                  "normalization_type": upstream_norm.RMSNormalization}, id="rms-upstream-class"),
]
UPSTREAM_CLASS = {"zscore": upstream_norm.ZScoreNormalization,
                  "rms": upstream_norm.RMSNormalization}


def upstream_kwargs(kwargs):
    kw = dict(kwargs)
    t = kw.get("normalization_type")
    if isinstance(t, str):
        kw["normalization_type"] = UPSTREAM_CLASS[t]
    elif t is ZScoreNormalization:
        kw["normalization_type"] = upstream_norm.ZScoreNormalization
    elif t is RMSNormalization:
        kw["normalization_type"] = upstream_norm.RMSNormalization
    return kw


@pytest.mark.parametrize("norm", NORMALIZATIONS)
@pytest.mark.parametrize("name", DEMO_DATASETS)
def test_simulated_datasets_match_upstream_everywhere(demo_base, name, norm):
    path = os.path.join(demo_base, name)
    for split in ("train", "valid", "test"):
        kw = dict(well_split_name=split, n_steps_input=4, n_steps_output=1, **norm)
        ours = WellDataset(path=path, **kw)
        theirs = upstream.WellDataset(path=path, **upstream_kwargs(kw))
        assert_same_items(ours, theirs)
        if norm:
            assert ours[0]["input_fields"].abs().max() < 50   # normalized, not raw


def test_base_path_and_dataset_name_arguments(demo_base):
    ours = WellDataset(well_base_path=demo_base, well_dataset_name="gray_scott_reaction_diffusion",
                       well_split_name="valid", n_steps_input=2, n_steps_output=3,
                       use_normalization=True, normalization_type="zscore")
    theirs = upstream.WellDataset(well_base_path=demo_base,
                                  well_dataset_name="gray_scott_reaction_diffusion",
                                  well_split_name="valid", n_steps_input=2, n_steps_output=3,
                                  use_normalization=True,
                                  normalization_type=upstream_norm.ZScoreNormalization)
    assert_same_items(ours, theirs)


@pytest.mark.parametrize("kw", [
    pytest.param(dict(n_steps_input=1, n_steps_output=2, min_dt_stride=2), id="stride2"),
    pytest.param(dict(n_steps_input=2, n_steps_output=1, max_dt_stride=4), id="random-stride"),
    pytest.param(dict(n_steps_input=3, full_trajectory_mode=True), id="full-trajectory"),
    pytest.param(dict(n_steps_input=2, full_trajectory_mode=True, start_output_steps_at_t=6),
                 id="full-trajectory-start"),
    pytest.param(dict(n_steps_input=2, n_steps_output=8, max_rollout_steps=3), id="rollout-cap"),
    pytest.param(dict(n_steps_input=2, return_grid=False, boundary_return_type=None),
                 id="no-grid-no-bc"),
    pytest.param(dict(n_steps_input=2, include_filters=["mach_1"]), id="include-filter"),
    pytest.param(dict(n_steps_input=2, exclude_filters=["mach_1"]), id="exclude-filter"),
])
def test_window_options_match_upstream(demo_base, kw):
    path = os.path.join(demo_base, "euler_2d")
    ours = WellDataset(path=path, well_split_name="train", **kw)
    theirs = upstream.WellDataset(path=path, well_split_name="train", **kw)
    assert_same_items(ours, theirs, reseed="max_dt_stride" in kw)


def test_reads_upstream_dummy_data(tmp_path):
    from the_well.utils.dummy_data import write_dummy_data

    np.random.seed(3)
    split = tmp_path / "dummy" / "data" / "train"
    split.mkdir(parents=True)
    for i in range(2):
        write_dummy_data(str(split / f"dummy_{i}.hdf5"))
    for kw in (dict(n_steps_input=2, n_steps_output=3), dict(n_steps_input=1, min_dt_stride=3)):
        ours = WellDataset(path=str(tmp_path / "dummy"), well_split_name="train", **kw)
        theirs = upstream.WellDataset(path=str(tmp_path / "dummy"), well_split_name="train", **kw)
        assert_same_items(ours, theirs)
        assert set(ours[0]) >= {"input_fields", "constant_fields", "input_scalars",
                                "constant_scalars", "space_grid"}


@pytest.mark.parametrize("writer,name", [(rich_2d_file, "rich_2d"), (cube_3d_file, "cube_3d"),
                                         (shared_forcing_file, "shared_forcing")])
@pytest.mark.parametrize("norm", NORMALIZATIONS)
def test_fixtures_match_upstream(tmp_path, writer, name, norm):
    root = make_dataset(str(tmp_path), name, writer)
    for split in ("train", "test"):
        kw = dict(well_split_name=split, n_steps_input=3, n_steps_output=2, **norm)
        ours = WellDataset(path=root, **kw)
        theirs = upstream.WellDataset(path=root, **upstream_kwargs(kw))
        assert_same_items(ours, theirs)


@pytest.mark.parametrize("kind", ["zscore", "rms"])
def test_float16_fields_are_normalized_in_float32(tmp_path, kind):
    """Fields stored as float16: the drop-in normalized them in place in float16, rounding after
    the subtraction and after the division. Upstream promotes a float16 field to float32 when
    its statistics are a list (t1, t2 fields) and the loader reads every field as float32: the
    drop-in now normalizes in float32 too, and gives upstream's values for those fields bit for
    bit, and for every field upstream's normalization of its raw values in float32. (Upstream
    normalizes a t0 float16 field in float16, as its statistics are a single number: torch
    keeps the field's type for a 0-d tensor; its values there differ by float16 rounding.)"""
    root = make_dataset(str(tmp_path), "cube_3d", cube_3d_file, files_per_split=1)
    store_fields_as(root, np.float16)
    kw = dict(path=root, well_split_name="train", n_steps_input=2, n_steps_output=1)
    ours = WellDataset(**kw, use_normalization=True, normalization_type=kind)
    theirs = upstream.WellDataset(**kw, use_normalization=True,
                                  normalization_type=UPSTREAM_CLASS[kind])
    raw = upstream.WellDataset(**kw)
    assert raw[0]["input_fields"].dtype == torch.float16
    vectors = slice(1, None)                      # channels of velocity (t1) and strain (t2)
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        for key, mode in (("input_fields", "variable"), ("output_fields", "variable"),
                          ("constant_fields", "constant")):
            want = theirs.norm.normalize_flattened(raw[i][key].float(), mode)
            assert a[key].dtype == torch.float32 and torch.equal(a[key], want), (i, key)
            if mode == "variable":
                assert torch.equal(a[key][..., vectors], b[key][..., vectors]), (i, key)


def test_any_grid_type_is_read_as_upstream_reads_it(tmp_path):
    """The checker and the readers refused a grid_type other than cartesian or spherical
    (say a log-spherical grid), which upstream reads, keeping the value in its metadata; a file
    without the attribute, which upstream cannot read (KeyError), is still refused."""
    import h5py

    from dsfm.data.check import check_file
    from dsfm.errors import SchemaError

    root = make_dataset(str(tmp_path), "cube_3d", cube_3d_file, files_per_split=1)
    path = os.path.join(root, "data", "train", "cube_3d_0.hdf5")
    with h5py.File(path, "r+") as f:
        f.attrs["grid_type"] = "log-spherical"
    assert check_file(path)[1] == []
    kw = dict(path=root, well_split_name="train", n_steps_input=2, n_steps_output=1)
    ours, theirs = WellDataset(**kw), upstream.WellDataset(**kw)
    assert ours.metadata.grid_type == theirs.metadata.grid_type == "log-spherical"
    assert_same_items(ours, theirs, range(3))
    ours.close()
    with h5py.File(path, "r+") as f:
        del f.attrs["grid_type"]
    assert check_file(path)[1] == [f"{path}: root attribute 'grid_type' is missing"]
    with pytest.raises(KeyError):
        upstream.WellDataset(**kw)
    with pytest.raises(SchemaError, match="root attribute 'grid_type' is missing"):
        WellDataset(**kw)


def test_rich_fixture_layout(tmp_path):
    root = make_dataset(str(tmp_path), "rich_2d", rich_2d_file)
    ds = WellDataset(path=root, well_split_name="train", n_steps_input=3, n_steps_output=2)
    item = ds[5]
    # channel order t0, then t1 (x, y), then t2 (xx, xy, yx, yy)
    assert ds.field_names == {0: ["pressure"], 1: ["velocity_x", "velocity_y"],
                              2: ["stress_xx", "stress_xy", "stress_yx", "stress_yy"]}
    assert ds.constant_field_names[0] == ["obstacle", "bathymetry"]
    assert item["input_fields"].shape == (3, 24, 16, 7)
    assert item["constant_fields"].shape == (24, 16, 2)
    assert item["input_scalars"].dtype == torch.float64    # float64 energy beside float32 forcing
    # wall on both x faces, open on both y faces
    assert item["boundary_conditions"].tolist() == [[0.0, 0.0], [1.0, 1.0]]
    file_idx, traj, t0 = ds.locate(5)
    import h5py
    with h5py.File(ds.files_paths[file_idx]) as f:
        stress = f["t2_fields/stress"][traj, t0:t0 + 3]
        x = f["dimensions/x"][traj]
    np.testing.assert_array_equal(item["input_fields"][..., 3:].numpy(),
                                  stress.reshape(3, 24, 16, 4))
    np.testing.assert_array_equal(item["space_grid"][:, 0, 0].numpy(), x)
    assert ds.metadata.n_fields == 7 and ds.metadata.n_constant_fields == 2


def test_cube_3d_layout(tmp_path):
    root = make_dataset(str(tmp_path), "cube_3d", cube_3d_file)
    ds = WellDataset(path=root, well_split_name="valid", n_steps_input=2, n_steps_output=1)
    item = ds[0]
    assert item["input_fields"].shape == (2, 8, 6, 5, 1 + 3 + 9)
    assert item["boundary_conditions"].tolist() == [[2.0, 2.0]] * 3
    assert item["space_grid"].shape == (8, 6, 5, 3)


def test_partially_dim_varying_fields_broadcast(tmp_path):
    """Upstream tiles such fields into the wrong shape; dsfm broadcasts them along the missing
    axis. Checked against NumPy on the stored arrays."""
    import h5py

    root = make_dataset(str(tmp_path), "partial", partial_dims_file)
    ds = WellDataset(path=root, well_split_name="train", n_steps_input=2, n_steps_output=1,
                     use_normalization=True, normalization_type="zscore")
    stats = ds.norm
    for i in range(len(ds)):
        file_idx, traj, t0 = ds.locate(i)
        with h5py.File(ds.files_paths[file_idx]) as f:
            u = f["t0_fields/u"][traj, t0:t0 + 3]
            prof = f["t0_fields/profile"][traj, t0:t0 + 3]
        want_u = (torch.from_numpy(u) - stats.shift["u"]) / stats.scale["u"]
        want_p = (torch.from_numpy(prof) - stats.shift["profile"]) / stats.scale["profile"]
        want = torch.stack([want_u, want_p[:, :, None].expand(3, 10, 7)], -1)
        got = torch.cat([ds[i]["input_fields"], ds[i]["output_fields"]])
        assert torch.equal(got, want)


FLATTENED = ("normalize_flattened", "denormalize_flattened", "delta_normalize_flattened",
             "delta_denormalize_flattened")


@pytest.mark.parametrize("kind", ["zscore", "rms"])
def test_flattened_normalization_api_matches_upstream(tmp_path, demo_base, kind):
    """the_well's Trainer (de)normalizes whole batches through `dataset.norm.*_flattened(x,
    "variable" | "constant")`: before, dsfm's norm objects (also what upstream's classes given as
    normalization_type become) had no such methods, an AttributeError; now the same values as
    upstream's classes, constant fields and a dataset without them (upstream's [1.0]) too."""
    rich = make_dataset(str(tmp_path), "rich_2d", rich_2d_file)
    for root in (rich, os.path.join(demo_base, "euler_2d")):
        kw = dict(well_split_name="train", n_steps_input=3, n_steps_output=2,
                  use_normalization=True)
        ours = WellDataset(path=root, normalization_type=UPSTREAM_CLASS[kind], **kw)
        theirs = upstream.WellDataset(path=root, normalization_type=UPSTREAM_CLASS[kind], **kw)
        raw = WellDataset(path=root, well_split_name="train", n_steps_input=3, n_steps_output=2)
        item = raw[len(raw) // 2]
        tensors = {"variable": item["input_fields"], "constant": item.get("constant_fields")}
        if tensors["constant"] is None:       # no constant fields: one placeholder channel
            tensors["constant"] = torch.randn(4, 1)
        for mode, x in tensors.items():
            for method in FLATTENED:
                got = getattr(ours.norm, method)(x, mode)
                want = getattr(theirs.norm, method)(x, mode)
                assert got.dtype == want.dtype and torch.equal(got, want), (root, mode, method)
        with pytest.raises(ValueError, match="channels"):
            ours.norm.normalize_flattened(item["input_fields"][..., :1], "variable")
