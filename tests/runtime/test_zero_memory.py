"""What the shipped ZeRO-3 configs keep gathered (tests/runtime/zero_memory_probe.py, real
engines on two ranks). DeepSpeed 0.19 keeps a module's gathered parameters after the module
when they are used again within `stage3_max_reuse_distance` elements (1e9 by default, more than
any AViT), or when its prefetcher has walked past their next use, which with any prefetch and
`stage3_max_live_parameters` at its default (1e9) it does for every parameter early in each
forward (docs/training.md): with DeepSpeed's settings every parameter of the model stays
gathered from its forward to its backward from the second step on (the first records the
trace), so that the whole model is gathered at the end of each forward, and after an
evaluation until the next step. zero3.json and zero3_offload.json shipped so: ZeRO-3 then spared
no memory at the step's peak (ZeRO-2's, at twice its step time on one H200), and the offloaded
parameters were all on the GPU through every step. Both now cap what is gathered at about two
of AViT-L's blocks (the block computing and the next, prefetched) and reuse nothing."""

import pytest

from tests.runtime.test_dist import _clean_env, _launcher, probe_records

PROBE = "tests/runtime/zero_memory_probe.py"


@pytest.mark.slow
def test_the_shipped_zero3_configs_hold_two_blocks_gathered_not_the_model(tmp_path):
    """(Slow: two ranks, and DeepSpeed compiles its CPU Adam op on first use.)"""
    configs = ["zero3.json", "zero3.json-deepspeed", "zero3.json-uncapped", "zero3_offload.json"]
    records = probe_records(
        [_launcher("torchrun"), "--standalone", "--nproc_per_node", "2", PROBE,
         "--configs", *configs], _clean_env(CUDA_VISIBLE_DEVICES=""), "ZERO_MEMORY", 2,
        timeout=600)
    for rec in records:
        zero3, defaults, uncapped, offload = (rec["configs"][c] for c in configs)
        block, whole = zero3["largest_block"], zero3["partitioned"]
        assert 2.5 * block < whole                    # three partitioned blocks, little else
        for row in (zero3, offload):
            assert row["max_live"] is not None and 2 * block < row["max_live"] < 3 * block
            # the first step records the trace, gathering block by block; then the block
            # computing and the next one, prefetched (with a tensor of the one after): never
            # the whole model, and nothing after the step
            assert row["peak_forward"][0] == row["peak_backward"][0] == block, row
            for held in (row["peak_forward"][1:] + row["peak_backward"][1:]
                         + row["after_forward"][1:] + [row["after_eval"]]):
                assert 2 * block < held < min(3 * block, whole), row
            assert row["after_step"] == [0] * 3, row
            # train.log says so (dsfm.runtime.zero_blocks.held_gathered)
            assert row["held_line"].startswith(
                f"ZeRO-3 holds about {row['max_live']:g} of the {whole:,} elements"), row
        # DeepSpeed's settings, and the shipped ones without the cap (prefetch at reuse
        # distance 0): the same values, the whole model held from the second step on
        for row in (defaults, uncapped):
            assert row["losses"] == zero3["losses"] and row["weights_equal_first"], row
            assert row["after_forward"] == [0, whole, whole], row
            assert row["peak_backward"] == [block, whole, whole], row
            assert row["after_eval"] == whole and row["after_step"] == [0] * 3, row
            assert row["held_line"].startswith(
                f"ZeRO-3 holds all {whole:,} elements of partitioned parameters gathered from "
                "each forward to its backward"), row
        assert zero3["weights_equal_first"]
