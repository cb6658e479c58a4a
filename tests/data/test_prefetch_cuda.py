"""WellLoader on a GPU: pinned ring, asynchronous copies, device assembly. Runs where CUDA is
(the GPU check script, perf/gpu_check.sh); the same logic runs on CPU tensors everywhere else."""

import os
import time

import pytest
import torch

from dsfm.data import WellDataset, WellLoader
from dsfm.errors import NonFiniteError
from tests.conftest import DEMO_DATASETS
from tests.data.well_fixtures import nan_pressure_copy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_device_batches_equal_the_drop_in_reader(demo_base):
    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    refs = {}
    for p in paths:
        ds = WellDataset(path=p, well_split_name="train", n_steps_input=3, n_steps_output=1,
                         use_normalization=True, normalization_type="zscore")
        refs[ds.dataset_name] = ds
    with WellLoader(paths, n_steps_input=3, batch_size=4, num_workers=2,
                    device="cuda") as loader:
        assert loader._ring.pinned
        host = loader._ring.slot(0)
        assert torch.from_numpy(host).is_pinned()
        kept = []
        for _, batch in zip(range(200), loader):      # many more batches than slots
            assert batch.x.is_cuda and batch.y.is_cuda and batch.bcs.is_cuda
            kept.append((batch.dataset, batch.windows, batch.x.clone(), batch.y.clone()))
        torch.cuda.synchronize()
        for name, windows, x, y in kept[::7]:
            for b, w in enumerate(windows):
                item = refs[name][int(w)]
                torch.testing.assert_close(x[b].cpu(), item["input_fields"].movedim(-1, 1),
                                           rtol=0, atol=0)
                torch.testing.assert_close(y[b].cpu(), item["output_fields"].movedim(-1, 1),
                                           rtol=0, atol=0)


def test_copies_are_timed_and_fast(demo_base):
    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    with WellLoader(paths, batch_size=8, num_workers=2, device="cuda") as loader:
        loader.time_copies = True
        for _ in range(50):
            next(loader)
        assert loader.copy_bandwidth() > 1.0          # GB/s; pageable memory would be ~5


def _warm_loader(demo_base) -> WellLoader:
    """A CUDA loader over the demo datasets past its first batches, every dataset's constants
    already on the device (copied once, at first use): what next() does from then on."""
    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    loader = WellLoader(paths, n_steps_input=3, batch_size=4, num_workers=2, device="cuda")
    try:
        for ds in loader.datasets:
            loader._device_tensors(ds)
        for _ in range(5):
            next(loader)
    except BaseException:
        loader.close()
        raise
    return loader


def test_next_does_not_synchronize_the_device(demo_base):
    """The training thread must be free to run ahead of the GPU: next() issues the copies and
    the device assembly and checks the previous batch's finiteness without any implicit
    synchronization (torch's sync debug mode raises on one). Reading the previous batch's flag
    from the device had synchronized the whole compute stream, the step just issued included."""
    with _warm_loader(demo_base) as loader:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(60):
                batch = next(loader)
                batch.x.mul_(1.0)              # work on the compute stream, as a step would
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert loader.check_finite


def test_a_slow_trainer_holds_at_most_ring_slots_batches_ahead(demo_base):
    """Readers faster than the trainer (the normal case) must not run ahead without bound. A
    slot returns to the ring as soon as its copy is done; the loader used to send it straight
    back to a reader, so every next() read, copied and assembled up to a ring's worth of new
    batches and handed out one: the device memory grew by about that much per step."""
    paths = [os.path.join(demo_base, n) for n in DEMO_DATASETS]
    with WellLoader(paths, n_steps_input=3, batch_size=4, num_workers=2, ring_slots=4,
                    device="cuda") as loader:
        per_batch, held = 0, []
        for i in range(40):
            batch = next(loader)
            per_batch = max(per_batch, batch.x.nbytes + batch.y.nbytes)   # as assembled
            del batch
            time.sleep(0.02)                  # a step, during which the readers keep going
            torch.cuda.synchronize()
            held.append(torch.cuda.memory_allocated())
            assert loader._next_submit - loader._next_yield <= loader.ring_slots
            assert len(loader._ready) <= loader.ring_slots
        # after warm-up the memory moves by the batches waiting (0 to ring_slots of them, with
        # the allocator's rounding) and no more; the old loader grew by up to 3 batches a step
        assert held[-1] - held[9] < 2 * loader.ring_slots * per_batch, (held[9], held[-1])
        assert loader.batches_out == 40


def test_every_copy_to_the_device_is_from_pinned_memory(demo_base):
    """A copy from pageable memory may make the driver wait for the stream it is issued on (to
    stage it), which the sync debug mode does not report: the profiler names each copy's
    source. The boundary codes were once copied from pageable memory."""
    from torch.profiler import ProfilerActivity, profile

    with _warm_loader(demo_base) as loader:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                next(loader)
            torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "Memcpy HtoD" in e.name]
    assert copies, "no host-to-device copies seen"
    assert not [c for c in copies if "Pageable" in c], sorted(set(copies))


def test_nan_in_a_window_is_named_on_the_gpu(demo_base, tmp_path):
    ds = nan_pressure_copy(demo_base, tmp_path)
    with WellLoader([str(ds)], n_steps_input=4, batch_size=2, num_workers=1,
                    device="cuda") as loader:
        with pytest.raises(NonFiniteError) as exc:
            for _ in range(40):
                next(loader)
    assert "/t0_fields/pressure has NaN/Inf" in str(exc.value)
    assert "time index 7" in str(exc.value)


def test_nan_in_the_last_batch_of_a_finite_use_is_named(demo_base, tmp_path):
    """The GPU check of a batch runs at the next next(): evaluation, which stops after its last
    batch, asks for it with check_last() (before, that batch's NaN went unreported)."""
    ds = nan_pressure_copy(demo_base, tmp_path)
    with WellLoader([str(ds)], n_steps_input=4, batch_size=2, num_workers=1,
                    device="cuda") as loader:
        for _ in range(40):
            batch = next(loader)
            torch.cuda.synchronize()
            if not (torch.isfinite(batch.x).all() and torch.isfinite(batch.y).all()):
                break
        else:
            pytest.fail("no batch with the NaN in 40")
        with pytest.raises(NonFiniteError, match="pressure has NaN/Inf"):
            loader.check_last()
