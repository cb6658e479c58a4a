"""The samplers on real hardware: psutil on this machine, NVML where there is a GPU (and its
absence where there is none), the CUDA → NVML device mapping, and the standalone monitor CLI
writing real TensorBoard event files."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from dsfm.monitor.nvml import (
    GPU_KEYS,
    GpuSampler,
    all_local_gpus,
    nvml_problem,
    parse_visible_devices,
    pci_bus_id_of,
    physical_gpu,
    readable_uuids,
)
from dsfm.monitor.system import SYSTEM_KEYS, SystemSampler
from tests.conftest import REPO, run

NO_NVML = nvml_problem()
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_gpu = pytest.mark.skipif(NO_NVML is None, reason="NVML works here; this tests its absence")


def _burn(seconds: float) -> None:
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        x += 1


# ---------------------------------------------------------------- system

def test_system_sampler_sees_this_process_busy():
    """The sampling thread reads every metric while this process burns a core. How much of a
    core it reads depends on the machine's load (a fixed 40 % read 11 % under two busy
    cores): the share itself is checked against the CPU time really used below, without
    the thread."""
    notes = []
    sampler = SystemSampler(interval_s=0.1, notice=notes.append)
    start = time.process_time()
    sampler.start()
    deadline = time.monotonic() + 120
    while time.process_time() - start < 0.5 and time.monotonic() < deadline:
        _burn(0.05)
    taken = sampler.samples
    while sampler.samples < max(taken + 1, 5) and time.monotonic() < deadline:
        _burn(0.05)                     # a sample after the 0.5 s of CPU, and at least 5
    snap = sampler.snapshot()
    sampler.stop()
    assert sampler.samples >= 5 and sampler.samples > taken
    assert set(snap) == set(SYSTEM_KEYS) - set(sampler.unavailable)
    assert len(notes) == len({k.split("_")[0] for k in sampler.unavailable})
    assert snap["system/process_cpu_pct"] > 0
    assert 0 < snap["system/cpu_pct"] <= 100
    total_gib = __import__("psutil").virtual_memory().total / 1024 ** 3
    assert 0 < snap["system/mem_used_gib"] < total_gib and 0 < snap["system/mem_pct"] < 100
    assert 0.01 < snap["system/rss_gib"] < total_gib     # torch alone is > 10 MiB
    assert snap["system/load1"] >= 0
    assert all(snap[k] >= 0 for k in snap if k.endswith("_mbps"))


#: psutil reads CPU times in 10 ms ticks, each of user and system time rounded down: a
#: difference of two readings can fall short of the CPU time used by up to this much
TICKS_S = 0.03


def test_system_sampler_counts_child_processes():
    """A child burning 0.5 s of CPU while this process waits for it shows in process_cpu_pct:
    at least that CPU time over the time the sample covers, whatever else the machine runs (a
    fixed 50 % read 16 % under two busy cores). This process alone uses a few ms of it."""
    burn = ("import sys, time\nsys.stdin.readline()\nstart = time.process_time()\n"
            "while time.process_time() - start < 0.5: pass\n"
            "print(time.process_time() - start, flush=True)\nsys.stdin.readline()")
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        began = time.monotonic()
        sampler = SystemSampler(interval_s=0.2)      # its baseline: the child already counted
        child.stdin.write("go\n")
        child.stdin.flush()
        burned = float(child.stdout.readline())
        snap = sampler.sample()
        span = time.monotonic() - began
        sampler.stop()
    finally:
        child.kill()
        child.wait()
    assert snap["system/process_cpu_pct"] >= 100 * (burned - TICKS_S) / span, (burned, span)
    assert snap["system/rss_gib"] > 0


def test_a_child_listed_late_does_not_charge_its_past_cpu_to_one_interval():
    """The sampler lists this process's children again only every 10 s or when one of them
    exits; a child found then that was already running at the previous reading used to count
    its whole CPU time since it started in the interval that found it (a CPU burner started
    after the sampler read 673 % on a 2-core machine at the 10 s rescan). Here the child burns
    0.5 s, then idles while a listed child exits, which makes the reading after next list it:
    the interval between those two readings holds a few ms of this process's work only."""
    idle = subprocess.Popen([sys.executable, "-c", "import sys\nsys.stdin.readline()"],
                            stdin=subprocess.PIPE, text=True)
    burn = ("import sys, time\nstart = time.process_time()\n"
            "while time.process_time() - start < 0.5: pass\n"
            "print(time.process_time() - start, flush=True)\nsys.stdin.readline()")
    late = None
    try:
        sampler = SystemSampler(interval_s=0.2)          # lists `idle`; rates over 0.1 s on
        late = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        burned = float(late.stdout.readline())           # and now it idles
        idle.stdin.write("\n")
        idle.stdin.flush()
        idle.wait()
        began = time.monotonic()
        first = sampler.sample()             # `idle` is gone: the next reading lists again
        assert "system/process_cpu_pct" in first         # 0.5 s of CPU since the baseline
        time.sleep(0.15)
        second = sampler.sample()                        # finds `late`, idle all along
        span = time.monotonic() - began
        sampler.stop()
    finally:
        for child in (idle, late):
            if child is not None:
                child.kill()
                child.wait()
    assert burned >= 0.5
    # CPU seconds the second reading charged to its interval (at most `span` long)
    assert second["system/process_cpu_pct"] * span / 100 < burned / 2, (second, span)


