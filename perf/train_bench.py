"""python -m perf.train_bench: the AViT training step, per size, numerics and wrapper.

One training step (forward, backward, AdamW with clipping 1.0) of dsfm's AViT on synthetic
inputs shaped like the reference measurement of MPP's own code (micro-batch 8, L: 4; 16 input
frames; 4 fields; 128×128; 12 field columns; nMSE loss), for each size, in fp32 and TF32 (CUDA
only), as plain PyTorch (fused AdamW on CUDA), and wrapped in a one-rank DeepSpeed ZeRO-2 and
ZeRO-3 engine, all in one run (with --attention fused,packed,direct also with the blocks'
attention packed or written out: dsfm.models.layers._packed_attention, _direct_attention;
with --backward-matmuls autograd,tn also with the blocks' backward matrix multiplies in the
forward's layout: AViTConfig.backward_matmuls; with --numerics fp32,3xtf32 also with the
blocks' products as three TF32 products each: AViTConfig.fp32_matmuls, not fp32's accuracy
on an H200, so with no comparison against MPP).
Reports ms/step (steps running freely, each guarding its loss on the device as dsfm's trainer
does under ZeRO, `plainread` reading it back before the backward instead; and, without either,
each between two synchronizations, with the host's time to issue it), samples/s, achieved
TFLOP/s (FLOPs of one step counted by torch.utils.flop_counter on meta tensors, as the trainer
counts them: `step_flops`), MFU against the card's dense peak, and peak memory during the
variant (CUDA: allocated by tensors; CPU: the process's resident memory, Python and libraries
included); on an H200 or H100 at the reference shapes, samples/s against MPP's own code's on
that card (`vs MPP`, docs/mpp_anchors.md) and, for B and L, the best row against
issue 4's 2x; prints a table and writes JSON.

    python -m perf.train_bench --json out.json                      # the reference shapes, GPU
    python -m perf.train_bench --sizes Ti --res 64 --frames 4 --batch 2 --steps 3   # a CPU smoke
    python -m perf.train_bench --sizes B --wrappers plain --attention fused,packed --profile 3
    python -m perf.train_bench --sizes B --wrappers plain --compile --attention fused,direct
    python -m perf.train_bench --sizes B --wrappers plain --compile --backward-matmuls autograd,tn
    python -m perf.train_bench --sizes B --wrappers plain --compile --numerics fp32,3xtf32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback

import torch

from dsfm.helpfmt import HelpFormatter
from dsfm.monitor.steps import peak_tflops
from dsfm.runtime.dist import exit_process
from perf.cli import non_negative_int, positive_int
from perf.gpu_trace import describe_row, profile_into, steps_arg
from perf.report import write_json


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(run, iters: int, warmup: int, before=None) -> float:
    """The median ms of `run()` over `iters` calls after `warmup` more, each between two device
    synchronizations; `before()` (untimed) ahead of each."""
    times = []
    for i in range(warmup + iters):
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def add_call_options(ap: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that time single calls with `median_ms` at the step's
    shapes (attention_bench, matmul_bench): frames and resolution, timed and warm-up calls,
    the JSON output."""
    ap.add_argument("--frames", type=positive_int, default=16)
    ap.add_argument("--res", type=positive_int, default=128)
    ap.add_argument("--iters", type=positive_int, default=10)
    ap.add_argument("--warmup", type=non_negative_int, default=3)
    ap.add_argument("--json", default=None)


def step_flops(model, x) -> float:
    """FLOPs of one forward + backward of `model` (an AViT, or perf.mpp_layout's ChannelsFirst
    of one: the same model FLOPs, dsfm's, the last block on its decoded frame only, whatever
    the layout computes) on an input of `x`'s shape, counted as the trainer counts its
    perf/tflops (dsfm.monitor.steps.ModelFlops: torch.utils.flop_counter on a meta-device
    twin, frozen parameters without weight gradients), attention's scores counted once.
    Counted on the model's own device, as before, the figure followed the attention kernel that
    device ran: CUDA's fused kernels are charged the scores a second time in their backward
    (what they recompute), and the CPU's flash kernel (taken when the bias needs no gradient)
    nothing, flop_counter having no formula for it."""
    from dsfm.monitor.steps import ModelFlops
    from perf.mpp_layout import ChannelsFirst

    base = model.model if isinstance(model, ChannelsFirst) else model
    frozen = frozenset(n for n, p in base.named_parameters() if not p.requires_grad)
    return ModelFlops(base.config, frozen=frozen).step(tuple(x.shape))


_FLOPS: dict[tuple, float] = {}


NUMERICS = ("fp32", "tf32", "torch", "3xtf32")
FIELD_COLUMNS = 12              # the vocabulary the model is built with (MPP's reference)
WRAPPERS = ("plain", "plainread", "graph", "zero2", "zero2hk", "zero2nc", "zero2ds", "zero3",
            "zero3mod", "zero3keep")
WW = max(map(len, WRAPPERS))            # the wrapper column's width in the printed tables


# MPP's own AViT on the GPU machines (docs/mpp_anchors.md, measured 2026-11-28
# with PyTorch 2.11): samples/s of one training step (forward, backward, fused AdamW) at this
# benchmark's reference shapes (16 input frames, 4 fields, 128x128, 12 field columns; micro-batch
# 8, L 4), in strict fp32 and in TF32, per card. Issue 4's target: twice these for B and L at
# equal numerics, on the same card.
MPP_SAMPLES = {"H200": {"Ti": (66.7, 76.1), "S": (49.5, 59.2), "B": (24.8, 45.0),
                        "L": (7.9, 14.7)},
               "H100": {"Ti": (57.9, 51.8), "S": (49.6, 63.8), "B": (23.8, 41.6),
                        "L": (7.7, 11.8)}}
