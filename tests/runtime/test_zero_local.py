"""ZeRO-2 on one rank without DeepSpeed's per-gradient hooks, bucket copies and synchronizations
(`dsfm.runtime.zero_local`), against DeepSpeed's own gradient handling in real engines
(tests/runtime/zero_local_probe.py): the same losses, gradient norms, weights, skipped step,
optimizer state and checkpoints, with two copies per parameter tensor fewer each step. Before,
every one-rank ZeRO-2 step copied each gradient twice and ran a Python hook per parameter to
reduce nothing."""

import sys
import types

import pytest
import torch

from dsfm.runtime.zero_local import is_local, keep_local_gradients
from dsfm.runtime.zero_norm import fuse_grad_norm, is_fused
from tests.runtime.test_dist import _clean_env, _launcher, probe_records

PROBE = "tests/runtime/zero_local_probe.py"


@pytest.mark.parametrize("install,installed,of", [(keep_local_gradients, is_local, "gradients"),
                                                  (fuse_grad_norm, is_fused, "norm")])
def test_other_optimizers_keep_their_own(install, installed, of):
    """Neither the one-rank gradients (zero_local) nor the multi-tensor norm (zero_norm) is
    installed on an optimizer other than ZeRO's: each says why."""
    model = torch.nn.Linear(3, 2)
    engine = types.SimpleNamespace(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    why = install(engine)
    assert why is not None and "SGD" in why and not installed(engine), of


def test_deepspeeds_throughput_timer_is_off_unless_the_config_names_it():
    """DeepSpeed 0.19's throughput timer is on and synchronized by default: two device
    synchronizations a micro-batch (the probe counts them: none in dsfm's engines). Off in
    the engine's config unless the ds_config names it; the rest of the config as it was."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from dsfm.runtime.engine import unsynchronized_timers

    shipped = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 100}
    off = unsynchronized_timers(shipped)
    assert off == {**shipped, "timers": {"throughput": {"enabled": False}}}
    assert "timers" not in shipped                                  # not modified in place
    assert DeepSpeedConfig(off).timers_config.enabled is False
    assert DeepSpeedConfig(shipped).timers_config.synchronized is True
    named = {**shipped, "timers": {"throughput": {"enabled": True, "synchronized": True}}}
    assert unsynchronized_timers(named) is named
    other = {**shipped, "timers": {"something": 1}}
    assert unsynchronized_timers(other)["timers"] == {"something": 1,
                                                      "throughput": {"enabled": False}}


def _records(cmd, tmp_path, ranks, cuda=False) -> list[dict]:
    env = _clean_env() if cuda else _clean_env(CUDA_VISIBLE_DEVICES="")
    return probe_records(cmd + ["--out", str(tmp_path)], env, "ZERO_LOCAL", ranks, timeout=600)


def _same_training(rec: dict) -> None:
    for row in rec["steps"]:
        assert row["losses_equal"] and row["weights_equal"], row
        assert row["norm_local"] == row["norm_own"], row
        assert row["skipped_local"] == row["skipped_own"] == int(row["poisoned"]), row
        # the last step began with one parameter's data moved out of the flat weight buffer:
        # the update puts it back, as DeepSpeed's does
        assert row["in_buffer_local"] and row["in_buffer_own"], row
    assert rec["steps"][0]["norm_local"] > 1.0                   # clipping at 1.0 is active
    assert rec["optimizer_states_equal"] and rec["checkpoints_equal"] and rec["resumed_equal"]


@pytest.mark.parametrize("accumulation", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_one_rank_zero2_trains_as_deepspeeds_own_without_its_hooks(tmp_path, accumulation):
    [rec] = _records([sys.executable, PROBE, "--accumulation", str(accumulation)], tmp_path, 1)
    assert rec["local"] == {"local": True, "own": False} and rec["why_not"] is None
    assert rec["hooks"] == {"local": 0, "own": rec["n_params"]}
    assert rec["from_gradients"] == {"local": True, "own": False}       # torch's AdamW here
    assert rec["why_not_update"] is None
    # the update on the pieces against torch's own step on the flat tensor, same inputs
    check = rec["update_check"]
    assert check["kind"] == "_torch_adam" and check["equal"] and check["moved"] > 0, check
    assert rec["pieces_held"] == {"before_load": 1, "after_load": 0}
    _same_training(rec)
    assert rec["repointed"] == {"before": False, "after": True}
    counted = rec["steps"][2]
    # DeepSpeed's own: each gradient into a bucket (one larger than the bucket excepted) and
    # out of it into the partition, per micro-batch; dsfm's: the model's own backward's
    # (autograd's, into cleared gradients) and the step's few (the weights' update)
    n = rec["n_params"] * accumulation
    assert counted["copies_local"] <= counted["copies_plain"] + 3 < 1.5 * n
    assert 1.5 * n <= counted["copies_own"]
    assert counted["ops_local"] <= counted["ops_own"] - 1.5 * n
    assert counted["host_reads_local"] <= counted["host_reads_own"]
    # after the update DeepSpeed points every parameter at its place in the flat weight
    # buffer again (a slice and a view each), dsfm only one that is not there
    assert counted["point_ops_local"] == 0 < 2 * rec["n_params"] <= counted["point_ops_own"]
    # the step reads the norm on the host once (DeepSpeed's skip of a non-finite norm; its
    # clipping asked again), and flattens nothing (DeepSpeed's own flattens the gradients)
    assert counted["step_reads_local"] == counted["step_reads_own"] == 1, counted
    assert counted["step_cats_local"] == 0 < counted["step_cats_own"], counted
    # and updates from the gradients where they lie: no flat copy of them at all (the
    # model's own backward's cats apart), where DeepSpeed's makes one per step
    assert counted["cats_local"] == counted["cats_plain"] < counted["cats_own"], counted
    # no device synchronization of DeepSpeed's in the step: its throughput timer, on by
    # default, synchronized at every forward's start and every step's end (build_engine
    # turns it off: engine.unsynchronized_timers)
    assert counted["device_syncs_local"] == 0, counted


@pytest.mark.slow
def test_two_ranks_keep_deepspeeds_reduction(tmp_path):
    torchrun = _launcher("torchrun")
    assert torchrun, "torchrun is installed with torch; it is missing beside python and on PATH"
    records = _records([torchrun, "--standalone", "--nproc_per_node", "2", PROBE], tmp_path, 2)
    for rec in records:
        assert rec["local"] == {"local": False, "own": False}
        assert "more than one rank" in rec["why_not"]
        assert rec["hooks"]["local"] == rec["hooks"]["own"] == rec["n_params"]
        _same_training(rec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_rank_zero2_trains_as_deepspeeds_own_without_its_hooks_on_cuda(tmp_path):
    """The same on a GPU, with DeepSpeed's FusedAdam (its kernel run on the gradients where
    they lie in the one-rank engine) and its CUDA streams: some backward kernels add in no
    fixed order there, so the two engines' values are held to fp32 rounding, not to the bit;
    the skipped step, the hooks, the copies and the flat copy as on the CPU."""
    [rec] = _records([sys.executable, PROBE], tmp_path, 1, cuda=True)
    assert rec["device"].startswith("cuda")
    assert rec["local"] == {"local": True, "own": False} and rec["why_not"] is None
    assert rec["hooks"] == {"local": 0, "own": rec["n_params"]}
    # FusedAdam's kernel run on the gradients and the matching pieces of the weights: bit for
    # bit what FusedAdam's own step makes of the same inputs as one flat tensor
    assert rec["from_gradients"] == {"local": True, "own": False}
    check = rec["update_check"]
    assert check["kind"] == "_fused_adam" and check["moved"] > 0, check
    assert check["equal"], check
    for row in rec["steps"]:
        assert row["losses_max_diff"] <= 1e-5 and row["weights_max_diff"] <= 1e-5, row
        assert (row["norm_local"] == row["norm_own"]                    # inf where poisoned
                or row["norm_local"] == pytest.approx(row["norm_own"], rel=1e-5)), row
        assert row["skipped_local"] == row["skipped_own"] == int(row["poisoned"]), row
        assert row["in_buffer_local"] and row["in_buffer_own"], row
    counted = rec["steps"][2]
    assert counted["copies_local"] <= counted["copies_plain"] + 3 < 1.5 * rec["n_params"]
    assert 1.5 * rec["n_params"] <= counted["copies_own"]
    # the synchronizations engine.step makes on the GPU: the norm's one host read, and
    # whatever DeepSpeed's engine adds around its optimizer (the same for both engines)
    assert counted["step_reads_local"] == 1 and counted["step_cats_local"] == 0, counted
    assert counted["cats_local"] == counted["cats_plain"] < counted["cats_own"], counted
    # the optimizer's moments and step count, and one more step of each after its
    # checkpoint was reloaded into a new engine (the update from the gradients again)
    assert rec["optimizer_states_max_diff"] <= 1e-6, rec["optimizer_states_max_diff"]
    steps = rec["optimizer_steps"]
    assert steps[0] == steps[1] == 5, steps           # six steps, one skipped
    assert rec["resumed_max_diff"] <= 1e-5, rec["resumed_max_diff"]
    assert 1 <= counted["step_syncs_local"] <= counted["step_syncs_own"], counted
