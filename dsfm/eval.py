"""Loss and metrics: MPP's normalized MSE for training; NRMSE and VRMSE per dataset and field,
one step ahead and over a k-step autoregressive rollout, for evaluation.

All functions take fields as [..., C, H, W] (the last two axes are space) and reduce over space
only, so every sample and field gets its own number before averaging: a dataset whose fields
have large values cannot drown out one whose fields are small.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dsfm.errors import ConfigError, DataError, DsfmError, EmptySplitError, TooShortError

EPS = 1e-7
#: the evaluation's row of means over a dataset's fields (The Well's `full_` metrics)
ALL_FIELDS = "all_fields"


class EvaluationDataError(DataError):
    """A rank's evaluation loader failed (NaN/Inf in a valid window, a damaged file, a dead
    reader): raised on every rank at once, after the dataset's all-reduce, so that none waits
    in a collective for a rank that stopped. `failed`: the lowest rank whose loader failed;
    `own`: this rank's loader error, or None; `dataset`: the dataset being evaluated; `told`:
    rank `failed`'s error, which every rank repeats (the launcher may end that rank before it
    says so)."""

    def __init__(self, failed: int, own: DataError | None, dataset: str, told: str = ""):
        self.failed, self.own, self.dataset = failed, own, dataset
        super().__init__(str(own) if own is not None else
                         f"rank {failed}'s loader failed on the valid split of {dataset}: "
                         f"{told}")


def nmse(pred: torch.Tensor, target: torch.Tensor, eps: float = EPS,
         scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """MPP's training loss: per sample and field, mean squared residual over mean squared
    target, averaged.

    `scale` and `shift` (per channel, [C, 1, 1] for 2D fields: the loader's normalization,
    `WellLoader.affine`) make `pred` and `target` normalized values whose loss is taken in
    physical units (target · scale + shift), as MPP computes it on raw fields. The residual is
    the normalized one scaled, not the difference of two shifted values, so a field with a
    large mean and small fluctuations (a water height of 1 ± 0.01) keeps its precision."""
    space = (-2, -1)
    res = pred - target
    if scale is None and shift is None:
        return (res.pow(2).mean(space) / (target.pow(2).mean(space) + eps)).mean()
    # physical values span many decades (squares of 1e20 overflow float32, of 1e-24 vanish):
    # the ratio in float64, on tensors of the loss's size, not the model's
    res = physical(res, scale, None)
    target = physical(target, scale, shift)
    return (res.pow(2).mean(space) / (target.pow(2).mean(space) + eps)).mean().to(pred.dtype)


def physical(t: torch.Tensor, scale: torch.Tensor | None,
             shift: torch.Tensor | None) -> torch.Tensor:
    """Normalized values back in physical units (t · scale + shift), in float64."""
    t = t.double()
    if scale is not None:
        t = t * scale.double()
    if shift is not None:
        t = t + shift.double()
    return t


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
        if ALL_FIELDS in self.fields:
            raise ConfigError(f"a field named {ALL_FIELDS!r} would clash with the evaluation's "
                              "mean over fields; rename it in the dataset")
        self.nrmse = torch.zeros(self.steps, len(self.fields), dtype=torch.float64)
        self.vrmse = torch.zeros_like(self.nrmse)

    def add(self, pred: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None = None,
            shift: torch.Tensor | None = None) -> None:
        """pred, target: [B, steps, C, H, W], in physical units or normalized ones that
        `scale` and `shift` ([C, 1, 1]) map back. In float64, the denormalization included (a
        small fluctuation on a large mean would not survive it in float32), one rollout step
        at a time (a float64 copy of a whole rollout of large fields would take gigabytes).
        The sums stay on pred's device: no copy to the host, which would wait for the GPU,
        until `packed()` is all-reduced."""
        if self.nrmse.device != pred.device:
            self.nrmse, self.vrmse = (torch.zeros_like(t, device=pred.device) if not self.count
                                      else t.to(pred.device) for t in (self.nrmse, self.vrmse))
        for j in range(pred.shape[1]):
            n, v = field_errors(physical(pred[:, j], scale, shift),
                                physical(target[:, j], scale, shift))
            self.nrmse[j] += n.sum(0)
            self.vrmse[j] += v.sum(0)
        self.count += pred.shape[0]

    def packed(self) -> torch.Tensor:
        return torch.cat([self.nrmse.flatten(), self.vrmse.flatten(),
                          torch.tensor([float(self.count)], dtype=torch.float64,
                                       device=self.nrmse.device)])

    def unpack(self, flat: torch.Tensor) -> None:
        k = self.nrmse.numel()
        self.nrmse = flat[:k].reshape(self.nrmse.shape).clone()
        self.vrmse = flat[k:2 * k].reshape(self.vrmse.shape).clone()
        self.count = int(flat[-1].item())

    def summary(self, split_windows: int | None = None) -> dict:
        """Per field: NRMSE and VRMSE one step ahead and averaged over the rollout, means over
        the `windows` evaluated (each window counts once, whatever the batches and ranks), and
        `split_windows`, if given: how many the split held, of which those were taken. Last,
        under `ALL_FIELDS`, each metric's mean over the fields: the one number per dataset
        that The Well's benchmark tables give."""
        c = max(self.count, 1)
        out = {}
        for i, name in enumerate(self.fields):
            n, v = self.nrmse[:, i] / c, self.vrmse[:, i] / c
            out[name] = {"nrmse_1step": float(n[0]), "vrmse_1step": float(v[0]),
                         f"nrmse_rollout{self.steps}": float(n.mean()),
                         f"vrmse_rollout{self.steps}": float(v.mean()),
                         "vrmse_per_step": [float(a) for a in v], "windows": self.count}
            if split_windows is not None:
                out[name]["split_windows"] = split_windows
        # The Well's per-dataset figure (its `full_` metrics): the mean over the fields of
        # each field's metric, every field weighing alike
        rows = list(out.values())
        mean = {key: sum(r[key] for r in rows) / len(rows)
                for key in ("nrmse_1step", "vrmse_1step", f"nrmse_rollout{self.steps}",
                            f"vrmse_rollout{self.steps}")}
        mean["vrmse_per_step"] = [sum(r["vrmse_per_step"][j] for r in rows) / len(rows)
                                  for j in range(self.steps)]
        out[ALL_FIELDS] = {**mean, **{k: rows[0][k] for k in ("windows", "split_windows")
                                      if k in rows[0]}}
        return out


