"""One rank of the ZeRO-2 engine tests.

Default: two ZeRO engines (stage 2, or `--stage 3`) over the same small AViT, one with dsfm's
multi-tensor gradient norm and one with DeepSpeed's own, trained side by side on the same
batches. Each rank hands back
`ZERO_NORM` (records.py): per step both norms of the same gradients, the operators each issued, both
engines' losses, and what a NaN gradient on rank 0 did.

`--stage 0`: one engine without ZeRO, clipping at 1.0; prints `PLAIN_NORM {json}`: per step
the norm `get_global_grad_norm()` reports and the 2-norm of the gradients before the step.

`--shipped`: an engine with the ZeRO settings of ds_configs/zero2.json over an AViT-B (116 M
parameters); prints `SHIPPED {json}`: the gradient buffers DeepSpeed allocated and the
reductions one backward issued.
"""

import argparse
import copy
import json
import sys

import torch

from dsfm.eval import nmse
from dsfm.models.avit import AViT, AViTConfig
from dsfm.runtime.dist import exit_process
from dsfm.runtime.engine import build_engine, finish, init_process_group
from dsfm.runtime.zero_norm import _ORIGINAL, is_fused
from perf.op_count import Counting
from tests.runtime.records import emit


def count_norm_ops(fn):
    with Counting() as c:
        value = fn()
    return value, sum(c.ops.values())


def shipped(env) -> None:
    from dsfm.models.avit import avit
    from perf.train_bench import engine_config

    torch.manual_seed(0)
    # DeepSpeed's own reduction, as on several ranks (on this one rank dsfm would take the
    # gradients in place, without buckets: dsfm.runtime.zero_local)
    engine, _, _ = build_engine(avit("B", 4, drop_path=0.0), engine_config(1, 2),
                                local_gradients=False)
    opt = engine.optimizer
    calls = []
    reduce = opt.reduce_ipg_grads

    def counted(*args, **kwargs):               # the buffers as they are when a bucket is full
        calls.append([b.numel() * b.element_size()
                      for bucket in opt.ipg_buckets.values() for b in bucket.buffer])
        return reduce(*args, **kwargs)

    opt.reduce_ipg_grads = counted
    x, y = torch.randn(1, 2, 4, 32, 32), torch.randn(1, 4, 32, 32)
    engine.backward(nmse(engine(x, torch.arange(4), torch.full((1, 2, 2), 2.0)), y))
    record = {"zero_optimization": engine_config(1, 2)["zero_optimization"],
              "parameters": sum(p.numel() for p in engine.module.parameters()),
              "buffer_bytes": max(sum(c) for c in calls), "reductions": len(calls)}
    sys.stdout.write(f"SHIPPED {json.dumps(record)}\n")
    sys.stdout.flush()
    finish(env)


def plain(env) -> None:
    torch.manual_seed(0)
    model = AViT(AViTConfig(n_fields=4, dim=48, heads=3, blocks=2, drop_path=0.0))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9}
    engine, _, _ = build_engine(model, config)
    g = torch.Generator().manual_seed(100 + env.rank)
    dev = engine.device
    steps = []
    for _ in range(3):
        x = 3.0 * torch.randn(2, 4, 4, 32, 32, generator=g).to(dev)
        y = torch.randn(2, 4, 32, 32, generator=g).to(dev)
        engine.backward(nmse(engine(x, torch.arange(4, device=dev), torch.full((2, 2, 2), 2.0)),
                            y))
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        expected = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(t.double()) for t in grads])))
        engine.step()
        norm = engine.get_global_grad_norm()
        steps.append({"expected": expected, "reported": None if norm is None else float(norm)})
    sys.stdout.write(f"PLAIN_NORM {json.dumps({'rank': env.rank, 'steps': steps})}\n")
    sys.stdout.flush()
    finish(env)


def local(engine) -> list[torch.Tensor]:
    """This rank's parameters: under ZeRO-3 its partition of each (the full tensors exist only
    inside the forward and backward)."""
    return [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, choices=(0, 2, 3), default=2)
    parser.add_argument("--shipped", action="store_true")
    args = parser.parse_args()
    env = init_process_group()
    if args.shipped:
        return shipped(env)
    if args.stage == 0:
        return plain(env)
    stage = args.stage
    torch.manual_seed(0)
    model = AViT(AViTConfig(n_fields=4, dim=48, heads=3, blocks=2, drop_path=0.0))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
              # torch's AdamW: on CUDA DeepSpeed would first compile its FusedAdam (a minute)
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              # small buckets: several reductions per backward, gradients split between ranks
              "zero_optimization": {"stage": stage, "overlap_comm": True,
                                    "contiguous_gradients": True, "reduce_bucket_size": 20000},
              "steps_per_print": 10 ** 9}
    fused, _, _ = build_engine(copy.deepcopy(model), config, fused_grad_norm=True)
    own, _, _ = build_engine(copy.deepcopy(model), config, fused_grad_norm=False)
    assert is_fused(fused) and not is_fused(own)

    g = torch.Generator().manual_seed(100 + env.rank)
    dev = fused.device
    ids = torch.arange(4, device=dev)
    bcs = torch.full((2, 2, 2), 2.0)             # boundary codes stay on the host, as in training
    record = {"rank": env.rank, "stage": stage, "steps": [], "n_grads": None,
              "device": str(dev), "world_size": env.world_size}
    for step in range(5):
        x = 3.0 * torch.randn(2, 4, 4, 32, 32, generator=g).to(dev)
        y = torch.randn(2, 4, 32, 32, generator=g).to(dev)
        row = {}
        for name, engine in (("fused", fused), ("own", own)):
            loss = nmse(engine(x, ids, bcs), y)
            engine.backward(loss)
            row[f"loss_{name}"] = float(loss)
        opt = fused.optimizer
        grads = opt.averaged_gradients[0]
        params = opt.params_in_partition[0] if stage == 2 else opt.fp16_groups[0]
        record["n_grads"] = len(grads)
        poison = step == 3
        if poison and env.rank == 0:              # one NaN on one rank: every rank must skip
            for engine in (fused, own):
                engine.optimizer.averaged_gradients[0][1].view(-1)[0] = float("nan")
        if not poison:
            a, ops_fused = count_norm_ops(lambda: opt.get_grad_norm_direct(grads, params))
            b, ops_own = count_norm_ops(lambda: getattr(opt, _ORIGINAL)(grads, params))
            row.update(norm_fused=float(a), norm_own=float(b), ops_fused=ops_fused,
                       ops_own=ops_own, where_fused=f"{a.device} {a.dtype}",
                       where_own=f"{b.device} {b.dtype}")
        before = {n: [p.detach().clone() for p in local(e)]
                  for n, e in (("fused", fused), ("own", own))}
        for name, engine in (("fused", fused), ("own", own)):
            engine.step()
            after = local(engine)
            row[f"changed_{name}"] = any(not torch.equal(p0, p1)
                                         for p0, p1 in zip(before[name], after))
            row[f"global_norm_{name}"] = float(engine.get_global_grad_norm())
        record["steps"].append(row)
    emit("ZERO_NORM", record)
    finish(env)


if __name__ == "__main__":
    exit_process(main())
