"""Broken files and directories give one clear line naming the file and the item."""

import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import yaml

from dsfm.data import WellDataset
from dsfm.errors import (
    CorruptFileError,
    DsfmError,
    EmptySplitError,
    NonFiniteError,
    SchemaError,
    StatsError,
)
from tests.conftest import REPO

NAME = "shallow_water_2d"


@pytest.fixture
def dataset(demo_base, tmp_path):
    """A private copy of one demo dataset, free to break."""
    dst = tmp_path / NAME
    shutil.copytree(os.path.join(demo_base, NAME), dst)
    return dst


def train_file(dataset):
    return sorted((dataset / "data" / "train").glob("*.hdf5"))[0]


def open_ds(dataset, **kw):
    return WellDataset(path=str(dataset), well_split_name="train", n_steps_input=2, **kw)


def check(*paths):
    return subprocess.run([sys.executable, "-m", "dsfm.data.check", *map(str, paths)], cwd=REPO,
                          capture_output=True, text=True)


def assert_one_line(exc, *needles):
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"


def test_valid_dataset_passes_the_checker(demo_base):
    proc = check(demo_base)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout == ""
    assert "valid" in proc.stderr


def test_truncated_file(dataset):
    path = train_file(dataset)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptFileError) as exc:
        open_ds(dataset)
    assert_one_line(exc, str(path), "truncated or corrupt")
    proc = check(dataset)
    assert proc.returncode == 1
    assert str(path) in proc.stdout and "truncated" in proc.stdout


def test_not_hdf5_at_all(dataset):
    path = train_file(dataset)
    path.write_bytes(b"this is not an HDF5 file" * 100)
    with pytest.raises(CorruptFileError) as exc:
        open_ds(dataset)
    assert_one_line(exc, str(path))


def test_corrupt_data_block_is_reported_on_read(dataset):
    """Damage the bytes of a field's data (not the metadata): the read names file and item."""
    path = train_file(dataset)
    with h5py.File(path) as f:
        offset = f["t0_fields/height"].id.get_offset()
    ds = open_ds(dataset)
    with open(path, "r+b") as fh:       # turn the stored floats into NaN patterns
        fh.seek(offset)
        fh.write(b"\xff" * 4096)
    with pytest.raises(NonFiniteError) as exc:
        ds[0]
    assert_one_line(exc, str(path), "t0_fields/height", "trajectory 0", "time index 0")


@pytest.mark.parametrize("group", ["t1_fields", "dimensions", "boundary_conditions"])
def test_missing_group(dataset, group):
    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        del f[group]
    with pytest.raises(SchemaError) as exc:
        open_ds(dataset)
    assert_one_line(exc, str(path), f"'/{group}' is missing")
    proc = check(path)
    assert proc.returncode == 1 and f"'/{group}' is missing" in proc.stdout


@pytest.mark.parametrize("obj,attr", [("/", "n_trajectories"), ("/", "dataset_name"),
                                      ("t0_fields/height", "time_varying"),
                                      ("t1_fields/velocity", "dim_varying"),
                                      ("dimensions", "spatial_dims")])
def test_missing_attribute(dataset, obj, attr):
    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        del f[obj].attrs[attr]
    with pytest.raises(SchemaError) as exc:
        open_ds(dataset)
    assert_one_line(exc, str(path), f"'{attr}'")


def test_shape_contradicts_flags(dataset):
    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        f["t0_fields/height"].attrs["sample_varying"] = False
    with pytest.raises(SchemaError) as exc:
        open_ds(dataset)
    assert_one_line(exc, str(path), "/t0_fields/height", "contradicts its flags")


