"""MetricsLogger on a real run directory: metrics.jsonl and TensorBoard event files."""

import json
import time

import pytest
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


def _tb_points(run_dir, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_an_evaluation_redone_on_resume_is_logged_once_and_its_steps_training_kept(tmp_path):
    """A run killed after logging step 4's evaluation but before its eval JSON redoes that
    evaluation when resumed from step 4: each point once, in TensorBoard and metrics.jsonl.
    TensorBoard purges whole steps, so step 4's training scalars (and their wall time) are
    written again; a NaN there stays out of TensorBoard and in metrics.jsonl."""
    log = MetricsLogger(str(tmp_path), rank=0, echo=False)
    for step in (2, 4):
        log.scalars(step, {"train/loss": 1.0 / step, "train/grad_norm": float("nan"),
                           "train/lr": None})
        log.scalars(step, {"eval/demo/u/nrmse_1step": 0.1 * step})
    log.scalars(5, {"train/loss": 0.2})
    log.scalars(5, {"eval/demo/u/nrmse_1step": 0.7})      # a final evaluation at step 5
    log.close()
    with open(tmp_path / "metrics.jsonl") as fh:
        time_4 = [json.loads(line)["time"] for line in fh][2]
    _next_second()
    log = MetricsLogger(str(tmp_path), rank=0, echo=False)
    assert log.resume_at(4, redo_eval=True) == 3            # step 4's evaluation, step 5's two
    log.scalars(4, {"eval/demo/u/nrmse_1step": 0.45})
    log.scalars(5, {"train/loss": 0.25})
    log.close()
    assert _tb_points(tmp_path, "eval/demo/u/nrmse_1step") == [
        (2, pytest.approx(0.2)), (4, pytest.approx(0.45))]
    assert _tb_points(tmp_path, "train/loss") == [
        (2, 0.5), (4, 0.25), (5, 0.25)]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.wall_time for e in acc.Scalars("train/loss")][1] == pytest.approx(time_4)
    assert "train/grad_norm" not in acc.Tags()["scalars"]
    with open(tmp_path / "metrics.jsonl") as fh:
        records = [json.loads(line) for line in fh]
    assert [(r["step"], sorted(set(r) - {"step", "time"})) for r in records] == [
        (2, ["train/grad_norm", "train/loss", "train/lr"]), (2, ["eval/demo/u/nrmse_1step"]),
        (4, ["train/grad_norm", "train/loss", "train/lr"]), (4, ["eval/demo/u/nrmse_1step"]),
        (5, ["train/loss"])]
    assert records[3]["eval/demo/u/nrmse_1step"] == 0.45

    # without redo_eval (its eval JSON was written), step 4's evaluation stays as it was
    _next_second()
    log = MetricsLogger(str(tmp_path), rank=0, echo=False)
    assert log.resume_at(4) == 1
    log.close()
    assert _tb_points(tmp_path, "eval/demo/u/nrmse_1step")[-1] == (4, pytest.approx(0.45))
    assert _jsonl_steps(tmp_path) == [2, 2, 4, 4]
