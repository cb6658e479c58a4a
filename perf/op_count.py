"""python -m perf.op_count: what the host issues per AViT training step, counted on any machine.

A training step whose GPU work is small is paced by the host: Python and PyTorch's dispatcher
issue its kernels one by one (docs/performance.md, "On one NVIDIA H200"). This counts, with a
dispatch-level counter (TorchDispatchMode), the operators that do work (views and other metadata
left out):
  - of one space-time block's forward and backward;
  - of a whole step's forward and backward;
  - of a one-rank DeepSpeed ZeRO-2 engine's backward and step, beside plain PyTorch's (with
    dsfm's multi-tensor gradient norm and with DeepSpeed's own);
and the reads of a tensor's value back to the host (`aten._local_scalar_dense`), which on a GPU
are synchronizations, with the source line (DeepSpeed's or dsfm's) that asked for each. On a CPU
attention runs unfused, so a GPU issues a few operators fewer; the optimizer's own work (torch's
AdamW here, fused on a GPU) is counted apart. Compiled blocks cannot be counted this way (the
counter makes the compiled code fall back to eager).

    python -m perf.op_count --size Ti [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsfm.helpfmt import HelpFormatter
from dsfm.runtime.dist import exit_process
from perf.cli import avit_size, positive_int
from perf.report import write_json

METADATA = {"view", "_unsafe_view", "unsqueeze", "squeeze", "permute", "expand", "transpose",
            "t", "detach", "alias", "as_strided", "slice", "select", "unbind", "split",
            "split_with_sizes", "chunk", "empty", "empty_like", "empty_strided", "lift_fresh",
            "_reshape_alias", "unflatten", "flatten", "reshape", "movedim", "narrow"}
SOURCES = ("site-packages/deepspeed/", "/dsfm/")


class Counting(TorchDispatchMode):
    """Operators that do work, and host reads with the deepspeed/dsfm line that made them.
    What the optimizer itself does (torch's own here, one fused kernel per group on a GPU) is
    counted apart, as are the model's reads of the boundary codes (host tensors in training)."""

    def __init__(self, stacks: bool = False):
        super().__init__()
        self.stacks = stacks
        self.ops: Counter = Counter()
        self.optimizer_ops = 0
        self.reads: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in METADATA:
            return func(*args, **(kwargs or {}))
        stack = traceback.extract_stack(limit=40) if self.stacks else []
        if any("torch/optim/" in f.filename for f in stack):
            self.optimizer_ops += 1
        elif name == "_local_scalar_dense":
            frames = [f for f in stack
                      if any(s in f.filename for s in SOURCES) and "op_count" not in f.filename]
            where = (f"{frames[-1].filename.split('site-packages/')[-1].split('/work/')[-1]}:"
                     f"{frames[-1].lineno}") if frames else "?"
            if "dsfm/models/avit.py" not in where:
                self.reads[where] += 1
        else:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count(fn, stacks: bool = False) -> Counting:
    with Counting(stacks) as c:
        fn()
    return c


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="python -m perf.op_count",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="Ti", type=avit_size, help="AViT size (Ti, S, B, L)")
    ap.add_argument("--res", type=positive_int, default=32)
    ap.add_argument("--frames", type=positive_int, default=4)
    ap.add_argument("--batch", type=positive_int, default=2)
    ap.add_argument("--no-deepspeed", action="store_true", help="skip the ZeRO-2 engine")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from perf.train_bench import check_shapes
    check_shapes(ap, args.res, 4)

    from dsfm.eval import nmse
    from dsfm.models.avit import avit

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.frames, 4, args.res, args.res, generator=g)
    y = torch.randn(args.batch, 4, args.res, args.res, generator=g)
    ids, bcs = torch.arange(4), torch.full((args.batch, 2, 2), 2.0)
    model = avit(args.size, 12, drop_path=0.0)
    n_blocks = len(model.blocks)
    report: dict = {"size": args.size, "blocks": n_blocks,
                    "shape": [args.batch, args.frames, 4, args.res, args.res]}

    # one block, forward then backward, on the input the first block sees
    with torch.no_grad():
        z = model.embed.tokens(x.flatten(0, 1), model.space_bag(None, ids))
        z = z.unflatten(0, x.shape[:2])                 # the blocks' tokens [B, T, H, W, C]
    z.requires_grad_(True)
    block = model.blocks[0]
    out = block(z, (True, True))                    # warm: relative-position buckets cached
    out.sum().backward()
    # as in a step (zero_grad(set_to_none=True)): the counted backward assigns the gradients;
    # left in place, each of the block's 32 parameter gradients and z's would cost an add_
    block.zero_grad(set_to_none=True)
    z.grad = None
    holder = {}
    fwd = count(lambda: holder.update(out=block(z, (True, True))))
    bwd = count(lambda: holder["out"].sum().backward())
    report["block"] = {"forward": sum(fwd.ops.values()), "backward": sum(bwd.ops.values()),
                       "forward_ops": dict(fwd.ops.most_common()),
                       "backward_ops": dict(bwd.ops.most_common())}

    def step_counts(m) -> dict:
        m.zero_grad(set_to_none=True)
        nmse(m(x, ids, bcs), y).backward()          # warm (and compile, if compiled)
        m.zero_grad(set_to_none=True)
        keep = {}
        f = count(lambda: keep.update(loss=nmse(m(x, ids, bcs), y)))
        b = count(lambda: keep["loss"].backward())
        return {"forward": sum(f.ops.values()), "backward": sum(b.ops.values())}

    report["step_eager"] = step_counts(model)

    if not args.no_deepspeed:
        from dsfm.runtime.engine import build_engine, finish, init_process_group
        from perf.train_bench import engine_config, engine_step, plain_step

        env = init_process_group()
        step = plain_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4),
                          (x, ids, bcs, y))
        step()
        plain = count(step, stacks=True)
        counted = {"plain_step": plain}
        # dsfm's ZeRO-2 on one rank (gradients in place, multi-tensor norm); with DeepSpeed's
        # own norm; with DeepSpeed's per-parameter hooks and buckets
        for key, fused, local in (("zero2_step", True, True), ("zero2_dsnorm_step", False, True),
                                  ("zero2_hooks_step", True, False)):
            engine, _, _ = build_engine(copy.deepcopy(model), engine_config(args.batch, 2),
                                        fused_grad_norm=fused, local_gradients=local)
            zero2_step = engine_step(engine, (x, ids, bcs, y))
            zero2_step()
            counted[key] = count(zero2_step, stacks=True)
        for key, c in counted.items():
            report[key] = {"ops": sum(c.ops.values()), "optimizer_ops": c.optimizer_ops,
                           "host_reads": dict(c.reads), "copies": c.ops["copy_"],
                           "norms": c.ops["linalg_vector_norm"] + c.ops["norm"]
                           + c.ops["_foreach_norm"]}
        finish(env)

    b = report["block"]
    print(f"AViT-{args.size} ({n_blocks} blocks), input {report['shape']}, on the CPU")
    print(f"one block: {b['forward']} operators forward, {b['backward']} backward")
    s = report["step_eager"]
    print(f"whole step, eager: {s['forward']} forward + {s['backward']} backward")
    if "zero2_step" in report:
        p, z, d = report["plain_step"], report["zero2_step"], report["zero2_dsnorm_step"]
        h = report["zero2_hooks_step"]
        print(f"training step outside the optimizer's own work: plain {p['ops']} operators "
              f"({p['copies']} copies, {p['norms']} norms), DeepSpeed ZeRO-2 on 1 rank "
              f"{z['ops']} ({z['copies']} copies, {z['norms']} norms); with DeepSpeed's own "
              f"gradient norm (train.fused_grad_norm false) {d['ops']} ({d['norms']} norms); "
              f"with DeepSpeed's per-parameter gradient hooks (train.local_gradients false) "
              f"{h['ops']} ({h['copies']} copies)")
        reads = ", ".join(f"{w} ×{n}" for w, n in z["host_reads"].items()) or "none"
        print(f"host reads of tensor values per step (synchronizations on a GPU): plain "
              f"{sum(p['host_reads'].values())}, ZeRO-2 {sum(z['host_reads'].values())} "
              f"({reads})")
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    exit_process(main())
