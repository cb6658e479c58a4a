"""What the shipped ZeRO-3 configs keep gathered (tests/runtime/zero_memory_probe.py, real
engines on two ranks). DeepSpeed 0.19 keeps a module's gathered parameters after the module
when they are used again within `stage3_max_reuse_distance` elements (1e9 by default, more than
any AViT), or when its prefetcher has walked past their next use, which with any prefetch and
`stage3_max_live_parameters` at its default (1e9) it does for every parameter early in each
forward (docs/training.md); with its own settings
every parameter of the model stays gathered from its forward to its backward from the second
step on (the first records the trace), so that the whole model is gathered at the end of each
forward, and after an evaluation until the next step. zero3.json and zero3_offload.json shipped
so: ZeRO-3 then spared no memory at the step's peak (ZeRO-2's, at twice its step time on one
H200), and the offloaded parameters were all on the GPU through every step. Both now gather one
block at a time."""

import pytest

from tests.runtime.test_dist import _clean_env, _launcher, probe_records

PROBE = "tests/runtime/zero_memory_probe.py"


@pytest.mark.slow
def test_the_shipped_zero3_configs_hold_one_block_gathered_at_a_time(tmp_path):
    """(Slow: two ranks, and DeepSpeed compiles its CPU Adam op on first use.)"""
    configs = ["zero3.json", "zero3.json-deepspeed", "zero3_offload.json", "zero3.json-prefetch",
               "zero3.json-window"]
    records = probe_records(
        [_launcher("torchrun"), "--standalone", "--nproc_per_node", "2", PROBE,
         "--configs", *configs], _clean_env(CUDA_VISIBLE_DEVICES=""), "ZERO_MEMORY", 2,
        timeout=600)
    for rec in records:
        zero3, defaults, offload, prefetch, window = (rec["configs"][c] for c in configs)
        block, whole = zero3["largest_block"], zero3["partitioned"]
        assert 2 * block < whole                      # the blocks are partitioned, three of them
        for row in (zero3, offload):
            # one whole block at a time, in every step's forward and backward, none after
            assert row["peak_forward"] == row["peak_backward"] == [block] * 3, row
            assert row["after_forward"] == row["after_step"] == [0] * 3, row
            assert row["after_eval"] == 0, row
        # DeepSpeed's gathering settings: the same values, the whole model held from the
        # second step on (the first records the trace, gathering block by block)
        assert defaults["losses"] == zero3["losses"] and defaults["weights_equal_first"]
        assert defaults["after_forward"] == [0, whole, whole], defaults
        assert defaults["peak_backward"] == [block, whole, whole], defaults
        assert defaults["after_eval"] == whole and defaults["after_step"] == [0] * 3
        # any prefetch holds the whole model, even at reuse distance 0 (a bucket of 1.2
        # blocks), unless stage3_max_live_parameters caps it: at 2.1 blocks, the block
        # computing, the next and a tensor of the third (docs/training.md)
        assert prefetch["after_forward"] == [0, whole, whole] and prefetch["after_eval"] == whole
        for row in (prefetch, window):
            assert row["losses"] == zero3["losses"] and row["weights_equal_first"]
            assert row["after_step"] == [0] * 3
        for peak in window["peak_forward"][1:] + window["peak_backward"][1:]:
            assert 2 * block < peak < min(3 * block, whole), window
