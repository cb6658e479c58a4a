"""The Well format: writing, layout inspection, statistics and file handles."""

import os
import re

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from dsfm.data import WellDataset
from dsfm.data.stats import RunningMoments
from dsfm.data.well_format import (
    Boundary,
    Field,
    boundaries_all,
    channel_names,
    expected_field_shape,
    inspect_file,
    write_well_file,
)
from dsfm.errors import SchemaError
from tests.conftest import DEMO_DATASETS
from tests.data.well_fixtures import cube_3d_file, make_dataset, rich_2d_file


def test_channel_names_follow_tensor_order():
    assert channel_names("p", 0, "xy") == ("p",)
    assert channel_names("u", 1, "xyz") == ("u_x", "u_y", "u_z")
    assert channel_names("s", 2, "xy") == ("s_xx", "s_xy", "s_yx", "s_yy")


def test_expected_shapes():
    assert expected_field_shape(5, 9, (8, 6), 1, True, True, (True, True)) == (5, 9, 8, 6, 2)
    assert expected_field_shape(5, 9, (8, 6), 0, False, False, (True, True)) == (8, 6)
    assert expected_field_shape(5, 9, (8, 6, 4), 2, True, False, (True, False, True)) == \
        (9, 8, 4, 3, 3)


def test_layout_of_a_written_file(tmp_path):
    path = str(tmp_path / "rich.hdf5")
    rich_2d_file(path, np.random.default_rng(0))
    with h5py.File(path) as f:
        layout, problems = inspect_file(f, path)
        assert f.attrs["simulation_parameters"].tolist() == ["Re"]
        assert f["t2_fields/stress"].attrs["symmetric"] == np.False_
    assert problems == []
    assert layout.dataset_name == "rich_2d" and layout.spatial_shape == (24, 16)
    assert [f.name for f in layout.variable_fields] == ["pressure", "velocity", "stress"]
    assert [f.name for f in layout.constant_fields] == ["obstacle", "bathymetry"]
    assert layout.time_sample_varying and layout.coord_sample_varying == {"x": True, "y": False}
    assert layout.boundary_codes.tolist() == [[0, 0], [1, 1]]
    assert layout.simulation_parameters == {"Re": 500.0}


def test_boundary_codes_per_face(tmp_path):
    """A wall needs its whole face masked; open or periodic need any point of it."""
    path = str(tmp_path / "b.hdf5")
    wall = np.zeros((5, 6), bool)
    wall[0, :] = True                              # the whole low-x face
    wall[-1, :3] = True                            # half of the high-x face: not a wall
    periodic = np.zeros(6, bool)
    periodic[0] = True                             # one point of the low-y face
    write_well_file(path, dataset_name="b", spatial_dims=("x", "y"),
                    coords={"x": np.arange(5.0), "y": np.arange(6.0)}, time=np.arange(3.0),
                    n_trajectories=1,
                    fields=[Field("u", np.zeros((1, 3, 5, 6), np.float32))],
                    boundaries=[Boundary("x_wall", "WALL", ("x", "y"), wall),
                                Boundary("y_periodic", "PERIODIC", ("y",), periodic)])
    with h5py.File(path) as f:
        layout, problems = inspect_file(f, path)
    assert problems == []
    assert layout.boundary_codes.tolist() == [[0, 1], [2, 1]]


def test_writer_rejects_shapes_that_contradict_flags(tmp_path):
    with pytest.raises(SchemaError, match="its flags imply"):
        write_well_file(str(tmp_path / "x.hdf5"), dataset_name="x", spatial_dims=("x",),
                        coords={"x": np.arange(4.0)}, time=np.arange(3.0), n_trajectories=2,
                        fields=[Field("u", np.zeros((2, 3, 5), np.float32))])


