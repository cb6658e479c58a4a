"""ZeRO-2 on one rank without DeepSpeed's per-gradient reduction machinery.

DeepSpeed's ZeRO-1/2 optimizer (0.19) hooks every parameter: as each gradient is accumulated,
a Python hook copies it into a reduction bucket (one copy per tensor); each full bucket, and the
last one at the end of the backward, is divided by the world size, flattened, reduced and
copied back, and every gradient of the rank's partition is copied again, out of the bucket into
a partition buffer (a second copy per tensor). With `overlap_comm` the host synchronizes the
device before each bucket's reduction and again at the end of the backward. On one rank each of
these steps leaves the values as they were (a division by 1, a reduction over one rank, exact
copies), yet a step of AViT-B paid 800 copies, 398 Python hooks and three device
synchronizations for them (AViT-L twice the copies and hooks): on one H200, ZeRO-2 steps took up
to twice as long as plain PyTorch's, the GPU idle half of the time.

`keep_local_gradients(engine)`, where the data-parallel group has one rank, removes those hooks
and takes the gradients where autograd leaves them: DeepSpeed's end-of-backward step
(`independent_gradient_partition_epilogue`) is replaced by one that collects `param.grad` into
the optimizer's gradient lists with DeepSpeed's own helpers (`get_all_grad_tensors`,
`get_flat_partition`), accumulated over micro-batches as DeepSpeed accumulates them, and clears
`param.grad` as DeepSpeed does. After each update DeepSpeed also points every parameter at its
place in the flat weight buffer again ("TODO: we probably don't need this? just to be safe"),
two assignments per parameter tensor (1.8 ms of host time a step for AViT-B's 439 on a CPU);
here only a parameter that is not there already is pointed at it. The step (norm, clipping,
overflow check, optimizer, fp32 master weights), the optimizer state and the checkpoints are
DeepSpeed's own and get the same values (tests/runtime/test_zero_local.py). With more than one
rank, or anything that makes the one-rank reduction more than the identity (a communication
dtype other than the gradients', sequence parallelism, a gradient pre-divide factor, mixture
of experts, fp32 accumulation of 16-bit gradients) or reduces gradients another way (CPU
offload, ZenFlow, pipeline parallelism, DeepCompile), DeepSpeed's own code is kept.
"""

from __future__ import annotations

import types

import torch

_INSTALLED = "_dsfm_local_gradients"


def keep_local_gradients(engine) -> str | None:
    """Where `engine` is a one-rank ZeRO-2 engine, drop its per-parameter gradient hooks and
    collect the gradients at the end of the backward; returns None if installed, else why
    not."""
    from deepspeed.runtime.zero import stage_1_and_2

    opt = getattr(engine, "optimizer", None)
    if type(opt) is not stage_1_and_2.DeepSpeedZeroOptimizer:
        return f"the optimizer is {type(opt).__name__}, not DeepSpeed's ZeRO-1/2 optimizer"
    if hasattr(opt, _INSTALLED):
        return None
    needed = ("_grad_acc_hooks", "bit16_groups", "bit16_groups_flat", "round_robin_bit16_groups",
              "round_robin_bit16_meta", "round_robin_bit16_offsets",
              "_update_model_bit16_weights", "params_in_partition", "params_not_in_partition",
              "all_grad_tensors", "averaged_gradients", "first_offset", "partition_size",
              "get_all_grad_tensors", "get_flat_partition", "_release_ipg_buffers",
              "_clear_param_grad_only", "is_gradient_accumulation_boundary",
              "gradient_accumulation_dtype", "dp_process_group", "real_dp_process_group",
              "get_param_comm_dtype", "_use_compact_grad_partition_buffer",
              "independent_gradient_partition_epilogue",
              "reduce_ready_partitions_and_remove_grads", "flatten_dense_tensors_aligned",
              "_get_preflattened_grad_partition")
    missing = [n for n in needed if not hasattr(opt, n)]
    if missing or not hasattr(stage_1_and_2, "get_accelerator"):
        return "this DeepSpeed's ZeRO-1/2 optimizer lacks " + ", ".join(
            missing or ["get_accelerator"])
    why = _not_one_rank(engine, opt, stage_1_and_2.dist)
    if why:
        return why
    for handle in opt._grad_acc_hooks:
        handle.remove()
    opt._grad_acc_hooks.clear()
    opt.independent_gradient_partition_epilogue = types.MethodType(_collect_gradients, opt)
    # DeepSpeed's other callers of the per-parameter step (its coalesced-reduction flush):
    # the gradient stays where autograd put it, for the epilogue above to collect
    opt.reduce_ready_partitions_and_remove_grads = types.MethodType(_leave_in_place, opt)
    opt._update_model_bit16_weights = types.MethodType(_point_weights, opt)
    setattr(opt, _INSTALLED, True)
    return None


