"""python -m perf.attention_bench: the blocks' attention alone, per size and implementation.

One space-time block makes two attention calls on the benchmark's inputs (micro-batch 8, L: 4;
16 frames; 128×128, so 8×8 patches): temporal, batch·H·W sequences of T frames, and axial on a
square grid, 2·batch·T·H sequences of H patches (rows and columns in one call). This times
each call as the block makes it, forward and backward, with the gradient of the
relative-position bias, for each `model.attention` (fused, packed, direct: dsfm.models.layers),
eager and compiled (torch.compile of the call alone, as the compiled blocks compile it with the
rest of the block), in fp32 and TF32 (CUDA). Reports ms per call (median of the timed
iterations, each between two device synchronizations), the attention time of a whole step
(× blocks, each on every frame: the model's last block, on its decoded frame only
(AViT.skip_unused_frames), makes smaller calls, so the model's is a little less), and the
error against the same call in float64: the largest difference over the output, the q, k,
v gradients and the bias table's gradient, relative to that tensor's largest magnitude. A
profile of the whole training step splits kernel time by kernel name, which
compiled direct attention's kernels (inductor's, named after their operators) do not carry:
this measures attention by itself.

    python -m perf.attention_bench --json out.json                  # B and L, every variant, GPU
    python -m perf.attention_bench --sizes Ti --batch 1 --iters 3   # a CPU smoke
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from dsfm.helpfmt import RawHelpFormatter
from dsfm.runtime.dist import exit_process
from perf.cli import non_negative_int
from perf.report import write_json
from perf.train_bench import add_call_options, check_shapes, median_ms

MODES = ("eager", "compiled")
NUMERICS = ("fp32", "tf32")


class Call(nn.Module):
    """One attention call of a block: a batch of sequences of `length` under the relative
    bias, q, k and v split from one projection output [n, L, heads, 3·hd] as the blocks split
    theirs (strided views)."""

    def __init__(self, attention: str, heads: int, length: int, periodic: bool):
        super().__init__()
        from dsfm.models.layers import RelativePositionBias

        self.attention, self.length, self.periodic = attention, length, periodic
        self.rpb = RelativePositionBias(heads)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        from dsfm.models.layers import ATTENTION

        q, k, v = (t.transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        return ATTENTION[self.attention](q, k, v, self.rpb(self.length, self.periodic)[None])


def shapes(size: str, batch: int, frames: int, res: int, patch: int = 16) -> dict:
    """The two calls' batches of sequences for `size` on these inputs, and the blocks."""
    from dsfm.models.avit import SIZES

    dim, heads, blocks = SIZES[size]
    side = res // patch
    return {"heads": heads, "hd": dim // heads, "blocks": blocks,
            "temporal": (batch * side * side, frames, False),
            "axial": (2 * batch * frames * side, side, True)}


