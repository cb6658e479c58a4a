"""MetricsLogger on a real run directory: metrics.jsonl and TensorBoard event files."""

import json
import time

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dsfm.runtime.metrics import MetricsLogger


def _jsonl_steps(run_dir) -> list[int]:
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line)["step"] for line in fh]


def _tb_steps(run_dir, tag: str) -> list[int]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _next_second() -> None:
    """TensorBoard reads a run's event files in the order of their names, which hold the
    writer's start in whole seconds, then a counter of the writers made in this process: from
    the 11th on (…9 vs …10) the order within one second is wrong. A resumed run starts seconds
    after the run it resumes; in this one process, wait for the next second instead."""
    time.sleep(1.01 - time.time() % 1)


def _log_steps(run_dir, steps) -> None:
    log = MetricsLogger(str(run_dir), rank=0, echo=False)
    for step in steps:
        log.scalars(step, {"train/loss": 1.0 / step})
    log.close()


def test_resume_over_a_record_cut_short(tmp_path):
    # the node went down while step 4's record was written: half a line, then NUL bytes
    _log_steps(tmp_path, [1, 2, 3])
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "time": 17959' + "\0" * 40)
    _next_second()
    log = MetricsLogger(str(tmp_path), rank=0, echo=False)
    log.resume_at(2)
    log.scalars(3, {"train/loss": 0.3})
    log.close()
    assert _jsonl_steps(tmp_path) == [1, 2, 3]
    assert _tb_steps(tmp_path, "train/loss") == [1, 2, 3]


def test_resume_after_a_last_record_without_its_newline(tmp_path):
    _log_steps(tmp_path, [1, 2])
    text = (tmp_path / "metrics.jsonl").read_text()
    (tmp_path / "metrics.jsonl").write_text(text.rstrip("\n"))
    log = MetricsLogger(str(tmp_path), rank=0, echo=False)
    log.resume_at(2)
    log.scalars(3, {"train/loss": 0.3})
    log.close()
    assert _jsonl_steps(tmp_path) == [1, 2, 3]


def test_a_start_from_scratch_drops_every_earlier_record_and_touches_a_new_directory_not(
        tmp_path):
    new = tmp_path / "new"
    log = MetricsLogger(str(new), rank=0, echo=False)
    assert log.resume_at(-1) == 0
    log.scalars(1, {"train/loss": 1.0})
    log.close()
    assert len(list((new / "tb").iterdir())) == 1           # no second event file
    old = tmp_path / "old"
    _log_steps(old, [1, 2, 3])
    _next_second()
    log = MetricsLogger(str(old), rank=0, echo=False)
    assert log.resume_at(-1) == 3
    log.scalars(1, {"train/loss": 0.5})
    log.close()
    assert _jsonl_steps(old) == [1]
    assert _tb_steps(old, "train/loss") == [1]
