"""One rank of the one-rank ZeRO-2 tests (`dsfm.runtime.zero_local`).

Two ZeRO-2 engines over the same small AViT with the ZeRO settings of ds_configs/zero2.json
(small buckets, so that DeepSpeed's own path reduces several buckets per backward), one built
as dsfm builds it and one with DeepSpeed's own gradient handling (`local_gradients=False`),
trained side by side on the same batches: micro-batches accumulated (`--accumulation`), one
batch whose gradients are NaN (the update skipped), one step whose gradient of one parameter
is set between the backward and the update (DeepSpeed's `safe_set_full_grad`), one backward
called as torch's `loss.backward()`, one step with a parameter's data moved out of the flat
weight buffer, then both saved and each reloaded into a new engine of its kind for one more
step. Hands back `ZERO_LOCAL` (records.py): per step whether the two engines' losses, gradient
norms and weights are equal, then whether the optimizer states and the saved checkpoints are,
and the operators and copies a step issued (and its update, `engine.step()`, views included),
beside the copies of the same model's own backward without an engine (`copies_plain`).
"""

import argparse
import copy
import json
import math
import os
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsfm.eval import nmse
from dsfm.models.avit import AViT, AViTConfig
from dsfm.runtime.dist import exit_process
from dsfm.runtime.engine import build_engine, finish, init_process_group
from dsfm.runtime.zero_local import (
    is_local,
    keep_local_gradients,
    update_from_gradients,
    updates_from_gradients,
)
from perf.op_count import Counting
from tests.runtime.records import emit

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "zero2.json")


def equal(a, b) -> bool:
    """Tensors (in nested dicts, lists and objects) equal bit for bit, floats equal or both
    NaN, objects of a class without equality (DeepSpeed's loss scaler) by their attributes."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(equal(a[k], b[k]) for k in a))
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(equal(x, y) for x, y in zip(a, b)))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a).__eq__ is object.__eq__ and hasattr(a, "__dict__"):
        return type(a) is type(b) and equal(vars(a), vars(b))
    return a == b


class AllOps(TorchDispatchMode):
    """Every operator dispatched, views included (a parameter pointed at its place in the flat
    weight buffer costs a slice and a view)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


class Syncs:
    """On CUDA, the synchronizations of the host with the device inside the block (PyTorch's
    sync debug mode warns at each: reads of device values, blocking copies from the host);
    `n` is None on the CPU."""

    def __enter__(self):
        self.n = None
        if torch.cuda.is_available():
            self._caught = warnings.catch_warnings(record=True)
            self._seen = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(*exc)
            self.n = sum("synchronizing" in str(w.message) for w in self._seen)
        return False


def in_flat_buffer(engine) -> bool:
    """Whether every parameter views its place in the ZeRO optimizer's flat weight buffer."""
    opt = engine.optimizer
    for flat, params, offsets in zip(opt.bit16_groups_flat, opt.round_robin_bit16_groups,
                                     opt.round_robin_bit16_offsets):
        for p, offset in zip(params, offsets):
            if p.data_ptr() != flat.data_ptr() + offset * flat.element_size():
                return False
    return True


def saved(directory: str) -> dict:
    out = {}
    for root, _, files in os.walk(directory):
        for name in sorted(files):
            if name.endswith(".pt"):
                out[name] = torch.load(os.path.join(root, name), map_location="cpu",
                                       weights_only=False)
    return out


def batch_maker(rank: int, dev: torch.device):
    """`batches(n, poison=False)`: n micro-batches (x, y) of 2 samples, 4 frames and 4 fields
    at 32², drawn from this rank's own stream; `poison` puts a NaN in each x."""
    g = torch.Generator().manual_seed(100 + rank)

    def batches(n, poison=False):
        out = []
        for _ in range(n):
            x = 3.0 * torch.randn(2, 4, 4, 32, 32, generator=g)
            if poison:
                x[0, 0, 0, 0, 0] = float("nan")
            out.append((x.to(dev), torch.randn(2, 4, 32, 32, generator=g).to(dev)))
        return out
    return batches


