"""The main job end to end on the demo data: real DeepSpeed engines with gloo on CPU ranks.

ZeRO-2 and ZeRO-3 with two ranks are checked against a plain single-process PyTorch loop at the
same global batch (same model init, same windows, AdamW, clipping, the learning rate each step
should take, computed here), checkpoints are resumed to identical losses and rates,
SIGTERM/SIGUSR1 checkpoint, ZeRO-3 checkpoints export to one fp32 state dict, and a pretrained
model is fine-tuned on new fields.
"""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO, free_port, run, wait_for_logged_steps
from tests.data.well_fixtures import (
    cube_3d_file,
    make_dataset,
    mixed_boundaries_dataset,
    nan_point_copy,
    partial_dims_file,
    rich_2d_file,
)

TINY = ["model.size=null", "model.dim=48", "model.heads=3", "model.blocks=2",
        "model.drop_path=0", "train.log_every=1", "train.eval_batches=0",
        "train.progress=false", "data.num_workers=1"]
STEPS = 12
MICRO = 2            # per rank with two ranks; the single-process reference uses 2 × MICRO
DS = {
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                              "weight_decay": 1e-3}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"total_num_steps": STEPS, "warmup_num_steps": 2,
                             "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}},
}


def ds_config(tmp_path, stage: int, micro: int = MICRO) -> str:
    path = tmp_path / f"ds_zero{stage}_mb{micro}.json"
    path.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": micro,
                                "zero_optimization": {"stage": stage}}))
    return str(path)


def train(ds: str, run_dir, sets=(), ranks: int = 1, resume: bool = False, data=None,
          **kwargs) -> subprocess.CompletedProcess:
    if ranks == 1:
        cmd = [sys.executable, "dsfm/train.py"]
    else:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()),
               "dsfm/train.py"]
    cmd += ["--ds_config", ds, "--run-dir", str(run_dir)]
    for s in list(TINY) + [f"data.base={data}"] * bool(data) + list(sets):
        cmd += ["--set", s]
    if resume:
        cmd.append("--resume")
    proc = run(cmd, **kwargs)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(run_dir) -> dict[int, float]:
    """step → train/loss from metrics.jsonl (a resumed run appends; the last record wins)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            if "train/loss" in rec:
                out[rec["step"]] = rec["train/loss"]
    return out


def logged(run_dir, key: str) -> dict[int, float]:
    """step → a logged scalar from metrics.jsonl (the last record of a step wins)."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            if key in rec:
                out[rec["step"]] = rec[key]
    return out


def train_cmd(ds: str, run_dir, sets=(), data=None) -> list[str]:
    """One process, refused inputs included (`train` asserts success)."""
    cmd = [sys.executable, "dsfm/train.py", "--ds_config", ds, "--run-dir", str(run_dir)]
    for s in list(TINY) + [f"data.base={data}"] * bool(data) + list(sets):
        cmd += ["--set", s]
    return cmd


def start_ranks(cmd: list[str], world: int = 2) -> list[subprocess.Popen]:
    """`cmd` started as `world` ranks on this node, each with the environment DeepSpeed's
    launcher gives it (stdout and stderr piped, as text)."""
    port = str(free_port())
    return [subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE,
                             env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r),
                                  "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
            for r in range(world)]


def ranks_by_hand(cmd: list[str], world: int = 2) -> list[tuple[int, str, str]]:
    """`cmd` run as `world` ranks (`start_ranks`), all waited for: (exit code, stdout, stderr)
    per rank, each rank's apart. (The launcher sends SIGTERM to the other ranks as soon as one
    exits with an error; that ended a rank before its line, a race CI lost for either rank,
    until ranks stopping on an error held SIGTERM.) A rank still running after 300 s (one
    waiting for a peer that stopped) is killed."""
    procs = start_ranks(cmd, world)
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def expected_rate(step: int) -> float:
    """The learning rate of step 1, 2, ... under DS's schedule: its (log) warmup rises from 0
    at step 0 to the peak at step W, its cosine falls from there to cos_min_ratio at step
    total_num_steps + 1, and no step is made at either end (DeepSpeed's own classes made
    steps 1 and 2 at 0)."""
    params, peak = DS["scheduler"]["params"], DS["optimizer"]["params"]["lr"]
    w, total, floor = params["warmup_num_steps"], params["total_num_steps"], params["cos_min_ratio"]
    if step <= w:
        return peak * math.log(step + 1) / math.log(w + 1)
    progress = min(1.0, (step - w) / (total + 1 - w))
    return peak * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)


def reference_losses(demo_base: str, steps: int, batch: int) -> tuple[list[float], list[float]]:
    """The same training as plain single-process PyTorch, no DeepSpeed engine: the losses and
    the learning rate each step's update used (`expected_rate`)."""
    from dsfm.data.fields import FieldVocabulary
    from dsfm.data.prepare import datasets_in

    paths = [os.path.join(demo_base, n) for n in datasets_in(demo_base)]
    vocab = FieldVocabulary()
    out, rates = [], []
    # one intra-op thread, whatever the process (an earlier test, or the machine) set: the
    # reference's rounding, and so its losses from step 3 on, moved with the thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _reference_steps(paths, vocab, steps, batch, out, rates)
    finally:
        torch.set_num_threads(threads)
    return out, rates


def _reference_steps(paths, vocab, steps: int, batch: int, out: list, rates: list) -> None:
    from dsfm.data.prefetch import WellLoader
    from dsfm.eval import nmse
    from dsfm.models.avit import AViT, AViTConfig

    with WellLoader(paths, batch_size=batch, num_workers=1, seed=0, rank=0, world_size=1,
                    same_dataset_across_ranks=True, vocabulary=vocab) as loader:
        torch.manual_seed(0)
        model = AViT(AViTConfig(len(vocab), 48, 3, 2, drop_path=0.0))
        opt_cfg = DS["optimizer"]["params"]
        opt = torch.optim.AdamW(model.parameters(), lr=opt_cfg["lr"],
                                betas=tuple(opt_cfg["betas"]), eps=opt_cfg["eps"],
                                weight_decay=opt_cfg["weight_decay"])
        it = iter(loader)
        for step in range(1, steps + 1):
            batch_ = next(it)
            scale, shift = loader.affine(batch_.dataset)
            loss = nmse(model(batch_.x, batch_.field_ids, batch_.bcs), batch_.y[:, 0],
                        scale=scale, shift=shift)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), DS["gradient_clipping"])
            opt.param_groups[0]["lr"] = expected_rate(step)
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            out.append(loss.item())
            del batch_


@pytest.fixture(scope="module")
def reference(demo_base):
    return reference_losses(demo_base, STEPS, 2 * MICRO)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_match_plain_training_learn_and_resume_identically(stage, demo_base,
                                                                     reference, tmp_path):
    ds = ds_config(tmp_path, stage)
    full = tmp_path / "full"
    proc = train(ds, full, [f"train.max_steps={STEPS}", "train.checkpoint_every=6",
                            "train.eval_at_start=true", "train.eval_batches=2",
                            "train.rollout_steps=1", "train.progress=true"], ranks=2,
                 data=demo_base)
    # one progress bar (rank 0's), and to a pipe (a Slurm log) redrawn every 30 s, not at
    # every step and log step: its start, its end, and under the lines printed (the
    # evaluation's; one more should the run pass 30 s)
    draws = [d for d in re.split(r"[\r\n]", proc.stdout) if re.search(r"\d+/%d \[" % STEPS, d)]
    assert len(draws) <= 6 and sum(f"{STEPS}/{STEPS} [" in d for d in draws) == 1, draws
    got = losses(full)
    assert sorted(got) == list(range(1, STEPS + 1))
    ours = [got[s] for s in range(1, STEPS + 1)]
    # ZeRO-partitioned two-rank training is the plain single-process training at the same
    # global batch: the same windows, the same updates, up to fp32 reduction order. That
    # order's difference grows under Adam (which turns a gradient near zero into a whole
    # step of either sign) by about 3x a step: measured on the demo data, rel 2.5e-8 at step
    # 3, 7e-6 at step 9, 4.8e-4 at step 11 on one navier_stokes batch. So the first steps
    # are held tight and the later ones to 2e-3, which a wrong window (a loss of another
    # batch, off by percents) or a wrong rate or clipping still exceeds.
    early = STEPS // 2
    assert ours[:early] == pytest.approx(reference[0][:early], rel=5e-5, abs=1e-7)
    assert ours == pytest.approx(reference[0], rel=2e-3, abs=1e-6)
    # train/lr is the rate each step's update used (not the next step's): from step 1 on, the
    # warmup's (DeepSpeed's own scheduler made steps 1 and 2 at 0)
    lr = logged(full, "train/lr")
    assert [lr[s] for s in range(1, STEPS + 1)] == pytest.approx(reference[1], rel=1e-6)
    assert min(lr.values()) > 0
    # it learns: on the same valid windows, the error after training is below the error
    # before it, on average and for most datasets (train losses mix datasets, too noisy here)
    before = json.loads((full / "eval_step00000000.json").read_text())
    after = json.loads((full / f"eval_step{STEPS:08d}.json").read_text())

    def mean_vrmse(fields):
        return sum(m["vrmse_1step"] for m in fields.values()) / len(fields)
    drops = [mean_vrmse(after[name]) < mean_vrmse(before[name]) for name in before]
    assert sum(drops) >= len(drops) - 1, (before, after)
    assert (sum(map(mean_vrmse, after.values())) < sum(map(mean_vrmse, before.values())))

    # a run of N steps, resumed for N more, gives identical losses
    half = tmp_path / "half"
    train(ds, half, ["train.max_steps=6", "train.checkpoint_every=6"], ranks=2, data=demo_base)
    proc = train(ds, half, [f"train.max_steps={STEPS}", "train.checkpoint_every=6"], ranks=2,
                 resume=True, data=demo_base)
    assert "resumed from step 6" in proc.stdout
    again = losses(half)
    assert [again[s] for s in range(7, STEPS + 1)] == [got[s] for s in range(7, STEPS + 1)]
    # at the same rates, on both sides of the resume
    assert logged(half, "train/lr") == lr
    ckpts = sorted(os.listdir(full / "checkpoints"))
    assert "step00000006" in ckpts and "step00000012" in ckpts
    # each rank draws its own drop-path masks: the ranks' torch streams differ
    states = [torch.load(full / "checkpoints" / "step00000012" / f"dsfm_rank{r}.pt",
                         weights_only=False)["rng"]["torch"] for r in (0, 1)]
    assert not torch.equal(states[0], states[1])

    # the checkpoint consolidates into one fp32 state dict that loads into a fresh AViT
    out = tmp_path / "model.pt"
    proc = run([sys.executable, "-m", "dsfm.runtime.export", str(full), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    payload = torch.load(out, weights_only=False)
    from dsfm.models.avit import AViT, AViTConfig
    model = AViT(AViTConfig(**payload["model_config"]))
    model.load_state_dict(payload["model"])
    assert payload["step"] == STEPS and all(v.dtype == torch.float32
                                            for v in payload["model"].values())
    stage_file = tmp_path.parent / f"final_weights_zero{stage}.pt"
    torch.save(payload["model"], stage_file)
    other = tmp_path.parent / f"final_weights_zero{5 - stage}.pt"
    if other.exists():
        # ZeRO-2 and ZeRO-3 end with the same weights: their difference is a tiny fraction of
        # how far training moved them (per element, Adam turns reduction-order noise in
        # near-zero gradients into lr-sized steps, so compare whole tensors)
        theirs = torch.load(other)
        torch.manual_seed(0)
        init = AViT(AViTConfig(**payload["model_config"])).state_dict()
        moved_all = differ_all = 0.0
        for name, value in payload["model"].items():
            moved = float((value - init[name]).norm())
            differ = float((value - theirs[name]).norm())
            moved_all, differ_all = moved_all + moved ** 2, differ_all + differ ** 2
            if moved > 1e-3:                # tensors whose gradients are not all ~0
                assert differ < 0.05 * moved, (name, differ, moved)
        assert differ_all ** 0.5 < 0.01 * moved_all ** 0.5


@pytest.mark.slow
def test_one_rank_zero2_takes_its_gradients_in_place_with_deepspeeds_numbers(demo_base,
                                                                            tmp_path):
    """On one rank ZeRO-2's reduction is the identity: the run takes the gradients where
    autograd leaves them (dsfm.runtime.zero_local), without DeepSpeed's per-parameter hooks,
    bucket copies and device synchronizations, and trains to the same losses, bit for bit, as
    with them (train.local_gradients=false), across a checkpoint and a resume. train.log says
    how it updates: on a CPU from DeepSpeed's flat copy of the gradients."""
    ds = ds_config(tmp_path, 2)
    train(ds, tmp_path / "local", ["train.max_steps=4", "train.checkpoint_every=4"],
          data=demo_base)
    train(ds, tmp_path / "local", ["train.max_steps=8", "train.checkpoint_every=4"],
          resume=True, data=demo_base)
    train(ds, tmp_path / "hooks", ["train.max_steps=8", "train.local_gradients=false"],
          data=demo_base)
    local, hooks = losses(tmp_path / "local"), losses(tmp_path / "hooks")
    assert sorted(local) == list(range(1, 9))
    assert local == hooks
    log = (tmp_path / "local" / "train.log").read_text()
    assert "gradients: taken in place on one rank" in log
    # (on a GPU, where DeepSpeed runs FusedAdam: from the gradients where they lie)
    assert ("update: from DeepSpeed's flat copy (the update is AdamW, not DeepSpeed's "
            "FusedAdam (a GPU's))") in log
    assert ("gradients: DeepSpeed's reduction (train.local_gradients is false)"
            in (tmp_path / "hooks" / "train.log").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["backward_matmuls=tn", "fp32_matmuls=3xtf32"])
def test_zero3_with_the_tn_backward_or_3xtf32_matches_plain_autograd_training(
        demo_base, reference, tmp_path, setting):
    """model.backward_matmuls=tn (the blocks' backward from copies of Wᵀ, dyᵀ and xᵀ, saved by
    dsfm's own autograd function), or model.fp32_matmuls=3xtf32 (every product of the blocks
    as three TF32 products, the same function's way of saving: the weight, split again in
    the backward), under two-rank ZeRO-3 with every parameter partitioned (persistence
    threshold 0: gathered for each call and released after it, gathered again for the
    backward): the losses of plain single-process training with autograd's strict-fp32
    products, to the tolerance of the first steps of the test above."""
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": MICRO,
                              "zero_optimization": {"stage": 3,
                                                    "stage3_param_persistence_threshold": 0}}))
    early = STEPS // 2
    run_dir = tmp_path / "run"
    train(str(ds), run_dir, [f"train.max_steps={early}", f"model.{setting}",
                             "train.eval_batches=0"], ranks=2, data=demo_base)
    got = losses(run_dir)
    assert [got[s] for s in range(1, early + 1)] == pytest.approx(reference[0][:early],
                                                                  rel=5e-5, abs=1e-7)
    assert setting.replace("=", ": ") in (run_dir / "config.yaml").read_text()
    log = (run_dir / "train.log").read_text()
    if setting.startswith("fp32"):
        assert "model.fp32_matmuls=3xtf32" in log
    # dsfm.runtime.zero_blocks, by default: each block's parameters gathered as one unit
    assert ("ZeRO-3 gathers parameters block by block (2 blocks, each as one unit; "
            "train.zero3_whole_blocks)") in log
    # DeepSpeed's prefetch and live-parameter limit: the whole model held at the peak
    held = re.search(r"ZeRO-3 holds all ([0-9,]+) elements of partitioned parameters gathered "
                     r"from each forward to its backward", log)
    total = re.search(r"field columns: ([0-9,]+) parameters", log)     # all partitioned
    assert held and total and held.group(1) == total.group(1)


@pytest.mark.slow
def test_checkpointed_blocks_train_like_kept_activations_under_two_rank_zero3(demo_base, tmp_path):
    """model.checkpoint_above_tokens=0 (every training micro-batch's blocks computed again in
    the backward) under two-rank ZeRO-3, every parameter partitioned and each block gathered
    whole, so the recomputation gathers the block again: the same losses, step by step, as
    keeping the activations."""
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": MICRO,
                              "zero_optimization": {"stage": 3,
                                                    "stage3_param_persistence_threshold": 0}}))
    got = {}
    for name, sets in (("kept", []), ("recomputed", ["model.checkpoint_above_tokens=0"])):
        train(str(ds), tmp_path / name, ["train.max_steps=3", "train.log_every=1",
                                         "train.eval_batches=0", *sets], ranks=2, data=demo_base)
        got[name] = losses(tmp_path / name)
    assert sorted(got["kept"]) == [1, 2, 3] and got["recomputed"] == got["kept"]
    assert ("the blocks' activations recomputed in the backward for micro-batches of more "
            "than 0 tokens") in (tmp_path / "recomputed" / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("whole", ["true", "false"], ids=["whole_blocks", "module_by_module"])
def test_checkpointed_blocks_under_zero3_on_ranks_whose_micro_batches_differ_in_tokens(
        tmp_path, whole):
    """model.checkpoint_above_tokens under two-rank ZeRO-3 with data.same_dataset_across_ranks
    false and grids of 32² and 32×64: a micro-batch of 2 has 32 or 64 tokens, so at a
    threshold of 32 one rank recomputed its blocks in the backward and the other did not.
    The recomputation gathers each block's parameters again, a collective the other rank
    never joined: the run hung at its first such micro-batch (gloo; a hang on NCCL too). The
    ranks now decide together, by the largest micro-batch of the step's ranks: the same
    losses, drop path on, as keeping the activations."""
    base = tmp_path / "data"
    mixed_boundaries_dataset(str(base), "mixed_sq", (32, 32))
    mixed_boundaries_dataset(str(base), "mixed_rect", (32, 64))
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0,
        "stage3_max_reuse_distance": 0}}))
    got = {}
    for name, sets in (("kept", []), ("recomputed", ["model.checkpoint_above_tokens=32"])):
        train(str(ds), tmp_path / name, ["train.max_steps=6", "model.drop_path=0.1",
                                         "data.same_dataset_across_ranks=false",
                                         f"train.zero3_whole_blocks={whole}", *sets],
              ranks=2, data=str(base), timeout=300)
        got[name] = losses(tmp_path / name)
    assert sorted(got["kept"]) == [1, 2, 3, 4, 5, 6] and got["recomputed"] == got["kept"]
    log = (tmp_path / "recomputed" / "train.log").read_text()
    assert "mixed_sq" in log and "mixed_rect" in log
    assert "the largest micro-batch of the ranks decides for all of them" in log


