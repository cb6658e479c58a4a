"""A non-finite loss caught on the device, without a host read before each backward.

dsfm's trainer read every micro-batch's loss on the host before its backward (is it finite?
all-reduced over the ranks), so that a micro-batch whose loss was NaN or inf could be dropped.
That read makes the host wait for the end of the forward before it issues the backward: the
GPU idles while the host issues the backward's first kernels, once per micro-batch, and on
several ranks each micro-batch paid one more small collective.

Where the engine's own step already skips an update whose gradient norm is not finite
(DeepSpeed's ZeRO-1 and 2 with their gradient norm computed, ZeRO-3: `is_invalid_grad_norm`, all
ranks alike since the norm is reduced over them), no such read is needed. `guard(loss)`
multiplies the loss by 1 where it is finite and by NaN where it is not, on the device: a finite
loss and its gradients are unchanged bit for bit (times 1), and a non-finite loss always gives
NaN gradients, where an infinite loss can otherwise have finite ones (a residual of 1e20 squares
to inf, its gradient does not). The norm is then NaN, the step skips the update, and the trainer
reads the flags after the step (whose own read of the norm has already waited for the device),
only when the update was skipped, to say why. Should a step not skip one after all, the
trainer's count of non-finite losses in steps that were not skipped (on the device, read at log
steps and before each checkpoint) stops the run before it saves.

The unit of a skip is the update, as in Megatron-LM and DeepSpeed's own loss scaler: with
gradient accumulation, one non-finite micro-batch drops the update of all of them. Without
ZeRO (stage 0) DeepSpeed clips and steps whatever the gradients, so the trainer keeps the read
before the backward there (`skips_nonfinite_updates` says why not).
"""

from __future__ import annotations

import torch


def skips_nonfinite_updates(engine) -> str | None:
    """None if `engine.step()` skips an update whose gradients are not finite (on every rank
    alike), else why not."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    opt = getattr(engine, "optimizer", None)
    if isinstance(opt, stage3.DeepSpeedZeroOptimizer_Stage3):
        return None                               # the norm is always taken, and checked
    if not isinstance(opt, stage_1_and_2.DeepSpeedZeroOptimizer):
        return f"the optimizer is {type(opt).__name__}, not ZeRO's: it steps whatever the norm"
    if type(opt) is not stage_1_and_2.DeepSpeedZeroOptimizer:
        # ZenFlow's (a subclass) applies some updates inside the backward, unchecked
        return f"the optimizer is {type(opt).__name__}, not ZeRO-1/2's own"
    if getattr(opt, "check_grad_overflow", False):
        return None                               # the loss scaler's overflow check
    if not getattr(opt, "compute_grad_norm", True):
        return "zero_optimization.compute_grad_norm is false: no norm to find invalid"
    if getattr(opt, "dtype", torch.float32) == torch.bfloat16:
        return "bf16 ZeRO-1/2 checks the norm only with check_grad_overflow"
    return None


def guard(loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to run the backward of, whether it is finite), both on the loss's device and
    without reading either: the first is `loss` times 1 where finite (the same value and
    gradients) and times NaN where not (NaN gradients everywhere the loss reaches)."""
    finite = torch.isfinite(loss.detach())
    factor = torch.where(finite, 1.0, float("nan")).to(loss.dtype)
    return loss * factor, finite