def is_local(engine) -> bool:
    return hasattr(getattr(engine, "optimizer", None), _INSTALLED)


def _not_one_rank(engine, opt, dist) -> str | None:
    """Why DeepSpeed's reduction of `opt`'s gradients is not the identity (None if it is)."""
    groups = [opt.dp_process_group, *opt.real_dp_process_group]
    if any(dist.get_world_size(group=g) != 1 for g in groups):
        return "the data-parallel group has more than one rank"
    flags = {"partition_gradients": False, "cpu_offload": True, "zenflow": True,
             "has_moe_layers": True, "use_grad_accum_attribute": True}
    wrong = [n for n, bad in flags.items() if getattr(opt, n, bad) == bad]
    if wrong:
        return "the ZeRO optimizer has " + ", ".join(
            f"{n}={getattr(opt, n, None)}" for n in wrong)
    if getattr(opt, "sequence_parallel_size", 1) != 1:
        return "sequence parallelism divides the reduced gradients"
    if getattr(opt, "gradient_predivide_factor", 1.0) != 1.0:
        return "a gradient_predivide_factor rescales the reduced gradients"
    if getattr(opt, "autoep_folding_tp_group", None) is not None:
        return "AutoEP's tensor-parallel gradient correction runs in the reduction hooks"
    if getattr(engine, "pipeline_parallelism", False):
        return "pipeline parallelism reduces gradients its own way"
    if getattr(engine, "is_deepcompile_enabled", lambda: False)():
        return "DeepCompile replaces the reduction hooks itself"
    params = [p for group in opt.bit16_groups for p in group]
    if any(opt.get_param_comm_dtype(p) != p.dtype for p in params):
        return "gradients are communicated in another dtype (rounded by the reduction)"
    if any(opt._use_compact_grad_partition_buffer(i) for i in range(len(opt.bit16_groups))):
        return "gradients accumulate in fp32 partition buffers of their own"
    if any(opt.params_not_in_partition[i] for i in range(len(opt.bit16_groups))):
        return "some parameters lie outside this rank's partition"
    if any(hasattr(p, "ds_grad_is_ready") for p in params):
        return "parameters mark their gradients ready themselves (ds_grad_is_ready)"
    return None


def _collect_gradients(opt) -> None:
    """`independent_gradient_partition_epilogue` on one rank: the gradients in `param.grad`
    (zeros for a parameter without one) are the reduced gradients; added to those of earlier
    micro-batches, and at the accumulation boundary laid out as the step expects them, by
    DeepSpeed's own helpers; then `param.grad` cleared, as DeepSpeed clears it."""
    from deepspeed.runtime.zero.stage_1_and_2 import get_accelerator

    boundary = opt.is_gradient_accumulation_boundary()
    dtype = opt.gradient_accumulation_dtype
    for i, params in enumerate(opt.params_in_partition):
        grads = opt.get_all_grad_tensors(params, dtype=dtype)
        if opt.all_grad_tensors.get(i) is None:
            opt.all_grad_tensors[i] = grads
        else:
            for total, grad in zip(opt.all_grad_tensors[i], grads):
                total.add_(grad)
        if boundary:
            grads = opt.get_flat_partition(
                params, opt.first_offset[i], opt.partition_size[i], dtype=dtype,
                device=get_accelerator().current_device_name(), param_group_idx=i,
                return_tensor_list=True)
            # the step's flat gradient, made here as the step would make it (its one rank is
            # the last partition): issued while the device still runs the backward, where
            # the step issued these few hundred views and the copy after it had read the
            # norm on the host, the device idle meanwhile (1.3 ms for AViT-B on an H200)
            opt.averaged_gradients[i] = _Flattened(
                grads, opt.flatten_dense_tensors_aligned(grads, int(opt.partition_size[i])))
            opt.all_grad_tensors[i] = None
    opt._release_ipg_buffers()
    opt._clear_param_grad_only()
    opt._epilogue_ran_this_backward = True


