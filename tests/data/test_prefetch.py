"""WellLoader on CPU: values, layout, sharding, resume, bounded ring, and faults."""

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest
import torch

from dsfm.data import PDEBenchDataset, WellDataset, WellLoader, prefetch
from dsfm.data.pdebench import write_pdebench_stats
from dsfm.data.prefetch import WorkerError
from dsfm.data.stats import write_stats
from dsfm.data.well_format import Field, boundaries_all, write_well_file
from dsfm.errors import (
    ConfigError,
    CorruptFileError,
    NonFiniteError,
    SchemaError,
    StatsError,
)
from tests.conftest import DEMO_DATASETS, REPO, run
from tests.data.well_fixtures import (
    cube_3d_file,
    make_dataset,
    nan_point_copy,
    nan_pressure_copy,
    partial_dims_file,
    rich_2d_file,
    shared_forcing_file,
    store_fields_as,
)

pytestmark = pytest.mark.slow


def reference(ds, window, n_in):
    """The same window from the drop-in reader, in the loader's [T, C, *spatial] layout."""
    item = ds[window]
    move = lambda t: t.movedim(-1, 1)  # noqa: E731
    return move(item["input_fields"]), move(item["output_fields"])


#: The assembly paths: in the readers (the CPU default) with the C kernel (batch reads and
#: fused normalization) or with Python and NumPy, and the device path on CPU tensors, its
#: readers with the kernel's batch reads or reading window by window.
PATHS = {"readers-kernel": ("readers", True), "readers-numpy": ("readers", False),
         "device-kernel": ("device", True), "device-python": ("device", False)}


@pytest.mark.parametrize("path_id", list(PATHS))
@pytest.mark.parametrize("normalization", ["zscore", "rms", None])
def test_batches_equal_the_drop_in_reader(demo_base, normalization, path_id, request):
    """Every assembly path gives the drop-in reader's values, bit for bit."""
    assemble_on, fused = PATHS[path_id]
    if fused:
        request.getfixturevalue("normalize_kernel")
    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    refs = {}
    for p in paths:
        kw = dict(use_normalization=True, normalization_type=normalization) if normalization \
            else {}
        ds = WellDataset(path=p, well_split_name="train", n_steps_input=3, n_steps_output=2, **kw)
        refs[ds.dataset_name] = ds
    with WellLoader(paths, n_steps_input=3, n_steps_output=2, batch_size=5, num_workers=2,
                    seed=11, normalization=normalization, assemble_on=assemble_on,
                    native_kernel=fused) as loader:
        assert loader.native_kernel_used == bool(fused)
        seen = set()
        for _, batch in zip(range(24), loader):
            seen.add(batch.dataset)
            ds = refs[batch.dataset]
            assert batch.x.shape == (5, 3, sum(map(len, ds.field_names.values())), 32, 32)
            assert batch.y.shape[1] == 2 and batch.x.dtype == torch.float32
            names = [c for order in ds.field_names.values() for c in order]
            assert batch.field_ids.tolist() == loader.vocabulary.ids(batch.dataset, names)
            for b, w in enumerate(batch.windows):
                x, y = reference(ds, int(w), 3)
                assert torch.equal(batch.x[b], x) and torch.equal(batch.y[b], y)
                assert torch.equal(batch.bcs[b], ds[int(w)]["boundary_conditions"])
    assert seen == set(refs)            # all four datasets appear, one per micro-batch


def test_field_vocabulary_gives_each_dataset_field_its_own_column(demo_base):
    paths = [os.path.join(demo_base, n) for n in ("euler_2d", "navier_stokes_2d")]
    with WellLoader(paths, batch_size=2, num_workers=1) as loader:
        assert loader.vocabulary.keys[:5] == ["euler_2d/density", "euler_2d/pressure",
                                              "euler_2d/energy", "euler_2d/velocity_x",
                                              "euler_2d/velocity_y"]
        assert len(loader.vocabulary) == 10


@pytest.fixture(scope="module")
def pdebench_all(tmp_path_factory):
    """All four PDEBench layouts: per-trajectory groups (swe), channel-last data
    (diff_react), velocity + particles (incomp_ns) and one array per variable (comp_ns)."""
    out = tmp_path_factory.mktemp("pdebench_all")
    proc = run([sys.executable, "-m", "dsfm.sim", "--preset", "demo", "--format", "pdebench",
                "--datasets", "gray_scott,euler,shallow_water,navier_stokes", "--out", str(out),
                "--quiet"])
    assert proc.returncode == 0, proc.stderr
    paths = [str(out / "pdebench" / k) for k in ("diff_react", "comp_ns", "swe", "incomp_ns")]
    for p in paths:
        write_pdebench_stats(p)
    return paths


def offset_pressure_file(path, rng, dtype=np.float64, n_traj=2, n_steps=6, shape=(16, 16)):
    """A pressure of 1e5 varying by about 0.01 (Pa, say), stored as `dtype`, and a velocity
    stored as float32: float32 cannot hold the pressure's values apart."""
    coords = {"x": np.arange(shape[0], dtype=np.float32),
              "y": np.arange(shape[1], dtype=np.float32)}
    pressure = 1e5 + 0.01 * rng.standard_normal((n_traj, n_steps) + shape)
    write_well_file(
        path, dataset_name="offset", spatial_dims=("x", "y"), coords=coords,
        time=np.arange(n_steps, dtype=np.float32), n_trajectories=n_traj,
        fields=[Field("pressure", pressure),
                Field("velocity", rng.standard_normal((n_traj, n_steps) + shape + (2,))
                      .astype(np.float32), order=1)],
        boundaries=boundaries_all("PERIODIC", ("x", "y"), shape))
    with h5py.File(path, "r+") as f:        # write_well_file stores float32: store `dtype`
        attrs = dict(f["t0_fields/pressure"].attrs)
        del f["t0_fields/pressure"]
        f["t0_fields"].create_dataset("pressure", data=pressure.astype(dtype))
        f["t0_fields/pressure"].attrs.update(attrs)


