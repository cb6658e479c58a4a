"""python -m perf.zero_host: the host's time in each part of a one-rank ZeRO-2 step, beside plain
PyTorch's.

Where a step is host-bound (TF32 on an H200, small models anywhere), ZeRO-2's overhead over
plain PyTorch is the host time DeepSpeed's engine adds: its Python around the forward and the
backward, the end of the backward (dsfm's one-rank epilogue, `zero_local`), the gradient norm
(`zero_norm`), the optimizer on the flat fp32 partition and the parameters pointed back at the
flat weight buffer. This times each part on the host (the wall time of the call; on a GPU the
kernels it issues run on, and only a part that reads a value back, the step's skip check of
the norm, also waits for them), as the median over the timed steps, each step after a device
synchronization. Variants: `plain` (torch's fused AdamW, on a CPU as on a GPU, clipping by
`clip_grad_norm_`, the loss guarded as the trainer guards it), `zero2` (dsfm's engine),
`zero2ds` (DeepSpeed's own per-tensor norm), `zero2hk` (DeepSpeed's per-parameter gradient
hooks). At a small `--width` the model's own work is small and the host's share shows on a CPU.
The table's last column counts the calls of DeepSpeed's per-parameter gradient hooks in a step:
one per tensor given a gradient where DeepSpeed reduces in its hooks, none where dsfm's one-rank
epilogue collects the gradients (the JSON keeps the count per step).

    python -m perf.zero_host --size B --width 8 [--variants plain,zero2] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from dsfm.helpfmt import HelpFormatter
from dsfm.runtime.dist import exit_process
from perf.cli import avit_size, positive_int
from perf.report import write_json

VARIANTS = ("plain", "zero2", "zero2ds", "zero2hk")
#: the ZeRO-1/2 optimizer's methods timed inside the engine's step and backward
PARTS = {"independent_gradient_partition_epilogue": "epilogue",
         "get_grad_norm_direct": "norm", "_update_model_bit16_weights": "point weights"}


class Clock:
    """Host time of named calls, per step: `wrap(owner, name, label)` times owner.name."""

    def __init__(self):
        self.times: dict[str, list[float]] = defaultdict(list)
        self._step: dict[str, float] = defaultdict(float)
        self.calls: dict[str, list[int]] = defaultdict(list)
        self._calls: dict[str, int] = defaultdict(int)
        self._undo: list = []

    def unwrap(self) -> None:
        """Put back what `wrap` replaced on objects that outlive the variant (modules)."""
        while self._undo:
            owner, name, inner = self._undo.pop()
            setattr(owner, name, inner)

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)
        self._undo.append((owner, name, inner))

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._step[label] += time.perf_counter() - t0
        setattr(owner, name, timed)

    def count(self, owner, name: str, label: str) -> None:
        """Count the calls of owner.name per step (untimed: a count, not a part)."""
        inner = getattr(owner, name)
        self._undo.append((owner, name, inner))
        self._calls[label] = 0                        # a counted label is kept at 0 calls too

        def counted(*args, **kwargs):
            self._calls[label] += 1
            return inner(*args, **kwargs)
        setattr(owner, name, counted)

    def part(self, label: str, fn):
        t0 = time.perf_counter()
        out = fn()
        self._step[label] += time.perf_counter() - t0
        return out

    def end_step(self, keep: bool) -> None:
        if keep:
            for label, seconds in self._step.items():
                self.times[label].append(seconds)
            for label, n in self._calls.items():
                self.calls[label].append(n)
        self._step.clear()
        for label in self._calls:
            self._calls[label] = 0

    def medians_ms(self) -> dict[str, float]:
        return {k: 1e3 * statistics.median(v) for k, v in self.times.items()}

    def steps_ms(self) -> dict[str, list[float]]:
        """Each part's time in each kept step: a part lies within its whole step by step, not
        always in the medians (on a loaded machine the medians of the parts can come from
        other steps than the whole's)."""
        return {k: [1e3 * t for t in v] for k, v in self.times.items()}


def variant_step(variant: str, model, inputs, batch: int, clock: Clock):
    """One training step of `variant` whose parts `clock` times."""
    from dsfm.eval import nmse
    from dsfm.runtime.nonfinite import guard

    x, ids, bcs, y = inputs
    if variant == "plain":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)   # CPU and CUDA

        def clip_and_update():
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.found_inf = torch.logical_not(torch.isfinite(norm)).float()
            opt.step()

        def plain():
            loss = clock.part("forward", lambda: guard(nmse(model(x, ids, bcs), y))[0])
            opt.zero_grad(set_to_none=True)
            clock.part("backward", loss.backward)
            clock.part("step", clip_and_update)
        return plain, None

    from dsfm.runtime.engine import build_engine
    from perf.train_bench import engine_config

    engine, _, _ = build_engine(model, engine_config(batch, 2),
                                fused_grad_norm=variant != "zero2ds",
                                local_gradients=variant != "zero2hk")
    from dsfm.runtime import zero_local

    opt = engine.optimizer
    for name, label in PARTS.items():
        clock.wrap(opt, name, label)
    # each of DeepSpeed's per-parameter gradient hooks calls this as its gradient is accumulated
    # (DeepSpeed 0.19; without it the table leaves the column empty)
    if hasattr(opt, "process_gradients"):
        clock.count(opt, "process_gradients", "gradient hooks")
    if zero_local.updates_from_gradients(engine):     # the update run on the gradients
        for name in ("_fused_adam", "_torch_adam"):
            clock.wrap(zero_local, name, "optimizer")
    else:
        clock.wrap(opt.optimizer, "step", "optimizer")

    def zero2():
        loss = clock.part("forward", lambda: guard(nmse(engine(x, ids, bcs), y))[0])
        clock.part("backward", lambda: engine.backward(loss))
        clock.part("step", engine.step)
    return zero2, engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="python -m perf.zero_host",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="B", type=avit_size, help="AViT size (Ti, S, B, L)")
    ap.add_argument("--width", type=positive_int, default=None, metavar="DIM",
                    help="the size's blocks and parameter tensors at width DIM with one head "
                         "(a multiple of 4), its arithmetic made negligible; default: the "
                         "size's own")
    ap.add_argument("--res", type=positive_int, default=32)
    ap.add_argument("--frames", type=positive_int, default=2)
    ap.add_argument("--batch", type=positive_int, default=1)
    ap.add_argument("--steps", type=positive_int, default=30)
    ap.add_argument("--warmup", type=positive_int, default=5)
    ap.add_argument("--variants", default="plain,zero2",
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        ap.error(f"--variants: {', '.join(bad) or 'none given'}: each one of "
                 f"{', '.join(VARIANTS)}")
    from perf.train_bench import check_shapes, check_width, sync, teardown
    check_shapes(ap, args.res, 4)
    check_width(ap, args.width)

    from dsfm.models.avit import avit
    from dsfm.runtime.engine import finish, init_process_group

    env = init_process_group()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.frames, 4, args.res, args.res, generator=g)
    y = torch.randn(args.batch, 4, args.res, args.res, generator=g)
    inputs = (x.to(device), torch.arange(4, device=device), torch.full((args.batch, 2, 2), 2.0),
              y.to(device))
    rows = []
    for variant in variants:
        torch.manual_seed(0)
        with torch.device(device):
            model = avit(args.size, 12, drop_path=0.0, width=args.width)
        clock = Clock()
        step, engine = variant_step(variant, model, inputs, args.batch, clock)
        n_params = sum(1 for _ in model.parameters())
        for i in range(args.warmup + args.steps):
            sync()
            t0 = time.perf_counter()
            step()
            clock._step["whole step"] = time.perf_counter() - t0
            clock.end_step(keep=i >= args.warmup)
        sync()
        # the tensors the backward gives a gradient (MPP's unused norm biases get none); plain
        # PyTorch leaves them in .grad, DeepSpeed takes them away
        grads = sum(p.grad is not None for p in model.parameters()) if engine is None else None
        rows.append({"variant": variant, "parameter_tensors": n_params,
                     "gradient_tensors": grads,
                     "host_ms": clock.medians_ms(), "host_ms_steps": clock.steps_ms(),
                     "calls_steps": dict(clock.calls)})
        clock.unwrap()
        if engine is not None:
            teardown(engine)
        del model, step, engine

    order = ["whole step", "forward", "backward", "epilogue", "step", "norm", "optimizer",
             "point weights"]
    print(f"AViT-{args.size}{f' at width {args.width}' if args.width else ''} on "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}: host ms per "
          f"part (median of {args.steps} steps; epilogue in backward; norm, optimizer and "
          f"point weights in step; hooks: DeepSpeed's gradient hooks run a step)")
    print(f"{'variant':8s} " + " ".join(f"{k:>13s}" for k in order) + f" {'hooks':>7s}")
    for r in rows:
        hooks = r["calls_steps"].get("gradient hooks")
        print(f"{r['variant']:8s} " + " ".join(
            f"{r['host_ms'][k]:13.3f}" if k in r["host_ms"] else f"{'':13s}" for k in order)
            + (f" {statistics.median(hooks):7.0f}" if hooks else f" {'':7s}"))
    if args.json:
        write_json(args.json, {"size": args.size, "width": args.width, "device": str(device),
                               "batch": args.batch, "frames": args.frames, "res": args.res,
                               "steps": args.steps, "rows": rows})
    finish(env)
    return 0


if __name__ == "__main__":
    exit_process(main())