def plan_eval(paths: list[str], *, n_steps_input: int, rollout_steps: int, batch_size: int,
              batches: int, world_size: int, dt_stride: int = 1) -> dict[str, int]:
    """Micro-batches per rank that `evaluate` will take of each dataset: `batches`, or fewer
    where the valid split holds fewer (each window is evaluated once, never twice). Called
    before training, so that a valid split that cannot serve the evaluation stops the run
    before its first step rather than at its first evaluation, naming the setting."""
    from dsfm.data.prefetch import index_dataset

    plan = {}
    for path in paths:
        try:
            source = index_dataset(path, "valid", n_steps_input, rollout_steps,
                                   dt_stride).source
            name, windows = source.name, len(source)
        except TooShortError as exc:
            raise ConfigError(f"evaluation with train.rollout_steps={rollout_steps}: {exc}; "
                              "lower train.rollout_steps or set train.eval_batches=0") from None
        except EmptySplitError as exc:      # no valid/ or no file in it: nothing to evaluate
            raise EmptySplitError(f"evaluation on the valid split: {exc}; set "
                                  "train.eval_batches=0 to train without evaluation") from None
        except DsfmError as exc:
            raise type(exc)(f"evaluation on the valid split: {exc}") from None
        per_rank = windows // world_size // batch_size
        if windows == 0:
            raise ConfigError(f"evaluation: the valid split of {name} holds no trajectory (a "
                              "PDEBench source splits each file's trajectories, or for "
                              "incompressible NS those of all the files given together: give "
                              "the folder, or more files); set train.eval_batches=0 to train "
                              "without evaluation")
        if per_rank < 1:
            raise ConfigError(f"evaluation: the valid split of {name} has {windows} windows of "
                              f"{n_steps_input} + {rollout_steps} steps, fewer than one "
                              f"micro-batch of {batch_size} per rank with {world_size} ranks; "
                              "lower train.rollout_steps or the micro-batch "
                              "(train_micro_batch_size_per_gpu in the ds_config), or set "
                              "train.eval_batches=0")
        plan[name] = min(batches, per_rank)
    return plan