def test_wrong_vector_components(dataset):
    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        v = f["t1_fields/velocity"][()]
        attrs = dict(f["t1_fields/velocity"].attrs)
        del f["t1_fields/velocity"]
        d = f["t1_fields"].create_dataset("velocity", data=v[..., :1])
        d.attrs.update(attrs)
    with pytest.raises(SchemaError) as exc:
        open_ds(dataset)
    assert_one_line(exc, "/t1_fields/velocity", "tensor order 1")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_in_a_field(dataset, value):
    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        f["t1_fields/velocity"][1, 5, 3, 4, 0] = value
    ds = open_ds(dataset)
    ds[0]                                     # trajectory 0 is clean
    bad = [i for i in range(len(ds)) if ds.locate(i)[:2] == (0, 1) and ds.locate(i)[2] <= 5]
    with pytest.raises(NonFiniteError) as exc:
        ds[bad[-1]]
    kind = "NaN" if np.isnan(value) else "Inf"
    assert_one_line(exc, str(path), "/t1_fields/velocity", kind, "trajectory 1", "time index 5")
    proc = check(dataset)
    assert proc.returncode == 1
    assert f"first {kind} at trajectory 1, time index 5" in proc.stdout


def test_nan_check_can_be_disabled(dataset):
    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        f["t0_fields/height"][0, 0, 0, 0] = np.nan
    item = open_ds(dataset, check_finite=False)[0]
    assert item["input_fields"].isnan().sum() == 1


@pytest.mark.parametrize("key", ["std", "mean_delta"])
def test_stats_missing_key(dataset, key):
    stats_path = dataset / "stats.yaml"
    stats = yaml.safe_load(stats_path.read_text())
    del stats[key]
    stats_path.write_text(yaml.safe_dump(stats))
    with pytest.raises(StatsError) as exc:
        open_ds(dataset, use_normalization=True, normalization_type="zscore")
    assert_one_line(exc, str(stats_path), f"'{key}'")
    open_ds(dataset, use_normalization=True, normalization_type="rms")   # rms does not need it
    proc = check(dataset)
    assert proc.returncode == 1 and f"key '{key}' is missing" in proc.stdout


@pytest.mark.parametrize("value,problem", [(-0.5, "is negative"), (float("inf"), "not finite"),
                                           (float("nan"), "not finite")])
def test_stats_a_scale_that_is_negative_or_not_finite_is_refused(dataset, value, problem):
    """Only the checker refused them: a negative std was taken as the 1e-4 floor (the field
    scaled up 10^4 times), an infinite one made the field zeros, a NaN one NaN (and the
    loader then blamed another field's values). The dataset, the loader and the trainer now
    refuse them in one line, as the checker does."""
    from dsfm.data import WellLoader

    stats_path = dataset / "stats.yaml"
    stats = yaml.safe_load(stats_path.read_text())
    stats["std"]["height"] = value
    stats_path.write_text(yaml.safe_dump(stats))
    with pytest.raises(StatsError) as exc:
        open_ds(dataset, use_normalization=True, normalization_type="zscore")
    assert_one_line(exc, str(stats_path), "'std.height'", problem)
    with pytest.raises(StatsError) as exc:
        WellLoader([str(dataset)], batch_size=2, num_workers=1, normalization="zscore")
    assert_one_line(exc, str(stats_path), "'std.height'", problem)
    open_ds(dataset, use_normalization=True, normalization_type="rms")   # rms does not use it
    proc = check(dataset)
    assert proc.returncode == 1 and "'std.height' is" in proc.stdout


def test_stats_missing_field(dataset):
    stats_path = dataset / "stats.yaml"
    stats = yaml.safe_load(stats_path.read_text())
    del stats["rms"]["velocity"]
    stats_path.write_text(yaml.safe_dump(stats))
    with pytest.raises(StatsError) as exc:
        open_ds(dataset, use_normalization=True, normalization_type="rms")
    assert_one_line(exc, str(stats_path), "'rms'", "'velocity'")


def test_stats_file_missing(dataset):
    os.remove(dataset / "stats.yaml")
    with pytest.raises(StatsError) as exc:
        open_ds(dataset, use_normalization=True, normalization_type="zscore")
    assert_one_line(exc, "stats.yaml", "not found")
    open_ds(dataset)          # without normalization the stats are not needed


def test_stats_file_not_text_is_one_line(dataset):
    """A stats.yaml of bytes that are not UTF-8 (a binary copied over it) was a
    UnicodeDecodeError traceback."""
    (dataset / "stats.yaml").write_bytes(b"mean: {a: 1}\n\xff\xfe\n")
    with pytest.raises(StatsError) as exc:
        open_ds(dataset, use_normalization=True, normalization_type="zscore")
    assert_one_line(exc, "stats.yaml", "cannot read the stats file", "can't decode byte 0xff")