@pytest.mark.parametrize("path_id", list(PATHS))
def test_a_float64_field_with_a_large_mean_keeps_its_values(tmp_path, path_id, request):
    """The readers used to convert a float64 field to float32 before the normalization
    subtracted its mean: a pressure of 1e5 ± 0.01 came out as a few distinct values (errors of
    0.4 on values of about 1). The mean is now subtracted in float64 as the field is read: the
    values are the drop-in reader's (which normalizes in float64) within float32 rounding, in
    a dataset whose other file stores the pressure as float32 too. The physical-units affine
    keeps the true mean."""
    assemble_on, fused = PATHS[path_id]
    if fused:
        request.getfixturevalue("normalize_kernel")
    root = tmp_path / "offset"
    rng = np.random.default_rng(4)
    os.makedirs(root / "data" / "train")
    offset_pressure_file(str(root / "data" / "train" / "a.hdf5"), rng)
    offset_pressure_file(str(root / "data" / "train" / "b.hdf5"), rng, dtype=np.float32)
    write_stats(str(root))
    ref = WellDataset(path=str(root), well_split_name="train", n_steps_input=2,
                      use_normalization=True, normalization_type="zscore")
    with WellLoader([str(root)], n_steps_input=2, batch_size=4, num_workers=1, seed=3,
                    normalization="zscore", assemble_on=assemble_on,
                    native_kernel=fused) as loader:
        assert loader.native_kernel_used == bool(fused)
        files = set()
        for _, batch in zip(range(6), loader):
            for b, w in enumerate(batch.windows):
                fi = loader.datasets[0].source.locate(int(w))[0]
                files.add(fi)
                x, y = reference(ref, int(w), 2)
                torch.testing.assert_close(batch.x[b].double(), x.double(), rtol=0, atol=1e-6)
                torch.testing.assert_close(batch.y[b].double(), y.double(), rtol=0, atol=1e-6)
                if fi == 0:                 # (file b's float32 pressure is itself coarse)
                    assert len(torch.unique(batch.x[b][:, 0])) == batch.x[b][:, 0].numel()
        assert files == {0, 1}
        scale, shift = loader.affine("offset")            # physical = normalized · scale
        assert float(shift[0, 0, 0]) == pytest.approx(1e5)  # + shift: the pressure's mean


@pytest.mark.parametrize("path_id", list(PATHS))
def test_float16_fields_equal_the_drop_in_reader(tmp_path, path_id, request):
    """Fields stored as float16: the loader reads them as float32 and normalizes in float32;
    the drop-in reader normalized them in place in float16, so their values differed in the
    fourth digit. Now every assembly path gives the drop-in's values, bit for bit."""
    assemble_on, fused = PATHS[path_id]
    if fused:
        request.getfixturevalue("normalize_kernel")
    root = make_dataset(str(tmp_path), "cube_3d", cube_3d_file, files_per_split=1)
    store_fields_as(root, np.float16)
    ref = WellDataset(path=root, well_split_name="train", n_steps_input=2,
                      use_normalization=True, normalization_type="zscore")
    with WellLoader([root], n_steps_input=2, batch_size=2, num_workers=1, seed=5,
                    normalization="zscore", assemble_on=assemble_on,
                    native_kernel=fused) as loader:
        for _, batch in zip(range(4), loader):
            for b, w in enumerate(batch.windows):
                x, y = reference(ref, int(w), 2)
                assert torch.equal(batch.x[b], x) and torch.equal(batch.y[b], y)


@pytest.mark.parametrize("path_id", list(PATHS))
@pytest.mark.parametrize("normalization", ["zscore", "rms"])
def test_fields_every_trajectory_shares_equal_the_drop_in_reader(tmp_path, normalization,
                                                                 path_id, request):
    """A time-varying field stored without a trajectory axis (sample_varying false: a forcing
    every trajectory shares), which upstream and the drop-in reader read, was refused by the
    loader ('needs one value per trajectory'). Every assembly path now reads it for each
    trajectory from its time axis, with the drop-in's values bit for bit, in every split."""
    assemble_on, fused = PATHS[path_id]
    if fused:
        request.getfixturevalue("normalize_kernel")
    root = make_dataset(str(tmp_path), "shared_forcing", shared_forcing_file)
    for split in ("train", "valid"):
        ref = WellDataset(path=root, well_split_name=split, n_steps_input=2, n_steps_output=2,
                          use_normalization=True, normalization_type=normalization)
        with WellLoader([root], split=split, n_steps_input=2, n_steps_output=2, batch_size=3,
                        num_workers=1, seed=2, normalization=normalization,
                        assemble_on=assemble_on, native_kernel=fused) as loader:
            assert loader.native_kernel_used == bool(fused)
            trajectories = set()
            for _, batch in zip(range(8), loader):
                assert batch.x.shape == (3, 2, 6, 12, 10)
                for b, w in enumerate(batch.windows):
                    trajectories.add(ref.locate(int(w))[:2])
                    x, y = reference(ref, int(w), 2)
                    assert torch.equal(batch.x[b], x) and torch.equal(batch.y[b], y)
                    assert batch.bcs[b].tolist() == [[0.0, 0.0], [2.0, 2.0]]
            assert len(trajectories) > 2


def test_a_dataset_without_time_varying_fields_is_refused_when_the_loader_is_built(
        tmp_path, demo_base):
    """A Well dataset whose fields are all time-invariant gives x and y no channels: alone it
    failed with 'cannot mmap an empty file', in a mixture with a ValueError from a reader at
    the first step that drew it. Now one line naming the file, when the loader is built."""
    root = tmp_path / "static"
    for split in ("train", "valid", "test"):
        os.makedirs(root / "data" / split)
        write_well_file(str(root / "data" / split / "a.hdf5"), dataset_name="static",
                        spatial_dims=("x", "y"), coords={"x": np.arange(4.0),
                                                         "y": np.arange(5.0)},
                        time=np.arange(6.0), n_trajectories=2,
                        fields=[Field("k", np.ones((2, 4, 5), np.float32),
                                      time_varying=False)])
    write_stats(str(root))
    for datasets in ([str(root)], [os.path.join(demo_base, "euler_2d"), str(root)]):
        with pytest.raises(ConfigError, match=r"a\.hdf5: no time-varying field .* leave this "
                           "dataset out of the loader"):
            WellLoader(datasets, n_steps_input=2, batch_size=2, num_workers=1)


def test_a_field_shared_in_one_file_and_per_trajectory_in_another_is_refused(tmp_path):
    """The loader reads a field alike from every file of a split: one stored with a trajectory
    axis in one file and without in another is refused at indexing, naming both files."""
    root = tmp_path / "shared_forcing"
    os.makedirs(root / "data" / "train")
    rng = np.random.default_rng(0)
    shared_forcing_file(str(root / "data" / "train" / "a.hdf5"), rng)
    shared_forcing_file(str(root / "data" / "train" / "b.hdf5"), rng, shared=False)
    write_stats(str(root))
    WellDataset(path=str(root), well_split_name="train")       # the drop-in reads both
    with pytest.raises(ConfigError, match=r"b\.hdf5: /t0_fields/forcing has "
                       r"sample_varying=True, but False in .*a\.hdf5"):
        WellLoader([str(root)], n_steps_input=2, batch_size=2, num_workers=1)