def apart(a: dict, b: dict) -> dict:
    """How far apart two engines' step records are (their "losses" and "weights"): the largest
    difference of a loss (0 where both are NaN, inf where one is) and of a weight."""
    return {"losses_max_diff": max(0.0 if math.isnan(u) and math.isnan(v) else
                                   math.inf if math.isnan(u) or math.isnan(v) else abs(u - v)
                                   for u, v in zip(a["losses"], b["losses"])),
            "weights_max_diff": max(float((u - v).abs().max()) if u.numel() else 0.0
                                    for u, v in zip(a["weights"], b["weights"]))}


def flat_update(inner, group, weights, state, grads):
    """The update `inner`'s own step makes on one flat tensor: a new optimizer of its kind with
    the group's settings over a copy of the flat fp32 weights, given copies of the state and
    the (scaled) gradients laid end to end, as DeepSpeed's own step gives it its flat copy.
    Returns the weights and moments after it."""
    from deepspeed.ops.adam import FusedAdam

    w = weights.clone()
    flat = torch.cat([g.reshape(-1) for g in grads])
    w.grad = torch.cat([flat, flat.new_zeros(w.numel() - flat.numel())])
    settings = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay")}
    if type(inner) is FusedAdam:
        ref = FusedAdam([w], bias_correction=group["bias_correction"],
                        adam_w_mode=bool(inner.adam_w_mode), **settings)
    else:
        ref = type(inner)([w], amsgrad=group["amsgrad"], foreach=group["foreach"], **settings)
    ref.state[w] = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    ref.step()
    return w, ref.state[w]["exp_avg"], ref.state[w]["exp_avg_sq"]


def checking_update(record: dict):
    """Wraps dsfm's update from the gradients (`zero_local._fused_adam` on a GPU,
    `_torch_adam` on the CPU) to compare, once, what it wrote into the flat weights and moments
    with `flat_update` of the same inputs: bit for bit on either device, as nothing but the
    update's own arithmetic is in between."""
    from dsfm.runtime import zero_local

    originals = {n: getattr(zero_local, n) for n in ("_fused_adam", "_torch_adam")}

    def wrap(original):
        def update(opt, i, grads):
            inner = opt.optimizer
            weights = opt.single_partition_of_fp32_groups[i]
            state = inner.state[weights]
            before = (weights.detach().clone(),
                      {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()},
                      [g.clone() for g in grads])
            original(opt, i, grads)
            for n, f in originals.items():          # once
                setattr(zero_local, n, f)
            ref = flat_update(inner, inner.param_groups[i], *before)
            got = (weights, state["exp_avg"], state["exp_avg_sq"])
            record["update_check"] = {
                "kind": original.__name__,
                "equal": all(torch.equal(a, b) for a, b in zip(got, ref)),
                "max_diff": max(float((a - b).abs().max()) for a, b in zip(got, ref)),
                "moved": float((before[0] - weights).abs().max())}
        return update

    for n, f in originals.items():
        setattr(zero_local, n, wrap(f))


