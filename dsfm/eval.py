"""Loss and metrics: MPP's normalized MSE for training; NRMSE and VRMSE per dataset and field,
one step ahead and over a k-step autoregressive rollout, for evaluation.

All functions take fields as [..., C, H, W] (the last two axes are space) and reduce over space
only, so every sample and field gets its own number before averaging: a dataset whose fields
have large values cannot drown out one whose fields are small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EPS = 1e-7


def nmse(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """MPP's training loss: per sample and field, mean squared residual over mean squared
    target, averaged."""
    space = (-2, -1)
    res = (pred - target).pow(2).mean(space)
    return (res / (target.pow(2).mean(space) + eps)).mean()


def field_errors(pred: torch.Tensor, target: torch.Tensor,
                 eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(NRMSE, VRMSE) per sample and field, shape [..., C]: root mean squared error over the
    root mean square of the target (NRMSE) or over its spatial standard deviation (VRMSE, The
    Well's headline metric: 1 means no better than predicting the mean)."""
    space = (-2, -1)
    mse = (pred - target).pow(2).mean(space)
    nrmse = torch.sqrt(mse / (target.pow(2).mean(space) + eps))
    var = target.var(space, unbiased=False)
    vrmse = torch.sqrt(mse / (var + eps))
    return nrmse, vrmse


@torch.no_grad()
def rollout(model, x: torch.Tensor, field_ids: torch.Tensor, bcs: torch.Tensor,
            steps: int) -> torch.Tensor:
    """Feed the model its own predictions: x [B, T, C, H, W] → [B, steps, C, H, W]."""
    window = x
    preds = []
    for _ in range(steps):
        nxt = model(window, field_ids, bcs)
        preds.append(nxt)
        window = torch.cat([window[:, 1:], nxt[:, None]], dim=1)
    return torch.stack(preds, dim=1)


@dataclass
class MetricSums:
    """Running sums of per-sample metrics for one dataset: [steps, C] each, plus the count."""

    fields: list[str]
    steps: int
    nrmse: torch.Tensor = field(init=False)
    vrmse: torch.Tensor = field(init=False)
    count: int = 0

    def __post_init__(self):
        self.nrmse = torch.zeros(self.steps, len(self.fields), dtype=torch.float64)
        self.vrmse = torch.zeros_like(self.nrmse)

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: [B, steps, C, H, W]."""
        n, v = field_errors(pred.double(), target.double())
        self.nrmse += n.sum(0).cpu()
        self.vrmse += v.sum(0).cpu()
        self.count += pred.shape[0]

    def packed(self) -> torch.Tensor:
        return torch.cat([self.nrmse.flatten(), self.vrmse.flatten(),
                          torch.tensor([float(self.count)], dtype=torch.float64)])

    def unpack(self, flat: torch.Tensor) -> None:
        k = self.nrmse.numel()
        self.nrmse = flat[:k].reshape(self.nrmse.shape).clone()
        self.vrmse = flat[k:2 * k].reshape(self.vrmse.shape).clone()
        self.count = int(flat[-1].item())

    def summary(self) -> dict:
        """Per field: NRMSE and VRMSE one step ahead and averaged over the rollout."""
        c = max(self.count, 1)
        out = {}
        for i, name in enumerate(self.fields):
            n, v = self.nrmse[:, i] / c, self.vrmse[:, i] / c
            out[name] = {"nrmse_1step": float(n[0]), "vrmse_1step": float(v[0]),
                         f"nrmse_rollout{self.steps}": float(n.mean()),
                         f"vrmse_rollout{self.steps}": float(v.mean()),
                         "vrmse_per_step": [float(a) for a in v]}
        return out


def evaluate(engine, paths: list[str], *, n_steps_input: int, rollout_steps: int,
             batch_size: int, batches: int, vocabulary, seed: int, rank: int, world_size: int,
             normalization: str | None, dt_stride: int = 1, num_workers: int = 1) -> dict:
    """NRMSE and VRMSE per dataset and field on the valid split, one step ahead and over a
    `rollout_steps` autoregressive rollout, in physical units. Every rank evaluates its own
    `batches` micro-batches of every dataset (the same windows each time: a fresh loader with a
    fixed seed) and the sums are all-reduced, so the result covers batches × world windows."""
    from dsfm.data.prefetch import WellLoader
    from dsfm.runtime.engine import all_reduce_

    was_training = engine.training
    engine.eval()
    results = {}
    try:
        for path in paths:
            with WellLoader([path], split="valid", n_steps_input=n_steps_input,
                            n_steps_output=rollout_steps, batch_size=batch_size,
                            num_workers=num_workers, seed=seed, rank=rank,
                            world_size=world_size, normalization=normalization,
                            dt_stride=dt_stride, vocabulary=vocabulary) as loader:
                name = loader.datasets[0].source.name
                sums = MetricSums(list(loader.datasets[0].source.channel_names), rollout_steps)
                it = iter(loader)
                for _ in range(batches):
                    batch = next(it)
                    pred = rollout(engine, batch.x, batch.field_ids, batch.bcs_host,
                                   rollout_steps)
                    sums.add(loader.denormalize(name, pred), loader.denormalize(name, batch.y))
                    del batch
                dev = next(engine.module.parameters()).device
                sums.unpack(all_reduce_(sums.packed().to(dev)).cpu())
                results[name] = sums.summary()
    finally:
        if was_training:
            engine.train()
    return results


def format_table(results: dict, rollout_steps: int) -> str:
    """A plain table: dataset, field, NRMSE and VRMSE one step ahead and over the rollout."""
    head = (f"{'dataset':32s} {'field':14s} {'NRMSE@1':>9s} {'VRMSE@1':>9s} "
            f"{'NRMSE@' + str(rollout_steps):>9s} {'VRMSE@' + str(rollout_steps):>9s}")
    lines = [head, "-" * len(head)]
    for name, fields in results.items():
        for fname, m in fields.items():
            lines.append(f"{name:32s} {fname:14s} {m['nrmse_1step']:9.4f} "
                         f"{m['vrmse_1step']:9.4f} {m[f'nrmse_rollout{rollout_steps}']:9.4f} "
                         f"{m[f'vrmse_rollout{rollout_steps}']:9.4f}")
    return "\n".join(lines)
