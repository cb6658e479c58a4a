"""The building blocks of MPP's Axial ViT. The stem and decoder are convolutions on channels-first
frames ([N, C, H, W]); the space-time blocks work on tokens, channels last ([B, T, H, W, C]), so
that their 1×1 projections and MLP are plain matrix multiplies on the channel axis.

Parameter names follow the published MPP model (see ../shared/reference/mpp_avit_parameters.md), so
counts match exactly and the structure reads the same: hMLP stem and decoder, temporal attention
block, axial spatial attention block, T5-style relative position bias.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

PERIODIC_CODE = 2           # dsfm.data.well_format.BoundaryCondition.PERIODIC


_HW = (-3, -2)                # the spatial axes of tokens [..., H, W, C]
_HW_OF = {1: _HW, 2: (-4, -3)}   # ... and of [..., H, W, heads, C/heads], by channel axes
#: Sequences one fused attention call may take on CUDA: its kernels put the batch on a grid
#: axis of at most 65,535 blocks (pytorch/pytorch#146704; later PyTorch chunks the forward).
#: Larger batches are attended in chunks (`_attention`); rows and columns of a square grid,
#: one call's batch together, take a call each above it.
_MAX_ATTENTION_BATCH = 65535


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
    """scaled_dot_product_attention of [batch, heads, L, hd] sequences under one bias
    [1, heads, Lq, L] (Lq: the queries' length, L or fewer), in chunks of at most
    _MAX_ATTENTION_BATCH sequences (one call below it, the usual case)."""
    n = q.shape[0]
    if n <= _MAX_ATTENTION_BATCH:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return torch.cat([F.scaled_dot_product_attention(q[i:i + _MAX_ATTENTION_BATCH],
                                                     k[i:i + _MAX_ATTENTION_BATCH],
                                                     v[i:i + _MAX_ATTENTION_BATCH],
                                                     attn_mask=bias)
                      for i in range(0, n, _MAX_ATTENTION_BATCH)])


#: Longest sequence a packed attention call (`_packed_attention`) forms: the fused kernels'
#: tiles on CUDA (the memory-efficient kernel's, in fp32: 64 queries by 64 keys).
_PACKED_LENGTH = 64


def _pack_factor(length: int, n: int) -> int:
    """How many sequences of `length` one packed sequence holds: the most that fit in
    _PACKED_LENGTH with the packed length a multiple of 8 (the kernels' alignment), else the
    most that fit; never more than the `n` sequences there are."""
    most = max(1, min(_PACKED_LENGTH // length, n))
    aligned = [g for g in range(most, 1, -1) if g * length % 8 == 0]
    return aligned[0] if aligned else most


def _block_diagonal(bias: torch.Tensor, g: int) -> torch.Tensor:
    """[1, heads, Lq, Lk] → [1, heads, g·Lq, g·Lk]: `bias` on the g diagonal blocks, -inf off
    them (one `where` of broadcast views, differentiable: the gradient of `bias` is the sum of
    its blocks'). On CUDA with g·Lk not a multiple of 8, a view of rows padded to one (as
    RelativePositionBias.padded gives), which the memory-efficient kernel takes as it is."""
    heads, rows, length = bias.shape[1:]
    size = g * length
    eye = torch.eye(g, dtype=torch.bool, device=bias.device)[:, None, :, None]
    out = torch.where(eye, bias[0, :, None, :, None, :], float("-inf"))  # [heads,g,Lq,g,Lk]
    out = out.reshape(1, heads, g * rows, size)
    if bias.is_cuda and size % 8:
        out = F.pad(out, (0, -size % 8))[..., :size]
    return out


def _packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """`_attention` of short sequences, g of them packed into one of g·L ≤ _PACKED_LENGTH
    under a block-diagonal bias (`_pack_factor`, `_block_diagonal`): the same numbers (to
    rounding: off-block scores are -inf, their weights exactly 0) in g times fewer, fuller
    sequences. On CUDA the fused kernels tile 64 queries by 64 keys, so sequences of 8 or 16
    (axial, temporal) leave most of each tile idle. Costs a copy each of q, k, v and of
    their gradients, and of the output and its gradient unless the kernel lays its output
    out sequence-major ([batch, L, heads, hd], as CUDA's memory-efficient one does: the
    unpacking is then a view), and a g-times larger bias and bias gradient; the `n mod g`
    sequences left over take a plain call of their own. Fewer queries than keys (the last
    block's temporal attention: the last frame's) pack alike, g by the keys' length. Calls
    no module (ZeRO-3)."""
    n, heads, rows, hd = q.shape
    g = _pack_factor(k.shape[-2], n)
    if g == 1:
        return _attention(q, k, v, bias)
    m = n // g
    main = m * g

    def pack(t: torch.Tensor) -> torch.Tensor:       # [main, heads, L, hd] → [m, heads, gL, hd]
        t = t if main == n else t[:main]
        return t.unflatten(0, (m, g)).transpose(1, 2).reshape(m, heads, -1, hd)

    out = _attention(pack(q), pack(k), pack(v), _block_diagonal(bias, g))
    out = out.unflatten(2, (g, rows)).transpose(1, 2).reshape(main, heads, rows, hd)
    if main == n:
        return out
    return torch.cat([out, _attention(q[main:], k[main:], v[main:], bias)])


#: Longest sequence `_direct_attention` writes out (and `_written_out` sums on the CUDA
#: cores when compiled); longer ones take the fused kernels (matrix multiplies)
_DIRECT_LENGTH = 32


def _written_out(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 bias: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√hd + bias)·v of [..., L, hd] sequences, written out. Eager: two matrix
    multiplies and a softmax (TF32 where enabled, as any matmul). Under torch.compile, for
    sequences of up to _DIRECT_LENGTH: broadcast products summed over the head channels and
    over the keys, which the compiler fuses with the softmax, the bias and their gradients
    into a few kernels reading q, k and v once, in fp32 (no matmul for its attention pattern
    matcher to turn back into a fused-attention call, nor a batched matmul of 8×64 by 64×8
    matrices). `bias` broadcasts against the [..., Lq, Lk] scores (queries may be fewer than
    keys: the last block's temporal attention)."""
    scale = q.shape[-1] ** -0.5
    if torch.compiler.is_compiling() and max(q.shape[-2], k.shape[-2]) <= _DIRECT_LENGTH:
        scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1)                # [..., Lq, Lk]
        weights = torch.softmax(torch.add(bias, scores, alpha=scale), dim=-1)
        return (weights.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)            # [..., Lq, hd]
    weights = torch.softmax(torch.add(bias, q @ k.transpose(-2, -1), alpha=scale), dim=-1)
    return weights @ v


def _direct_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      bias: torch.Tensor) -> torch.Tensor:
    """`_attention` of short sequences without the fused kernels: `_written_out` for
    sequences of up to _DIRECT_LENGTH, `_attention` for longer ones. On CUDA the fused
    kernels (memory-efficient, with a learned bias) tile 64 queries by 64 keys and write
    the bias gradient per sequence; axial and temporal sequences of 8 and 16 fill an eighth
    to a quarter of each tile: on an H200 they took 34.6 ms of an AViT-B step, where their
    arithmetic (~29 GFLOP) and memory traffic (~11 GB) are a few ms. The same numbers to
    fp32 rounding. Calls no module (ZeRO-3)."""
    if max(q.shape[-2], k.shape[-2]) > _DIRECT_LENGTH:
        return _attention(q, k, v, bias)
    return _written_out(q, k, v, bias)


