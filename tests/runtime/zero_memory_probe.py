"""One rank of the ZeRO-3 memory tests: which parameters a shipped ZeRO-3 config keeps gathered.

A small AViT whose blocks' weights are larger than the configs' persistence threshold (so that
ZeRO-3 partitions them) trains three steps under each ds_config named on the command line, as
dsfm.train builds its engine (each space-time block gathered as one unit), then evaluates once.
A dispatch mode samples, after every operator of the forward and of the backward, how many
elements of partitioned parameters are gathered at that moment (`live`); the probe also reads
it after the first forward, after each step and after the evaluation. The shipped
`stage3_max_live_parameters`, a number of AViT-L's blocks' elements, is scaled to the same
number of this model's blocks. `NAME-deepspeed` is NAME with `stage3_prefetch_bucket_size`,
`stage3_max_live_parameters` and `stage3_max_reuse_distance` removed (DeepSpeed's defaults:
5e7, 1e9, 1e9); `NAME-uncapped`: NAME without its `stage3_max_live_parameters`. Hands back
`ZERO_MEMORY` (records.py): per config the partitioned elements in all, those of the largest block,
the cap, train.log's line on what is held (`held_gathered`), the samples' maxima, the three
readings, the losses and whether the weights equal the first config's.
"""

import argparse
import json
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsfm.eval import nmse
from dsfm.models.avit import AViT, AViTConfig
from dsfm.runtime import schedule
from dsfm.runtime.dist import exit_process
from dsfm.runtime.engine import build_engine, cpu_optimizer, finish, init_process_group
from dsfm.runtime.zero_blocks import held_gathered
from tests.runtime.records import emit
from tests.runtime.zero_local_probe import batch_maker, equal

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs")
GATHERING = ("stage3_prefetch_bucket_size", "stage3_max_live_parameters",
             "stage3_max_reuse_distance")
DIM, BLOCKS = 192, 3


def block_elements(model: AViT) -> int:
    return sum(p.numel() for p in model.blocks[0].parameters())


def l_block() -> int:
    """The elements of one of AViT-L's space-time blocks (the unit the configs count in)."""
    from dsfm.models.avit import avit

    with torch.device("meta"):
        return block_elements(avit("L", 12))


def shipped(name: str, block: int) -> dict:
    base, _, variant = name.partition("-")
    with open(os.path.join(CONFIGS, base)) as fh:
        ds = schedule.resolve(json.load(fh), max_steps=10)
    ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"] = 2, 1
    ds["steps_per_print"] = 10 ** 9
    zero = ds["zero_optimization"]
    if "stage3_max_live_parameters" in zero:            # the same number of blocks
        zero["stage3_max_live_parameters"] = round(
            zero["stage3_max_live_parameters"] * block / l_block())
    if variant == "deepspeed":
        for key in GATHERING:
            zero.pop(key, None)
    elif variant == "uncapped":
        zero.pop("stage3_max_live_parameters", None)
    elif variant:
        raise SystemExit(f"unknown variant {variant!r}")
    return cpu_optimizer(ds)


def gathered(params) -> int:
    """Elements of partitioned parameters gathered (or being gathered) now."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return sum(p.ds_numel for p in params
               if not p.ds_persist and p.ds_status != ZeroParamStatus.NOT_AVAILABLE)


class Sampling(TorchDispatchMode):
    """The most elements gathered after any operator dispatched while it is on."""

    def __init__(self, params):
        super().__init__()
        self.params, self.peak = params, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, gathered(self.params))
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", nargs="+", required=True)
    args = parser.parse_args()
    env = init_process_group()
    torch.manual_seed(0)
    model = AViT(AViTConfig(n_fields=4, dim=DIM, heads=3, blocks=BLOCKS, drop_path=0.0))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    block = block_elements(model)
    record = {"rank": env.rank, "configs": {}}
    first_weights = None
    for name in args.configs:
        model.load_state_dict(state)
        ds = shipped(name, block)
        engine = build_engine(model, ds)[0]
        params = list(engine.module.parameters())
        blocks = [sum(p.ds_numel for p in b.parameters() if not p.ds_persist)
                  for b in engine.module.blocks]
        dev = engine.device
        batches = batch_maker(env.rank, dev)
        ids, bcs = torch.arange(4, device=dev), torch.full((2, 2, 2), 2.0)
        row = {"partitioned": sum(p.ds_numel for p in params if not p.ds_persist),
               "largest_block": max(blocks), "peak_forward": [], "peak_backward": [],
               "after_forward": [], "after_step": [], "losses": [],
               "max_live": ds["zero_optimization"].get("stage3_max_live_parameters"),
               "held_line": held_gathered(engine)}
        for x, y in batches(3):
            forward = Sampling(params)
            with forward:
                loss = nmse(engine(x, ids, bcs), y)
            row["after_forward"].append(gathered(params))
            backward = Sampling(params)
            with backward:
                engine.backward(loss)
            engine.step()
            row["peak_forward"].append(forward.peak)
            row["peak_backward"].append(backward.peak)
            row["after_step"].append(gathered(params))
            row["losses"].append(float(loss.detach()))
        engine.eval()
        with torch.no_grad():
            engine(batches(1)[0][0], ids, bcs)
        row["after_eval"] = gathered(params)
        weights = [t.detach().cpu().clone() for t in engine.optimizer.fp32_partitioned_groups_flat]
        first_weights = weights if first_weights is None else first_weights
        row["weights_equal_first"] = equal(weights, first_weights)
        record["configs"][name] = row
        engine.destroy()
        model = AViT(AViTConfig(n_fields=4, dim=DIM, heads=3, blocks=BLOCKS, drop_path=0.0))
    emit("ZERO_MEMORY", record)
    finish(env)


if __name__ == "__main__":
    exit_process(main())
