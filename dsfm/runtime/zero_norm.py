"""ZeRO's gradient norm in a few multi-tensor operators instead of two per tensor.

DeepSpeed's ZeRO optimizers (0.19) compute the global gradient norm for clipping one gradient
at a time: for each of the rank's gradients they make a float64 copy of the tensor and take its
norm, then stack the norms (`get_grad_norm_direct`, in ZeRO-1/2 and in ZeRO-3 alike). AViT-B
has 439 parameter tensors, L 859, so that is 880 to 1,700 operators per step (and a float64 copy
of every gradient, twice the memory traffic of the norm itself), and they run after the end of
the backward, where ZeRO with `overlap_comm` synchronizes the device: the GPU waits while the
host issues them one by one. Plain PyTorch's `clip_grad_norm_` does the same sum with one
multi-tensor norm (`torch._foreach_norm`).

`fuse_grad_norm(engine)` gives the engine's ZeRO optimizer a `get_grad_norm_direct` that keeps
DeepSpeed's selection of gradients (ZeRO-1/2: alignment padding, pipeline-replicated
parameters; both: model-parallel parameters, and in ZeRO-3 the ranks that each hold their own
partition), its reductions over the data-, model- and expert-parallel groups and its
invalid-norm sentinel (-1 for inf or NaN), and replaces only the per-tensor loop: one
`_foreach_norm` of the selected gradients, accumulated in DeepSpeed's norm dtype (float64) as
DeepSpeed's are, but inside the multi-tensor kernel (PyTorch's CUDA kernel accumulates in the
requested output type) instead of over a float64 copy of each tensor. The result equals
DeepSpeed's up to the order of the float64 sums (tests/runtime/test_zero_norm.py).
Anything else (the infinity norm, optimizer offload, gradients on several devices) keeps
DeepSpeed's own code.
"""

from __future__ import annotations

import types
from operator import is_

import torch

_ORIGINAL = "_dsfm_original_grad_norm"