@pytest.mark.parametrize("assemble_on,direct", [("readers", True), ("readers", False),
                                                ("device", True)])
def test_pdebench_sources_in_the_mixture(pdebench_all, assemble_on, direct):
    paths = pdebench_all
    refs = {PDEBenchDataset(p).dataset_name: PDEBenchDataset(
        p, "train", 2, 1, use_normalization=True, normalization_type="zscore") for p in paths}
    seen = set()
    with WellLoader(paths, n_steps_input=2, n_steps_output=1, batch_size=3, num_workers=2,
                    assemble_on=assemble_on, direct_reads=direct) as loader:
        for _, batch in zip(range(24), loader):
            seen.add(batch.dataset)
            ds = refs[batch.dataset]
            for b, w in enumerate(batch.windows):
                x, y = reference(ds, int(w), 2)
                assert torch.equal(batch.x[b], x) and torch.equal(batch.y[b], y)
    assert seen == set(refs)


def test_3d_and_partially_varying_fields(tmp_path):
    cube = make_dataset(str(tmp_path), "cube_3d", cube_3d_file)
    partial = make_dataset(str(tmp_path), "partial", partial_dims_file)
    refs = {"cube_3d": WellDataset(path=cube, well_split_name="train", n_steps_input=2,
                                   use_normalization=True, normalization_type="zscore"),
            "partial": WellDataset(path=partial, well_split_name="train", n_steps_input=2,
                                   use_normalization=True, normalization_type="zscore")}
    with WellLoader([cube, partial], n_steps_input=2, batch_size=2, num_workers=1) as loader:
        kinds = set()
        for _, batch in zip(range(12), loader):
            kinds.add(batch.dataset)
            if batch.dataset == "cube_3d":
                assert batch.x.shape == (2, 2, 13, 8, 6, 5) and batch.bcs.shape == (2, 3, 2)
            for b, w in enumerate(batch.windows):
                x, _ = reference(refs[batch.dataset], int(w), 2)
                assert torch.equal(batch.x[b], x)
    assert kinds == {"cube_3d", "partial"}


def test_ranks_read_disjoint_windows(demo_base):
    path = os.path.join(demo_base, "shallow_water_2d")
    per_rank = []
    for rank in range(2):
        with WellLoader([path], batch_size=4, num_workers=1, rank=rank, world_size=2,
                        seed=3) as loader:
            per_rank.append({int(w) for _, b in zip(range(10), loader) for w in b.windows})
    assert len(per_rank[0]) == len(per_rank[1]) == 40
    assert not per_rank[0] & per_rank[1]


def test_resume_gives_exactly_the_next_batches(demo_base):
    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    with WellLoader(paths, batch_size=3, num_workers=2, seed=5) as a:
        for _ in range(7):
            next(a)
        state = a.state_dict()
        expected = [next(a) for _ in range(6)]
    with WellLoader(paths, batch_size=3, num_workers=2, seed=5) as b:
        b.load_state_dict(state)
        got = [next(b) for _ in range(6)]
    for e, g in zip(expected, got):
        assert e.dataset == g.dataset and np.array_equal(e.windows, g.windows)
        assert torch.equal(e.x, g.x) and torch.equal(e.y, g.y)
    # the sampler's own state given in its place was a bare KeyError('sampler')
    with WellLoader(paths, batch_size=3, num_workers=1, seed=5) as c:
        with pytest.raises(ConfigError, match=r"takes what WellLoader.state_dict\(\) returned "
                           r"\(\{'sampler': ...\}\), not the sampler's state"):
            c.load_state_dict(state["sampler"])


def test_a_dataset_indexed_once_is_not_indexed_again(demo_base, tmp_path):
    """What index_dataset returned (the trainer's checks index before the process group)
    serves the loader as is: its batches are those of the path, and the loader reads no
    metadata again (it runs here with the stats file gone). Arguments other than those it was
    indexed for are refused."""
    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    kw = dict(n_steps_input=3, n_steps_output=1, batch_size=3, num_workers=1, seed=2)
    with WellLoader([str(ds)], **kw) as loader:
        expected = [next(loader) for _ in range(4)]
    indexed = prefetch.index_dataset(str(ds), "train", 3, 1, 1, "zscore")
    os.remove(ds / "stats.yaml")
    with pytest.raises(StatsError, match="stats file not found"):
        WellLoader([str(ds)], **kw)
    with WellLoader([indexed], **kw) as loader:
        got = [next(loader) for _ in range(4)]
    for e, g in zip(expected, got):
        assert np.array_equal(e.windows, g.windows)
        assert torch.equal(e.x, g.x) and torch.equal(e.y, g.y)
    with pytest.raises(ConfigError, match="indexed for .*'zscore'.* reads .*'rms'"):
        WellLoader([indexed], normalization="rms", **kw)


def _rings(pid: int | None = None) -> set[str]:
    """The loader rings in /dev/shm of process `pid` (default: this one), by name: other
    processes, such as another pytest worker's runs, may create and remove their own
    meanwhile."""
    prefix = f"dsfm-ring-{os.getpid() if pid is None else pid}-"
    return {f for f in os.listdir("/dev/shm") if f.startswith(prefix)}


def test_ring_is_bounded(demo_base):
    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    with WellLoader(paths, batch_size=4, num_workers=2, ring_slots=3) as loader:
        window = 5 * 5 * 32 * 32 * 4                   # largest: 5 steps x 5 channels x 32² fp32
        assert loader.ring_bytes == 3 * -(-4 * window // 4096) * 4096
        for _ in range(30):
            next(loader)
        assert not _rings()                                 # unlinked once mapped


def test_inconsistent_files_are_rejected_at_indexing(demo_base, tmp_path):
    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    path = sorted((ds / "data" / "train").glob("*.hdf5"))[0]
    with h5py.File(path, "r+") as f:
        f["t1_fields/velocity"].attrs["dim_varying"] = [True, False]
    with pytest.raises(SchemaError, match="contradicts its flags"):
        WellLoader([str(ds)], batch_size=2, num_workers=1)


def test_a_split_that_disagrees_with_the_others_is_rejected_at_indexing(demo_base, tmp_path):
    """One dataset's files agree across splits too: training refuses a valid split whose
    files are of another layout (here another dataset's) when it indexes, naming the file."""
    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    src = sorted(os.listdir(os.path.join(demo_base, "navier_stokes_2d", "data", "valid")))[0]
    bad = ds / "data" / "valid" / "aa_foreign.hdf5"        # the valid split's first file
    shutil.copy(os.path.join(demo_base, "navier_stokes_2d", "data", "valid", src), bad)
    with pytest.raises(SchemaError, match="aa_foreign.hdf5"):
        WellLoader([str(ds)], batch_size=2, num_workers=1)


def test_corrupt_file_surfaces_with_file_trajectory_and_time(demo_base, tmp_path):
    ds = tmp_path / "gray_scott_reaction_diffusion"
    shutil.copytree(os.path.join(demo_base, "gray_scott_reaction_diffusion"), ds)
    files = sorted((ds / "data" / "train").glob("*.hdf5"))
    loader = WellLoader([str(ds)], batch_size=2, num_workers=1, seed=0)
    for p in files:                     # damaged after indexing, before any reader opened it
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError) as exc:
        for _ in range(5):
            next(loader)
    msg = str(exc.value)
    assert "\n" not in msg and "gray_scott_reaction_diffusion" in msg
    assert "trajectory" in msg and "time index" in msg and "reader process 0" in msg
    assert all(p.poll() is not None for p in loader._workers)       # readers stopped


