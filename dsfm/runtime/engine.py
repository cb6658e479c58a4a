"""Process group and DeepSpeed engine set-up, whatever launched us."""

from __future__ import annotations

import os

import torch

from dsfm.runtime import dist


def discover() -> dist.DistEnv:
    """Rank and world from the launcher (deepspeed, torchrun, mpirun, srun or none), before any
    process group exists, so configs can be checked against the world size first."""
    env = dist.discover()
    dist.export(env)
    return env


def init_process_group(env: dist.DistEnv | None = None) -> dist.DistEnv:
    """Start torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU."""
    import deepspeed

    env = env or discover()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return env


def build_engine(model: torch.nn.Module, ds_config: dict):
    """deepspeed.initialize over the trainable parameters; returns (engine, optimizer,
    scheduler)."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=params,
                                                           config=cpu_optimizer(ds_config))
    return engine, optimizer, scheduler


def release_shm(env: dist.DistEnv) -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU all-reduce, which DeepSpeed never
    removes (each CPU run would otherwise leave tens of MB per rank in memory). The name is
    unlinked only; ranks that still map it keep it until they exit."""
    if torch.cuda.is_available():
        return
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{env.master_addr}_"
            f"{env.master_port}_{env.rank}")
    try:
        os.unlink(name)
    except OSError:
        pass


def cpu_optimizer(ds_config: dict) -> dict:
    """On CPU, Adam/AdamW run as torch's own (`torch_adam`): DeepSpeed's fused CPU kernel would
    be compiled first (minutes on two cores) for no gain at test sizes. GPUs keep FusedAdam."""
    opt = ds_config.get("optimizer") or {}
    if torch.cuda.is_available() or str(opt.get("type", "")).lower() not in ("adam", "adamw"):
        return ds_config
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer")
    if offload:                                     # DeepSpeedCPUAdam is the point of offload
        return ds_config
    params = {"torch_adam": True, **(opt.get("params") or {})}
    return {**ds_config, "optimizer": {**opt, "params": params}}


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default) that is a no-op in a world of one."""
    import torch.distributed as td
    if td.is_initialized() and td.get_world_size() > 1:
        td.all_reduce(t, op=op or td.ReduceOp.SUM)
    return t