def test_rates_are_never_taken_over_a_moment():
    """The sampler's first reading comes right after its baseline: CPU shares over a few
    microseconds (10 ms ticks) would be noise, so it gives levels only, and the next reading
    is differenced against the baseline, over the whole time since: at least the CPU time
    this process burned in between, over the time between the readings. (Whether a reading
    came within the window depends on the machine's speed: where the test's own clocks leave
    it open, that check is skipped, not failed.)"""
    began = time.monotonic()
    sampler = SystemSampler(interval_s=0.4)               # rates over 0.2 s at least
    first = sampler.sample()
    ready = time.monotonic()
    assert "system/mem_pct" in first
    if ready - began < 0.2:
        assert "system/process_cpu_pct" not in first
    start = time.process_time()
    while time.process_time() - start < 0.3 or time.monotonic() - ready < 0.25:
        pass
    burned = time.process_time() - start
    before = time.monotonic()
    later = sampler.sample()
    span = time.monotonic() - began
    assert later["system/process_cpu_pct"] >= 100 * (burned - TICKS_S) / span, (burned, span)
    again = sampler.sample()                              # right after: levels again
    if time.monotonic() - before < 0.2:
        assert "system/process_cpu_pct" not in again
    start = time.monotonic()
    tiny = SystemSampler(interval_s=0.004)               # 10 ms CPU ticks: never under 0.1 s
    while "system/process_cpu_pct" not in tiny.sample():
        pass
    assert time.monotonic() - start >= 0.1


def test_snapshot_means_and_resets():
    """snapshot() averages the samples since the previous one; with none new, the latest."""
    sampler = SystemSampler(interval_s=10)
    for _ in range(3):
        sampler.sample()
    first = sampler.snapshot()
    again = sampler.snapshot()
    assert again == {k: sampler._latest[k] for k in again}
    assert set(first) == set(again)
    with pytest.raises(ValueError):
        SystemSampler(interval_s=0)


def test_a_sampler_that_fails_leaves_a_gap_not_its_last_values():
    sampler = SystemSampler(interval_s=0.05, notice=lambda message: notices.append(message))
    notices: list[str] = []
    sampler.sample()
    assert sampler.snapshot()
    real, calls = sampler._read, []

    def failing():
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("gone")
        return real()
    sampler._read = failing
    sampler.start()
    deadline = time.monotonic() + 5
    while not notices and time.monotonic() < deadline:
        time.sleep(0.02)
    sampler.stop()
    assert notices and "sampling stopped" in notices[0]
    assert sampler.snapshot() == {}


# ---------------------------------------------------------------- which GPU

def test_visible_devices_parsing():
    assert parse_visible_devices("0, 2 ,GPU-ab12") == [0, 2, "GPU-ab12"]
    assert parse_visible_devices("3,x,1") == [3]               # CUDA stops at a bad entry
    assert parse_visible_devices("-1") == [] and parse_visible_devices("") == []
    assert parse_visible_devices("1,1") == []                  # a repeat hides everything
    assert parse_visible_devices("MIG-5c8f,0") == ["MIG-5c8f", 0]


def test_a_gpu_nvml_cannot_read_does_not_hide_the_others():
    """One GPU of the node NVML cannot open (lost, or outside the job's device cgroup) stopped
    the GPU metrics of every rank: the UUID listing raised. Now it is left out."""
    import pynvml

    uuids = ["GPU-0a1b2c3d-0000-1111-2222-333344445555", None,
             "GPU-9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff"]

    def uuid_of(i):
        if uuids[i] is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        return uuids[i]

    readable = readable_uuids(3, uuid_of, pynvml.NVMLError)
    assert readable == [uuids[0], uuids[2]]
    assert physical_gpu(0, visible_devices="GPU-9f8e", nvml_uuids=readable) == uuids[2]
    with pytest.raises(ZeroDivisionError):           # other errors are not swallowed
        readable_uuids(1, lambda i: 1 / 0, pynvml.NVMLError)