UNREADABLE = textwrap.dedent("""
    import os, sys
    from dsfm.data import WellLoader
    loader = WellLoader([sys.argv[1]], batch_size=2, num_workers=1, max_open_files=1)
    for _ in range(5):
        next(loader)                    # the readers have the files open, one at a time
    os.chmod(sys.argv[2], 0)
    try:
        open(sys.argv[2]).close()
        sys.exit("permissions are not enforced for this process")
    except PermissionError:
        pass
    try:
        for _ in range(200):
            next(loader)
        print("no error")
    except Exception as exc:
        print(type(exc).__name__, exc)
""")


def test_a_file_made_unreadable_while_the_loader_runs_is_not_called_corrupt(demo_base,
                                                                           tmp_path):
    """Permission taken away from a file while training runs, found when a reader opens it
    again: before, 'cannot be opened as HDF5 (... Permission denied ...); the file is
    truncated or corrupt, regenerate or re-download it'; now it says permission denied and what
    to do. Root reads anything, so as root it runs without the capabilities that allow that."""
    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    path = sorted((ds / "data" / "train").glob("*.hdf5"))[0]
    cmd = [sys.executable, "-c", UNREADABLE, str(ds), str(path)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root, and no setpriv to run without the capability to read anything")
        drop = "-dac_override,-dac_read_search"
        cmd = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}", *cmd]
    proc = run(cmd, timeout=300)
    if "permissions are not enforced" in proc.stderr:
        pytest.skip("this process may read any file")
    out = proc.stdout.strip()
    assert proc.returncode == 0 and out.startswith("CorruptFileError"), (out, proc.stderr)
    assert "\n" not in out and f"{path}: permission denied" in out, out
    assert "chmod" in out and "corrupt" not in out and "trajectory" in out, out


@pytest.mark.parametrize("path_id", list(PATHS))
def test_nan_in_a_window_is_named(demo_base, tmp_path, path_id, request):
    assemble_on, fused = PATHS[path_id]
    if fused:
        request.getfixturevalue("normalize_kernel")
    ds = nan_pressure_copy(demo_base, tmp_path)
    with WellLoader([str(ds)], n_steps_input=4, batch_size=2, num_workers=1,
                    assemble_on=assemble_on, native_kernel=fused) as loader:
        assert loader.native_kernel_used == bool(fused)
        with pytest.raises(NonFiniteError) as exc:
            for _ in range(40):
                next(loader)
    assert "/t0_fields/pressure has NaN/Inf" in str(exc.value)
    assert "time index 7" in str(exc.value)


def test_a_bad_batch_read_ahead_is_raised_when_it_is_due(demo_base, tmp_path):
    """A NaN in one window: the readers read it ahead of the batches before it, and the loader
    hands those out first and raises at the batch that holds it, however far ahead it was
    read (it raised at whichever next() took the reader's message: a trainer stopped some
    batches early, at a step that depended on the readers' timing)."""
    ds, _ = nan_point_copy(demo_base, tmp_path)
    kw = dict(n_steps_input=4, batch_size=2, num_workers=2, seed=3, assemble_on="readers")
    with WellLoader([str(ds)], check_finite=False, **kw) as loader:
        bad = next(i for i in range(200) if not prefetch.all_finite(*(lambda b: (b.x, b.y))(
            next(loader))))
    assert bad >= 4, bad
    with WellLoader([str(ds)], ring_slots=bad + 4, **kw) as loader:
        next(loader)
        deadline = time.monotonic() + 60          # the bad batch is read meanwhile
        while bad not in loader._failed and time.monotonic() < deadline:
            loader._poll(0.1)
        assert bad in loader._failed, (bad, sorted(loader._done))
        for _ in range(bad - 1):
            next(loader)
        with pytest.raises(NonFiniteError, match=f"time index 3 .*step {bad}\\)"):
            next(loader)


def test_a_stand_in_is_shaped_like_its_datasets_batches_after_the_loader_failed(demo_base,
                                                                                tmp_path):
    """What a rank whose loader failed feeds its model to stay in its peers' collectives:
    zeros with the shapes, field ids and boundary codes of the dataset's real batches, made
    from the loader's metadata after the failure (no file read), for each dataset."""
    ds, _ = nan_point_copy(demo_base, tmp_path)
    paths = [str(ds), os.path.join(demo_base, "shallow_water_2d")]
    with WellLoader(paths, n_steps_input=4, n_steps_output=2, batch_size=3, num_workers=1,
                    seed=3) as loader:
        real = {}
        with pytest.raises(NonFiniteError):
            for _ in range(200):
                b = next(loader)
                real.setdefault(b.dataset, b)
        assert set(real) == {"euler_2d", "shallow_water_2d"}, set(real)
        for name, b in real.items():
            s = loader.stand_in(name)
            assert s.dataset == name and s.step == -1 and len(s.windows) == 0
            assert s.x.shape == b.x.shape and s.y.shape == b.y.shape
            assert not s.x.any() and not s.y.any() and s.x.dtype == b.x.dtype
            assert torch.equal(s.field_ids, b.field_ids)
            assert s.bcs.shape == b.bcs.shape and s.bcs.dtype == b.bcs.dtype
            assert torch.equal(s.bcs_host, s.bcs) and torch.equal(s.bcs[0], b.bcs[0])
        assert loader.stand_in().dataset == "euler_2d"
        with pytest.raises(ConfigError, match="'nope' is not in this loader"):
            loader.stand_in("nope")