@pytest.mark.parametrize("leaf,line", [
    ({"classes": ["SpaceTimeBlock"]}, "ZeRO-3 gathers parameters of 2 modules as one unit each"),
    ({}, "ZeRO-3 gathers parameters module by module (the ds_config chooses"),
], ids=["blocks", "none"])
def test_zero3_log_says_what_a_ds_configs_own_leaf_modules_gather(demo_base, tmp_path, leaf,
                                                                   line):
    """A ds_config that names DeepSpeed's leaf modules itself is left to DeepSpeed, which
    marks them inside deepspeed.initialize: train.log counts them there. It said "module by
    module" of a config that makes the blocks leaf modules, whose blocks DeepSpeed gathered
    whole."""
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": MICRO,
                              "zero_optimization": {"stage": 3, "leaf_module": leaf}}))
    train(str(ds), tmp_path / "run", ["train.max_steps=1"], data=demo_base)
    assert line in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_zero3_on_two_ranks_whose_batches_take_different_attention_paths(tmp_path):
    """Square and non-square grids, each with files of periodic and of wall boundaries, drawn
    independently per rank: the ranks' micro-batches take different attention paths. ZeRO-3
    (every parameter partitioned) gathers a module's weights at each call of it and checks
    that every rank called the same modules; this run used to stop at its first step with a
    gloo collective mismatch (on NCCL, a hang). It trains and evaluates. With the modules
    inside the blocks gathered one by one (train.zero3_whole_blocks=false), where that
    mismatch lies in wait: by default a block's modules are gathered together, and which of
    them a rank calls no longer matters to ZeRO-3."""
    base = tmp_path / "data"
    mixed_boundaries_dataset(str(base), "mixed_sq", (32, 32))
    mixed_boundaries_dataset(str(base), "mixed_rect", (32, 64))
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": 2, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}}))
    proc = train(str(ds), tmp_path / "r", ["train.max_steps=6", "train.eval_batches=1",
                                           "data.same_dataset_across_ranks=false",
                                           "train.zero3_whole_blocks=false"],
                 ranks=2, data=str(base))
    assert "done: 6 steps" in proc.stdout + proc.stderr
    log = (tmp_path / "r" / "train.log").read_text()
    assert "mixed_sq" in log and "mixed_rect" in log
    assert ("ZeRO-3 gathers parameters module by module (train.zero3_whole_blocks is false)"
            in log)


@pytest.mark.slow
def test_default_command_under_the_deepspeed_launcher_trains_and_evaluates(tmp_path):
    """The README's main job with two ranks: generates the demo data under a lock (one rank
    simulates, the other waits), trains the demo model, evaluates, writes TensorBoard."""
    env = dict(os.environ, DSFM_DATA=str(tmp_path / "demo"))
    run_dir = tmp_path / "run"
    proc = run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
                "dsfm/train.py", "--ds_config", "ds_configs/zero2.json", "--run-dir",
                str(run_dir), "--set", "train.max_steps=30"], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("navier_stokes_2d", "shallow_water_2d", "gray_scott_reaction_diffusion",
                 "euler_2d"):
        assert (tmp_path / "demo" / name / "stats.yaml").is_file()
    assert "VRMSE1-4" in proc.stdout and "VRMSE@4" in proc.stdout
    assert "done: 30 steps" in proc.stdout
    assert "2 rank(s) via the DeepSpeed launcher" in proc.stdout
    for noise in ("Attempting to get learning rate", "all_gather_into_tensor"):  # DeepSpeed's
        assert noise not in proc.stdout + proc.stderr
    evals = json.loads((run_dir / "eval_step00000030.json").read_text())
    assert set(evals) == {"navier_stokes_2d", "shallow_water_2d",
                          "gray_scott_reaction_diffusion", "euler_2d"}
    for fields in evals.values():
        for m in fields.values():
            assert len(m["vrmse_per_step"]) == 4
            assert all(math.isfinite(v) and v > 0 for v in m["vrmse_per_step"])
            assert m["windows"] == 2 * 4 * 2    # eval_batches × micro-batch × ranks, summed

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/samples_per_sec"} <= tags
    assert any(t.startswith("train/loss/") for t in tags)
    assert "eval/euler_2d/density/vrmse_rollout4" in tags
    # each dataset's mean over its fields, The Well's per-dataset figure, in TensorBoard too
    full = acc.Scalars("eval/euler_2d/all_fields/vrmse_1step")[-1]
    assert full.step == 30 and full.value == pytest.approx(
        sum(m["vrmse_1step"] for f, m in evals["euler_2d"].items() if f != "all_fields") / 5)
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [10, 20, 30]
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[0] > lrs[-1] > 0                     # cosine decay from the JSON's schedule
    assert (run_dir / "train.log").read_text().count("step ") >= 3
    # the shipped ZeRO-2 engine clips with dsfm's multi-tensor gradient norm
    assert "gradient norm: one multi-tensor norm per step" in (run_dir / "train.log").read_text()
    # two ranks reduce their gradients through DeepSpeed's hooks and buckets
    assert ("gradients: DeepSpeed's reduction (the data-parallel group has more than one rank)"
            in (run_dir / "train.log").read_text())

    # dashboards: the CPU path of the monitor, cross-rank statistics, the layout, the report
    assert "GPU metrics unavailable" in proc.stdout
    assert {"time/data_wait_ms", "time/forward_ms", "time/backward_ms", "time/optimizer_ms",
            "time/step_ms", "time/step_ms/min", "time/step_ms/max", "perf/tflops",
            "perf/patches_per_sec", "perf/data_wait_pct", "system/cpu_pct",
            "system/process_cpu_pct", "system/rss_gib", "ranks/step_ms/r0",
            "ranks/step_ms/r1", "ranks/slowest"} <= tags
    assert not any(t.startswith("gpu/") for t in tags)
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.util import tensor_util
    config = acc.Tensors("custom_scalars__config__")[0]
    lay = layout_pb2.Layout()
    lay.ParseFromString(tensor_util.make_ndarray(config.tensor_proto).item())
    # a CPU run has no GPU dashboard (it opened first, on thirteen empty charts)
    assert {c.title for c in lay.category} == {"Throughput", "Step time", "Loss", "System"}
    step_ms = [e.value for e in acc.Scalars("time/step_ms")]
    lows = [e.value for e in acc.Scalars("time/step_ms/min")]
    highs = [e.value for e in acc.Scalars("time/step_ms/max")]
    assert all(lo <= mid <= hi for lo, mid, hi in zip(lows, step_ms, highs))
    phases = sum(acc.Scalars(f"time/{p}_ms")[-1].value for p in ("forward", "backward",
                                                                  "optimizer", "data_wait"))
    assert 0.5 * step_ms[-1] < phases <= 1.01 * step_ms[-1]

    report = run([sys.executable, "-m", "dsfm.monitor.report", str(run_dir)])
    assert report.returncode == 0, report.stderr
    assert (run_dir / "report.png").stat().st_size > 10_000
    assert "slowest rank:" in report.stdout and "of 2" in report.stdout
    assert "data wait" in report.stdout and "mean CPU" in report.stdout


def signal_when(cmd: list[str], ready, sig=signal.SIGTERM, group: bool = False,
                timeout_s: float = 180, **popen) -> tuple[bool, int, str, str]:
    """Start `cmd` (the trainer) from the repository, send it `sig` once `ready()` holds (or it
    ended, or `timeout_s` passed; to its whole process group with `group`, as a terminal's
    Ctrl-C), and wait for it: (whether `ready()` was seen, exit code, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=group, **popen)
    try:
        deadline = time.time() + timeout_s
        seen = False
        while time.time() < deadline and proc.poll() is None and not (seen := ready()):
            time.sleep(0.02)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return seen, proc.returncode, out, err


def step_tags(run_dir) -> list[str]:
    """A run's checkpoint tags (stepNNNNNNNN), complete or not, oldest first."""
    return sorted(t for t in os.listdir(run_dir / "checkpoints") if t.startswith("step"))


@pytest.mark.slow
@pytest.mark.parametrize("sig,stops", [(signal.SIGTERM, True), (signal.SIGUSR1, False)])
def test_signals_checkpoint_at_the_next_step(sig, stops, demo_base, tmp_path):
    ds = ds_config(tmp_path, 2, micro=4)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "dsfm/train.py", "--ds_config", ds, "--run-dir", str(run_dir)]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=400",
                     "train.checkpoint_every=0"]:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_logged_steps(run_dir, 3, 120)
    proc.send_signal(sig)
    if not stops:
        deadline = time.time() + 60
        while time.time() < deadline and not (run_dir / "checkpoints").exists():
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "signal received: checkpointing at step" in out
    tags = step_tags(run_dir)
    assert len(tags) == (1 if stops else 2), tags
    first = int(tags[0][4:])
    assert 3 <= first < 400
    if not stops:
        assert int(tags[1][4:]) > first               # SIGUSR1 carried on training
    assert "stopped at step" in out and "--resume" in out


def test_a_sigterm_during_an_evaluation_checkpoints_right_after_it(demo_base, tmp_path):
    """Slurm's SIGKILL follows its SIGTERM after KillWait (often 30 s). A SIGTERM that came
    during an evaluation waited for the next signal check, signal_check_every steps later;
    the ranks now agree on it right after the evaluation, and checkpoint and stop there. Here
    step 4 is evaluated and the next check is at step 8: the checkpoint must be step 4's."""
    ds = ds_config(tmp_path, 2, micro=4)
    run_dir = tmp_path / "run"
    sets = ["train.max_steps=40", "train.eval_every=4", "train.eval_batches=4",
            "train.rollout_steps=4", "train.signal_check_every=8", "train.checkpoint_every=0"]
    metrics = run_dir / "metrics.jsonl"
    # step 4's training scalars are written before its evaluation starts
    _, rc, out, err = signal_when(
        train_cmd(ds, run_dir, sets, data=demo_base),
        lambda: metrics.exists() and any(json.loads(line).get("step") == 4
                                         for line in metrics.read_text().splitlines()))
    assert rc == 0, out[-2000:] + err[-2000:]
    assert "evaluation at step 4" in out
    assert "signal received: checkpointing at step 4 and stopping" in out, out[-2000:]
    assert step_tags(run_dir) == ["step00000004"]
    assert (run_dir / "eval_step00000004.json").is_file()
    assert "stopped at step 4" in out


def test_ctrl_c_stops_the_run_in_one_line_naming_the_checkpoint_to_resume(demo_base, tmp_path):
    """Ctrl-C (SIGINT to the terminal's foreground process group: the trainer and its reader
    processes) printed a KeyboardInterrupt traceback of some sixty lines from the middle of the
    model's forward. It is one line now, with the checkpoint a --resume continues from."""
    run_dir = tmp_path / "run"
    metrics = run_dir / "metrics.jsonl"
    # SIGINT's default restored for the trainer: a shell starts background jobs (a CI script
    # run with &) with it ignored, which the trainer then inherits, as it should
    seen, rc, out, err = signal_when(
        train_cmd(ds_config(tmp_path, 2, micro=4), run_dir,
                  ["train.max_steps=400", "train.checkpoint_every=2"], data=demo_base),
        lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3,
        signal.SIGINT, group=True, timeout_s=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert seen, "the run logged no 3 steps"
    assert rc == 130, out[-2000:] + err[-2000:]
    lines = [line for line in err.splitlines() if "Setting accelerator to CPU" not in line]
    assert len(lines) == 1, err
    tags = sorted(t for t in os.listdir(run_dir / "checkpoints")       # a save cut short:
                  if (run_dir / "checkpoints" / t / "COMPLETE").is_file())   # not resumable
    assert lines[0] == (f"interrupted (rank 0, SIGINT): stopped without a checkpoint; --resume "
                        f"--run-dir {run_dir} continues from step {int(tags[-1][4:])} (SIGTERM "
                        "checkpoints before it stops)")


def test_sigusr1_during_the_start_up_does_not_end_the_run(demo_base, tmp_path):
    """Slurm's warning signal (SIGUSR1: checkpoint and carry on) arriving while the run starts
    (process group, data, model, engine) is not the end of the run: its default action would
    kill the process there."""
    ds = ds_config(tmp_path, 2, micro=4)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "dsfm/train.py", "--ds_config", ds, "--run-dir", str(run_dir)]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=3"]:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log, metrics = run_dir / "train.log", run_dir / "metrics.jsonl"
    sent = 0
    deadline = time.time() + 120
    while (time.time() < deadline and proc.poll() is None
           and not (metrics.exists() and metrics.stat().st_size)):   # until the first step
        if log.exists():                # the process group is up: signal every 50 ms
            proc.send_signal(signal.SIGUSR1)
            sent += 1
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert sent, "the run never started"
    assert proc.returncode == 0, (sent, proc.returncode, out[-2000:] + err[-2000:])
    assert "done: 3 steps" in out


def test_sigusr1_to_every_process_during_evaluations_checkpoints_and_carries_on(demo_base,
                                                                               tmp_path):
    """Slurm's --signal reaches every process of the job step, the readers of the loader that
    each evaluation builds too. A reader signalled while it started (before it could ignore
    the signal) died of it, and the run stopped with "reader process 0 ... died (killed by
    signal 10) while starting" instead of checkpointing and carrying on. Here the trainer and
    all its processes are signalled every 20 ms from its first step on, through an evaluation
    at every step: the run checkpoints, evaluates and finishes."""
    import psutil

    ds = ds_config(tmp_path, 2, micro=4)
    run_dir = tmp_path / "run"
    sets = ["train.max_steps=3", "train.eval_every=1", "train.eval_batches=1",
            "train.rollout_steps=1", "train.signal_check_every=1", "train.checkpoint_every=0",
            "train.keep_checkpoints=3"]
    proc = subprocess.Popen(train_cmd(ds, run_dir, sets, data=demo_base), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    sent = 0
    try:
        trainer = psutil.Process(proc.pid)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.stat().st_size:      # from the first step on
                for p in [trainer] + trainer.children(recursive=True):
                    try:
                        p.send_signal(signal.SIGUSR1)
                        sent += 1
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(0.02)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sent, "the run never logged a step"
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    assert "done: 3 steps" in out and "evaluation at step 3" in out
    assert "signal received: checkpointing at step" in out and "stopping" not in out
    assert (run_dir / "checkpoints" / "step00000003" / "COMPLETE").is_file()


@pytest.mark.slow
def test_a_signal_to_one_rank_checkpoints_all_ranks(demo_base, tmp_path):
    """SIGUSR1 to rank 1 only, later SIGTERM to rank 0 only: both ranks checkpoint at the same
    steps (they agree through an all-reduce) and both stop."""
    import psutil

    ds = ds_config(tmp_path, 2)
    run_dir = tmp_path / "run"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "dsfm/train.py",
           "--ds_config", ds, "--run-dir", str(run_dir)]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=2000",
                     "train.checkpoint_every=0", "train.signal_check_every=2"]:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        wait_for_logged_steps(run_dir, 3, 180)
        ranks = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            cmdline = " ".join(child.cmdline())
            if "dsfm/train.py" in cmdline and "--local_rank" in cmdline:
                ranks[int(cmdline.split("--local_rank=")[1].split()[0])] = child
        assert sorted(ranks) == [0, 1], ranks
        ranks[1].send_signal(signal.SIGUSR1)
        deadline = time.time() + 60
        while time.time() < deadline and not (run_dir / "checkpoints").exists():
            time.sleep(0.1)
        time.sleep(1.0)
        ranks[0].send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    tags = step_tags(run_dir)
    assert len(tags) == 2, (tags, out[-2000:])
    for tag in tags:                                  # written by both ranks, complete
        files = os.listdir(run_dir / "checkpoints" / tag)
        assert {"dsfm_rank0.pt", "dsfm_rank1.pt", "COMPLETE"} <= set(files)
        assert int(tag[4:]) % 2 == 0
    assert "stopped at step" in out


