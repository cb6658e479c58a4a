"""One rank that ends with gloo's worker threads still holding tensors that have Python objects.

After a collective returns, gloo's thread may drop its reference to the tensors a moment later;
if that falls in the interpreter's teardown, the process aborts (`exit_process`'s docstring).
A finished run meets that moment rarely; this probe makes it certain: it leaves 300
all-reduces to the threads, unwaited, on tensors given a Python attribute (so that their
Python objects live as long as the C++ tensors), and returns at once.

    python tests/runtime/exit_probe.py --marker PATH [--plain]

Run as two ranks (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment). It leaves
through `dsfm.runtime.dist.exit_process(3)`, or with `--plain` through `sys.exit(3)`, as
Python scripts usually do. Its last line goes to stdout unflushed, and an exit handler writes
`PATH.<rank>`: both must survive the exit.
"""

import argparse
import atexit
import sys

import torch
import torch.distributed as td

from dsfm.runtime.dist import exit_process

RC = 3


def main() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--marker", required=True)
    ap.add_argument("--plain", action="store_true")
    args = ap.parse_args()
    td.init_process_group("gloo")
    rank = td.get_rank()

    def mark():
        with open(f"{args.marker}.{rank}", "w") as fh:
            fh.write("exit handlers ran\n")

    atexit.register(mark)
    tensors = [torch.ones(20000) for _ in range(300)]
    for t in tensors:
        t.note = "python state"
    works = [td.all_reduce(t, async_op=True) for t in tensors]
    del tensors, works
    sys.stdout.write(f"EXIT_PROBE rank {rank} leaving\n")      # not flushed
    return args


if __name__ == "__main__":
    if main().plain:
        sys.exit(RC)
    exit_process(RC)