def test_cuda_index_to_physical_gpu():
    uuids = ["GPU-0a1b2c3d-0000-1111-2222-333344445555",
             "GPU-9f8e7d6c-aaaa-bbbb-cccc-ddddeeeeffff",
             "GPU-9f00aaaa-1234-5678-9abc-def012345678"]
    assert physical_gpu(1) == 1                                # nothing hidden
    assert physical_gpu(1, visible_devices="2,3") == 3
    assert physical_gpu(0, visible_devices="GPU-0a1b", nvml_uuids=uuids) == uuids[0]
    assert physical_gpu(1, visible_devices="3,GPU-9f8e", nvml_uuids=uuids) == uuids[1]
    mig = "MIG-4b0c3f9a-1111-2222-3333-444455556666"
    assert physical_gpu(0, visible_devices=mig, nvml_uuids=uuids) == mig
    for bad in ("", "-1", "3,x,1", "0,0"):
        with pytest.raises(ValueError, match="not among"):
            physical_gpu(1, visible_devices=bad)
    with pytest.raises(ValueError, match="matches 2"):
        physical_gpu(0, visible_devices="GPU-9f", nvml_uuids=uuids)
    with pytest.raises(ValueError, match="matches 0"):
        physical_gpu(0, visible_devices="GPU-77", nvml_uuids=uuids)
    # torch's own UUID beats CUDA_VISIBLE_DEVICES, whatever the case or prefix
    assert physical_gpu(0, uuid="9F8E7D6C-AAAA-BBBB-CCCC-DDDDEEEEFFFF", visible_devices="0",
                        nvml_uuids=uuids) == uuids[1]
    # a UUID that is not a whole GPU is a MIG instance
    assert physical_gpu(0, uuid="4b0c3f9a-1111-2222-3333-444455556666",
                        nvml_uuids=uuids) == mig
    pci = pci_bus_id_of(0, 0x3B, 0)
    assert pci == "00000000:3B:00.0"
    assert physical_gpu(2, pci_bus_id=pci, visible_devices="5,6,7") == pci


# ---------------------------------------------------------------- NVML absent (CI)

@no_gpu
def test_gpu_sampler_without_nvml_says_so_once():
    notes = []
    sampler = GpuSampler(interval_s=0.05, notice=notes.append)
    sampler.start()
    time.sleep(0.2)
    assert sampler.snapshot() == {} and sampler.sample() == {}
    sampler.stop()
    assert not sampler.available
    assert len(notes) == 1 and notes[0].startswith("GPU metrics unavailable: ")
    assert NO_NVML in notes[0]
    assert set(sampler.unavailable) == set(GPU_KEYS)
    assert all_local_gpus() == []
    standalone = []
    assert not GpuSampler(nvml_index=0, notice=standalone.append).available
    assert len(standalone) == 1


# ---------------------------------------------------------------- a real GPU

def _load(seconds: float) -> None:
    a = torch.randn(4096, 4096, device="cuda")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(20):
            a = torch.tanh(a @ a)
        torch.cuda.synchronize()


@gpu
def test_gpu_sampler_follows_torch_device_under_load():
    import pynvml

    torch.cuda.set_device(0)
    hold = torch.empty(256 * 1024 ** 2, device="cuda")          # 1 GiB
    notes = []
    sampler = GpuSampler(interval_s=0.1, notice=notes.append)
    assert sampler.available, notes
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    assert pynvml.nvmlDeviceGetUUID(sampler.handle).lower().endswith(uuid.lower())
    sampler.start()
    _load(2.0)
    first = sampler.snapshot()
    _load(2.0)
    second = sampler.snapshot()
    sampler.stop()
    del hold
    for key in ("gpu/util_pct", "gpu/mem_util_pct", "gpu/mem_used_gib", "gpu/mem_total_gib",
                "gpu/power_w", "gpu/energy_j", "gpu/sm_clock_mhz", "gpu/throttle"):
        assert key in second, (key, sampler.unavailable)
    assert second["gpu/util_pct"] > 50
    assert second["gpu/mem_used_gib"] >= 1.0
    assert second["gpu/mem_total_gib"] >= second["gpu/mem_used_gib"]
    assert 0 < first["gpu/energy_j"] < second["gpu/energy_j"]
    assert second["gpu/power_w"] > 0
    # every metric is either measured or listed as unavailable, each announced exactly once
    assert set(second) | set(sampler.unavailable) == set(GPU_KEYS)
    announced = [k for note in notes for k in re.findall(r"gpu/\w+", note)]
    assert sorted(announced) == sorted(sampler.unavailable)
    if torch.cuda.get_device_capability(0)[0] >= 9:         # Hopper: GPM
        assert second["gpu/sm_active_pct"] > 5, sampler.unavailable
        assert "gpu/tensor_active_pct" in second


@gpu
def test_gpu_sampler_by_nvml_index():
    assert all_local_gpus()
    sampler = GpuSampler(nvml_index=all_local_gpus()[0], notice=lambda _: None)
    assert sampler.available
    assert "gpu/mem_total_gib" in sampler.sample()
    sampler.stop()


