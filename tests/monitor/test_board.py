"""Cross-rank statistics, the dashboard layout, step timing and FLOPs: on literal inputs."""

import time

import pytest
import torch

from dsfm.models.avit import AViTConfig
from dsfm.monitor import board
from dsfm.monitor.steps import ModelFlops, StepTimer, peak_tflops


def test_combine_gives_mean_min_max_sums_rates_and_names_the_straggler():
    ranks = [{"time/step_ms": 100.0, "gpu/util_pct": 90.0, "perf/samples_per_sec": 40.0,
              "train/loss": 0.5},
             {"time/step_ms": 160.0, "gpu/util_pct": 60.0, "perf/samples_per_sec": 25.0,
              "train/loss": 0.5},
             {"time/step_ms": 110.0, "gpu/util_pct": float("nan"),
              "perf/samples_per_sec": 38.0}]
    out = board.combine(ranks)
    assert out["time/step_ms"] == pytest.approx(370 / 3)
    assert out["time/step_ms/min"] == 100.0 and out["time/step_ms/max"] == 160.0
    assert out["gpu/util_pct"] == 75.0                          # NaN (unavailable) left out
    assert out["perf/samples_per_sec"] == 103.0                 # rates add up over ranks
    energy = board.combine([{"gpu/energy_j": 300.0}, {"gpu/energy_j": 500.0}])
    assert energy["gpu/energy_j"] == 800.0                      # the job's, every GPU's
    assert energy["gpu/energy_j/max"] == 500.0
    assert out["ranks/step_ms/r1"] == 160.0 and out["ranks/gpu_util_pct/r0"] == 90.0
    assert out["ranks/slowest"] == 1.0
    assert out["train/loss"] == 0.5 and "train/loss/min" not in out
    single = board.combine([{"time/step_ms": 5.0}])
    assert single == {"time/step_ms": 5.0, "time/step_ms/min": 5.0, "time/step_ms/max": 5.0,
                      "ranks/step_ms/r0": 5.0, "ranks/slowest": 0.0}


def test_every_margin_chart_has_its_three_tags_with_one_rank():
    """A margin chart whose /min or /max tag is missing shows no line at all in TensorBoard
    (seen on a one-GPU run): one rank must write them too."""
    lay = board.layout(["euler_2d"])
    margins = [tags for charts in lay.values() for kind, tags in charts.values()
               if kind == "Margin"]
    assert margins
    one = board.combine([{tags[0]: 1.0 for tags in margins}])
    for tags in margins:
        assert all(t in one for t in tags), tags


def test_every_tag_a_run_writes_is_in_a_chart():
    """ranks/data_wait_ms/*, ranks/slowest, system/load1 and system/mem_pct were written
    and drawn in no chart; a CPU run's dashboards opened on thirteen empty GPU charts."""
    import re

    from dsfm.monitor.nvml import GPU_KEYS
    from dsfm.monitor.system import SYSTEM_KEYS

    local = {k: 1.0 for k in list(GPU_KEYS) + list(SYSTEM_KEYS)
             + ["time/step_ms", "time/data_wait_ms", "time/forward_ms", "time/backward_ms",
                "time/optimizer_ms", "perf/samples_per_sec", "perf/patches_per_sec",
                "perf/tflops", "perf/mfu", "perf/data_wait_pct", "perf/mem_allocated_gib",
                "perf/mem_reserved_gib", "perf/mem_peak_gib"]}
    written = set(board.combine([local, local])) | {
        "train/loss", "train/loss/euler_2d", "train/lr", "train/grad_norm",
        "eval/euler_2d/density/vrmse_1step", "eval/euler_2d/all_fields/vrmse_1step"}
    # drawn otherwise or constant: the bitmask (gpu/throttle is its chart), the card's
    # capacity; and the /min and /max of the metrics charted as lines (kept as scalars)
    written -= {"gpu/throttle_reasons", "gpu/mem_total_gib"}
    lay = board.layout(["euler_2d"])
    shown = [t for charts in lay.values() for _, tags in charts.values() for t in tags]
    unshown = sorted(t for t in written if not t.endswith(("/min", "/max"))
                     and not any(re.match(p, t) for p in shown))
    assert not unshown, unshown
    cpu = board.layout(["euler_2d"], gpu=False)
    assert "GPU" not in cpu and {"Throughput", "Step time", "Loss", "System"} == set(cpu)