@pytest.mark.slow
@pytest.mark.parametrize("killed", ["runner", "launch", "torchrun"])
def test_ranks_whose_launcher_dies_checkpoint_and_stop(killed, demo_base, tmp_path):
    """SIGTERM to the `deepspeed` runner (a user's kill, Slurm's scancel reaching the job's
    script) ended the runner alone: on one node it has no handler, so its launch process and
    both ranks trained on, orphaned, and wrote no checkpoint; SIGKILL to the launch process, or
    to torchrun (the OOM killer; its SIGTERM it passes on itself), orphaned the ranks alike.
    Now the ranks see it, checkpoint at one step and stop."""
    import psutil

    run_dir, out = tmp_path / "run", tmp_path / "out.txt"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
                if killed == "torchrun" else ["deepspeed", "--num_gpus", "2"])
    cmd = launcher + ["--master_port", str(free_port()), "dsfm/train.py",
                      "--ds_config", ds_config(tmp_path, 2), "--run-dir", str(run_dir)]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=100000",
                     "train.checkpoint_every=0", "train.signal_check_every=2"]:
        cmd += ["--set", s]
    tree = []
    with open(out, "w") as fh:          # a file: the ranks outlive the launcher's pipes
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        assert wait_for_logged_steps(run_dir, 3, 180), out.read_text()[-3000:]
        tree = psutil.Process(proc.pid).children(recursive=True)
        if killed == "torchrun":
            assert len([p for p in tree if p.ppid() == proc.pid]) == 2, tree
            proc.kill()
        else:
            [launch] = [p for p in tree if "deepspeed.launcher.launch" in p.cmdline()]
            assert len([p for p in tree if p.ppid() == launch.pid]) == 2, tree
            if killed == "runner":
                proc.send_signal(signal.SIGTERM)
            else:
                launch.kill()
        _, alive = psutil.wait_procs(tree, timeout=120)
        assert not alive, ([" ".join(p.cmdline())[:80] for p in alive], out.read_text()[-2000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in tree:                  # the orphans, outside the launcher's process group
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        proc.wait(timeout=60)
    text = out.read_text()
    gone = (rf"torchrun \(pid {proc.pid}\)" if killed == "torchrun" else
            r"(DeepSpeed's launcher \(\S+, pid \d+\)|the deepspeed runner \(pid \d+\) that "
            r"started DeepSpeed's launcher)")
    # whichever rank looks first stops the other at the next signal check, often before it looks
    assert re.search(rf"rank [01]: {gone} has exited and left the ranks running", text), \
        text[-2000:]
    assert "signal received: checkpointing at step" in text and "stopped at step" in text
    tags = [t for t in os.listdir(run_dir / "checkpoints") if t.startswith("step")]
    assert len(tags) == 1 and int(tags[0][4:]) % 2 == 0, tags
    assert {"dsfm_rank0.pt", "dsfm_rank1.pt", "COMPLETE"} <= set(
        os.listdir(run_dir / "checkpoints" / tags[0]))


@pytest.mark.slow
def test_fine_tuning_adds_new_fields_and_freezes_the_processor(demo_base, tmp_path):
    ds = ds_config(tmp_path, 2, micro=4)
    pre = tmp_path / "pre"
    train(ds, pre, ["train.max_steps=3", "data.datasets=[euler_2d, navier_stokes_2d]"],
          data=demo_base)
    proc = run([sys.executable, "-m", "dsfm.runtime.export", str(pre)])
    assert proc.returncode == 0, proc.stderr
    exported = torch.load(pre / "export" / "model_fp32.pt", weights_only=False)
    n_pre = len(exported["vocabulary"]["keys"])
    assert n_pre == 10                                  # 5 euler + 5 navier-stokes fields

    tune = tmp_path / "tune"
    proc = train(ds, tune, ["train.max_steps=3", f"train.init_from={pre}",
                            "train.freeze=processor",
                            "data.datasets=[shallow_water_2d, euler_2d]"], data=demo_base)
    assert "fine-tuning from" in proc.stdout and "13 fields (10 pretrained)" in proc.stdout
    proc = run([sys.executable, "-m", "dsfm.runtime.export", str(tune)])
    assert proc.returncode == 0, proc.stderr
    tuned = torch.load(tune / "export" / "model_fp32.pt", weights_only=False)
    assert tuned["vocabulary"]["keys"][:n_pre] == exported["vocabulary"]["keys"]
    assert tuned["model"]["space_bag.weight"].shape[1] == 13
    for name, value in exported["model"].items():
        if name.startswith("blocks."):                  # frozen
            assert torch.equal(tuned["model"][name], value), name
    assert not torch.equal(tuned["model"]["embed.in_proj.0.weight"],
                           exported["model"]["embed.in_proj.0.weight"])


def mpirun_launcher() -> str:
    for name in ("mpirun", "mpiexec"):
        beside = os.path.join(os.path.dirname(sys.executable), name)
        found = beside if os.access(beside, os.X_OK) else shutil.which(name)
        if found:
            return found
    pytest.skip("no mpirun beside python or on PATH: pip install -e '.[test]' brings MPICH")


@pytest.mark.slow
def test_mpirun_launch_discovers_ranks_through_mpi4py(demo_base, tmp_path):
    mpirun = mpirun_launcher()
    pytest.importorskip("mpi4py")
    ds = ds_config(tmp_path, 2)
    run_dir = tmp_path / "mpi"
    cmd = [mpirun, "-np", "2", sys.executable, "dsfm/train.py", "--ds_config", ds,
           "--run-dir", str(run_dir)]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=3"]:
        cmd += ["--set", s]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = run(cmd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) via mpirun" in proc.stdout
    assert sorted(losses(run_dir)) == [1, 2, 3]
    assert sorted(os.listdir(run_dir / "checkpoints" / "step00000003")).count("COMPLETE") == 1


@pytest.mark.slow
def test_torchrun_launch(demo_base, tmp_path):
    ds = ds_config(tmp_path, 3)
    run_dir = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "dsfm/train.py", "--ds_config", ds, "--run-dir", str(run_dir)]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=3"]:
        cmd += ["--set", s]
    proc = run(cmd, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 rank(s) via torchrun" in proc.stdout and "ZeRO stage 3" in proc.stdout
    assert sorted(losses(run_dir)) == [1, 2, 3]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_blocks(demo_base, tmp_path):
    """model.compile=true (regional torch.compile of the space-time blocks, inductor's CPU
    backend here) under a ZeRO-2 engine: the same losses as the eager model, step by step."""
    ds = ds_config(tmp_path, 2, micro=2 * MICRO)
    got = {}
    for name, sets in (("eager", []), ("compiled", ["model.compile=true"])):
        proc = train(ds, tmp_path / name, sets=["train.max_steps=4", *sets], data=demo_base,
                     timeout=900)
        got[name] = losses(tmp_path / name)
    assert "space-time blocks compiled" in proc.stdout
    assert "numerics: fp32 (TF32 off for matmuls and cuDNN convolutions)" in proc.stdout
    # compiled code really ran: two graphs (the blocks on every frame, the last block on its
    # decoded frame) per periodicity of the four demo datasets at most (one input shape,
    # training only: eval_batches=0)
    graphs = int(re.search(r"compiled graphs: (\d+) ", proc.stdout).group(1))
    assert graphs in (2, 4, 6, 8)
    assert sorted(got["eager"]) == sorted(got["compiled"]) == [1, 2, 3, 4]
    for step, loss in got["eager"].items():
        assert got["compiled"][step] == pytest.approx(loss, rel=1e-4, abs=1e-6), step
    assert len(set(got["eager"].values())) == 4                 # the steps really differ


def test_compile_with_zero3_is_refused_before_any_process_group(tmp_path):
    proc = run([sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero3.json",
                "--run-dir", str(tmp_path / "r"), "--set", "model.compile=true"])
    assert proc.returncode == 2
    assert "model.compile" in proc.stderr and "stage 3" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_compile_auto_runs_eager_on_a_cpu_and_with_zero3_and_says_why(demo_base, tmp_path):
    """The MPP presets say model.compile=auto: compiled on a GPU with ZeRO 0-2, eager on a CPU or
    with ZeRO-3, where model.compile=true is refused (above)."""
    for stage in (2, 3):
        proc = train(ds_config(tmp_path, stage), tmp_path / f"z{stage}",
                     sets=["train.max_steps=1", "model.compile=auto"], data=demo_base)
        why = "ZeRO-3: its parameter gathering" if stage == 3 else "no GPU: on a CPU"
        assert f"space-time blocks eager (model.compile=auto, {why}" in proc.stdout
        assert "compiled graphs" not in proc.stdout and "blocks compiled" not in proc.stdout
        assert sorted(losses(tmp_path / f"z{stage}")) == [1]
    # the demo's tensors are all under DeepSpeed's default persistence threshold (1e5)
    assert ("ZeRO-3 partitions none of the parameters: every tensor is under "
            "stage3_param_persistence_threshold (100000 elements)"
            in (tmp_path / "z3" / "train.log").read_text())


def test_compile_mode_reduce_overhead_needs_compiled_blocks_kept_before_any_process_group(
        tmp_path):
    """model.compile_mode=reduce-overhead (the compiled blocks as CUDA graphs) without
    model.compile, or with the blocks recomputed (model.checkpoint_above_tokens, which the
    MPP presets set), is one line before any process group."""
    base = [sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero2.json",
            "--run-dir", str(tmp_path / "r"), "--set", "model.compile_mode=reduce-overhead"]
    proc = run(base)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "set model.compile=true (or auto)" in proc.stderr
    proc = run(base + ["--config", "mpp_b", "--set", "model.compile=true"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "unset model.checkpoint_above_tokens (16384" in proc.stderr
    accumulating = tmp_path / "accumulating.json"
    accumulating.write_text(json.dumps({**json.loads(open(
        os.path.join(REPO, "ds_configs", "zero2.json")).read()),
        "gradient_accumulation_steps": 2}))
    proc = run(base[:3] + [str(accumulating)] + base[4:] + ["--set", "model.compile=true"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "with 2 micro-batches a step (gradient_accumulation_steps)" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recompute", [[], ["model.checkpoint_above_tokens=0"],
                                       ["model.compile_mode=reduce-overhead"]],
                         ids=["kept", "recomputed", "graphs"])
def test_compile_auto_compiles_the_blocks_on_cuda(demo_base, tmp_path, recompute):
    """On a GPU with ZeRO-2, model.compile=auto compiles the blocks, through train.py; and
    the compiled blocks recomputed in the backward (model.checkpoint_above_tokens), or
    replayed as CUDA graphs (model.compile_mode=reduce-overhead)."""
    proc = train(ds_config(tmp_path, 2), tmp_path / "r",
                 sets=["train.max_steps=3", "model.compile=auto", *recompute], data=demo_base,
                 timeout=600)
    assert "space-time blocks compiled (torch.compile, regional; model.compile=auto on a GPU" \
        in proc.stdout
    if "model.compile_mode=reduce-overhead" in recompute:
        assert "the compiled blocks replayed as CUDA graphs (model.compile_mode" in proc.stdout
        assert "CUDA graphs: 0 compiled graphs run without them" in proc.stdout
    assert int(re.search(r"compiled graphs: (\d+) ", proc.stdout).group(1)) >= 2
    assert sorted(losses(tmp_path / "r")) == [1, 2, 3]


def test_bad_config_is_refused_before_any_process_group(tmp_path):
    base = [sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero2.json"]
    proc = run(base + ["--set", "train.max_stpes=3"])
    assert proc.returncode == 2 and "max_stpes" in proc.stderr and "max_steps" in proc.stderr
    proc = run(base + ["--set", "model.size=XL"])
    assert proc.returncode == 2 and "model.size" in proc.stderr
    # two settings that each hold but not together (the model's own check, before the group)
    proc = run(base + ["--run-dir", str(tmp_path / "r"), "--set", "model.fp32_matmuls=3xtf32",
                       "--set", "model.backward_matmuls=tn"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "model.backward_matmuls=tn" in proc.stderr and "model.fp32_matmuls=3xtf32" in proc.stderr
    assert not (tmp_path / "r").exists()
    proc = run([sys.executable, "dsfm/train.py", "--ds_config", str(tmp_path / "nope.json")])
    assert proc.returncode == 2 and "nope.json" in proc.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{\"gradient_accumulation_steps\": 1}")
    proc = run([sys.executable, "dsfm/train.py", "--ds_config", str(bad)])
    assert proc.returncode == 2 and "train_micro_batch_size_per_gpu" in proc.stderr


def test_config_files_that_are_not_utf8_are_one_line(tmp_path):
    """A run config or DeepSpeed config saved in Latin-1 (an accent in a comment) stopped the
    run with a UnicodeDecodeError traceback."""
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_bytes("train:\n  max_steps: 3   # café\n".encode("latin-1"))
    proc = run([sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero2.json",
                "--config", str(run_yaml)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: --config {run_yaml}: not valid YAML at byte 29: "
                                   "0xe9 is not utf-8 (invalid continuation byte); save the "
                                   "file as UTF-8")
    ds = tmp_path / "ds.json"
    ds.write_bytes('{"train_micro_batch_size_per_gpu": 4, "_note": "café"}'.encode("latin-1"))
    proc = run([sys.executable, "dsfm/train.py", "--ds_config", str(ds)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: --ds_config {ds}: not valid JSON: byte 51 (0xe9) "
                                   "is not utf-8 (invalid continuation byte); save the file "
                                   "as UTF-8")


def test_missing_data_names_the_path(tmp_path):
    proc = run([sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero2.json",
                "--run-dir", str(tmp_path / "r"), "--set", f"data.base={tmp_path / 'none'}",
                "--set", "data.generate=null", "--set", "data.datasets=[euler_2d]"])
    assert proc.returncode == 2 and str(tmp_path / "none" / "euler_2d") in proc.stderr
    assert "python -m dsfm.sim --preset demo" in proc.stderr     # a dataset dsfm simulates
    assert not (tmp_path / "r").exists()            # refused before the run started
    proc = run([sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero2.json",
                "--run-dir", str(tmp_path / "r"), "--set", f"data.base={tmp_path / 'none'}",
                "--set", "data.generate=null", "--set", "data.datasets=[euler_2d, shear_flow]"])
    assert proc.returncode == 2 and str(tmp_path / "none" / "shear_flow") in proc.stderr
    assert "dsfm.sim" not in proc.stderr and "the-well-download" in proc.stderr  # The Well's
    assert len(proc.stderr.strip().splitlines()) == 1


def test_data_the_simulation_will_not_make_is_refused_before_it_runs(tmp_path):
    """With data.generate and no data in data.base yet, a listed dataset the preset does not
    make, or a PDEBench file that is not there, was found missing only after the process
    group started and the simulation ran (about 11 minutes for `small`), with exit code 1."""
    base = tmp_path / "gen"
    for sets, missing in [(["data.datasets=[euler_2d, shear_flow]"], base / "shear_flow"),
                          ([f"data.pdebench=[{tmp_path / 'swe.h5'}]"], tmp_path / "swe.h5")]:
        proc = run([sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero2.json",
                    "--run-dir", str(tmp_path / "r"), "--set", f"data.base={base}",
                    "--set", "data.generate=demo"] + [a for s in sets for a in ("--set", s)])
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert proc.stderr.startswith(f"error: data: not found: {missing} ")
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not base.exists() and not (tmp_path / "r").exists()    # nothing simulated
        # data.base is where a dataset named is looked for, not a PDEBench path's place
        assert ("data.base is" in proc.stderr) == (missing.parent == base), proc.stderr
        assert ("point data.base" in proc.stderr) == (missing.parent == base), proc.stderr
    # windows the preset's trajectories (24 steps for demo) cannot hold: found after the
    # simulation, exit code 1 (on two ranks, after a C++ stack trace of the other rank's)
    for sets, line in [
            (["train.rollout_steps=30"], "evaluation with train.rollout_steps=30: the demo "
             f"preset's navier_stokes_2d (to be simulated into {base}): 24 time steps are not "
             "enough for 4 input and 30 output steps with a stride of 1; lower "
             "train.rollout_steps or set train.eval_batches=0"),
            (["data.datasets=[shallow_water_2d]", "data.n_steps_input=12", "data.dt_stride=2"],
             "data.n_steps_input=12: the demo preset's shallow_water_2d (to be simulated into "
             f"{base}): 24 time steps are not enough for 12 input and 1 output steps with a "
             "stride of 2; lower data.n_steps_input or data.dt_stride")]:
        proc = run([sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero2.json",
                    "--run-dir", str(tmp_path / "r"), "--set", f"data.base={base}",
                    "--set", "data.generate=demo"] + [a for s in sets for a in ("--set", s)])
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert proc.stderr.strip() == f"error: {line}", proc.stderr
        assert not base.exists() and not (tmp_path / "r").exists()    # nothing simulated
    # one step shorter, they fit (4 + 20 steps; 11 + 1 steps every 2nd span 23 of the 24)
    from dsfm.data.prepare import check_preset_windows
    from dsfm.errors import ConfigError
    check_preset_windows(str(base), [], "demo", 4, 1, 20)
    check_preset_windows(str(base), ["shallow_water_2d"], "demo", 11, 2, None)
    with pytest.raises(ConfigError, match="rollout_steps=21: the demo preset's navier_stokes_2d"):
        check_preset_windows(str(base), [], "demo", 4, 1, 21)
    assert not base.exists()



def test_a_dataset_the_simulation_will_make_is_known_however_its_path_is_written(
        tmp_path, monkeypatch):
    """The check before the simulation compared the listed dataset's path with data.base's as
    written: a relative data.base with the dataset given as an absolute path, or either seen
    through a symbolic link, was refused as 'not found' though the simulation makes it."""
    from dsfm.data.prepare import check_to_generate
    from dsfm.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    check_to_generate("gen", [str(tmp_path / "gen" / "euler_2d")], [], "demo")
    check_to_generate(str(tmp_path / "link" / "gen"),
                      [str(tmp_path / "real" / "gen" / "euler_2d")], [], "demo")
    with pytest.raises(ConfigError, match="not found: .*real/gen/shear_flow "):
        check_to_generate("link/gen", [str(tmp_path / "real" / "gen" / "shear_flow")], [],
                          "demo")

def test_a_home_directory_in_paths_is_expanded(tmp_path, monkeypatch):
    """`--run-dir=~/r` (one word: the shell expands no ~ there) and `--set data.base=~/d`
    reached the run as is, a directory named ~ under the working directory."""
    from dsfm.train import parse_args

    monkeypatch.setenv("HOME", str(tmp_path))
    proc = run([sys.executable, "dsfm/train.py", "--ds_config", "ds_configs/zero2.json",
                "--set", "data.base=~/none", "--set", "data.generate=null",
                "--set", "data.datasets=[euler_2d]"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"not found: {tmp_path / 'none' / 'euler_2d'} " in proc.stderr
    args = parse_args(["--ds_config=~/ds.json", "--config=~/run.yaml", "--run-dir=~/r"])
    assert (args.ds_config, args.config, args.run_dir) == (
        str(tmp_path / "ds.json"), str(tmp_path / "run.yaml"), str(tmp_path / "r"))


def test_an_evaluation_the_valid_split_cannot_serve_stops_the_run_before_its_first_step(
        demo_base, tmp_path):
    """A rollout longer than the valid trajectories allow is refused at start-up, naming the
    setting, not after training up to the first evaluation; an eval_batches beyond the valid
    split is capped at one pass, said in the log."""
    ds = ds_config(tmp_path, 2, micro=4)
    cmd = [sys.executable, "dsfm/train.py", "--ds_config", ds, "--run-dir", str(tmp_path / "r")]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=3", "train.eval_every=2",
                     "train.eval_batches=2", "train.rollout_steps=40"]:
        cmd += ["--set", s]
    proc = run(cmd)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "train.rollout_steps=40" in proc.stderr and "time steps are not enough" in \
        proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()                     # before the process group
    train(ds, tmp_path / "capped", ["train.max_steps=1", "train.eval_batches=100000",
                                    "train.rollout_steps=1"], data=demo_base)
    log = (tmp_path / "capped" / "train.log").read_text()
    assert "train.eval_batches=100000, but the valid split holds fewer" in log
    assert (tmp_path / "capped" / "eval_step00000001.json").exists()


def test_batch_sizes_that_do_not_fit_the_world_are_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4,
                              "gradient_accumulation_steps": 1, "train_batch_size": 16}))
    proc = run([sys.executable, "dsfm/train.py", "--ds_config", str(ds)])
    assert proc.returncode == 2
    assert "train_batch_size 16 != micro-batch 4 × accumulation 1 × 1 ranks" in proc.stderr


def test_a_schedule_that_does_not_fit_the_run_is_refused_or_named(demo_base, tmp_path):
    """A cosine decay that ends before its warmup does trained on: the peak at the warmup's
    last step, the floor from the next. One that ends before train.max_steps trained its last
    steps at the floor rate without a word; now the log says so."""
    ds = tmp_path / "ds.json"
    sched = {"type": "WarmupCosineLR", "params": {"total_num_steps": 2, "warmup_num_steps": 3}}
    ds.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": 4, "scheduler": sched}))
    proc = run(train_cmd(str(ds), tmp_path / "r", ["train.max_steps=6"], data=demo_base))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: {ds}: scheduler WarmupCosineLR total_num_steps 2 "
                                   "is below warmup_num_steps 3: the rate would fall from its "
                                   "peak to its floor in one step after the warmup; raise "
                                   "total_num_steps (\"auto\": train.max_steps)")
    assert not (tmp_path / "r").exists()
    sched["params"]["warmup_num_steps"] = 1
    ds.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": 4, "scheduler": sched}))
    train(str(ds), tmp_path / "r", ["train.max_steps=4"], data=demo_base)
    assert "scheduler WarmupCosineLR reaches its floor at step 3 (total_num_steps 2), before " \
           "train.max_steps=4: steps 3-4 train at the floor rate" in \
           (tmp_path / "r" / "train.log").read_text()


def test_resuming_a_checkpoint_of_another_model_is_refused(demo_base, tmp_path):
    ds = ds_config(tmp_path, 2, micro=4)
    run_dir = tmp_path / "r"
    train(ds, run_dir, ["train.max_steps=2"], data=demo_base)
    cmd = [sys.executable, "dsfm/train.py", "--ds_config", ds, "--run-dir", str(run_dir),
           "--resume"]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=4", "model.dim=96"]:
        cmd += ["--set", s]
    proc = run(cmd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dim/heads/blocks (48, 3, 2), this run builds (96, 3, 2)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def diverging_ds_config(tmp_path, stage: int, accum: int = 1):
    """A ds_config at a learning rate of 1e30 from the first update: the first step's loss is
    finite, every later one is not."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": 4,
                              "gradient_accumulation_steps": accum,
                              "optimizer": {"type": "AdamW", "params": {"lr": 1e30}},
                              "scheduler": {"type": "WarmupLR", "params": {
                                  "warmup_num_steps": 1, "warmup_min_lr": 1e30,
                                  "warmup_max_lr": 1e30}},
                              "zero_optimization": {"stage": stage}}))
    return ds


@pytest.mark.parametrize("stage,ranks,accum", [
    (2, 1, 1), (0, 1, 1), pytest.param(3, 2, 2, marks=pytest.mark.slow)])
def test_a_diverging_run_skips_non_finite_losses_then_stops(demo_base, tmp_path, stage, ranks,
                                                            accum):
    """ZeRO skips the update on the device (the loss guarded, no host read before the
    backward: dsfm.runtime.nonfinite); on two ranks with accumulation the flags are reduced
    over the ranks after the skip. Without ZeRO, DeepSpeed would step on NaN gradients, so the
    loss is read before each backward and its micro-batch skipped."""
    ds = diverging_ds_config(tmp_path, stage, accum)
    cmd = ([sys.executable] if ranks == 1 else
           ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port())])
    cmd += ["dsfm/train.py", "--ds_config", str(ds), "--run-dir", str(tmp_path / "r")]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=50", "train.max_nonfinite=3"]:
        cmd += ["--set", s]
    proc = run(cmd)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    # the mean of a window whose every loss was non-finite is none, not NaN (nor a mean of
    # the skipped micro-batches' losses)
    logged_losses = losses(tmp_path / "r")
    assert math.isfinite(logged_losses[1])
    assert logged_losses == ({1: logged_losses[1], 2: None, 3: None} if stage else
                             {1: logged_losses[1]})
    assert "3 non-finite losses in a row" in proc.stderr and "lower the learning rate" in \
        proc.stderr
    # the other cause a run meets mid-way (docs/training.md: the stem's norm)
    assert "unless the data holds input frames uniform over space in every field" in proc.stderr
    log = (tmp_path / "r" / "train.log").read_text()
    assert log.count("non-finite loss at step") == 3
    if stage:
        assert "non-finite losses: caught on the device" in log
        assert ("non-finite loss at step 2 (dataset " if ranks == 1 else
                "non-finite loss at step 2 (micro-batch 1 of 2, rank 0's dataset ") in log
        for n in (1, 2, 3):
            assert f"DeepSpeed skipped the update ({n} in a row)" in log
        assert "micro-batch skipped" not in log
        assert "3 non-finite losses in a row at step 4" in proc.stderr
    else:
        assert "non-finite losses: read before each backward, the micro-batch skipped (the " \
            "optimizer is" in log
        assert "micro-batch skipped (1 in a row)" in log
        assert "DeepSpeed skipped" not in log
        assert "3 non-finite losses in a row at step 2" in proc.stderr


@pytest.mark.parametrize("stage", [2, 0])
def test_a_diverging_run_keeps_its_sound_checkpoints_and_names_one(demo_base, tmp_path, stage):
    """A run resumed at step 4 at a learning rate of 1e30: the update of step 5 is applied (its
    loss was finite) and every later loss is not. Step 5's checkpoint holds the weights that
    gave them; under ZeRO, checkpoints written during the skipped updates after it (steps 6
    and 7, with checkpoint_every 1) held them too and pruned the sound ones, and the stop
    message named the newest. Now a checkpoint_every checkpoint waits for an applied update,
    the message names step 4's and says to move step 5's aside, and that advice works."""
    ds = ds_config(tmp_path, stage, micro=4)
    run_dir = tmp_path / "r"
    keep = ["train.checkpoint_every=1", "train.keep_checkpoints=2"]
    train(ds, run_dir, ["train.max_steps=4"] + keep, data=demo_base)
    proc = run(train_cmd(str(diverging_ds_config(tmp_path, stage)), run_dir,
                         ["train.max_steps=20", "train.max_nonfinite=3",
                          "train.resume_schedule=new"] + keep, data=demo_base) + ["--resume"])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    ckpts = run_dir / "checkpoints"
    assert step_tags(run_dir) == ["step00000004", "step00000005"]
    assert math.isfinite(losses(run_dir)[5])
    assert "3 non-finite losses in a row at step " + ("8" if stage else "6") in proc.stderr
    assert (f"resume from the checkpoint of step 4 ({ckpts}) with train.resume_schedule=new"
            in proc.stderr)
    assert ("move step00000005 aside first (--resume takes the newest): it holds the weights "
            "of step 5, whose losses were not finite") in proc.stderr
    if stage:
        assert "checkpoint of step 6 deferred: its update was skipped" in \
            (run_dir / "train.log").read_text()
    # the advice: step 5's checkpoint moved aside, the run resumes from step 4 and learns
    shutil.move(str(ckpts / "step00000005"), str(tmp_path / "step00000005"))
    train(ds, run_dir, ["train.max_steps=6", "train.resume_schedule=new"] + keep,
          data=demo_base, resume=True)
    assert all(math.isfinite(losses(run_dir)[k]) for k in (5, 6))


def test_a_checkpoint_on_a_signal_during_skipped_updates_prunes_none(demo_base, tmp_path):
    """A preemption during updates skipped in a row still checkpoints (the run may recover),
    but that checkpoint holds the weights whose losses were not finite: it prunes no sound
    one. Fresh at 1e30: step 1's update is applied, every later one skipped."""
    run_dir = tmp_path / "r"
    log = run_dir / "train.log"
    _, rc, out, err = signal_when(
        train_cmd(str(diverging_ds_config(tmp_path, 2)), run_dir,
                  ["train.max_steps=400", "train.max_nonfinite=400", "train.checkpoint_every=1",
                   "train.keep_checkpoints=1", "train.signal_check_every=1"], data=demo_base),
        lambda: log.exists() and "skipped the update (3 in a row)" in log.read_text(),
        timeout_s=120)
    assert rc == 0, out[-2000:] + err[-2000:]
    tags = step_tags(run_dir)
    assert len(tags) == 2 and tags[0] == "step00000001", tags
    assert int(tags[1][4:]) >= 4
    assert "skipped updates: no older checkpoint pruned)" in out
    assert "checkpoint of step 2 deferred: its update was skipped" in log.read_text()
    # resumed, the streak goes on (it started again at 0): its count towards max_nonfinite,
    # and the advice knows step 1's update as the last applied, whose checkpoint holds the
    # weights that gave the non-finite losses (it said to resume from it)
    k = int(tags[1][4:])
    proc = run(train_cmd(str(diverging_ds_config(tmp_path, 2)), run_dir,
                         ["train.max_steps=400", f"train.max_nonfinite={k + 1}",
                          "train.checkpoint_every=1", "train.keep_checkpoints=1"],
                         data=demo_base) + ["--resume"])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{k + 1} non-finite losses in a row at step {k + 2}: " in proc.stderr, \
        proc.stderr[-2000:]
    assert (f"start again: the checkpoints kept (step00000001, {tags[1]}) hold the weights of "
            "step 1, whose losses were not finite") in proc.stderr, proc.stderr[-2000:]


def test_a_non_finite_loss_that_deepspeed_did_not_skip_stops_the_run_before_it_saves(
        demo_base, tmp_path):
    """The device-side guard relies on ZeRO's step skipping a non-finite norm. A DeepSpeed whose
    ZeRO-2 step did not (its check patched to say every norm is valid) applies the NaN update:
    the trainer's device count of non-finite losses in steps that were not skipped stops the
    run at the next log step, before any checkpoint of NaN weights."""
    ds = diverging_ds_config(tmp_path, 2)
    argv = ["--ds_config", str(ds), "--run-dir", str(tmp_path / "r")]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=6", "train.max_nonfinite=3",
                     "train.checkpoint_every=2"]:
        argv += ["--set", s]
    code = ("import sys\n"
            "import deepspeed.runtime.zero.stage_1_and_2 as zero12\n"
            "zero12.is_invalid_grad_norm = lambda norm: False\n"
            "from dsfm.runtime.dist import exit_process\n"
            "from dsfm.train import main\n"
            f"exit_process(main({argv!r}))\n")
    proc = run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("1 micro-batches with a non-finite loss reached an update by step 2: DeepSpeed's "
            "step did not skip them") in proc.stderr, proc.stderr[-2000:]
    log = (tmp_path / "r" / "train.log").read_text()
    assert "non-finite losses: caught on the device" in log and "skipped" not in log
    assert "checkpoint:" not in log                     # step 2's would have been NaN


def test_resume_with_another_world_size_or_zero_layout_is_refused(demo_base, tmp_path):
    """A checkpoint of 2 ranks cannot be resumed by 1 (sampler shards differ), nor one of ZeRO-2
    under ZeRO-3 or without ZeRO: a one-line error before any process group, from the
    checkpoint's metadata."""
    ds = ds_config(tmp_path, 2, micro=4)
    run_dir = tmp_path / "r"
    train(ds, run_dir, ["train.max_steps=2"], data=demo_base)
    tag = run_dir / "checkpoints" / "step00000002"
    # another ZeRO layout: DeepSpeed's load used to stop with a traceback after the process
    # group (ZeRO-3: AssertionError; no ZeRO: AttributeError); ZeRO-1 reads ZeRO-2's layout
    for stage in (3, 0):
        proc = run(train_cmd(ds_config(tmp_path, stage, micro=4), run_dir,
                             [f"data.base={demo_base}", "train.max_steps=4"]) + ["--resume"])
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert (f"was written under ZeRO stage 1 or 2 and this run's DeepSpeed config sets "
                f"stage {stage}") in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    from dsfm.runtime.checkpoint import check_resume
    assert check_resume(str(run_dir), (48, 3, 2), 1, zero_stage=1)["step"] == 2
    # another micro-batch: the loader's place in each dataset counts micro-batches of 4; this
    # used to be the sampler's error after the process group and DeepSpeed's load
    proc = run(train_cmd(ds_config(tmp_path, 2, micro=2), run_dir,
                         [f"data.base={demo_base}", "train.max_steps=4"]) + ["--resume"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("was trained with micro-batches of 4 (train_micro_batch_size_per_gpu), this run's "
            "DeepSpeed config sets 2") in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # another accumulation trains on, with a warning (it used to say nothing)
    from dsfm.runtime.checkpoint import check_batch
    saved = check_resume(str(run_dir), (48, 3, 2), 1, zero_stage=2)
    assert check_batch(saved, str(tag), 4, 1, 1) is None
    assert "gradient_accumulation_steps=1 (4 samples per step), this run's DeepSpeed config " \
        "sets 3 (12 samples per step)" in check_batch(saved, str(tag), 4, 3, 1)
    meta = json.loads((tag / "dsfm_meta.json").read_text())
    assert meta["world_size"] == 1
    (tag / "dsfm_meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    proc = run(train_cmd(ds, run_dir, [f"data.base={demo_base}", "train.max_steps=4"]) +
               ["--resume"])
    assert proc.returncode == 2 and "written by 2 ranks; this run has 1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_resume_with_another_sampling_is_refused_before_the_process_group(demo_base, tmp_path):
    """Another seed, data.weights, data.same_dataset_across_ranks or window count (n_steps_input,
    the files) used to be refused by the sampler's state check alone, after the process group,
    the engine and DeepSpeed's load. Now one line, from the checkpoint's metadata, names the
    option and both values; a checkpoint without that record is left to the sampler's check."""
    data = _demo_copy(demo_base, tmp_path, None)
    ds = ds_config(tmp_path, 2, micro=4)
    run_dir = tmp_path / "r"
    train(ds, run_dir, ["train.max_steps=2"], data=data)
    tag = run_dir / "checkpoints" / "step00000002"

    def resume(*sets):
        return run(train_cmd(ds, run_dir, [f"data.base={data}", "train.max_steps=3", *sets])
                   + ["--resume"])

    def refused(*sets):
        proc = resume(*sets)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return proc.stderr

    where = f"--resume: {tag} was trained with "
    assert (where + "data.weights=None (shares 0.25/0.25/0.25/0.25), this run sets "
            "[1.0, 1.0, 1.0, 3.0] (shares 0.167/0.167/0.167/0.5)") in refused(
                "data.weights=[1, 1, 1, 3]")
    assert where + "train.seed=0, this run sets 7" in refused("train.seed=7")
    assert where + "data.same_dataset_across_ranks=True, this run sets False" in refused(
        "data.same_dataset_across_ranks=false")
    assert (where + "data.n_steps_input=4, this run sets 3 (dataset euler_2d: 160 train "
            "windows then, 168 now)") in refused("data.n_steps_input=3")
    from dsfm.errors import ConfigError
    from dsfm.runtime.checkpoint import check_sampler, read_meta
    meta = read_meta(str(tag))
    check_sampler(meta, str(tag), {**meta["sampler"], "data.weights": [2.0] * 4})  # same shares
    # other windows as many as before (4 input steps at stride 1, 2 at stride 2): accepted
    # before, the saved place going on over other windows
    with pytest.raises(ConfigError, match=r"with data.n_steps_input=4, this run sets 2; the "
                       "loader's place in each dataset counts its windows, which this changes"):
        check_sampler(meta, str(tag), {**meta["sampler"], "data.n_steps_input": 2,
                                       "data.dt_stride": 2})

    # written before the record: the sampler's own check after the process group, as before
    del meta["sampler"]
    (tag / "dsfm_meta.json").write_text(json.dumps(meta))
    proc = resume("train.seed=7")
    assert proc.returncode == 1 and "sampler state has seed=0 but this run has 7" in \
        proc.stderr, proc.stderr[-2000:]
    assert "resumed from step 2" in train(ds, run_dir, ["train.max_steps=3"], data=data,
                                          resume=True).stdout

    os.remove(os.path.join(data, "euler_2d", "data", "train", "euler_2d_mach_1.hdf5"))
    assert (f"--resume: {run_dir / 'checkpoints' / 'step00000003'} was trained on 160 train "
            "windows of dataset euler_2d, which has 80 now (its files changed)") in refused()


def test_resume_with_another_freeze_is_refused(demo_base, tmp_path):
    """ZeRO's optimizer state holds the trainable parameters only: resuming a run trained
    with train.freeze=middle with the whole model trainable used to stop inside DeepSpeed's
    load with 'parameter-alignment layout does not match' (a traceback, after the process
    group). A one-line error before it, from the checkpoint's metadata."""
    ds = ds_config(tmp_path, 2, micro=4)
    run_dir = tmp_path / "r"
    train(ds, run_dir, ["train.max_steps=2", "train.freeze=middle"], data=demo_base)
    proc = run(train_cmd(ds, run_dir, [f"data.base={demo_base}", "train.max_steps=4"]) +
               ["--resume"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trained with train.freeze=middle, this run sets none" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    train(ds, run_dir, ["train.max_steps=4", "train.freeze=middle"], data=demo_base,
          resume=True)


@pytest.mark.slow
def test_resume_refuses_other_fields_and_schedules_and_keeps_checkpoints_whole(demo_base,
                                                                                 tmp_path):
    """What --resume refuses before any process group (another field vocabulary; a learning
    -rate schedule that "auto" resolved anew from a longer max_steps), what it continues
    (train.resume_schedule saved or new), and the checkpoints it leaves: an unfinished one cut
    off by a kill is pruned, and a finished run resumed is not written again."""
    ds = tmp_path / "auto.json"
    ds.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": 4,
                              "zero_optimization": {"stage": 2},
                              "scheduler": {"type": "WarmupCosineLR", "params": {
                                  "total_num_steps": "auto", "warmup_num_steps": "auto",
                                  "warmup_min_ratio": 0.0, "cos_min_ratio": 0.1}}}))
    ds = str(ds)
    r = tmp_path / "r"
    two = "data.datasets=[euler_2d, navier_stokes_2d]"
    train(ds, r, ["train.max_steps=4", "train.checkpoint_every=2", two], data=demo_base)

    def refused(*sets):
        proc = run(train_cmd(ds, r, [f"data.base={demo_base}", *sets]) + ["--resume"])
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return proc.stderr

    err = refused("train.max_steps=6", "data.datasets=[euler_2d]")
    assert "10 field columns, this run builds 5" in err
    err = refused("train.max_steps=6", "data.datasets=[navier_stokes_2d, euler_2d]")
    assert "field vocabulary (10 fields) differs" in err and "column 0 is 'euler_2d/" in err
    err = refused("train.max_steps=6", two)
    assert "learning-rate schedule" in err and "train.resume_schedule=saved" in err

    # a save of step 3 killed part-way: no COMPLETE marker, never loaded, pruned later
    shutil.copytree(r / "checkpoints" / "step00000002", r / "checkpoints" / "step00000003")
    os.remove(r / "checkpoints" / "step00000003" / "COMPLETE")
    proc = train(ds, r, ["train.max_steps=6", "train.checkpoint_every=2", two,
                         "train.resume_schedule=saved"], resume=True, data=demo_base)
    assert "resumed from step 4" in proc.stdout
    assert "resuming on the checkpoint's learning-rate schedule" in proc.stdout
    lr = logged(r, "train/lr")
    assert lr[5] <= lr[4] and lr[6] <= lr[4]          # past the saved schedule's end: no jump
    assert step_tags(r) == ["step00000004", "step00000006"]     # the demo preset keeps 2

    # a finished run resumed trains nothing and leaves its checkpoint alone (6 is not a
    # multiple of checkpoint_every here, so the end of the run would otherwise save again)
    stamps = {p: p.stat().st_mtime_ns for p in (r / "checkpoints" / "step00000006").iterdir()}
    proc = train(ds, r, ["train.max_steps=6", "train.checkpoint_every=4", two,
                         "train.resume_schedule=saved"], resume=True, data=demo_base)
    assert "nothing to train" in proc.stdout
    assert {p: p.stat().st_mtime_ns
            for p in (r / "checkpoints" / "step00000006").iterdir()} == stamps

    proc = train(ds, r, ["train.max_steps=8", "train.checkpoint_every=2", two,
                         "train.resume_schedule=new"], resume=True, data=demo_base)
    assert "warning: the learning-rate schedule changes on resume" in proc.stdout
    lr = logged(r, "train/lr")
    # the new schedule's rate from the first resumed step: 8 steps, 1 of warmup, cosine to
    # 0.1 of the peak at step 9 (before, step 7 took the rate saved with the optimizer's
    # state, the old schedule's floor)
    peak = DS["optimizer"]["params"]["lr"]
    assert [lr[7], lr[8]] == pytest.approx(
        [peak * (0.1 + 0.9 * (1 + math.cos(math.pi * (n - 1) / 8)) / 2) for n in (7, 8)])


def test_resume_names_an_unfinished_newer_checkpoint_it_passes_over(demo_base, tmp_path):
    """A save cut off by a kill or a full disk leaves a newer tag without COMPLETE: --resume
    took the older complete one and said only "resumed from step 2". Now it names the
    unfinished one it passed over, and the run writes that step again, whole."""
    ds = ds_config(tmp_path, 2, micro=4)
    r = tmp_path / "r"
    train(ds, r, ["train.max_steps=2", "train.checkpoint_every=1"], data=demo_base)
    shutil.copytree(r / "checkpoints" / "step00000002", r / "checkpoints" / "step00000003")
    os.remove(r / "checkpoints" / "step00000003" / "COMPLETE")
    proc = train(ds, r, ["train.max_steps=3", "train.checkpoint_every=1",
                         "model.drop_path=0.1"], resume=True, data=demo_base)
    # what a resumed run changed and may (the rest is refused) is in its log
    assert ("--resume: settings changed since the checkpoint: model.drop_path: 0.0 -> 0.1; "
            "train.max_steps: 2 -> 3\n") in proc.stdout
    assert (f"--resume: step00000003 in {r / 'checkpoints'} unfinished (no COMPLETE: the save "
            "was cut off), passed over; resuming from step00000002") in proc.stdout
    assert "resumed from step 2" in proc.stdout
    assert (r / "checkpoints" / "step00000003" / "COMPLETE").read_text() == "3\n"


def test_config_changes_name_what_the_user_changed_only():
    from dsfm.train import config_changes

    saved = {"name": "a", "model": {"drop_path": 0.1, "size": "B"}, "train": {"seed": 1}}
    ours = {"name": "a", "model": {"drop_path": 0.2, "size": "B", "new_knob": 3},
            "train": {"seed": 1}, "monitor": {"gpu": True}}
    # settings the checkpoint's dsfm did not have yet are no change of the user's
    assert config_changes(saved, ours) == ["model.drop_path: 0.1 -> 0.2"]
    assert config_changes(None, ours) == [] and config_changes(saved, saved) == []


def _saved_param_groups(tag_dir) -> list[dict]:
    """The optimizer's param groups as a ZeRO-2 checkpoint of one rank holds them."""
    path = os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    state = torch.load(path, weights_only=False)["optimizer_state_dict"]
    return state["base_optimizer_state"]["param_groups"]


def test_resumed_optimizer_params_are_refused_or_taken_not_ignored(demo_base, tmp_path):
    """A run resumed with other betas and weight_decay in its DeepSpeed config trained on with
    the checkpoint's (DeepSpeed's load restores the saved param groups), and its
    ds_config.json said otherwise; without a scheduler it kept the saved lr as well. Now the
    change is refused in one line before the process group, or taken from the first resumed
    step with train.resume_schedule=new."""
    run_dir = tmp_path / "r"
    ds = tmp_path / "ds.json"
    base = {**DS, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}
    base.pop("scheduler")
    ds.write_text(json.dumps(base))
    train(str(ds), run_dir, ["train.max_steps=2"], data=demo_base)
    changed = {"lr": 1e-3, "betas": [0.5, 0.6], "eps": 1e-8, "weight_decay": 0.25}
    ds.write_text(json.dumps({**base, "optimizer": {"type": "AdamW", "params": changed}}))
    proc = run(train_cmd(str(ds), run_dir, [f"data.base={demo_base}", "train.max_steps=3"])
               + ["--resume"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip() == (
        f"error: --resume: {run_dir / 'checkpoints' / 'step00000002'} was trained with other "
        "optimizer params than this run's DeepSpeed config sets (betas [0.9, 0.999] -> [0.5, "
        "0.6], lr 0.005 -> 0.001, weight_decay 0.001 -> 0.25), and DeepSpeed's load restores "
        "the saved ones; set train.resume_schedule=new to switch to these, or "
        "train.resume_schedule=saved to keep the checkpoint's")
    train(str(ds), run_dir, ["train.max_steps=3", "train.resume_schedule=new"], resume=True,
          data=demo_base)
    (group,) = _saved_param_groups(run_dir / "checkpoints" / "step00000003")
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.5, 0.6), 0.25)
    assert logged(run_dir, "train/lr")[3] == 1e-3
    assert "warning: the optimizer's params change on resume" in \
        (run_dir / "train.log").read_text()


def test_a_torch_scheduler_resumed_on_new_settings_takes_them(demo_base, tmp_path):
    """ZeRO stage 0 runs torch's schedulers, whose load puts back their saved settings and
    base rates over the config's: a run resumed with another gamma and lr under
    train.resume_schedule=new went on halving the old rate while its log said the schedule
    changed. Now it follows the new schedule from the first resumed step, as a run begun on
    it would be at that step."""
    run_dir = tmp_path / "r"
    ds = tmp_path / "ds.json"

    def config(lr, gamma):
        ds.write_text(json.dumps({
            **DS, "train_micro_batch_size_per_gpu": 4,
            "optimizer": {"type": "AdamW", "params": {"lr": lr}},
            "scheduler": {"type": "StepLR", "params": {"step_size": 1, "gamma": gamma}}}))

    config(0.01, 0.5)
    train(str(ds), run_dir, ["train.max_steps=2"], data=demo_base)
    config(0.02, 0.9)
    proc = train(str(ds), run_dir, ["train.max_steps=4", "train.resume_schedule=new"],
                 resume=True, data=demo_base)
    assert "warning: the learning-rate schedule changes on resume" in proc.stdout
    lr = logged(run_dir, "train/lr")
    assert [lr[1], lr[2]] == pytest.approx([0.01, 0.005])
    assert [lr[3], lr[4]] == pytest.approx([0.02 * 0.9 ** 2, 0.02 * 0.9 ** 3])


@pytest.mark.slow
def test_a_zero3_checkpoint_resumes_with_the_optimizer_offloaded(demo_base, tmp_path):
    """docs/training.md: zero3.json and zero3_offload.json resume each other's checkpoints.
    Without a GPU the first runs torch's AdamW, whose param groups have no bias_correction,
    and DeepSpeedCPUAdam, offloaded, stopped the first resumed step with KeyError
    'bias_correction'. (Slow: DeepSpeed compiles its CPU Adam op on first use.)"""
    ds = ds_config(tmp_path, 3, micro=4)
    offloaded = tmp_path / "offload.json"
    offloaded.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": 4,
                                     "zero_optimization": {"stage": 3, "offload_optimizer":
                                                           {"device": "cpu"}}}))
    train(ds, tmp_path / "a", ["train.max_steps=2"], data=demo_base)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    train(ds, tmp_path / "a", ["train.max_steps=3"], resume=True, data=demo_base)
    train(str(offloaded), tmp_path / "b", ["train.max_steps=3"], resume=True, data=demo_base)
    assert losses(tmp_path / "b")[3] == pytest.approx(losses(tmp_path / "a")[3], rel=1e-5)


@pytest.mark.slow
def test_a_checkpoint_of_deepspeeds_own_warmup_resumes_only_as_told(demo_base, tmp_path):
    """A checkpoint written while dsfm ran DeepSpeed's own warmup schedulers (steps 1 and 2 at
    the warmup's starting rate; its metadata has no lr_schedule) holds a position that dsfm's
    classes read as a rate up to two steps further on: --resume refuses it in one line unless
    train.resume_schedule says which to follow. saved finishes the run on DeepSpeed's class,
    at the rates it would have taken, and its checkpoints say so; new takes dsfm's."""
    ds = tmp_path / "warmup.json"
    ds.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": 4,
                              "zero_optimization": {"stage": 2},
                              "scheduler": {"type": "WarmupLR", "params": {
                                  "warmup_num_steps": 8, "warmup_type": "linear"}}}))
    ds, peak = str(ds), DS["optimizer"]["params"]["lr"]
    r = tmp_path / "r"
    train(ds, r, ["train.max_steps=2", "train.checkpoint_every=2"], data=demo_base)
    assert logged(r, "train/lr") == pytest.approx({1: peak / 8, 2: peak * 2 / 8})
    meta_file = r / "checkpoints" / "step00000002" / "dsfm_meta.json"
    meta = json.loads(meta_file.read_text())
    assert meta.pop("lr_schedule") == 2
    meta_file.write_text(json.dumps(meta))                # as dsfm wrote it before
    shutil.copytree(r, tmp_path / "switched")

    proc = run(train_cmd(ds, r, [f"data.base={demo_base}", "train.max_steps=4"]) + ["--resume"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "DeepSpeed's own WarmupLR" in proc.stderr
    assert "train.resume_schedule=saved" in proc.stderr and "=new" in proc.stderr

    saved = ["train.checkpoint_every=2", "train.resume_schedule=saved"]
    proc = train(ds, r, ["train.max_steps=4", *saved], resume=True, data=demo_base)
    assert "resuming on DeepSpeed's own WarmupLR" in proc.stdout
    # DeepSpeed's WarmupLR makes step n at (n - 2)/8 of the peak (step 3 takes the rate saved
    # with the optimizer's state, dsfm's here)
    assert logged(r, "train/lr")[4] == pytest.approx(peak * 2 / 8)
    meta = json.loads((r / "checkpoints" / "step00000004" / "dsfm_meta.json").read_text())
    assert meta["lr_schedule"] == 1
    train(ds, r, ["train.max_steps=6", *saved], resume=True, data=demo_base)
    lr = logged(r, "train/lr")
    assert [lr[5], lr[6]] == pytest.approx([peak * 3 / 8, peak * 4 / 8])

    switched = tmp_path / "switched"
    proc = train(ds, switched, ["train.max_steps=4", "train.resume_schedule=new"], resume=True,
                 data=demo_base)
    assert "warning:" in proc.stdout and "resuming on dsfm's" in proc.stdout
    assert logged(switched, "train/lr")[4] == pytest.approx(peak * 4 / 8)


@pytest.mark.slow
def test_a_resumed_run_logs_the_loss_of_the_same_steps(demo_base, tmp_path):
    """The loss logged every log_every steps averages the same micro-batches whether or not
    the run was resumed in between (the window is in the checkpoint)."""
    ds = ds_config(tmp_path, 2, micro=4)
    r = tmp_path / "r"
    sets = ["train.max_steps=8", "train.log_every=4", "train.checkpoint_every=6"]
    train(ds, r, sets, data=demo_base)
    straight = logged(r, "train/loss")
    assert sorted(straight) == [4, 8]
    shutil.rmtree(r / "checkpoints" / "step00000008")          # resume from step 6
    proc = train(ds, r, sets, resume=True, data=demo_base)
    assert "resumed from step 6" in proc.stdout
    assert "AViT numerics" not in proc.stdout          # this dsfm's weights: no warning
    assert logged(r, "train/loss")[8] == straight[8]
    # each step once: metrics.jsonl drops the records of steps after the checkpoint, and
    # TensorBoard purges them from the first run's event file
    with open(r / "metrics.jsonl") as fh:
        steps = [json.loads(line)["step"] for line in fh if "train/loss" in line]
    assert steps == [4, 8]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(r / "tb"))
    board.Reload()
    events = board.Scalars("train/loss")
    assert [e.step for e in events] == [4, 8]
    assert events[1].value == pytest.approx(straight[8], rel=1e-6)

    # a run that ends between log steps logs there (the mean of steps 5-6) and keeps the
    # window in its checkpoint: resumed for more steps, it logs the mean of steps 5-8 at 8
    short = tmp_path / "short"
    train(ds, short, ["train.max_steps=6", "train.log_every=4"], data=demo_base)
    train(ds, short, sets, resume=True, data=demo_base)
    assert sorted(logged(short, "train/loss")) == [4, 6, 8]
    assert logged(short, "train/loss")[8] == straight[8]


@pytest.mark.slow
def test_a_run_started_again_where_one_died_before_its_first_checkpoint_logs_each_step_once(
        demo_base, tmp_path):
    """--resume finds no checkpoint and starts from step 0: the dead run's records go, in
    metrics.jsonl and (purged) in TensorBoard, instead of standing beside the new ones."""
    ds = ds_config(tmp_path, 2, micro=4)
    r = tmp_path / "r"
    train(ds, r, ["train.max_steps=3"], data=demo_base)
    shutil.rmtree(r / "checkpoints")               # as if killed before its first checkpoint
    proc = train(ds, r, ["train.max_steps=2"], resume=True, data=demo_base)
    with open(r / "metrics.jsonl") as fh:
        assert [json.loads(line)["step"] for line in fh] == [1, 2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(r / "tb"))
    board.Reload()
    assert [e.step for e in board.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in board.Scalars("time/step_ms")] == [1, 2]
    assert "no checkpoint" in proc.stdout
    assert "3 metrics records of an earlier run that left no checkpoint dropped" in proc.stdout


@pytest.mark.slow
def test_resume_without_run_dir_takes_the_newest_run_of_this_name(demo_base, tmp_path):
    """--resume alone picks runs/<name>-<timestamp> (not another name that starts the same)
    and is checked before any process group like --run-dir."""
    ds = ds_config(tmp_path, 2, micro=4)
    cmd = [sys.executable, os.path.join(REPO, "dsfm", "train.py"), "--ds_config", ds]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=1", "name=tiny"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [ours] = os.listdir(tmp_path / "runs")
    (tmp_path / "runs" / "tiny-x-20991231-235959").mkdir()   # sorts after ours; not ours
    proc = subprocess.run(cmd + ["--resume", "--set", "model.dim=96"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert os.path.join("runs", ours) in proc.stderr
    assert "dim/heads/blocks (48, 3, 2), this run builds (96, 3, 2)" in proc.stderr


def test_resume_without_run_dir_finds_a_run_whose_name_has_a_folder(tmp_path, monkeypatch):
    """name=lab/exp1 makes its runs in runs/lab/ (choose_run_dir), where --resume did not look:
    it said there was no runs/lab/exp1-<timestamp> folder."""
    from dsfm.config import load_config
    from dsfm.train import newest_run

    monkeypatch.chdir(tmp_path)
    for d in ["lab/exp1-20261129-224901", "lab/exp1-20261130-080000", "lab/exp1-x-20991231-235959",
              "exp1-20991231-235959"]:
        (tmp_path / "runs" / d).mkdir(parents=True)
    assert newest_run(load_config(None, ["name=lab/exp1"])) == \
        os.path.join("runs", "lab", "exp1-20261130-080000")
    assert newest_run(load_config(None, ["name=exp1"])) == \
        os.path.join("runs", "exp1-20991231-235959")
    assert newest_run(load_config(None, ["name=other/exp1"])) is None


def test_fine_tuning_from_a_run_directory_takes_its_newest_checkpoint(demo_base, tmp_path):
    """train.init_from=RUN_DIR consolidates the newest checkpoint in memory (an export of an
    older one is not used, and nothing is written there); a model that does not fit the config
    or a file that is not an export is refused in one line before any process group."""
    from dsfm.runtime.checkpoint import consolidate

    ds = ds_config(tmp_path, 2, micro=4)
    pre = tmp_path / "pre"
    train(ds, pre, ["train.max_steps=4", "train.checkpoint_every=2"], data=demo_base)
    # given the checkpoints/ folder, the export goes to RUN_DIR/export, where init_from looks
    # (it went to checkpoints/export/)
    proc = run([sys.executable, "-m", "dsfm.runtime.export", str(pre / "checkpoints"), "--tag",
                "step00000002"])
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {pre / 'export' / 'model_fp32.pt'} (step00000002)" in proc.stdout
    assert not (pre / "checkpoints" / "export").exists()
    stale = (pre / "export" / "model_fp32.pt").read_bytes()
    newest = consolidate(str(pre))["model"]
    # init_from takes the checkpoints/ folder too (it looked in checkpoints/checkpoints)
    from dsfm.runtime.checkpoint import load_pretrained
    assert load_pretrained(str(pre / "checkpoints"))["source"] == \
        str(pre / "checkpoints" / "step00000004")
    tune = tmp_path / "tune"
    train(ds, tune, ["train.max_steps=1", f"train.init_from={pre}", "train.freeze=processor"],
          data=demo_base)
    tuned = consolidate(str(tune))["model"]
    blocks = [n for n in newest if n.startswith("blocks.")]
    assert blocks and all(torch.equal(tuned[n], newest[n]) for n in blocks)
    assert (pre / "export" / "model_fp32.pt").read_bytes() == stale

    proc = run(train_cmd(ds, tmp_path / "x", [f"data.base={demo_base}",
                                              f"train.init_from={pre}", "model.dim=96"]))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is an AViT with dim/heads/blocks (48, 3, 2), this config builds (96, 3, 2)" in \
        proc.stderr
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    proc = run(train_cmd(ds, tmp_path / "x", [f"data.base={demo_base}",
                                              f"train.init_from={junk}"]))
    assert proc.returncode == 2 and "not a readable PyTorch file" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def _deepspeed_buffers(port: int) -> list[str]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm of the runs at rendezvous `port` (named
    <prefix>_<uid>_<addr>_<port>_<rank>): other runs, another pytest worker's, may hold
    buffers of their own meanwhile."""
    import glob
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


def test_cpu_runs_leave_no_deepspeed_shared_memory(demo_base, tmp_path):
    """DeepSpeed's CPU all-reduce buffer in /dev/shm is released when the run ends; its name
    holds the rendezvous port, which this run is given."""
    port = free_port()
    assert not _deepspeed_buffers(port)
    ds = ds_config(tmp_path, 2, micro=4)
    train(ds, tmp_path / "r", ["train.max_steps=1"], data=demo_base,
          env=dict(os.environ, MASTER_PORT=str(port)))     # a single process takes it
    assert not _deepspeed_buffers(port)


def test_killed_cpu_ranks_leave_no_deepspeed_shared_memory(demo_base, tmp_path):
    """Two ranks killed with SIGKILL mid-training (the OOM killer, torchrun or Slurm after
    their grace time) leave no DeepSpeed all-reduce buffer behind: the names are unlinked once
    every rank has mapped them, so no cleanup at exit is needed."""
    port = free_port()
    ds = ds_config(tmp_path, 2)
    run_dir = tmp_path / "r"
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", str(port), "dsfm/train.py",
           "--ds_config", ds, "--run-dir", str(run_dir)]
    for s in TINY + [f"data.base={demo_base}", "train.max_steps=400"]:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_logged_steps(run_dir, 2, 120), "the run did not start training"
        mine = _deepspeed_buffers(port)
        ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)],
                                                capture_output=True, text=True).stdout.split()]
        assert len(ranks) == 2, ranks
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not mine, mine               # unlinked while the ranks ran
    assert not _deepspeed_buffers(port)


def test_a_rendezvous_port_in_use_is_one_line_naming_it(demo_base, tmp_path):
    """MASTER_PORT set to a port another process listens on: the process group's store cannot
    listen there. That was torch's DistNetworkError traceback; it is one line naming the
    address and what to set."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run(train_cmd(ds_config(tmp_path, 2, micro=4), tmp_path / "r",
                             ["train.max_steps=2"], data=demo_base),
                   env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and f"rendezvous at 127.0.0.1:{port} failed" in errors[0], \
        proc.stderr[-2000:]
    assert "that port is in use: set MASTER_PORT" in errors[0]
    assert "Traceback" not in proc.stderr


def test_a_rendezvous_host_that_does_not_resolve_is_one_line(tmp_path):
    """MASTER_ADDR that no resolver knows (a typo in --master_addr): torch's store client
    retried the lookup until the process group's timeout (DeepSpeed's 10 minutes; 1 here),
    then a C++ stack and an error. It is one line before the process group."""
    from tests.runtime.test_dist import UNRESOLVABLE, resolver_refuses

    if not resolver_refuses(UNRESOLVABLE):
        pytest.skip(f"this machine's resolver does not refuse {UNRESOLVABLE}")
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": UNRESOLVABLE, "MASTER_PORT": str(free_port()),
           "DEEPSPEED_TIMEOUT": "1"}
    proc = run(train_cmd("ds_configs/zero2.json", tmp_path / "r", ["train.max_steps=1"]),
               env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: rendezvous host {UNRESOLVABLE!r} (MASTER_ADDR, "), \
        proc.stderr[-2000:]
    assert "does not resolve" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_run_directory_that_cannot_be_written_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run(train_cmd("ds_configs/zero2.json", blocker / "run", ["train.max_steps=1"]))
    assert proc.returncode == 2, proc.stderr[-2000:]             # before the process group
    assert f"run directory {blocker / 'run'}: Not a directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # the file itself as --run-dir said "File exists"
    proc = run(train_cmd("ds_configs/zero2.json", blocker, ["train.max_steps=1"]))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: run directory {blocker}: a file, not a folder "
                                   "(--run-dir names the folder a run writes its checkpoints "
                                   "and logs in)")


def test_a_run_directorys_checkpoints_as_run_directory_are_refused(demo_base, tmp_path):
    """--resume --run-dir RUN/checkpoints (the folder the export CLI takes) found no checkpoint
    in RUN/checkpoints/checkpoints and trained a new run in there, beside the old run's
    checkpoints; one checkpoint's folder the same. Refused in one line, nothing written."""
    ds = ds_config(tmp_path, 2, micro=4)
    r = tmp_path / "r"
    train(ds, r, ["train.max_steps=1"], data=demo_base)
    # DeepSpeed's `latest` names the tag, written once the tag is complete (dsfm's), whole
    assert (r / "checkpoints" / "latest").read_text() == "step00000001"
    assert not (r / "checkpoints" / "latest.tmp").exists()
    before = sorted(p.relative_to(r) for p in r.rglob("*"))
    for inside in (r / "checkpoints", r / "checkpoints" / "step00000001"):
        for resume in ([], ["--resume"]):
            proc = run(train_cmd(ds, inside, ["train.max_steps=2"], data=demo_base) + resume)
            assert proc.returncode == 2, proc.stderr[-2000:]
            assert proc.stderr.strip() == (
                f"error: --run-dir {inside} is inside the run directory {r} (its checkpoints "
                "or one of them): give the run directory itself"), proc.stderr[-2000:]
    # the same given from inside one checkpoint's folder: "." (it) and ".." (checkpoints/)
    for given in (".", ".."):
        cmd = train_cmd(ds, given, ["train.max_steps=2"], data=demo_base)
        cmd[1] = os.path.join(REPO, "dsfm", "train.py")
        proc = subprocess.run(cmd + ["--resume"], cwd=r / "checkpoints" / "step00000001",
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"is inside the run directory {r} (its checkpoints" in proc.stderr, proc.stderr
    assert sorted(p.relative_to(r) for p in r.rglob("*")) == before


def test_a_run_directory_that_exists_but_cannot_be_written_is_one_line(tmp_path):
    """It passed the checks (os.makedirs takes an existing directory) and stopped rank 0 in its
    logger after the process group, exit code 1, while the other ranks went on."""
    if os.geteuid() != 0:
        blocked = tmp_path / "read-only"
        blocked.mkdir()
        blocked.chmod(0o555)
    elif os.path.isdir("/sys/kernel"):
        blocked = "/sys/kernel"                   # sysfs: not even root creates files there
    else:
        pytest.skip("root, and no /sys/kernel to stand for a directory it cannot write")
    proc = run(train_cmd("ds_configs/zero2.json", blocked, ["train.max_steps=1"]))
    assert proc.returncode == 2, proc.stderr[-2000:]             # before the process group
    assert proc.stderr.strip() == (f"error: run directory {blocked}: cannot write in it "
                                   "(Permission denied)")


def test_a_new_run_in_a_directory_with_checkpoints_is_refused(demo_base, tmp_path):
    """Without --resume, a run directory that holds checkpoints is refused before the process
    group: a new run there would write checkpoints older than the old run's, which pruning
    (keep_checkpoints) deletes as soon as they are written, so that a later --resume or export
    silently takes the old run's weights."""
    ds = ds_config(tmp_path, 2, micro=4)
    r = tmp_path / "r"
    train(ds, r, ["train.max_steps=4", "train.keep_checkpoints=1"], data=demo_base)
    stamps = {p: p.stat().st_mtime_ns for p in (r / "checkpoints" / "step00000004").iterdir()}
    proc = run(train_cmd(ds, r, [f"data.base={demo_base}", "train.max_steps=2",
                                 "train.keep_checkpoints=1"]))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "already holds checkpoints" in proc.stderr and "--resume" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert step_tags(r) == ["step00000004"]
    assert {p: p.stat().st_mtime_ns
            for p in (r / "checkpoints" / "step00000004").iterdir()} == stamps


def test_a_finished_run_resumed_evaluates_if_its_final_evaluation_is_missing(demo_base,
                                                                            tmp_path):
    """A run stopped by SIGTERM at its last step checkpoints and exits without its final
    evaluation, as does one killed during that evaluation; --resume then trains nothing, and
    evaluates the last step (once: a second --resume finds the evaluation there). The same at
    an eval_every step before the last: the resumed run evaluates it before training on. An
    evaluation file cut short (killed while it was written in place, as it was) counted as
    done: it is written whole or not at all now, and one that does not parse is redone."""
    ds = ds_config(tmp_path, 2, micro=4)
    r = tmp_path / "r"
    sets = ["train.max_steps=2", "train.eval_batches=1", "train.rollout_steps=1",
            "train.eval_every=1", "train.checkpoint_every=1"]
    train(ds, r, sets, data=demo_base)
    final = r / "eval_step00000002.json"
    results = json.loads(final.read_text())
    board = _board_points(r)
    tag = next(t for t in board if t.startswith("eval/") and t.endswith("/nrmse_1step"))
    assert [s for s, _ in board[tag]] == [1, 2] and [s for s, _ in board["train/loss"]] == [1, 2]
    final.write_text(final.read_text()[:40])        # the final evaluation cut off
    proc = train(ds, r, sets, resume=True, data=demo_base)
    assert "nothing to train" in proc.stdout and "evaluation at step 2" in proc.stdout
    assert json.loads(final.read_text()) == results
    # its scalars, logged before the cut, once: in TensorBoard (step 2 purged, its training
    # scalars written again) and in metrics.jsonl
    assert _board_points(r) == board
    assert [sum(t in k for k in _records_of(r, 2)) for t in (tag, "train/loss")] == [1, 1]
    proc = train(ds, r, sets, resume=True, data=demo_base)
    assert "nothing to train" in proc.stdout and "evaluation at step" not in proc.stdout
    assert _board_points(r) == board

    # as a SIGTERM at step 1 leaves it: the checkpoint of step 1, no evaluation of it
    first = r / "eval_step00000001.json"
    at_1 = json.loads(first.read_text())
    first.unlink()
    shutil.rmtree(r / "checkpoints" / "step00000002")
    proc = train(ds, r, sets, resume=True, data=demo_base)
    assert "resumed from step 1" in proc.stdout
    assert json.loads(first.read_text()) == at_1
    assert json.loads(final.read_text()) == results
    again = _board_points(r)
    ours = [t for t in board if t.startswith(("train/", "eval/"))]
    assert len(ours) > 6 and all([s for s, _ in again[t]] == [1, 2] for t in ours)
    assert again[tag] == board[tag]     # the same weights at both steps: the same evaluations
    assert [sum(tag in k for k in _records_of(r, at)) for at in (1, 2)] == [1, 1]


def _board_points(run_dir) -> dict[str, list[tuple[int, float]]]:
    """tag → (step, value) of each scalar point, as TensorBoard reads the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    board.Reload()
    return {t: [(e.step, e.value) for e in board.Scalars(t)] for t in board.Tags()["scalars"]}


def _records_of(run_dir, step: int) -> list[list[str]]:
    """The keys of each metrics.jsonl record of `step`, less step and time."""
    with open(run_dir / "metrics.jsonl") as fh:
        return [sorted(set(r) - {"step", "time"}) for r in map(json.loads, fh)
                if r["step"] == step]


def test_time_invariant_fields_are_named_as_not_model_inputs(tmp_path):
    """The Well's constant fields (here a per-trajectory obstacle and a bathymetry shared by
    every trajectory) are no input of the AViT, which takes the time-varying fields: the run
    said nothing of them, and its VRMSE is not comparable with The Well's baselines, which
    feed them to the model."""
    base = tmp_path / "data"
    make_dataset(str(base), "rich", rich_2d_file, n_steps=9, shape=(32, 32))
    proc = train(ds_config(tmp_path, 2, micro=2), tmp_path / "r", ["train.max_steps=1"],
                 data=base)
    assert ("data: rich_2d: time-invariant fields obstacle, bathymetry are not model inputs"
            in proc.stdout), proc.stdout[-3000:]
    assert "data: rich_2d: time-invariant" in (tmp_path / "r" / "train.log").read_text()


def test_bad_values_in_the_valid_split_are_named_as_the_evaluations(demo_base, tmp_path):
    """NaN in a valid file stopped the run with the evaluation loader's batch as its "step"
    (step 7 of a run at step 1) and nothing saying that the evaluation read it."""
    import h5py

    base = tmp_path / "data"
    shutil.copytree(demo_base, base)
    [valid] = sorted((base / "euler_2d" / "data" / "valid").iterdir())[:1]
    with h5py.File(valid, "r+") as f:
        f["t0_fields/pressure"][...] = float("nan")
    proc = run(train_cmd(ds_config(tmp_path, 2, micro=4), tmp_path / "r",
                         ["train.max_steps=1", "train.eval_batches=1", "train.rollout_steps=1",
                          "data.datasets=[euler_2d]"], data=base))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert ("evaluation at step 1 (valid split; the evaluation's own loader, whose steps count "
            f"its batches): {valid}: /t0_fields/pressure has NaN/Inf at") in errors[0], errors
    assert "Traceback" not in proc.stderr


def _demo_copy(demo_base, tmp_path, damage: str) -> str:
    """A copy of the demo datasets with one thing wrong; its base directory."""
    import shutil
    base = tmp_path / "data"
    shutil.copytree(demo_base, base)
    euler = base / "euler_2d"
    if damage == "truncated":
        path = sorted((euler / "data" / "train").iterdir())[0]
        path.write_bytes(path.read_bytes()[:4096])
    elif damage == "no-stats":
        (euler / "stats.yaml").unlink()
    elif damage == "3d":
        make_dataset(str(base), "cube_3d", cube_3d_file, n_steps=12, shape=(16, 16, 16))
    elif damage == "grid":
        make_dataset(str(base), "partial", partial_dims_file, n_steps=12, shape=(48, 40))
    elif damage == "same-name":         # another copy (resolution) of euler_2d, another folder
        shutil.copytree(euler, base / "euler_2d_64")
    return str(base)


@pytest.mark.parametrize("sets, damage, needles", [
    (["data.n_steps_input=100"], None, ["time steps are not enough for 100 input"]),
    (["data.weights=[1, 1]"], None, ["data.weights has 2 numbers for 4 datasets"]),
    (["data.weights=[0, 0, 0, 0]"], None, ["data.weights [0.0, 0.0, 0.0, 0.0]: no dataset would "
                                           "be drawn"]),
    (["model.dim=97"], None, ["model dim 97 must be divisible"]),
    ([], "truncated", ["euler_2d_mach_0.1.hdf5"]),
    ([], "no-stats", ["stats.yaml: stats file not found", "data.normalization=null"]),
    (["data.base=FILE"], None, ["is a file, not a directory of datasets"]),
    ([], "3d", ["dataset cube_3d (", "is 3D (16×16×16); MPP's AViT takes 2D fields only"]),
    ([], "grid", ["dataset partial (", "has a 48×40 grid; AViT needs H and W multiples of 16"]),
    ([], "same-name", ["euler_2d and ", "euler_2d_64 are both dataset 'euler_2d'"]),
], ids=["too-few-steps", "weights-count", "weights-zero", "dim", "truncated-file",
        "no-stats", "base-is-a-file", "3d-dataset", "grid-not-multiple-of-patch",
        "two-datasets-of-one-name"])
def test_data_and_model_that_cannot_train_are_one_line_before_the_process_group(
        demo_base, tmp_path, sets, damage, needles):
    """Each of these used to start the process group (and on two ranks, end in a gloo
    traceback on the rank that did not fail first)."""
    data = _demo_copy(demo_base, tmp_path, damage) if damage else demo_base
    if "data.base=FILE" in sets:
        (tmp_path / "afile").write_text("x")
        sets = [f"data.base={tmp_path / 'afile'}", "data.generate=demo"]
    proc = run(train_cmd(ds_config(tmp_path, 2, micro=4), tmp_path / "r", sets, data=data)
               if "data.generate=demo" not in sets else
               train_cmd(ds_config(tmp_path, 2, micro=4), tmp_path / "r", sets))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_micro_batch_larger_than_the_data_is_refused_on_every_rank(demo_base, tmp_path):
    """Two ranks, refused before the process group: each says it in one line, and no rank is
    left at a barrier to die of its peer's closed connection.

    The two ranks are started here (`ranks_by_hand`); the launcher's own path is checked below
    for what it does promise."""
    ds = ds_config(tmp_path, 2, micro=1000)
    args = train_cmd(ds, tmp_path / "r", data=demo_base)
    for r, (code, out, err) in enumerate(ranks_by_hand(args)):
        assert code == 2, f"rank {r}: {out[-2000:]}{err[-2000:]}"
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"error (rank {r} of 2): "), err
        assert "fewer than batch_size 1000 per rank" in lines[0], err
    # Under deepspeed's launcher: a failure, only such lines from train.py, no traceback.
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())] + args[1:]
    proc = run(cmd)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert 1 <= len(errors) <= 2 and all(
        re.match(r"error \(rank [01] of 2\): .*fewer than batch_size 1000 per rank", e)
        for e in errors), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "r").exists()


def _two_checkpoints(demo_base, tmp_path, ranks: int = 1):
    """A run with two complete checkpoints: (ds_config, run dir, older tag dir, newest)."""
    from dsfm.runtime.checkpoint import checkpoint_dir, tags
    ds = ds_config(tmp_path, 2, micro=4 // ranks)
    run_dir = tmp_path / "r"
    train(ds, run_dir, ["train.max_steps=2", "train.checkpoint_every=1",
                        "train.keep_checkpoints=2"], ranks=ranks, data=demo_base)
    ckpt = checkpoint_dir(str(run_dir))
    older, newest = tags(ckpt)[-2:]
    return ds, run_dir, older, os.path.join(ckpt, newest)


def test_an_unreadable_checkpoint_is_one_line_naming_the_older_one(demo_base, tmp_path):
    """A file whose bytes are damaged but whose size is the one written: DeepSpeed's reader
    fails on it, and that is one line naming the checkpoint to fall back on."""
    ds, run_dir, older, newest = _two_checkpoints(demo_base, tmp_path)
    path = os.path.join(newest, "mp_rank_00_model_states.pt")
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:          # the zip directory at the end, zeroed in place
        fh.seek(size - 200)
        fh.write(bytes(200))
    assert os.path.getsize(path) == size
    proc = run(train_cmd(ds, run_dir, [f"data.base={demo_base}", "train.max_steps=4"])
               + ["--resume"])
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "unreadable on rank 0" in errors[0], proc.stderr[-3000:]
    assert f"move it aside to resume from {older}" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_checkpoint_file_cut_short_stops_every_rank_before_the_process_group(demo_base,
                                                                             tmp_path):
    """Rank 1's optimizer partition cut short (a copy of the run directory interrupted): only
    rank 1 reads that file, so it used to fail alone inside the load while rank 0 went on to
    wait for it in a collective (on NCCL, until the process group's timeout). The sizes
    recorded at saving are checked by every rank before the process group."""
    from dsfm.runtime.checkpoint import META, read_meta
    ds, run_dir, older, newest = _two_checkpoints(demo_base, tmp_path, ranks=2)
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    written = read_meta(newest)["files"]
    assert set(written) == set(os.listdir(newest)) - {META, "COMPLETE"}
    assert written[name] == os.path.getsize(os.path.join(newest, name))
    with open(os.path.join(newest, name), "r+b") as fh:
        fh.truncate(1000)
    # each rank's own line (`ranks_by_hand`: under DeepSpeed's launcher CI runs lost rank 1's,
    # then rank 0's)
    cmd = train_cmd(ds, run_dir, ["train.max_steps=4"], data=demo_base) + ["--resume"]
    for rank, (code, out, err) in enumerate(ranks_by_hand(cmd)):
        # rank 0 never reads rank 1's partition: its refusal shows that every rank checks the
        # sizes; "of 2" and exit code 2: refused before the process group
        assert code == 2, (rank, err[-3000:])
        errors = [ln for ln in err.splitlines() if ln.startswith("error")]
        assert errors == [f"error (rank {rank} of 2): {newest}: {name} has 1,000 bytes, "
                          f"{written[name]:,} when it was written; move it aside to resume "
                          f"from {older}"], err[-3000:]
        assert "Traceback" not in out + err


@pytest.mark.parametrize("stage,freeze", [(0, None), (1, "processor")])
def test_a_run_without_zero_or_with_frozen_zero1_exports_and_fine_tunes(demo_base, tmp_path,
                                                                        stage, freeze):
    """A checkpoint of a run without ZeRO (stage 0) holds the whole model: the export used to
    die in DeepSpeed's zero_to_fp32 (TypeError traceback), and train.init_from with it. A ZeRO-1
    run with frozen parameters exported without them (DeepSpeed records frozen ones for
    zero_to_fp32 from ZeRO-2 on): no blocks.* at all. The exported weights are the run's: a
    fine-tuning run from them evaluates before its first step exactly as the run did after its
    last. The ZeRO-1 run is exported, and fine-tuned from, through its checkpoint's own folder
    (RUN/checkpoints/step00000002: "no complete checkpoint to export" before)."""
    ds = ds_config(tmp_path, stage, micro=4)
    pre = tmp_path / "pre"
    evals = ["train.eval_batches=1", "train.rollout_steps=1"]
    train(ds, pre, ["train.max_steps=2"] + evals + [f"train.freeze={freeze}"] * bool(freeze),
          data=demo_base)
    source = pre / "checkpoints" / "step00000002" if stage else pre
    if stage:
        proc = run([sys.executable, "-m", "dsfm.runtime.export", str(source), "--tag",
                    "step00000001"])
        assert proc.returncode == 1 and proc.stderr.strip() == (
            f"error: {source} is the checkpoint step00000002, but --tag step00000001 was "
            "asked for"), proc.stderr[-2000:]
    proc = run([sys.executable, "-m", "dsfm.runtime.export", str(source)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith(f"{pre / 'export' / 'model_fp32.pt'} (step00000002)")
    payload = torch.load(pre / "export" / "model_fp32.pt", weights_only=False)
    from dsfm.models.avit import AViT, AViTConfig
    AViT(AViTConfig(**payload["model_config"])).load_state_dict(payload["model"])
    assert payload["step"] == 2
    tune = tmp_path / "tune"
    init = source if stage else pre / "export" / "model_fp32.pt"
    train(ds, tune, ["train.max_steps=1", "train.eval_at_start=true",
                     f"train.init_from={init}"] + evals, data=demo_base)
    assert (json.loads((tune / "eval_step00000000.json").read_text())
            == json.loads((pre / "eval_step00000002.json").read_text()))


def test_a_run_without_zero_resumes_to_the_losses_of_a_run_that_never_stopped(demo_base,
                                                                             tmp_path):
    """Without ZeRO (stage 0) DeepSpeed keeps the optimizer's state in the model-states file
    under the key "optimizer", where the client state's optimizer config (of the same name)
    replaced it: --resume stopped with KeyError 'param_groups'."""
    ds = ds_config(tmp_path, 0)
    sets = ["train.checkpoint_every=2"]
    train(ds, tmp_path / "full", ["train.max_steps=3"] + sets, data=demo_base)
    train(ds, tmp_path / "half", ["train.max_steps=2"] + sets, data=demo_base)
    train(ds, tmp_path / "half", ["train.max_steps=3"] + sets, resume=True, data=demo_base)
    assert losses(tmp_path / "half") == losses(tmp_path / "full")


def test_export_names_a_missing_file_and_the_tag_to_export_instead(demo_base, tmp_path,
                                                                  monkeypatch):
    from dsfm.errors import CheckpointError, ConfigError
    from dsfm.runtime.checkpoint import consolidate, load_pretrained
    from dsfm.runtime.export import main as export
    _, run_dir, older, newest = _two_checkpoints(demo_base, tmp_path)
    os.remove(os.path.join(newest, "dsfm_rank0.pt"))
    with pytest.raises(CheckpointError, match=rf"dsfm_rank0.pt is missing \(No such file.*"
                       rf"export the one before it with --tag {older} \(python -m "
                       rf"dsfm.runtime.export {run_dir} --tag {older}; train.init_from takes "
                       r"the file it writes\)$"):
        consolidate(str(run_dir))
    # from inside the run directory: its checkpoints/ is relative, and the command named no
    # run directory ("dsfm.runtime.export  --tag"), and train.init_from=checkpoints said "no
    # such file or run directory"
    monkeypatch.chdir(run_dir)
    advice = rf"dsfm.runtime.export \. --tag {older}; train.init_from takes the file it writes"
    with pytest.raises(CheckpointError, match=advice):
        consolidate("checkpoints")
    with pytest.raises(ConfigError, match=r"train.init_from checkpoints: cannot consolidate "
                       rf"step\d+ \(CheckpointError: .*{advice}"):
        load_pretrained("checkpoints")
    monkeypatch.undo()
    assert export([str(run_dir), "--tag", older, "--out", str(tmp_path / "m.pt")]) == 0


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_the_older_one_stays(demo_base,
                                                                                 tmp_path):
    """A save that fails part-way (here a file-size limit, as a full disk or quota would):
    the run stopped with torch's traceback ending in "unexpected pos ... vs ...", which says
    nothing of space. Now one line names the checkpoint, the space left and the complete
    checkpoint a resume takes, which pruning left in place."""
    import resource

    from dsfm.runtime.checkpoint import checkpoint_dir, tags
    ds = ds_config(tmp_path, 3, micro=4)
    run_dir = tmp_path / "r"
    sets = ["model.dim=192", "train.checkpoint_every=1", "train.keep_checkpoints=1"]
    os.makedirs(run_dir / "checkpoints" / "best")        # the user's own: never pruned
    train(ds, run_dir, sets + ["train.max_steps=2"], data=demo_base)
    ckpt = checkpoint_dir(str(run_dir))
    assert tags(ckpt) == ["step00000002"] and os.path.isdir(os.path.join(ckpt, "best"))
    # ~12 MB of optimizer state per checkpoint; the loader's shared-memory ring fits under 3 MB
    assert os.path.getsize(os.path.join(ckpt, "step00000002",
                                        "zero_pp_rank_0_mp_rank_00_optim_states.pt")) > 6e6

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, 3_000_000))
    proc = run(train_cmd(ds, run_dir, [f"data.base={demo_base}", "train.max_steps=4"] + sets)
               + ["--resume"], preexec_fn=limit)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error (rank 0): checkpoint {ckpt}/step00000003: writing it "
                                "failed on rank 0 ("), errors[0]
    assert "MiB free there" in errors[0]
    assert errors[0].endswith("--resume continues from step00000002, which is kept")
    assert "Traceback" not in proc.stderr
    assert tags(ckpt) == ["step00000002"] and os.path.isdir(os.path.join(ckpt, "best"))


def test_export_to_a_directory_is_one_line_and_says_which_tag_it_wrote(demo_base, tmp_path,
                                                                        capsys):
    """--out naming a directory died in os.replace with an IsADirectoryError traceback, after
    the whole consolidation; the export of a run whose newest checkpoint is unfinished takes
    the newest complete one, and now says which."""
    from dsfm.runtime.export import main as export
    _, run_dir, older, newest = _two_checkpoints(demo_base, tmp_path)
    assert export([str(run_dir), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: --out {tmp_path} is a directory; give a file name, e.g. "
                   f"{tmp_path / 'model_fp32.pt'}\n")
    os.remove(os.path.join(newest, "COMPLETE"))          # a save cut off by a kill
    out = tmp_path / "m.pt"
    assert export([str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.endswith(f"wrote {out} ({older})\n")
    assert torch.load(out, weights_only=False)["source"].endswith(older)


def test_a_fine_tuning_run_resumes_without_its_pretrained_weights(demo_base, tmp_path):
    """A resumed fine-tuning run takes its model shape and vocabulary from its own checkpoint:
    it read train.init_from's weights again only to overwrite them, and stopped ("no such file
    or run directory") once that export had been moved. It resumes to the losses of a run
    that never stopped, new fields included."""
    ds = ds_config(tmp_path, 2, micro=4)
    pre = tmp_path / "pre"
    train(ds, pre, ["train.max_steps=1", "data.datasets=[euler_2d]"], data=demo_base)
    proc = run([sys.executable, "-m", "dsfm.runtime.export", str(pre)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = tmp_path / "pre.pt"
    shutil.copy(pre / "export" / "model_fp32.pt", weights)
    tune = ["train.checkpoint_every=1", f"train.init_from={weights}",
            "data.datasets=[shallow_water_2d, euler_2d]"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(ds, whole, tune + ["train.max_steps=3"], data=demo_base)
    train(ds, part, tune + ["train.max_steps=1"], data=demo_base)
    os.remove(weights)
    proc = train(ds, part, tune + ["train.max_steps=3"], resume=True, data=demo_base)
    assert "resumed from step 1" in proc.stdout
    assert "fine-tuning run resumed: 8 fields as its checkpoint" in proc.stdout
    assert losses(part) == losses(whole)

    proc = run(train_cmd(ds, part, [f"data.base={demo_base}", "train.max_steps=4",
                                    "data.shared_field_names=true"] + tune) + ["--resume"])
    assert proc.returncode == 2 and "was trained with data.shared_field_names=False" in \
        proc.stderr, proc.stderr[-2000:]


def test_fine_tuning_refuses_a_model_n_fields_below_its_fields(demo_base, tmp_path):
    """model.n_fields below the pretrained fields and the new mixture's together is refused in
    one line before any process group, as it is without train.init_from: it was raised to
    them without a word, so the run's config.yaml named fewer columns than its model had."""
    ds = ds_config(tmp_path, 0, micro=4)
    pre = tmp_path / "pre"
    train(ds, pre, ["train.max_steps=1", "data.datasets=[euler_2d]"], data=demo_base)
    tune = [f"train.init_from={pre}", "data.datasets=[shallow_water_2d, euler_2d]"]
    proc = run(train_cmd(ds, tmp_path / "x", tune + ["model.n_fields=6"], data=demo_base))
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert ("model.n_fields=6 but the mixture has 8 fields (5 of them pretrained, from "
            f"train.init_from {pre})") in proc.stderr
    assert not (tmp_path / "x").exists()


def test_pretrained_weights_that_do_not_fit_their_model_are_refused_before_the_process_group(
        demo_base, tmp_path):
    """An export whose weights do not fit the model its config names (a parameter missing,
    another shape) was refused only once loaded into the model, after the process group had
    started and the run directory had been made."""
    ds = ds_config(tmp_path, 0, micro=4)
    pre = tmp_path / "pre"
    train(ds, pre, ["train.max_steps=1", "data.datasets=[euler_2d]"], data=demo_base)
    proc = run([sys.executable, "-m", "dsfm.runtime.export", str(pre)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = torch.load(pre / "export" / "model_fp32.pt", weights_only=False)
    missing = payload["model"].pop("embed.in_proj.0.weight")
    torch.save(payload, tmp_path / "missing.pt")
    payload["model"]["embed.in_proj.0.weight"] = missing[:, :, :2]
    torch.save(payload, tmp_path / "shape.pt")
    for name, needle in (("missing.pt", 'Missing key(s) in state_dict: "embed.in_proj.0.weight"'),
                         ("shape.pt", "size mismatch for embed.in_proj.0.weight")):
        proc = run(train_cmd(ds, tmp_path / "x", [f"train.init_from={tmp_path / name}",
                                                  "data.datasets=[euler_2d]"], data=demo_base))
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert (f"train.init_from {tmp_path / name}: the weights do not fit the model they were "
                "saved with (") in proc.stderr and needle in proc.stderr
        assert not (tmp_path / "x").exists()


def test_updates_skipped_for_non_finite_gradients_stop_the_run(demo_base, tmp_path):
    """At a learning rate of 1e6 the loss stays finite while the gradients overflow, and ZeRO
    skips every update: the run used to go on to the end and exit 0 having learnt nothing."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0,
                              "optimizer": {"type": "AdamW", "params": {"lr": 1e6}},
                              "zero_optimization": {"stage": 2}}))
    cmd = [sys.executable, "dsfm/train.py", "--ds_config", str(ds), "--run-dir",
           str(tmp_path / "r")]
    for s in [f"data.base={demo_base}", "train.max_steps=15", "train.max_nonfinite=3",
              "train.eval_batches=0", "train.progress=false", "data.num_workers=1"]:
        cmd += ["--set", s]
    proc = run(cmd)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3 updates skipped for non-finite gradients in a row" in proc.stderr
    assert "no checkpoint was written" in proc.stderr
    log = (tmp_path / "r" / "train.log").read_text()
    assert "DeepSpeed skipped the update (3 in a row)" in log


def test_a_step_without_a_gradient_norm_logs_none_not_zero(demo_base, tmp_path):
    """Without ZeRO and with gradient_clipping 0, DeepSpeed computes no gradient norm:
    metrics.jsonl has null, and train.log's line said "grad 0.000", a norm of zero."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({**DS, "gradient_clipping": 0.0, "train_micro_batch_size_per_gpu": 2,
                              "zero_optimization": {"stage": 0}}))
    r = tmp_path / "r"
    train(str(ds), r, ["train.max_steps=1"], data=demo_base)
    assert logged(r, "train/grad_norm") == {1: None}
    [line] = [ln for ln in (r / "train.log").read_text().splitlines() if "  loss " in ln]
    assert "  grad n/a  " in line, line


def test_a_rank_whose_peer_was_killed_says_so_in_one_line(demo_base, tmp_path):
    """A rank killed mid-run (the OOM killer, say): the other, waiting for it in a collective,
    used to die with gloo's traceback; it says so in one line."""
    run_dir = tmp_path / "r"
    procs = start_ranks(train_cmd(ds_config(tmp_path, 2, micro=2), run_dir,
                                  ["train.max_steps=100000"], data=demo_base))
    try:
        assert wait_for_logged_steps(run_dir, 2, 180)
        procs[1].kill()
        out, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(
        "error (rank 0): another rank stopped while this one waited for it in a collective ("), err
    assert "Traceback" not in err, err[-3000:]


def test_a_data_error_on_one_rank_checkpoints_every_rank_to_resume_once_mended(demo_base,
                                                                             tmp_path):
    """NaN in one window of the data, read by one rank: that rank's loader fails, but the
    other is already in the step's collectives, and the run used to stop without a checkpoint
    (the progress since the last one lost). The failing rank runs the step on a stand-in
    micro-batch whose loss is NaN, so both skip its update, then both write the checkpoint of
    the step before (the last update applied) and stop, each with one line, exit code 1 (the
    data is bad). Mended, the run resumes there and trains the failed step again: its losses
    are those of a run that never failed. Each rank's loader used to be saved where it
    stood, the failing rank's short of its peer's, so that with two datasets (the same on both
    ranks at each micro-batch) the resumed ranks drew different datasets. Under the DeepSpeed
    launcher, which sends SIGTERM to the other rank as soon as one exits with an error: that
    used to end it before its line (a race CI lost for either rank), and a rank stopping on
    an error now holds SIGTERM until it has said why."""
    import h5py

    from dsfm.runtime import checkpoint
    bad, first = nan_point_copy(demo_base, tmp_path)
    shutil.copytree(os.path.join(demo_base, "navier_stokes_2d"), tmp_path / "navier_stokes_2d")
    sets = [f"data.base={tmp_path}", "data.datasets=[euler_2d,navier_stokes_2d]",
            "train.max_steps=30"]
    ds = ds_config(tmp_path, 2, micro=2)

    def launched(run_dir):
        return ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())] + \
            train_cmd(ds, run_dir, sets)[1:]

    run_dir = tmp_path / "r"
    proc = run(launched(run_dir), timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = {}
    for ln in proc.stderr.splitlines():
        if ln.startswith("error (rank "):
            rank = int(ln[len("error (rank "):].split(")")[0])
            assert rank not in errors, proc.stderr[-3000:]
            errors[rank] = ln
    assert set(errors) == {0, 1}, proc.stderr[-3000:]
    # the failing rank's line starts with its error; the other's names that rank first
    [(failed, line)] = [(r, e) for r, e in errors.items() if "'s loader failed" not in e]
    m = re.search(r"every rank skipped the update of step (\d+) after writing the checkpoint "
                  r"of step (\d+): mend", line)
    step = int(m.group(1))
    assert int(m.group(2)) == step - 1 and 2 <= step < 30 and \
        f"{first}: /t0_fields/pressure has NaN/Inf at trajectory 0, time index 3" in line, line
    assert line.endswith(f"then --resume --run-dir {run_dir} continues from step {step - 1}")
    # the other rank repeats the failing rank's error (a launcher may end the failing rank
    # before it prints), and so train.log, which rank 0 writes, names the file either way
    told = line.split(": ", 1)[1].split("; every rank", 1)[0]
    other = errors[1 - failed]
    assert other.startswith(f"error (rank {1 - failed}): rank {failed}'s loader failed at step "
                            f"{step}: {told}; every rank skipped"), other
    assert told in (run_dir / "train.log").read_text() and str(tmp_path) in told
    assert checkpoint.tags(checkpoint.checkpoint_dir(str(run_dir)))[-1] == f"step{step - 1:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{step - 1:08d}"
    assert max(losses(run_dir)) == step - 1           # the skipped step logged nothing
    with h5py.File(first, "r+") as f:
        f["t0_fields/pressure"][0, 3, 5, 5] = 1.0
    proc = run(launched(run_dir) + ["--resume"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {step - 1} " in (run_dir / "train.log").read_text()
    # the same as a run on the mended data from the start, step after step
    clean = tmp_path / "clean"
    assert run(launched(clean), timeout=600).returncode == 0
    assert losses(run_dir) == losses(clean) and len(losses(clean)) == 30
    for name in ("euler_2d", "navier_stokes_2d"):
        assert logged(run_dir, f"train/loss/{name}") == logged(clean, f"train/loss/{name}")


def test_a_data_error_without_zero_checkpoints_the_last_update_and_stops(demo_base, tmp_path):
    """Without ZeRO (no skipped updates: each loss is read before its backward), a loader's
    failure mid-run skips the micro-batch and stops after checkpointing the steps done."""
    from dsfm.runtime import checkpoint
    bad, _ = nan_point_copy(demo_base, tmp_path)
    run_dir = tmp_path / "r"
    proc = run(train_cmd(ds_config(tmp_path, 0, micro=2), run_dir,
                         [f"data.base={tmp_path}", f"data.datasets=[{bad}]",
                          "train.max_steps=40"]))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    m = re.search(r"time index 3 .*; every rank stopped before the update of step (\d+) after "
                  r"writing the checkpoint of step (\d+): mend", line)
    assert m and int(m.group(2)) == int(m.group(1)) - 1 >= 1, line
    done = int(m.group(2))
    assert checkpoint.tags(checkpoint.checkpoint_dir(str(run_dir)))[-1] == f"step{done:08d}"
    assert sorted(losses(run_dir)) == list(range(1, done + 1))


def test_a_rank_stopping_on_a_data_error_says_why_though_sigterm_comes_first(demo_base,
                                                                           tmp_path):
    """The launcher's SIGTERM (sent to every rank once one exits with an error) arriving after
    the data stop and before the rank's line: the run's own process sends it to itself right
    before its line is written. The rank used to die of it (SIGTERM's default is back once
    training ends), its line and train.log's lost; it now holds SIGTERM until it has said why,
    and exits 1."""
    bad, _ = nan_point_copy(demo_base, tmp_path)
    run_dir = tmp_path / "r"
    argv = train_cmd(ds_config(tmp_path, 2, micro=2), run_dir,
                     [f"data.base={tmp_path}", f"data.datasets=[{bad}]",
                      "train.max_steps=40"])[2:]
    code = ("import os, signal\n"
            "import dsfm.train as t\n"
            "from dsfm.runtime.dist import exit_process\n"
            "said = t.say_error\n"
            "def late(line):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    said(line)\n"
            "t.say_error = late\n"
            f"exit_process(t.main({argv!r}))\n")
    proc = run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert "/t0_fields/pressure has NaN/Inf at trajectory 0, time index 3" in line, line
    assert line in (run_dir / "train.log").read_text()


def test_a_data_error_in_the_first_micro_batch_says_nothing_was_trained(
        demo_base, tmp_path):
    """Every training window NaN: each rank's loader fails at its first micro-batch, before it
    drew one to copy a stand-in from, and the run used to stop at once, a peer left waiting in
    the step's collectives. The stand-in now comes from the loader's metadata: under ZeRO-2
    both ranks skip the update of step 1, without ZeRO (the loss read before any update) they
    stop before it; either way the run says that nothing was trained, and writes no
    checkpoint (one of step 1 after its skipped update held the initial weights, and a loader
    state past the windows to train on again)."""
    import h5py

    from dsfm.runtime import checkpoint
    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    for f in (ds / "data" / "train").glob("*.hdf5"):
        with h5py.File(f, "r+") as h:
            h["t0_fields/pressure"][...] = float("nan")
    sets = [f"data.base={tmp_path}", f"data.datasets=[{ds}]", "train.max_steps=8"]
    run_dir = tmp_path / "r2"
    for rank, (rc, _, err) in enumerate(ranks_by_hand(
            train_cmd(ds_config(tmp_path, 2, micro=2), run_dir, sets))):
        assert rc == 1 and "Traceback" not in err, err[-3000:]
        [line] = [ln for ln in err.splitlines() if ln.startswith("error")]
        assert line.startswith(f"error (rank {rank}): ") and "has NaN/Inf at" in line, line
        assert line.endswith("every rank stopped before the first update, with nothing to "
                             "checkpoint: mend or replace the file and start the run again"), line
    assert not checkpoint.tags(checkpoint.checkpoint_dir(str(run_dir)))
    run_dir = tmp_path / "r0"
    proc = run(train_cmd(ds_config(tmp_path, 0, micro=2), run_dir, sets))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert "has NaN/Inf at" in line and line.endswith(
        "every rank stopped before the first update, with nothing to checkpoint: mend or "
        "replace the file and start the run again"), line
    assert not checkpoint.tags(checkpoint.checkpoint_dir(str(run_dir)))


def test_a_data_error_in_one_ranks_evaluation_checkpoints_every_rank(demo_base, tmp_path):
    """NaN in one valid window, which one rank of two evaluates (the split's 40 windows are
    10 batches of 2 per rank, each window once): that rank's evaluation loader fails while the
    other goes on, under ZeRO-3 gathering the weights with it in every forward. It used to
    stop at once, its peer left waiting, and the steps since the last checkpoint were lost.
    The failing rank now runs the rest of its rollouts on stand-ins, one all-reduce tells every
    rank, both write the step's checkpoint and stop with one line each; mended, the resumed
    run evaluates that step and goes on."""
    import h5py

    from dsfm.runtime import checkpoint
    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    valid = sorted((ds / "data" / "valid").glob("*.hdf5"))[-1]
    with h5py.File(valid, "r+") as f:       # the last time index: in the last window only
        assert f["t0_fields/pressure"].shape[:2] == (1, 24)
        f["t0_fields/pressure"][0, 23, 5, 5] = float("nan")
    run_dir = tmp_path / "r"
    cmd = train_cmd(ds_config(tmp_path, 3, micro=2), run_dir,
                    [f"data.base={tmp_path}", f"data.datasets=[{ds}]", "train.max_steps=4",
                     "train.eval_every=2", "train.eval_batches=10", "train.rollout_steps=1",
                     "train.checkpoint_every=0"])
    errors = {}
    for rank, (rc, _, err) in enumerate(ranks_by_hand(cmd)):
        assert rc == 1 and "Traceback" not in err, err[-3000:]
        [errors[rank]] = [ln for ln in err.splitlines() if ln.startswith("error")]
    [failed] = [r for r, e in errors.items() if "'s loader failed" not in e]
    then = ("; every rank stopped after writing the checkpoint of step 2: mend or replace the "
            f"file, then --resume --run-dir {run_dir} evaluates step 2 and goes on")
    head = ("evaluation at step 2 (valid split; the evaluation's own loader, whose steps count "
            "its batches): ")
    assert errors[failed].startswith(f"error (rank {failed}): {head}{valid}: /t0_fields/"
                                     "pressure has NaN/Inf at trajectory 0, time index 23"), \
        errors[failed]
    assert errors[failed].endswith(then), errors[failed]
    told = errors[failed][len(f"error (rank {failed}): {head}"):-len(then)]
    assert errors[1 - failed] == (f"error (rank {1 - failed}): {head}rank {failed}'s loader "
                                  f"failed on the valid split of euler_2d: {told}{then}"), \
        errors[1 - failed]
    assert told in (run_dir / "train.log").read_text() and str(tmp_path) in told
    assert checkpoint.tags(checkpoint.checkpoint_dir(str(run_dir))) == ["step00000002"]
    assert not list(run_dir.glob("eval_step*.json"))
    with h5py.File(valid, "r+") as f:
        f["t0_fields/pressure"][0, 23, 5, 5] = 1.0
    for rc, _, err in ranks_by_hand(cmd + ["--resume"]):
        assert rc == 0, err[-3000:]
    assert sorted(p.name for p in run_dir.glob("eval_step*.json")) == [
        "eval_step00000002.json", "eval_step00000004.json"]
    evaluated = json.loads((run_dir / "eval_step00000002.json").read_text())
    assert evaluated["euler_2d"]["pressure"]["windows"] == 40
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_data_error_on_cuda_stops_at_its_own_step(demo_base, tmp_path):
    """On a GPU the loader checks a batch on the device and reads the flag one next() later,
    so the batch with NaN has gone through its step (its loss NaN, the update skipped) before
    the loader says so: the run went on to the next step, warned of a non-finite loss from the
    weights, ran that step on a stand-in and stopped with its checkpoint (with
    train.max_nonfinite=1, on the warning, the file never named). At the skipped update every
    rank now reads its last batch's flag first: the data error stops the run at the NaN
    batch's own step, with the checkpoint of the step before, whose loader state reads that
    batch again. ZeRO-2, one rank."""
    from dsfm.runtime import checkpoint
    bad, _ = nan_point_copy(demo_base, tmp_path)
    run_dir = tmp_path / "r"
    proc = run(train_cmd(ds_config(tmp_path, 2, micro=2), run_dir,
                         [f"data.base={tmp_path}", f"data.datasets=[{bad}]",
                          "train.max_steps=40", "train.max_nonfinite=1"]), timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    m = re.search(r"time index 3 .*; every rank skipped the update of step (\d+) after "
                  r"writing the checkpoint of step (\d+): mend", line)
    step = int(m.group(1))
    assert int(m.group(2)) == step - 1 >= 1, line
    log = (run_dir / "train.log").read_text()
    assert "non-finite loss" not in log, log[-3000:]
    assert checkpoint.tags(checkpoint.checkpoint_dir(str(run_dir)))[-1] == f"step{step - 1:08d}"
    saved = torch.load(run_dir / "checkpoints" / f"step{step - 1:08d}" / "dsfm_rank0.pt",
                       weights_only=False)
    assert saved["loader"]["sampler"]["step"] == step - 1    # a micro-batch a step: read again
    assert sorted(losses(run_dir)) == list(range(1, step))


def test_a_valid_file_damaged_mid_run_stops_the_evaluation_with_a_checkpoint(demo_base,
                                                                           tmp_path):
    """A valid file overwritten while the run trains (checked at the start): the evaluation's
    loader cannot even open it, on every rank, so there is no rollout to stand in for; the
    ranks agree on it before any, and stop after writing the checkpoint of the step evaluated
    (the steps since the last checkpoint were lost)."""
    from dsfm.runtime import checkpoint
    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    valid = sorted((ds / "data" / "valid").glob("*.hdf5"))[-1]
    run_dir = tmp_path / "r"
    proc = subprocess.Popen(
        train_cmd(ds_config(tmp_path, 2, micro=2), run_dir,
                  [f"data.base={tmp_path}", f"data.datasets=[{ds}]", "train.max_steps=60",
                   "train.eval_every=60", "train.eval_batches=1", "train.rollout_steps=1",
                   "train.checkpoint_every=0"]),
        cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for_logged_steps(run_dir, 1, 240)
        valid.write_bytes(b"not HDF5 " * 64)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    [line] = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert line == (
        "error (rank 0): evaluation at step 60 (valid split; the evaluation's own loader, whose "
        f"steps count its batches): {valid}: cannot be opened as HDF5 (file signature not "
        "found); the file is truncated or corrupt, regenerate or re-download it; every rank "
        "stopped after writing the checkpoint of step 60: mend or replace the file, then "
        f"--resume --run-dir {run_dir} evaluates step 60 and goes on"), line
    assert checkpoint.tags(checkpoint.checkpoint_dir(str(run_dir))) == ["step00000060"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_evaluation_data_error_on_cuda_checkpoints_and_stops(demo_base, tmp_path):
    """On a GPU the evaluation loader's NaN check of a batch is read one next() later, and
    that of the last batch after the loop (`check_last`): a NaN in the split's last window,
    whichever batch holds it, stops the run at the evaluation of step 2 with that step's
    checkpoint. ZeRO-2, one rank, all 40 valid windows evaluated."""
    import h5py

    from dsfm.runtime import checkpoint
    ds = tmp_path / "euler_2d"
    shutil.copytree(os.path.join(demo_base, "euler_2d"), ds)
    valid = sorted((ds / "data" / "valid").glob("*.hdf5"))[-1]
    with h5py.File(valid, "r+") as f:
        f["t0_fields/pressure"][0, 23, 5, 5] = float("nan")
    run_dir = tmp_path / "r"
    proc = run(train_cmd(ds_config(tmp_path, 2, micro=2), run_dir,
                         [f"data.base={tmp_path}", f"data.datasets=[{ds}]", "train.max_steps=4",
                          "train.eval_every=2", "train.eval_batches=20",
                          "train.rollout_steps=1", "train.checkpoint_every=0"]), timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert line.startswith("error (rank 0): evaluation at step 2 (valid split; the evaluation's "
                           f"own loader, whose steps count its batches): {valid}: /t0_fields/"
                           "pressure has NaN/Inf at trajectory 0, time index 23"), line
    assert line.endswith(f"every rank stopped after writing the checkpoint of step 2: mend or "
                         f"replace the file, then --resume --run-dir {run_dir} evaluates step 2 "
                         "and goes on"), line
    assert checkpoint.tags(checkpoint.checkpoint_dir(str(run_dir))) == ["step00000002"]


def test_a_checkpoint_of_older_numerics_resumes_with_a_warning(demo_base, tmp_path):
    """A checkpoint written before model_numerics was recorded (T5 buckets at 128, embedding
    bias not rescaled) still resumes, and the log says its weights now compute differently.
    Nor did dsfm record its files' sizes then: such a checkpoint resumes unchecked."""
    ds = ds_config(tmp_path, 2, micro=4)
    r = tmp_path / "r"
    train(ds, r, ["train.max_steps=2"], data=demo_base)
    tag = r / "checkpoints" / "step00000002"
    states = tag / "mp_rank_00_model_states.pt"
    payload = torch.load(states, weights_only=False)
    assert payload.pop("model_numerics") == 2
    torch.save(payload, states)
    meta = json.loads((tag / "dsfm_meta.json").read_text())
    del meta["files"]                   # nor were the files' sizes: not checked
    (tag / "dsfm_meta.json").write_text(json.dumps(meta))
    proc = train(ds, r, ["train.max_steps=3"], resume=True, data=demo_base)
    assert "warning: the checkpoint was trained with AViT numerics 1" in proc.stdout


def test_model_attention_reaches_the_model_also_when_fine_tuning_or_resuming():
    """model.attention (auto by default: fused on the CPU; or packed), model.backward_matmuls
    (autograd by
    default, or tn) and model.fp32_matmuls (native by default, or 3xtf32) build the AViT with
    that attention, backward and products; from a checkpoint's or
    train.init_from's model_config too (each computes the same numbers either way, so the
    run's config decides, not what the weights were trained with)."""
    from dsfm.config import load_config
    from dsfm.models.avit import AViT, AViTConfig
    from dsfm.runtime.engine import attention_choice
    from dsfm.train import model_config

    vocab = ["a", "b", "c"]
    # auto: fused on a CPU, packed on a GPU in fp32 (test_config.py)
    auto = attention_choice("auto", torch.cuda.is_available(), False)[0]
    assert model_config(load_config(None), vocab, None).attention == auto
    cfg = load_config(None, ["model.attention=packed"])
    assert model_config(cfg, vocab, None) == AViTConfig(3, *cfg.model_shape(),
                                                       cfg.model.drop_path, attention="packed")
    saved = {"n_fields": 3, "dim": 48, "heads": 3, "blocks": 2, "drop_path": 0.0,
             "revin_eps": 1e-7}                    # written before attention was recorded
    pretrained = {"model_config": saved, "model": None, "vocabulary": {}}
    assert model_config(cfg, vocab, pretrained).attention == "packed"
    pretrained["model_config"] = {**saved, "attention": "packed"}
    assert model_config(load_config(None), vocab, pretrained).attention == auto
    assert model_config(load_config(None), vocab, None).backward_matmuls == "autograd"
    cfg = load_config(None, ["model.backward_matmuls=tn"])
    built = model_config(cfg, vocab, None)
    assert built.backward_matmuls == "tn" and built.attention == auto
    assert model_config(cfg, vocab, pretrained).backward_matmuls == "tn"
    pretrained["model_config"] = {**saved, "backward_matmuls": "tn"}
    assert model_config(load_config(None), vocab, pretrained).backward_matmuls == "autograd"
    model = AViT(built)
    assert {b.spatial.mlp.fc1.backward_matmuls for b in model.blocks} == {"tn"}
    assert {b.temporal.backward_matmuls for b in model.blocks} == {"tn"}
    # model.fp32_matmuls likewise (native by default, or 3xtf32)
    assert model_config(load_config(None), vocab, pretrained).fp32_matmuls == "native"
    cfg = load_config(None, ["model.fp32_matmuls=3xtf32"])
    built = model_config(cfg, vocab, None)
    assert built.fp32_matmuls == "3xtf32" and built.backward_matmuls == "autograd"
    assert model_config(cfg, vocab, {**pretrained, "model_config": saved}).fp32_matmuls == "3xtf32"
    pretrained["model_config"] = {**saved, "fp32_matmuls": "3xtf32"}
    assert model_config(load_config(None), vocab, pretrained).fp32_matmuls == "native"
    model = AViT(built)
    assert {b.spatial.mlp.fc2.fp32_matmuls for b in model.blocks} == {"3xtf32"}
    assert {b.spatial.fp32_matmuls for b in model.blocks} == {"3xtf32"}
    assert {b.temporal.fp32_matmuls for b in model.blocks} == {"3xtf32"}
