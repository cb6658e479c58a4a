"""ZeRO-1/2's gradient norm in a few multi-tensor operators instead of two per tensor.

DeepSpeed's ZeRO-1/2 optimizer (0.19) computes the global gradient norm for clipping one
gradient at a time: for each of the rank's gradients it makes a float64 copy of the tensor and
takes its norm, then stacks the norms (`get_grad_norm_direct`). AViT-B has 439 parameter
tensors, L 859, so that is 880 to 1,700 operators per step (and a float64 copy of every
gradient, twice the memory traffic of the norm itself), and they run
after the end of the backward, where ZeRO-2 with `overlap_comm` synchronizes the device: the GPU
waits while the host issues them one by one. Plain PyTorch's `clip_grad_norm_` does the same
sum with one multi-tensor norm (`torch._foreach_norm`).

`fuse_grad_norm(engine)` gives the engine's ZeRO-1/2 optimizer a `get_grad_norm_direct` that
keeps DeepSpeed's selection of gradients (alignment padding, pipeline-replicated and
model-parallel parameters), its reductions over the data- and model-parallel groups and its
invalid-norm sentinel (-1 for inf or NaN), and replaces only the per-tensor loop: one
`_foreach_norm` of the selected gradients, accumulated in DeepSpeed's norm dtype (float64) as
DeepSpeed's are, but inside the multi-tensor kernel (PyTorch's CUDA kernel accumulates in the
requested output type) instead of over a float64 copy of each tensor. The result equals
DeepSpeed's up to the order of the float64 sums (tests/runtime/test_zero_norm.py).
Anything else (the infinity norm, CPU offload, ZeRO-3) keeps DeepSpeed's own code.
"""

from __future__ import annotations

import types

import torch

_ORIGINAL = "_dsfm_original_grad_norm"


def fuse_grad_norm(engine) -> str | None:
    """Install the multi-tensor gradient norm on `engine`'s ZeRO-1/2 optimizer; returns None if
    installed, else why not (another optimizer, a DeepSpeed without the expected helpers)."""
    try:
        from deepspeed.runtime.zero import stage_1_and_2 as zero12
    except ImportError as exc:                        # pragma: no cover - DeepSpeed is a dependency
        return f"DeepSpeed's ZeRO-1/2 module is missing ({exc})"
    opt = getattr(engine, "optimizer", None)
    if not isinstance(opt, zero12.DeepSpeedZeroOptimizer):
        return f"the optimizer is {type(opt).__name__}, not ZeRO-1/2's"
    needed = ("get_accelerator", "get_norm_dtype", "mask_nan_or_inf_with_val_inplace",
              "is_model_parallel_parameter", "PIPE_REPLICATED", "dist")
    missing = [n for n in needed if not hasattr(zero12, n)]
    missing += [n for n in ("get_grad_norm_direct", "_model_parallel_all_reduce",
                            "dp_process_group", "model_parallel_rank") if not hasattr(opt, n)]
    if missing:
        return "this DeepSpeed's ZeRO-1/2 optimizer lacks " + ", ".join(missing)
    if getattr(opt, "cpu_offload", False):
        return "the optimizer is offloaded to the CPU (DeepSpeed's own norm path)"
    if not hasattr(opt, _ORIGINAL):
        setattr(opt, _ORIGINAL, opt.get_grad_norm_direct)
        opt.get_grad_norm_direct = types.MethodType(_grad_norm, opt)
    return None


def is_fused(engine) -> bool:
    return hasattr(getattr(engine, "optimizer", None), _ORIGINAL)


def _selected(opt, zero12, gradients, params) -> list[torch.Tensor]:
    """The gradients DeepSpeed's loop counts: alignment padding left out, pipeline-replicated
    parameters once, parameters not split across model-parallel ranks on model-parallel rank 0
    only."""
    replicated = zero12.PIPE_REPLICATED
    out = []
    grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
    for g, p in zip(grads, params):
        if hasattr(p, replicated) and p.ds_pipe_replicated:
            continue
        if zero12.is_model_parallel_parameter(p) or opt.model_parallel_rank == 0:
            out.append(g.detach())
    return out


def _grad_norm(opt, gradients, params, norm_type=2):
    """`DeepSpeedZeroOptimizer.get_grad_norm_direct` for the 2-norm, with one `_foreach_norm`
    in place of a float64 copy and a norm per gradient."""
    from deepspeed.runtime.zero import stage_1_and_2 as zero12

    if float(norm_type) != 2.0:
        return getattr(opt, _ORIGINAL)(gradients, params, norm_type)
    device = zero12.get_accelerator().current_device_name()
    grads = _selected(opt, zero12, gradients, params)
    if grads:
        if len({g.device for g in grads}) > 1:      # not ZeRO-1/2 on one device: DeepSpeed's
            return getattr(opt, _ORIGINAL)(gradients, params, norm_type)
        # each tensor's sum of squares accumulated in DeepSpeed's norm dtype (float64 where the
        # device has it) inside the multi-tensor kernel, without a converted copy of the tensor
        norms = torch._foreach_norm(grads, 2.0, dtype=zero12.get_norm_dtype())
        total = torch.stack(norms).to(device).pow(2).sum().float()
    else:
        total = torch.tensor(0.0, dtype=torch.float32).to(opt.device)
    zero12.dist.all_reduce(total, op=zero12.dist.ReduceOp.SUM, group=opt.dp_process_group)
    opt._model_parallel_all_reduce(tensor=total, op=zero12.dist.ReduceOp.SUM)
    total = total.pow(0.5)
    zero12.mask_nan_or_inf_with_val_inplace(total, device=opt.device)
    return total
