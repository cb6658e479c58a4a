"""perf.gpu_trace: the busy share and kernel breakdown read from a profiler trace."""

import gzip
import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from perf.gpu_trace import WINDOW, category, describe, profile_steps, summarize, union_length


def test_union_counts_overlaps_once():
    assert union_length([]) == 0
    assert union_length([(0, 2), (5, 6)]) == 3
    assert union_length([(0, 4), (1, 2), (3, 6)]) == 6        # nested and overlapping
    assert union_length([(3, 6), (0, 4), (1, 2)]) == 6        # in any order


def test_kernel_names_fall_into_categories():
    cases = {
        "sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n_tilesize128x128x32": "matmul/conv",
        "void cutlass::Kernel2<cutlass_80_simt_sgemm_128x64_8x5_nn_align1>": "matmul/conv",
        "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>": "attention",
        "fmha_cutlassF_f32_aligned_64x64_rf_sm80": "attention",
        "triton_poi_fused_add_mul_native_layer_norm_0": "compiled",
        "void multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor>": "optimizer",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float>": "norm",
        "void at::native::reduce_kernel<512, 1, ReduceOp<float, NormTwoOps>>": "norm",
        "void at::native::reduce_kernel<512, 1, ReduceOp<float, func_wrapper_t>>": "reduction",
        "void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>": "elementwise",
        "void cudnn::nchwToNhwcKernel<float, float, float, false>": "layout",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float>": "copy",
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": "matmul/conv",
        "triton_poi_fused_clone_convert_element_type_transpose_3": "compiled",
        "triton_red_fused_native_layer_norm_backward_7": "compiled",
        "triton_tem_fused_addmm_0": "matmul/conv",
        "void (anonymous namespace)::softmax_warp_forward<float, float, float, 4, false>":
            "attention",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "comm",
        "void at::native::reduce_kernel<512, 1, ReduceOp<float, WelfordOps<float>>>": "norm",
        "void at::native::GammaBetaBackwardCUDAKernel<float, float>": "norm",
        "something_new": "other",
    }
    for name, want in cases.items():
        assert category(name) == want, name


def _trace(windows, kernels):
    events = [{"cat": "user_annotation", "name": WINDOW, "ts": a, "dur": b - a}
              for a, b in windows]
    events.append({"cat": "user_annotation", "name": "dsfm_profiler_warmup", "ts": -100,
                   "dur": 50})
    for name, a, b, cat in kernels:
        events.append({"cat": cat, "name": name, "ts": a, "dur": b - a})
    events.append({"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000})
    return events


def test_summary_of_two_steps():
    gemm, flash = "sm90_xmma_gemm_f32", "flash_fwd_kernel"
    events = _trace([(0, 1000), (2000, 3000)], [
        (gemm, 100, 500, "kernel"), (flash, 300, 600, "kernel"),     # concurrent: 500 busy
        ("Memcpy HtoD (Pinned -> Device)", 700, 800, "gpu_memcpy"),
        (gemm, 900, 1200, "kernel"),              # runs past the window: clipped to 100
        (gemm, 2000, 2600, "kernel"),
        (gemm, -90, -60, "kernel"),               # in the profiler's warm-up step: ignored
        (gemm, 1500, 1600, "kernel"),             # between the steps: ignored
    ])
    s = summarize(events)
    assert s["steps"] == 2 and s["wall_ms"] == pytest.approx(1.0)
    assert s["busy_ms"] == pytest.approx((500 + 100 + 100 + 600) / 2 / 1e3)
    assert s["busy_share"] == pytest.approx(1300 / 2000)
    assert s["kernels_per_step"] == 2.5
    assert s["kernel_ms_per_step"] == pytest.approx((400 + 300 + 100 + 300 + 600) / 2 / 1e3)
    assert s["categories_ms"] == {"matmul/conv": 0.65, "attention": 0.15, "copy": 0.05}
    assert list(s["categories_ms"]) == ["matmul/conv", "attention", "copy"]   # largest first
    assert s["top"][0] == {"name": gemm, "ms_per_step": 0.65, "calls_per_step": 1.5}
    assert s["events_in_windows"] == pytest.approx(5 / 7)        # two fell outside
    # the two steps issued different numbers of kernels: flagged (identical training steps
    # issue the same, so a difference means device records were lost)
    assert s["kernels_min_max"] == [1, 4]
    line = describe(s, step_ms=1.3)
    assert line.startswith("GPU busy 65.0% of the profiled 1.0 ms, 0.7 ms = 50.0% of the timed "
                           "1.3 ms (KERNELS DIFFER between steps: 1 to 4; records lost?); "
                           "2 kernels/step") and "CLOCKS" not in line


def test_device_events_outside_every_window_are_flagged():
    """Device timestamps on another clock than the host's annotations would read as an idle
    GPU: the line says so instead."""
    events = _trace([(0, 1000), (2000, 3000)], [("sm90_xmma_gemm", 10 ** 9 + t, 10 ** 9 + t + 50,
                                                 "kernel") for t in range(0, 3000, 100)])
    s = summarize(events)
    assert s["busy_share"] == 0 and s["events_in_windows"] == 0
    assert "CLOCKS? only 0% of device events fall in the step windows" in describe(s)
    assert s["kernels_min_max"] == [0, 0] and "KERNELS" not in describe(s)


def test_summary_without_device_events_and_without_windows():
    s = summarize(_trace([(0, 1000)], []))
    assert s["busy_share"] is None and s["busy_ms"] is None and s["kernels_per_step"] == 0
    with pytest.raises(ValueError, match=WINDOW):
        summarize([{"cat": "kernel", "name": "k", "ts": 0, "dur": 1}])


def _real_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(),
                                torch.nn.Linear(512, 256))
    x = torch.randn(128, 256)

    def step():
        model(x).square().mean().backward()
    return step


def test_a_real_trace_read_with_host_operators_as_the_timeline(tmp_path):
    """A trace torch.profiler really wrote: taking the host's top-level operators for the
    timeline, the busy time fills most of each window and never exceeds it."""
    step = _real_step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            with record_function(WINDOW):
                step()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    s = summarize(events, device_cats=("cpu_op",))
    assert s["steps"] == 3
    assert 0.3 < s["busy_share"] <= 1.0 and s["busy_ms"] <= s["wall_ms"]
    # nested operators overlap their parents: the summed time exceeds the covered time
    assert s["kernel_ms_per_step"] > s["busy_ms"]
    assert any(t["name"] in ("aten::addmm", "aten::mm") for t in s["top"])


def test_profile_steps_on_this_machine(tmp_path):
    keep = tmp_path / "kept.json.gz"
    s = profile_steps(_real_step(), 2, keep=str(keep))
    assert s["steps"] == 2 and s["wall_ms"] > 0
    kept = json.loads(gzip.open(keep, "rt").read())["traceEvents"]
    assert sum(e["name"] == WINDOW for e in kept) == 2
    if not torch.cuda.is_available():
        assert s["busy_share"] is None and not any(e["cat"] == "cpu_op" for e in kept)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_bound_loop_reads_busy():
    a = torch.randn(4096, 4096, device="cuda")

    def step():
        for _ in range(20):
            a @ a
    s = profile_steps(step, 2)
    assert s["busy_share"] > 0.8
    assert next(iter(s["categories_ms"])) == "matmul/conv"
    assert s["kernels_per_step"] >= 20
