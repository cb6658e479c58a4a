"""dsfm's multi-tensor gradient norm for ZeRO-2 and ZeRO-3 (`dsfm.runtime.zero_norm`) against
DeepSpeed's own per-tensor loop, in real engines on two gloo ranks
(tests/runtime/zero_norm_probe.py): the same norm of the same partitioned gradients, the same
training, the same skipped step on a NaN."""

import json
import re
import sys

import pytest
import torch

from tests.conftest import run
from tests.runtime.test_dist import _clean_env, _launcher, probe_records

PROBE = "tests/runtime/zero_norm_probe.py"


def _probe(stage: int, ranks: int, cuda: bool) -> list[dict]:
    """Run the probe under torchrun; check what holds on every device and rank count."""
    torchrun = _launcher("torchrun")
    assert torchrun, "torchrun is installed with torch; it is missing beside python and on PATH"
    env = _clean_env() if cuda else _clean_env(CUDA_VISIBLE_DEVICES="")
    records = probe_records([torchrun, "--standalone", "--nproc_per_node", str(ranks), PROBE,
                             "--stage", str(stage)], env, "ZERO_NORM", ranks)
    assert {r["stage"] for r in records} == {stage}
    assert all(r["device"].startswith("cuda" if cuda else "cpu") for r in records)
    # each rank holds its own part of the gradients (ZeRO-2 and ZeRO-3 partition them)
    assert all(r["n_grads"] > 10 for r in records)
    for step in range(5):
        rows = [r["steps"][step] for r in records]
        for row, n_grads in zip(rows, (r["n_grads"] for r in records)):
            assert row["loss_fused"] == pytest.approx(row["loss_own"], rel=1e-6, abs=0)
            if step == 3:                    # a NaN in one gradient of rank 0: all ranks skip
                assert not row["changed_fused"] and not row["changed_own"]
                assert row["global_norm_fused"] == row["global_norm_own"] == float("inf")
                continue
            assert row["changed_fused"] and row["changed_own"]
            # float64 sums in another order (ZeRO-2 rounds the result to float32): equal to within
            # a float32 rounding or two
            assert row["norm_fused"] == pytest.approx(row["norm_own"], rel=2.5e-7, abs=0)
            assert row["norm_fused"] > 1.0                  # clipping at 1.0 is active
            assert row["global_norm_fused"] == row["norm_fused"]
            # the same kind of tensor on the same device as DeepSpeed's, for its callers
            assert row["where_fused"] == row["where_own"]
            assert row["where_fused"].startswith("cuda" if cuda else "cpu")
            # a handful of operators, against two per gradient tensor
            assert row["ops_fused"] <= 15 < 2 * n_grads <= row["ops_own"]
        # the norm is global: every rank gets the same value from its own partition
        if step != 3:
            assert len({row["norm_fused"] for row in rows}) == 1
    return records


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_fused_norm_matches_deepspeeds_on_two_ranks(stage):
    _probe(stage, ranks=2, cuda=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stage", [2, 3])
def test_fused_norm_matches_deepspeeds_on_one_cuda_rank(stage):
    """The same comparison on a GPU through NCCL: dsfm's code on CUDA tensors (the result's
    device and dtype, the sentinel, the NCCL reductions), not only the kernel it calls."""
    _probe(stage, ranks=1, cuda=True)


@pytest.mark.slow
def test_shipped_zero2_reduces_during_the_backward_in_small_buckets():
    """ds_configs/zero2.json on an AViT-B: with DeepSpeed's default bucket (5e8 elements) and
    overlap_comm, each rank held 2 x 2 GB of gradient buckets, and B's 116 M gradients were
    reduced in one piece after the whole backward, so no communication overlapped it."""
    proc = run([sys.executable, PROBE, "--shipped"], env=_clean_env(CUDA_VISIBLE_DEVICES=""),
               timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    [rec] = [json.loads(m) for m in re.findall(r"SHIPPED (\{.*\})", out)]
    assert rec["parameters"] > 1e8
    assert rec["buffer_bytes"] <= 2 * 4 * 5e7              # two fp32 buckets of 5e7 elements
    assert rec["reductions"] >= 3                          # 116 M gradients in 5e7 buckets


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cuda_multi_tensor_norm_equals_deepspeeds_per_tensor_sum_on_cuda(dtype):
    """The one part the CPU tests cannot reach: on CUDA, `_foreach_norm(dtype=float64)` runs a
    multi-tensor kernel of its own (on the CPU it falls back to one norm per tensor). Over
    AViT-B's gradient shapes, it must give DeepSpeed's float64 sum of per-tensor norms."""
    from dsfm.models.avit import avit

    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(p.shape, generator=g, device="cuda").mul_(1e-3).to(dtype)
             for p in avit("B", 12).parameters()]
    fused = torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float64)).pow(2).sum()
    own = torch.stack([torch.linalg.vector_norm(t.to(torch.float64)) for t in grads]).pow(2).sum()
    assert len(grads) == 439
    assert float(fused) == pytest.approx(float(own), rel=1e-12, abs=0)