# the reference's numerics a row's compare with; none for 3xtf32, whose products on an H200
# had 5-25 times strict fp32's error (layers._mm_3xtf32): neither MPP's fp32 nor its TF32;
# none for "torch" (cuDNN's convolutions in TF32) either
MPP_NUMERICS = {"fp32": 0, "tf32": 1}


def default_batch(size: str) -> int:
    """The reference's micro-batch: 8, L 4."""
    return 4 if size == "L" else 8


def mpp_card(card: str) -> str | None:
    """The reference table's card that `card` (a device name) is, if any."""
    return next((c for c in MPP_SAMPLES if c in card), None)


def mpp_reference(card: str, row: dict, args) -> float | None:
    """MPP's samples/s on `card` (a device name) for `row`'s size and numerics, where the row
    ran the reference's shapes and is a training step; else None (another card, other shapes,
    a reduced width, the CUDA-graph wrapper, which training cannot use, the compiled blocks
    replayed as CUDA graphs, which dsfm/train.py runs (model.compile_mode) but has not yet on
    a GPU, PyTorch's default numerics or 3xtf32)."""
    known = mpp_card(card)
    if (known is None or row["size"] not in MPP_SAMPLES[known] or row["wrapper"] == "graph"
            or row.get("compile_mode") not in (None, "default")
            or row["numerics"] not in MPP_NUMERICS or args.width
            or (args.res, args.frames, args.fields) != (128, 16, 4)
            or row["batch"] != default_batch(row["size"])):
        return None
    return MPP_SAMPLES[known][row["size"]][MPP_NUMERICS[row["numerics"]]]


def compare_with_mpp(card: str, rows: list[dict], args) -> None:
    """Each row's `mpp_samples_per_sec` (`mpp_reference`) and `vs_mpp`, its samples/s over
    that (None where the row does not compare)."""
    for r in rows:
        ref = mpp_reference(card, r, args)
        r["mpp_samples_per_sec"] = ref
        r["vs_mpp"] = r["samples_per_sec"] / ref if ref else None


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


def engine_config(batch: int, stage: int) -> dict:
    """The benchmarks' one-rank DeepSpeed config: AdamW, clipping 1.0, and the ZeRO settings of
    the training job's own `ds_configs/zero{stage}.json` (overlap_comm, contiguous gradients,
    bucket sizes), so that the overhead measured is the one a run gets."""
    zero = {"stage": stage}
    path = os.path.join(SHIPPED, f"zero{stage}.json")
    if os.path.isfile(path):
        with open(path) as fh:
            zero = json.load(fh)["zero_optimization"]
    return {"train_micro_batch_size_per_gpu": batch, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "zero_optimization": zero, "steps_per_print": 10 ** 9}


