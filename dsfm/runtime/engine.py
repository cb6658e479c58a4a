"""Process group and DeepSpeed engine set-up, whatever launched us."""

from __future__ import annotations

import os
import re

import torch

from dsfm.errors import ConfigError, DsfmError, first_line
from dsfm.runtime import build_lock, dist
from dsfm.runtime.schedule import LR_SCHEDULE


def discover() -> dist.DistEnv:
    """Rank and world from the launcher (deepspeed, torchrun, mpirun, srun or none), before any
    process group exists, so configs can be checked against the world size first, and a
    rendezvous host that does not resolve is an error here, not a wait in the rendezvous."""
    env = dist.discover()
    dist.check_master_addr(env)
    dist.export(env)
    return env


def check_devices(env: dist.DistEnv, n_gpus: int) -> list[str]:
    """Ranks on this node against the GPUs it sees: more ranks than visible GPUs would put two
    ranks on one GPU (NCCL refuses that at its first collective, naming no setting), so it is a
    ConfigError; fewer leaves GPUs idle, a warning to log. One visible GPU per rank
    (`--gpus-per-task=1`, a per-task `--gpu-bind` or CUDA_VISIBLE_DEVICES) is an error too: it
    was let through, but DeepSpeed puts each rank on cuda:LOCAL_RANK (its process group's
    device, its engine, ZeRO-3's parameters), a device that only local rank 0 has there."""
    if n_gpus == 1 and env.local_world_size > 1:
        raise ConfigError(
            f"{env.local_world_size} ranks on this node ({env.launcher} launch) but this rank "
            "sees 1 GPU: DeepSpeed puts each rank on cuda:LOCAL_RANK, so every rank must see "
            "all of the node's GPUs; give the ranks the node's GPUs together (srun "
            "--gpus-per-node, without --gpus-per-task or a per-task --gpu-bind; no per-rank "
            "CUDA_VISIBLE_DEVICES)")
    if n_gpus > 1 and env.local_world_size > n_gpus:
        raise ConfigError(
            f"{env.local_world_size} ranks on this node ({env.launcher} launch) but {n_gpus} "
            "GPUs visible: two ranks would share a GPU; start one rank per GPU (srun "
            "--ntasks-per-node, mpirun -npernode, the hostfile's slots)")
    if n_gpus > env.local_world_size:
        return [f"warning: {env.local_world_size} rank(s) on this node but {n_gpus} GPUs "
                f"visible: {n_gpus - env.local_world_size} will idle; start one rank per GPU "
                "(srun --ntasks-per-node, mpirun -npernode, the hostfile's slots)"]
    return []


def init_process_group(env: dist.DistEnv | None = None) -> dist.DistEnv:
    """Start torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU."""
    import deepspeed

    env = env or discover()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    with build_lock.watch(f"rank {env.rank}'s process-group start"):
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    # DeepSpeed's CPU backend has mapped every rank's /dev/shm buffer by now (it waits for
    # each peer's file); once all ranks are past that, the names are no longer needed, and
    # unlinking them here means that no way of ending a rank (SIGKILL, an early signal, an
    # error before the trainer's cleanup) can leave 69 MB per rank in /dev/shm
    import torch.distributed as td

    if td.is_initialized() and td.get_world_size() > 1:
        td.barrier()
    release_shm(env)
    return env


_ARCH = re.compile(r"^(\d+)\.(\d+)([a-z]?)((?:\+PTX)?)$")


def deepspeed_arch_list(value: str) -> str:
    """TORCH_CUDA_ARCH_LIST in a form DeepSpeed's JIT op builder can parse. PyTorch accepts
    architecture-specific targets such as "9.0a" (CUDA images often set them), but DeepSpeed
    0.19 reads each entry as integers and fails with "invalid literal for int() with base 10:
    '0a'" when it first compiles FusedAdam, as seen on an H200. Its ops use no
    architecture-specific instructions, so "9.0a" becomes "9.0" (duplicates dropped, "+PTX"
    kept); entries it cannot parse otherwise (named architectures) are left as they are."""
    out: list[str] = []
    for entry in value.replace(";", " ").split():
        m = _ARCH.match(entry)
        cc = f"{m.group(1)}.{m.group(2)}{m.group(4)}" if m else entry
        if cc not in out:
            out.append(cc)
    return ";".join(out)


