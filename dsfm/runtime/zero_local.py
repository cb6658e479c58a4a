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
DeepSpeed's and get the same values (tests/runtime/test_zero_local.py). With more than one
rank, or anything that makes the one-rank reduction more than the identity (a communication
dtype other than the gradients', sequence parallelism, a gradient pre-divide factor, mixture
of experts, fp32 accumulation of 16-bit gradients) or reduces gradients another way (CPU
offload, ZenFlow, pipeline parallelism, DeepCompile), DeepSpeed's own code is kept.

DeepSpeed's step then flattens the gradients into one fp32 copy (as large as the model, made by
a batched copy of every gradient: 1.15 ms of AViT-B's step on an H200) to run the optimizer on
one flat tensor against its flat fp32 weights. Where the update is elementwise (DeepSpeed's
FusedAdam, a GPU's; torch's Adam and AdamW where asked for) and the run is fp32,
`update_from_gradients(engine)` (installed by `keep_local_gradients`) makes the step run the
optimizer on the gradients where they lie against the matching pieces of the flat weights and
optimizer state: the same arithmetic, element for element, without the copy or its memory.
The norm, the skip of an update whose norm is not finite, the clipping's scale, the
optimizer's state and step count, the fp32 weights copied to the model's and the checkpoints
stay DeepSpeed's, with the same values bit for bit (tests/runtime/test_zero_local.py; the
first update, which creates the optimizer's state, is DeepSpeed's own step).
"""

from __future__ import annotations

import types

import torch

_INSTALLED = "_dsfm_local_gradients"
_LIST_STEP = "_dsfm_update_from_gradients"
_PIECES, _LENT = "_dsfm_update_pieces", "_dsfm_lent_piece_states"


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
    update_from_gradients(engine)           # where the update allows (else DeepSpeed's step)
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
            # norm on the host, the device idle meanwhile (1.3 ms for AViT-B on an H200).
            # Not made at all where the update runs on the gradients themselves (`_step`)
            opt.averaged_gradients[i] = _Flattened(
                grads, int(opt.partition_size[i]), opt.flatten_dense_tensors_aligned,
                eager=not hasattr(opt, _LIST_STEP))
            opt.all_grad_tensors[i] = None
    opt._release_ipg_buffers()
    opt._clear_param_grad_only()
    opt._epilogue_ran_this_backward = True


class _Flattened(list):
    """A group's gradients (the norm reads them one by one, and `_step` updates from them)
    with their flat copy for a step that takes it (DeepSpeed's own, `flat_partition`): made at
    the end of the backward (`eager`) or when first asked for. Not views of the copy: a few
    hundred views a step are host time (about 2.6 ms for AViT-B) where the step is host-bound,
    for no memory (the gradients and their copy live together until the step either way, as
    in DeepSpeed's own step).

    A gradient changed between the backward and the step must reach the update. DeepSpeed's
    API for that, `safe_set_full_grad` (and `safe_get_full_grad`), takes a gradient out of this
    list by its index, and writes through `.data`, which no version counter sees; so once an
    element has been taken or replaced by index the copy is made again from the gradients when
    the step asks for it. The step's own reads iterate and take nothing by index."""

    def __init__(self, grads, size: int, flatten, eager: bool):
        super().__init__(grads)
        self._size, self._flatten = size, flatten
        self._flat = flatten(grads, size) if eager else None
        self._stale = False

    def __getitem__(self, index):
        self._stale = True
        return super().__getitem__(index)

    def __setitem__(self, index, value):
        self._stale = True
        super().__setitem__(index, value)

    @property
    def flat_partition(self):
        if self._flat is None:
            self._flat = self._flatten(list(list.__iter__(self)), self._size)
        elif self._stale:
            grads = list(list.__iter__(self))
            n = sum(g.numel() for g in grads)
            torch.cat([g.reshape(-1).to(self._flat.dtype) for g in grads],
                      out=self._flat.narrow(0, 0, n))
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
    if its data starts at the place's address, contiguous, with the place's shape and dtype
    (addresses are unique across the host and the devices under CUDA's unified addressing);
    the addresses are worked out once per buffer address, not for every parameter after every
    step (host time: 0.2 ms a step for AViT-B's 439 parameters, where the TF32 step is
    host-bound)."""
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
        if (p.data_ptr() != address or p.shape != shape or p.dtype != dtype
                or not p.is_contiguous()):
            meta = opt.round_robin_bit16_meta[group_index][i]
            offset = opt.round_robin_bit16_offsets[group_index][i]
            p.data = flat.narrow(0, offset, meta.numel()).view(meta.shape).data


def update_from_gradients(engine, torch_adam: bool = False) -> str | None:
    """Where `engine`'s one-rank gradients are kept (`keep_local_gradients`) and its update is
    elementwise in fp32 (DeepSpeed's FusedAdam), its step updates the fp32 weights from the
    gradients where they lie, without flattening them first (`_step`); returns None if
    installed, else why not. `torch_adam`: torch's Adam and AdamW too, run by torch over the
    pieces: on a CPU (where DeepSpeed's ZeRO runs torch's AdamW) that costs host time per
    piece that the flat tensor's update does not (5 ms a step for AViT-B's 439 pieces on the
    2-core CPU, where the flat copy took 0.3), so only the tests ask for it, to run the same
    machinery as FusedAdam's."""
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.utils.timer import NoopTimer

    opt = getattr(engine, "optimizer", None)
    if not is_local(engine):
        return "the gradients are not kept in place (keep_local_gradients)"
    if hasattr(opt, _LIST_STEP):
        return None
    if type(opt).step is not stage_1_and_2.DeepSpeedZeroOptimizer.step or "step" in vars(opt):
        return "the ZeRO optimizer's step is not DeepSpeed's own"
    inner = getattr(opt, "optimizer", None)
    kind = _elementwise(inner)
    if kind is None or (kind == "torch_adam" and not torch_adam):
        return (f"the update is {type(inner).__name__}, not DeepSpeed's FusedAdam"
                + (" (a GPU's)" if kind == "torch_adam" else ""))
    fp32 = [opt.dtype, opt.gradient_accumulation_dtype,
            *(t.dtype for t in opt.single_partition_of_fp32_groups)]
    if any(d != torch.float32 for d in fp32):
        return "the weights or gradients are not fp32"
    if (getattr(opt, "torch_autocast_gradscaler", None) is not None
            or getattr(opt, "check_grad_overflow", True)
            or not getattr(opt, "compute_grad_norm", False)):
        return "the step checks overflow or skips its norm (a loss scaler, compute_grad_norm)"
    if any(getattr(p, "use_muon", False) for group in opt.bit16_groups for p in group):
        return "Muon updates some parameters"
    if not isinstance(getattr(opt, "timers", None), NoopTimer):
        return "DeepSpeed's optimizer timers are on (wall_clock_breakdown)"
    if len(inner.param_groups) != len(opt.bit16_groups):
        return "the optimizer's groups are not ZeRO's"
    setattr(opt, _LIST_STEP, kind)
    opt.step = types.MethodType(_step, opt)
    # the pieces of the weights and optimizer state that `_step` keeps would hold the state's
    # old tensors after a checkpoint's state replaces them, and the device's copies after
    # DeepSpeed's offload_states moves them to the host: dropped first
    inner.register_load_state_dict_pre_hook(lambda *_: _forget_pieces(opt))
    for name in ("load_state_dict", "offload_states"):
        method = getattr(opt, name, None)
        if method is not None:
            setattr(opt, name, _forgetting(opt, method))
    return None


def _forgetting(opt, method):
    def call(*args, **kwargs):
        _forget_pieces(opt)
        return method(*args, **kwargs)
    return call


def _forget_pieces(opt) -> None:
    opt.__dict__.pop(_PIECES, None)
    opt.__dict__.pop(_LENT, None)


def updates_from_gradients(engine) -> bool:
    return hasattr(getattr(engine, "optimizer", None), _LIST_STEP)


def _elementwise(inner) -> str | None:
    """"fused_adam" (DeepSpeed's FusedAdam, its CUDA kernel called on the tensor lists here),
    "torch_adam" (torch's Adam or AdamW, not fused: its own multi-tensor step over views) or
    None."""
    try:
        from deepspeed.ops.adam import FusedAdam
    except ImportError:            # pragma: no cover (DeepSpeed always has it)
        FusedAdam = None
    if FusedAdam is not None and type(inner) is FusedAdam:
        return "fused_adam"
    if (type(inner) in (torch.optim.Adam, torch.optim.AdamW)
            and not any(g.get("fused") for g in inner.param_groups)):
        # (torch's fused kernel rounds a tensor's tail apart from its body: over pieces its
        # values are not those over the whole tensor)
        return "torch_adam"
    return None


def _step(opt, closure=None) -> None:
    """`DeepSpeedZeroOptimizer.step` for one rank in fp32, the update made from the
    gradients where they lie. DeepSpeed flattens the group's gradients into one fp32 copy
    (the model's size in memory, and a batched copy of every gradient: 1.15 ms of AViT-B's
    step on an H200), scales it for clipping and runs the optimizer on it against the flat
    fp32 weights. The update is elementwise, so the same arithmetic on the gradients and on
    views of the flat weights and optimizer state, tensor by tensor, gives the same values,
    bit for bit (tests/runtime/test_zero_local.py). The rest is DeepSpeed's: the norm and
    its skip of an update whose norm is not finite (the step's one host read), the loss
    scaler's update, the gradients released, the fp32 weights copied to the model's. Its
    first update, which creates the optimizer's state, is DeepSpeed's own step."""
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, is_invalid_grad_norm

    from dsfm.runtime.zero_norm import combined_scale

    if not all(opt.optimizer.state.get(m) for m in opt.single_partition_of_fp32_groups):
        return type(opt).step(opt, closure)         # the optimizer's state made by its step
    opt.micro_step_id = INITIAL_MICRO_STEP_ID
    opt._wait_for_offload_copies()
    opt.overflow = False
    norm = opt.scaled_global_norm()
    if is_invalid_grad_norm(norm):
        opt.overflow = True
    prev_scale = opt.loss_scale
    opt._update_scale(opt.overflow)
    if opt.overflow:
        opt._global_grad_norm = float("inf")
        opt.zero_grad(set_to_none=True)
        for k in opt.averaged_gradients.keys():
            opt.averaged_gradients[k] = None
            opt.all_grad_tensors[k] = None
        return
    opt._global_grad_norm = norm / prev_scale
    kind = getattr(opt, _LIST_STEP)
    for i in range(len(opt.bit16_groups)):
        # (an empty tensor would cut FusedAdam's launcher short: none is in the list today)
        grads = [g.contiguous() for g in list.__iter__(opt.averaged_gradients[i]) if g.numel()]
        opt.free_grad_in_param_list(opt.params_in_partition[i])
        opt.averaged_gradients[i] = None
        opt.all_grad_tensors[i] = None
        scale = combined_scale(opt, norm)
        if grads:            # (no gradient, no update: FusedAdam's own step skips the group)
            if scale is not None:
                torch._foreach_mul_(grads, 1. / scale)
            (_fused_adam if kind == "fused_adam" else _torch_adam)(opt, i, grads)
        del grads
        opt._lazy_init_hp_params_optimizer_state()
        opt.parallel_partitioned_bit16_groups[i][0].data.copy_(
            opt.single_partition_of_fp32_groups[i].data)
    for i in range(len(opt.bit16_groups)):
        opt._update_model_bit16_weights(i)


def _views(opt, i: int, grads: list[torch.Tensor], tensors: list[torch.Tensor]) -> list:
    """For each of `tensors` (flat, the group's partition: its fp32 weights, the optimizer's
    moments), its pieces that line up with the gradients, shaped as they are: worked out once
    for the same tensors and layout."""
    cache = opt.__dict__.setdefault(_PIECES, {})
    key = (i, tuple(t.data_ptr() for t in tensors), tuple(g.shape for g in grads))
    got = cache.get(i)
    if got is None or got[0] != key:
        out = []
        for t in tensors:
            flat, offset, pieces = t.detach().view(-1), 0, []
            for g in grads:
                pieces.append(flat.narrow(0, offset, g.numel()).view(g.shape))
                offset += g.numel()
            out.append(pieces)
        cache[i] = got = (key, out)
    return got[1]


def _fused_adam(opt, i: int, grads: list[torch.Tensor]) -> None:
    """DeepSpeed's FusedAdam step for group `i` (one fp32 weight tensor, its state's step
    counted as its step counts it), its kernel called on the gradients and the matching
    pieces of the weights and moments."""
    from deepspeed.ops.adam.fused_adam import multi_tensor_applier

    inner = opt.optimizer
    group = inner.param_groups[i]
    master = opt.single_partition_of_fp32_groups[i]
    state = inner.state[master]
    weights, m, v = _views(opt, i, grads, [master, state["exp_avg"], state["exp_avg_sq"]])
    beta1, beta2 = group["betas"]
    state["step"] += 1
    multi_tensor_applier(inner.multi_tensor_adam, inner._dummy_overflow_buf,
                         [grads, weights, m, v], group["lr"], beta1, beta2, group["eps"],
                         state["step"], inner.adam_w_mode, 1 if group["bias_correction"] else 0,
                         group["weight_decay"])


def _torch_adam(opt, i: int, grads: list[torch.Tensor]) -> None:
    """torch's Adam or AdamW step for group `i`, run by the optimizer itself over pieces of
    the fp32 weights that line up with the gradients, each with the matching pieces of the
    state and a step counter of its own (set to the whole tensor's, which then advances once;
    the pieces' states made once, and lent to the optimizer for its step only)."""
    inner = opt.optimizer
    group = inner.param_groups[i]
    master = opt.single_partition_of_fp32_groups[i]
    state = inner.state[master]
    names = [k for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in state]
    pieces = _views(opt, i, grads, [master] + [state[k] for k in names])
    weights = pieces[0]
    lent = opt.__dict__.setdefault(_LENT, {})
    if lent.get(i, (None,))[0] is not pieces:
        lent[i] = (pieces, [{"step": state["step"].clone(),
                             **{k: p[n] for k, p in zip(names, pieces[1:])}}
                            for n in range(len(weights))])
    states = lent[i][1]
    steps = [s["step"] for s in states]
    torch._foreach_copy_(steps, [state["step"]] * len(steps))
    saved = inner.param_groups
    for w, g, s in zip(weights, grads, states):
        w.grad = g
        inner.state[w] = s
    try:
        # torch's multi-tensor implementation over the pieces (the same arithmetic as its
        # per-tensor loop on the whole tensor, a few operators instead of ten per piece)
        inner.param_groups = [dict(group, params=weights, foreach=True)]
        inner.step()
    finally:
        inner.param_groups = saved
        for w in weights:
            w.grad = None
            inner.state.pop(w, None)
    state["step"].copy_(steps[0])