@pytest.mark.parametrize("assemble_on", ["readers", "device"])
def test_nan_in_a_field_every_trajectory_shares_is_named_as_such(tmp_path, assemble_on):
    """A NaN in a field stored once for all trajectories was named at the trajectory of the
    window that met it ('trajectory 1'), as if only that one held it: now 'all trajectories',
    as the drop-in reader says."""
    root = make_dataset(str(tmp_path), "shared_forcing", shared_forcing_file,
                        files_per_split=1)
    with h5py.File(os.path.join(root, "data", "train", "shared_forcing_0.hdf5"), "r+") as f:
        f["t0_fields/forcing"][5, 3, 4] = np.nan
    with WellLoader([root], n_steps_input=2, batch_size=2, num_workers=1,
                    assemble_on=assemble_on) as loader:
        with pytest.raises(NonFiniteError) as exc:
            for _ in range(40):
                next(loader)
    assert "/t0_fields/forcing has NaN/Inf at all trajectories, time index 5" in str(exc.value)


@pytest.mark.parametrize("path_id", list(PATHS))
def test_a_value_that_overflows_when_normalized_is_located(demo_base, tmp_path, path_id,
                                                           request):
    """Finite when stored, Inf once normalized (a damaged exponent): the error still names
    file, array, trajectory and time, through the largest stored value."""
    assemble_on, fused = PATHS[path_id]
    if fused:
        request.getfixturevalue("normalize_kernel")
    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    for p in (ds / "data" / "train").glob("*.hdf5"):
        with h5py.File(p, "r+") as f:
            f["t0_fields/pressure"][:, 7, 3, 5] = 3e38
    with WellLoader([str(ds)], n_steps_input=4, batch_size=2, num_workers=1,
                    assemble_on=assemble_on, native_kernel=fused) as loader:
        with pytest.raises(NonFiniteError) as exc:
            for _ in range(40):
                next(loader)
    msg = str(exc.value)
    assert "normalization produced NaN/Inf from finite stored values" in msg, msg
    assert "3e+38" in msg and "/t0_fields/pressure at trajectory" in msg
    assert "time index 7" in msg


