"""Checkpoints through the DeepSpeed engine, resume, preemption, export and fine-tuning loads.

A checkpoint is DeepSpeed's tag directory `<run>/checkpoints/step00000100/` (model, ZeRO
partitions of the optimizer, scheduler) plus what DeepSpeed does not know about:
  - client state (saved once): step, run config, field vocabulary, model shape;
  - `dsfm_rank<r>.pt` per rank: the loader's sampler state and the RNG states of that rank,
so a resumed run draws exactly the batches and drop-path masks it would have drawn.
Only the newest `keep` checkpoints are kept. SIGTERM or SIGUSR1 (SLURM preemption) asks for a
checkpoint at the next step boundary; all ranks agree on it through one all-reduce per step.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import signal

import numpy as np
import torch

from dsfm.errors import ConfigError

TAG = "step{:08d}"
META = "dsfm_meta.json"           # step, model shape, vocabulary: readable without torch.load
_TAG_RE = re.compile(r"^step(\d{8})$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tags(ckpt_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (a tag counts once every rank's file is there)."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _TAG_RE.match(name)
        if m and os.path.isfile(os.path.join(ckpt_dir, name, "COMPLETE")):
            found.append((int(m.group(1)), name))
    return [name for _, name in sorted(found)]


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, run_dir: str, step: int, client_state: dict, rank_state: dict,
         keep: int) -> str:
    """Collective: every rank calls it at the same step."""
    import torch.distributed as td

    ckpt_dir = checkpoint_dir(run_dir)
    tag = TAG.format(step)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
    rank = td.get_rank() if td.is_initialized() else 0
    path = os.path.join(ckpt_dir, tag, f"dsfm_rank{rank}.pt")
    torch.save({**rank_state, "rng": rng_state()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    if td.is_initialized():
        td.barrier()
    if rank == 0:
        meta = {k: client_state[k] for k in ("step", "model_config", "vocabulary")
                if k in client_state}
        with open(os.path.join(ckpt_dir, tag, META), "w") as fh:
            json.dump(meta, fh, indent=1)
        with open(os.path.join(ckpt_dir, tag, "COMPLETE"), "w") as fh:
            fh.write(f"{step}\n")
        for old in tags(ckpt_dir)[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    if td.is_initialized():
        td.barrier()
    return os.path.join(ckpt_dir, tag)


def check_resumable(run_dir: str, model_shape: tuple[int, int, int]) -> None:
    """Refuse, before any engine exists, a checkpoint written by a different model: every rank
    reads the small metadata file and raises the same one-line error."""
    found = tags(checkpoint_dir(run_dir))
    if not found:
        return
    path = os.path.join(checkpoint_dir(run_dir), found[-1], META)
    try:
        with open(path) as fh:
            saved = json.load(fh)["model_config"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{path}: missing or unreadable; is {run_dir} a dsfm run?") from None
    have = (saved["dim"], saved["heads"], saved["blocks"])
    if have != tuple(model_shape):
        raise ConfigError(f"--resume: {os.path.dirname(path)} holds an AViT with dim/heads/blocks "
                          f"{have}, this run builds {tuple(model_shape)}; use the run's own "
                          "--config, or start a new run with train.init_from")


def load_latest(engine, run_dir: str) -> tuple[dict, dict] | None:
    """Load the newest complete checkpoint into the engine; (client_state, this rank's state),
    or None when the run directory has none."""
    import torch.distributed as td

    ckpt_dir = checkpoint_dir(run_dir)
    found = tags(ckpt_dir)
    if not found:
        return None
    tag = found[-1]
    rank = td.get_rank() if td.is_initialized() else 0
    world = td.get_world_size() if td.is_initialized() else 1
    rank_file = os.path.join(ckpt_dir, tag, f"dsfm_rank{rank}.pt")
    saved_world = len(glob.glob(os.path.join(ckpt_dir, tag, "dsfm_rank*.pt")))
    if saved_world != world or not os.path.isfile(rank_file):
        raise ConfigError(f"{os.path.join(ckpt_dir, tag)} was written by {saved_world} ranks; "
                          f"this run has {world}. Resume with the same world size, or start a "
                          "new run from its weights with train.init_from")
    _, client = engine.load_checkpoint(ckpt_dir, tag=tag)
    if client is None:
        raise ConfigError(f"{os.path.join(ckpt_dir, tag)}: DeepSpeed could not load it")
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return client, rank_state


def export_fp32(run_dir_or_ckpt: str, out: str, tag: str | None = None) -> str:
    """A consolidated fp32 state dict (works for ZeRO-2 and ZeRO-3 partitions) with the model
    shape and field vocabulary beside it: the file fine-tuning loads."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir = run_dir_or_ckpt
    if os.path.isdir(checkpoint_dir(run_dir_or_ckpt)):
        ckpt_dir = checkpoint_dir(run_dir_or_ckpt)
    found = tags(ckpt_dir)
    if not found:
        raise ConfigError(f"{run_dir_or_ckpt}: no complete checkpoint to export")
    tag = tag or found[-1]
    if tag not in found:
        raise ConfigError(f"{ckpt_dir}: no complete checkpoint {tag!r} (have {', '.join(found)})")
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    client = _client_state(os.path.join(ckpt_dir, tag))
    payload = {"model": {k: v.float().clone() for k, v in state.items()},
               "model_config": client["model_config"], "vocabulary": client["vocabulary"],
               "step": client["step"], "source": os.path.join(ckpt_dir, tag)}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(payload, out)
    return out


def _client_state(tag_dir: str) -> dict:
    """The client state DeepSpeed saved beside the model (ZeRO-3 names its file per rank)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = os.path.join(tag_dir, name)
        if os.path.isfile(path):
            return torch.load(path, weights_only=False, map_location="cpu")
    raise ConfigError(f"{tag_dir}: no DeepSpeed model-states file; is it a checkpoint?")


def load_pretrained(path: str) -> dict:
    """The payload of an exported file, exporting a run directory's newest checkpoint on the
    fly."""
    if os.path.isdir(path):
        out = os.path.join(path, "export", "model_fp32.pt")
        if not os.path.isfile(out):
            export_fp32(path, out)
        path = out
    if not os.path.isfile(path):
        raise ConfigError(f"train.init_from {path}: no such file or run directory")
    payload = torch.load(path, weights_only=False, map_location="cpu")
    for key in ("model", "model_config", "vocabulary"):
        if key not in payload:
            raise ConfigError(f"train.init_from {path}: not a dsfm export (no {key!r}); export "
                              "one with python -m dsfm.runtime.export RUN_DIR")
    return payload


class Preemption:
    """SIGTERM and SIGUSR1 set a flag; `requested()` is collective, so every rank checkpoints
    at the same step even when the signal reached only some of them. SIGTERM also ends the
    run after the checkpoint; SIGUSR1 (SLURM's --signal warning) checkpoints and carries on.

    The agreement is an all-reduce of one integer over a CPU (gloo) group, so it never waits
    for the GPU: with NCCL training a side gloo group is made for it."""

    SIGNALS = {signal.SIGTERM: "stop", signal.SIGUSR1: "checkpoint"}

    def __init__(self):
        import torch.distributed as td

        self._group = None
        if td.is_initialized() and td.get_backend() != "gloo":
            self._group = td.new_group(backend="gloo")
        # levels of the signals not yet acted on (1 = checkpoint, 2 = checkpoint and stop); the
        # handler only appends, so a signal that lands while a check runs stays for the next
        self._pending: list[int] = []
        self._previous = {}
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self._pending.append(2 if self.SIGNALS[signum] == "stop" else 1)

    def requested(self) -> int:
        """Collective: the highest level any rank received since the last check (0: none)."""
        import torch.distributed as td

        n = len(self._pending)
        local = max(self._pending[:n], default=0)
        del self._pending[:n]          # only what was read: later arrivals are kept
        t = torch.tensor([local], dtype=torch.int32)
        if td.is_initialized() and td.get_world_size() > 1:
            td.all_reduce(t, op=td.ReduceOp.MAX, group=self._group)
        return int(t.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