#: `attention` of the blocks (AViTConfig.attention): how a batch of sequences is attended
ATTENTION = {"fused": _attention, "packed": _packed_attention, "direct": _direct_attention}


class _TokenRMSNorm(torch.autograd.Function):
    """y = x · w / (std_HW(x) + eps) over tokens [..., H, W, C], with its gradient written out:
    autograd's own, through std, runs some twenty operators per call where this runs a dozen."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        std, mean = torch.std_mean(x, dim=_HW, keepdim=True)
        denom = std + eps
        scale = weight / denom
        ctx.save_for_backward(x, mean, std, denom, scale)
        return x * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, mean, std, denom, scale = ctx.saved_tensors
        n = x.shape[-3] * x.shape[-2]
        s = (gy * x).sum(dim=_HW, keepdim=True)             # ∂L/∂scale per sample, channel
        u = s / denom                                       # ∂L/∂w per sample; ∂L/∂std = −u·scale
        gx = gw = None
        if ctx.needs_input_grad[0]:
            # through std: ∂std/∂x = (x − mean) / ((n − 1) · std); a spatially constant channel
            # (std 0) gets none, as autograd's std gives (masked_fill: no scalar tensor made)
            coef = torch.div(u * scale, std).masked_fill_(std == 0, 0.0)
            gx = torch.addcmul(gy * scale, coef, x - mean,
                              value=-1.0 / (n - 1) if n > 1 else math.nan)  # 1 token: std NaN
        if ctx.needs_input_grad[1]:
            gw = u.reshape(-1, u.shape[-1]).sum(dim=0)
        return gx, gw, None


class _TokenInstanceNorm(torch.autograd.Function):
    """Instance norm over H and W of tokens [..., H, W, *C] with a per-channel affine map
    (weight and bias shaped C: one channel axis, or several, as attention leaves heads and
    head channels), forward in two passes over x (statistics, one multiply-add) and the
    gradient written out: with s1 = Σ_HW gy and s2 = Σ_HW gy·x̂ (n = H·W),
        ∂L/∂x = w·rstd · (gy − s1/n − x̂·s2/n),  ∂L/∂w = Σ_BT s2,  ∂L/∂b = Σ_BT s1,
    ten operators where the form through g = gy·w (means of g and g·x̂) runs twelve.

    `order`: the output's memory layout, as the permutation of x's axes from outermost to
    innermost (None: x's own); the gradient of x is laid out as x. Writing into the layout
    the next operator reads spares a copy (see TemporalAttention). Not under torch.compile,
    which refuses a strided `out=` (a graph break) and chooses layouts itself."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, order=None):
        hw = _HW_OF[weight.ndim]
        var, mean = torch.var_mean(x, dim=hw, keepdim=True, correction=0)
        rstd = torch.rsqrt(var + eps)
        scale = weight * rstd
        ctx.save_for_backward(x, mean, rstd, scale, weight)   # weight: its axes, no ctx dict
        out = None
        if order is not None and not torch.compiler.is_compiling():
            inverse = sorted(range(len(order)), key=order.__getitem__)
            out = torch.empty([x.shape[i] for i in order], dtype=x.dtype,
                              device=x.device).permute(inverse)
        return torch.addcmul(torch.addcmul(bias, mean, scale, value=-1.0), x, scale, out=out)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, mean, rstd, scale, weight = ctx.saved_tensors
        hw = _HW_OF[weight.ndim]
        n = x.shape[hw[0]] * x.shape[hw[1]]
        channels = x.shape[hw[1] + 1:]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        s1 = gy.sum(dim=hw, keepdim=True) if need_x or need_b else None
        if need_x or need_w:
            xhat = (x - mean) * rstd
            s2 = (gy * xhat).sum(dim=hw, keepdim=True)
            if need_x:
                out = None if torch.compiler.is_compiling() else torch.empty_like(x)
                gx = torch.addcmul(gy, xhat, s2, value=-1.0 / n, out=out)
                gx = gx.sub_(s1, alpha=1.0 / n).mul_(scale)
            if need_w:
                gw = s2.reshape(-1, *channels).sum(dim=0)
        if need_b:
            gb = s1.reshape(-1, *channels).sum(dim=0)
        return gx, gw, gb, None, None


class RMSInstanceNorm2d(nn.Module):
    """Divides each sample and channel by its spatial standard deviation (no centring), then
    scales per channel. The `bias` parameter exists in MPP's checkpoints but is not applied; it
    is kept so parameter names and counts match. Channels-first ([N, C, H, W], the stem and
    decoder) by default; `channels_last` for the blocks' tokens ([..., H, W, C]). Both run
    the token norm's written-out gradient (channels-first frames through a permuted view:
    the output keeps their layout): autograd's through torch.std takes some eighteen
    operators per backward."""

    def __init__(self, dim: int, eps: float = 1e-8, channels_last: bool = False):
        super().__init__()
        self.eps, self.channels_last = eps, channels_last
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, prescale: float = 1.0,
                channels_last: bool | None = None) -> torch.Tensor:
        """The norm of x · `prescale`, computed as that of x with eps / `prescale`: the same
        numbers when `prescale` is a power of two (scaling by one is exact, in x, std and
        eps alike), without the multiply and its backward. `channels_last`: x's layout for
        this call, if not the module's own (the stem's norms take tokens in dsfm's model and
        frames in MPP's formulation, perf/mpp_layout.py)."""
        eps = self.eps / prescale
        if self.channels_last if channels_last is None else channels_last:
            return _TokenRMSNorm.apply(x, self.weight, eps)
        return _TokenRMSNorm.apply(x.movedim(-3, -1), self.weight, eps).movedim(-1, -3)


