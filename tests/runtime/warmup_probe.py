"""One process of the warmup tests: real single-rank DeepSpeed engines (gloo, ZeRO-2) built by
dsfm's build_engine over a small linear model, each trained for a few updates. For each, prints
`WARMUP {json}`: the name given, the learning rate each update used (the optimizer's, as the
engine reads it before the update) and whether the update moved the weights.

Usage: warmup_probe.py NAME=DS_CONFIG_JSON [NAME=...]; a config file's "auto" steps are
resolved for `--max-steps` (default 100) as dsfm/train.py resolves them.
"""

import argparse
import json
import sys

import torch

from dsfm.runtime import schedule
from dsfm.runtime.dist import exit_process
from dsfm.runtime.engine import build_engine, finish, init_process_group


def probe(name: str, ds_config: dict, updates: int) -> dict:
    torch.manual_seed(0)
    engine, _, _ = build_engine(torch.nn.Linear(8, 1), ds_config, fused_grad_norm=False)
    rates, moved = [], []
    for _ in range(updates):
        before = [p.detach().clone() for p in engine.module.parameters()]
        for _ in range(engine.gradient_accumulation_steps()):
            x = torch.randn(engine.train_micro_batch_size_per_gpu(), 8)
            engine.backward((engine(x) - 1.0).pow(2).mean())
            rates.append(float(engine.get_lr()[0]))
            engine.step()
        moved.append(any(not torch.equal(b, p.detach())
                         for b, p in zip(before, engine.module.parameters())))
    accum = engine.gradient_accumulation_steps()
    return {"name": name, "lr": rates[accum - 1::accum], "moved": moved}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+", metavar="NAME=JSON")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--updates", type=int, default=10)
    args = ap.parse_args()
    env = init_process_group()
    for item in args.configs:
        name, path = item.split("=", 1)
        with open(path) as fh:
            ds_config = schedule.resolve(json.load(fh), args.max_steps, path)
        sys.stdout.write(f"WARMUP {json.dumps(probe(name, ds_config, args.updates))}\n")
        sys.stdout.flush()
    finish(env)
    return 0


if __name__ == "__main__":
    exit_process(main())