def test_without_zero_the_clipping_norm_is_reported():
    """ZeRO stage 0 in fp32: DeepSpeed clips with its `clip_grad_norm_` but drops the norm, so
    `get_global_grad_norm()` (the run's `train/grad_norm`) was None; now it is the norm of the
    gradients the step clipped."""
    torchrun = _launcher("torchrun")
    proc = run([torchrun, "--standalone", "--nproc_per_node", "1", PROBE, "--stage", "0"],
               env=_clean_env(CUDA_VISIBLE_DEVICES=""), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    (record,) = [json.loads(m) for m in re.findall(r"PLAIN_NORM (\{.*\})", out)]
    for row in record["steps"]:
        assert row["reported"] == pytest.approx(row["expected"], rel=1e-6)
    assert record["steps"][0]["expected"] > 1.0          # clipping at 1.0 is active


def test_clipping_on_the_device_scales_as_deepspeeds_without_reading_the_norm(monkeypatch):
    """`zero_norm._clip_on_device` against DeepSpeed's own `unscale_and_clip_grads` on the same
    gradients: the same values bit for bit for a norm above and below the clip, DeepSpeed's
    -1 sentinel, inf and NaN (both clip as if infinite: the gradients zeroed), a loss scale
    other than 1 and no clipping; and no host read of a tensor (DeepSpeed's made one per
    call: a device synchronization on a GPU). (A Python float norm fails in DeepSpeed's
    torch.clamp as in this one: ZeRO's norms are tensors.)"""
    import types

    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from dsfm.runtime.zero_norm import _clip_on_device

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(37, generator=g), [torch.randn(5, 3, generator=g), torch.randn(4)]]

    def copy(gs):
        return [x.clone() if torch.is_tensor(x) else [y.clone() for y in x] for x in gs]

    def flat(gs):
        return torch.cat([t.flatten() for x in gs for t in ([x] if torch.is_tensor(x) else x)])

    reads = []
    bool_of = torch.Tensor.__bool__
    for clip, scale in ((1.0, 1.0), (0.5, 4.0), (0.0, 2.0), (0.0, 1.0)):
        opt = types.SimpleNamespace(clip_grad=clip, loss_scale=scale, device="cpu")
        for norm in (torch.tensor(3.0), torch.tensor(0.25), torch.tensor(-1.0),
                     torch.tensor(float("inf")), torch.tensor(float("nan"))):
            ours, theirs = copy(grads), copy(grads)
            DeepSpeedZeroOptimizer.unscale_and_clip_grads(opt, theirs, norm)
            monkeypatch.setattr(torch.Tensor, "__bool__",
                                lambda t: reads.append(1) or bool_of(t))
            try:
                _clip_on_device(opt, ours, norm)
            finally:
                monkeypatch.setattr(torch.Tensor, "__bool__", bool_of)
            assert torch.equal(flat(ours), flat(theirs)), (clip, scale, norm)
            if clip and not (torch.isfinite(norm) and norm >= 0):
                assert not flat(ours).any()                  # clipped as if infinite
            elif clip and norm == 3.0:
                assert not torch.equal(flat(ours), flat(grads))     # clipped
    assert reads == []


def test_the_norms_gradients_are_deepspeeds_selection_decided_once_per_parameter_list():
    """`zero_norm._selected`: the gradients DeepSpeed's per-tensor loop counts (alignment
    padding left out, pipeline-replicated parameters left out, on a model-parallel rank other
    than 0 only the model-parallel parameters), the choice per parameter made once for a
    parameter list and made again for another list or the same list with other parameters."""
    import types

    from deepspeed.runtime.zero import stage_1_and_2 as zero12

    from dsfm.runtime.zero_norm import _selected

    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(4)]
    params[1].ds_pipe_replicated = True
    params[2].model_parallel = True
    grads = [torch.full((2,), float(i)) for i in range(4)]
    pad = torch.zeros(3)
    pad._zero_padding = True

    def values(got):
        return [float(g[0]) for g in got]

    opt = types.SimpleNamespace(model_parallel_rank=0)
    assert values(_selected(opt, zero12, grads[:2] + [pad] + grads[2:], params)) == [0, 2, 3]
    params[0].ds_pipe_replicated = True       # decided for this list already: kept
    assert values(_selected(opt, zero12, grads, params)) == [0, 2, 3]
    params[0] = torch.nn.Parameter(torch.zeros(2))    # another parameter in the list
    assert values(_selected(opt, zero12, grads, params)) == [0, 2, 3]
    params[0].ds_pipe_replicated = True
    assert values(_selected(opt, zero12, grads, list(params))) == [2, 3]   # another list
    rank1 = types.SimpleNamespace(model_parallel_rank=1)
    assert values(_selected(rank1, zero12, grads, params)) == [2]