def test_a_dead_reader_is_detected_within_seconds(demo_base):
    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    loader = WellLoader(paths, batch_size=2, num_workers=2)
    next(loader)
    os.kill(loader.worker_pids[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(Exception) as exc:
        for _ in range(1000):
            next(loader)
    assert time.monotonic() - start < 5
    assert type(exc.value).__name__ == "WorkerError"
    assert "died (killed by signal 9)" in str(exc.value)
    assert all(p.poll() is not None for p in loader._workers)


class _Alarm(Exception):
    pass


def _alarm(seconds, exc=_Alarm):
    """Raise `exc` in the main thread after `seconds` (a hang fails the test instead)."""
    def fire(*_):
        raise exc("alarm")
    signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)


@pytest.mark.parametrize("enlarged", [True, False], ids=["pipe-enlarged", "pipe-as-is"])
def test_a_stalled_reader_is_reported_even_with_batches_too_large_for_its_pipe(tmp_path,
                                                                             enlarged,
                                                                             monkeypatch):
    """2,000 windows a batch are 16 kB of window ids per task: eight of them overfill a
    default 64 kB pipe, and a trainer sending to a stalled reader would block in the write,
    past read_timeout_s, for ever. The pipe is enlarged where Linux lets it; where it does not
    (pipe-as-is), fewer tasks go to a reader at once. Then closing kills the stalled reader
    within a second."""
    if not enlarged:
        monkeypatch.setattr(prefetch, "_enlarge_pipe",
                            lambda fd, nbytes: fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
    root = make_dataset(str(tmp_path), "many", rich_2d_file, n_traj=200, n_steps=20,
                        shape=(4, 4))
    loader = WellLoader([root], batch_size=2000, n_steps_input=1, num_workers=1,
                        ring_slots=8, read_timeout_s=2.0)
    try:
        next(loader)
        os.kill(loader.worker_pids[0], signal.SIGSTOP)
        start = time.monotonic()
        _alarm(30)
        with pytest.raises(WorkerError, match="has not finished step .* in 2 s"):
            for _ in range(100):
                next(loader)
        elapsed = time.monotonic() - start
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert elapsed < 5, elapsed            # 2 s of patience, 1 s of grace to close
        assert all(p.poll() is not None for p in loader._workers)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        loader.close()


def test_iterating_after_an_interrupted_next_is_an_error_not_a_hang(demo_base):
    """Ctrl-C can land anywhere in next(), even inside a reader's message: the loader closes,
    and a caller that catches the KeyboardInterrupt and iterates on gets an error at once."""
    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    loader = WellLoader(paths, batch_size=2, num_workers=2, read_timeout_s=60)
    try:
        for _ in range(3):
            next(loader)
        state = loader.state_dict()
        for pid in loader.worker_pids:
            os.kill(pid, signal.SIGSTOP)
        _alarm(0.5, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            for _ in range(100):
                next(loader)                   # any batches read ahead, then it waits
                state = loader.state_dict()
        _alarm(10)
        with pytest.raises(WorkerError, match="KeyboardInterrupt at step"):
            next(loader)
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert all(p.poll() is not None for p in loader._workers)
        assert loader.state_dict() == state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        loader.close()


def test_a_second_ctrl_c_while_closing_still_stops_every_reader(demo_base, monkeypatch):
    """close() gives readers a grace to finish the batch in hand; a second Ctrl-C in it (the
    first one's close waits on a reader stuck in a read, and the user presses again) used to
    leave that reader running and the ring and pipes open, and close() would not run again."""
    monkeypatch.setattr(prefetch, "CLOSE_GRACE_S", 120.0)   # the interrupt lands in the grace
    loader = WellLoader([os.path.join(demo_base, "euler_2d")], batch_size=2, num_workers=2)
    try:
        next(loader)
        os.kill(loader.worker_pids[0], signal.SIGSTOP)      # as if stuck in a read
        _alarm(0.5, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            loader.close()
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert all(p.poll() is not None for p in loader._workers)
        assert all(conn.closed for conn in loader._tasks + loader._results)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for p in loader._workers:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_closed_loader_says_so_instead_of_ending_a_loop_silently(demo_base):
    """The loader is endless; after close() (or its with block) next() was a bare StopIteration,
    so a for loop over it ran no step and said nothing, as if training were done."""
    with WellLoader([os.path.join(demo_base, "euler_2d")], batch_size=2,
                    num_workers=1) as loader:
        next(loader)
        state = loader.state_dict()
    with pytest.raises(WorkerError, match=r"closed when close\(\) was called .*build a new"):
        for _ in loader:
            pass
    with pytest.raises(WorkerError, match="closed"):
        next(loader)
    assert loader.state_dict() == state


def test_a_reader_that_dies_while_starting_is_reported(demo_base, tmp_path, monkeypatch):
    """A reader process that cannot start (here: its interpreter exits at once) is reported as
    such, with its exit status, and leaves no shared memory behind."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    before = _rings()
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(Exception) as exc:
        WellLoader([os.path.join(demo_base, "euler_2d")], batch_size=2, num_workers=2)
    assert type(exc.value).__name__ == "WorkerError", exc.value
    assert "died (exit code 3) while starting" in str(exc.value)
    assert _rings() <= before


def test_ctrl_c_while_a_reader_is_being_started_leaves_no_reader_or_descriptor(demo_base,
                                                                             monkeypatch,
                                                                             capfd):
    """A Ctrl-C that lands in subprocess.Popen after its fork (the loader's start, in a process
    that lives on: a notebook, a trainer that catches it) loses the Popen object. That reader
    used to wait for its first message for as long as this process lived, its pipes left open
    here; now closing the loader's ends of them lets it exit, quietly."""
    started = []
    real_popen = subprocess.Popen

    def interrupted(args, **kwargs):
        proc = real_popen(args, **kwargs)
        if "dsfm.data.readers" not in args:
            return proc                                 # the C kernel's build and check
        started.append(proc)                            # the reader runs ...
        raise KeyboardInterrupt                         # ... and Ctrl-C lands before the return

    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(prefetch.subprocess, "Popen", interrupted)
    with pytest.raises(KeyboardInterrupt):
        WellLoader([os.path.join(demo_base, "euler_2d")], batch_size=2, num_workers=2)
    monkeypatch.undo()
    (reader,) = started
    try:
        assert reader.wait(60) == 0, "the reader outlived the interrupted start"
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert len(os.listdir("/proc/self/fd")) == fds
    assert "Traceback" not in capfd.readouterr().err


TRAINER = textwrap.dedent("""
    import os, sys, time
    from dsfm.data import WellLoader
    loader = WellLoader(sys.argv[1:], batch_size=2, num_workers=2)
    print(" ".join(map(str, loader.worker_pids)), flush=True)
    while True:
        next(loader)
        time.sleep(0.01)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_leave_no_orphans_and_no_shared_memory(demo_base, sig):
    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    # A shell starts background jobs with Ctrl-C ignored, and children inherit that: run as
    # from a terminal whatever way pytest itself was started (`.ci/run &` once hung here).
    proc = subprocess.Popen([sys.executable, "-c", TRAINER, *paths], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and all(os.path.exists(f"/proc/{p}") for p in pids)
    time.sleep(1.0)                     # mid-training
    os.killpg(proc.pid, sig)            # as a terminal's Ctrl-C or a scheduler's SIGTERM would
    proc.wait(20)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "reader processes outlived the trainer"
    assert not _rings(proc.pid)
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in proc.stderr.read()


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "numpy"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "hdf5"])
def test_device_assembler_matches_the_reader_assembler(tmp_path, demo_base, direct, fused,
                                                       request):
    """The torch assembler (what runs on the GPU, from native slot contents) and the readers'
    own path (CPU training: each window read straight into the assembled batch) give identical
    batches, with positioned reads and through the HDF5 library, time stride 1 and 2, with the
    fused C kernel and with NumPy (which a field constant along an axis always takes)."""
    from dsfm.data.handles import H5Pool
    from dsfm.data.index import list_hdf5, read_layouts
    from dsfm.data.prefetch import assemble
    from dsfm.data.windows import well_source

    roots = [make_dataset(str(tmp_path), "cube_3d", cube_3d_file),
             make_dataset(str(tmp_path), "partial", partial_dims_file),
             os.path.join(demo_base, "navier_stokes_2d")]
    kernel = request.getfixturevalue("normalize_kernel") if fused else None
    pool = H5Pool(direct=direct)
    rng = np.random.default_rng(0)
    for root, (n_in, n_out, stride) in [(r, k) for r in roots for k in ((3, 2, 1), (2, 1, 2))]:
        source = well_source(read_layouts(list_hdf5(os.path.join(root, "data", "train"))), n_in,
                             n_out, stride)
        windows = rng.choice(len(source), 3, replace=False)
        flat = np.empty(3 * source.window_floats, np.float32)
        source.read_batch(pool, windows, flat)
        shift = rng.normal(size=source.n_channels).astype(np.float32)
        scale = rng.uniform(0.5, 2, size=source.n_channels).astype(np.float32)
        n_sp = source.spatial_shape
        x = np.full((3, n_in, source.n_channels) + n_sp, np.nan, np.float32)
        y = np.full((3, n_out, source.n_channels) + n_sp, np.nan, np.float32)
        scratch = np.empty(source.window_floats, np.float32)
        assert source.fusable == (root != roots[1])         # "partial" broadcasts a field
        assert source.read_assembled(pool, windows, n_in, x, y, shift, scale, scratch,
                                     kernel=kernel) is None
        tx, ty = assemble(torch.from_numpy(flat), source, 3, n_in, torch.from_numpy(shift),
                          torch.from_numpy(scale))
        assert torch.equal(tx, torch.from_numpy(x)) and torch.equal(ty, torch.from_numpy(y))
        scatterable = [b for b in source.blocks if b.n_channels == 1 and b.bshape[1:-1] == n_sp]
        assert scatterable and all(pool.slab(source.files[0], b.path).direct == direct
                                   for b in source.blocks)
    pool.close()


def test_cpu_batches_lease_their_slot_until_released(demo_base):
    path = os.path.join(demo_base, "euler_2d")
    with WellLoader([path], batch_size=2, num_workers=1, ring_slots=3) as loader:
        kept = [next(loader) for _ in range(3)]       # hold every slot
        before = kept[0].x.clone()
        with pytest.raises(Exception, match="ring slots are held by batches"):
            next(loader)
        assert torch.equal(kept[0].x, before)         # nobody overwrote a held batch
    with WellLoader([path], batch_size=2, num_workers=1, ring_slots=3) as loader:
        for _ in range(20):                           # dropping batches frees their slots
            batch = next(loader)
        xs = [next(loader).x.clone() for _ in range(10)]   # clones keep nothing leased
        assert len(xs) == 10 and batch.x.shape[0] == 2


def test_freeing_a_batch_runs_no_python_callback(demo_base):
    """A Ctrl-C that lands in a callback run by the garbage collector (weakref.finalize, a weak
    reference's callback) is printed and dropped by Python, and the training loop carries on:
    returning a batch's ring slot must not need one. The loader polls weak references instead."""
    import weakref

    path = os.path.join(demo_base, "euler_2d")
    with WellLoader([path], batch_size=2, num_workers=1, ring_slots=3) as loader:
        next(loader)
        finalizers = len(weakref.finalize._registry)
        for _ in range(10):
            batch = next(loader)                      # the one before is freed here
        assert len(weakref.finalize._registry) == finalizers     # none for the live batch
        assert batch.x.shape[0] == 2


def test_scheduler_signals_to_readers_do_not_stop_the_loader(demo_base):
    """Slurm's scancel/--signal reaches every process of a job step, readers included: they
    must keep serving so that the trainer can checkpoint (it decides when they stop)."""
    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    with WellLoader(paths, batch_size=2, num_workers=2) as loader:
        next(loader)
        for pid in loader.worker_pids:
            for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
                os.kill(pid, sig)
        time.sleep(0.5)
        for _ in range(20):
            next(loader)
        assert all(p.poll() is None for p in loader._workers)
    assert all(p.poll() is not None for p in loader._workers)


def test_scheduler_signals_to_readers_that_are_starting_do_not_stop_the_loader(demo_base):
    """The same signals reaching readers while they start (the trainer builds a loader for each
    evaluation, so Slurm's SIGUSR1 can land there): a reader ignores them only once its
    interpreter has imported its modules, and before that each one killed it, which stopped
    the loader ("died (killed by signal 10) while starting") and the run with it. Here every
    reader of this process is signalled from the moment it runs, until the loader is built."""
    import threading

    import psutil

    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    building, sent = threading.Event(), []
    me = psutil.Process()

    def signal_readers():
        while building.is_set():
            for child in me.children():
                try:
                    if "dsfm.data.readers" in child.cmdline():
                        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2):
                            child.send_signal(sig)
                        sent.append(child.pid)
                except psutil.Error:          # gone, or not yet readable
                    pass
            time.sleep(0.002)

    building.set()
    thread = threading.Thread(target=signal_readers)
    thread.start()
    try:
        loader = WellLoader(paths, batch_size=2, num_workers=2)
    finally:
        building.clear()
        thread.join()
    with loader:
        assert sent and set(sent) <= set(loader.worker_pids)    # signalled as they started
        for _ in range(10):
            next(loader)
        assert all(p.poll() is None for p in loader._workers)


def test_a_ring_larger_than_shared_memory_is_refused_up_front(demo_base):
    """The ring is allocated when the loader is built: one that cannot fit fails then, with a
    clear line, instead of a reader dying of SIGBUS mid-training when /dev/shm runs out."""
    st = os.statvfs("/dev/shm")
    total = st.f_blocks * st.f_frsize
    path = os.path.join(demo_base, "euler_2d")
    with WellLoader([path], batch_size=2, num_workers=1) as probe:
        slot = probe.ring_bytes // probe.ring_slots
    before = _rings()
    with pytest.raises(Exception) as exc:
        WellLoader([path], batch_size=2, num_workers=1, ring_slots=total // slot + 2)
    assert type(exc.value).__name__ == "ConfigError"
    assert "shared memory" in str(exc.value) and "--shm-size" in str(exc.value)
    assert _rings() <= before                         # nothing left behind


def test_the_ring_is_allocated_when_the_loader_is_built(demo_base):
    """Memory of the ring is taken at construction (the trainer's resident memory grows by the
    ring right away), so it cannot grow later as readers first write each slot."""
    import psutil

    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    me = psutil.Process()
    before = me.memory_info().rss
    with WellLoader(paths, batch_size=4, num_workers=1, ring_slots=128) as loader:
        grown = me.memory_info().rss - before
        assert loader.ring_bytes > 40 * 2**20 and grown >= 0.9 * loader.ring_bytes


def test_readers_run_on_the_cpus_they_are_given(demo_base):
    path = os.path.join(demo_base, "euler_2d")
    cpus = sorted(os.sched_getaffinity(0))
    with WellLoader([path], batch_size=2, num_workers=2, reader_cpus=cpus[-1:]) as loader:
        next(loader)
        for pid in loader.worker_pids:
            assert os.sched_getaffinity(pid) == {cpus[-1]}
        assert os.sched_getaffinity(0) == set(cpus)          # the trainer is left alone
    with pytest.raises(Exception, match="reader_cpus") as exc:
        WellLoader([path], batch_size=2, num_workers=1, reader_cpus=[max(cpus) + 1000])
    assert type(exc.value).__name__ == "ConfigError"


def test_the_ring_never_has_a_name_to_leak():
    """Unlinked the moment it is created: a signal or a SIGKILL while the loader starts (the
    readers can take long to come up) leaves nothing in /dev/shm; the readers inherit it open."""
    from dsfm.data.prefetch import _Ring

    ring = _Ring(2, 8192)
    try:
        assert ring.fd is not None and not os.path.exists(ring.path)
        ring.slot(1)[:4] = 7
        assert ring.slot(1)[:4].tolist() == [7, 7, 7, 7]
    finally:
        ring.close()


def test_a_loader_built_on_a_thread_that_ends_keeps_its_readers(demo_base):
    """Linux's parent-death signal follows the thread that started a child: readers started
    from a worker thread must not die with that thread."""
    import threading

    path = os.path.join(demo_base, "euler_2d")
    box = []
    t = threading.Thread(target=lambda: box.append(WellLoader([path], batch_size=2,
                                                              num_workers=1)))
    t.start()
    t.join()
    with box[0] as loader:
        time.sleep(0.5)
        it = iter(loader)
        assert [next(it).x.shape[0] for _ in range(3)] == [2, 2, 2]


def test_a_forked_child_closing_its_copy_leaves_the_parents_readers(demo_base):
    path = os.path.join(demo_base, "euler_2d")
    with WellLoader([path], batch_size=2, num_workers=1) as loader:
        it = iter(loader)
        next(it)
        pid = os.fork()
        if pid == 0:                    # the child: close its copy, as its finalizer would
            loader.close()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert [next(it).x.shape[0] for _ in range(3)] == [2, 2, 2]


def test_a_forked_child_cannot_draw_from_its_parents_loader(demo_base):
    """The child's copy shares the parent's pipes: next() there used to send tasks to the
    parent's readers and take their answers, telling the child a reader had died (exit code 0)
    and leaving the parent waiting read_timeout_s for batches it never got. Now the child is
    told to build its own loader, and the parent's batches are untouched."""
    path = os.path.join(demo_base, "euler_2d")
    with WellLoader([path], batch_size=2, num_workers=1, read_timeout_s=30) as loader, \
            WellLoader([path], batch_size=2, num_workers=1) as twin:
        next(loader), next(twin)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                try:
                    next(loader)
                    said = "no error"
                except BaseException as exc:    # noqa: BLE001 - reported to the parent
                    said = f"{type(exc).__name__}: {exc}"
                os.write(w, said.encode()[:4000])
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as fh:
            said = fh.read().decode()
        assert os.waitpid(pid, 0)[1] == 0
        assert said.startswith("WorkerError") and "forked child" in said, said
        _alarm(60)                           # a hang fails the test instead
        try:
            for _ in range(5):
                mine, theirs = next(loader), next(twin)
                assert torch.equal(mine.x, theirs.x) and torch.equal(mine.y, theirs.y)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


def test_zero_ring_slots_are_refused(demo_base):
    from dsfm.errors import ConfigError

    with pytest.raises(ConfigError, match="ring_slots"):
        WellLoader([os.path.join(demo_base, "euler_2d")], batch_size=2, ring_slots=0)


@pytest.mark.parametrize("kw, needle", [
    ({"max_open_files": 0}, "max_open_files must be >= 1, got 0"),
    ({"n_steps_input": 2.0}, "n_steps_input must be an integer, got 2.0"),
    ({"n_steps_output": 1.5}, "n_steps_output must be an integer, got 1.5"),
    ({"num_workers": 1.0}, "num_workers must be an integer, got 1.0"),
    ({"ring_slots": 3.5}, "ring_slots must be an integer, got 3.5"),
    ({"dt_stride": True}, "dt_stride must be an integer, got True"),
    ({"read_timeout_s": 0}, "read_timeout_s must be a positive number of seconds, got 0"),
])
def test_bad_counts_are_one_line_before_any_reader_starts(demo_base, capfd, kw, needle):
    """A count that is not a whole number (or a max_open_files < 1, a timeout <= 0) used to be
    a TypeError from sizing the ring, or a traceback printed by every reader and a WorkerError;
    now a ConfigError naming the argument, and no reader is started to say it."""
    from dsfm.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        WellLoader([os.path.join(demo_base, "euler_2d")], **{"batch_size": 2, "num_workers": 1,
                                                             **kw})
    assert str(info.value) == needle
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("given, needle", [
    ("base/euler2d", "{t}/base/euler2d: no such file or directory"),
    ("base", "{t}/base is a directory of Well datasets (euler_2d), not one: give each one's "
             "directory ({t}/base/euler_2d, ...)"),
    ("base/euler_2d/data", "{t}/base/euler_2d/data is part of the Well dataset "
                           "{t}/base/euler_2d"),
    ("base/euler_2d/data/train", "{t}/base/euler_2d/data/train is part of the Well dataset "
                                 "{t}/base/euler_2d: give the dataset's directory"),
    ("base/euler_2d/data/train/euler_2d_mach_1.hdf5",
     "euler_2d_mach_1.hdf5 is part of the Well dataset {t}/base/euler_2d"),
    ("pdebench", "{t}/pdebench is a directory of folders of .h5/.hdf5 files (swe), not one: "
                 "give each one's directory ({t}/pdebench/swe, ...)"),
    ("empty", "{t}/empty is neither a Well dataset (no data/ directory) nor PDEBench data"),
])
def test_a_path_that_is_no_dataset_is_named_as_such(demo_base, pdebench_all, tmp_path, given,
                                                     needle):
    """Anything not a Well dataset directory was read as PDEBench: a typo in a path or a
    directory of datasets was 'no PDEBench .h5/.hdf5 files', a Well split directory or file
    'not a PDEBench 2D layout'. Now one line saying what the path is and what to give."""
    from dsfm.errors import ConfigError

    os.makedirs(tmp_path / "base")
    shutil.copytree(os.path.join(demo_base, "euler_2d"), tmp_path / "base" / "euler_2d")
    shutil.copytree(pdebench_all[2], tmp_path / "pdebench" / "swe")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConfigError) as info:
        WellLoader([str(tmp_path / given)], batch_size=2, num_workers=1)
    assert needle.format(t=tmp_path) in str(info.value)
    assert "PDEBench 2D" not in str(info.value) and "\n" not in str(info.value)


def test_two_folders_of_one_dataset_name_are_named_not_called_a_repeat(demo_base, tmp_path):
    """euler_2d in two folders (two resolutions, say): the loader said 'dataset euler_2d is
    listed more than once ...; raise its weight instead', which they are not; now it names both
    folders and what to do, as the trainer's check does. One folder given twice still is a
    repeat."""
    from dsfm.errors import ConfigError

    other = tmp_path / "euler_2d_64"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), other)
    euler = os.path.join(demo_base, "euler_2d")
    with pytest.raises(ConfigError) as info:
        WellLoader([euler, str(other)], batch_size=2, num_workers=1)
    assert str(info.value).startswith(f"{euler} and {other} are both dataset 'euler_2d'")
    assert "give one's files another dataset_name" in str(info.value)
    with pytest.raises(ConfigError, match="listed more than once .* raise its weight"):
        WellLoader([euler, euler + "/"], batch_size=2, num_workers=1)


def test_one_dataset_given_as_a_path_object_or_indexed(demo_base):
    """A single dataset not in a list: a str always worked, a pathlib.Path or what
    index_dataset returned was "TypeError: 'PosixPath' object is not iterable"."""
    import pathlib

    path = os.path.join(demo_base, "euler_2d")
    kw = dict(n_steps_input=2, n_steps_output=1, batch_size=2, num_workers=1, seed=4)
    with WellLoader(path, **kw) as loader:
        expected = next(loader)
    for given in (pathlib.Path(path), prefetch.index_dataset(path, "train", 2, 1, 1, "zscore")):
        with WellLoader(given, **kw) as loader:
            got = next(loader)
            assert all(isinstance(f, str) for f in loader.datasets[0].source.files)
        assert np.array_equal(got.windows, expected.windows) and torch.equal(got.x, expected.x)


def test_resume_across_an_epoch_boundary_with_other_readers(demo_base):
    """States taken while the readers have read ahead (into the next epoch), at the end of a
    dataset's epoch and just past it, resume with another number of readers to the batches of
    the loader that never stopped. 160 windows on 2 ranks: 5 micro-batches of 16 per epoch."""
    path = os.path.join(demo_base, "shallow_water_2d")
    kw = dict(batch_size=16, seed=2, rank=1, world_size=2, same_dataset_across_ranks=True)
    with WellLoader([path], num_workers=2, **kw) as a:
        states, expected = {}, []
        for k in range(10):
            states[k] = a.state_dict()
            expected.append(next(a).windows.copy())
    assert states[5]["sampler"]["epochs"] == [0] and states[5]["sampler"]["cursors"] == [80]
    assert states[7]["sampler"]["epochs"] == [1] and states[7]["sampler"]["cursors"] == [32]
    for k, workers in ((5, 1), (7, 3)):
        with WellLoader([path], num_workers=workers, **kw) as b:
            b.load_state_dict(states[k])
            got = [next(b).windows for _ in range(10 - k)]
        assert all(np.array_equal(e, g) for e, g in zip(expected[k:], got)), k
