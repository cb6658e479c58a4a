"""One rank of the ZeRO-3 whole-block tests (`dsfm.runtime.zero_blocks`).

Two ZeRO-3 engines over the same small AViT, every parameter partitioned (persistence threshold
0) and a small prefetch bucket, one built as dsfm builds it (each space-time block gathered as
one unit) and one module by module (`whole_blocks=False`, DeepSpeed's own), trained side by
side on the same batches: micro-batches accumulated (`--accumulation`), one batch whose
gradients are NaN (the update skipped), with `--freeze processor` the blocks frozen (fine-tuning
the embedding and the head through them), with `--freeze stem` the field embedding and the stem
frozen (the first block's input needs no gradient, while its parameters train). Then each
engine saves, and each checkpoint is loaded into a new engine of the other kind for one more
step. Hands back `ZERO_BLOCKS` (records.py): per step whether the two engines' losses,
gradient norms and partitioned weights are equal, the ZeRO-3 module hooks each engine ran in
the step (`fetch_sub_module` calls), and whether the cross-loaded engines ended equal.
"""

import argparse
import copy
import os

import torch

from dsfm.errors import ConfigError
from dsfm.eval import nmse
from dsfm.models.avit import AViT, AViTConfig
from dsfm.runtime.dist import exit_process
from dsfm.runtime.engine import build_engine, finish, init_process_group
from dsfm.runtime.zero_blocks import whole_blocks
from tests.runtime.records import emit
from tests.runtime.zero_local_probe import apart, batch_maker, equal

KINDS = ("blocks", "modules")


def partitions(engine) -> list[torch.Tensor]:
    """This rank's fp32 partitions of the weights (what ZeRO-3's optimizer updates)."""
    return [t.detach().clone() for t in engine.optimizer.fp32_partitioned_groups_flat]


def hooked_modules(engine) -> int:
    """Modules on which ZeRO-3 gathers parameters before a call (its forward pre-hooks)."""
    return sum(1 for m in engine.module.modules() if m._forward_pre_hooks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--freeze", choices=("none", "processor", "stem"), default="none")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    env = init_process_group()
    torch.manual_seed(0)
    model = AViT(AViTConfig(n_fields=4, dim=48, heads=3, blocks=3, drop_path=0.0))
    frozen = {"none": (), "processor": (model.blocks,),
              "stem": (model.space_bag, model.embed)}[args.freeze]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    config = {"train_micro_batch_size_per_gpu": 2,
              "gradient_accumulation_steps": args.accumulation, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {
                  "lr": 1e-3, "torch_adam": not torch.cuda.is_available()}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_prefetch_bucket_size": 20000,
                                    "reduce_bucket_size": 20000},
              "steps_per_print": 10 ** 9}

    def build(kind):
        return build_engine(copy.deepcopy(model), config, whole_blocks=kind == "blocks")[0]

    engines = {kind: build(kind) for kind in KINDS}
    record = {"rank": env.rank, "world_size": env.world_size,
              "device": str(engines["blocks"].device),
              "whole": {k: whole_blocks(e.module) for k, e in engines.items()},
              "hooked": {k: hooked_modules(e) for k, e in engines.items()},
              "modules": sum(1 for _ in model.modules()),
              # the modules inside the blocks, whose own hooks whole blocks go without
              "inner": sum(sum(1 for _ in b.modules()) - 1 for b in model.blocks),
              "steps": []}
    # the fine-tuning helpers over partitioned parameters (each a (0,) placeholder): the
    # field count read from their real shape, and widening or freezing refused
    module = engines["blocks"].module
    record["n_fields_partitioned"] = module.n_fields
    record["refused"] = []
    for helper in (lambda: module.add_fields(1), module.freeze_processor):
        try:
            helper()
            record["refused"].append(None)
        except ConfigError as exc:
            record["refused"].append(str(exc))
    fetches = {}
    for kind, engine in engines.items():           # count the gathers each step runs
        coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
        fetch = coordinator.fetch_sub_module

        def counted(*a, _fetch=fetch, _kind=kind, **k):
            fetches[_kind] = fetches.get(_kind, 0) + 1
            return _fetch(*a, **k)
        coordinator.fetch_sub_module = counted
    dev = engines["blocks"].device
    batches = batch_maker(env.rank, dev)
    ids = torch.arange(4, device=dev)
    bcs = torch.full((2, 2, 2), 2.0)

    def train_step(engine, micro):
        losses = []
        for x, y in micro:
            loss = nmse(engine(x, ids, bcs), y)
            losses.append(float(loss.detach()))
            engine.backward(loss)
            engine.step()
        return losses

    for step in range(5):
        micro = batches(args.accumulation, poison=step == 2 and env.rank == 0)
        got = {}
        for kind, engine in engines.items():
            skipped = engine.skipped_steps
            fetches[kind] = 0
            losses = train_step(engine, micro)
            norm = engine.get_global_grad_norm()
            got[kind] = {"losses": losses, "norm": None if norm is None else float(norm),
                         "skipped": engine.skipped_steps - skipped,
                         "weights": partitions(engine), "fetches": fetches[kind]}
        a, b = got["blocks"], got["modules"]
        # (on CUDA some backward kernels add in no fixed order: how far apart, beside equal)
        record["steps"].append({
            **apart(a, b), "poisoned": step == 2, "losses_equal": equal(a["losses"], b["losses"]),
            "norm_blocks": a["norm"], "norm_modules": b["norm"],
            "skipped_blocks": a["skipped"], "skipped_modules": b["skipped"],
            "weights_equal": equal(a["weights"], b["weights"]),
            "fetches_blocks": a["fetches"], "fetches_modules": b["fetches"]})

    dirs = {k: os.path.join(args.out, k) for k in KINDS}
    for kind, engine in engines.items():
        engine.save_checkpoint(dirs[kind], tag="t")
    # each kind's checkpoint into an engine of the other kind: one more step, the same
    more = batches(args.accumulation)
    after = {}
    for kind, other in zip(KINDS, reversed(KINDS)):
        engine = build(other)
        engine.load_checkpoint(dirs[kind], tag="t")
        after[kind] = (train_step(engine, more), partitions(engine))
    record["cross_loaded_equal"] = equal(after["blocks"], after["modules"])
    emit("ZERO_BLOCKS", record)
    finish(env)


if __name__ == "__main__":
    exit_process(main())
