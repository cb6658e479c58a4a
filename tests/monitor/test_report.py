"""python -m dsfm.monitor.report on event files as runs leave them."""

import sys

import pytest

from tests.conftest import run


def test_report_of_a_run_cut_between_two_phases_of_a_log_step(tmp_path):
    # a run killed (or read while it writes) after its last log step's data wait and before
    # its forward time: the phases' series differ in length
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as tb:
        for step in (10, 20, 30):
            tb.add_scalar("time/step_ms", 50.0, step)
            tb.add_scalar("time/data_wait_ms", 1.0, step)
            tb.add_scalar("system/process_cpu_pct", 100.0, step)
            tb.add_scalar("system/process_cpu_pct/min", 90.0, step)
            if step < 30:
                tb.add_scalar("system/process_cpu_pct/max", 110.0, step)
                tb.add_scalar("time/forward_ms", 20.0, step)
                tb.add_scalar("time/backward_ms", 25.0, step)
    proc = run([sys.executable, "-m", "dsfm.monitor.report", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "report.png").stat().st_size > 5000
    assert "step: 50.0 ms, data wait 2.0% of it" in proc.stdout


def test_report_averages_rates_over_the_time_they_held(tmp_path):
    # after a warm-up interval (left out), 10 steps of 8 samples at 200 ms and 10 at 800 ms:
    # 160 samples in 10 s are 16 samples/s, as 8 samples per 500 ms step say; the intervals'
    # rates averaged as equals (40 and 10) made 25, and TFLOP/s and MFU alike
    from torch.utils.tensorboard import SummaryWriter

    from dsfm.monitor import report

    with SummaryWriter(str(tmp_path / "tb")) as tb:
        for step, ms in ((10, 2000.0), (20, 200.0), (30, 800.0)):
            rate = 8 / (ms / 1e3)
            tb.add_scalar("time/step_ms", ms, step)
            tb.add_scalar("time/data_wait_ms", ms / 10, step)
            tb.add_scalar("perf/samples_per_sec", rate, step)
            tb.add_scalar("perf/tflops", rate / 10, step)
            tb.add_scalar("perf/mfu", rate / 100, step)
    r = report.summarize(report.load_scalars(str(tmp_path)))
    assert r["samples_per_sec"] == pytest.approx(16.0)
    assert r["samples_per_sec"] * r["step_ms"] / 1e3 == pytest.approx(8.0)
    assert r["tflops"] == pytest.approx(1.6) and r["mfu"] == pytest.approx(0.16)
    assert r["step_ms"] == pytest.approx(500.0) and r["data_wait_share"] == pytest.approx(0.1)
    proc = run([sys.executable, "-m", "dsfm.monitor.report", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "throughput: 16.0 samples/s, 1.600 TFLOP/s, MFU 16.0%" in proc.stdout


def _marks(ax) -> int:
    """Data marks matplotlib actually draws in `ax`: lines of two points or more, markers,
    bars, segments of nonzero length and areas of nonzero width and height (legend handles
    are not in ax.lines)."""
    from matplotlib.collections import LineCollection

    n = sum(1 for line in ax.lines
            if len(line.get_xdata()) >= 2 or line.get_marker() not in (None, "None", "", " "))
    n += sum(1 for bar in ax.patches if bar.get_height() > 0)
    for coll in ax.collections:
        for path in coll.get_paths():
            span = path.vertices.max(axis=0) - path.vertices.min(axis=0)
            n += bool(span.max() > 0 if isinstance(coll, LineCollection) else span.min() > 0)
    return n


def test_report_of_a_run_that_logged_one_step_draws_every_chart(tmp_path):
    # a run shorter than its log_every logs once, at its last step: four empty charts before
    from torch.utils.tensorboard import SummaryWriter

    from dsfm.monitor import report

    with SummaryWriter(str(tmp_path / "tb")) as tb:
        for tag, value in (("time/step_ms", 50.0), ("time/data_wait_ms", 1.0),
                           ("time/forward_ms", 20.0), ("time/backward_ms", 25.0),
                           ("time/optimizer_ms", 4.0), ("perf/samples_per_sec", 80.0),
                           ("perf/tflops", 0.01), ("system/process_cpu_pct", 100.0),
                           ("system/process_cpu_pct/min", 90.0),
                           ("system/process_cpu_pct/max", 110.0), ("ranks/step_ms/r0", 48.0),
                           ("ranks/step_ms/r1", 52.0)):
            tb.add_scalar(tag, value, 7)
    fig = report.figure(report.load_scalars(str(tmp_path)), "one step")
    util, throughput, phases, ranks, tflops = fig.axes
    assert _marks(util) >= 2                      # the mean and its min-max
    assert _marks(throughput) >= 1 and _marks(tflops) >= 1
    assert _marks(phases) >= 5                    # four phases and the step time
    assert _marks(ranks) == 2
    proc = run([sys.executable, "-m", "dsfm.monitor.report", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step: 50.0 ms, data wait 2.0% of it" in proc.stdout


def test_report_that_cannot_be_written_is_one_line_before_reading_the_events(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "tb")) as tb:
        tb.add_scalar("time/step_ms", 50.0, 10)
    for out, why in ((tmp_path / "missing" / "r.png", f"{tmp_path / 'missing'} is not a "
                      "directory"), (tmp_path / "tb", "that is a directory")):
        proc = run([sys.executable, "-m", "dsfm.monitor.report", str(tmp_path), "--out",
                    str(out)], timeout=300)
        assert proc.returncode == 2
        assert proc.stderr.strip() == (f"error: cannot write the report to {out}: {why}; "
                                       "give --out FILE.png"), proc.stderr[-2000:]
        assert not proc.stdout
