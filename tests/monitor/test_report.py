"""python -m dsfm.monitor.report on event files as runs leave them."""

import sys

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