def fuse_grad_norm(engine) -> str | None:
    """Install the multi-tensor gradient norm on `engine`'s ZeRO optimizer; returns None if
    installed, else why not (another optimizer, offload, a DeepSpeed without the expected
    helpers)."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    opt = getattr(engine, "optimizer", None)
    if isinstance(opt, stage_1_and_2.DeepSpeedZeroOptimizer):
        module, base, fused, stage = (stage_1_and_2, stage_1_and_2.DeepSpeedZeroOptimizer,
                                      _grad_norm_12, "ZeRO-1/2")
        helpers = ("PIPE_REPLICATED",)
        methods = ("_model_parallel_all_reduce", "dp_process_group", "clip_grad",
                   "loss_scale", "unscale_and_clip_grads")
        offloaded = getattr(opt, "cpu_offload", False)
    elif isinstance(opt, stage3.DeepSpeedZeroOptimizer_Stage3):
        module, base, fused, stage = (stage3, stage3.DeepSpeedZeroOptimizer_Stage3,
                                      _grad_norm_3, "ZeRO-3")
        helpers = ("pg_utils",)
        methods = ("_model_parallel_all_reduce", "_assert_same_partition_group",
                   "_get_param_partition_group", "_grad_norm_counts_every_rank",
                   "_autoep_expert_parallel_group")
        offloaded = getattr(opt, "offload_optimizer", False)
    else:
        return f"the optimizer is {type(opt).__name__}, not ZeRO's"
    missing = [n for n in ("get_accelerator", "get_norm_dtype", "is_model_parallel_parameter",
                           "dist") + helpers if not hasattr(module, n)]
    missing += [n for n in ("get_grad_norm_direct", "model_parallel_rank", "device") + methods
                if not hasattr(opt, n)]
    if missing:
        return f"this DeepSpeed's {stage} optimizer lacks " + ", ".join(missing)
    if offloaded:
        return f"the {stage} optimizer is offloaded to the CPU (DeepSpeed's own norm path)"
    if type(opt).get_grad_norm_direct is not base.get_grad_norm_direct:
        return f"{type(opt).__name__} has a gradient norm of its own"
    if not hasattr(opt, _ORIGINAL):
        setattr(opt, _ORIGINAL, opt.get_grad_norm_direct)
        opt.get_grad_norm_direct = types.MethodType(fused, opt)
        if (base is stage_1_and_2.DeepSpeedZeroOptimizer
                and type(opt).unscale_and_clip_grads is base.unscale_and_clip_grads):
            opt.unscale_and_clip_grads = types.MethodType(_clip_on_device, opt)
    return None


def keep_plain_norm(engine) -> bool:
    """Without ZeRO, in fp32, DeepSpeed's engine clips the gradients with its `clip_grad_norm_`
    and drops the norm that returns, so `get_global_grad_norm()` stays None (0.19). Keep it: the
    same call, its result stored where the engine reports it from. Returns whether installed."""
    from deepspeed.runtime import engine as ds_engine

    needed = ("zero_optimization", "fp16_enabled", "bfloat16_enabled", "gradient_clipping",
              "clip_fp32_gradients", "module", "mpu")
    if (not all(hasattr(engine, n) for n in needed) or not hasattr(ds_engine, "clip_grad_norm_")
            or engine.zero_optimization() or engine.fp16_enabled()
            or engine.bfloat16_enabled() or not engine.gradient_clipping() > 0):
        return False

    def clip_fp32_gradients(self):
        self._global_grad_norm = ds_engine.clip_grad_norm_(
            parameters=self.module.parameters(), max_norm=self.gradient_clipping(), mpu=self.mpu)

    engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)
    return True


def is_fused(engine) -> bool:
    return hasattr(getattr(engine, "optimizer", None), _ORIGINAL)


def _selected(opt, zero12, gradients, params) -> list[torch.Tensor]:
    """The gradients DeepSpeed's loop counts: alignment padding left out, pipeline-replicated
    parameters once, parameters not split across model-parallel ranks on model-parallel rank 0
    only. Which parameters count is decided once per parameter list (the optimizer's, the same
    objects every step: compared by identity, a list of a few hundred in microseconds), as the
    step is host-bound in TF32: asked of every parameter every step it was a fifth of a
    millisecond of host time for AViT-B's 439 (the not-detached gradients are read under
    `no_grad` by the caller, where a `detach` each was another tenth)."""
    cache = opt.__dict__.setdefault("_dsfm_norm_selection", {})
    known = cache.get(id(params))
    if known is None or len(known[0]) != len(params) or not all(map(is_, known[0], params)):
        replicated = zero12.PIPE_REPLICATED
        keep = [not (hasattr(p, replicated) and p.ds_pipe_replicated)
                and (zero12.is_model_parallel_parameter(p) or opt.model_parallel_rank == 0)
                for p in params]
        known = cache[id(params)] = (list(params), keep)
    grads = (g for g in gradients if not getattr(g, "_zero_padding", False))
    return [g for g, k in zip(grads, known[1]) if k]


def _grad_norm_12(opt, gradients, params, norm_type=2):
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
        with torch.no_grad():
            norms = torch._foreach_norm(grads, 2.0, dtype=zero12.get_norm_dtype())
            total = torch.stack(norms).to(device).pow(2).sum().float()
    else:
        total = torch.tensor(0.0, dtype=torch.float32).to(opt.device)
    zero12.dist.all_reduce(total, op=zero12.dist.ReduceOp.SUM, group=opt.dp_process_group)
    opt._model_parallel_all_reduce(tensor=total, op=zero12.dist.ReduceOp.SUM)
    return _invalid_as_minus_one(total.pow(0.5))


def _invalid_as_minus_one(norm: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's sentinel for an inf or NaN norm, -1, set on the device: its own helpers
    make the -1 a new device tensor from the host, a host-to-device copy that PyTorch
    synchronizes."""
    return norm.masked_fill(~torch.isfinite(norm), -1.0)


