"""The learning-rate schedule and batch geometry, taken from the DeepSpeed config.

The DeepSpeed JSON owns micro-batch size, accumulation, clipping, optimizer and scheduler; the
run config owns the run length. `"auto"` in the scheduler's step counts is filled from the run
length here (total = train.max_steps, warmup = 5% of it), so one JSON serves runs of any length.
"""

from __future__ import annotations

import copy

from dsfm.errors import ConfigError

WARMUP_FRACTION = 0.05
#: How DeepSpeed's warmup schedulers run; checkpoints record it as "lr_schedule" (1 where it is
#: absent). 1: DeepSpeed's own classes, whose first two updates take the warmup's starting rate
#: (lr 0 by default). 2: dsfm's (`dsfm.runtime.warmup`), step n at the schedule's rate at n.
LR_SCHEDULE = 2
#: the DeepSpeed schedulers `LR_SCHEDULE` is about (the others run as DeepSpeed or torch has them)
WARMUP_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
#: WarmupLR's and WarmupDecayLR's peak rate when the config gives no warmup_max_lr (DeepSpeed's)
DEEPSPEED_WARMUP_MAX_LR = 0.001
_STEP_KEYS = {
    "WarmupCosineLR": ("total_num_steps", "warmup_num_steps"),
    "WarmupDecayLR": ("total_num_steps", "warmup_num_steps"),
    "WarmupLR": (None, "warmup_num_steps"),
}


def resolve(ds_config: dict, max_steps: int, source: str = "--ds_config",
            world_size: int = 1) -> dict:
    """A copy of `ds_config` with "auto" step counts filled in and the batch keys checked
    against the world size (DeepSpeed needs train_batch_size = micro × accumulation × world)."""
    cfg = copy.deepcopy(ds_config)
    if "train_micro_batch_size_per_gpu" not in cfg and "train_batch_size" not in cfg:
        raise ConfigError(f"{source}: set train_micro_batch_size_per_gpu (the loader's batch "
                          "size is read from it) or train_batch_size")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "train_batch_size"):
        value = cfg.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{source}: {key} must be a positive integer, got {value!r}")
    if "train_micro_batch_size_per_gpu" not in cfg:
        # DeepSpeed's own reading of a global batch alone: micro = total / (accumulation ×
        # ranks), accumulation 1 unless given
        total, accum = cfg["train_batch_size"], cfg.get("gradient_accumulation_steps", 1)
        if total % (accum * world_size):
            raise ConfigError(f"{source}: train_batch_size {total} is not a multiple of "
                              f"accumulation {accum} × {world_size} ranks; set "
                              "train_micro_batch_size_per_gpu, or a train_batch_size that is")
        cfg["train_micro_batch_size_per_gpu"] = total // (accum * world_size)
    micro, accum = cfg["train_micro_batch_size_per_gpu"], cfg.get("gradient_accumulation_steps")
    if "train_batch_size" in cfg:
        total = cfg["train_batch_size"]
        if accum is None:
            if total % (micro * world_size):
                raise ConfigError(f"{source}: train_batch_size {total} is not a multiple of "
                                  f"micro-batch {micro} × {world_size} ranks")
        elif total != micro * accum * world_size:
            raise ConfigError(f"{source}: train_batch_size {total} != micro-batch {micro} × "
                              f"accumulation {accum} × {world_size} ranks "
                              f"(= {micro * accum * world_size}); drop train_batch_size or fix "
                              "it for this world size")
    sched = cfg.get("scheduler")
    if sched:
        params = sched.setdefault("params", {})
        total_key, warm_key = _STEP_KEYS.get(sched.get("type"), (None, None))
        for key, value in ((total_key, max_steps),
                           (warm_key, max(1, round(WARMUP_FRACTION * max_steps)))):
            if key and params.get(key, "auto") == "auto":
                params[key] = value
        left = [k for k, v in params.items() if v == "auto"]
        if left:
            raise ConfigError(f"{source}: scheduler.params {', '.join(left)} = \"auto\" is not "
                              "understood; give numbers")
    return cfg