def test_layout_has_the_four_dashboards_with_valid_charts():
    lay = board.layout(["euler_2d", "navier_stokes_2d"])
    assert {"GPU", "Throughput", "Step time", "Loss"} <= set(lay)
    for charts in lay.values():
        for kind, tags in charts.values():
            assert kind in ("Multiline", "Margin") and tags
            if kind == "Margin":
                assert len(tags) == 3 and tags[1] == tags[0] + "/min"
    assert lay["Loss"]["Loss per dataset"][1] == ["train/loss/euler_2d$",
                                                  "train/loss/navier_stokes_2d$"]
    # the norm DeepSpeed clips with, taken before clipping: a chart that said only "Gradient
    # norm" read as the norm of the update once clipping bites (at most gradient_clipping)
    assert lay["Loss"]["Gradient norm (before clipping)"] == ["Multiline", ["train/grad_norm$"]]
    # one line per dataset, its mean over fields (The Well's figure), beside every field's
    import re
    (pattern,) = lay["Loss"]["Valid VRMSE (1 step), mean over fields"][1]
    assert re.match(pattern, "eval/euler_2d/all_fields/vrmse_1step")
    assert not re.match(pattern, "eval/euler_2d/density/vrmse_1step")
    assert not re.match(pattern, "eval/euler_2d/all_fields/vrmse_rollout4")


def test_step_timer_splits_phases_on_host_clocks():
    """Each phase is the time between the calls that end the phase before it and itself: the
    test's own clock readings around those calls bound it from both sides (a tolerance around
    the sleeps failed on a loaded machine, where a 40 ms sleep took 49)."""
    timer = StepTimer(torch.device("cpu"))
    clock = time.perf_counter
    phases = ("forward", "backward", "optimizer")
    low = dict.fromkeys(phases + ("step",), 0.0)
    high = dict(low)
    for _ in range(2):
        marks = [clock()]
        timer.begin_step()
        marks.append(clock())
        timer.data(0.01)
        timer.start()
        marks.append(clock())
        for phase, seconds in zip(phases, (0.02, 0.04, 0.01)):
            time.sleep(seconds)
            marks.append(clock())
            timer.lap(phase)
            marks.append(clock())
        timer.end_step()
        marks.append(clock())
        # each call lies between two marks: begin_step 0-1, start 1-2, the laps 3-4, 5-6,
        # 7-8, end_step 8-9; a phase from the call at a-(a+1) to the one at z-(z+1)
        for phase, (a, z) in zip(phases + ("step",), ((1, 3), (3, 5), (5, 7), (0, 8))):
            low[phase] += marks[z] - marks[a + 1]
            high[phase] += marks[z + 1] - marks[a]
    out = timer.collect()
    for phase in phases + ("step",):
        assert 1e3 * low[phase] / 2 <= out[f"time/{phase}_ms"] <= 1e3 * high[phase] / 2, phase
    assert 1e3 * low["forward"] / 2 >= 20 and 1e3 * low["backward"] / 2 >= 40
    assert out["time/data_wait_ms"] == pytest.approx(10)
    assert out["perf/data_wait_pct"] == pytest.approx(100 * 10 / out["time/step_ms"])
    assert timer.collect() == {}                    # nothing since the last collect


def test_model_flops_are_counted_per_shape_and_patches_follow_the_grid():
    flops = ModelFlops(AViTConfig(12, 192, 3, 12, 0.0))
    tflop = flops.step((8, 16, 4, 128, 128)) / 1e12
    # MPP's AViT-Ti: 0.395 TFLOP/step, less the stem's first convolution on dim/4 channels
    # that folding the field embedding into it saves, and the last block's projections and
    # MLP on the 15 frames not decoded (tests/models/test_avit.py): what is computed
    folded = 0.395 - 6 * 8 * 16 * 128 * 128 * 48 ** 2 / 1e12
    computed = folded - 78 * 192 ** 2 * 8 * 15 * 8 * 8 / 1e12
    assert 0.97 * computed < tflop < computed * 1.001
    assert flops.step((4, 16, 4, 128, 128)) == pytest.approx(flops.step((8, 16, 4, 128, 128))
                                                             / 2, rel=0.01)
    assert flops.patches((8, 16, 4, 128, 64)) == 8 * 16 * 8 * 4


def test_model_flops_of_packed_and_direct_attention_are_the_models():
    """attention="packed" attends sequences packed together under a block-diagonal bias: its
    kernels compute scores between them (masked, discarded) that the model does not need;
    attention="direct", compiled, sums products, which the counter does not count.
    perf/tflops and MFU count the model's FLOPs, the same as the fused attention's; counted on
    the packed model's operators they were 6% higher here."""
    shape = (2, 16, 4, 128, 128)
    fused = ModelFlops(AViTConfig(12, 192, 3, 2, 0.0)).step(shape)
    for attention in ("packed", "direct"):
        assert ModelFlops(AViTConfig(12, 192, 3, 2, 0.0, attention=attention)).step(
            shape) == fused



