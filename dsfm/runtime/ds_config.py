"""The `--ds_config` JSON, checked before any process group waits.

DeepSpeed reads its config inside `deepspeed.initialize`, after the process group is up, and
answers a mistake there with a traceback on every rank (a ZeRO stage of 5, an optimizer it does
not know, a learning rate that is a string) or not at all (a misspelt top-level key is ignored,
so `gradient_acumulation_steps` silently means 1). Here the same config goes through DeepSpeed's
own parser first, with the batch keys this run checks itself, and what dsfm needs on top: fp32
(the physics models are trained in full precision, and the loader's batches are fp32), an
optimizer and scheduler DeepSpeed or PyTorch provides, numbers where numbers belong.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import logging
import math
import sys

from dsfm.errors import ConfigError

#: Top-level keys of DeepSpeed's config documentation, beside the constants its modules define
#: (these sections are parsed by modules that are not imported until used).
DOCUMENTED_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler
fp16 bf16 fp8 amp torch_autocast gradient_clipping prescale_gradients gradient_predivide_factor
sparse_gradients zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer
communication_data_type seq_parallel_communication_data_type steps_per_print
wall_clock_breakdown memory_breakdown dump_state tensorboard wandb csv_monitor comet
flops_profiler activation_checkpointing aio sparse_attention data_efficiency
curriculum_learning data_types checkpoint elasticity autotuning compression_training
quantize_training pipeline compile nebula hybrid_engine eigenvalue progressive_layer_drop
graph_harvesting weight_quantization dataloader_drop_last timers tensor_parallel
use_data_before_expert_parallelism load_universal_checkpoint mics_shard_size
mics_hierarchical_params_gather disable_allgather monitor_config zero_quantized_weights
zero_quantized_gradients zero_hpz_partition_size sequence_parallel_size
""".split())
#: a key this close to a known one (difflib's ratio) is taken for a misspelling of it
TYPO_CUTOFF = 0.85
#: dsfm trains in fp32: these sections must be absent or disabled (bfloat16: bf16's old name;
#: torch_autocast runs the forward in bf16 or fp16 under torch.autocast)
REDUCED_PRECISION = ("fp16", "bf16", "bfloat16", "fp8", "amp", "torch_autocast")


def _known_keys() -> set[str]:
    """Keys DeepSpeed may read: the documented top-level ones and the lower-case string
    constants of its loaded modules (its config parser's key names)."""
    import deepspeed.runtime.config  # noqa: F401  (loads the parser's constants)

    known = set(DOCUMENTED_KEYS)
    for name, module in list(sys.modules.items()):
        if not name.startswith("deepspeed.") or module is None:
            continue
        for key, value in vars(module).items():
            if (key.isupper() and isinstance(value, str) and value.islower()
                    and value.replace("_", "").isalnum()):
                known.add(value)
    return known


def _number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _one_line(exc: BaseException) -> str:
    """An exception from DeepSpeed's parser (pydantic's are several lines) as one line."""
    lines = [ln.strip() for ln in str(exc).splitlines()
             if ln.strip() and "errors.pydantic.dev" not in ln]
    return " ".join(lines) or type(exc).__name__


@contextlib.contextmanager
def _quiet_deepspeed():
    """DeepSpeed's parser logs at INFO on every rank; the check says nothing unless it fails."""
    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_precision(cfg: dict, source: str) -> None:
    for key in REDUCED_PRECISION:
        section = cfg.get(key)
        if section is None:
            continue
        enabled = section.get("enabled", False) if isinstance(section, dict) else section
        if enabled is not False:
            raise ConfigError(
                f"{source}: {key}.enabled is {enabled!r}: dsfm trains in fp32 (small field "
                "increments vanish in 16-bit mantissas, and the loader's batches are fp32; "
                "docs/training.md); remove the section or set \"enabled\": false (TF32 "
                "matmuls: train.tf32)")
    comm = cfg.get("communication_data_type")
    if isinstance(comm, str) and comm.lower() in ("fp16", "bf16"):
        raise ConfigError(
            f"{source}: communication_data_type is {comm!r}: the gradients would be cast to 16 "
            "bits for every reduction (even on one rank), where dsfm trains in fp32; remove it "
            "or set \"fp32\"")