def check_length(ds_config: dict, max_steps: int, source: str = "--ds_config") -> list[str]:
    """Warnings for the log where a resolved warmup schedule does not fit the run, each of
    which trained silently: it reaches its floor before train.max_steps (the steps after that
    train at the floor rate, 0 under WarmupDecayLR's default warmup_min_lr), its warmup
    outlasts the run (the rate never reaches its peak), or WarmupLR and WarmupDecayLR, which
    take their peak from warmup_max_lr (DeepSpeed's default 0.001), have none beside another
    optimizer lr. A total_num_steps below a warmup that ends within the run is a ConfigError:
    the rate would fall from its peak to its floor in one step."""
    sched = ds_config.get("scheduler") or {}
    name, params = sched.get("type"), sched.get("params") or {}
    if name not in WARMUP_SCHEDULERS:
        return []
    total_key, warm_key = _STEP_KEYS[name]
    total, warm = params.get(total_key), params.get(warm_key)
    notes = []
    if _number(warm) and warm > max_steps:
        notes.append(f"warning: {source}: scheduler {name} warms up for {warm} steps "
                     f"(warmup_num_steps), beyond train.max_steps={max_steps}: the rate never "
                     "reaches its peak")
    elif _number(warm) and _number(total) and total < warm:
        raise ConfigError(f"{source}: scheduler {name} total_num_steps {total} is below "
                          f"warmup_num_steps {warm}: the rate would fall from its peak to its "
                          "floor in one step after the warmup; raise total_num_steps "
                          "(\"auto\": train.max_steps)")
    elif _number(total) and total < max_steps:
        span = (f"step {max_steps} trains" if total + 1 >= max_steps
                else f"steps {total + 1}-{max_steps} train")
        notes.append(f"warning: {source}: scheduler {name} reaches its floor at step "
                     f"{total + 1} (total_num_steps {total}), before train.max_steps="
                     f"{max_steps}: {span} at the floor rate (\"auto\" ends the "
                     "schedule with the run)")
    lr = ((ds_config.get("optimizer") or {}).get("params") or {}).get("lr")
    if (name != "WarmupCosineLR" and "warmup_max_lr" not in params and _number(lr)
            and lr != DEEPSPEED_WARMUP_MAX_LR):
        notes.append(f"warning: {source}: scheduler {name} takes its peak rate from "
                     f"warmup_max_lr, not optimizer.params.lr ({lr}), and none is given: the "
                     f"run peaks at DeepSpeed's default {DEEPSPEED_WARMUP_MAX_LR}; set "
                     "scheduler.params.warmup_max_lr")
    return notes


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


ABSENT = object()


def _deepspeeds(scheduler: dict) -> bool:
    """Whether a scheduler section names one of DeepSpeed's classes (dsfm's warmup classes
    among them, which keep their state), not a torch.optim.lr_scheduler one."""
    from deepspeed.runtime import lr_schedules

    return scheduler.get("type") in lr_schedules.VALID_LR_SCHEDULES


def on_resume(saved, ds_config: dict, policy: str, source: str,
              max_steps: int) -> tuple[dict, str | None]:
    """The DeepSpeed config to resume with, and a note for the log. DeepSpeed restores a
    schedule's position (its step), not its shape, which comes from the config: a resumed run
    whose schedule resolved differently (most often "auto" steps following a new
    train.max_steps) would jump to another learning rate. `saved` is the checkpoint's resolved
    scheduler (None: it had none; `ABSENT`: a checkpoint too old to say). `policy`
    (train.resume_schedule): "check" refuses a change, "saved" resumes on the checkpoint's
    schedule, "new" takes this one."""
    ours = ds_config.get("scheduler")
    if saved is ABSENT or saved == ours:
        return ds_config, None
    if saved is None or ours is None:       # DeepSpeed cannot restore one into the other
        had = "without a learning-rate scheduler" if saved is None else f"with {saved}"
        has = "has none" if ours is None else f"has {ours}"
        raise ConfigError(f"--resume: {source} was trained {had} and this run {has}; resume "
                          "with the run's own scheduler settings")
    if policy != "saved" and _deepspeeds(saved) != _deepspeeds(ours):
        # DeepSpeed's load gives the saved state to this run's scheduler: a torch one's stopped
        # one of DeepSpeed's with KeyError('last_batch_iteration') after the process group, and
        # a torch one given DeepSpeed's kept its step 0, restarting the new schedule
        raise ConfigError(f"--resume: {source} was trained on the learning-rate scheduler "
                          f"{saved.get('type')}, this run's is {ours.get('type')}: one of "
                          "DeepSpeed's and one of torch's, neither of which can take up the "
                          "other's saved position; resume on a scheduler of the checkpoint's "
                          "kind, set train.resume_schedule=saved to continue on the saved "
                          "schedule, or start a new run from its weights with train.init_from")
    if policy == "saved":
        cfg = copy.deepcopy(ds_config)
        cfg["scheduler"] = copy.deepcopy(saved)
        note = f"resuming on the checkpoint's learning-rate schedule {saved}"
        total = saved.get("params", {}).get("total_num_steps")
        if isinstance(total, int) and total < max_steps:
            note = (f"warning: {note}, which ends at step {total}: from there to "
                    f"train.max_steps={max_steps} the rate stays at the schedule's floor")
        return cfg, note
    if policy == "new":
        return ds_config, (f"warning: the learning-rate schedule changes on resume from {saved} "
                           f"to {ours}; the rate jumps to the new schedule's value")
    raise ConfigError(f"--resume: {source} was trained on the learning-rate schedule {saved}, "
                      f"this run's is {ours} (\"auto\" steps follow train.max_steps); resume with "
                      "the same settings, or set train.resume_schedule=saved to continue on the "
                      "saved schedule or train.resume_schedule=new to switch to this one")


