"""Loss and metrics on fields with known answers."""

import json
import math

import pytest
import torch

from dsfm.eval import MetricSums, field_errors, nmse, rollout


def test_nmse_is_per_sample_and_field_then_averaged():
    target = torch.zeros(2, 2, 4, 4)
    target[0, 0] = 1.0               # mean square 1
    target[0, 1] = 10.0              # mean square 100
    target[1] = 2.0                  # mean square 4
    pred = target.clone()
    pred[0, 0] += 1.0                # residual² 1 over 1   → 1
    pred[0, 1] += 1.0                # residual² 1 over 100 → 0.01
    pred[1] += 2.0                   # residual² 4 over 4   → 1
    assert nmse(pred, target).item() == pytest.approx((1 + 0.01 + 1 + 1) / 4, rel=1e-5)


def test_vrmse_is_one_for_the_spatial_mean_and_nrmse_scales_with_the_signal():
    g = torch.Generator().manual_seed(0)
    target = 5.0 + torch.randn(3, 2, 16, 16, generator=g, dtype=torch.float64)
    mean_pred = target.mean((-2, -1), keepdim=True).expand_as(target)
    nrmse, vrmse = field_errors(mean_pred, target)
    assert torch.allclose(vrmse, torch.ones_like(vrmse), atol=1e-6)
    assert (nrmse < 0.3).all()                   # the offset 5 dominates the RMS of the target
    nrmse0, vrmse0 = field_errors(target, target)
    assert (nrmse0 == 0).all() and (vrmse0 == 0).all()
    # both are scale-free: the same relative error in other units gives the same numbers
    n2, v2 = field_errors(1000 * mean_pred, 1000 * target)
    assert torch.allclose(v2, vrmse) and torch.allclose(n2, nrmse)


def test_rollout_feeds_predictions_back():
    calls = []

    def shift_model(window, field_ids, bcs):       # next state = last + 1, records its input
        calls.append(window[:, :, 0, 0, 0].clone())
        return window[:, -1] + 1.0

    x = torch.arange(3.0).view(1, 3, 1, 1, 1).expand(1, 3, 1, 2, 2).clone()
    out = rollout(shift_model, x, torch.tensor([0]), None, steps=3)
    assert out[0, :, 0, 0, 0].tolist() == [3.0, 4.0, 5.0]
    assert calls[-1][0].tolist() == [2.0, 3.0, 4.0]       # the window slid over predictions


def test_metric_sums_average_over_samples_and_steps():
    sums = MetricSums(["u", "v"], steps=2)
    target = torch.ones(4, 2, 2, 8, 8)
    pred = target.clone()
    pred[:, 1] += 0.5                              # error only on the second rollout step
    sums.add(pred, target)
    out = sums.summary()
    assert sums.count == 4
    assert out["u"]["nrmse_1step"] == 0.0
    assert math.isclose(out["u"]["nrmse_rollout2"], 0.25, rel_tol=1e-6)     # mean of 0 and 0.5
    flat = sums.packed()
    other = MetricSums(["u", "v"], steps=2)
    other.unpack(flat * 2)                          # as if summed over two ranks
    assert other.count == 8 and math.isclose(other.summary()["v"]["nrmse_rollout2"], 0.25,
                                                 rel_tol=1e-6)


