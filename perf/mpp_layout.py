"""MPP's own channels-first formulation of the AViT, over dsfm's parameters.

dsfm's space-time blocks work on tokens, channels last ([B, T, H, W, C]): every 1×1 projection
and the MLP is one matrix multiply on the channel axis. MPP's code keeps frames channels-first
([B, T, C, H, W]) and runs the projections as 1×1 convolutions, with torch's InstanceNorm2d and
permutes around the MLP and the attention. This module computes the same model that way, with the
very parameters of a dsfm `AViT` (the names and shapes are MPP's in both), so that
  - the tests check that the token layout computes MPP's function (outputs and gradients), and
  - `perf.train_bench --layouts tokens,channels_first` measures one against the other in one run.
It runs every block on every frame, as MPP's code does, where dsfm's model runs its last block
on the decoded frame only (`AViT.skip_unused_frames`): the same prediction. It is a reference
and a benchmark variant, not a training path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _rms(norm, x: torch.Tensor) -> torch.Tensor:
    std = torch.std(x, dim=(-2, -1), keepdim=True)
    return x / (std + norm.eps) * norm.weight[:, None, None]


def _instance(norm, x: torch.Tensor) -> torch.Tensor:
    return F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)


def _qkv(x: torch.Tensor, heads: int):
    """[N, 3·dim, ...] → q, k, v of [N, heads, ..., head_dim], q, k, v contiguous per head."""
    n, c3 = x.shape[:2]
    return x.reshape(n, heads, c3 // heads, *x.shape[2:]).movedim(2, -1).chunk(3, dim=-1)


def temporal(mod, x: torch.Tensor) -> torch.Tensor:
    """dsfm.models.layers.TemporalAttention's function on x [B, T, C, H, W]."""
    b, t, c, h, w = x.shape
    z = mod.input_head(_instance(mod.norm1, x.reshape(b * t, c, h, w)))
    z = z.reshape(b, t, 3 * c, h, w).permute(0, 3, 4, 2, 1)          # [B, H, W, 3C, T]
    q, k, v = _qkv(z.reshape(b * h * w, 3 * c, t), mod.heads)        # [BHW, heads, T, hd]
    z = F.scaled_dot_product_attention(mod.qnorm(q), mod.knorm(k), v,
                                       attn_mask=mod.rel_pos_bias(t)[None])
    z = z.transpose(2, 3).reshape(b, h, w, c, t).permute(0, 4, 3, 1, 2)
    z = mod.output_head(_instance(mod.norm2, z.reshape(b * t, c, h, w))).reshape(b, t, c, h, w)
    return x + mod.drop_path(z * mod.gamma[:, None, None])


def spatial(mod, x: torch.Tensor, periodic) -> torch.Tensor:
    """dsfm.models.layers.AxialSpatialAttention's function on x [N, C, H, W]."""
    n, c, h, w = x.shape
    q, k, v = _qkv(mod.input_head(_rms(mod.norm1, x)), mod.heads)    # [N, heads, H, W, hd]
    q, k = mod.qnorm(q), mod.knorm(k)
    table = mod.rel_pos_bias.table()
    zw = mod._along(*(t.transpose(1, 2) for t in (q, k, v)),
                    periodic[1] if isinstance(periodic, tuple) else periodic[:, 1], table)
    zw = zw.permute(0, 2, 4, 1, 3)                                   # [N, heads, hd, H, W]
    zh = mod._along(*(t.permute(0, 3, 1, 2, 4) for t in (q, k, v)),
                    periodic[0] if isinstance(periodic, tuple) else periodic[:, 0], table)
    zh = zh.permute(0, 2, 4, 3, 1)
    z = ((zw + zh) / 2).reshape(n, c, h, w)
    x = x + mod.drop_path(mod.output_head(_rms(mod.norm2, z)) * mod.gamma_att[:, None, None])
    z = mod.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return x + mod.drop_path(_rms(mod.mlp_norm, z) * mod.gamma_mlp[:, None, None])


def forward(model, x: torch.Tensor, field_ids: torch.Tensor, bcs=None) -> torch.Tensor:
    """dsfm.models.avit.AViT's function, its blocks channels-first."""
    b, t, c, h, w = x.shape
    with torch.no_grad():
        std, mean = torch.std_mean(x, dim=(1, 3, 4), keepdim=True)
        std = std + model.config.revin_eps
    z = model.embed(model.space_bag(((x - mean) / std).reshape(b * t, c, h, w), field_ids))
    z = z.reshape(b, t, *z.shape[1:])
    periodic = model.periodicity(bcs, x.device)
    for block in model.blocks:
        bt, ct, ht, wt = b * t, *z.shape[2:]
        z = temporal(block.temporal, z)
        flags = periodic if isinstance(periodic, tuple) else periodic.repeat_interleave(t, 0)
        z = spatial(block.spatial, z.reshape(bt, ct, ht, wt), flags).reshape(b, t, ct, ht, wt)
    return model.debed(z[:, -1], field_ids) * std[:, 0] + mean[:, 0]


class ChannelsFirst(nn.Module):
    """`model` (a dsfm AViT) computed by MPP's channels-first formulation; its parameters are
    the model's own."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, field_ids, bcs=None):
        return forward(self.model, x, field_ids, bcs)