def _check_component(cfg: dict, source: str, key: str, example: str, ours: list[str],
                     theirs, fold_case: bool, allow_auto: bool) -> None:
    """The optimizer or the scheduler: an object whose "type" is one of DeepSpeed's (`ours`,
    compared lower-case if `fold_case`, as DeepSpeed compares optimizer names) or a class of
    the torch module `theirs`, and whose "params" are checked by `_check_params`."""
    section = cfg.get(key)
    if section is None:
        return
    if not isinstance(section, dict) or not isinstance(section.get("type"), str):
        raise ConfigError(f"{source}: {key} must be an object with a \"type\" (e.g. "
                          f"\"{example}\") and \"params\"")
    name = section["type"]
    wanted = name.lower() if fold_case else name
    if wanted not in ours and not hasattr(theirs, name):
        close = difflib.get_close_matches(wanted, ours, 1, 0.6)
        raise ConfigError(f"{source}: {key} type {name!r} is neither one of DeepSpeed's "
                          f"({', '.join(ours)}) nor a {theirs.__name__} class"
                          + (f"; did you mean {close[0]!r}?" if close else ""))
    _check_params(section.get("params", {}), f"{source}: {key}.params", allow_auto)


#: optimizer and scheduler parameters that are numbers (others, such as WarmupLR's
#: warmup_type "linear" or a torch scheduler's anneal_strategy "cos", may be strings)
NUMERIC_PARAMS = frozenset({"lr", "eps", "weight_decay", "betas", "momentum", "dampening",
                            "alpha", "lr_decay", "initial_accumulator_value", "max_grad_norm"})
NUMERIC_SUFFIXES = ("_lr", "_steps", "_ratio", "_rate", "_momentum", "_size", "_factor",
                    "_lr_decay", "_step")


def _check_params(params, where: str, allow_auto: bool) -> None:
    """Numeric parameters must be finite numbers (lists of them too), "auto" only where dsfm
    fills it; a spelling of "auto" other than "auto" is refused wherever it is."""
    if not isinstance(params, dict):
        raise ConfigError(f"{where} must be an object, got {params!r}")
    for key, value in params.items():
        numeric = key in NUMERIC_PARAMS or key.endswith(NUMERIC_SUFFIXES)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                if v.lower() == "auto" and v != "auto":
                    raise ConfigError(f"{where}.{key} is {v!r}; did you mean \"auto\"?")
                if numeric and not (allow_auto and v == "auto"):
                    raise ConfigError(f"{where}.{key} is the string {v!r}, not a number")
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and not _number(v):
                raise ConfigError(f"{where}.{key} is {v!r}, not a finite number")


def _check_keys(cfg: dict, source: str) -> list[str]:
    """A misspelt top-level key is an error; a key DeepSpeed may not read, a warning."""
    known = _known_keys()
    notes = []
    for key in cfg:
        if key in known:
            continue
        close = difflib.get_close_matches(key, known, 1, TYPO_CUTOFF)
        if close:
            raise ConfigError(f"{source}: unknown key {key!r} (DeepSpeed would ignore it); did "
                              f"you mean {close[0]!r}?")
        notes.append(f"warning: {source}: {key!r} is not a key DeepSpeed is known to read; "
                     "it is ignored")
    return notes