def test_stats_file_not_text_is_one_problem_to_the_checker(dataset):
    """python -m dsfm.data.check stopped on a stats.yaml of bytes that are not UTF-8 with a
    UnicodeDecodeError traceback (exit 1, the other problems unsaid), where the loader says
    one line: the checker now reports it as a problem of that file."""
    (dataset / "stats.yaml").write_bytes(b"mean: {a: 1}\n\xff\xfe\n")
    proc = check(dataset)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{dataset / 'stats.yaml'}: cannot read the stats file" in proc.stdout
    assert "can't decode byte 0xff" in proc.stdout

def test_empty_split_directory(dataset):
    for p in (dataset / "data" / "valid").glob("*"):
        p.unlink()
    with pytest.raises(EmptySplitError) as exc:
        WellDataset(path=str(dataset), well_split_name="valid")
    assert_one_line(exc, str(dataset / "data" / "valid"), "no .h5 or .hdf5 files")
    proc = check(dataset)       # an empty valid or test split is allowed, and noted
    assert proc.returncode == 0 and f"note: {dataset / 'data' / 'valid'}: empty split" in \
        proc.stderr, proc.stdout + proc.stderr
    assert "--set train.eval_batches=0" in proc.stderr      # what a training run needs then
    for p in (dataset / "data" / "train").glob("*"):     # an empty train split is not
        p.unlink()
    proc = check(dataset)
    assert proc.returncode == 1 and "train: split directory has no" in proc.stdout


def test_missing_split_directory(dataset):
    shutil.rmtree(dataset / "data" / "test")
    with pytest.raises(EmptySplitError) as exc:
        WellDataset(path=str(dataset), well_split_name="test")
    assert_one_line(exc, "directory not found")


def test_files_of_one_dataset_must_agree(dataset, demo_base):
    other = sorted((dataset / "data" / "train").glob("*.hdf5"))[1]
    with h5py.File(other, "r+") as f:
        for g in ("t0_fields", "t1_fields"):
            for name in list(f[g]):
                data, attrs = f[g][name][()], dict(f[g][name].attrs)
                del f[g][name]
                f[g].create_dataset(name, data=data[:, :, :16]).attrs.update(attrs)
        x = f["dimensions/x"][()]
        attrs = dict(f["dimensions/x"].attrs)
        del f["dimensions/x"]
        f["dimensions"].create_dataset("x", data=x[:16]).attrs.update(attrs)
        mask = f["boundary_conditions/x_periodic/mask"][:16]
        del f["boundary_conditions/x_periodic/mask"]
        f["boundary_conditions/x_periodic"].create_dataset("mask", data=mask)
    with pytest.raises(SchemaError) as exc:
        open_ds(dataset)
    assert_one_line(exc, str(other), "spatial resolution", "must agree")
    proc = check(dataset)
    assert proc.returncode == 1 and "spatial resolution" in proc.stdout



def _drop_height(f):
    del f["t0_fields/height"]
    f["t0_fields"].attrs["field_names"] = np.array([], dtype=float)


def _velocity_at_time_0(f):
    v = f["t1_fields/velocity"]
    attrs = dict(v.attrs, time_varying=False)
    data = v[:, 0]
    del f["t1_fields/velocity"]
    f["t1_fields"].create_dataset("velocity", data=data).attrs.update(attrs)


def _scalars_reordered(f):
    f["scalars"].attrs["field_names"] = np.array(["mean_depth", "g", "amplitude"], dtype=object)