def optimizer_on_resume(saved, ds_config: dict, policy: str,
                        source: str) -> tuple[dict, str | None, dict | None]:
    """The DeepSpeed config to resume with, a note for the log, and the optimizer params to
    set on the loaded optimizer (None: none). DeepSpeed's load restores the optimizer's
    param groups as saved, so a resumed run whose config changed the optimizer's params kept
    the saved betas, eps and weight_decay without a word, and its lr: for good without a
    scheduler, for one step under dsfm's warmup schedulers (which scale the new one after).
    `saved` is the checkpoint's optimizer section (`ABSENT`: a checkpoint too old to say);
    `policy` (train.resume_schedule): "check" refuses a change, "saved" resumes with the
    checkpoint's params, "new" with this run's (set on the loaded param groups; the lr only
    without a scheduler, which otherwise sets it: checkpoint.restart_schedule). Another
    optimizer type is refused whatever the policy: the saved state is that optimizer's."""
    ours = ds_config.get("optimizer")
    if saved is ABSENT or saved == ours:
        return ds_config, None, None
    if str(saved.get("type", "")).lower() != str(ours.get("type", "")).lower():
        raise ConfigError(f"--resume: {source} was trained with optimizer {saved.get('type')}, "
                          f"this run's DeepSpeed config sets {ours.get('type')}; the saved "
                          "optimizer state is the former's: resume with it, or start a new run "
                          "from its weights with train.init_from")
    before, now = saved.get("params") or {}, ours.get("params") or {}
    changed = ", ".join(f"{k} {before.get(k, 'unset')} -> {now.get(k, 'unset')}"
                        for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))
    if policy == "saved":
        cfg = copy.deepcopy(ds_config)
        cfg["optimizer"] = copy.deepcopy(saved)
        return cfg, f"resuming with the checkpoint's optimizer params ({changed} not taken)", None
    if policy == "new":
        how = ("from the first resumed step, the lr through the scheduler"
               if ds_config.get("scheduler") else "from the first resumed step")
        return ds_config, (f"warning: the optimizer's params change on resume: {changed} "
                           f"({how})"), now
    raise ConfigError(f"--resume: {source} was trained with other optimizer params than this "
                      f"run's DeepSpeed config sets ({changed}), and DeepSpeed's load restores "
                      "the saved ones; set train.resume_schedule=new to switch to these, or "
                      "train.resume_schedule=saved to keep the checkpoint's")


def warmup_on_resume(saved: int, ds_config: dict, policy: str,
                     source: str) -> tuple[int, str | None]:
    """The `LR_SCHEDULE` to resume with, and a note for the log. A checkpoint written on
    DeepSpeed's own warmup schedulers (`saved` 1) holds their position, which dsfm's classes
    read as the same step: resumed on them, the rate would move ahead of the one the run was
    following, by two steps in the warmup and about one in the decay. So `policy`
    (train.resume_schedule, as for a changed schedule) "check" refuses that, "saved" finishes
    the run on DeepSpeed's classes, "new" takes dsfm's. `ds_config` is the config the run
    resumes with (`on_resume`'s)."""
    sched = (ds_config.get("scheduler") or {}).get("type")
    if saved >= LR_SCHEDULE or sched not in WARMUP_SCHEDULERS:
        return LR_SCHEDULE, None
    what = (f"{source} was trained on DeepSpeed's own {sched}, whose first two updates took "
            "the warmup's starting rate (lr 0 by default) and whose rates lag the run's steps "
            "by up to two")
    if policy == "saved":
        return saved, (f"resuming on DeepSpeed's own {sched}, as the checkpoint was trained "
                       "(train.resume_schedule=saved)")
    if policy == "new":
        return LR_SCHEDULE, (f"warning: {what}; resuming on dsfm's, where step n of the run "
                             "takes the warmup's rate at n: the rate moves ahead by up to two "
                             "steps of the schedule")
    raise ConfigError(f"--resume: {what}; dsfm now gives step n the warmup's rate at n, so "
                      "resuming would move the rate ahead by up to two steps of the schedule. "
                      "Set train.resume_schedule=saved to finish the run on DeepSpeed's "
                      "schedule, or train.resume_schedule=new to continue on dsfm's")


def zero_stage(ds_config: dict) -> int:
    """The config's ZeRO stage (0 when it has none)."""
    return (ds_config.get("zero_optimization") or {}).get("stage", 0)


def micro_batch(ds_config: dict) -> int:
    return int(ds_config["train_micro_batch_size_per_gpu"])


def accumulation(ds_config: dict, world_size: int) -> int:
    """Micro-batches per optimizer step, as DeepSpeed takes them from a config `resolve`
    checked: gradient_accumulation_steps, or what train_batch_size implies without it, or 1."""
    if "gradient_accumulation_steps" in ds_config:
        return int(ds_config["gradient_accumulation_steps"])
    if "train_batch_size" in ds_config:
        return int(ds_config["train_batch_size"]) // (micro_batch(ds_config) * world_size)
    return 1
