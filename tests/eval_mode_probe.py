"""One process of tests/test_eval.py's engine test: a real single-rank DeepSpeed engine (gloo,
ZeRO-3: every parameter partitioned) over a small AViT with stochastic depth, evaluated on a
demo dataset's valid split. Prints `EVALMODE {json}`: two evaluations of the engine in training
mode (equal if drop path was off during them), whether its model trains after them and its drop
path is on then (two forwards of one batch differ), and whether a model the caller had put in
evaluation mode stays there.

Usage: eval_mode_probe.py DATASET_DIR
"""

import json
import sys

import torch

from dsfm.data.fields import FieldVocabulary
from dsfm.data.prefetch import WellLoader
from dsfm.eval import evaluate
from dsfm.models.avit import AViT, AViTConfig
from dsfm.runtime.dist import exit_process
from dsfm.runtime.engine import build_engine, finish, init_process_group


def main() -> int:
    path = sys.argv[1]
    env = init_process_group()
    torch.manual_seed(0)
    model = AViT(AViTConfig(n_fields=8, dim=32, heads=2, blocks=2, drop_path=0.5))
    engine, _, _ = build_engine(model, {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
        fused_grad_norm=False)
    kw = dict(n_steps_input=4, rollout_steps=2, batch_size=2, batches=2, seed=3, rank=0,
              world_size=1, normalization="zscore")
    vocab = FieldVocabulary()
    engine.train()
    first = evaluate(engine, [path], vocabulary=vocab, **kw)
    second = evaluate(engine, [path], vocabulary=vocab, **kw)
    trains_after = engine.module.training
    with WellLoader([path], split="valid", n_steps_input=4, n_steps_output=1, batch_size=2,
                    num_workers=1, seed=3, rank=0, world_size=1, vocabulary=vocab) as loader:
        batch = next(iter(loader))
    with torch.no_grad():
        outs = [engine(batch.x, batch.field_ids, batch.bcs_host) for _ in range(2)]
    engine.eval()
    evaluate(engine, [path], vocabulary=vocab, **kw)
    sys.stdout.write("EVALMODE " + json.dumps({
        "same": first == second, "trains_after": trains_after,
        "drop_path_after": not torch.equal(*outs),
        "eval_mode_kept": not engine.module.training}) + "\n")
    sys.stdout.flush()
    finish(env)
    return 0


if __name__ == "__main__":
    exit_process(main())