class InstanceNorm(nn.Module):
    """nn.InstanceNorm2d(dim, affine=True) of tokens [..., H, W, C]: each sample and channel
    centred and scaled by its mean and (biased) variance over H and W, then the affine map per
    channel. The same parameters (`weight`, `bias`) and eps as torch's module, so MPP's
    checkpoints load."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, split: tuple[int, int] | None = None,
                order: tuple[int, ...] | None = None) -> torch.Tensor:
        """x: [..., H, W, C], or with `split` (heads, head channels) [..., H, W, heads, C/heads]
        (attention's output, the channels not one axis of a view). `order`: the memory layout
        of the output (see _TokenInstanceNorm)."""
        weight, bias = self.weight, self.bias
        if split is not None:
            weight, bias = weight.view(split), bias.view(split)
        return _TokenInstanceNorm.apply(x, weight, bias, self.eps, order)


@torch.library.custom_op("dsfm::mm_tn", mutates_args=())
def _mm_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·bᵀ for a [M, K] and b [N, K], each operand first made row-major (K contiguous; a
    copy where it is not): cuBLAS's TN layout. An operator of its own, opaque to
    torch.compile: inductor chooses the layout of a copy and of a matrix multiply's operands
    itself, and gave the copies written for this layout the strides of the views they were
    copied from (tests/models/test_avit.py reads its code)."""
    return F.linear(a.contiguous(), b.contiguous())


@_mm_tn.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest TF32 number (fp32 with its 13 lowest mantissa bits zero: 10
    explicit bits, as a tensor core reads an fp32 operand; ties away from zero). From the
    largest finite numbers up (magnitudes from TF32's largest plus half its spacing: infinities
    and NaNs too) the rounding's carry would leave fp32's finite numbers or its NaNs (made
    infinite; NaNs of high payload, a GPU's canonical 0x7FFFFFFF among them, wrapped into
    zeros): those are truncated instead (TF32's largest number, the infinity, a NaN; a NaN
    whose payload lies in the dropped bits alone becomes an infinity, and its tail a NaN)."""
    i = x.view(torch.int32)
    return (torch.where((i & 0x7FFFFFFF) < 0x7F7FF000, i + 0x1000, i)
            & -0x2000).view(torch.float32)


def tf32_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x as a TF32 head and a TF32 tail, x = hi + lo + r: hi is x rounded to TF32
    (|x − hi| ≤ 2⁻¹¹·|x|), lo the rest rounded to TF32, |r| ≤ 2⁻²²·|x|. Both are exact TF32
    numbers, which a tensor core multiplies exactly (11 significant bits each: products of
    22 bits, within fp32's 24). A NaN stays a NaN; an infinite x gives hi = x and lo = NaN
    (x − x), so a product with an infinite operand is NaN where strict fp32's may be infinite
    (its hi·lo cross terms: inf·0 would be NaN anyway): non-finite either way."""
    hi = _tf32(x)
    return hi, _tf32(x - hi)


@torch.library.custom_op("dsfm::mm_3xtf32", mutates_args=())
def _mm_3xtf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b for a = a_hi + a_lo [M, K] and b = b_hi + b_lo [K, N] (`tf32_split`), given side by
    side as a = [a_lo | a_hi] [M, 2K] and b = [b_hi ; b_lo] [2K, N]: three products on TF32
    tensor cores summed in fp32, the small ones first, in two calls: a·b = a_lo·b_hi +
    a_hi·b_lo (one product over 2K), then + a_hi·b_hi (views of the same operands; a_lo·b_lo,
    below 2⁻²² of the whole, is left out). The output is written once and read and written
    once more, where three calls would write it once and read and write it twice. The
    operands are exact TF32 numbers, so each product of two is exact (CUTLASS's "3xTF32").
    What is left is the summation: on the CPU, with no TF32, the same products in fp32, fp32's
    accuracy; on an H200's tensor cores, whose fp32 accumulation does not round as the CUDA
    cores' fused multiply-adds do, errors 5 to 25 times strict fp32's against float64 (about
    25 times below one TF32 product's; docs/performance.md, the third H200 run): between TF32
    and fp32, not fp32. An operator of its own so that
    TF32 is on for these products only, whatever the run's setting, and the compiler keeps
    them as they are."""
    k = a.shape[1] // 2
    cuda = a.is_cuda
    allowed = torch.backends.cuda.matmul.allow_tf32 if cuda else None
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        return torch.mm(a, b).addmm_(a[:, k:], b[:k])
    finally:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = allowed


@_mm_3xtf32.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


def mm_3xtf32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b [M, K]·[K, N] of fp32 matrices in three TF32 products (`_mm_3xtf32`; the splits
    written side by side, which the compiled blocks fuse into one kernel per operand)."""
    a_hi, a_lo = tf32_split(a)
    b_hi, b_lo = tf32_split(b)
    return _mm_3xtf32(torch.cat([a_lo, a_hi], 1), torch.cat([b_hi, b_lo], 0))


class _Linear(torch.autograd.Function):
    """y = x·Wᵀ + b (F.linear) whose matrix multiplies are formed as `mode` says:
    - "tn_dgrad", "tn": the backward's in the forward's operand layout, both operands
      contiguous along the summed axis (cuBLAS's "TN", the layout of y = x·Wᵀ with x [M, K]
      and W [N, K] both row-major). Autograd's own backward computes dx = dy·W (both operands
      row-major: "NN") and dW = dyᵀ·x (summed over the M tokens, neither operand contiguous
      along them: "NT"); in strict fp32 on an H200, cuBLAS ran those two layouts on SIMT
      kernels at about 34 TFLOP/s where the forward's ran at about 45
      (docs/performance.md). Here
          dx = dy·(Wᵀ)ᵀ          with Wᵀ copied contiguous ([K, N]: one copy of the weight),
          dW = (dyᵀ)·(xᵀ)ᵀ       with dyᵀ [N, M] and xᵀ [K, M] copied contiguous ("tn";
                                 "tn_dgrad": autograd's dyᵀ·x);
      the same products, summed in another order: the same numbers to rounding. The copies
      cost N·K floats written ("tn": M·(N + K) more), against the products' 2·M·N·K
      operations each.
    - "3xtf32": all three (the forward's, dy·W and dyᵀ·x) as three TF32 products each
      (`mm_3xtf32`), in fp32: on an H100 or H200 tensor cores do TF32 at 7.4 times the CUDA
      cores' fp32 rate, so three of them can beat one strict-fp32 product; fp32's accuracy
      on the CPU, on an H200 between TF32's and fp32's (`_mm_3xtf32`). The splits are
      recomputed in the backward; compiled, the partitioner keeps the input's two TF32
      parts instead of the input (twice its memory), as they feed an operator of their own
      in the backward.
    Saves what F.linear's autograd saves: the input for the weight's gradient, the weight
    for the input's (frozen blocks keep no input of theirs alive)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mode):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        ctx.mode, ctx.has_bias = mode, bias is not None
        if mode != "3xtf32":
            return F.linear(x, weight, bias)
        y = mm_3xtf32(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), weight.t())  # [M, N]
        if bias is not None:
            y = y + bias
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        # under autocast the forward's product ran in a lower precision, as its gradient
        # arrives: the saved operands are taken to it, as autograd's casts would be (3xtf32
        # runs outside autocast only: `linear`)
        x, weight = (t if t is None else t.to(gy.dtype) for t in ctx.saved_tensors)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        three = ctx.mode == "3xtf32"
        gx = gw = gb = None
        m = math.prod(gy.shape[:-1])
        g2 = gy.reshape(m, gy.shape[-1])                                    # [M, N]
        if need_x:
            gx = (mm_3xtf32(g2, weight) if three else _mm_tn(g2, weight.t())
                  ).view(*gy.shape[:-1], weight.shape[1])                   # [..., K]
        if need_w:
            x2 = x.reshape(m, x.shape[-1])                                  # [M, K]
            gw = (mm_3xtf32(g2.t(), x2) if three else _mm_tn(g2.t(), x2.t())
                  if ctx.mode == "tn" else g2.t().mm(x2))                   # [N, K]
        if need_b and ctx.has_bias:
            gb = g2.sum(dim=0)
        return gx, gw, gb, None


#: `fp32_matmuls` of the blocks' projections and MLP (AViTConfig.fp32_matmuls): how their
#: fp32 matrix multiplies are computed; "native": as PyTorch's settings say (strict fp32 on
#: the CUDA cores, or TF32 under train.tf32); "3xtf32": each as three TF32 products of the
#: operands split in two (_Linear), on tensor cores: nearer fp32 than TF32 (`_mm_3xtf32`)
FP32_MATMULS = ("native", "3xtf32")


#: `backward_matmuls` of the blocks' projections and MLP (AViTConfig.backward_matmuls): how
#: their backward forms its two matrix multiplies; "autograd": as F.linear's own backward
#: (dx: NN, dW: NT); "tn_dgrad": dx in the forward's layout (_Linear), dW as autograd's;
#: "tn": both in the forward's layout
BACKWARD_MATMULS = ("autograd", "tn_dgrad", "tn")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           backward: str = "autograd", fp32: str = "native") -> torch.Tensor:
    """F.linear, its backward's matrix multiplies formed as `backward` (BACKWARD_MATMULS),
    computed as `fp32` says (FP32_MATMULS) when its operands are fp32 (other dtypes, and
    autocast, take F.linear's own products)."""
    if (fp32 == "3xtf32" and x.dtype == weight.dtype == torch.float32
            and not (x.device.type != "meta" and torch.is_autocast_enabled(x.device.type))):
        return _Linear.apply(x, weight, bias, "3xtf32")
    if backward == "autograd":
        return F.linear(x, weight, bias)
    return _Linear.apply(x, weight, bias, backward)


def pointwise(x: torch.Tensor, conv: nn.Conv2d, backward: str = "autograd",
              fp32: str = "native") -> torch.Tensor:
    """A 1×1 convolution's map applied over the last axis of [..., C_in]: one matrix multiply
    on the tokens, no layout change (the parameters stay the convolution's, as MPP names
    them); `backward`, `fp32`: as `linear`'s."""
    return linear(x, conv.weight.flatten(1), conv.bias, backward, fp32)


class Linear(nn.Linear):
    """nn.Linear whose matrix multiplies are formed as `backward_matmuls` and `fp32_matmuls`
    say (`linear`)."""

    def __init__(self, *args, backward_matmuls: str = "autograd", fp32_matmuls: str = "native",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.backward_matmuls, self.fp32_matmuls = backward_matmuls, fp32_matmuls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.backward_matmuls, self.fp32_matmuls)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", backward_matmuls={self.backward_matmuls}, "
                f"fp32_matmuls={self.fp32_matmuls}")


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample with probability p.

    The keep probability is held as a tensor (a non-persistent buffer: checkpoints are
    unchanged; recomputed from `p` by nothing, so a model built on the meta device and then
    `to_empty()`'d must be built again), not read as a Python number in `forward`:
    `torch.compile` would specialize each block's graph on its own rate, and the blocks, whose
    rates rise from 0, could no longer share one graph (`AViT.compile_blocks`). Enabled (the
    default when p > 0), every sample draws its mask in training, also at rate 0 (all kept);
    disabled, it is the identity."""

    def __init__(self, p: float = 0.0, enabled: bool | None = None):
        super().__init__()
        self.p = float(p)
        self.enabled = self.p > 0 if enabled is None else enabled
        self.register_buffer("keep", torch.tensor(1.0 - self.p), persistent=False)

    def forward(self, x: torch.Tensor, every: int = 1) -> torch.Tensor:
        """`every` > 1: x's samples are the last of each `every` consecutive samples of the
        batch the module would otherwise see (the last block computes the last frame of each
        sequence only: AViT.skip_unused_frames); the mask is drawn for that whole batch and
        its last of every `every` entries kept, so that the run draws the same numbers,
        and drops the same samples, as one computing every frame."""
        if not (self.enabled and self.training):
            return x
        # scaled on its [N, 1, ...] entries: the backward is one multiply, not two
        mask = x.new_empty((x.shape[0] * every,) + (1,) * (x.ndim - 1)).bernoulli_(self.keep)
        if every > 1:
            mask = mask.unflatten(0, (-1, every))[:, -1]
        return x * mask.div_(self.keep)

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}" + ("" if self.enabled else ", disabled")


class RelativePositionBias(nn.Module):
    """T5's bucketed relative position bias: 32 buckets (16 per direction, exact up to 8, then
    logarithmic up to `max_distance`), one learned value per bucket and head. On a periodic axis
    the offset is taken the short way round the circle, so the first and last cells are
    neighbours. `max_distance` is 32, the value MPP's bucketing actually uses: its module is
    built with 128, but its `compute_bias` does not pass that on, so its pretrained weights
    learned offsets 10 to 31 in buckets of the 32 scale."""

    def __init__(self, n_heads: int, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)
        # every bucket, for `table` (not saved: checkpoints keep MPP's parameter names)
        self.register_buffer("every_bucket", torch.arange(num_buckets), persistent=False)
        self._buckets: dict[tuple[int, bool, str, bool], torch.Tensor] = {}
        #: pad each row of the bias to a multiple of 8 entries (see forward): None, on CUDA
        #: only (the CPU's attention has no such kernel, and the slice's backward would cost
        #: it an operator per call)
        self.align_rows: bool | None = None

    def buckets(self, length: int, periodic: bool, device: torch.device) -> torch.Tensor:
        device = torch.device(device)
        align = self.align_rows if self.align_rows is not None else device.type == "cuda"
        key = (length, periodic, str(device), align)
        if key not in self._buckets:
            pos = torch.arange(length, device=device)
            rel = pos[None, :] - pos[:, None]                    # key - query
            if periodic:
                half = length // 2
                rel = torch.remainder(rel + half, length) - half
            half_buckets = self.num_buckets // 2
            bucket = (rel > 0).long() * half_buckets
            n = rel.abs()
            exact = half_buckets // 2
            far = exact + (torch.log(n.float().clamp(min=1) / exact)
                           / math.log(self.max_distance / exact)
                           * (half_buckets - exact)).long()
            far = far.clamp(max=half_buckets - 1)
            idx = bucket + torch.where(n < exact, n, far)
            # each row padded to a multiple of 8 entries (bucket 0, sliced off in forward)
            self._buckets[key] = F.pad(idx, (0, -length % 8)) if align else idx
        return self._buckets[key]

    def forward(self, length: int, periodic: bool = False,
                table: torch.Tensor | None = None) -> torch.Tensor:
        """[heads, length, length] additive attention bias, its last axis contiguous: PyTorch's
        fused attention kernels on a GPU refuse a mask whose last axis has a stride other than 1
        (an embedding lookup permuted to heads-first has stride `heads` there), and fall back
        to the unfused math path. On CUDA its other strides are multiples of 8 (a view of rows
        padded to that), as the memory-efficient kernel wants: otherwise PyTorch pads a copy of
        the bias in every forward call when `length` is not a multiple of 8 (4 frames, or an
        axis of 4 patches)."""
        return self.bias(length, periodic, table)

    def bias(self, length: int, periodic: bool = False,
             table: torch.Tensor | None = None) -> torch.Tensor:
        """`forward`'s bias without calling this module: under ZeRO-3 every module call is
        traced, and the trace must be the same on every rank whatever its batch."""
        return self.unpad(self.padded(length, periodic, table), length)

    @staticmethod
    def unpad(bias: torch.Tensor, length: int) -> torch.Tensor:
        """The first `length` entries of each row; the tensor itself if that is all of them (a
        full slice would still cost a view and its backward)."""
        return bias if bias.shape[-1] == length else bias[..., :length]

    def table(self) -> torch.Tensor:
        """[buckets, heads]: the learned values, through one call of the embedding module. A
        module that takes several biases per forward (both axes, per-sample periodicity) reads
        them from this table, so that it calls the embedding once whatever its batch: under
        ZeRO-3 each call of a module gathers its weight, a collective, and ranks whose batches
        took different paths (a square grid or not, mixed periodicity or not) called it 1, 2
        or 4 times, a collective mismatch (gloo) or a hang (NCCL)."""
        return self.relative_attention_bias(self.every_bucket)

    def padded(self, length: int, periodic: bool = False,
               table: torch.Tensor | None = None) -> torch.Tensor:
        """[heads, length, P]: the bias with each row padded to P entries (P = length off
        CUDA, a multiple of 8 on it; the entries past `length` are not part of the bias),
        from `table` (see there) if given, else through the embedding module."""
        idx = self.buckets(length, periodic, self.every_bucket.device)
        values = self.relative_attention_bias(idx) if table is None else F.embedding(idx, table)
        return values.permute(2, 0, 1).contiguous()


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: int = 4, backward_matmuls: str = "autograd",
                 fp32_matmuls: str = "native"):
        super().__init__()
        self.fc1 = Linear(dim, ratio * dim, backward_matmuls=backward_matmuls,
                          fp32_matmuls=fp32_matmuls)
        self.fc2 = Linear(ratio * dim, dim, backward_matmuls=backward_matmuls,
                          fp32_matmuls=fp32_matmuls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _qkv(x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., 3·dim] → q, k, v of [..., heads, head_dim] (per head: q, k, v contiguous, as MPP
    splits its fused projection)."""
    return x.unflatten(-1, (heads, -1)).chunk(3, dim=-1)


class TemporalAttention(nn.Module):
    """Attention along time at every patch position: instance norm, fused QKV projection,
    QK-norm, T5 relative bias (non-periodic), instance norm, output projection (1×1-convolution
    parameters applied as matrix multiplies, `pointwise`), LayerScale, residual.
    drop_path: this block's stochastic-depth rate, or None for none at all; attention: how
    its sequences are attended, a key of ATTENTION; backward_matmuls: how the projections' backward
    forms its matrix multiplies, one of BACKWARD_MATMULS (`linear`); fp32_matmuls: how their
    fp32 products are computed, one of FP32_MATMULS."""

    def __init__(self, dim: int, heads: int, drop_path: float | None = None,
                 layer_scale: float = 1e-6, attention: str = "fused",
                 backward_matmuls: str = "autograd", fp32_matmuls: str = "native"):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.backward_matmuls, self.fp32_matmuls = backward_matmuls, fp32_matmuls
        self.norm1 = InstanceNorm(dim)
        self.norm2 = InstanceNorm(dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))
        self.input_head = nn.Conv2d(dim, 3 * dim, 1)
        self.output_head = nn.Conv2d(dim, dim, 1)
        self.qnorm = nn.LayerNorm(dim // heads)
        self.knorm = nn.LayerNorm(dim // heads)
        self.rel_pos_bias = RelativePositionBias(heads)
        self.drop_path = DropPath(drop_path or 0.0, enabled=drop_path is not None)

    def forward(self, x: torch.Tensor, last_frame: bool = False) -> torch.Tensor:
        """x: [B, T, H, W, C] (tokens) → the same, or with `last_frame` the last frame's
        [B, 1, H, W, C] only: its queries attend every frame's keys and values, the other
        frames' outputs are not computed (AViT.skip_unused_frames)."""
        b, t, h, w, c = x.shape
        # one sequence of T per (sample, position), with no copy on either side: norm1 writes
        # its output laid out [B, H, W, T, C], so the projection comes out [B, H, W, T, 3C]
        # and q, k, v of [BHW, heads, T, hd] are views of it (and their gradients' cat is
        # laid out as the projection's); norm2 reads attention's output through a view and
        # writes tokens [B, T, H, W, C]
        z = self.norm1(x, order=(0, 2, 3, 1, 4)).permute(0, 2, 3, 1, 4)   # [B, H, W, T, C]
        z = pointwise(z, self.input_head, self.backward_matmuls,
                      self.fp32_matmuls)                                    # [B, H, W, T, 3C]
        z = z.unflatten(-1, (self.heads, -1))                               # [B,H,W,T,heads,3hd]
        q, k, v = (u.transpose(3, 4) for u in z.chunk(3, dim=-1))        # [B,H,W,heads,T,hd]
        bias = self.rel_pos_bias(t)[None]                                  # [1, heads, T, T]
        if last_frame:                  # its queries (and bias rows) and its residual only
            q, bias, x = q[..., -1:, :], bias[..., -1:, :], x[:, -1:]
        # QK-norm writes q and k as [BHW, heads, T, hd] (contiguous; v is a strided view)
        z = ATTENTION[self.attention](self.qnorm(q).flatten(0, 2), self.knorm(k).flatten(0, 2),
                                      v.flatten(0, 2), bias)
        z = z.unflatten(0, (b, h, w)).permute(0, 4, 1, 2, 3, 5)           # [B,T,H,W,heads,hd]
        z = self.norm2(z, split=z.shape[-2:], order=(0, 1, 2, 3, 4, 5)).flatten(-2)
        z = pointwise(z, self.output_head, self.backward_matmuls, self.fp32_matmuls)
        return x + self.drop_path(z * self.gamma)


class AxialSpatialAttention(nn.Module):
    """Attention along W and along H with one fused QKV projection and one relative-position
    table shared by both axes (periodic-aware per sample from the boundary codes); the two
    results are averaged. Then a 4× MLP, both branches with LayerScale and drop path.
    attention: as TemporalAttention's (the per-sample 5-D path writes its own out);
    backward_matmuls, fp32_matmuls: as TemporalAttention's, for the projections and the MLP."""

    def __init__(self, dim: int, heads: int, drop_path: float | None = None,
                 layer_scale: float = 1e-6, attention: str = "fused",
                 backward_matmuls: str = "autograd", fp32_matmuls: str = "native"):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.backward_matmuls, self.fp32_matmuls = backward_matmuls, fp32_matmuls
        self.norm1 = RMSInstanceNorm2d(dim, channels_last=True)
        self.norm2 = RMSInstanceNorm2d(dim, channels_last=True)
        self.gamma_att = nn.Parameter(layer_scale * torch.ones(dim))
        self.gamma_mlp = nn.Parameter(layer_scale * torch.ones(dim))
        self.input_head = nn.Conv2d(dim, 3 * dim, 1)
        self.output_head = nn.Conv2d(dim, dim, 1)
        self.qnorm = nn.LayerNorm(dim // heads)
        self.knorm = nn.LayerNorm(dim // heads)
        self.rel_pos_bias = RelativePositionBias(heads)
        self.mlp = MLP(dim, backward_matmuls=backward_matmuls, fp32_matmuls=fp32_matmuls)
        self.mlp_norm = RMSInstanceNorm2d(dim, channels_last=True)
        self.drop_path = DropPath(drop_path or 0.0, enabled=drop_path is not None)

    def _along(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               periodic: bool | torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Attention along the second-to-last axis of [N, M, heads, L, hd] inputs. A bool (the
        whole batch agrees) keeps it 4-D with one [1, heads, L, L] bias, which the fused
        (memory-efficient) kernels take; an [N] bool tensor picks the bias per sample on the
        device (no host synchronization) and broadcasts it over 5-D inputs."""
        n, m, heads, length, hd = q.shape
        if isinstance(periodic, bool):
            out = ATTENTION[self.attention](
                *(t.reshape(n * m, heads, length, hd) for t in (q, k, v)),
                self.rel_pos_bias.bias(length, periodic, table)[None])
            return out.reshape(n, m, heads, length, hd)
        # no fused kernel takes 5-D inputs: the padded rows buy nothing here, slice them once
        rpb = self.rel_pos_bias
        bias = rpb.unpad(torch.where(periodic[:, None, None, None, None],
                                     rpb.padded(length, True, table),
                                     rpb.padded(length, False, table)), length)
        # attention written out, as SDPA's math path (the only one for 5-D inputs) computes
        # it: torch.compile's inference lowering of 5-D SDPA with a broadcast mask fails
        # ("Attempting to broadcast a dimension", torch 2.13), so a compiled model could not
        # evaluate a batch whose samples disagree on periodicity
        return _written_out(q, k, v, bias)

    def _both_axes(self, qkv: torch.Tensor, periodic: bool, table: torch.Tensor) -> torch.Tensor:
        """Attention along W and along H of a square grid whose axes share their bias (the
        same length and periodicity): the N·L rows and the N·L columns as one batch of
        sequences, one attention call and one bias instead of two of each; the columns' copy
        is the rows' (one cat where the H axis alone took three copies, of q, k and v),
        QK-norm applied to both. qkv [N, L, L, 3C] → the sum of the two axes' outputs
        [N, L, L, heads, hd]."""
        n, length = qkv.shape[:2]
        # QK-norm once, before the copy: the norms then save qkv itself (3C a token), not a
        # second copy of it (the cat's 6C, which attention keeps as its q, k and v)
        q, k, v = _qkv(qkv, self.heads)                                     # [N, L, L, heads, hd]
        both = torch.cat([self.qnorm(q), self.knorm(k), v], dim=-1)        # [N,L,L,heads,3hd]
        seqs = torch.cat([both, both.transpose(1, 2)]).flatten(0, 1)       # [2NL,L,heads,3hd]
        q, k, v = seqs.chunk(3, dim=-1)                                     # [2NL, L, heads, hd]
        out = ATTENTION[self.attention](*(t.transpose(1, 2) for t in (q, k, v)),
                                        self.rel_pos_bias.bias(length, periodic, table)[None])
        # (out: [2NL, heads, L, hd])
        # rows[n, i, :, j] and cols[n, j, :, i] are both token (i, j): [N, L, heads, L, hd]
        rows, cols = out.unflatten(0, (2, n, length)).unbind(0)
        return rows.transpose(2, 3) + cols.permute(0, 3, 1, 2, 4)

    def forward(self, x: torch.Tensor, periodic: tuple[bool, bool] | torch.Tensor,
                frames: int = 1) -> torch.Tensor:
        """x: [N, H, W, C] (tokens); periodic: (H axis, W axis) for the whole batch, or [N, 2]
        bool per sample; `frames` > 1: x holds the last of each `frames` consecutive frames
        (the last block's), for drop path to draw as over all of them (DropPath)."""
        n, h, w, c = x.shape
        qkv = pointwise(self.norm1(x), self.input_head, self.backward_matmuls,
                        self.fp32_matmuls)                                  # [N, H, W, 3C]
        # the same module calls whatever the path (a square grid or not, per-sample periodicity
        # or not): ZeRO-3 gathers a module's weights at each call, and checks that every rank
        # called the same modules; the relative-position bias is read from one table
        table = self.rel_pos_bias.table()
        if (isinstance(periodic, tuple) and h == w and periodic[0] == periodic[1]
                and 2 * n * h <= _MAX_ATTENTION_BATCH):
            z = self._both_axes(qkv, periodic[0], table)
        else:
            q, k, v = _qkv(qkv, self.heads)                                 # [N,H,W,heads,hd]
            q, k = self.qnorm(q), self.knorm(k)
            # along W: for every (sample, row) a sequence of W tokens: [N, H, heads, W, hd]
            zw = self._along(*(t.transpose(2, 3) for t in (q, k, v)), periodic[1]
                             if isinstance(periodic, tuple) else periodic[:, 1], table)
            # along H: for every (sample, column) a sequence of H tokens: [N, W, heads, H, hd]
            zh = self._along(*(t.permute(0, 2, 3, 1, 4) for t in (q, k, v)), periodic[0]
                             if isinstance(periodic, tuple) else periodic[:, 0], table)
            z = zw.transpose(2, 3) + zh.permute(0, 3, 1, 2, 4)      # [N,H,W,heads,hd]
        # the norm of the two axes' average, (zw + zh) / 2, taken as that of the sum
        z = pointwise(self.norm2(z.reshape(n, h, w, c), prescale=0.5), self.output_head,
                      self.backward_matmuls, self.fp32_matmuls)
        x = x + self.drop_path(z * self.gamma_att, frames)
        return x + self.drop_path(self.mlp_norm(self.mlp(x)) * self.gamma_mlp, frames)


class SpaceTimeBlock(nn.Module):
    """Temporal then axial spatial attention, on tokens [B, T, H, W, C]: every projection is a
    matrix multiply on the channel axis, with no layout change around it."""

    def __init__(self, dim: int, heads: int, drop_path: float | None = None,
                 attention: str = "fused", backward_matmuls: str = "autograd",
                 fp32_matmuls: str = "native"):
        super().__init__()
        self.temporal = TemporalAttention(dim, heads, drop_path, attention=attention,
                                          backward_matmuls=backward_matmuls,
                                          fp32_matmuls=fp32_matmuls)
        self.spatial = AxialSpatialAttention(dim, heads, drop_path, attention=attention,
                                             backward_matmuls=backward_matmuls,
                                             fp32_matmuls=fp32_matmuls)

    def cache_buckets(self, t: int, h: int, w: int,
                      periodic: tuple[bool, bool] | torch.Tensor) -> None:
        """Fill the relative-position bucket caches this input needs, from eager code before a
        compiled block runs: dynamo guards on the caches' keys, so a key first added inside
        the compiled call would force a second compile on the next one."""
        self.temporal.rel_pos_bias.buckets(
            t, False, self.temporal.rel_pos_bias.relative_attention_bias.weight.device)
        rpb = self.spatial.rel_pos_bias
        device = rpb.relative_attention_bias.weight.device
        flags = [periodic] if isinstance(periodic, tuple) else [(True, True), (False, False)]
        for p_h, p_w in flags:
            rpb.buckets(h, p_h, device)
            rpb.buckets(w, p_w, device)

    def forward(self, x: torch.Tensor, periodic: tuple[bool, bool] | torch.Tensor,
                last_frame: bool = False) -> torch.Tensor:
        """x [B, T, H, W, C] → the same, or with `last_frame` the last frame's [B, 1, H, W, C]
        only (the same numbers as its frame of the whole output, in a fraction of the work:
        only the temporal attention's keys and values need the other frames)."""
        b, t, h, w, c = x.shape
        x = self.temporal(x, last_frame)
        n = x.shape[1]                                              # T, or 1 (last_frame)
        if not isinstance(periodic, tuple) and n > 1:
            periodic = periodic.repeat_interleave(n, dim=0)
        return self.spatial(x.reshape(b * n, h, w, c), periodic,
                            t if last_frame else 1).reshape(b, n, h, w, c)


def _patches(x: torch.Tensor, k: int, channels_last: bool) -> torch.Tensor:
    """The k×k patches of frames that do not overlap, each patch's pixels on the last axis in
    (row, column, channel) order: [N, H, W, C] (channels_last) or [N, C, H, W] →
    [N, H/k, W/k, k·k·C] (one copy)."""
    if channels_last:
        n, h, w, c = x.shape
        x = x.reshape(n, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5)
    else:
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // k, k, w // k, k).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, h // k, w // k, k * k * c)


def _check_patches(conv: nn.modules.conv._ConvNd) -> None:
    """Refuse a (transposed) convolution whose patches overlap or are not square, or that has
    padding, output padding, dilation or groups: what the matrix-multiply form (`tokens`) of
    PatchConv and PatchConvTranspose does not compute."""
    k = conv.kernel_size
    if (k[0] != k[1] or conv.stride != k or conv.padding != (0, 0)
            or tuple(conv.output_padding) != (0, 0) or conv.dilation != (1, 1)
            or conv.groups != 1):
        raise ValueError(f"{type(conv).__name__} takes square patches that do not overlap: "
                         f"kernel {k}, stride {conv.stride}, padding {conv.padding}, output "
                         f"padding {conv.output_padding}, dilation {conv.dilation}, groups "
                         f"{conv.groups}")


class PatchConv(nn.Conv2d):
    """nn.Conv2d whose kernel is its stride (patches that do not overlap), as the hMLP stem's.
    On channels-first frames it is the convolution. With `tokens` it writes channels-last
    frames [N, H/k, W/k, C_out] and computes the same map as one matrix multiply of each
    patch's pixels (`_patches`) with the kernel laid out to match: cuBLAS's GEMM, where the
    convolution took cuDNN's kernels (on an H200 in fp32 their weight gradients ran
    `wgrad_alg0_engine`: 10.1 ms of AViT-B's step for three calls). Its input is then
    channels-last [N, H, W, C_in], or with `folded` the embedding's input, channels-first: a
    per-pixel affine map (w [C_in, C], b [C_in]: the field embedding) applied before this
    one, folded into the kernel (kernel·w, kernel·b): the same function, in a fraction of
    the arithmetic when C is small (the stem's first convolution: C_in = dim/4 channels at
    every pixel, 192 for B, against 4 fields). Square kernel = stride, no padding, dilation
    or groups: anything else is refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_patches(self)

    def forward(self, x: torch.Tensor, tokens: bool = False,
                folded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if not tokens:
            if folded is not None:
                raise ValueError("PatchConv folds an affine map only with tokens=True")
            return super().forward(x)
        k = self.kernel_size[0]
        kernel = self.weight.permute(0, 2, 3, 1)                  # [C_out, k, k, C_in]
        bias = self.bias
        if folded is not None:
            w, b = folded
            kernel, inner = kernel @ w, (kernel * b).sum((1, 2, 3))   # [C_out, k, k, C]
            bias = inner if bias is None else bias + inner
        return F.linear(_patches(x, k, channels_last=folded is None),
                        kernel.reshape(kernel.shape[0], -1), bias)


class HMLPStem(nn.Module):
    """Patch 16 as three bias-free strided convolutions (4, 2, 2) with RMS instance norm and
    GELU between them: a hierarchical MLP on each 16×16 patch. Called, channels-first frames
    in and out (MPP's formulation); `tokens`, dsfm's: the patches as matrix multiplies,
    channels-last, the field embedding folded into the first."""

    def __init__(self, dim: int):
        super().__init__()
        q = dim // 4
        self.in_proj = nn.Sequential(
            PatchConv(q, q, 4, stride=4, bias=False), RMSInstanceNorm2d(q), nn.GELU(),
            PatchConv(q, q, 2, stride=2, bias=False), RMSInstanceNorm2d(q), nn.GELU(),
            PatchConv(q, dim, 2, stride=2, bias=False), RMSInstanceNorm2d(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.in_proj(x)

    def tokens(self, x: torch.Tensor, embedding: tuple[torch.Tensor, torch.Tensor]
               ) -> torch.Tensor:
        """Fields x [N, C, H, W] (channels-first, as the loader gives them) and the field
        embedding's map (`FieldEmbedding` called without x) → tokens [N, H/16, W/16, dim]:
        the embedding and the stem's function, the embedding folded into the first patch
        convolution (for B: 3.2 GFLOP forward where the embedded frames took 155, and no
        [N, dim/4, H, W] activation, 1.6 GB at the benchmark's shapes). Calls each module,
        as ZeRO-3 gathers a module's weights at its call."""
        conv1, norm1, gelu1, conv2, norm2, gelu2, conv3, norm3 = self.in_proj
        z = norm1(conv1(x, tokens=True, folded=embedding), channels_last=True)
        z = norm2(conv2(gelu1(z), tokens=True), channels_last=True)
        return norm3(conv3(gelu2(z), tokens=True), channels_last=True)


def _unpatched(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               channels_last: bool) -> torch.Tensor:
    """A transposed convolution whose kernel is its stride, on channels-last frames
    x [N, H, W, C_in] with weight [C_in, C_out, k, k]: every pixel's k×k output patch is one
    matrix multiply (each pixel's patch its own: they do not overlap), then the patches laid
    side by side (one copy): [N, H·k, W·k, C_out] (channels_last) or [N, C_out, H·k, W·k]."""
    c_in, c_out, k = weight.shape[0], weight.shape[1], weight.shape[-1]
    n, h, w = x.shape[:3]
    patches = F.linear(x, weight.permute(2, 3, 1, 0).reshape(k * k * c_out, c_in),
                       None if bias is None else bias.repeat(k * k))  # [N, H, W, (a, b, o)]
    patches = patches.reshape(n, h, w, k, k, c_out)
    if channels_last:
        return patches.permute(0, 1, 3, 2, 4, 5).reshape(n, h * k, w * k, c_out)
    return patches.permute(0, 5, 1, 3, 2, 4).reshape(n, c_out, h * k, w * k)


class PatchConvTranspose(nn.ConvTranspose2d):
    """nn.ConvTranspose2d whose kernel is its stride (output patches that do not overlap), as
    the hMLP decoder's. Called on channels-first frames it is the transposed convolution;
    with `tokens`, channels-last frames in and out and each pixel's output patch one matrix
    multiply (`_unpatched`): cuBLAS's GEMM instead of cuDNN's kernels. Square kernel =
    stride, no padding, output padding, dilation or groups: anything else is refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _check_patches(self)

    def forward(self, x: torch.Tensor, tokens: bool = False) -> torch.Tensor:
        if not tokens:
            return super().forward(x)
        return _unpatched(x, self.weight, self.bias, channels_last=True)


class HMLPDecoder(nn.Module):
    """The stem mirrored with transposed convolutions; the last 4×4 layer's kernel and bias have
    one slice per vocabulary field and only the present fields' slices are used. Channels-first
    frames in (MPP's formulation), or with `tokens` dsfm's: tokens [N, h, w, dim] in, every
    layer a matrix multiply per pixel on channels-last frames; out [N, C, H, W] either way."""

    def __init__(self, dim: int, n_fields: int):
        super().__init__()
        q = dim // 4
        self.out_proj = nn.Sequential(
            PatchConvTranspose(dim, q, 2, stride=2, bias=False), RMSInstanceNorm2d(q),
            nn.GELU(),
            PatchConvTranspose(q, q, 2, stride=2, bias=False), RMSInstanceNorm2d(q), nn.GELU())
        head = nn.ConvTranspose2d(q, n_fields, 4, stride=4)
        self.out_kernel = nn.Parameter(head.weight.detach().clone())
        self.out_bias = nn.Parameter(head.bias.detach().clone())

    def forward(self, x: torch.Tensor, field_ids: torch.Tensor,
                tokens: bool = False) -> torch.Tensor:
        kernel, bias = self.out_kernel[:, field_ids], self.out_bias[field_ids]
        if not tokens:
            return F.conv_transpose2d(self.out_proj(x), kernel, bias, stride=4)
        up1, norm1, gelu1, up2, norm2, gelu2 = self.out_proj
        z = gelu1(norm1(up1(x, tokens=True), channels_last=True))
        z = gelu2(norm2(up2(z, tokens=True), channels_last=True))
        return _unpatched(z, kernel, bias, channels_last=False)


class FieldEmbedding(nn.Module):
    """MPP's shared field embedding ("space bag"): a linear map from the vocabulary's fields to
    dim/4 channels of which only the present fields' columns are used, rescaled by
    sqrt(n_vocabulary / n_present) so the embedding's scale does not depend on how many fields a
    dataset has. As in MPP, the bias is rescaled with them (the whole linear map is)."""

    def __init__(self, n_fields: int, out_dim: int):
        super().__init__()
        lin = nn.Linear(n_fields, out_dim)
        self.weight = nn.Parameter(lin.weight.detach().clone())
        self.bias = nn.Parameter(lin.bias.detach().clone())

    def forward(self, x: torch.Tensor | None, field_ids: torch.Tensor
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x: [N, C, H, W] with C = len(field_ids) → [N, out_dim, H, W]. x None: the map
        itself, (weight [out_dim, C], bias [out_dim]) of the present fields, scaled, for a
        consumer that folds it into its own (HMLPStem.tokens); through this call, as ZeRO-3
        gathers the weights at it."""
        scale = math.sqrt(self.weight.shape[1] / field_ids.numel())
        w = self.weight[:, field_ids] * scale
        if x is None:
            return w, self.bias * scale
        return F.conv2d(x, w[:, :, None, None], self.bias * scale)