def _clip_on_device(opt, grad_groups_flat, total_norm):
    """`DeepSpeedZeroOptimizer.unscale_and_clip_grads` without its host read: DeepSpeed asks
    the host whether the norm is invalid (inf, NaN or the -1 sentinel) and then clips as if it
    were infinite; `step` has already asked the same of the same norm (and skipped the update
    if so), and this second read made the host wait for the device again before the update.
    Here the invalid norm is replaced by infinity on the device (`combined_scale`): the same
    scale, the same operations on the gradients, for `step` and for any other caller."""
    scale = combined_scale(opt, total_norm)
    if scale is None:
        return
    for grad in grad_groups_flat:
        for g in (grad if isinstance(grad, list) else [grad]):
            g.data.mul_(1. / scale)


def combined_scale(opt, total_norm):
    """What DeepSpeed's ZeRO-1/2 `unscale_and_clip_grads` divides the gradients by (the loss
    scale, times the clipping factor where clipping is on), an invalid norm (inf, NaN, the -1
    sentinel) taken as infinite on the device instead of on the host; None where it divides
    by nothing (no clipping, loss scale 1)."""
    from deepspeed.runtime.zero.stage_1_and_2 import is_invalid_grad_norm

    if opt.clip_grad == 0.0 and opt.loss_scale == 1.0:
        return None
    scale = opt.loss_scale
    if opt.clip_grad > 0.:
        clip_norm = total_norm
        if torch.is_tensor(clip_norm):
            invalid = ~torch.isfinite(clip_norm) | (clip_norm < 0)
            clip_norm = clip_norm.masked_fill(invalid, float("inf"))
        elif is_invalid_grad_norm(clip_norm):
            clip_norm = torch.tensor(float("inf"), dtype=torch.float, device=opt.device)
        clip = ((clip_norm / opt.loss_scale) + 1e-6) / opt.clip_grad
        clip = torch.clamp(clip, min=1.0)
        scale = clip * opt.loss_scale
    return scale


def _grad_norm_3(opt, gradients, params, norm_type=2):
    """`DeepSpeedZeroOptimizer_Stage3.get_grad_norm_direct` for the 2-norm, with one
    `_foreach_norm` in place of a float64 copy and a norm per gradient partition."""
    from deepspeed.runtime.zero import stage3 as z3

    original = getattr(opt, _ORIGINAL)
    device = z3.get_accelerator().device_name()
    if float(norm_type) != 2.0 or not gradients or len({g.device for g in gradients}) > 1 \
            or gradients[0].device.type != torch.device(device).type:
        return original(gradients, params, norm_type)
    opt._assert_same_partition_group(params)
    group = opt._get_param_partition_group(params[0])
    every_rank = opt._grad_norm_counts_every_rank(params, group)
    grads = [g.detach() for g, p in zip(gradients, params)
             if every_rank or z3.is_model_parallel_parameter(p) or opt.model_parallel_rank == 0]
    if grads:
        norms = torch._foreach_norm(grads, 2.0, dtype=z3.get_norm_dtype())
        total = torch.stack(norms).pow(2).sum()
    else:
        total = torch.tensor(0, dtype=gradients[0].dtype).to(device).to(z3.get_norm_dtype())
    z3.dist.all_reduce(total, op=z3.dist.ReduceOp.SUM, group=group)
    if not every_rank:
        opt._model_parallel_all_reduce(tensor=total, op=z3.dist.ReduceOp.SUM)
    experts = opt._autoep_expert_parallel_group(params)
    if z3.pg_utils.is_parallel(experts):
        z3.dist.all_reduce(total, op=z3.dist.ReduceOp.SUM, group=experts)
    return _invalid_as_minus_one(total ** 0.5)