def test_the_summary_ends_with_the_mean_over_fields_and_refuses_a_field_of_that_name():
    """The Well's per-dataset number is the mean of the per-field metrics: u has error 0.5 at
    both steps, v none at step 1 and 1.5 at step 2."""
    from dsfm.errors import ConfigError

    sums = MetricSums(["u", "v"], steps=2)
    target = torch.ones(3, 2, 2, 4, 4)
    pred = target.clone()
    pred[:, :, 0] += 0.5
    pred[:, 1, 1] += 1.5
    out = sums.summary(split_windows=7)
    assert list(out) == ["u", "v", "all_fields"]
    m = out["all_fields"]
    assert m["windows"] == 0 and m["split_windows"] == 7
    sums.add(pred, target)
    out = sums.summary(split_windows=7)
    m = out["all_fields"]
    assert m["windows"] == 3 and m["split_windows"] == 7
    assert m["nrmse_1step"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["nrmse_rollout2"] == pytest.approx(((0.5 + 0.5) / 2 + (0.0 + 1.5) / 2) / 2)
    assert m["vrmse_per_step"] == pytest.approx(
        [(a + b) / 2 for a, b in zip(out["u"]["vrmse_per_step"], out["v"]["vrmse_per_step"])])
    assert m["vrmse_rollout2"] == pytest.approx(sum(m["vrmse_per_step"]) / 2)
    with pytest.raises(ConfigError, match="all_fields"):
        MetricSums(["u", "all_fields"], steps=1)


def test_the_loss_in_physical_units_is_mpps_loss_on_the_raw_fields(demo_base):
    """The trainer's loss on z-scored batches (scale and shift from the loader) equals MPP's
    normalized MSE computed on the same windows read without normalization; on z-scored values
    alone it is a different loss wherever a field has a mean."""
    import os

    from dsfm.data.prefetch import WellLoader

    for name in ("shallow_water_2d", "euler_2d"):
        path = os.path.join(demo_base, name)
        kw = dict(batch_size=4, num_workers=1, seed=3, rank=0, world_size=1)
        with WellLoader([path], normalization="zscore", **kw) as zl, \
                WellLoader([path], normalization=None, **kw) as rl:
            zb, rb = next(iter(zl)), next(iter(rl))
            assert (zb.windows == rb.windows).all()
            scale, shift = zl.affine(name)
            assert scale is not None and shift is not None
            g = torch.Generator().manual_seed(0)
            raw_y = rb.y[:, 0].double()
            raw_pred = raw_y * 1.01 + 0.02 * raw_y.std() * torch.randn(raw_y.shape, generator=g,
                                                                       dtype=torch.float64)
            mpp = nmse(raw_pred, raw_y).item()
            pred = ((raw_pred - shift.double()) / scale.double()).float()
            ours = nmse(pred, zb.y[:, 0], scale=scale, shift=shift).item()
            assert ours == pytest.approx(mpp, rel=1e-4), name
            normalized = nmse(pred, zb.y[:, 0]).item()
            assert abs(normalized - mpp) > 0.1 * mpp, name     # the units matter here
            del zb, rb


def test_the_physical_loss_keeps_the_residual_of_a_small_fluctuation_on_a_large_mean():
    """Scaled normalized residuals, not the difference of two shifted fp32 values."""
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 1, 16, 16, generator=g)
    pred = target + 1e-3 * torch.randn(2, 1, 16, 16, generator=g)
    scale = torch.tensor([1e-2]).view(1, 1, 1)
    shift = torch.tensor([1000.0]).view(1, 1, 1)   # 1000 ± 0.01: residuals 1e-5, below fp32's
    exact = nmse(pred.double() * 1e-2 + 1000.0,    # spacing of 6e-5 at 1000
                 target.double() * 1e-2 + 1000.0).item()
    ours = nmse(pred, target, scale=scale, shift=shift).item()
    naive = nmse(pred * scale + shift, target * scale + shift).item()
    assert ours == pytest.approx(exact, rel=1e-5, abs=0)
    assert abs(naive - exact) > 0.5 * exact         # fp32 loses the residual there