def dev0(engines) -> torch.device:
    return next(iter(engines.values())).device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    env = init_process_group()
    torch.manual_seed(0)
    model = AViT(AViTConfig(n_fields=4, dim=48, heads=3, blocks=2, drop_path=0.0))
    with open(SHIPPED) as fh:
        zero = json.load(fh)["zero_optimization"]
    zero["reduce_bucket_size"] = 20000      # DeepSpeed's path: several buckets per backward
    config = {"train_micro_batch_size_per_gpu": 2,
              "gradient_accumulation_steps": args.accumulation, "gradient_clipping": 1.0,
              # on CUDA DeepSpeed's FusedAdam, as a training run's (torch's AdamW on the CPU)
              # (weight decay: the shipped configs' AdamW decays the weights)
              "optimizer": {"type": "AdamW", "params": {
                  "lr": 1e-3, "weight_decay": 0.01,
                  "torch_adam": not torch.cuda.is_available()}},
              "zero_optimization": zero, "steps_per_print": 10 ** 9}
    engines = {"local": build_engine(copy.deepcopy(model), config)[0],
               "own": build_engine(copy.deepcopy(model), config, local_gradients=False)[0]}
    record = {"rank": env.rank, "world_size": env.world_size, "device": str(dev0(engines)),
              "local": {n: is_local(e) for n, e in engines.items()},
              # None where installed (again: a no-op), else why not
              "why_not": keep_local_gradients(engines["local"]),
              # on a CPU (torch's AdamW) asked for: FusedAdam's, on a GPU, installed by default
              "why_not_update": update_from_gradients(engines["local"], torch_adam=True),
              # the update made from the gradients where they lie, without a flat copy
              "from_gradients": {n: updates_from_gradients(e) for n, e in engines.items()},
              "hooks": {n: len(e.optimizer._grad_acc_hooks) for n, e in engines.items()},
              "n_params": len(list(model.parameters())), "steps": []}
    dev = engines["local"].device
    batches = batch_maker(env.rank, dev)
    ids = torch.arange(4, device=dev)
    bcs = torch.full((2, 2, 2), 2.0)

    from deepspeed.accelerator import get_accelerator

    accelerator, device_syncs = get_accelerator(), [0]
    synchronize = accelerator.synchronize

    def counted_synchronize(*args, **kwargs):
        device_syncs[0] += 1
        return synchronize(*args, **kwargs)
    # every get_accelerator().synchronize() of DeepSpeed's (its throughput timer's among them)
    accelerator.synchronize = counted_synchronize

    def set_a_gradient(engine):
        """One parameter's full gradient set between the backward and the step, from its own
        (read back through DeepSpeed's API): the update must use the value set."""
        from deepspeed.utils import safe_get_full_grad, safe_set_full_grad

        param = dict(engine.module.named_parameters())["blocks.0.temporal.input_head.weight"]
        safe_set_full_grad(param, -3.0 * safe_get_full_grad(param) + 0.01)

    def train_step(engine, micro, torch_style=False, count=False, between=None):
        # (stacks: the optimizer's own work, torch's AdamW on the CPU, counted apart)
        losses, counter = [], Counting(stacks=True)
        device_syncs[0] = 0
        for i, (x, y) in enumerate(micro):
            loss = nmse(engine(x, ids, bcs), y)
            losses.append(float(loss.detach()))
            if count:
                counter.__enter__()
            if torch_style:                 # DeepSpeed's epilogue from autograd's callback
                loss.backward()
            else:
                engine.backward(loss)
            if between is not None and i == len(micro) - 1:
                between(engine)
            # (stacks: the optimizer's own reads apart: torch's AdamW on the CPU reads its step)
            with AllOps() as step_ops, Counting(stacks=True) as stepped, Syncs() as syncs:
                engine.step()
            if count:
                counter.__exit__(None, None, None)
        return losses, counter, (step_ops.n, stepped, syncs.n, device_syncs[0])

    for step in range(6):
        micro = batches(args.accumulation, poison=step == 3)
        torch_style = step == 4
        row = {"torch_style": torch_style, "poisoned": step == 3, "set_grad": step == 1}
        got = {}
        for name, engine in engines.items():
            if step == 5:                   # one parameter's data moved out of the flat buffer
                first = next(engine.module.parameters())
                first.data = first.data.clone()
            skipped = engine.skipped_steps
            if step == 4 and name == "local":
                checking_update(record)
            losses, counter, step_ops = train_step(engine, micro, torch_style, count=step == 2,
                                                   between=set_a_gradient if step == 1 else None)
            norm = engine.get_global_grad_norm()
            got[name] = {"losses": losses, "norm": None if norm is None else float(norm),
                         "skipped": engine.skipped_steps - skipped,
                         "weights": [p.detach().clone() for p in engine.module.parameters()],
                         "in_buffer": in_flat_buffer(engine)}
            if step == 2:
                # the model's own backward's copies (autograd's, of gradients whose layout
                # is not their parameter's), each into cleared gradients as the engine's
                plain = copy.deepcopy(engine.module)
                row["copies_plain"] = row["cats_plain"] = 0
                for x, y in micro:
                    loss = nmse(plain(x, ids, bcs), y)
                    plain.zero_grad(set_to_none=True)
                    with Counting() as own:
                        loss.backward()
                    row["copies_plain"] += own.ops["copy_"]
                    row["cats_plain"] += own.ops["cat"]
                row[f"ops_{name}"] = sum(counter.ops.values())
                row[f"copies_{name}"] = counter.ops["copy_"]
                # the gradients flattened into one copy (at the backward's end or in the step)
                row[f"cats_{name}"] = counter.ops["cat"]
                row[f"host_reads_{name}"] = sum(counter.reads.values())
                row[f"update_ops_{name}"] = step_ops[0]     # engine.step at the boundary
                # the step's last part alone (after it: the parameters already in place)
                with AllOps() as pointing:
                    engine.optimizer._update_model_bit16_weights(0)
                row[f"point_ops_{name}"] = pointing.n
                # what engine.step reads on the host (each a synchronization on a GPU), and
                # whether it flattens the gradients itself (cat)
                row[f"step_reads_{name}"] = sum(step_ops[1].reads.values())
                row[f"step_cats_{name}"] = step_ops[1].ops["cat"]
                row[f"step_read_at_{name}"] = dict(step_ops[1].reads)     # file:line: count
                row[f"step_syncs_{name}"] = step_ops[2]        # on CUDA; None on the CPU
                # DeepSpeed's explicit device synchronizations in the whole step, forward to
                # update (its throughput timer made two a micro-batch from the third step)
                row[f"device_syncs_{name}"] = step_ops[3]
        a, b = got["local"], got["own"]
        # (on CUDA some backward kernels add in no fixed order: how far apart, beside equal)
        row.update(apart(a, b))
        row.update(losses_equal=equal(a["losses"], b["losses"]), norm_local=a["norm"],
                   norm_own=b["norm"], skipped_local=a["skipped"], skipped_own=b["skipped"],
                   weights_equal=equal(a["weights"], b["weights"]),
                   in_buffer_local=a["in_buffer"], in_buffer_own=b["in_buffer"])
        record["steps"].append(row)

    # (on CUDA, where the two engines' values differ by rounding: how far apart the optimizer
    # states are, and whether their step counts agree)
    states = [e.optimizer.optimizer.state[e.optimizer.single_partition_of_fp32_groups[0]]
              for e in engines.values()]
    record["optimizer_states_max_diff"] = max(
        float((states[0][k] - states[1][k]).abs().max()) for k in ("exp_avg", "exp_avg_sq"))
    record["optimizer_steps"] = [float(st["step"]) for st in states]
    record["optimizer_states_equal"] = equal(engines["local"].optimizer.state_dict(),
                                             engines["own"].optimizer.state_dict())
    dirs = {n: os.path.join(args.out, n) for n in engines}
    for name, engine in engines.items():
        engine.save_checkpoint(dirs[name], tag="t")
    record["checkpoints_equal"] = equal(saved(dirs["local"]), saved(dirs["own"]))
    # each checkpoint into a new engine of its kind: one more step, the same on both
    more = batches(args.accumulation)
    after = {}
    for name in engines:
        engine = build_engine(copy.deepcopy(model), config,
                              local_gradients=name == "local")[0]
        if name == "local":
            update_from_gradients(engine, torch_adam=True)
        engine.load_checkpoint(dirs[name], tag="t")
        train_step(engine, more)
        after[name] = [p.detach().clone() for p in engine.module.parameters()]
    record["resumed_equal"] = equal(after["local"], after["own"])
    record["resumed_max_diff"] = max(float((u - v).abs().max()) if u.numel() else 0.0
                                     for u, v in zip(after["local"], after["own"]))
    # a checkpoint loaded into the engine that has stepped: the pieces of the weights and
    # optimizer state its update kept (of the tensors the load replaces) are let go
    held = dict(engines["local"].optimizer.__dict__.get("_dsfm_update_pieces", {}))
    engines["local"].load_checkpoint(dirs["local"], tag="t")
    record["pieces_held"] = {"before_load": len(held), "after_load": len(
        engines["local"].optimizer.__dict__.get("_dsfm_update_pieces", {}))}
    del held
    # the flat weight buffer moved (as DeepSpeed's offload_states and reload_states move it):
    # the parameters are pointed at the new one, whose places dsfm had not worked out yet
    opt = engines["local"].optimizer
    opt.bit16_groups_flat[0] = opt.bit16_groups_flat[0].clone()
    moved = in_flat_buffer(engines["local"])
    opt._update_model_bit16_weights(0)
    record["repointed"] = {"before": moved, "after": in_flat_buffer(engines["local"])}
    emit("ZERO_LOCAL", record)
    finish(env)


if __name__ == "__main__":
    exit_process(main())
