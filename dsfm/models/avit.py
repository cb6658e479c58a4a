"""MPP's Axial ViT (Multiple Physics Pretraining): one surrogate for many PDE systems.

A micro-batch holds windows of one dataset: x [B, T, C, H, W] (C of the vocabulary's fields,
named by `field_ids`), boundary codes [B, 2, 2]. The model
  1. normalizes each sample and channel over time and space (RevIN), undone on the output;
  2. embeds the present fields through the shared field embedding (`space_bag`);
  3. patchifies every frame with the hMLP stem (patch 16);
  4. runs blocks of temporal attention then axial spatial attention, drop path rising linearly
     to `drop_path` over the blocks (the last block on the last frame only:
     `skip_unused_frames`);
  5. decodes the last frame only with the hMLP decoder, whose output channels are the present
     fields' slices,
and returns the next state [B, C, H, W].

`avit(size, n_fields)` builds the published sizes; with 12 field columns Ti/S/B/L have exactly
7,285,884 / 28,979,436 / 115,608,012 / 407,055,628 parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsfm.errors import ConfigError
from dsfm.models.layers import (
    ATTENTION,
    BACKWARD_MATMULS,
    FP32_MATMULS,
    PERIODIC_CODE,
    FieldEmbedding,
    HMLPDecoder,
    HMLPStem,
    SpaceTimeBlock,
)

PATCH = 16
#: what a checkpoint's weights compute with, for warning when it differs: 1 before the T5
#: buckets saturated at 32 and the field embedding's bias was rescaled (MPP's numerics), 2 since
NUMERICS = 2


def numerics_note(saved: int | None, where: str) -> str | None:
    """A warning when weights were trained under other numerics (`saved`: the checkpoint's
    model_numerics, None for one written before it was recorded)."""
    saved = saved or 1
    if saved == NUMERICS:
        return None
    return (f"warning: {where} was trained with AViT numerics {saved} (T5 buckets saturating at "
            f"128, field-embedding bias not rescaled); this model computes numerics {NUMERICS} "
            "(MPP's: 32, rescaled), so its temporal bias for offsets of 10 or more and its "
            "embedding bias act differently: expect a transient in the loss")
SIZES: dict[str, tuple[int, int, int]] = {        # dim, heads, blocks
    "Ti": (192, 3, 12),
    "S": (384, 6, 12),
    "B": (768, 12, 12),
    "L": (1024, 16, 24),
}


@dataclass(frozen=True)
class AViTConfig:
    n_fields: int
    dim: int = 192
    heads: int = 3
    blocks: int = 12
    drop_path: float = 0.2
    revin_eps: float = 1e-7
    #: how the blocks attend their sequences: "fused" (one kernel call per batch of sequences),
    #: "packed" (short sequences packed into sequences of up to 64 under a block-diagonal
    #: bias, fuller tiles for the CUDA kernels: layers._packed_attention) or "direct" (short
    #: sequences written out, for the compiler to fuse: layers._direct_attention); the same
    #: numbers to fp32 rounding
    attention: str = "fused"
    #: how the backward of the blocks' projections and MLP forms its matrix multiplies:
    #: "autograd" (F.linear's own), "tn_dgrad" or "tn" (the input's gradient, or both
    #: gradients, in the forward's operand layout: layers._Linear); the same numbers to
    #: fp32 rounding
    backward_matmuls: str = "autograd"
    #: how the fp32 matrix multiplies of the blocks' projections and MLP are computed:
    #: "native" (as PyTorch's settings say: strict fp32, or TF32 under train.tf32) or
    #: "3xtf32" (each as three TF32 tensor-core products of operands split in two,
    #: layers._Linear: on an H200 5-25 times strict fp32's error, 25 times below TF32's,
    #: layers._mm_3xtf32); with "3xtf32" the
    #: backward's layout is its own, so backward_matmuls stays "autograd"
    fp32_matmuls: str = "native"

    def __post_init__(self):
        if self.n_fields < 1:
            raise ConfigError(f"model.n_fields must be >= 1, got {self.n_fields}")
        if self.dim % 4 or self.dim % self.heads:
            raise ConfigError(f"model dim {self.dim} must be divisible by 4 and by heads "
                              f"{self.heads}")
        if self.blocks < 1 or not 0.0 <= self.drop_path < 1.0:
            raise ConfigError(f"need blocks >= 1 and 0 <= drop_path < 1 (got {self.blocks}, "
                              f"{self.drop_path})")
        if self.attention not in ATTENTION:
            raise ConfigError(f"model.attention {self.attention!r} is not one of "
                              f"{', '.join(ATTENTION)}")
        if self.backward_matmuls not in BACKWARD_MATMULS:
            raise ConfigError(f"model.backward_matmuls {self.backward_matmuls!r} is not one of "
                              f"{', '.join(BACKWARD_MATMULS)}")
        if self.fp32_matmuls not in FP32_MATMULS:
            raise ConfigError(f"model.fp32_matmuls {self.fp32_matmuls!r} is not one of "
                              f"{', '.join(FP32_MATMULS)}")
        if self.fp32_matmuls != "native" and self.backward_matmuls != "autograd":
            raise ConfigError(f"model.backward_matmuls={self.backward_matmuls} arranges strict-"
                              f"fp32 products; model.fp32_matmuls={self.fp32_matmuls} computes "
                              "them its own way: set one of the two")


def grid_problem(spatial_shape: tuple[int, ...]) -> str | None:
    """Why AViT cannot take fields on this grid (None if it can): MPP's model is 2D, and its
    patch-16 stem needs H and W multiples of 16, with two patches at least."""
    shape = "×".join(map(str, spatial_shape))
    if len(spatial_shape) != 2:
        return f"is {len(spatial_shape)}D ({shape}); MPP's AViT takes 2D fields only"
    h, w = spatial_shape
    if h % PATCH or w % PATCH or h * w < 2 * PATCH * PATCH:
        return (f"has a {shape} grid; AViT needs H and W multiples of {PATCH} with at least "
                "two patches")
    return None


class AViT(nn.Module):
    #: the last block computes the frame the decoder reads only (SpaceTimeBlock's
    #: `last_frame`): the other frames' outputs of the last block are thrown away, and only
    #: its temporal attention's keys and values need them. The same prediction and gradients
    #: (to fp32 rounding; drop path draws as over every frame), in about three quarters less
    #: of the last block's work. False computes every frame, as MPP's code does.
    skip_unused_frames: bool = True
    #: activation checkpointing of the space-time blocks for large micro-batches: a training
    #: forward (gradients on) whose micro-batch has more tokens than this (B·T·H/16·W/16) keeps
    #: only each block's input and computes the block again in the backward
    #: (torch.utils.checkpoint, the same random draws), so that a 512² micro-batch, sixteen
    #: times a 128² one's tokens, fits where every block's activations would not; None: never.
    #: The same values bit for bit on the CPU (tests/models/test_avit.py), one more forward of
    #: the blocks for those micro-batches.
    checkpoint_above_tokens: int | None = None
    #: where ranks must recompute alike and their micro-batches may differ in size: a function
    #: of this rank's micro-batch's tokens giving the count `checkpoint_above_tokens` is
    #: compared with, the largest over the ranks (a collective, called in every training
    #: forward with a threshold). Under ZeRO-3 a recomputed block gathers its parameters again,
    #: a collective the ranks that keep their activations never join: with
    #: data.same_dataset_across_ranks=false one rank recomputed and another did not, and the run
    #: hung (dsfm/train.py sets it there). None: this rank's count decides.
    tokens_across_ranks: Callable[[int], int] | None = None
    #: whether the compiled blocks replay CUDA graphs (`compile_blocks` with a mode that
    #: does): each forward of the model then tells PyTorch a new step of those graphs begins
    #: (torch.compiler.cudagraph_mark_step_begin), so that a replay may reuse the memory of
    #: the previous micro-batch's, whose backward is done, or of an evaluation batch, which has
    #: none; the blocks' outputs never leave the model (the decoder reads them)
    graph_steps: bool = False

    def __init__(self, config: AViTConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.space_bag = FieldEmbedding(config.n_fields, dim // 4)
        self.embed = HMLPStem(dim)
        n = config.blocks
        # rising linearly from 0; a model without stochastic depth gets none at all (None)
        rates = [config.drop_path * i / max(n - 1, 1) if config.drop_path else None
                 for i in range(n)]
        self.blocks = nn.ModuleList(SpaceTimeBlock(dim, config.heads, r, config.attention,
                                                   config.backward_matmuls, config.fp32_matmuls)
                                    for r in rates)
        self.debed = HMLPDecoder(dim, config.n_fields)

    def zero3_blocks(self) -> list[nn.Module]:
        """The units ZeRO-3 gathers whole (dsfm.runtime.zero_blocks): the space-time blocks."""
        return list(self.blocks)

    @property
    def n_fields(self) -> int:
        weight = self.space_bag.weight
        # ZeRO-3 leaves each parameter a (0,) placeholder and keeps its shape in ds_shape
        return tuple(getattr(weight, "ds_shape", weight.shape))[1]

    def _before_the_engine(self, helper: str) -> None:
        """The fine-tuning helpers change which parameters exist or train: an engine already
        built over the model has partitioned them (ZeRO-3: each a (0,) placeholder, so new
        columns would be empty) and handed its optimizer the trainable ones."""
        if any(hasattr(p, "ds_id") for p in self.parameters()):
            raise ConfigError(f"AViT.{helper}: the model's parameters are partitioned by a "
                              "ZeRO-3 engine; call it before deepspeed.initialize (the "
                              "optimizer takes the trainable parameters when it is built)")

    def forward(self, x: torch.Tensor, field_ids: torch.Tensor,
                bcs: torch.Tensor | None = None) -> torch.Tensor:
        problem = grid_problem(tuple(x.shape[3:])) if x.dim() >= 5 else "has too few axes"
        if problem:
            raise ConfigError(f"AViT takes x [B, T, C, H, W]; x {tuple(x.shape)} {problem}")
        b, t, c, h, w = x.shape
        if field_ids.numel() != c:
            raise ConfigError(f"{c} channels but {field_ids.numel()} field ids")
        recompute = self.checkpoint_above_tokens is not None and torch.is_grad_enabled()
        if recompute:       # decided before any module call: ZeRO-3 gathers in module calls
            tokens = b * t * (h // PATCH) * (w // PATCH)
            if self.tokens_across_ranks is not None:
                tokens = self.tokens_across_ranks(tokens)
            recompute = tokens > self.checkpoint_above_tokens
        if self.graph_steps:
            if recompute:
                raise ConfigError("the blocks replay CUDA graphs (compile_blocks' mode) and "
                                  "would be recomputed in the backward "
                                  "(checkpoint_above_tokens): one or the other")
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            std, mean = torch.std_mean(x, dim=(1, 3, 4), keepdim=True)
            std = std + self.config.revin_eps
        z = (x - mean) / std
        # the field embedding folded into the stem, which writes tokens [BT, h, w, dim]
        z = self.embed.tokens(z.reshape(b * t, c, h, w), self.space_bag(None, field_ids))
        z = z.reshape(b, t, *z.shape[1:])                          # tokens [B, T, h, w, dim]
        periodic = self.periodicity(bcs, x.device)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            block.cache_buckets(t, *z.shape[2:4], periodic)   # eager, before a compiled block
            last_frame = self.skip_unused_frames and i == last
            if recompute:
                z = checkpoint(block, z, periodic, last_frame=last_frame, use_reentrant=False)
            else:
                z = block(z, periodic, last_frame=last_frame)
        out = self.debed(z[:, -1], field_ids, tokens=True)
        return out * std[:, 0] + mean[:, 0]

    @staticmethod
    def periodicity(bcs: torch.Tensor | None, device: torch.device
                    ) -> tuple[bool, bool] | torch.Tensor:
        """Which spatial axes are periodic: (H, W) bools when the whole batch agrees and the
        codes are on the CPU (the loader's `bcs_host`: no GPU wait, fused attention kernels),
        else a [B, 2] bool tensor on the device."""
        if bcs is None:
            return (False, False)
        flags = (bcs == PERIODIC_CODE).any(dim=-1)                 # [B, 2]: H, W axes
        if flags.device.type == "cpu" and bool((flags == flags[:1]).all()):
            return bool(flags[0, 0]), bool(flags[0, 1])
        return flags.to(device, non_blocking=True)

    def compile_blocks(self, **options) -> None:
        """Regional torch.compile: every space-time block is compiled in place (parameter names
        and checkpoints unchanged). The blocks share their code, so the first block's graph
        serves all of them but the last, whose graph computes its decoded frame only
        (`skip_unused_frames`): compiling costs two blocks, not the whole model, and each
        shape of input (dataset resolution, frames, periodicity, train or eval) compiles once
        on first use. The fused kernels replace most of a block's elementwise and layout operators,
        which cuts what the host must issue per step (see docs/performance.md). Static shapes
        (`dynamic=False`) by default; `options` go to `torch.compile`."""
        import torch._dynamo.config as dynamo

        limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        # two graphs per input shape (the last block's and the others'): 32 shapes
        setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
        for block in self.blocks:
            block.compile(**{"dynamic": False, **options})
        # modes that replay the blocks as CUDA graphs: each forward of the model begins a new
        # step of those graphs (`forward`)
        self.graph_steps = options.get("mode") in ("reduce-overhead", "max-autotune")

    # ------------------------------------------------------------ fine-tuning helpers

    def add_fields(self, n_new: int) -> None:
        """Append `n_new` field columns to the embedding and output head (new fields of a
        fine-tuning set); the existing columns keep their trained values, and so does the
        embedding's bias, which MPP's expand_projections starts afresh (it builds a new
        embedding and copies only its weight columns, on every fine-tuning from a checkpoint,
        with new fields or none)."""
        self._before_the_engine("add_fields")
        if n_new < 1:
            return
        old = self.config.n_fields
        total = old + n_new
        # the new columns initialised as the columns of layers built at the new width would
        # be (as MPP's expand_projections does): PyTorch's default bounds depend on the fan-in,
        # which counts every field column, so columns of a layer only n_new wide would start
        # sqrt(total / n_new) times larger than the trained ones
        emb = nn.Linear(total, self.space_bag.weight.shape[0])
        head = nn.ConvTranspose2d(self.debed.out_kernel.shape[0], total,
                                  self.debed.out_kernel.shape[-1],
                                  stride=self.debed.out_kernel.shape[-1])
        # each widened parameter keeps its dtype, device and requires_grad: before, a bf16 or
        # fp16 model's were promoted to float32 (its forward then refused the mixed types) and a
        # frozen model's became trainable, all but the embedding's bias
        for owner, name, fresh in ((self.space_bag, "weight", emb.weight[:, old:]),
                                   (self.debed, "out_kernel", head.weight[:, old:]),
                                   (self.debed, "out_bias", head.bias[old:])):
            trained = getattr(owner, name)
            with torch.no_grad():
                wide = torch.cat([trained, fresh.to(trained.device, trained.dtype)],
                                 dim=min(1, fresh.ndim - 1))       # the field axis
            setattr(owner, name, nn.Parameter(wide, requires_grad=trained.requires_grad))
        self.config = AViTConfig(**{**asdict(self.config), "n_fields": total})

    def unfreeze(self) -> None:
        self._before_the_engine("unfreeze")
        for p in self.parameters():
            p.requires_grad_(True)

    def freeze_middle(self) -> None:
        """Train only the field embedding and the output head (the cheapest transfer)."""
        self._before_the_engine("freeze_middle")
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("space_bag.")
                            or name in ("debed.out_kernel", "debed.out_bias"))

    def freeze_processor(self) -> None:
        """Freeze the space-time blocks; embeddings, stem and decoder train."""
        self._before_the_engine("freeze_processor")
        for name, p in self.named_parameters():
            p.requires_grad_(not name.startswith("blocks."))


def avit(size: str, n_fields: int, drop_path: float = 0.2, attention: str = "fused",
         backward_matmuls: str = "autograd", fp32_matmuls: str = "native",
         width: int | None = None) -> AViT:
    """MPP's published sizes: Ti, S, B, L (case-insensitive). `width`: the size's blocks and
    parameter tensors at another width, with one head (benchmarks of host overheads)."""
    key = {k.lower(): k for k in SIZES}.get(size.lower())
    if key is None:
        raise ConfigError(f"AViT size {size!r} is not one of {', '.join(SIZES)}")
    dim, heads, blocks = SIZES[key]
    if width is not None:
        dim, heads = width, 1
    return AViT(AViTConfig(n_fields, dim, heads, blocks, drop_path, attention=attention,
                           backward_matmuls=backward_matmuls, fp32_matmuls=fp32_matmuls))


def n_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