def check(ds_config, source: str) -> list[str]:
    """Refuse, in one line, a DeepSpeed config this run could not train with; warnings for the
    log otherwise. Before "auto" steps are resolved (`schedule.resolve`), so that an unknown
    scheduler is named as such; `probe` runs DeepSpeed's parser after."""
    if not isinstance(ds_config, dict):
        raise ConfigError(f"{source}: expected a JSON object of DeepSpeed settings, got a "
                          f"{type(ds_config).__name__}")
    notes = _check_keys(ds_config, source)
    _check_precision(ds_config, source)
    clip = ds_config.get("gradient_clipping", 0.0)
    if not _number(clip) or clip < 0:
        raise ConfigError(f"{source}: gradient_clipping must be a number >= 0 (0: no "
                          f"clipping), got {clip!r}")
    import torch
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    _check_component(ds_config, source, "optimizer", "AdamW", DEEPSPEED_OPTIMIZERS,
                     torch.optim, fold_case=True, allow_auto=False)
    _check_component(ds_config, source, "scheduler", "WarmupCosineLR",
                     lr_schedules.VALID_LR_SCHEDULES, torch.optim.lr_scheduler,
                     fold_case=False, allow_auto=True)
    sched = (ds_config.get("scheduler") or {}).get("type")
    why = _undrivable(sched, lr_schedules.VALID_LR_SCHEDULES)
    if why:
        raise ConfigError(f"{source}: scheduler {sched!r} {why}; use one of DeepSpeed's "
                          f"({', '.join(lr_schedules.VALID_LR_SCHEDULES)}) or a torch "
                          "scheduler that steps without arguments (StepLR, CosineAnnealingLR, "
                          "OneCycleLR, ...)")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    every = ds_config.get("steps_per_print")
    if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
        # DeepSpeed's engine takes the step modulo it: 0 stopped the first step
        raise ConfigError(f"{source}: steps_per_print must be a positive integer, got "
                          f"{every!r}; leave it out for no progress lines")
    zero = ds_config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if not isinstance(stage, int) or isinstance(stage, bool):
        # DeepSpeed converts "3"; dsfm's checks of the stage (the checkpoint layout on
        # --resume, model.compile) compared the string and failed or passed it by
        raise ConfigError(f"{source}: zero_optimization.stage must be an integer (0-3), got "
                          f"{stage!r}")
    try:
        zero = DeepSpeedZeroConfig(**zero) if isinstance(zero, dict) else DeepSpeedZeroConfig(zero)
    except Exception as exc:                  # pydantic's, or a TypeError for a non-object
        raise ConfigError(f"{source}: zero_optimization: {_one_line(exc)}") from None
    threshold = getattr(zero, "module_granularity_threshold", 0)
    if stage == 3 and threshold and threshold > 0:
        # DeepSpeed then makes the modules of fewest parameters per layer leaf modules: the
        # AViT's relative-position bias tables first, which are called with no tensor that
        # needs a gradient, so the backward hook that reduces a leaf's gradients fires before
        # they exist (the first backward stopped: "output with shape [1] doesn't match the
        # broadcast shape [12]")
        raise ConfigError(
            f"{source}: zero_optimization.stage3_module_granularity_threshold {threshold}: "
            "DeepSpeed would gather the AViT's smallest modules as leaf modules, among them "
            "its relative-position bias tables, whose gradients it cannot reduce that way (the "
            "first backward stops); dsfm already gathers each space-time block as one unit "
            "(train.zero3_whole_blocks): leave the threshold out, or name leaf modules in "
            "zero_optimization.leaf_module")
    return notes


#: torch schedulers a DeepSpeed config cannot drive, and why
UNDRIVABLE = {
    "ReduceLROnPlateau": "steps on a metric, which DeepSpeed's engine does not pass (it gives "
                         "the train batch size instead, which never improves: the rate was cut "
                         "every patience + 1 steps)",
    "LambdaLR": "takes a Python function, which a JSON config cannot give",
    "MultiplicativeLR": "takes a Python function, which a JSON config cannot give",
    "SequentialLR": "takes scheduler objects, which a JSON config cannot give",
    "ChainedScheduler": "takes scheduler objects, which a JSON config cannot give",
}


def _undrivable(name: str | None, deepspeeds) -> str | None:
    """Why DeepSpeed's engine cannot drive the scheduler `name` (None: it can, or there is
    none): any other name in torch.optim.lr_scheduler passed (LRScheduler itself, Optimizer)
    and failed at the first step, and those of `UNDRIVABLE` cannot run as DeepSpeed steps them."""
    if name is None or name in deepspeeds:
        return None
    import torch

    cls = getattr(torch.optim.lr_scheduler, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.LRScheduler)) \
            or cls.__name__ in ("LRScheduler", "_LRScheduler"):
        return "is no learning-rate scheduler class of torch.optim.lr_scheduler"
    return UNDRIVABLE.get(name)


#: optimizers ZeRO runs without "zero_allow_untested_optimizer" (DeepSpeed's
#: ZERO_SUPPORTED_OPTIMIZERS: what these names build), compared lower-case
ZERO_OPTIMIZERS = ("adam", "adamw", "adagrad", "lion", "muon")