def plain_step(model, opt, inputs, check_loss: bool | str = False):
    """One plain-PyTorch training step on fixed inputs (x, field ids, bcs, y): nMSE, backward,
    clipping at 1.0, `opt`. `check_loss`: what the trainer does about a non-finite loss, done
    the plain way, on the device: the loss guarded (`dsfm.runtime.nonfinite.guard`: NaN
    gradients if it is not finite) and, with a fused optimizer, the update skipped on a
    non-finite norm through its `found_inf` (as torch's GradScaler skips one); no host read.
    Without a fused optimizer (the CPU runs) nothing skips: the benchmark's inputs are finite.
    "read": the loss read on the host before the backward instead (the trainer without ZeRO,
    and under ZeRO before 2026-11-30): the host waits for the end of each forward."""
    from dsfm.eval import nmse
    from dsfm.runtime.nonfinite import guard

    x, ids, bcs, y = inputs
    fused = bool(opt.defaults.get("fused"))

    def step():
        loss = nmse(model(x, ids, bcs), y)
        if check_loss == "read":
            if not bool(torch.isfinite(loss.detach())):
                raise RuntimeError("non-finite loss")
        elif check_loss:
            loss, _ = guard(loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if fused:           # None: a step sharing `opt` without the guard skips nothing
            opt.found_inf = (torch.logical_not(torch.isfinite(norm)).float()
                             if check_loss is True else None)
        opt.step()

    return step


def engine_step(engine, inputs, check_loss: bool = False):
    """The same step through a DeepSpeed engine (its optimizer and clipping). `check_loss`:
    the trainer's guard of a non-finite loss where the engine's step skips a non-finite norm
    (ZeRO), no host read (`dsfm.runtime.nonfinite`)."""
    from dsfm.eval import nmse
    from dsfm.runtime.nonfinite import guard, skips_nonfinite_updates

    x, ids, bcs, y = inputs
    why = skips_nonfinite_updates(engine) if check_loss else None
    if why is not None:
        raise RuntimeError(f"the benchmark's engines skip non-finite updates in their step: {why}")

    missed = torch.zeros(1, device=engine.device, dtype=torch.float64)

    def step():
        loss = nmse(engine(x, ids, bcs), y)
        if check_loss:      # and the trainer's device count of losses not skipped
            loss, finite = guard(loss)
            missed.add_(torch.logical_not(finite))
        engine.backward(loss)
        engine.step()

    return step


def graphed(step, model, opt, loss_fn, inputs):
    """The whole plain-PyTorch step (forward, backward, clipping, fused AdamW) captured once as
    a CUDA graph and replayed: the host issues one launch per step instead of thousands, which
    shows how much of a step is host overhead (static shapes: one graph per input shape)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the graph wrapper needs CUDA")
    x, ids, bcs, y = inputs
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):           # warm-up off the default stream, as capture wants
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    # a step that synchronizes cannot be captured: one more eager step under the sync debug
    # mode names the operator that would, instead of a failed capture
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    try:
        with torch.cuda.graph(graph):
            loss = loss_fn(model(x, ids, bcs), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    except BaseException:
        # a failed capture leaves its side stream current (torch.cuda.graph's exit raises
        # before it restores the stream): every later variant would run on it
        torch.cuda.set_stream(torch.cuda.default_stream())
        raise
    return graph.replay


LAYOUTS = ("tokens", "tokens_every", "channels_first")
COMPILE_MODES = ("default", "reduce-overhead")


def marked(step):
    """`step` beginning with torch.compiler.cudagraph_mark_step_begin(): compiled in
    "reduce-overhead" mode, the blocks replay CUDA graphs whose outputs the next replay
    overwrites; a training loop says where each iteration starts, so that the graphs of one
    step may reuse the memory of the one before."""
    def run():
        torch.compiler.cudagraph_mark_step_begin()
        step()
    return run


def run_variant(size: str, wrapper: str, numerics: str, args, device,
                layout: str = "tokens", attention: str = "fused",
                backward_matmuls: str = "autograd") -> dict:
    from dsfm.eval import nmse
    from dsfm.models.avit import avit

    cuda = device.type == "cuda"
    # what earlier variants left allocated (none, if they were torn down): counted in the peak
    leftover = torch.cuda.memory_allocated() / 2 ** 30 if cuda else None
    if numerics not in NUMERICS:
        raise ValueError(f"numerics {numerics!r}: one of {', '.join(NUMERICS)}")
    # fp32: strict, as dsfm trains (train.tf32 false); tf32: matmuls and convolutions;
    # torch: PyTorch's defaults (matmuls fp32, cuDNN convolutions TF32), which a script that
    # sets nothing runs with, MPP's reference code perhaps among them; 3xtf32: strict fp32,
    # the blocks' projections and MLP as three TF32 products each (AViTConfig.fp32_matmuls),
    # MFU against the fp32 peak, as for fp32
    torch.backends.cuda.matmul.allow_tf32 = numerics == "tf32"
    torch.backends.cudnn.allow_tf32 = numerics in ("tf32", "torch")
    batch = args.batch if args.batch else default_batch(size)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, args.frames, args.fields, args.res, args.res, generator=g)
    y = torch.randn(batch, args.fields, args.res, args.res, generator=g)
    ids = torch.arange(args.fields)
    bcs = torch.full((batch, 2, 2), 2.0)   # stays on the host, as the trainer passes the
    x, y, ids = (t.to(device) for t in (x, y, ids))   # loader's bcs_host: fused attention
    with torch.device(device):          # initialised where it runs: L builds in seconds
        model = avit(size, FIELD_COLUMNS, drop_path=0.0, attention=attention,
                     backward_matmuls=backward_matmuls,
                     fp32_matmuls="3xtf32" if numerics == "3xtf32" else "native",
                     width=args.width)
    if layout == "tokens_every":        # the last block on every frame, as MPP's code runs it
        model.skip_unused_frames = False
    model.checkpoint_above_tokens = args.checkpoint_above_tokens
    if layout == "channels_first":      # MPP's formulation of the same model and parameters
        from perf.mpp_layout import ChannelsFirst
        model = ChannelsFirst(model)
    key = (size, batch, args.frames, args.fields, args.res)
    if key not in _FLOPS:               # the same for every wrapper, numerics, layout,
        _FLOPS[key] = step_flops(model, x)     # attention, backward_matmuls and compilation:
    flops = _FLOPS[key]                        # the model's (`step_flops`), counted once
    compile_s = new_graphs = compiled_vs_eager = None
    if args.compile:                    # regional: the blocks, compiled on the first step
        from torch._dynamo.utils import counters
        with torch.no_grad():           # the same loss eager, to check the compiled code
            eager = nmse(model(x, ids, bcs), y)
        model.compile_blocks(**({} if args.compile_mode == "default"
                                 else {"mode": args.compile_mode}))
        before = counters["stats"]["unique_graphs"]
        sync()
        t0 = time.perf_counter()
        loss = nmse(model(x, ids, bcs), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync()
        compile_s = time.perf_counter() - t0
        compiled_vs_eager = abs(float(loss.detach()) / float(eager) - 1)
        # graphs compiled by this first step: none when an earlier variant of the same shape
        # already compiled them (dynamo's cache outlives the model; it guards on the matmul
        # TF32 flag, not on cuDNN's, which convolutions read when they run)
        new_graphs = counters["stats"]["unique_graphs"] - before
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        peak_of = "CUDA memory allocated, this variant"
    else:
        peak_of = ("resident memory of the process (VmHWM), this variant" if reset_host_peak()
                   else "resident memory of the process since it started (ru_maxrss)")

    zero = fused_norm = local = whole = engine = None
    if wrapper in ("plain", "plainread", "graph"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda,
                                capturable=wrapper == "graph")
        step = issue = plain_step(model, opt, (x, ids, bcs, y))
        if wrapper == "graph":          # the whole step captured: it cannot read the loss
            step = issue = graphed(step, model, opt, nmse, (x, ids, bcs, y))
        else:
            step = plain_step(model, opt, (x, ids, bcs, y),
                              check_loss="read" if wrapper == "plainread" else True)
    else:
        from dsfm.runtime.engine import build_engine
        from dsfm.runtime.zero_blocks import whole_blocks
        from dsfm.runtime.zero_local import is_local
        from dsfm.runtime.zero_norm import is_fused
        stage = {"zero2": 2, "zero2hk": 2, "zero2nc": 2, "zero2ds": 2, "zero3": 3,
                 "zero3mod": 3, "zero3keep": 3}[wrapper]
        config = engine_config(batch, stage)
        if wrapper == "zero2nc":        # gradients left in place until the step: one copy per
            config["zero_optimization"]["contiguous_gradients"] = False   # parameter less
        if wrapper == "zero3keep":      # every parameter held from its forward to its backward
            config["zero_optimization"].update(stage3_prefetch_bucket_size=5e7,
                                               stage3_max_reuse_distance=1e9)
        # zero2ds: DeepSpeed's own clipping norm, two operators per parameter tensor;
        # zero2hk, zero2nc: DeepSpeed's per-parameter gradient hooks and buckets, which a
        # one-rank ZeRO-2 engine otherwise goes without (dsfm.runtime.zero_local);
        # zero3mod: ZeRO-3 gathering module by module inside the blocks (DeepSpeed's own),
        # where zero3 gathers each block as one unit (dsfm.runtime.zero_blocks)
        engine, _, _ = build_engine(model, config, fused_grad_norm=wrapper != "zero2ds",
                                    local_gradients=wrapper not in ("zero2hk", "zero2nc"),
                                    whole_blocks=wrapper != "zero3mod")
        zero, fused_norm = config["zero_optimization"], is_fused(engine)
        local, whole = is_local(engine), whole_blocks(engine.module)
        step = engine_step(engine, (x, ids, bcs, y), check_loss=True)
        issue = engine_step(engine, (x, ids, bcs, y))
    if args.compile and args.compile_mode == "reduce-overhead":
        step, issue = marked(step), marked(issue)

    row = {"size": size, "wrapper": wrapper, "numerics": numerics, "layout": layout,
           "attention": attention, "backward_matmuls": backward_matmuls, "batch": batch,
           "zero_optimization": zero,
           "compile_mode": args.compile_mode if args.compile else None,
           "fused_grad_norm": fused_norm, "local_gradients": local, "whole_blocks": whole,
           "leftover_gib": leftover, "first_step_s": compile_s,
           "compiled_vs_eager_loss": compiled_vs_eager,
           "first_step_new_graphs": new_graphs, "tflop_per_step": flops / 1e12,
           "peak_mem_of": peak_of}
    try:
        return _timed(step, issue, row, args, cuda)
    finally:
        if engine is not None:
            try:
                teardown(engine)
                row["engine_torn_down"] = True
            except Exception:           # say so, without hiding the variant's own error
                traceback.print_exc()


def reset_host_peak() -> bool:
    """Set this process's peak resident memory (Linux's VmHWM) to what it holds now, so that
    a variant's peak leaves out the variants before it (as torch.cuda.reset_peak_memory_stats
    does on a GPU); False where the kernel does not allow it. The C library's allocator first
    returns the memory it keeps free to the system (glibc's malloc_trim), which would
    otherwise count in the next variant's peak too."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):            # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def host_peak_gib() -> float:
    """Peak resident memory of this process in GiB: since `reset_host_peak`, or (where there is
    no /proc) since the process started."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2 ** 20        # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # kB on Linux


def teardown(engine) -> None:
    """Free a DeepSpeed engine's memory before the next variant. Its ZeRO gradient hooks hold
    the optimizer from C++ (the garbage collector cannot break that cycle), and ZeRO-3 leaves
    the root module on a module-level stack: without this every later variant's peak memory
    counted the engines before it (the first H200 run's plain rows: L 37.9 GiB in fp32, 53.4 in
    TF32, after fp32's ZeRO variants)."""
    from deepspeed.runtime.zero import parameter_offload
    try:
        engine.destroy()
    finally:
        parameter_offload.FWD_MODULE_STACK.clear()


def _timed(step, issue, row: dict, args, cuda: bool) -> dict:
    """Warm-up steps, then the timed steps twice. First `issue` (the step without the loss
    guard or read) one by one, each between two device synchronizations: the host's time to
    issue a step, and the step as the first H200 run timed it. Then `step` running freely as in
    training, the host issuing the next step while the device finishes the last as far as the
    step lets it (ms/step: their mean, between two synchronizations): each guards its loss on
    the device as dsfm's trainer does under ZeRO (`plainread`: reads it back before the
    backward instead); beyond that plain PyTorch never waits for the device and DeepSpeed's
    ZeRO does (it reads the gradient norm back), so timing each step between synchronizations
    took from plain overlap that training gives it, and made ZeRO's overhead look smaller."""
    for _ in range(args.warmup):
        step()
    times, issued = [], []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        issue()
        t1 = time.perf_counter()        # the host has issued the step (kernels still queued)
        sync()
        times.append(time.perf_counter() - t0)
        issued.append(t1 - t0)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    ms = 1e3 * (time.perf_counter() - t0) / args.steps
    name = torch.cuda.get_device_name() if cuda else "CPU"
    # "torch" mixes fp32 matmuls with TF32 convolutions (stem and decoder; channels_first: the
    # projections too, half the FLOPs): neither peak fits
    numerics = row["numerics"]
    peak = peak_tflops(name, numerics) if cuda and numerics != "torch" else None
    tflops = row["tflop_per_step"] / (ms / 1e3)
    row.update({"ms_per_step": ms, "samples_per_sec": row["batch"] / (ms / 1e3),
                "synced_ms_per_step": 1e3 * statistics.median(times),
                "host_ms_per_step": 1e3 * statistics.median(issued),
                "tflops": tflops, "mfu": tflops / peak if peak else None,
                "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2 ** 30) if cuda else
                host_peak_gib()})
    if args.profile:                    # where the GPU time goes, after the timed steps
        keep = None
        if args.trace_dir:
            os.makedirs(args.trace_dir, exist_ok=True)
            kind = "" if row["attention"] == "fused" else "_" + row["attention"]
            if row["backward_matmuls"] != "autograd":
                kind += "_" + row["backward_matmuls"]
            keep = os.path.join(args.trace_dir, f"{row['size']}_{numerics}_{row['wrapper']}_"
                                f"{row['layout']}{kind}"
                                f"{'_compiled' if args.compile else ''}"
                                f"{'_graphs' if args.compile_mode == 'reduce-overhead' else ''}"
                                ".json.gz")
        profile_into(row, step, args.profile, keep)
    return row


def _measure(size, wrapper, num, layout, attention, backward, args, device, rows,
             failed) -> None:
    """One variant into `rows`, or its error into `failed`: one variant's failure (a graph
    capture, say) must not cost the rest of a scarce GPU run."""
    label = f"{size:3s} {num:6s} {wrapper:{WW}s} {LABEL[layout]:6s} {attention:6s} {backward:8s}"
    try:
        rows.append(run_variant(size, wrapper, num, args, device, layout, attention, backward))
    except Exception as exc:
        traceback.print_exc()
        failed.append({"size": size, "numerics": num, "wrapper": wrapper, "layout": layout,
                       "attention": attention, "backward_matmuls": backward,
                       "error": f"{type(exc).__name__}: {exc}"})
        print(f"  {label} failed: {failed[-1]['error']}", file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, meta(args, rows, failed))
        return
    finally:
        try:
            gc.collect()                # the variant's model and optimizer are gone
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:               # a sticky CUDA error: the next variant will say so
            traceback.print_exc()
    first = rows[-1]["first_step_s"]
    print(f"  {label} {rows[-1]['ms_per_step']:9.1f} ms"
          + (f" (first step {first:.1f} s, {rows[-1]['first_step_new_graphs']} graphs "
             f"compiled, loss {rows[-1]['compiled_vs_eager_loss']:.1e} from eager's"
             + (" LOSS DIFFERS" if rows[-1]["compiled_vs_eager_loss"] > 1e-3 else "") + ")"
             if first is not None else ""), file=sys.stderr, flush=True)
    if args.json:                       # kept after every variant: a cut-short run still has
        write_json(args.json, meta(args, rows, failed))       # its rows


LABEL = {"tokens": "tokens", "tokens_every": "tk-all", "channels_first": "cf"}


def _times(ratio: float | None) -> str:
    return "" if ratio is None else f"{ratio:.2f}x"


def mpp_verdict(card: str, rows: list[dict]) -> list[str]:
    """Where rows compare with MPP's own code on this card: what the column means, and for
    B and L in each of the reference's numerics the best row against issue 4's 2x."""
    if not any(r.get("vs_mpp") for r in rows):
        return []
    lines = [f"vs MPP: samples/s over MPP's own AViT's on an {mpp_card(card)} at the same shapes "
             "(docs/mpp_anchors.md), each numerics against its own"]
    for size in ("B", "L"):
        for numerics in ("fp32", "tf32"):
            mine = [r for r in rows if r["size"] == size and r.get("vs_mpp")
                    and r["numerics"] == numerics]
            if not mine:
                continue
            best = max(mine, key=lambda r: r["vs_mpp"])
            what = ", ".join((best["wrapper"], best["attention"], LABEL[best["layout"]],
                              best["backward_matmuls"]))
            lines.append(f"issue 4, 2x MPP: {size} {numerics}: best {best['vs_mpp']:.2f}x "
                         f"({best['samples_per_sec']:.2f} against {best['mpp_samples_per_sec']}"
                         f" samples/s; {what}): "
                         + ("met" if best["vs_mpp"] >= 2 else "not met"))
    return lines


def model_of(r: dict) -> tuple:
    """The rows a wrapper is compared within: the same model, numerics and formulation."""
    return r["size"], r["numerics"], r["layout"], r["attention"], r["backward_matmuls"]


def plain_ms(rows: list[dict]) -> dict[tuple, float]:
    """Plain PyTorch's ms/step per model (`model_of`): what the other wrappers compare with."""
    return {model_of(r): r["ms_per_step"] for r in rows if r["wrapper"] == "plain"}


def zero2_verdict(card: str, rows: list[dict]) -> list[str]:
    """On a GPU, each one-rank ZeRO-2 row (zero2: dsfm's engine, as dsfm/train.py builds it)
    against plain PyTorch's step of the same model in the same run: issue 4's <= 3 %."""
    if card == "CPU":
        return []
    plain = plain_ms(rows)
    lines = []
    for r in rows:
        base = plain.get(model_of(r))
        if r["wrapper"] != "zero2" or not base:
            continue
        over = 100 * (r["ms_per_step"] / base - 1)
        graphs = (" (blocks as CUDA graphs)" if r.get("compile_mode") == "reduce-overhead"
                  else "")
        lines.append(f"issue 4, ZeRO-2 <= 3 % over plain: {r['size']} {r['numerics']} "
                     f"{r['attention']} {LABEL[r['layout']]} {r['backward_matmuls']}{graphs}: "
                     f"{r['ms_per_step']:.1f} against {base:.1f} ms, {over:+.1f} %: "
                     + ("met" if over <= 3 else "not met"))
    return lines


def verdicts_from(paths: list[str]) -> list[str]:
    """Issue 4's verdict lines from `--json` files of earlier runs (a run cut at its time limit
    keeps its finished rows there but never prints them): each file's rows compared with MPP's
    code under that file's shapes and card, the best row of all files per size and numerics,
    and each file's zero2 rows against its own plain rows (rows of one run only)."""
    rows, zero2 = [], []
    card = None
    for path in paths:
        with open(path) as fh:
            run = json.load(fh)
        shapes = argparse.Namespace(width=run["width"], res=run["res"], frames=run["frames"],
                                    fields=run["fields"])
        compare_with_mpp(run["device"], run["rows"], shapes)
        rows += run["rows"]
        zero2 += zero2_verdict(run["device"], run["rows"])
        card = card or (run["device"] if mpp_card(run["device"]) else None)
    return (mpp_verdict(card, rows) if card else []) + zero2


def _busy(row: dict) -> str:
    """The GPU's busy time in the profiled steps against the unprofiled step time (the
    profiler's host work lengthens a profiled step)."""
    busy = row.get("profile", {}).get("busy_ms")
    return f"{min(100.0, 100 * busy / row['ms_per_step']):.1f}%" if busy is not None else "n/a"


def check_shapes(ap: argparse.ArgumentParser, res: int, fields: int) -> None:
    """--res and --fields the AViT takes, else one argparse error before any process group."""
    from dsfm.models.avit import PATCH, grid_problem

    if grid_problem((res, res)):
        ap.error(f"--res {res}: the AViT takes a multiple of its patch, {PATCH}, with two "
                 f"patches at least ({2 * PATCH}, {3 * PATCH}, ...)")
    if fields > FIELD_COLUMNS:
        ap.error(f"--fields {fields}: at most the model's {FIELD_COLUMNS} field columns")


def check_width(ap: argparse.ArgumentParser, width: int | None) -> None:
    """--width (None: the size's own) the AViT's stem takes, else one argparse error."""
    if width and width % 4:
        ap.error(f"--width {width}: a multiple of 4 (the stem's first layer has width/4 "
                 "channels)")


def meta(args, rows: list[dict], failed: list[dict]) -> dict:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return {"device": name, "frames": args.frames, "fields": args.fields, "res": args.res,
            "compile": args.compile, "compile_mode": args.compile_mode, "blas": args.blas,
            "width": args.width, "checkpoint_above_tokens": args.checkpoint_above_tokens,
            "rows": rows, "failed": failed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="python -m perf.train_bench",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="Ti,S,B,L")
    ap.add_argument("--wrappers", default=None,
                    help="plain, zero2, zero3, graph (plain captured as one CUDA graph; CUDA), "
                    "plainread (plain with the loss read on the host before each backward, as "
                    "the trainer did: the host waits for each forward), "
                    "zero2hk (ZeRO-2 through DeepSpeed's per-parameter gradient hooks and "
                    "buckets, which one rank's zero2 goes without: dsfm.runtime.zero_local), "
                    "zero2nc (zero2hk with contiguous_gradients off: about 400 copies a step "
                    "fewer), zero2ds (ZeRO-2 with DeepSpeed's own clipping norm, "
                    "two operators per parameter tensor, instead of dsfm's multi-tensor one), "
                    "zero3mod (ZeRO-3 gathering the parameters module by module inside the "
                    "blocks, as DeepSpeed does, where zero3 gathers each block as one unit: "
                    "dsfm.runtime.zero_blocks), zero3keep (zero3 with DeepSpeed's own "
                    "prefetch and reuse distance, 5e7 and 1e9, under which every parameter "
                    "stays gathered from its forward to its backward, where zero3.json gathers "
                    "one block at a time: docs/training.md); "
                    "default plain,zero2,zero3 (with --compile: plain,zero2)")
    ap.add_argument("--numerics", default=None, help="fp32 (strict), tf32, torch (PyTorch's "
                    "defaults: matmuls fp32, convolutions TF32), 3xtf32 (strict fp32, the "
                    "blocks' projections and MLP as three TF32 products each: "
                    "AViTConfig.fp32_matmuls; MFU against the fp32 peak); default: fp32,tf32 "
                    "on CUDA, fp32 on CPU")
    ap.add_argument("--layouts", default="tokens",
                    help="tokens (dsfm's blocks: channels last, projections as matrix "
                    "multiplies; the last block on the frame decoded only), tokens_every (the "
                    "same, the last block on every frame: AViT.skip_unused_frames off), "
                    "channels_first (MPP's formulation of the same model: 1x1 "
                    "convolutions; perf.mpp_layout)")
    ap.add_argument("--attention", default="fused",
                    help="fused (one attention call per batch of sequences), packed (short "
                    "sequences packed into ones of up to 64 under a block-diagonal bias: fuller "
                    "tiles for the CUDA kernels), direct (sequences of up to 32 written out; "
                    "with --compile fused by the compiler, in fp32); the token blocks only; "
                    "fused,packed,direct: each, as separate rows")
    ap.add_argument("--backward-matmuls", default="autograd",
                    help="how the blocks' projections and MLP form their backward's matrix "
                    "multiplies (AViTConfig.backward_matmuls): autograd (F.linear's own: NN "
                    "and NT layouts), tn_dgrad (the input's gradient in the forward's TN "
                    "layout), tn (both gradients); the token blocks only; a comma list: each, "
                    "as separate rows")
    ap.add_argument("--blas", choices=("cublas", "cublaslt"), default=None,
                    help="the BLAS library PyTorch prefers for matrix multiplies on CUDA for the "
                    "whole run (torch.backends.cuda.preferred_blas_library; default: PyTorch's "
                    "choice, cuBLAS): in strict fp32 cuBLAS took SIMT kernels for most of the "
                    "backward's (H200, 2026-11-30); CUDA only")
    ap.add_argument("--width", type=positive_int, default=None, metavar="DIM",
                    help="each size's blocks, modules and parameter tensors at width DIM with "
                    "one head (a multiple of 4): its arithmetic made negligible, so that the "
                    "host's work per module and per parameter tensor sets the pace (what a "
                    "wrapper adds to a host-bound step); default: the size's own width")
    ap.add_argument("--checkpoint-above-tokens", type=non_negative_int, default=None,
                    metavar="N", help="the blocks of micro-batches of more than N tokens "
                    "recomputed in the backward (model.checkpoint_above_tokens); default: never")
    ap.add_argument("--batch", type=non_negative_int, default=0, help="default (0): 8, L: 4")
    ap.add_argument("--frames", type=positive_int, default=16)
    ap.add_argument("--fields", type=positive_int, default=4,
                    help=f"fields present, of the model's {FIELD_COLUMNS} field columns")
    ap.add_argument("--res", type=positive_int, default=128)
    ap.add_argument("--steps", type=positive_int, default=10)
    ap.add_argument("--warmup", type=non_negative_int, default=3)
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the space-time blocks (AViT.compile_blocks)")
    ap.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                    help="with --compile: torch.compile's mode; reduce-overhead replays each "
                    "compiled block's forward and backward as CUDA graphs (CUDA; the host then "
                    "issues one launch per graph instead of one per kernel)")
    ap.add_argument("--profile", type=steps_arg, default=0, metavar="N",
                    help="after the timed steps, profile N more (torch.profiler) and report "
                    "the GPU's busy share of the step and its kernel time by category")
    ap.add_argument("--trace-dir", default=None,
                    help="with --profile: keep each variant's device events there (.json.gz)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--verdicts", nargs="+", default=None, metavar="JSON",
                    help="measure nothing: print issue 4's verdict lines from earlier runs' "
                    "--json files (all their rows against MPP's code; ZeRO-2 against plain "
                    "within each file), as a run cut short by a time limit never printed them")
    args = ap.parse_args(argv)
    if args.verdicts:
        try:
            print("\n".join(verdicts_from(args.verdicts)))
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--verdicts: {e}")
        return 0
    if args.wrappers is None:
        args.wrappers = "plain,zero2" if args.compile else "plain,zero2,zero3"
    if args.trace_dir and not args.profile:
        ap.error("--trace-dir needs --profile N")
    cuda = torch.cuda.is_available()
    if args.blas and not cuda:
        ap.error("--blas chooses a CUDA BLAS library: this machine has no CUDA device")
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    numerics = (args.numerics or ("fp32,tf32" if cuda else "fp32")).split(",")
    from dsfm.models.avit import SIZES
    from dsfm.models.layers import ATTENTION, BACKWARD_MATMULS
    for flag, given, known in (("--numerics", numerics, NUMERICS),
                               ("--attention", args.attention.split(","), tuple(ATTENTION)),
                               ("--backward-matmuls", args.backward_matmuls.split(","),
                                BACKWARD_MATMULS),
                               ("--wrappers", args.wrappers.split(","), WRAPPERS),
                               ("--sizes", args.sizes.split(","), tuple(SIZES)),
                               ("--layouts", args.layouts.split(","), LAYOUTS)):
        if set(given) - set(known):
            ap.error(f"{flag}: one or more of {', '.join(known)}")
    check_width(ap, args.width)
    if args.compile_mode != "default" and not args.compile:
        ap.error(f"--compile-mode {args.compile_mode} is a mode of --compile, which is not given")
    if args.compile and {"zero3", "zero3mod", "zero3keep"} & set(args.wrappers.split(",")):
        ap.error("--compile with zero3: ZeRO-3 gathers parameters in module hooks that "
                 "torch.compile would trace (dsfm/train.py refuses model.compile with ZeRO-3 "
                 "too)")
    if args.compile and "channels_first" in args.layouts.split(","):
        ap.error("--compile compiles the token blocks; the channels_first reference runs "
                 "eager only")
    # the channels_first reference is MPP's formulation: the blocks' defaults only
    for flag, given, default, what, runs in (
            ("--attention", args.attention, "fused", "attention", "fused"),
            ("--backward-matmuls", args.backward_matmuls, "autograd", "backward",
             "autograd's")):
        if "channels_first" in args.layouts.split(",") and given != default:
            ap.error(f"{flag} {given} changes the token blocks' {what}; the channels_first "
                     f"reference runs {runs} only (leave it out of --layouts, or run it "
                     "separately)")
    if "3xtf32" in numerics and (set(args.backward_matmuls.split(",")) != {"autograd"}
                                 or "channels_first" in args.layouts.split(",")):
        ap.error("--numerics 3xtf32 computes the token blocks' products its own way: with "
                 "--backward-matmuls autograd and without the channels_first layout only (run "
                 "those separately)")
    check_shapes(ap, args.res, args.fields)

    from dsfm.runtime.engine import finish, init_process_group

    env = init_process_group()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rows, failed = [], []
    plan = [(size, wrapper, num, layout, attention, backward) for size in args.sizes.split(",")
            for num in numerics for layout in args.layouts.split(",")
            for attention in args.attention.split(",")
            for backward in args.backward_matmuls.split(",")
            for wrapper in args.wrappers.split(",")]
    # captured CUDA graphs last: the profiler, shut down after each variant's profile, is
    # started again after a capture only for them (a restart after graph capture has crashed
    # CUDA 12 builds; a crash then costs only the graph rows, the others are in the JSON)
    for variant in sorted(plan, key=lambda v: v[1] == "graph"):
        _measure(*variant, args, device, rows, failed)

    name = torch.cuda.get_device_name() if cuda else "CPU"
    compare_with_mpp(name, rows, args)
    print(f"AViT training step on {name}: {args.frames} frames, {args.fields} fields, "
          f"{args.res}x{args.res}, 12 field columns, nMSE, AdamW, clip 1.0"
          + (f", each size at width {args.width} with one head (host overheads)"
             if args.width else "")
          + (f", blocks recomputed above {args.checkpoint_above_tokens:,} tokens"
             if args.checkpoint_above_tokens is not None else "")
          + (", space-time blocks compiled" if args.compile else "")
          + (f" ({args.compile_mode})" if args.compile and args.compile_mode != "default"
             else "")
          + (f", BLAS {args.blas}" if args.blas else ""))
    print("ms/step: steps running freely, each guarding its loss on the device as dsfm's "
          "trainer does under ZeRO (plainread: reading it back before the backward instead; "
          "the CUDA graph: neither); synced: each step without either between two device "
          "synchronizations (as the first H200 run timed), host: the time to issue it")
    head = (f"{'size':4s} {'num':6s} {'wrapper':{WW}s} {'layout':6s} {'attn':6s} {'bwd mm':8s} "
            f"{'batch':>5s} "
            f"{'ms/step':>9s} "
            f"{'samples/s':>9s} {'vs MPP':>6s} {'TFLOP/s':>8s} {'MFU':>6s} {'peak GiB':>8s} "
            f"{'vs plain':>8s} "
            f"{'synced':>8s} {'host ms':>8s}" + (f" {'GPU busy':>8s}" if args.profile else ""))
    print(head)
    print("-" * len(head))
    plain = plain_ms(rows)
    order = {variant: i for i, variant in enumerate(plan)}
    rows.sort(key=lambda r: order[(r["size"], r["wrapper"], r["numerics"], r["layout"],
                                   r["attention"], r["backward_matmuls"])])
    for r in rows:
        base = plain.get(model_of(r))
        over = f"{100 * (r['ms_per_step'] / base - 1):+.1f}%" if base else ""
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['size']:4s} {r['numerics']:6s} {r['wrapper']:{WW}s} {LABEL[r['layout']]:6s} "
              f"{r['attention']:6s} {r['backward_matmuls']:8s} {r['batch']:5d} "
              f"{r['ms_per_step']:9.1f} {r['samples_per_sec']:9.2f} {_times(r['vs_mpp']):>6s} "
              f"{r['tflops']:8.2f} "
              f"{mfu:>6s} {r['peak_mem_gib']:8.2f} {over:>8s} {r['synced_ms_per_step']:8.1f} "
              f"{r['host_ms_per_step']:8.1f}"
              + (f" {_busy(r):>8s}" if args.profile else ""))
    for line in mpp_verdict(name, rows) + zero2_verdict(name, rows):
        print(line)
    if args.profile:
        print(f"profiled ({args.profile} steps each): GPU busy share of the step and kernel "
              "time per step (ms) by category; the table's GPU busy is the busy time against "
              "the unprofiled ms/step")
        for r in rows:
            print(f"  {r['size']:3s} {r['numerics']:6s} {r['wrapper']:{WW}s} "
                  f"{LABEL[r['layout']]:6s} {r['attention']:6s} {r['backward_matmuls']:8s} "
                  f"{describe_row(r, r['ms_per_step'])}")
    for f in failed:
        print(f"{f['size']:4s} {f['numerics']:6s} {f['wrapper']:{WW}s} {LABEL[f['layout']]:6s} "
              f"{f['attention']:6s} {f['backward_matmuls']:8s} failed: {f['error']}")
    if args.json:
        write_json(args.json, meta(args, rows, failed))
    finish(env)
    return 1 if failed else 0


if __name__ == "__main__":
    exit_process(main())