def test_plan_eval_caps_at_one_pass_and_refuses_what_the_valid_split_cannot_serve(demo_base):
    import os

    from dsfm.data.prefetch import index_dataset
    from dsfm.errors import ConfigError
    from dsfm.eval import plan_eval

    path = os.path.join(demo_base, "euler_2d")
    source = index_dataset(path, "valid", 4, 2).source
    name, windows = source.name, len(source)
    assert name == "euler_2d" and windows > 8
    kw = dict(n_steps_input=4, rollout_steps=2, batch_size=2)
    assert plan_eval([path], batches=1, world_size=1, **kw) == {name: 1}
    assert plan_eval([path], batches=10 ** 6, world_size=2, **kw) == {name: windows // 2 // 2}
    with pytest.raises(ConfigError, match=r"train\.rollout_steps=40: .*time steps are not "
                                          r"enough.*lower train\.rollout_steps"):
        plan_eval([path], batches=1, world_size=1, n_steps_input=4, rollout_steps=40,
                  batch_size=2)
    with pytest.raises(ConfigError, match=f"{windows} windows.*{windows} ranks"):
        plan_eval([path], batches=1, world_size=windows, **kw)
    # a micro-batch larger than the split, which no rollout_steps can mend: the line says so
    with pytest.raises(ConfigError, match=rf"{windows} windows .*fewer than one micro-batch of "
                                          rf"{windows + 1} per rank with 1 ranks; lower train"
                                          r"\.rollout_steps or the micro-batch \("
                                          r"train_micro_batch_size_per_gpu"):
        plan_eval([path], batches=1, world_size=1, n_steps_input=4, rollout_steps=2,
                  batch_size=windows + 1)


def test_plan_eval_on_an_empty_or_missing_valid_split_names_the_setting(demo_base, tmp_path):
    """A dataset whose valid/ holds no file (`dsfm.sim --splits 8,0,1` writes one; the checker
    notes it) or is not there: the run's error said so but not how to train anyway."""
    import os
    import shutil

    from dsfm.errors import EmptySplitError
    from dsfm.eval import plan_eval

    path = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), path)
    for f in (path / "data" / "valid").iterdir():
        f.unlink()
    kw = dict(n_steps_input=4, rollout_steps=2, batch_size=2, batches=1, world_size=1)
    for what in ("no .h5 or .hdf5 files", "directory not found"):
        if what == "directory not found":
            (path / "data" / "valid").rmdir()
        with pytest.raises(EmptySplitError) as exc:
            plan_eval([str(path)], **kw)
        assert str(exc.value).startswith(f"evaluation on the valid split: {path}/data/valid: "
                                         f"{what}")
        assert str(exc.value).endswith("set train.eval_batches=0 to train without evaluation")


