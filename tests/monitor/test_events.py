"""dsfm.monitor.events.last_step on event files written by TensorBoard's own writer."""

import os

from torch.utils.tensorboard import SummaryWriter

from dsfm.monitor.events import last_step

OWN = r"(system|gpu\d+)/"


def _only_file(logdir) -> str:
    (name,) = [n for n in os.listdir(logdir) if n.startswith("events.out.tfevents.")]
    return os.path.join(logdir, name)


def test_last_step_reads_the_tail_of_a_file_longer_than_the_window(tmp_path):
    with SummaryWriter(str(tmp_path)) as tb:
        tb.add_custom_scalars({"System": {"CPU": ["Multiline", ["system/cpu_pct"]]}})
        for step in range(600):                   # about 30 kB: many times the window below
            tb.add_scalar("system/cpu_pct", 50.0, step)
            tb.add_scalar("gpu3/util_pct", 10.0, step)
    assert os.path.getsize(_only_file(tmp_path)) > 20 * 1000
    for window in (100, 1000, 1 << 16):           # the window starts inside a record
        assert last_step(str(tmp_path), OWN, tail_bytes=window) == 599
    assert last_step(str(tmp_path), r"train/") is None
    assert last_step(str(tmp_path / "absent"), OWN) is None


def test_last_step_of_a_file_cut_inside_its_last_record(tmp_path):
    # a monitor killed (SIGKILL) while its writer wrote: the last record is incomplete
    with SummaryWriter(str(tmp_path)) as tb:
        for step in range(50):
            tb.add_scalar("system/mem_pct", 5.0, step)
    path = _only_file(tmp_path)
    os.truncate(path, os.path.getsize(path) - 3)
    assert last_step(str(tmp_path), OWN, tail_bytes=500) == 48


def test_last_step_takes_the_highest_over_files_and_only_the_given_tags(tmp_path):
    for steps in (range(0, 10), range(10, 25)):
        with SummaryWriter(str(tmp_path)) as tb:
            for step in steps:
                tb.add_scalar("system/load1", 1.0, step)
    with SummaryWriter(str(tmp_path)) as tb:      # another writer's tags, at higher steps
        tb.add_scalar("train/loss", 1.0, 1000)
    assert len(os.listdir(tmp_path)) == 3
    assert last_step(str(tmp_path), OWN) == 24