# ---------------------------------------------------------------- the standalone monitor

def _events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return acc


def _layout(acc: EventAccumulator) -> layout_pb2.Layout:
    (event,) = acc.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])


@pytest.mark.slow
def test_monitor_cli_writes_system_and_layout(tmp_path):
    proc = run([sys.executable, "-m", "dsfm.monitor", "--logdir", str(tmp_path),
                "--interval", "0.25", "--duration", "1.5"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    acc = _events(tmp_path)
    scalars = acc.Tags()["scalars"]
    expected = set(SYSTEM_KEYS) - set(SystemSampler().unavailable)
    assert expected <= set(scalars)
    steps = [e.step for e in acc.Scalars("system/cpu_pct")]
    # one sample per interval of the duration, the last one too (it wrote 1.5 / 0.25 - 1)
    assert steps == list(range(6)) and "6 samples written" in proc.stdout
    layout = _layout(acc)
    charts = {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart}
              for c in layout.category}
    assert set(charts) == ({"System"} if NO_NVML else {"GPU", "System"})
    if not NO_NVML:
        assert charts["GPU"]["util_pct"] == [r"^gpu\d+/util_pct$"]
        assert len(charts["GPU"]) == len(GPU_KEYS)
    shown = [t for tags in charts["System"].values() for t in tags]
    assert all(any(re.fullmatch(t, key) for t in shown) for key in SYSTEM_KEYS)
    if NO_NVML:
        assert proc.stdout.count("GPU metrics unavailable") == 1
        assert NO_NVML in proc.stdout
        assert not any(t.startswith("gpu") for t in scalars)
    else:
        assert "gpu0/util_pct" in scalars


@pytest.mark.slow
def test_monitor_cli_started_again_into_its_logdir_counts_on(tmp_path):
    written = []
    for _ in range(2):
        proc = run([sys.executable, "-m", "dsfm.monitor", "--logdir", str(tmp_path),
                    "--interval", "0.2", "--duration", "0.7"], timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        written.append(int(re.search(r"(\d+) samples written", proc.stdout).group(1)))
    assert written[0] >= 2 and written[1] >= 2
    steps = [e.step for e in _events(tmp_path).Scalars("system/mem_pct")]
    assert steps == list(range(sum(written)))      # one curve, not the second over the first
    assert f"from step {written[0]}," in proc.stdout


@pytest.mark.slow
def test_monitor_cli_exits_cleanly_on_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "dsfm.monitor", "--logdir", str(tmp_path),
                             "--interval", "0.1"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        for line in proc.stdout:                    # wait until it samples
            if line.startswith("dsfm.monitor:"):
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "samples written" in out
    assert len(_events(tmp_path).Scalars("system/mem_used_gib")) >= 3


@pytest.mark.slow
def test_overhead_benchmark_reports_every_variant(tmp_path):
    out = tmp_path / "overhead.json"
    proc = run([sys.executable, "-m", "perf.monitor_overhead", "--seconds", "0.3", "--rounds",
                "1", "--size", "128", "--json", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert [r["variant"] for r in rec["rows"]] == ["off", "1 Hz", "10 Hz"]
    assert all(r["ms_per_step"] > 0 for r in rec["rows"])
    assert rec["rows"][2]["samples"] >= 1
    assert rec["sample_costs"]["system sample() us"] > 0
    # the timed calls are whole samples (rates; GPM on a GPU), as at 1 Hz, not back-to-back
    # calls that skip that work
    assert rec["sample_costs"]["system samples complete"] == 1.0
    assert "overhead" in proc.stdout and "% of one core" in proc.stdout


def test_monitor_cli_refuses_a_logdir_it_cannot_write_and_bad_times_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    for logdir, why in ((tmp_path / "afile", "not a directory"),
                        (tmp_path / "afile" / "tb", "Not a directory")):
        t = time.monotonic()
        proc = run([sys.executable, "-m", "dsfm.monitor", "--logdir", str(logdir)], timeout=60)
        assert proc.returncode == 2 and time.monotonic() - t < 30
        assert proc.stderr.strip() == f"error: --logdir {logdir}: {why}", proc.stderr[-2000:]
        assert "samples written" not in proc.stdout
    for args, line in ((["--interval", "inf"], "--interval must be a number of seconds > 0"),
                       (["--duration", "-1"], "--duration must be a number of seconds > 0")):
        proc = run([sys.executable, "-m", "dsfm.monitor", "--logdir", str(tmp_path / "tb"),
                    *args], timeout=60)
        assert proc.returncode == 2 and line in proc.stderr.splitlines()[-1]
        assert "Traceback" not in proc.stderr and not (tmp_path / "tb").exists()