def test_model_flops_of_the_tn_backward_are_the_models():
    """backward_matmuls "tn_dgrad" and "tn" compute the blocks' input (and weight) gradients
    through dsfm::mm_tn, an operator flop_counter has no formula for: perf/tflops and MFU
    count the model's FLOPs, autograd's; counted on the tn model's operators they were 35%
    of them for a 12-block Ti (the trainer's log, and train_bench's TFLOP/s and MFU for a
    run of tn alone)."""
    shape = (2, 4, 4, 64, 64)
    want = ModelFlops(AViTConfig(12, 192, 3, 2, 0.0)).step(shape)
    for mode in ("tn_dgrad", "tn"):
        assert ModelFlops(AViTConfig(12, 192, 3, 2, 0.0, backward_matmuls=mode)).step(
            shape) == want, mode

def test_peak_table():
    assert peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    # the PCIe and NVL cards are slower than the SXM parts whose name they contain
    assert peak_tflops("NVIDIA H100 PCIe", "fp32") == 51.0
    assert peak_tflops("NVIDIA H100 PCIe", "tf32") == 378.0
    assert peak_tflops("NVIDIA H100 NVL", "tf32") == 417.5
    assert peak_tflops("NVIDIA H200 NVL", "fp32") == 60.0
    assert peak_tflops("NVIDIA GH200 480GB", "tf32") == 494.7
    assert peak_tflops("Some GPU", "fp32") is None


def test_throttle_reason_bitmasks_are_or_ed_across_ranks():
    out = board.combine([{"gpu/throttle_reasons": 4.0}, {"gpu/throttle_reasons": 32.0}])
    assert out["gpu/throttle_reasons"] == 36.0          # the mean, 18, would be bits 1 and 4


def test_frozen_parameters_count_no_weight_gradient_flops():
    cfg = AViTConfig(3, 48, 3, 2, drop_path=0.0)
    shape = (2, 4, 3, 32, 32)
    full = ModelFlops(cfg).step(shape)
    from dsfm.models.avit import AViT
    blocks = frozenset(n for n, _ in AViT(cfg).named_parameters() if n.startswith("blocks."))
    assert ModelFlops(cfg, frozen=blocks).step(shape) < 0.9 * full


def test_rates_and_step_times_leave_out_evaluation_and_flop_counting():
    """Samples/s is over training time only (evaluation and checkpoints run inside
    `outside_training`), and a new shape's FLOP count is not charged to its step."""
    from dsfm.monitor.session import RunMonitor

    monitor = RunMonitor(AViTConfig(3, 48, 3, 2, drop_path=0.0), torch.device("cpu"),
                         gpu=False, system=False)
    try:
        began = time.perf_counter()
        monitor.timer.begin_step()
        monitor.micro_batch((2, 4, 3, 32, 32), 0.0)           # counts FLOPs: a new shape
        monitor.timer.end_step()
        with monitor.outside_training():
            time.sleep(0.5)
        wall = time.perf_counter() - began
        out = monitor.collect()
    finally:
        monitor.close()
    assert out["time/step_ms"] < 20
    assert 2 / out["perf/samples_per_sec"] < wall - 0.45


@pytest.mark.parametrize("system", [True, False])
def test_cpu_notice_says_system_metrics_only_when_they_are_sampled(system):
    """On CPU the GPU notice named system/ metrics as logged even with monitor.system=false,
    when none are sampled."""
    from dsfm.monitor.session import RunMonitor

    notices = []
    monitor = RunMonitor(AViTConfig(3, 48, 3, 2, drop_path=0.0), torch.device("cpu"),
                         interval_s=0.05, gpu=True, system=system, notice=notices.append)
    try:
        deadline = time.monotonic() + 60          # each sampler's first reading, however slow
        while (any(s.samples == 0 for s in monitor.samplers)
               and time.monotonic() < deadline):
            time.sleep(0.01)
        sampled = any(k.startswith("system/") for k in monitor.collect())
    finally:
        monitor.close()
    assert len(notices) == 1 and notices[0].startswith("GPU metrics unavailable")
    assert sampled == system
    assert ("logging system/ metrics" in notices[0]) == system


def test_the_flop_table_of_the_performance_docs_is_what_the_trainer_counts():
    """docs/performance.md's table of the training step's FLOPs at the reference shapes (16
    frames, 4 fields, 128², micro-batch 8, L: 4): its dsfm column is what perf/tflops and MFU
    count (ModelFlops: the folded stem, the last block on its decoded frame), to its digits."""
    import os
    import re

    from dsfm.models.avit import SIZES

    doc = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "performance.md")
    text = open(doc).read()
    section = text[text.index("## The AViT training step"):]
    rows = dict(re.findall(r"^\| (Ti|S|B|L) \| ([0-9.]+) \|", section, re.M)[:4])
    assert sorted(rows) == ["B", "L", "S", "Ti"], rows
    for size, quoted in rows.items():
        batch = 4 if size == "L" else 8
        tflop = ModelFlops(AViTConfig(12, *SIZES[size], 0.0)).step((batch, 16, 4, 128, 128))
        assert f"{tflop / 1e12:.3f}" == quoted, (size, tflop / 1e12, quoted)