def evaluate(engine, paths: list[str], *, n_steps_input: int, rollout_steps: int,
             batch_size: int, batches: int, vocabulary, seed: int, rank: int, world_size: int,
             normalization: str | None, dt_stride: int = 1, num_workers: int = 1,
             plan: dict[str, int] | None = None) -> dict:
    """NRMSE and VRMSE per dataset and field on the valid split, one step ahead and over a
    `rollout_steps` autoregressive rollout, in physical units. Every rank evaluates its own
    `batches` micro-batches of every dataset (the same windows each time: a fresh loader with a
    fixed seed; fewer where the split holds fewer, see `plan_eval`) and the sums are
    all-reduced, so the result covers up to batches × batch_size × world windows, each once.
    Only windows with room for the whole rollout are eligible, the one-step metrics included.
    Each field's numbers are means over the windows evaluated (`windows` in the result), each
    window counting once, of the `split_windows` eligible in the split (before, the result did
    not say how many an `eval_batches` limit or the split's remainder left out). `engine`: the
    DeepSpeed engine, or a bare model. `plan`: what `plan_eval` returned for these arguments
    (it reads every valid file's metadata), if the caller has it."""
    from dsfm.data.prefetch import WellLoader
    from dsfm.runtime.engine import all_reduce_, told_by

    if plan is None:
        plan = plan_eval(paths, n_steps_input=n_steps_input, rollout_steps=rollout_steps,
                         batch_size=batch_size, batches=batches, world_size=world_size,
                         dt_stride=dt_stride)
    # a DeepSpeed engine's own `training` stays True: its train()/eval() set its module's only,
    # so reading the engine's put a model the caller had in evaluation mode back in training
    model = getattr(engine, "module", engine)
    was_training = model.training
    engine.eval()
    results = {}
    dev = next(engine.parameters()).device     # an engine's: its model's

    def who_failed(failed: DataError | None, sums: torch.Tensor | None = None):
        """Collective: the all-reduced `sums` (if any), and the ranks whose loaders failed,
        told to every rank in the same all-reduce."""
        who = torch.zeros(world_size, dtype=torch.float64)
        who[rank] = failed is not None
        parts = ([] if sums is None else [sums.to(dev)]) + [who.to(dev)]
        flat = all_reduce_(torch.cat(parts)).cpu()
        return flat[:-world_size], [r for r in range(world_size)
                                    if flat[-world_size + r] > 0]

    def failure(first: int, failed: DataError | None, name: str) -> EvaluationDataError:
        """Collective: the error every rank raises, rank `first`'s message told to all."""
        told = told_by(first, None if failed is None else str(failed), dev)
        return EvaluationDataError(first, failed, name, told)

    try:
        for path, (name, n_batches) in zip(paths, plan.items()):
            # no more readers, ring slots and reads ahead than the batches to evaluate
            workers = max(1, min(num_workers, n_batches))
            try:    # it reads every valid file's metadata again: one may have gone bad since
                loader = WellLoader([path], split="valid", n_steps_input=n_steps_input,
                                    n_steps_output=rollout_steps, batch_size=batch_size,
                                    num_workers=workers,
                                    ring_slots=max(2, min(2 * workers + 2, n_batches)),
                                    seed=seed, rank=rank,
                                    world_size=world_size, normalization=normalization,
                                    dt_stride=dt_stride, vocabulary=vocabulary)
            except DataError as exc:
                loader, failed = None, exc
            else:
                failed = None
            # before any rollout: a rank whose loader could not start has nothing to shape a
            # stand-in from, so every rank stops here with it
            _, bad = who_failed(failed)
            if bad:
                error = failure(bad[0], failed, name)  # collective: before the loader's close
                if loader is not None:
                    loader.close()
                raise error
            with loader:
                sums = MetricSums(list(loader.datasets[0].source.channel_names), rollout_steps)
                for _ in range(n_batches):
                    # once this rank's loader failed the other ranks go on: ZeRO-3's forward
                    # gathers the weights with them, so it runs the same rollouts on zeros,
                    # thrown away
                    batch, failed = loader.next_or_stand_in(failed, name)
                    pred = rollout(engine, batch.x, batch.field_ids, batch.bcs_host,
                                   rollout_steps)
                    if failed is None:
                        sums.add(pred, batch.y, *loader.affine(name))
                    del batch, pred
                if failed is None:
                    try:    # on a GPU the last batch's NaN check is deferred
                        loader.check_last()
                    except DataError as exc:
                        failed = exc
                # one all-reduce: the sums, and which ranks' loaders failed
                flat, bad = who_failed(failed, sums.packed())
                if bad:
                    raise failure(bad[0], failed, name)
                sums.unpack(flat)
                results[name] = sums.summary(len(loader.datasets[0].source))
    finally:
        engine.train(was_training)
    return results


def format_table(results: dict, rollout_steps: int) -> str:
    """A plain table: dataset, field, NRMSE and VRMSE one step ahead (@1), their means over the
    rollout's steps 1..k (1-k) and VRMSE at its last step (@k) (for k = 1 the first two), and
    the number of windows they average over."""
    k = rollout_steps
    cols = [("NRMSE@1", "nrmse_1step"), ("VRMSE@1", "vrmse_1step")]
    if k > 1:
        cols += [(f"NRMSE1-{k}", f"nrmse_rollout{k}"), (f"VRMSE1-{k}", f"vrmse_rollout{k}"),
                 (f"VRMSE@{k}", None)]
    head = (f"{'dataset':32s} {'field':14s} " + " ".join(f"{c:>9s}" for c, _ in cols)
            + f" {'windows':>8s}")
    lines = [head, "-" * len(head)]
    for name, fields in results.items():
        for fname, m in fields.items():
            values = [m[key] if key else m["vrmse_per_step"][-1] for _, key in cols]
            lines.append(f"{name:32s} {fname:14s} " + " ".join(f"{v:9.4f}" for v in values)
                         + f" {m['windows']:8d}")
    return "\n".join(lines)