def _check_zero_components(cfg: dict, source: str, stage: int, lr_schedules) -> None:
    """What passes the checks above but stops `deepspeed.initialize` after the process group:
    no optimizer (dsfm passes none of its own), an optimizer ZeRO has not been tested with, a
    torch scheduler over ZeRO's optimizer (torch refuses anything but a torch.optim.Optimizer)."""
    opt = cfg.get("optimizer")
    if opt is None:
        raise ConfigError(f"{source}: no optimizer section: dsfm builds no optimizer of its "
                          "own, so DeepSpeed would have none (ZeRO refuses that, and without "
                          "ZeRO the run fails at its first step); add one, e.g. "
                          '{"type": "AdamW", "params": {"lr": 3e-4}}')
    if stage == 0:
        return
    if (opt["type"].lower() not in ZERO_OPTIMIZERS
            and cfg.get("zero_allow_untested_optimizer") is not True):
        raise ConfigError(f"{source}: optimizer {opt['type']!r} under ZeRO stage {stage}: "
                          f"DeepSpeed refuses an optimizer ZeRO is not tested with (it takes "
                          f"{', '.join(ZERO_OPTIMIZERS)}) unless "
                          "\"zero_allow_untested_optimizer\": true")
    if stage >= 2 and (cfg.get("zero_optimization") or {}).get("reduce_scatter", True):
        # ZeRO's optimizer asserts both in its constructor, inside deepspeed.initialize
        if cfg.get("prescale_gradients"):
            raise ConfigError(f"{source}: prescale_gradients under ZeRO stage {stage}: "
                              "DeepSpeed does not support it with reduce_scatter (its "
                              "default); remove it")
        factor = cfg.get("gradient_predivide_factor", 1.0)
        if factor != 1.0:
            raise ConfigError(f"{source}: gradient_predivide_factor {factor!r} under ZeRO "
                              f"stage {stage}: DeepSpeed supports only 1.0 with reduce_scatter "
                              "(its default); remove it")
    sched = cfg.get("scheduler")
    if sched is not None and sched["type"] not in lr_schedules.VALID_LR_SCHEDULES:
        raise ConfigError(f"{source}: scheduler {sched['type']!r} is a torch.optim.lr_scheduler "
                          f"class, which cannot drive ZeRO's optimizer (stage {stage}; torch "
                          "refuses it: not a torch.optim.Optimizer); use one of DeepSpeed's "
                          f"({', '.join(lr_schedules.VALID_LR_SCHEDULES)}) or ZeRO stage 0")


#: Adam's params that DeepSpeed reads itself and does not pass to the class it builds
_ADAM_OWN = ("adam_w_mode", "torch_adam", "fp32_optimizer_states")
#: what torch's Adam and Adagrad check the range of (>= 0; betas in [0, 1)), and DeepSpeed's
#: FusedAdam, DeepSpeedCPUAdam and DeepSpeedCPUAdagrad do not
_RANGED = ("lr", "betas", "eps", "weight_decay")


def _build_optimizer(cls, params: dict, where: str) -> None:
    """`cls` over a stand-in parameter, or, for DeepSpeed's classes (which compile an op when
    built), its signature bound to `params`: a one-line ConfigError for what it refuses."""
    import inspect

    import torch

    stand_in = [torch.nn.Parameter(torch.zeros(1))]
    try:
        if cls.__module__.startswith("torch."):
            cls(stand_in, **params)
        else:
            inspect.signature(cls.__init__).bind(None, stand_in, **params)
    except Exception as exc:
        raise ConfigError(f"{where} refuses its params {params}: {_one_line(exc)}") from None