def test_running_moments_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(1e4, 1e-2, size=(1000, 3))          # big mean, tiny spread
    m = RunningMoments(3)
    for chunk in np.array_split(x, 7):
        m.update(chunk)
    np.testing.assert_allclose(m.mean, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(m.std, x.std(0), rtol=1e-9)
    np.testing.assert_allclose(m.rms, np.sqrt((x ** 2).mean(0)), rtol=1e-12)


def test_stats_yaml_of_a_rich_dataset(tmp_path):
    root = make_dataset(str(tmp_path), "rich_2d", rich_2d_file)
    stats = yaml.safe_load(open(os.path.join(root, "stats.yaml")))
    assert set(stats) == {"mean", "std", "rms", "mean_delta", "std_delta", "rms_delta"}
    assert isinstance(stats["mean"]["pressure"], float)
    assert np.asarray(stats["std"]["velocity"]).shape == (2,)
    assert np.asarray(stats["rms_delta"]["stress"]).shape == (2, 2)
    assert "obstacle" in stats["mean"] and "obstacle" not in stats["mean_delta"]
    files = sorted(os.listdir(os.path.join(root, "data", "train")))
    vel, dvel = [], []
    for name in files:
        with h5py.File(os.path.join(root, "data", "train", name)) as f:
            v = f["t1_fields/velocity"][()].astype(np.float64)
        vel.append(v.reshape(-1, 2))
        dvel.append(np.diff(v, axis=1).reshape(-1, 2))
    vel, dvel = np.concatenate(vel), np.concatenate(dvel)
    np.testing.assert_allclose(stats["mean"]["velocity"], vel.mean(0), rtol=1e-10)
    np.testing.assert_allclose(stats["std"]["velocity"], vel.std(0), rtol=1e-10)
    np.testing.assert_allclose(stats["std_delta"]["velocity"], dvel.std(0), rtol=1e-10)
    np.testing.assert_allclose(stats["rms_delta"]["velocity"],
                               np.sqrt((dvel ** 2).mean(0)), rtol=1e-10)


def test_well_statistics_read_in_chunks_equal_the_whole_trajectories(tmp_path, monkeypatch):
    """write_stats reads a few time steps of a field at a time (a trajectory of The Well's
    MHD_256 vector field is 20 GB), one step overlapping for the differences: same numbers."""
    from dsfm.data import stats as stats_module

    whole_root = make_dataset(str(tmp_path / "whole"), "rich_2d", rich_2d_file)
    whole = yaml.safe_load(open(os.path.join(whole_root, "stats.yaml")))
    monkeypatch.setattr(stats_module, "READ_BLOCK_BYTES", 1)        # two steps a read
    chunked_root = make_dataset(str(tmp_path / "chunked"), "rich_2d", rich_2d_file)
    chunked = yaml.safe_load(open(os.path.join(chunked_root, "stats.yaml")))
    assert {k: sorted(v) for k, v in whole.items()} == {k: sorted(v) for k, v in chunked.items()}
    for key, table in whole.items():
        for name, want in table.items():
            np.testing.assert_allclose(chunked[key][name], want, rtol=1e-12, atol=1e-15,
                                       err_msg=f"{key}.{name}")


@pytest.mark.parametrize("name", DEMO_DATASETS)
def test_zscore_normalized_train_split_is_standardized(demo_base, name):
    """stats.yaml is computed over the train split: normalized train data has mean 0, std 1."""
    ds = WellDataset(path=os.path.join(demo_base, name), well_split_name="train",
                     n_steps_input=1, n_steps_output=0, use_normalization=True,
                     normalization_type="zscore")
    x = torch.cat([ds[i]["input_fields"] for i in range(len(ds))]).double()
    x = x.reshape(-1, x.shape[-1])
    ok = x.std(0) > 0
    torch.testing.assert_close(x.mean(0), torch.zeros_like(x.mean(0)), atol=1e-4, rtol=0)
    torch.testing.assert_close(x.std(0, unbiased=False)[ok], torch.ones_like(x[0])[ok],
                               atol=1e-4, rtol=0)


def test_open_handles_are_bounded_and_closed(demo_base):
    path = os.path.join(demo_base, "euler_2d")
    ds = WellDataset(path=path, well_split_name="train", n_steps_input=2, max_open_files=1)
    assert len(ds.files_paths) >= 2
    for i in (0, len(ds) - 1, 0, len(ds) - 1):
        ds[i]
        assert ds._pool.n_open == 1
    ds2 = WellDataset(path=path, well_split_name="train", n_steps_input=2)
    for i in range(len(ds2)):
        ds2[i]
    assert ds2._pool.n_open == len(ds2.files_paths)      # each file opened once, kept open
    ds2.close()
    assert ds2._pool.n_open == 0
    ds2[0]                                                # reopens on demand
    assert ds2._pool.n_open == 1
    ds2.close()


def test_dataloader_workers_give_the_same_batches(demo_base):
    """Handles are per process: forked workers open their own and get identical data."""
    ds = WellDataset(path=os.path.join(demo_base, "navier_stokes_2d"), well_split_name="valid",
                     n_steps_input=4, use_normalization=True, normalization_type="rms")
    ds[0]                                 # parent has open handles before the fork
    serial = [b for b in DataLoader(ds, batch_size=5)]
    parallel = [b for b in DataLoader(ds, batch_size=5, num_workers=2)]
    assert len(serial) == len(parallel)
    for a, b in zip(serial, parallel):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_3d_windows_are_one_read_per_field(tmp_path):
    """A window's bytes match a direct slice of each stored field (no tiling, no reordering)."""
    root = make_dataset(str(tmp_path), "cube_3d", cube_3d_file)
    ds = WellDataset(path=root, well_split_name="train", n_steps_input=2, n_steps_output=2,
                     min_dt_stride=2)
    for i in range(len(ds)):
        fi, traj, t0 = ds.locate(i)
        with h5py.File(ds.files_paths[fi]) as f:
            d = f["t0_fields/density"][traj, t0:t0 + 7:2]
            v = f["t1_fields/velocity"][traj, t0:t0 + 7:2]
            s = f["t2_fields/strain"][traj, t0:t0 + 7:2].reshape(4, 8, 6, 5, 9)
        want = np.concatenate([d[..., None], v, s], -1)
        got = torch.cat([ds[i]["input_fields"], ds[i]["output_fields"]]).numpy()
        np.testing.assert_array_equal(got, want)


def test_periodic_demo_boundaries(demo_base):
    for name in DEMO_DATASETS:
        ds = WellDataset(path=os.path.join(demo_base, name), well_split_name="test")
        assert ds[0]["boundary_conditions"].tolist() == [[2.0, 2.0], [2.0, 2.0]]
        assert ds.metadata.boundary_condition_types == ["PERIODIC"]


def test_boundaries_all_masks_both_faces():
    (bx, by) = boundaries_all("WALL", ("x", "y"), (4, 3))
    assert bx.mask.tolist() == [True, False, False, True]
    assert by.bc_type == "WALL" and by.associated_dims == ("y",)


def test_two_fields_giving_one_channel_name_are_refused(tmp_path):
    """A t0 field `velocity_x` beside a t1 `velocity` (whose x component is also `velocity_x`):
    the channel name is the field column's key, so both channels got one column (field ids
    [0, 0, 1], two fields in the vocabulary for three channels: the model could not tell them
    apart) and one entry in the metrics. Now the dataset is refused, naming both fields."""
    from dsfm.data.fields import FieldVocabulary
    from dsfm.data.prefetch import WellLoader, index_dataset
    from dsfm.errors import ConfigError

    rng = np.random.default_rng(0)
    root = tmp_path / "clash"
    os.makedirs(root / "data" / "train")
    write_well_file(str(root / "data" / "train" / "clash.hdf5"), dataset_name="clash",
                    spatial_dims=("x", "y"), coords={"x": np.arange(16.0), "y": np.arange(16.0)},
                    time=np.arange(6.0), n_trajectories=1,
                    fields=[Field("velocity_x", rng.normal(size=(1, 6, 16, 16))),
                            Field("velocity", rng.normal(size=(1, 6, 16, 16, 2)), order=1)],
                    boundaries=boundaries_all("PERIODIC", ("x", "y"), (16, 16)))
    why = r"/t0_fields/velocity_x and /t1_fields/velocity both give a channel named 'velocity_x'"
    with pytest.raises(ConfigError, match=why):
        index_dataset(str(root), "train", 2, 1)
    with pytest.raises(ConfigError, match=why):
        WellLoader([str(root)], split="train", n_steps_input=2, n_steps_output=1, batch_size=1,
                   num_workers=1, seed=0, rank=0, world_size=1, normalization=None,
                   vocabulary=FieldVocabulary())
    # and `python -m dsfm.data.check`, which passed the file
    from dsfm.data.check import check_file
    _, problems = check_file(str(root / "data" / "train" / "clash.hdf5"))
    assert len(problems) == 1 and re.search(why, problems[0])
