"""The device-side guard of a non-finite loss (dsfm.runtime.nonfinite): a finite loss runs its
backward unchanged, a non-finite one always leaves NaN gradients for ZeRO's step to skip."""

import pytest
import torch

from dsfm.eval import nmse
from dsfm.runtime.nonfinite import guard


def _grads(loss_of, w):
    w = w.detach().clone().requires_grad_(True)
    loss = loss_of(w)
    backward_loss, finite = guard(loss)
    backward_loss.backward()
    return loss.detach(), backward_loss.detach(), finite, w.grad


def test_a_finite_loss_and_its_gradients_are_unchanged_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=g)
    x, y = torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)

    def loss_of(w):
        return nmse((x @ w.t())[:, :, None], y[:, :, None])

    loss, guarded, finite, grad = _grads(loss_of, w)
    ref = w.detach().clone().requires_grad_(True)
    loss_of(ref).backward()
    assert bool(finite) and finite.dtype == torch.bool and finite.shape == loss.shape
    assert torch.equal(guarded, loss)
    assert torch.equal(grad, ref.grad)


@pytest.mark.parametrize("bad", ["inf_with_finite_gradients", "nan"])
def test_a_non_finite_loss_leaves_every_gradient_nan(bad):
    """A residual of 1e20 squares to inf in fp32 while its gradient (2e20) is finite: clipping
    would have scaled it to a finite update. Through the guard every gradient is NaN."""
    w = torch.ones(4)
    big = torch.tensor([1e20, 0.0, 0.0, 0.0]) if bad.startswith("inf") else \
        torch.tensor([float("nan"), 0.0, 0.0, 0.0])

    def loss_of(w):
        return ((w + big) ** 2).sum()

    plain = w.clone().requires_grad_(True)
    loss_of(plain).backward()
    if bad.startswith("inf"):
        assert torch.isfinite(plain.grad).all()          # the hole the guard closes
    loss, guarded, finite, grad = _grads(loss_of, w)
    assert not bool(finite) and not torch.isfinite(loss)
    assert torch.isnan(guarded) and torch.isnan(grad).all()


def test_the_guard_reads_nothing_on_the_host():
    """No `.item()`/`bool()` inside: a tensor subclass that refuses to be read passes."""
    class Unreadable(torch.Tensor):
        def __bool__(self):
            raise AssertionError("read on the host")
        item = __float__ = __bool__

    loss = torch.tensor(2.0, requires_grad=True).as_subclass(Unreadable)
    guarded, finite = guard(loss)
    assert isinstance(finite, torch.Tensor)
    assert torch.equal(guarded.as_subclass(torch.Tensor), torch.tensor(2.0))