class _Flattened(list):
    """A group's gradients (the norm reads them one by one) with their flat copy, which the
    step takes instead of flattening them itself (DeepSpeed's `flat_partition`). Not views of
    the copy: a few hundred views a step are host time (about 2.6 ms for AViT-B) where the
    step is host-bound, for no memory (the gradients and their copy live together until the
    step either way, as in DeepSpeed's own step).

    The copy is made at the end of the backward, so a gradient changed between the backward
    and the step would reach the norm but not the update. DeepSpeed's API for that,
    `safe_set_full_grad` (and `safe_get_full_grad`), takes a gradient out of this list by its
    index, and writes through `.data`, which no version counter sees; so once an element has
    been taken by index (or the list changed) the copy is made again from the gradients when
    the step asks for it. The step's own reads (the norm) iterate and take nothing by index."""

    def __init__(self, grads, flat):
        super().__init__(grads)
        self._flat = flat
        self._stale = False

    def __getitem__(self, index):
        self._stale = True
        return super().__getitem__(index)

    def __setitem__(self, index, value):
        self._stale = True
        super().__setitem__(index, value)

    @property
    def flat_partition(self):
        if self._stale:
            grads = list.__iter__(self)
            flat = torch.cat([g.reshape(-1).to(self._flat.dtype) for g in grads])
            self._flat.narrow(0, 0, flat.numel()).copy_(flat)
            self._stale = False
        return self._flat


def _leave_in_place(opt, param, i) -> None:
    return None


def _point_weights(opt, group_index: int) -> None:
    """`_update_model_bit16_weights`: every parameter of the group viewing its place in the
    group's flat buffer. DeepSpeed assigns each its view again after every step, then each its
    own data a second time (its round-robin list holds the same parameters); here only a
    parameter that does not view its place (the buffer moved by `offload_states` and
    `reload_states`, or data assigned from outside) is assigned. A parameter views its place
    if its data starts at the place's address with the place's shape and dtype (addresses are
    unique across the host and the devices under CUDA's unified addressing); the addresses are
    worked out once per buffer address, not for every parameter after every step (host time:
    0.2 ms a step for AViT-B's 439 parameters, where the TF32 step is host-bound)."""
    flat = opt.bit16_groups_flat[group_index]
    places = opt.__dict__.setdefault("_dsfm_weight_places", {})
    key = (flat.data_ptr(), flat.dtype, flat.device, flat.numel())
    known = places.get(group_index)
    if known is None or known[0] != key:
        base, size = flat.data_ptr(), flat.element_size()
        known = places[group_index] = (key, [
            (base + offset * size, meta.shape)
            for meta, offset in zip(opt.round_robin_bit16_meta[group_index],
                                    opt.round_robin_bit16_offsets[group_index])])
    dtype = flat.dtype
    for i, (p, (address, shape)) in enumerate(zip(opt.round_robin_bit16_groups[group_index],
                                                  known[1])):
        if p.data_ptr() != address or p.shape != shape or p.dtype != dtype:
            meta = opt.round_robin_bit16_meta[group_index][i]
            offset = opt.round_robin_bit16_offsets[group_index][i]
            p.data = flat.narrow(0, offset, meta.numel()).view(meta.shape).data