@pytest.mark.parametrize("damage,said", [
    (_drop_height, "/t0_fields/height is missing, which {first} has"),
    (_velocity_at_time_0, "/t1_fields/velocity: time_varying False differs from True in {first}"),
    (_scalars_reordered, "scalar order ['mean_depth', 'g', 'amplitude'] differs from "
                         "['g', 'mean_depth', 'amplitude'] in {first}"),
])
def test_files_that_disagree_on_a_field_name_it(dataset, damage, said):
    """Two files of one dataset whose fields (or scalars) differ in one of them: before, the
    line held both files' whole lists of (name, order, time_varying, dim_varying) tuples, to be
    compared by eye, and no word of what to do; now it names the one field or scalar that
    differs, its value in each file, and what to do, in the checker, the drop-in and the
    loader's indexing alike."""
    from dsfm.data.prefetch import index_dataset

    first, other = sorted((dataset / "data" / "train").glob("*.hdf5"))
    with h5py.File(other, "r+") as f:
        damage(f)
    line = (f"{other}: " + said.format(first=first) + "; all files of one dataset must agree: "
            "fix or regenerate this file, or move it to a dataset of its own")
    for make in (lambda: open_ds(dataset),
                 lambda: index_dataset(str(dataset), "train", 2, 1, 1, "zscore")):
        with pytest.raises(SchemaError) as exc:
            make()
        assert str(exc.value) == line
    proc = check(dataset)
    assert proc.returncode == 1 and proc.stdout.splitlines() == [line], proc.stdout

def test_every_error_is_a_dsfm_error():
    for cls in (CorruptFileError, SchemaError, NonFiniteError, StatsError, EmptySplitError):
        assert issubclass(cls, DsfmError)


def test_checker_lists_every_problem_one_per_line(dataset):
    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        del f.attrs["grid_type"]
        f["t0_fields/height"].attrs["time_varying"] = False
        f["boundary_conditions/x_periodic"].attrs["bc_type"] = "SLIPPERY"
    proc = check(path)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1
    assert len(lines) == 3, lines
    assert all(line.startswith(str(path)) for line in lines)
    assert any("'grid_type'" in line for line in lines)
    assert any("/t0_fields/height" in line and "contradicts" in line for line in lines)
    assert any("SLIPPERY" in line for line in lines)


def test_checker_on_missing_path(tmp_path):
    proc = check(tmp_path / "nope.hdf5")
    assert proc.returncode == 1 and "no such file" in proc.stdout


def test_checker_reads_a_trajectory_a_few_steps_at_a_time(dataset, monkeypatch):
    """A trajectory of a real Well dataset can be tens of GB: the NaN scan reads a few time
    steps at a time (here one step), and still names the first non-finite value's time index
    and counts those of the whole trajectory."""
    from dsfm.data import check as checker
    from dsfm.data import stats
    from dsfm.data.well_format import open_h5, read_layout

    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        height = f["t0_fields/height"]
        height[1, 3, 2, 2] = np.inf
        height[1, 5, 0, 1] = np.nan
        height[1, 5, 4, 4] = np.nan
    monkeypatch.setattr(stats, "READ_BLOCK_BYTES", 1)
    with open_h5(str(path)) as f:
        problems = checker._scan_finite(f, read_layout(f, str(path)))
    assert problems == [f"{path}: /t0_fields/height: 3 non-finite values, first Inf at "
                        "trajectory 1, time index 3"]


def _replace_dataset(f, name, data):
    attrs = dict(f[name].attrs)
    del f[name]
    f.create_dataset(name, data=data).attrs.update(attrs)


