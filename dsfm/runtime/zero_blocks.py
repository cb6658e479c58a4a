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
together when the block is called and released after it, in the forward and again in the
backward, and its gradients are reduced together when the block's backward is done, instead of
module by module and gradient by gradient inside it. That is the unit at which sharded data
parallelism is usually wrapped (one transformer block); the parameters live at once are one
block's (AViT-L: 12.6 million, 50 MB in fp32) where they were one module's, beside DeepSpeed's
prefetch bucket (50 million elements in dsfm's configs). The values are the same: the same
parameters are gathered, the same gradients reduced, and no arithmetic changes
(tests/runtime/test_zero_blocks.py, tests/test_train.py). Modules called in different orders
or not at all on different ranks inside a block no longer matter to ZeRO-3 either.

A ds_config that chooses leaf modules itself (`zero_optimization.leaf_module`, or a
`stage3_module_granularity_threshold`) is left to DeepSpeed: `"leaf_module": {}` there restores
DeepSpeed's gathering per module.
"""

from __future__ import annotations


def gather_blocks_whole(model, ds_config: dict) -> str | None:
    """Mark `model.zero3_blocks()` as ZeRO-3 leaf modules, before `deepspeed.initialize`
    installs its hooks; returns None if marked, else why not."""
    zero = ds_config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if str(stage) != "3":
        return f"ZeRO stage {stage}, not 3"
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
        set_z3_leaf_module(block, True)
    return None


def whole_blocks(model) -> int:
    """How many of `model`'s modules ZeRO-3 gathers as one unit (DeepSpeed's leaf modules)."""
    return sum(1 for m in model.modules() if getattr(m, "_z3_leaf", False))
