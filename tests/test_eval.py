"""Loss and metrics on fields with known answers."""

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
