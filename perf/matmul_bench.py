"""python -m perf.matmul_bench: the AViT step's matrix multiplies alone, per formulation and BLAS.

In strict fp32 on an H200 the step's matrix multiplies ran at about 38 TFLOP/s of the card's 67:
the forward's at about 45 (cuBLAS's `xmma_gemm_f32f32` kernels), the backward's 120 calls on
cuBLAS's SIMT `align1` kernels at about 34 (docs/performance.md). This times each matrix
multiply of a size's step at the benchmark's token count (micro-batch 8, L: 4; 16 frames;
128×128, patch 16), forward and both gradients, each gradient in every formulation that
gives the same numbers:
  - fwd          y = x·Wᵀ (F.linear), x [M, K], W [N, K];
  - dgrad        dx = dy·W;
  - dgrad_t      dx = (Wᵀ·dyᵀ)ᵀ (the transposed product, its result a transposed view);
  - dgrad_tn     dx = dy·W in the forward's layout (both operands contiguous along the
                 summed axis, cuBLAS's TN), after a copy of Wᵀ: what the blocks' projections
                 compute with model.backward_matmuls tn_dgrad or tn (layers._mm_tn, copy
                 included in the time);
  - wgrad        dW = dyᵀ·x (written [N, K], W's own layout; what autograd computes for a
                 linear layer);
  - wgrad_t      dW = (xᵀ·dy)ᵀ;
  - wgrad_tn     dW = dyᵀ·x in the forward's layout, after copies of dyᵀ and xᵀ
                 (backward_matmuls tn);
  - fwd_3x, dgrad_3x, wgrad_3x: the three products each as three TF32 products of the
                 operands split into TF32 heads and tails (model.fp32_matmuls 3xtf32:
                 layers.mm_3xtf32, fp32's accuracy, not its rounding), the splits included
                 in the time as eager runs them (compiled blocks fuse them into the
                 producers' kernels);
with each BLAS library asked for (CUDA: cuBLAS, cuBLASLt; `torch.backends.cuda.
preferred_blas_library`), in fp32 and/or TF32. Reports ms (median of the timed calls, each
between two synchronizations), TFLOP/s and the relative error (Frobenius) against the
float64 product of the same operands per row (strict fp32, TF32 and 3xTF32 side by side),
then per size the step's matrix-multiply time summed over its calls (× blocks; the last
block's, on its decoded frame, as fractions of a call: `gemms`) as each
model.backward_matmuls forms them (autograd: fwd, dgrad, wgrad; tn_dgrad: dgrad_tn; tn:
dgrad_tn and wgrad_tn; 3xtf32: the _3x ones, for the blocks' projections and MLP; the
stem's as autograd's) and with the fastest strict formulation of each, which says whether
another formulation would pay, and the largest error of the other rows (fp32 or TF32,
as --numerics says) and of the 3xTF32 ones.

    python -m perf.matmul_bench --sizes B,L --json out.json           # GPU
    python -m perf.matmul_bench --sizes Ti --tokens 512 --iters 2     # a CPU smoke
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F

from dsfm.helpfmt import RawHelpFormatter
from dsfm.models.layers import _mm_tn, mm_3xtf32
from dsfm.runtime.dist import exit_process
from perf.cli import non_negative_int
from perf.report import write_json
from perf.train_bench import add_call_options, check_shapes, median_ms

OPS = ("fwd", "dgrad", "dgrad_t", "dgrad_tn", "wgrad", "wgrad_t", "wgrad_tn", "fwd_3x",
       "dgrad_3x", "wgrad_3x")
#: the formulation of each product (fwd, dgrad, wgrad) per model.backward_matmuls, for the
#: blocks' projections and MLP (the stem's are autograd's whatever the setting)
MODES = {"autograd": {"fwd": "fwd", "dgrad": "dgrad", "wgrad": "wgrad"},
         "tn_dgrad": {"fwd": "fwd", "dgrad": "dgrad_tn", "wgrad": "wgrad"},
         "tn": {"fwd": "fwd", "dgrad": "dgrad_tn", "wgrad": "wgrad_tn"},
         "3xtf32": {"fwd": "fwd_3x", "dgrad": "dgrad_3x", "wgrad": "wgrad_3x"}}
#: the products of the blocks (`gemms`), which model.backward_matmuls forms
BLOCK_GEMMS = ("qkv", "proj", "fc1", "fc2")
NUMERICS = ("fp32", "tf32")


def gemms(size: str, tokens: int, frames: int, res: int) -> list[dict]:
    """The step's matrix multiplies of `size`: name, (M, K, N), calls per step and whether
    the input's gradient is computed (the blocks' four projections and MLP per block, the
    stem's three patch convolutions as dsfm computes them, the field embedding folded into
    the first, whose input, the fields, needs none; 4 fields). The last block runs on its
    decoded frame only (AViT.skip_unused_frames) but for its temporal QKV projection: its
    other products, of tokens / `frames` rows, count as 1 / `frames` of a call each (their
    time taken as proportional to M: an approximation, smaller products run less
    efficiently)."""
    from dsfm.models.avit import SIZES

    dim, _, blocks = SIZES[size]
    q = dim // 4
    n_frames = tokens // (res // 16) ** 2            # frames in the batch (batch · T)
    pixels = n_frames * res * res
    last = 1 / frames                                # the last block's share of a call
    return [
        {"name": "qkv", "mkn": (tokens, dim, 3 * dim), "calls": 2 * blocks - 1 + last},
        {"name": "proj", "mkn": (tokens, dim, dim), "calls": 2 * blocks - 2 + 2 * last},
        {"name": "fc1", "mkn": (tokens, dim, 4 * dim), "calls": blocks - 1 + last},
        {"name": "fc2", "mkn": (tokens, 4 * dim, dim), "calls": blocks - 1 + last},
        {"name": "stem1", "mkn": (pixels // 16, 16 * 4, q), "calls": 1, "dgrad": False},
        {"name": "stem2", "mkn": (pixels // 64, 4 * q, q), "calls": 1},
        {"name": "stem3", "mkn": (pixels // 256, 4 * q, dim), "calls": 1},
    ]


def operands(m: int, k: int, n: int, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    return {"x": torch.randn(m, k, device=device, generator=g),
            "w": torch.randn(n, k, device=device, generator=g) / k ** 0.5,
            "dy": torch.randn(m, n, device=device, generator=g)}


def reference(op: str, t: dict) -> torch.Tensor:
    """The float64 product `op` computes (each formulation of a gradient the same one)."""
    x, w, dy = (t[k].double() for k in ("x", "w", "dy"))
    if op.startswith("fwd"):
        return x @ w.t()
    return dy @ w if op.startswith("dgrad") else dy.t() @ x


def run_op(op: str, t: dict) -> torch.Tensor:
    x, w, dy = t["x"], t["w"], t["dy"]
    if op == "fwd":
        return F.linear(x, w)
    if op == "dgrad":
        return dy @ w
    if op == "dgrad_t":
        return (w.t() @ dy.t()).t()
    if op == "dgrad_tn":
        return _mm_tn(dy, w.t())
    if op == "wgrad":
        return dy.t() @ x
    if op == "wgrad_tn":
        return _mm_tn(dy.t(), x.t())
    if op == "fwd_3x":
        return mm_3xtf32(x, w.t())
    if op == "dgrad_3x":
        return mm_3xtf32(dy, w)
    if op == "wgrad_3x":
        return mm_3xtf32(dy.t(), x)
    return (x.t() @ dy).t()                               # wgrad_t


def main(argv=None) -> int:
    from dsfm.models.avit import SIZES
    from dsfm.runtime.engine import device as pick_device
    from dsfm.runtime.engine import set_tf32

    ap = argparse.ArgumentParser(prog="python -m perf.matmul_bench", description=__doc__,
                                 formatter_class=RawHelpFormatter)
    ap.add_argument("--sizes", default="B,L")
    ap.add_argument("--numerics", default="fp32", help="fp32 (strict) and/or tf32 (CUDA)")
    ap.add_argument("--blas", default=None,
                    help="cublas and/or cublaslt (CUDA; default: both); on the CPU: default")
    ap.add_argument("--tokens", type=non_negative_int, default=0,
                    help="tokens per micro-batch (M of the blocks' multiplies); default (0): "
                    "the benchmark's, batch (8, L: 4) x 16 frames x 8 x 8 patches")
    add_call_options(ap)
    args = ap.parse_args(argv)
    dev = pick_device()
    cuda = dev.type == "cuda"
    numerics = args.numerics.split(",")
    blas = (args.blas or ("cublas,cublaslt" if cuda else "default")).split(",")
    known_blas = ("cublas", "cublaslt") if cuda else ("default",)
    for flag, values, known in (("--sizes", args.sizes.split(","), tuple(SIZES)),
                                ("--numerics", numerics, NUMERICS),
                                ("--blas", blas, known_blas)):
        if set(values) - set(known):
            ap.error(f"{flag}: one or more of {', '.join(known)}"
                     + ("" if cuda else " (no CUDA device here)"))
    if "tf32" in numerics and not cuda:
        ap.error("--numerics tf32: TF32 is a CUDA matmul mode; this machine has no CUDA device")
    check_shapes(ap, args.res, 4)
    side = args.res // 16
    # the first call of a torch.library operator (dsfm::mm_tn) imports torch._dynamo, most
    # of a second: made here, not inside the first timed row whatever --warmup says
    run_op("dgrad_tn", operands(8, 8, 8, dev))
    rows = []
    for size in args.sizes.split(","):
        tokens = args.tokens or (4 if size == "L" else 8) * args.frames * side * side
        if tokens % (side * side):
            ap.error(f"--tokens {tokens}: whole frames of {side}x{side} patches")
        for num in numerics:
            set_tf32(num == "tf32")
            for lib in blas:
                if cuda:
                    torch.backends.cuda.preferred_blas_library(lib)
                for gemm in gemms(size, tokens, args.frames, args.res):
                    m, k, n = gemm["mkn"]
                    t = operands(m, k, n, dev)
                    refs = {}
                    for op in OPS:
                        if op.startswith("dgrad") and not gemm.get("dgrad", True):
                            continue
                        ms = median_ms(partial(run_op, op, t), args.iters, args.warmup)
                        kind = op.split("_")[0]
                        if kind not in refs:
                            refs[kind] = reference(op, t)
                        err = float((run_op(op, t).double() - refs[kind]).norm()
                                    / refs[kind].norm())
                        rows.append({"size": size, "numerics": num, "blas": lib,
                                     "gemm": gemm["name"], "m": m, "k": k, "n": n,
                                     "calls_per_step": gemm["calls"], "op": op, "ms": ms,
                                     "tflops": 2 * m * k * n / ms / 1e9, "rel_err": err})
                    del t, refs
                print(f"  {size} {num} {lib}: done", flush=True)
    set_tf32(False)
    if cuda:
        torch.backends.cuda.preferred_blas_library("default")
    print(f"The AViT step's matrix multiplies on {dev.type}: {args.frames} frames, "
          f"{args.res}x{args.res} (patch 16), median of {args.iters}")
    head = (f"{'size':4s} {'num':5s} {'blas':8s} {'gemm':6s} {'M':>7s} {'K':>5s} {'N':>5s} "
            f"{'op':8s} {'ms':>8s} {'TFLOP/s':>8s} {'rel.err':>8s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['size']:4s} {r['numerics']:5s} {r['blas']:8s} {r['gemm']:6s} {r['m']:7d} "
              f"{r['k']:5d} {r['n']:5d} {r['op']:8s} {r['ms']:8.3f} {r['tflops']:8.1f} "
              f"{r['rel_err']:8.1e}")
    summary = []
    for key in sorted({(r["size"], r["numerics"], r["blas"]) for r in rows}, key=str):
        mine = [r for r in rows if (r["size"], r["numerics"], r["blas"]) == key]
        by = {(r["gemm"], r["op"]): r for r in mine}
        total = dict.fromkeys([*MODES, "best"], 0.0)
        for gemm in {r["gemm"] for r in mine}:
            calls = by[(gemm, "fwd")]["calls_per_step"]
            for kind in ("fwd", "dgrad", "wgrad"):
                if (gemm, kind) not in by:        # no input gradient (the stem's first)
                    continue
                for mode, ops in MODES.items():
                    op = ops[kind] if gemm in BLOCK_GEMMS else kind
                    total[mode] += calls * by[(gemm, op)]["ms"]
                total["best"] += calls * min(by[(gemm, o)]["ms"] for o in OPS
                                             if o.startswith(kind) and not o.endswith("_3x"))
        errs = {"native": max(r["rel_err"] for r in mine if not r["op"].endswith("_3x")),
                "3xtf32": max(r["rel_err"] for r in mine if r["op"].endswith("_3x"))}
        summary.append({"size": key[0], "numerics": key[1], "blas": key[2],
                        **{f"{mode}_ms_per_step": ms for mode, ms in total.items()},
                        **{f"max_rel_err_{kind}": e for kind, e in errs.items()}})
        print(f"{key[0]} {key[1]} {key[2]}: the step's matrix multiplies "
              + ", ".join(f"{total[m]:.1f} ms {m}" for m in MODES)
              + f" (model.backward_matmuls; 3xtf32: model.fp32_matmuls), "
              f"{total['best']:.1f} ms with the fastest strict formulation of each; largest "
              f"error against float64 {errs['native']:.1e} ({key[1]}), "
              f"{errs['3xtf32']:.1e} (3xtf32)")
    if args.json:
        write_json(args.json, {"device": torch.cuda.get_device_name() if cuda else "cpu",
                               "rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    exit_process(main())