def test_the_physical_loss_holds_on_fields_of_any_magnitude():
    """Physical values span decades: squares of 1e20 overflow float32 and would make the loss
    NaN; the ratio is taken in float64 (for large values ε is negligible, so it equals the
    loss in normalized units)."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 3, 8, 8, generator=g)
    pred = target + 0.3 * torch.randn(2, 3, 8, 8, generator=g)
    plain = nmse(pred, target).item()
    big = nmse(pred, target, scale=torch.full((3, 1, 1), 1e20)).item()
    assert math.isfinite(big) and big == pytest.approx(plain, rel=1e-5)


def test_metrics_of_a_small_fluctuation_on_a_large_mean_are_exact():
    """Denormalized in float64: at 1000 ± 1e-4 float32's spacing (6e-5) is as large as the
    fluctuations and larger than the residuals (1e-5), which it would lose."""
    g = torch.Generator().manual_seed(2)
    target = torch.randn(3, 2, 1, 8, 8, generator=g)              # normalized, [B, k, C, H, W]
    pred = target + 0.1 * torch.randn(3, 2, 1, 8, 8, generator=g)
    scale, shift = torch.tensor([1e-4]).view(1, 1, 1), torch.tensor([1000.0]).view(1, 1, 1)
    sums = MetricSums(["h"], steps=2)
    sums.add(pred, target, scale, shift)
    exact = MetricSums(["h"], steps=2)
    exact.add(pred.double() * 1e-4 + 1000.0, target.double() * 1e-4 + 1000.0)
    assert torch.allclose(sums.vrmse, exact.vrmse, rtol=1e-9)
    lossy = MetricSums(["h"], steps=2)
    lossy.add(pred * scale + shift, target * scale + shift)        # float32 first
    assert not torch.allclose(lossy.vrmse, exact.vrmse, rtol=0.5)


def test_the_table_labels_the_rollout_mean_as_a_mean_and_shows_the_last_step():
    """Errors that grow over a 4-step rollout: the table's "@4" column is the error at step 4,
    and the mean over steps 1..4 is labelled as one (it once stood under "VRMSE@4")."""
    from dsfm.eval import format_table

    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 4, 1, 16, 16, generator=g, dtype=torch.float64)
    growth = torch.tensor([0.1, 0.2, 0.4, 0.8], dtype=torch.float64).view(1, 4, 1, 1, 1)
    pred = target + growth * torch.randn(target.shape, generator=g, dtype=torch.float64)
    sums = MetricSums(["u"], steps=4)
    sums.add(pred, target)
    m = sums.summary()["u"]
    head, _, row = format_table({"demo": {"u": m}}, 4).splitlines()
    table = dict(zip(head.split()[2:], map(float, row.split()[2:])))
    assert table["VRMSE@4"] == pytest.approx(m["vrmse_per_step"][3], abs=1e-4)
    assert table["VRMSE1-4"] == pytest.approx(m["vrmse_rollout4"], abs=1e-4)
    assert table["NRMSE1-4"] == pytest.approx(m["nrmse_rollout4"], abs=1e-4)
    assert table["VRMSE@1"] == pytest.approx(m["vrmse_1step"], abs=1e-4)
    assert m["vrmse_per_step"][3] > 1.5 * m["vrmse_rollout4"]     # the two differ here
    one = format_table({"demo": {"u": {**m, "nrmse_rollout1": 0.0, "vrmse_rollout1": 0.0}}}, 1)
    assert one.splitlines()[0].split()[2:] == ["NRMSE@1", "VRMSE@1", "windows"]


def test_evaluate_gives_the_wells_metrics_over_the_windows_it_says(demo_base):
    """evaluate() on the demo's valid split against a hand-written rollout scored by The Well's
    own NRMSE and VRMSE on the raw (never normalized) targets of the same windows: per window
    and field, averaged over windows, each counting once; the same windows in batches of 2 or
    3 give the same numbers, and the result says how many windows it averages, and of how many
    the split holds (it did not say the latter)."""
    import os
    from types import SimpleNamespace

    from the_well.benchmark.metrics.spatial import NRMSE, VRMSE

    from dsfm.data.fields import FieldVocabulary
    from dsfm.data.prefetch import WellLoader, index_dataset
    from dsfm.eval import evaluate
    from dsfm.models.avit import AViT, AViTConfig

    name, k = "euler_2d", 3
    path = os.path.join(demo_base, name)
    torch.manual_seed(0)
    model = AViT(AViTConfig(n_fields=5, dim=32, heads=2, blocks=1, drop_path=0.0)).eval()
    kw = dict(n_steps_input=4, rollout_steps=k, seed=5, rank=0, world_size=1,
              normalization="zscore")
    by2 = evaluate(model, [path], batch_size=2, batches=3, vocabulary=FieldVocabulary(), **kw)
    by3 = evaluate(model, [path], batch_size=3, batches=2, vocabulary=FieldVocabulary(), **kw)

    loader_kw = dict(split="valid", n_steps_input=4, n_steps_output=k, batch_size=6,
                     num_workers=1, seed=5, rank=0, world_size=1)
    with WellLoader([path], normalization="zscore", vocabulary=FieldVocabulary(),
                    **loader_kw) as zl, \
            WellLoader([path], normalization=None, vocabulary=FieldVocabulary(),
                       **loader_kw) as rl:
        zb, rb = next(iter(zl)), next(iter(rl))
        assert (zb.windows == rb.windows).all()
        scale, shift = zl.affine(name)
        channels = list(zl.datasets[0].source.channel_names)
        preds = []
        with torch.no_grad():
            for j in range(k):                 # inputs j..3 of x, then predictions 0..j-1
                window = torch.cat([zb.x[:, j:]] + [p[:, None] for p in preds], dim=1)
                assert window.shape[1] == 4
                preds.append(model(window, zb.field_ids, zb.bcs_host))
        pred = torch.stack(preds, 1).double() * scale.double() + shift.double()
        raw = rb.y.double()
    meta = SimpleNamespace(n_spatial_dims=2)
    pw, rw = pred.movedim(2, -1), raw.movedim(2, -1)        # The Well's [B, T, H, W, C]
    n_pts = raw.shape[-1] * raw.shape[-2]
    well_n = NRMSE()(pw, rw, meta).mean(0)                       # [k, C]
    well_v = VRMSE()(pw, rw, meta).mean(0) * math.sqrt(n_pts / (n_pts - 1))   # var over N
    assert list(by2[name]) == channels + ["all_fields"]
    split = len(index_dataset(path, "valid", 4, k).source)
    assert split > 6
    for c, field in enumerate(channels):
        for res in (by2, by3):
            m = res[name][field]
            assert m["windows"] == 6 and m["split_windows"] == split   # 6 of them evaluated
            assert m["nrmse_1step"] == pytest.approx(well_n[0, c].item(), rel=1e-5)
            assert m["vrmse_1step"] == pytest.approx(well_v[0, c].item(), rel=1e-5)
            assert m[f"nrmse_rollout{k}"] == pytest.approx(well_n[:, c].mean().item(), rel=1e-5)
            assert m[f"vrmse_rollout{k}"] == pytest.approx(well_v[:, c].mean().item(), rel=1e-5)
            assert m["vrmse_per_step"] == pytest.approx(well_v[:, c].tolist(), rel=1e-5)
    # the dataset's row: The Well's `full_` metrics, the mean over the fields
    for res in (by2, by3):
        m = res[name]["all_fields"]
        assert m["windows"] == 6 and m["split_windows"] == split
        assert m["nrmse_1step"] == pytest.approx(well_n[0].mean().item(), rel=1e-5)
        assert m["vrmse_1step"] == pytest.approx(well_v[0].mean().item(), rel=1e-5)
        assert m[f"nrmse_rollout{k}"] == pytest.approx(well_n.mean().item(), rel=1e-5)
        assert m[f"vrmse_rollout{k}"] == pytest.approx(well_v.mean().item(), rel=1e-5)
        assert m["vrmse_per_step"] == pytest.approx(well_v.mean(1).tolist(), rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metric_sums_stay_on_the_gpu_without_a_sync():
    """Evaluation's running sums: on a GPU they stay on the device (a copy to the host at each
    rollout step waited for the GPU, so the host could not issue the next batch meanwhile)."""
    sums = MetricSums(["a", "b"], 3)
    pred, target = torch.randn(2, 3, 2, 8, 8, device="cuda"), torch.randn(2, 3, 2, 8, 8,
                                                                       device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums.add(pred, target)
        sums.add(pred, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host = MetricSums(["a", "b"], 3)
    host.add(pred.cpu(), target.cpu())
    host.add(pred.cpu(), target.cpu())
    assert torch.allclose(sums.packed().cpu(), host.packed(), rtol=1e-12)


def test_evaluate_runs_a_zero3_engine_without_drop_path_and_restores_its_mode(demo_base):
    """A real single-rank ZeRO-3 engine (tests/eval_mode_probe.py) whose model has drop path
    0.5: two evaluations give the same numbers (drop path off, full parameters gathered), the
    model trains after them with drop path on again, and a model the caller put in evaluation
    mode stays there. The engine's own `training` flag, which DeepSpeed never changes, was read
    before: evaluate() put such a model back in training mode."""
    import os
    import sys

    from tests.conftest import run
    from tests.runtime.test_dist import _clean_env

    proc = run([sys.executable, "tests/eval_mode_probe.py", os.path.join(demo_base, "euler_2d")],
               env=_clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("EVALMODE ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads(line[0].split(" ", 1)[1]) == {
        "same": True, "trains_after": True, "drop_path_after": True, "eval_mode_kept": True}
