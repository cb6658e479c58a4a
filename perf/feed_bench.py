"""python -m perf.feed_bench: is the AViT training step fed? Data wait against step time.

Runs the real training step (AViT of a given size in a single-rank DeepSpeed engine, fp32,
ZeRO-2, AdamW, clipping) fed two ways in the same process:
  (a) WellLoader: reader processes, shared ring, pinned copies, normalization on the device;
  (b) resident: one batch per dataset prepared beforehand on the device (no data path at all),
      the bound a loader can at best reach.
and reports per-step time, samples/s, and the share of step time spent waiting for data in (a)
(WellLoader's own wait clock). The target (issue 3): data wait under 2 % of the step time with
AViT-B on a GPU. A feed that fails is reported in its row and the others are still
measured; the exit status is then 1, and a line on stderr names each failed feed and why.

    python -m perf.feed_bench --base /tmp/small --size B --batch 8 --steps 40 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import time
import traceback

import torch

from dsfm.helpfmt import HelpFormatter
from dsfm.runtime.dist import exit_process
from perf.affinity import pin_threads
from perf.cli import avit_size, non_negative_int, positive_int, well_datasets
from perf.gpu_trace import describe_row, profile_into, steps_arg
from perf.report import write_json
from perf.train_bench import sync


def pin(reader_pids: list[int]) -> dict:
    """The training process (all its threads) to the first allowed CPU and its hyperthread
    siblings, the readers to every other allowed CPU: does a reader on the trainer's core (or
    on its sibling) slow a host-bound step?"""
    cpus = sorted(os.sched_getaffinity(0))
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpus[0]}/topology/thread_siblings_list") as fh:
            siblings = set()
            for part in fh.read().strip().split(","):
                lo, _, hi = part.partition("-")
                siblings.update(range(int(lo), int(hi or lo) + 1))
    except OSError:
        siblings = {cpus[0]}
    trainer = sorted(c for c in cpus if c in siblings)
    readers = [c for c in cpus if c not in siblings] or cpus
    threads_before = torch.get_num_threads()
    torch.set_num_threads(len(trainer))   # an intra-op pool wider than its CPUs spins on them
    pin_threads("self", trainer)
    for pid in reader_pids:
        pin_threads(pid, readers)
    threads = {int(t): sorted(os.sched_getaffinity(int(t)))
               for t in os.listdir("/proc/self/task")}
    return {"trainer": trainer, "readers": readers, "trainer_threads": len(threads),
            "torch_threads": [threads_before, torch.get_num_threads()],
            "trainer_threads_pinned": all(v == trainer for v in threads.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter, prog="python -m perf.feed_bench",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="Well base directory (dsfm.sim preset)")
    ap.add_argument("--datasets", nargs="*", default=None)
    ap.add_argument("--size", default="B", type=avit_size, help="AViT size: Ti, S, B, L")
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--n-in", type=positive_int, default=4)
    ap.add_argument("--workers", type=positive_int, default=4)
    ap.add_argument("--steps", type=positive_int, default=40)
    ap.add_argument("--warmup", type=non_negative_int, default=5)
    ap.add_argument("--pin", action="store_true",
                    help="then run both feeds again with the training process pinned to the "
                    "first CPU and its hyperthread siblings and the readers to the other CPUs")
    ap.add_argument("--profile", type=steps_arg, default=0, metavar="N",
                    help="after each feed's timed steps, profile N more (torch.profiler): the "
                    "GPU's busy share and kernel time per step, to tell a slower card from an "
                    "idler one")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from dsfm.data.fields import FieldVocabulary
    from dsfm.data.prefetch import WellLoader
    from dsfm.eval import nmse
    from dsfm.models.avit import avit, n_parameters
    from dsfm.runtime.engine import build_engine, finish, init_process_group
    from dsfm.runtime.nonfinite import guard
    from perf.train_bench import engine_config

    paths = well_datasets(ap, args.base, args.datasets or None)   # before the process group
    env = init_process_group()
    vocab = FieldVocabulary()
    loader = WellLoader(paths, batch_size=args.batch, n_steps_input=args.n_in,
                        num_workers=args.workers, seed=0, vocabulary=vocab,
                        same_dataset_across_ranks=True)
    torch.manual_seed(0)
    model = avit(args.size, len(vocab), drop_path=0.0)
    engine, _, _ = build_engine(model, engine_config(args.batch, 2))

    def step(name, x, ids, bcs, y) -> None:
        scale, shift = loader.affine(name)  # the trainer's loss, in physical units
        loss = nmse(engine(x, ids, bcs), y[:, 0], scale=scale, shift=shift)
        loss, _ = guard(loss)               # as the trainer does: no host read
        engine.backward(loss)
        engine.step()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU ({os.cpu_count()} cores)"
    print(f"AViT-{args.size} ({n_parameters(model) / 1e6:.1f} M parameters), batch "
          f"{args.batch}, {args.n_in} input steps, {len(paths)} datasets, {args.workers} "
          f"readers, {device}")
    print(f"{'feed':18s} {'step ms (median)':>17s} {'samples/s':>10s} {'data wait':>10s} "
          f"{'next() ms':>10s} {'next() share':>12s} {'wait p95/max ms':>16s} "
          f"{'steps waiting':>13s} {'readers busy':>12s}", flush=True)
    it = iter(loader)
    resident, unread = {}, None
    try:
        for _ in range(4 * len(paths)):
            b = next(it)
            resident.setdefault(b.dataset, (b.dataset, b.x.clone(), b.field_ids.clone(),
                                            b.bcs_host.clone(),
                                            b.y.clone()))
            del b
    except Exception as exc:                 # no batches to feed: no feed can run
        traceback.print_exc()
        unread = ("not run: the first batches (kept for the resident feed) could not be "
                  f"read: {exc!r}")

    def measure(variant: str) -> dict:
        times, waits, nexts = [], [], []
        busy_before = began = last = 0.0
        # a loader variant first drains what the readers filled the ring with meanwhile, so
        # that its timed steps are fed as they come
        warmup = args.warmup + (loader.ring_slots if variant.startswith("WellLoader") else 0)
        # no synchronization between steps: the training thread may run ahead of the GPU as
        # in training (a step's time is the interval between the ends of consecutive steps;
        # the rate counts the timed steps from one synchronization to the next)
        for i in range(warmup + args.steps):
            if i == warmup:                 # the readers' time from the timed steps on
                sync()
                busy_before = sum(loader.read_s)
                began = last = time.perf_counter()
            t0 = time.perf_counter()
            if variant.startswith("WellLoader"):
                b = next(it)
                t_next = time.perf_counter() - t0
                step(b.dataset, b.x, b.field_ids, b.bcs_host, b.y)
                wait = loader.last_wait_s
                del b
            else:
                t_next = 0.0
                step(*resident[list(resident)[i % len(resident)]])
                wait = 0.0
            if i >= warmup:
                now = time.perf_counter()
                times.append(now - last)
                last = now
                waits.append(wait)
                nexts.append(t_next)
        sync()
        total = time.perf_counter() - began
        row = {"step_ms_median": 1e3 * statistics.median(times),
               "step_ms_mean": 1e3 * total / len(times),
               "samples_per_sec": args.batch * len(times) / total,
               "data_wait_share": sum(waits) / total,
               # the whole next() call: the wait plus the loader's bookkeeping on the training
               # thread (polling, launching copies and assembly)
               "next_ms_median": 1e3 * statistics.median(nexts),
               "next_share": sum(nexts) / total,
               # a steady small wait or a few long stalls: the distribution says
               "wait_ms_p95": 1e3 * sorted(waits)[math.ceil(0.95 * len(waits)) - 1],
               "wait_ms_max": 1e3 * max(waits),
               "steps_waiting": sum(w > 5e-4 for w in waits),
               # the readers' busy share of the timed steps' wall time (the wall time of
               # their reads, I/O waits included, over readers x time): how far ahead of the
               # trainer they are
               "readers_busy": (sum(loader.read_s) - busy_before) / (args.workers * total)}
        if args.profile:
            def fed(order=itertools.count()):
                if variant.startswith("WellLoader"):
                    b = next(it)
                    step(b.dataset, b.x, b.field_ids, b.bcs_host, b.y)
                else:
                    step(*resident[list(resident)[next(order) % len(resident)]])

            profile_into(row, fed, args.profile)
        return row

    rows, pinning = {}, None
    variants = ["resident", "WellLoader"]
    if args.pin:
        variants += ["resident pinned", "WellLoader pinned"]
    for variant in variants:
        if unread:
            rows[variant] = {"error": unread}
            print(f"{variant:18s} {unread}", flush=True)
            continue
        if variant.startswith("WellLoader") and loader._closed:
            rows[variant] = {"error": "not run: the loader failed in an earlier variant"}
            print(f"{variant:18s} {rows[variant]['error']}", flush=True)
            continue
        try:
            if variant.endswith("pinned") and pinning is None:
                pinning = pin(loader.worker_pids)
                print(f"pinned: the training process ({pinning['trainer_threads']} threads) on "
                      f"CPUs {pinning['trainer']}, readers on {pinning['readers']} (same "
                      "loader)")
            r = rows[variant] = measure(variant)
        except Exception as exc:             # one feed's failure: say so, measure the others
            traceback.print_exc()
            rows[variant] = {"error": repr(exc)}
            print(f"{variant:18s} failed: {exc!r}", flush=True)
            continue
        loaded = variant.startswith("WellLoader")
        print(f"{variant:18s} {r['step_ms_median']:17.1f} {r['samples_per_sec']:10.1f} "
              f"{100 * r['data_wait_share']:9.2f}% {r['next_ms_median']:10.2f} "
              f"{100 * r['next_share']:11.2f}% "
              + (f"{r['wait_ms_p95']:7.2f} / {r['wait_ms_max']:6.1f} "
                 f"{r['steps_waiting']:6d} of {args.steps:<4d} {100 * r['readers_busy']:11.1f}%"
                 if loaded else ""), flush=True)
    loader.close()
    ok = {k: r for k, r in rows.items() if "error" not in r}
    if args.profile:
        print(f"profiled ({args.profile} steps each, next() included):")
        for name, r in ok.items():
            print(f"  {name:18s} "
                  f"{describe_row(r, r['step_ms_median'], steady=name.startswith('resident'))}")
    ratio = None
    for suffix in ("", " pinned"):
        fed, res = ok.get("WellLoader" + suffix), ok.get("resident" + suffix)
        if fed and res:
            share = fed["samples_per_sec"] / res["samples_per_sec"]
            if not suffix:                   # the unpinned pair's, for the JSON
                ratio = share
            print(f"{suffix.strip() + ': ' if suffix else ''}WellLoader reaches "
                  f"{100 * share:.1f}% of the{suffix} resident-batch rate; data wait "
                  f"{100 * fed['data_wait_share']:.2f}% of step time (target < 2%)")
    if args.json:
        write_json(args.json, {"size": args.size, "batch": args.batch, "n_in": args.n_in,
                               "workers": args.workers, "device": device, "variants": rows,
                               "loader_over_resident": ratio, "pinning": pinning})
    finish(env)
    # a feed that failed or could not run: said in its row, and in the exit status (before,
    # 0 whatever had failed)
    failed = {name: r["error"] for name, r in rows.items() if "error" in r}
    for name, error in failed.items():
        print(f"failed: {name}: {error}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    exit_process(main())