@pytest.mark.parametrize("damage,needle", [
    (lambda f: f.attrs.__setitem__("n_spatial_dims", "two"),
     "root attribute 'n_spatial_dims' is 'two', expected an integer"),
    (lambda f: f.attrs.__setitem__("n_trajectories", [4]),      # upstream's int() fails too
     "root attribute 'n_trajectories' is [4], expected an integer"),
    (lambda f: f.attrs.__setitem__("n_trajectories", 2.5),
     "root attribute 'n_trajectories' is 2.5, expected an integer"),
    (lambda f: _replace_dataset(f, "dimensions/x", np.float32(0.5)),
     "/dimensions/x has shape (), expected [n] (sample_varying=False)"),
    (lambda f: _replace_dataset(f, "boundary_conditions/x_periodic/mask",
                                np.array([b"y"] * f["dimensions/x"].shape[0])),
     "/boundary_conditions/x_periodic/mask: dtype |S1 is not boolean"),
], ids=["ndims-text", "ntraj-list", "ntraj-fraction", "coordinate-number", "mask-text"])
def test_malformed_metadata_is_one_line_not_a_traceback(dataset, damage, needle):
    """Metadata of the wrong kind (text for a count, a number for a coordinate axis, text for a
    boundary mask): before, the reader and the checker died with ValueError, TypeError,
    IndexError or a NumPy ufunc error."""
    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(SchemaError) as exc:
        open_ds(dataset)
    assert_one_line(exc, str(path), needle)
    proc = check(path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.splitlines() == [f"{path}: {needle}"]


def test_text_attributes_that_are_not_utf8_are_shown_not_fatal(dataset):
    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        f.attrs["dataset_name"] = np.bytes_(b"shallow\xff")
    proc = check(path)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("damage,needle", [
    (lambda f: _replace_dataset(f, "scalars/g", np.bytes_(b"four")),
     "/scalars/g: dtype |S4 is not numeric"),
    (lambda f: f["scalars"].attrs.__delitem__("field_names"),
     "/scalars: missing attribute 'field_names'"),
], ids=["text-scalar", "no-scalar-list"])
def test_scalars_the_readers_cannot_read_are_refused(dataset, damage, needle):
    """A text scalar or a /scalars group without its field_names list: before, the checker
    called the file valid, then dsfm's WellDataset died with a TypeError traceback at the first
    item (text) and upstream's WellDataset with a KeyError at construction (no list)."""
    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        damage(f)
    proc = check(path)
    assert proc.returncode == 1 and proc.stdout.splitlines() == [f"{path}: {needle}"], \
        proc.stdout
    with pytest.raises(SchemaError) as exc:
        open_ds(dataset)
    assert_one_line(exc, str(path), needle)


def _box_constant_scalars(path):
    """Store every constant scalar of a file with shape (1,) (upstream reads such a file)."""
    with h5py.File(path, "r+") as f:
        for name in f["scalars"]:
            _replace_dataset(f, f"scalars/{name}", np.atleast_1d(f[f"scalars/{name}"][()]))


def test_constant_scalars_of_shapes_1_and_none_in_one_file_are_refused(dataset):
    """Constant scalars stored as () (g, mean_depth) beside one stored as (1,) (amplitude):
    the checker called the file valid, then dsfm's WellDataset died with torch.cat's
    RuntimeError at every item of the file, as upstream's does (an item's constant scalars are
    a number each and a [1] array). Now the checker and the readers refuse it in one line; a
    file whose constant scalars are all (1,) is read, as upstream reads it."""
    from the_well.data import WellDataset as UpstreamDataset

    from dsfm.data.prefetch import index_dataset

    path = train_file(dataset)
    with h5py.File(path, "r+") as f:
        _replace_dataset(f, "scalars/amplitude", np.array([0.1], np.float32))
    upstream = UpstreamDataset(path=str(dataset), well_split_name="train", n_steps_input=2)
    first = upstream.file_index_offsets[upstream.files_paths.index(str(path))] + 1
    with pytest.raises(RuntimeError, match="same number of dimensions"):
        upstream[first]
    needle = ("/scalars/amplitude has shape (1,) beside /scalars/g, which is one number per "
              "item: the_well's reader cannot join a [1] array and a number")
    proc = check(path)
    assert proc.returncode == 1 and proc.stdout.splitlines()[0].startswith(f"{path}: {needle}")
    for make in (lambda: open_ds(dataset),
                 lambda: index_dataset(str(dataset), "train", 2, 1, 1, "zscore")):
        with pytest.raises(SchemaError) as exc:
            make()
        assert_one_line(exc, str(path), needle)

    for other in dataset.glob("data/*/*.hdf5"):     # every file of the dataset: they must agree
        _box_constant_scalars(other)
    assert check(dataset).returncode == 0
    ours = open_ds(dataset)
    upstream = UpstreamDataset(path=str(dataset), well_split_name="train", n_steps_input=2)
    assert ours.files_paths[ours.locate(first)[0]] == str(path)
    got, want = ours[first]["constant_scalars"], upstream[first]["constant_scalars"]
    assert got.shape == want.shape == (1, 3) and np.array_equal(got.numpy(), want.numpy())



def test_constant_scalars_of_shapes_1_and_none_in_two_files_are_refused(dataset):
    """Every constant scalar of one file stored as (1,), those of the other file as (): each
    file is valid, but an item of the first has constant_scalars [1, 3], one of the second [3],
    so a batch holding both (upstream's too) fails to stack, in the middle of training. Before,
    the files were not compared on it: the checker called the dataset valid and the drop-in
    read it. Now the checker, the drop-in and the loader's indexing refuse it in one line
    naming both files, the scalar and its shape in each."""
    from the_well.data import WellDataset as UpstreamDataset
    from torch.utils.data import default_collate

    from dsfm.data.prefetch import index_dataset

    first, other = sorted((dataset / "data" / "train").glob("*.hdf5"))
    _box_constant_scalars(other)
    upstream = UpstreamDataset(path=str(dataset), well_split_name="train", n_steps_input=2)
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        default_collate([upstream[0], upstream[len(upstream) - 1]])
    line = (f"{other}: /scalars/g: shape per item (1,) differs from () in {first}; all files of "
            "one dataset must agree: fix or regenerate this file, or move it to a dataset of "
            "its own")
    proc = check(dataset)
    assert proc.returncode == 1 and proc.stdout.splitlines() == [line], proc.stdout
    for make in (lambda: open_ds(dataset),
                 lambda: index_dataset(str(dataset), "train", 2, 1, 1, "zscore")):
        with pytest.raises(SchemaError) as exc:
            make()
        assert str(exc.value) == line

def test_a_dangling_symlink_in_a_split_is_one_line(dataset, tmp_path):
    """A split directory holding a symlink whose target was moved or deleted: before, h5py's
    FileNotFoundError (not a DsfmError, so `python -m dsfm.train` died with a traceback on
    every rank); now one DsfmError line naming the file and where the link points, still a
    FileNotFoundError as upstream raises, and the checker says the same."""
    from dsfm.data.prefetch import index_dataset

    gone = tmp_path / "moved_away.hdf5"
    (dataset / "data" / "train" / "extra.hdf5").symlink_to(gone)
    for make in (lambda: open_ds(dataset),
                 lambda: index_dataset(str(dataset), "train", 2, 1, 1, "zscore")):
        with pytest.raises(DsfmError) as info:
            make()
        assert isinstance(info.value, FileNotFoundError)
        assert str(info.value) == (f"{dataset}/data/train/extra.hdf5: not found (a symlink to "
                                   f"{gone}, which does not exist)")
    proc = check(dataset)
    assert proc.returncode == 1 and f"a symlink to {gone}, which does not exist" in proc.stdout


def test_a_file_locked_by_a_writer_is_not_called_corrupt(dataset):
    """A file another process holds open for writing (HDF5 takes an exclusive flock, as h5py's
    "r+" does in a notebook): before, 'the file is truncated or corrupt, regenerate or
    re-download it'; now one line saying a writer holds it and what to do."""
    import fcntl

    from dsfm.data.prefetch import index_dataset

    path = train_file(dataset)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)          # what HDF5 does for a writer
        with pytest.raises(CorruptFileError) as info:
            index_dataset(str(dataset), "train", 2, 1)
        assert_one_line(info, str(path), "while another process has it open for writing",
                        "HDF5_USE_FILE_LOCKING=FALSE")
        assert "corrupt" not in str(info.value) and "re-download" not in str(info.value)
        proc = check(dataset)
        assert proc.returncode == 1 and "another process has it open for writing" in proc.stdout
    finally:
        os.close(fd)


def test_a_directory_named_as_a_file_of_a_split_is_one_line(dataset):
    """A directory called like an HDF5 file in a split: before, 'the file is truncated or
    corrupt, regenerate or re-download it' over two lines (HDF5's message holds the time, with
    its newline); now one line saying it is a directory."""
    from dsfm.data.prefetch import index_dataset

    (dataset / "data" / "train" / "extra.hdf5").mkdir()
    with pytest.raises(CorruptFileError) as info:
        index_dataset(str(dataset), "train", 2, 1)
    assert_one_line(info, f"{dataset}/data/train/extra.hdf5 is a directory, not an HDF5 file")
    assert "corrupt" not in str(info.value)
