"""ZeRO-3 gathering each space-time block as one unit (`dsfm.runtime.zero_blocks`), against
DeepSpeed's gathering module by module, in real engines side by side
(tests/runtime/zero_blocks_probe.py): the same losses, gradient norms, partitioned weights,
skipped step and checkpoints, in a quarter of the gathers. Before, ZeRO-3 hooked every module
inside every block, and on one H200 its steps took twice as long as plain PyTorch's."""

import sys

import pytest
import torch

from dsfm.models.avit import AViT, AViTConfig
from dsfm.runtime.zero_blocks import gather_blocks_whole, whole_blocks
from tests.runtime.test_dist import _clean_env, _launcher, probe_records

PROBE = "tests/runtime/zero_blocks_probe.py"


def _model() -> AViT:
    return AViT(AViTConfig(n_fields=4, dim=48, heads=3, blocks=2, drop_path=0.0))


@pytest.mark.parametrize("zero,why", [
    ({"stage": 2}, "ZeRO stage 2, not 3"),
    ({"stage": 3, "leaf_module": {}}, "chooses DeepSpeed's leaf modules itself"),
    ({"stage": 3, "stage3_module_granularity_threshold": 5000},
     "chooses DeepSpeed's leaf modules itself"),
])
def test_blocks_are_marked_only_for_zero3_and_not_over_the_configs_own_choice(zero, why):
    model = _model()
    got = gather_blocks_whole(model, {"zero_optimization": zero})
    assert got is not None and why in got
    assert whole_blocks(model) == 0
    for _ in range(2):                  # a second time (another engine): nothing more
        assert gather_blocks_whole(model, {"zero_optimization": {"stage": 3}}) is None
    assert whole_blocks(model) == 2
    assert all(getattr(b, "_z3_leaf", False) and len(b._forward_pre_hooks) == 1
               for b in model.blocks)


def test_a_model_that_names_no_blocks_is_left_as_it_is():
    why = gather_blocks_whole(torch.nn.Linear(3, 2), {"zero_optimization": {"stage": 3}})
    assert why is not None and "Linear names no blocks" in why


def _records(cmd, tmp_path, ranks, cuda=False) -> list[dict]:
    env = _clean_env() if cuda else _clean_env(CUDA_VISIBLE_DEVICES="")
    return probe_records(cmd + ["--out", str(tmp_path)], env, "ZERO_BLOCKS", ranks,
                         timeout=600)


def _same_training(rec: dict) -> None:
    assert rec["whole"] == {"blocks": 3, "modules": 0}
    # the fine-tuning helpers once ZeRO-3 has partitioned the model: n_fields raised an
    # IndexError, add_fields built empty columns and reported 6 fields
    assert rec["n_fields_partitioned"] == 4
    assert len(rec["refused"]) == 2 and all(
        r and "call it before deepspeed.initialize" in r for r in rec["refused"]), rec["refused"]
    # the modules inside the blocks lose their hooks; the blocks and the rest keep theirs
    assert rec["hooked"]["modules"] - rec["hooked"]["blocks"] == rec["inner"] > 0
    for row in rec["steps"]:
        assert row["losses_equal"] and row["weights_equal"], row
        assert row["norm_blocks"] == row["norm_modules"], row
        assert row["skipped_blocks"] == row["skipped_modules"] == int(row["poisoned"]), row
        assert 0 < 3 * row["fetches_blocks"] < row["fetches_modules"], row
    assert rec["steps"][0]["norm_blocks"] > 1.0               # clipping at 1.0 is active
    assert rec["cross_loaded_equal"]


def test_one_rank_zero3_gathers_whole_blocks_with_deepspeeds_numbers(tmp_path):
    [rec] = _records([sys.executable, PROBE], tmp_path, 1)
    _same_training(rec)


def test_blocks_train_behind_a_frozen_stem(tmp_path):
    """The field embedding and the stem frozen, the blocks trained: the first block's input
    needs no gradient. DeepSpeed reduces a whole block's gradients in a full backward hook on
    the block, which PyTorch fires, when no input of the module needs a gradient, as soon as
    the gradients of its outputs are known, before those of its parameters: the first
    backward stopped ("The size of tensor a (0) must match the size of tensor b (48)")."""
    [rec] = _records([sys.executable, PROBE, "--freeze", "stem"], tmp_path, 1)
    _same_training(rec)


@pytest.mark.slow
@pytest.mark.parametrize("options", [["--accumulation", "2"], ["--freeze", "processor"]],
                         ids=["accumulation", "frozen-processor"])
def test_two_ranks_gather_whole_blocks_with_deepspeeds_numbers(tmp_path, options):
    """Two ranks (the gathers and reductions are collectives), NaN gradients on one of them
    (both skip), micro-batches accumulated, or the blocks frozen (their parameters gathered
    for the backward into the embedding and stem, with no gradients of their own)."""
    torchrun = _launcher("torchrun")
    records = _records([torchrun, "--standalone", "--nproc_per_node", "2", PROBE] + options,
                       tmp_path, 2)
    for rec in records:
        _same_training(rec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_gpu_zero3_gathers_whole_blocks_with_deepspeeds_numbers(tmp_path):
    """The same on a GPU, with DeepSpeed's FusedAdam and its CUDA streams: some backward kernels
    add in no fixed order there, so the two engines' values are held to fp32 rounding, not to
    the bit; the skipped step and the gathers as on the CPU."""
    [rec] = _records([sys.executable, PROBE], tmp_path, 1, cuda=True)
    assert rec["device"].startswith("cuda")
    assert rec["whole"] == {"blocks": 3, "modules": 0}
    for row in rec["steps"]:
        assert row["losses_max_diff"] <= 1e-5 and row["weights_max_diff"] <= 1e-5, row
        assert (row["norm_blocks"] == row["norm_modules"]               # inf where poisoned
                or row["norm_blocks"] == pytest.approx(row["norm_modules"], rel=1e-5)), row
        assert row["skipped_blocks"] == row["skipped_modules"] == int(row["poisoned"]), row
        assert 0 < 3 * row["fetches_blocks"] < row["fetches_modules"], row