def run_call(attention: str, mode: str, n: int, length: int, periodic: bool, heads: int,
             hd: int, args, device: torch.device) -> tuple[float, float]:
    """(median ms of forward + backward, relative error against float64) of one call."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, length, heads, 3 * hd, generator=g, dtype=torch.float64)
    grad = torch.randn(n, heads, length, hd, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    call = Call(attention, heads, length, periodic).to(device)
    with torch.no_grad():
        call.rpb.relative_attention_bias.weight.normal_()
    ref = Call("direct", heads, length, periodic).to(device, torch.float64)  # eager: exact
    ref.load_state_dict(call.state_dict())
    call.rpb.buckets(length, periodic, device)     # filled before a compiled call reads it
    fn = torch.compile(call, dynamic=False, fullgraph=True) if mode == "compiled" else call

    def step(module, dtype):
        qkv = base.to(device, dtype).requires_grad_()
        module.zero_grad(set_to_none=True)
        out = module(qkv)
        out.backward(grad.to(device, dtype))
        return [out.detach(), qkv.grad, module.rpb.relative_attention_bias.weight.grad]

    got = step(fn, torch.float32)
    want = step(ref, torch.float64)
    err = max(float((a.double() - b).abs().max() / b.abs().max().clamp(min=1e-30))
              for a, b in zip(got, want))
    qkv = base.to(device, torch.float32).requires_grad_()
    dy = grad.to(device, torch.float32)

    def clear():
        qkv.grad = None
        call.zero_grad(set_to_none=True)

    return median_ms(lambda: fn(qkv).backward(dy), args.iters, args.warmup, clear), err


def main(argv=None) -> int:
    from dsfm.models.avit import SIZES
    from dsfm.models.layers import ATTENTION
    from dsfm.runtime.engine import device as pick_device
    from dsfm.runtime.engine import set_tf32

    ap = argparse.ArgumentParser(prog="python -m perf.attention_bench", description=__doc__,
                                 formatter_class=RawHelpFormatter)
    ap.add_argument("--sizes", default="B,L")
    ap.add_argument("--attention", default=",".join(ATTENTION),
                    help="one or more of " + ", ".join(ATTENTION))
    ap.add_argument("--modes", default="eager,compiled", help="eager, compiled, or both")
    ap.add_argument("--numerics", default=None,
                    help="fp32 (strict) and/or tf32; default: both on CUDA, fp32 on CPU")
    ap.add_argument("--batch", type=non_negative_int, default=0, help="default (0): 8, L: 4")
    add_call_options(ap)
    args = ap.parse_args(argv)
    dev = pick_device()
    numerics = (args.numerics or ("fp32,tf32" if dev.type == "cuda" else "fp32")).split(",")
    given = {"--sizes": (args.sizes.split(","), tuple(SIZES)),
             "--attention": (args.attention.split(","), tuple(ATTENTION)),
             "--modes": (args.modes.split(","), MODES),
             "--numerics": (numerics, NUMERICS)}
    for flag, (values, known) in given.items():
        if not values or set(values) - set(known):
            ap.error(f"{flag}: one or more of {', '.join(known)}")
    if "tf32" in numerics and dev.type != "cuda":
        ap.error("--numerics tf32: TF32 is a CUDA matmul mode; this machine has no CUDA device")
    check_shapes(ap, args.res, 4)
    rows = []
    head = (f"{'size':4s} {'num':5s} {'attn':6s} {'mode':8s} {'temporal ms':>11s} "
            f"{'axial ms':>9s} {'step ms':>8s} {'vs fused':>8s} {'max rel err':>11s}")
    for size in args.sizes.split(","):
        batch = args.batch or (4 if size == "L" else 8)
        sh = shapes(size, batch, args.frames, args.res)
        for num in numerics:
            set_tf32(num == "tf32")
            for attention in args.attention.split(","):
                for mode in args.modes.split(","):
                    row = {"size": size, "numerics": num, "attention": attention, "mode": mode,
                           "batch": batch, "frames": args.frames, "res": args.res,
                           "blocks": sh["blocks"]}
                    for name in ("temporal", "axial"):
                        n, length, periodic = sh[name]
                        ms, err = run_call(attention, mode, n, length, periodic, sh["heads"],
                                           sh["hd"], args, dev)
                        row[f"{name}_ms"], row[f"{name}_err"] = ms, err
                        row[f"{name}_shape"] = [n, sh["heads"], length, sh["hd"]]
                    row["step_ms"] = sh["blocks"] * (row["temporal_ms"] + row["axial_ms"])
                    rows.append(row)
                    print(f"  {size} {num} {attention} {mode}: {row['step_ms']:.1f} ms a step",
                          flush=True)
    set_tf32(False)
    print(f"The blocks' attention calls, forward and backward, on {dev.type}: "
          f"{args.frames} frames, {args.res}x{args.res} (patch 16), median of {args.iters}")
    print(head)
    print("-" * len(head))
    for row in rows:
        fused = next((r for r in rows if r["size"] == row["size"] and r["mode"] == row["mode"]
                      and r["numerics"] == row["numerics"] and r["attention"] == "fused"), None)
        vs = f"{row['step_ms'] / fused['step_ms']:7.2f}x" if fused else "     n/a"
        err = max(row["temporal_err"], row["axial_err"])
        print(f"{row['size']:4s} {row['numerics']:5s} {row['attention']:6s} {row['mode']:8s} "
              f"{row['temporal_ms']:11.3f} {row['axial_ms']:9.3f} {row['step_ms']:8.1f} "
              f"{vs} {err:11.1e}")
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name() if dev.type == "cuda"
                               else "cpu", "rows": rows})
    return 0


if __name__ == "__main__":
    exit_process(main())
