"""What the shipped ZeRO-3 configs keep gathered (tests/runtime/zero_memory_probe.py, real
engines on two ranks). DeepSpeed 0.19 releases a module's gathered parameters after the module
only when no prefetch is configured and the parameters are not used again within
`stage3_max_reuse_distance` elements (1e9 by default, more than any AViT); with its defaults
every parameter of the model stays gathered from the forward to the backward, from the second
step on (the first records the trace), and after an evaluation until the next step. That is
zero3.json's choice (no second gather in the backward; the gathered model is at most AViT-L's
1.6 GB). zero3_offload.json, whose parameters live on the CPU to spare the GPU's memory, held
the whole model on the GPU through every step and after every evaluation: it now gathers one
block at a time."""

import pytest

from tests.runtime.test_dist import _clean_env, _launcher, probe_records

PROBE = "tests/runtime/zero_memory_probe.py"


@pytest.mark.slow
def test_zero3_offload_holds_one_block_gathered_where_zero3_holds_the_model(tmp_path):
    """(Slow: two ranks, and DeepSpeed compiles its CPU Adam op on first use.)"""
    configs = ["zero3_offload.json", "zero3_offload.json-deepspeed", "zero3.json"]
    records = probe_records(
        [_launcher("torchrun"), "--standalone", "--nproc_per_node", "2", PROBE,
         "--configs", *configs], _clean_env(CUDA_VISIBLE_DEVICES=""), "ZERO_MEMORY", 2,
        timeout=600)
    for rec in records:
        offload, defaults, zero3 = (rec["configs"][c] for c in configs)
        block, whole = offload["largest_block"], offload["partitioned"]
        assert 2 * block < whole                      # the blocks are partitioned, three of them
        # one whole block at a time, in every step's forward and backward, nothing after
        assert offload["peak_forward"] == offload["peak_backward"] == [block] * 3, offload
        assert offload["after_forward"] == offload["after_step"] == [0] * 3, offload
        assert offload["after_eval"] == 0, offload
        # DeepSpeed's gathering settings: the same values, the whole model held
        assert defaults["losses"] == offload["losses"] and defaults["weights_equal_first"]
        assert defaults["after_forward"][1:] == defaults["peak_backward"][1:] == [whole] * 2
        assert defaults["after_eval"] == whole
        # zero3.json keeps them (docs/training.md), and releases them at each step
        assert zero3["after_forward"][1:] == [whole] * 2 and zero3["after_eval"] == whole
        assert zero3["after_step"] == [0] * 3
        assert zero3["peak_forward"][0] == block      # the first step, recording the trace
