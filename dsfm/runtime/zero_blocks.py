"""ZeRO-3 gathering each of the model's blocks' parameters as one unit.

DeepSpeed's ZeRO-3 (0.19) hooks every module that has parameters: before each call of a module
its parameters are gathered, after it they are released, and the same again in the backward,
each hook a few Python calls, a trace check and a prefetch decision on the host. An AViT block
holds 24 modules (two attentions with their norms, projections, QK-norms and position biases,
and the MLP's two layers), so a step of AViT-B ran 539 gathers, L's 1,043 (59 and 83 with
whole blocks); on one H200 ZeRO-3 steps took twice as long as plain PyTorch's, the GPU idle
half of the time (docs/performance.md, 2026-11-30).

`gather_blocks_whole(model, ds_config)` marks the blocks the model names (`zero3_blocks()`; for
AViT its space-time blocks) as DeepSpeed's "leaf modules": each block's parameters are gathered
together when the block is called and released after it (where the ds_config lets DeepSpeed
release them: docs/training.md, "What ZeRO-3 keeps gathered"), in the forward and again in the
backward, and its gradients are reduced together when the block's backward is done, instead of
module by module and gradient by gradient inside it. That is the unit at which sharded data
parallelism is usually wrapped (one transformer block; AViT-L's: 16.8 million parameters, 67 MB
in fp32). The values are the same: the same
parameters are gathered, the same gradients reduced, and no arithmetic changes
(tests/runtime/test_zero_blocks.py, tests/test_train.py). Modules called in different orders
or not at all on different ranks inside a block no longer matter to ZeRO-3 either.

DeepSpeed reduces a whole block's gradients in a full backward hook on the block, and PyTorch
fires such a hook, when no input of the module needs a gradient, as soon as the gradients of its
outputs are known: before those of the block's parameters, which DeepSpeed would then reduce as
zeros (its first backward stopped on a size mismatch). That is the first block's case when the
field embedding and the stem are frozen and the blocks train; there the block's input is given
a gradient of its own (`_input_needs_grad`), which nothing reads, so that the hook fires after
the block's backward, as it does in training with nothing frozen.

A ds_config that chooses leaf modules itself (`zero_optimization.leaf_module`) is left to
DeepSpeed: `"leaf_module": {}` there restores DeepSpeed's gathering per module. (A leaf module
must be called with an input that needs a gradient, for the reason above; DeepSpeed's own choice
by `stage3_module_granularity_threshold` would take the AViT's relative-position bias tables,
called with none, and `dsfm.runtime.ds_config` refuses it.)
"""

from __future__ import annotations

import torch

from dsfm.runtime.schedule import zero_stage

_MARKED = "_dsfm_whole_block"


def gather_blocks_whole(model, ds_config: dict) -> str | None:
    """Mark `model.zero3_blocks()` as ZeRO-3 leaf modules, before `deepspeed.initialize`
    installs its hooks; returns None if marked, else why not."""
    stage = zero_stage(ds_config)
    if stage != 3:
        return f"ZeRO stage {stage}, not 3"
    zero = ds_config["zero_optimization"]
    if "leaf_module" in zero or zero.get("stage3_module_granularity_threshold"):
        return ("the ds_config chooses DeepSpeed's leaf modules itself (zero_optimization."
                "leaf_module or stage3_module_granularity_threshold)")
    blocks = getattr(model, "zero3_blocks", None)
    if blocks is None:
        return f"{type(model).__name__} names no blocks (zero3_blocks)"
    try:
        from deepspeed.utils import set_z3_leaf_module
    except ImportError:
        return "this DeepSpeed has no ZeRO-3 leaf modules"
    blocks = list(blocks())
    if not blocks:
        return f"{type(model).__name__} has no blocks"
    for block in blocks:
        if getattr(block, _MARKED, False):       # marked before (a second engine of the model)
            continue
        set_z3_leaf_module(block, True)
        # before initialize: ahead of ZeRO-3's own hooks, which then see the input needing a
        # gradient (its release of the parameters after the block's backward hangs on it too)
        block.register_forward_pre_hook(_input_needs_grad)
        setattr(block, _MARKED, True)
    return None


def _input_needs_grad(block, args):
    """A block whose parameters train, called with gradients on: its first floating-point
    input needing no gradient is replaced by one that does (the same values, detached: there
    is no graph behind it), so that the block's full backward hook fires after its backward."""
    if not torch.is_grad_enabled():
        return None
    i = next((i for i, a in enumerate(args) if torch.is_tensor(a) and a.is_floating_point()),
             None)
    if (i is None or any(torch.is_tensor(a) and a.requires_grad for a in args)
            or not any(p.requires_grad for p in block.parameters())):
        return None
    return args[:i] + (args[i].detach().requires_grad_(),) + args[i + 1:]


def whole_blocks(model) -> int:
    """How many of `model`'s modules ZeRO-3 gathers as one unit (DeepSpeed's leaf modules)."""
    from deepspeed.utils import get_z3_leaf_modules

    return len(get_z3_leaf_modules(model))


def held_gathered(engine) -> str:
    """What a ZeRO-3 engine holds gathered during a step, in one line for the log, by what
    DeepSpeed 0.19 does (docs/training.md, "What ZeRO-3 keeps gathered"; measured in
    tests/runtime/test_zero_memory.py): with a prefetch, everything its walk of the trace steps
    over stays gathered until its backward, so the whole model unless
    `stage3_max_live_parameters` is below it; without one, what is used again within
    `stage3_max_reuse_distance` elements."""
    params = [p for p in engine.module.parameters() if hasattr(p, "ds_numel")]
    partitioned = sum(p.ds_numel for p in params if not p.ds_persist)
    if not partitioned:
        return ("ZeRO-3 partitions none of the parameters: every tensor is under "
                f"stage3_param_persistence_threshold ({engine.zero_param_persistence_threshold():g}"
                " elements) and stays whole on every rank")
    prefetch, live = engine.zero_prefetch_bucket_size(), engine.zero_max_live_parameters()
    reuse = engine.zero_max_reuse_distance()
    of = f"of the {partitioned:,} elements of partitioned parameters"
    if prefetch > 0 and live < partitioned:
        return (f"ZeRO-3 holds about {live:g} {of} gathered at once, and never less than the "
                "computing unit's (stage3_max_live_parameters), prefetched ahead of their use")
    if prefetch > 0 or reuse >= partitioned:
        why = (f"stage3_prefetch_bucket_size {prefetch:g} with stage3_max_live_parameters "
               f"{live:g}" if prefetch > 0 else f"stage3_max_reuse_distance {reuse:g}")
        return (f"ZeRO-3 holds all {partitioned:,} elements of partitioned parameters gathered "
                f"from each forward to its backward, the whole model at the step's peak ({why}; "
                "docs/training.md)")
    return (f"ZeRO-3 releases each unit's parameters after its call unless used again within "
            f"{reuse:g} {of} (stage3_max_reuse_distance), with no prefetch")