def _check_optimizer_params(ds_config: dict, source: str, cuda: bool) -> None:
    """The optimizer's params checked as deepspeed.initialize will pass them, before the
    process group. What the class refuses (a key it does not take, a negative lr, betas
    outside [0, 1), max_grad_norm) stopped every rank inside deepspeed.initialize with a
    traceback; DeepSpeed's FusedAdam (GPUs) and DeepSpeedCPUAdam (offload_optimizer) check no
    range at all, so a negative lr trained uphill without a word; FusedLamb and FusedLion have
    no CPU build. `cuda`: whether this rank has a GPU (without one, dsfm runs Adam and AdamW as
    torch's: `engine.cpu_optimizer`)."""
    import torch

    from dsfm.runtime.engine import cpu_optimizer

    opt = cpu_optimizer(ds_config, cuda).get("optimizer")
    if opt is None:
        return
    name, params = opt["type"], dict(opt.get("params") or {})
    kind, where = name.lower(), f"{source}: optimizer {name}"
    if "max_grad_norm" in params:
        raise ConfigError(f"{where}: DeepSpeed refuses params.max_grad_norm; clip with the "
                          "top-level \"gradient_clipping\" instead")
    offload = ((ds_config.get("zero_optimization") or {}).get("offload_optimizer")
               or {}).get("device") in ("cpu", "nvme")
    if kind in ("lamb", "lion") and not cuda and not (kind == "lion" and offload):
        raise ConfigError(f"{where}: DeepSpeed builds it as Fused{kind.capitalize()}, a CUDA "
                          "op, and this machine has no GPU")
    ranged = None
    if kind in ("adam", "adamw"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        cls = (torch.optim.AdamW if params.get("torch_adam") else
               DeepSpeedCPUAdam if offload else FusedAdam)
        params = {k: v for k, v in params.items() if k not in _ADAM_OWN}
        ranged = torch.optim.Adam
    elif kind == "adagrad":
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

        cls = DeepSpeedCPUAdagrad if offload else torch.optim.Adagrad
        ranged = torch.optim.Adagrad
    elif kind in ("lamb", "lion") or kind.startswith("mu"):
        return                      # DeepSpeed's ops, mup's and Muon's classes: not built here
    else:
        cls = getattr(torch.optim, name)
    label = f"torch.optim.{cls.__name__}" if cls.__module__.startswith("torch.") \
        else cls.__name__
    if opt is not ds_config.get("optimizer"):       # torch_adam: cpu_optimizer's choice
        label += ", which dsfm runs in place of FusedAdam without a GPU"
    _build_optimizer(cls, params, f"{where} ({label})")
    if cls.__name__ == "FusedAdam" and params.get("amsgrad"):
        raise ConfigError(f"{where} (FusedAdam): DeepSpeed's FusedAdam has no amsgrad; remove it")
    if ranged is not None and not cls.__module__.startswith("torch."):
        _build_optimizer(ranged, {k: params[k] for k in _RANGED if k in params}, where)


def _check_scheduler_params(ds_config: dict, source: str) -> None:
    """The scheduler built as the engine will build it, over a stand-in optimizer: what its
    constructor refuses (WarmupCosineLR's warmup_num_steps of 0, a missing argument of a
    torch scheduler) is refused here, before the process group, instead of by
    deepspeed.initialize on every rank."""
    sched = ds_config.get("scheduler")
    if sched is None:
        return
    import torch

    from dsfm.runtime.schedule import LR_SCHEDULE
    from dsfm.runtime.warmup import scheduler_class

    name, params = sched["type"], sched.get("params", {})
    cls = scheduler_class(name, LR_SCHEDULE)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    try:
        with _quiet_deepspeed():
            cls(opt, **params)
    except Exception as exc:
        raise ConfigError(f"{source}: scheduler {name} refuses its params {params}: "
                          f"{_one_line(exc)}") from None


def probe(ds_config: dict, source: str) -> None:
    """DeepSpeed's own parser on the resolved config, on one rank's view: the batch keys are
    this run's (checked against the world size by `schedule.resolve`), so train_batch_size is
    left for it to derive."""
    from deepspeed.runtime import lr_schedules
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    # after the batch sizes' checks (schedule.resolve), which a config without an optimizer
    # may fail first; `check` has validated the ZeRO section
    zero = ds_config.get("zero_optimization") or {}
    stage = int(DeepSpeedZeroConfig(**zero).stage) if isinstance(zero, dict) else 0
    _check_zero_components(ds_config, source, stage, lr_schedules)
    _check_scheduler_params(ds_config, source)
    view = copy.deepcopy(ds_config)
    view.pop("train_batch_size", None)
    try:
        with _quiet_deepspeed():
            DeepSpeedConfig(view)
    except Exception as exc:
        raise ConfigError(f"{source}: DeepSpeed refuses it: {_one_line(exc)}") from None
    import torch

    # after DeepSpeed's parser, which refuses a zero_optimization that is not an object
    _check_optimizer_params(ds_config, source, torch.cuda.is_available())
