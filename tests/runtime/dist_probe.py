"""One rank of a launcher test: discover, export, join a gloo group, all-reduce the ranks.

Run under a real launcher (torchrun, deepspeed, mpirun) or alone. Each rank hands back one
record `DIST_PROBE` (tests/runtime/records.py); the test reads them back. `--init deepspeed`
joins through deepspeed.init_distributed(auto_mpi_discovery=False), the call the trainer makes.
"""

import argparse
import dataclasses
import datetime

import torch
import torch.distributed as dist

from dsfm.runtime.dist import check_master_addr, discover, exit_process, export
from dsfm.runtime.engine import release_shm
from tests.runtime.records import emit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--init", choices=("torch", "deepspeed"), default="torch")
    args, _ = parser.parse_known_args()      # the deepspeed launcher appends --local_rank=N
    env = discover()
    check_master_addr(env)            # as the trainer does
    export(env)
    if args.init == "deepspeed":
        import deepspeed
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=120))
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    total = torch.tensor([env.rank], dtype=torch.int64)
    dist.all_reduce(total)
    record = dataclasses.asdict(env)
    record.update(rank_sum=int(total.item()), group_rank=dist.get_rank(),
                  group_size=dist.get_world_size())
    emit("DIST_PROBE", record)
    dist.destroy_process_group()
    if args.init == "deepspeed":
        release_shm(env)          # DeepSpeed's CPU all-reduce buffer, as the trainer does


if __name__ == "__main__":
    exit_process(main())