def fix_arch_list() -> None:
    """Rewrite TORCH_CUDA_ARCH_LIST (if set) with `deepspeed_arch_list`, before DeepSpeed
    compiles an op."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if value:
        fixed = deepspeed_arch_list(value)
        if fixed != value.strip():
            os.environ["TORCH_CUDA_ARCH_LIST"] = fixed


#: What DeepSpeed 0.19 prints on every rank that no user can act on: WarmupCosineLR warns
#: from its own constructor ("Attempting to get learning rate from scheduler before it has
#: started"), and ZeRO calls torch.distributed.all_gather_into_tensor (ZeRO-2, with more than
#: one rank) and reduce_scatter_tensor (ZeRO-3), which torch 2.13 deprecates (FutureWarnings).
_DEEPSPEED_NOISE = "Attempting to get learning rate from scheduler before it has started"
_TORCH_DEPRECATION = (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                      "is deprecated")


def _drop_deepspeed_noise(record) -> bool:
    # the record's format string, not getMessage(): a logger-level filter runs in the caller,
    # where a record whose arguments do not fit its format would raise instead of being
    # reported by the handler (the message dropped here has no arguments)
    return _DEEPSPEED_NOISE not in str(record.msg)


def _filter_deepspeed_noise() -> None:
    import warnings

    from deepspeed.utils import logger

    if _drop_deepspeed_noise not in logger.filters:
        logger.addFilter(_drop_deepspeed_noise)        # a callable filter (Python 3.2+)
    warnings.filterwarnings("ignore", message=_TORCH_DEPRECATION, category=FutureWarning)


def build_engine(model: torch.nn.Module, ds_config: dict, fused_grad_norm: bool = True,
                 lr_schedule: int = LR_SCHEDULE, local_gradients: bool = True,
                 whole_blocks: bool = True):
    """deepspeed.initialize over the trainable parameters; returns (engine, optimizer,
    scheduler). `fused_grad_norm`: where the optimizer is ZeRO's and not offloaded, it computes
    the clipping norm with one multi-tensor norm instead of two operators per parameter tensor
    (`dsfm.runtime.zero_norm`; elsewhere DeepSpeed's own, `zero_norm.is_fused` tells).
    `local_gradients`: a ZeRO-2 engine on one rank takes the gradients where autograd leaves
    them, without DeepSpeed's per-parameter hooks, bucket copies and device synchronizations,
    which reduce nothing on one rank (`dsfm.runtime.zero_local`; `zero_local.is_local` tells).
    `whole_blocks`: ZeRO-3 gathers each of the model's blocks (`model.zero3_blocks()`) as one
    unit, not module by module (`dsfm.runtime.zero_blocks`; `zero_blocks.whole_blocks`
    counts them).
    DeepSpeed's warmup schedulers are built as dsfm's (`dsfm.runtime.warmup`: the first update
    at the warmup's first step, where DeepSpeed's made two at its starting rate), unless
    `lr_schedule` is 1 (a run resumed on DeepSpeed's own, `schedule.warmup_on_resume`)."""
    import deepspeed

    from dsfm.runtime.warmup import client_scheduler
    from dsfm.runtime.zero_blocks import gather_blocks_whole
    from dsfm.runtime.zero_local import keep_local_gradients
    from dsfm.runtime.zero_norm import fuse_grad_norm, keep_plain_norm

    fix_arch_list()
    _filter_deepspeed_noise()
    if whole_blocks:
        gather_blocks_whole(model, ds_config)   # before initialize installs ZeRO-3's hooks
    params = [p for p in model.parameters() if p.requires_grad]
    rank = os.environ.get("RANK", "0")
    with build_lock.watch(f"rank {rank}'s DeepSpeed engine set-up"):
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, model_parameters=params,
            config=unsynchronized_timers(cpu_optimizer(ds_config)),
            lr_scheduler=client_scheduler(ds_config, lr_schedule))
    if fused_grad_norm:
        fuse_grad_norm(engine)
    if local_gradients:
        keep_local_gradients(engine)
    keep_plain_norm(engine)                    # no ZeRO: the clipping norm, for train/grad_norm
    return engine, optimizer, scheduler


def finish(env: dist.DistEnv) -> None:
    """The end of a successful run: destroy the process group (NCCL warns at exit otherwise,
    and may leak its resources) and release DeepSpeed's CPU buffer. Not on error paths, where
    another rank may still be inside a collective."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
    release_shm(env)


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


def cpu_optimizer(ds_config: dict, cuda: bool | None = None) -> dict:
    """On CPU, Adam/AdamW run as torch's own (`torch_adam`): DeepSpeed's fused CPU kernel would
    be compiled first (minutes on two cores) for no gain at test sizes. GPUs keep FusedAdam.
    `cuda`: whether there is a GPU (default: whether torch sees one)."""
    opt = ds_config.get("optimizer") or {}
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda or str(opt.get("type", "")).lower() not in ("adam", "adamw"):
        return ds_config
    offload = (ds_config.get("zero_optimization") or {}).get("offload_optimizer")
    if offload:                                     # DeepSpeedCPUAdam is the point of offload
        return ds_config
    params = {"torch_adam": True, **(opt.get("params") or {})}
    return {**ds_config, "optimizer": {**opt, "params": params}}


def unsynchronized_timers(ds_config: dict) -> dict:
    """`ds_config` with DeepSpeed's throughput timer off, unless it names that timer itself.
    The timer is on by default in DeepSpeed 0.19 ("timers": {"throughput": {"enabled": true,
    "synchronized": true}}) for a samples/s line every `steps_per_print` steps; to time wall
    clock it synchronizes the device at the start of every forward and at the end of every
    step (from the third step on), whatever it prints: two host waits per micro-batch, in
    which the GPU empties its queue and then idles until the host has issued new work, where
    plain PyTorch's host runs ahead. dsfm measures throughput itself (the run monitor), so
    nothing is lost but DeepSpeed's own line."""
    timers = ds_config.get("timers")
    if isinstance(timers, dict) and "throughput" in timers:
        return ds_config
    return {**ds_config, "timers": {**(timers if isinstance(timers, dict) else {}),
                                    "throughput": {"enabled": False}}}


def set_tf32(enabled: bool) -> str:
    """TF32 for CUDA matmuls and cuDNN convolutions together, and a line saying which. PyTorch's
    defaults differ (matmuls off, convolutions on), which would leave an "fp32" AViT computing
    its stem and decoder convolutions in TF32."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return ("numerics: fp32 weights and activations, TF32 tensor cores for matmuls and "
            "convolutions (train.tf32)" if enabled else
            "numerics: fp32 (TF32 off for matmuls and cuDNN convolutions)")


def compile_choice(setting: bool | str, zero_stage: int, cuda: bool) -> tuple[bool, str | None]:
    """Whether to compile the space-time blocks (`model.compile`), and the log's line on it.
    `auto` compiles on a GPU with ZeRO stages 0-2, where the compiled blocks were faster in
    every case measured (docs/performance.md), and runs eager on a CPU (each input shape's
    first step costs 20-45 s of compiling there) and with ZeRO-3 (its parameter gathering runs
    in module hooks that torch.compile would trace; `true` is refused there)."""
    compiled = ("model: space-time blocks compiled (torch.compile, regional; {}each input "
                "shape compiles on first use)")
    if setting is True:
        return True, compiled.format("")
    if setting != "auto":
        return False, None
    if zero_stage == 3:
        return False, ("model: space-time blocks eager (model.compile=auto, ZeRO-3: its "
                       "parameter gathering runs in module hooks that torch.compile would trace)")
    if not cuda:
        return False, ("model: space-time blocks eager (model.compile=auto, no GPU: on a CPU each "
                       "input shape's first step would spend 20-45 s compiling)")
    return True, compiled.format("model.compile=auto on a GPU; ")


def attention_choice(setting: str, cuda: bool, tf32: bool) -> tuple[str, str | None]:
    """How the blocks attend (`model.attention`), and the log's line where `auto` chose.
    `auto`: on a GPU in fp32 (train.tf32 false) the packed attention, which was the fastest
    there (AViT-B compiled on an H200: 152.5 ms a step packed, 158.6 direct, 172.4 fused:
    docs/performance.md, the third H200 run); in TF32 (fused 92.5, direct 96.9, packed 102.7
    in the same call) and on a CPU (whose attention kernel has no padded tiles to fill:
    the Ti step 524 ms fused, 560 packed) the fused one. The same numbers to fp32 rounding
    whichever runs."""
    if setting != "auto":
        return setting, None
    if cuda and not tf32:
        return "packed", ("model: attention packed (model.attention=auto on a GPU in fp32: "
                          "short sequences packed into the fused kernel's tiles)")
    return "fused", ("model: attention fused (model.attention=auto, "
                     + ("TF32)" if cuda else "no GPU)"))


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


def told_by(src: int, text: str | None, device, limit: int = 4096) -> str:
    """Collective: rank `src`'s `text` on every rank (its first `limit` bytes of UTF-8; the
    others' `text` is not read). For a failure that one rank saw and every rank reports: the
    launcher (DeepSpeed's, srun) ends the other ranks as soon as one exits with an error, so
    the rank that saw it may be ended before it says so; rank 0 writes train.log."""
    import torch.distributed as td

    if not (td.is_initialized() and td.get_world_size() > 1):
        return text or ""
    data = (text or "").encode()[:limit] if td.get_rank() == src else b""
    t = torch.zeros(limit + 1, dtype=torch.uint8)
    if data:
        t[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    t = all_reduce_(t.to(device)).cpu()         # one rank's bytes, zeros elsewhere: a sum
    return bytes(t.tolist()).split(b"\0", 1)[0].decode(errors="replace")


_RANK0_FIRST_CALLS: dict[str, int] = {}


def rank0_first(work, key: str, poll_s: float = 1.0):
    """`work()` on rank 0 while the other ranks wait for it, then its result on rank 0 (None
    elsewhere). The others poll the process group's key-value store instead of waiting in a
    barrier: a barrier is a collective, bounded by the process group's timeout (DeepSpeed's
    10 minutes), and simulating a preset can take longer than that. When `work` fails, the
    others stop too, with an error naming rank 0's. `key` names this wait (once per run)."""
    import time

    import torch.distributed as td

    if not td.is_initialized() or td.get_world_size() == 1:
        return work()
    store = td.distributed_c10d._get_default_store()
    # a key of this call only: a store that outlives the process group (torchrun's agent
    # store, across --max-restarts attempts) or a second call in one process must not hand
    # the others an earlier verdict
    calls = _RANK0_FIRST_CALLS[key] = _RANK0_FIRST_CALLS.get(key, 0) + 1
    key = f"dsfm/{key}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{calls}"
    def told() -> None:
        # rank 0 hosts the store (env://: the DeepSpeed launcher, srun, mpirun) and exits once
        # it has raised, now or in what follows (a check of the data just simulated): the
        # others, asleep up to poll_s between polls, would find the store gone instead of the
        # verdict (and torch's store client prints a C++ stack trace of it); wait (bounded)
        # until they have read it
        deadline = time.monotonic() + 2 * poll_s + 5.0
        while (store.add(f"{key}/read", 0) < td.get_world_size() - 1
               and time.monotonic() < deadline):
            time.sleep(0.01)

    if td.get_rank() == 0:
        try:
            out = work()
        except BaseException as exc:
            store.set(key, f"failed: {first_line(exc) or type(exc).__name__}")
            told()
            raise
        store.set(key, "ok")
        told()
        return out
    wait = 0.01
    try:
        while not store.check([key]):             # soon when rank 0 had nothing to do
            time.sleep(wait)
            wait = min(2 * wait, poll_s)
        status = store.get(key).decode()
        store.add(f"{key}/read", 1)
    except RuntimeError as exc:                   # DistNetworkError: rank 0's store is gone
        raise DsfmError(f"rank 0 stopped while this rank waited for it "
                        f"({first_line(exc) or type(exc).__name__}); its own "
                        "error is in its output") from None
    if status != "ok":
        raise DsfmError(f"rank 0 {status}")
    return None
