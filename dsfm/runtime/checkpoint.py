"""Checkpoints through the DeepSpeed engine, resume, preemption, export and fine-tuning loads.

A checkpoint is DeepSpeed's tag directory `<run>/checkpoints/step00000100/` (model, ZeRO
partitions of the optimizer, scheduler) plus what DeepSpeed does not know about:
  - client state (saved once): step, run config, field vocabulary, model shape;
  - `dsfm_rank<r>.pt` per rank: the loader's sampler state and the RNG states of that rank,
so a resumed run draws exactly the batches and drop-path masks it would have drawn.
Only the newest `keep` checkpoints are kept. SIGTERM or SIGUSR1 (SLURM preemption) asks for a
checkpoint at the next signal check, where all ranks agree on it through one all-reduce (every
`train.signal_check_every` steps, and right after each evaluation).
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import random
import re
import shutil
import signal

import numpy as np
import torch

from dsfm.errors import CheckpointError, ConfigError, first_line

TAG = "step{:08d}"
META = "dsfm_meta.json"           # step, model shape, vocabulary: readable without torch.load
_TAG_RE = re.compile(r"^step(\d{8})$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def run_dir_of(path: str) -> str:
    """The run directory `path` names: itself, or the parent of its checkpoints/ folder (what
    the export CLI and train.init_from take; a relative "checkpoints" is the current
    directory's)."""
    if not os.path.isdir(checkpoint_dir(path)) and \
            os.path.basename(os.path.normpath(path)) == "checkpoints":
        return os.path.dirname(os.path.normpath(path)) or os.curdir
    return path


def inside_a_run(path: str) -> str | None:
    """The run directory that `path` lies in when it is that run's checkpoints/ folder or one
    checkpoint's folder (it holds step<N> folders, or is one), else None: a --run-dir given
    so started a new run in there (--resume finding no checkpoint in its checkpoints/)."""
    full = os.path.abspath(path)            # "." or ".." from inside one too
    if not os.path.isdir(full):
        return None
    if _tag_dirs(full):
        return os.path.dirname(full)
    if _TAG_RE.match(os.path.basename(full)) and (
            os.path.isfile(os.path.join(full, META)) or
            os.path.isfile(os.path.join(full, "COMPLETE"))):
        return os.path.dirname(os.path.dirname(full))
    return None


def split_tag_dir(path: str, tag: str | None = None) -> tuple[str, str | None]:
    """(`path`, `tag`), or for a checkpoint's own folder (`RUN/checkpoints/step00000006`)
    its checkpoints folder and that tag: what the export CLI and train.init_from take (it said
    "no complete checkpoint to export"). A `tag` other than the folder's is a ConfigError."""
    name = os.path.basename(os.path.normpath(path))
    if not (_TAG_RE.match(name) and os.path.isdir(path)):
        return path, tag
    if tag not in (None, name):
        raise ConfigError(f"{path} is the checkpoint {name}, but --tag {tag} was asked for")
    return os.path.dirname(os.path.normpath(path)) or os.curdir, name


def _tag_dirs(ckpt_dir: str) -> list[str]:
    """Every tag directory, complete or not, oldest first (tags sort by step: fixed width)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(name for name in os.listdir(ckpt_dir) if _TAG_RE.match(name))


def tags(ckpt_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (a tag counts once every rank's file is there)."""
    return [name for name in _tag_dirs(ckpt_dir)
            if os.path.isfile(os.path.join(ckpt_dir, name, "COMPLETE"))]


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
         keep: int, prune: bool = True) -> str:
    """Collective: every rank calls it at the same step. `prune`: remove complete checkpoints
    beyond the newest `keep` (the trainer's are not pruned while updates are being skipped)."""
    import torch.distributed as td

    ckpt_dir = checkpoint_dir(run_dir)
    tag = TAG.format(step)
    rank = td.get_rank() if td.is_initialized() else 0
    if rank == 0:           # a tag written again stops counting as complete until it is
        for name in ("COMPLETE", META):
            try:
                os.remove(os.path.join(ckpt_dir, tag, name))
            except FileNotFoundError:
                pass
    if td.is_initialized():
        td.barrier()
    try:
        # DeepSpeed's `latest` (what its zero_to_fp32.py takes by default) is written below,
        # once the tag is complete and whole: DeepSpeed wrote it in place before the tag's
        # other files, so that a kill in between left it naming a checkpoint cut short
        engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state,
                               save_latest=False)
        path = os.path.join(ckpt_dir, tag, f"dsfm_rank{rank}.pt")
        # (a data stop's rank_state brings the random state from before the step it rewinds)
        torch.save({"rng": rng_state(), **rank_state}, path + ".tmp")
        os.replace(path + ".tmp", path)
        if td.is_initialized():
            td.barrier()
        if rank == 0:
            meta = {k: client_state[k] for k in ("step", "model_config", "vocabulary",
                                                 "scheduler", "lr_schedule", "freeze", "batch",
                                                 "sampler")
                    if k in client_state}
            if "optimizer_config" in client_state:
                meta["optimizer"] = client_state["optimizer_config"]
            meta["world_size"] = td.get_world_size() if td.is_initialized() else 1
            meta["files"] = file_sizes(os.path.join(ckpt_dir, tag))
            with open(os.path.join(ckpt_dir, tag, META), "w") as fh:
                json.dump(meta, fh, indent=1)
            with open(os.path.join(ckpt_dir, tag, "COMPLETE"), "w") as fh:
                fh.write(f"{step}\n")
            with open(os.path.join(ckpt_dir, "latest.tmp"), "w") as fh:
                fh.write(tag)
            os.replace(os.path.join(ckpt_dir, "latest.tmp"), os.path.join(ckpt_dir, "latest"))
    except (OSError, RuntimeError) as exc:
        # a disk or quota full, a file too large: the run stopped with torch's or DeepSpeed's
        # traceback, which for torch's writer says "unexpected pos 2112 vs 2004" and nothing
        # of space; not a peer lost in a barrier, whose report main gives
        if not _write_failed(exc):
            raise
        raise CheckpointError(save_failed(os.path.join(ckpt_dir, tag), rank, exc)) from None
    if rank == 0:
        # the newest `keep` complete checkpoints stay; so do unfinished ones newer than this
        # (none, unless another job writes here); unfinished older ones were cut off by a kill
        # and nothing will ever load them
        complete = tags(ckpt_dir)
        for old in complete[:-keep] * prune + [t for t in _tag_dirs(ckpt_dir)
                                       if t < tag and t not in complete]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    if td.is_initialized():
        td.barrier()
    return os.path.join(ckpt_dir, tag)


#: what torch's writer says when a file cannot be written whole (disk or quota full)
WRITE_FAILED = ("PytorchStreamWriter", "inline_container", "file write failed")


def _write_failed(exc: BaseException) -> bool:
    """Whether `exc` (an OSError or RuntimeError) is a file that could not be written: any
    OSError, or torch's writer failing."""
    return isinstance(exc, OSError) or any(m in str(exc) for m in WRITE_FAILED)


def save_failed(tag_dir: str, rank: int, exc: BaseException) -> str:
    """Why a checkpoint could not be written, the space left, and which one a resume takes."""
    ckpt_dir, tag = os.path.split(tag_dir)
    try:
        free = f"{shutil.disk_usage(ckpt_dir).free / 2**20:,.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    older = [t for t in tags(ckpt_dir) if t < tag]
    kept = (f"--resume continues from {older[-1]}, which is kept" if older else
            "no complete checkpoint before it")
    return (f"checkpoint {tag_dir}: writing it failed on rank {rank} ({type(exc).__name__}: "
            f"{first_line(exc) or 'no detail'}); {free}: free space (or raise the quota or "
            f"file-size limit) and resume; {kept}")


def file_sizes(tag_dir: str) -> dict[str, int]:
    """The size of every file of a tag directory that every rank wrote (DeepSpeed's and dsfm's),
    read through an open descriptor: on NFS, opening revalidates a file another node wrote,
    where a bare stat may answer from a cached attribute."""
    sizes = {}
    for entry in sorted(os.scandir(tag_dir), key=lambda e: e.name):
        if entry.name in (META, "COMPLETE") or not entry.is_file(follow_symlinks=False):
            continue
        with open(entry.path, "rb") as fh:
            sizes[entry.name] = os.fstat(fh.fileno()).st_size
    return sizes


def check_files(meta: dict, tag_dir: str, use: str = "resume") -> None:
    """Refuse a checkpoint one of whose files is missing or not the size it was written at (a
    copy cut short, a file damaged since): every rank checks every file, before any process
    group exists, so that all of them stop with the same line instead of the rank that holds
    the damaged file stopping alone while the others wait for it in a collective. Checkpoints
    written before dsfm recorded the sizes are not checked."""
    written = meta.get("files")
    if not isinstance(written, dict):
        return
    for name, size in written.items():
        path = os.path.join(tag_dir, name)
        try:
            now = os.stat(path).st_size
        except OSError as exc:
            problem = f"{name} is missing ({exc.strerror or exc})"
        else:
            if now == size:
                continue
            problem = f"{name} has {now:,} bytes, {size:,} when it was written"
        raise CheckpointError(f"{tag_dir}: {problem}; {_fallback(tag_dir, use)}")


def _fallback(tag_dir: str, use: str = "resume") -> str:
    """What to do with a damaged checkpoint: use the complete one before it, if any."""
    ckpt_dir, tag = os.path.split(os.path.normpath(tag_dir))
    older = [t for t in tags(ckpt_dir) if t < tag]
    if not older:
        return "no older complete checkpoint to fall back on"
    if use == "export":
        # consolidate's advice, for the export CLI and for train.init_from (which takes no tag:
        # it takes the file this writes)
        # a relative checkpoints/ (the export CLI run inside the run directory) has the
        # run directory '.': the command named none
        run_dir = os.path.dirname(ckpt_dir) or os.curdir
        return (f"export the one before it with --tag {older[-1]} (python -m "
                f"dsfm.runtime.export {run_dir} --tag {older[-1]}; "
                "train.init_from takes the file it writes)")
    return f"move it aside to resume from {older[-1]}"


def read_meta(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, META)
    try:
        with open(path) as fh:
            meta = json.load(fh)
        meta["model_config"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(f"{path}: missing or unreadable; is {tag_dir} a dsfm checkpoint?") \
            from None
    return meta


def newest_tag_dir(run_dir: str) -> str | None:
    found = tags(checkpoint_dir(run_dir))
    return os.path.join(checkpoint_dir(run_dir), found[-1]) if found else None


def passed_over(run_dir: str) -> str | None:
    """A note naming the unfinished checkpoints newer than the newest complete one (a save cut
    off by a kill or a full disk), which --resume passes over; None when there are none."""
    ckpt_dir = checkpoint_dir(run_dir)
    done = tags(ckpt_dir)
    newer = [t for t in _tag_dirs(ckpt_dir) if t not in done and (not done or t > done[-1])]
    if not newer:
        return None
    return (f"--resume: {', '.join(newer)} in {ckpt_dir} unfinished (no COMPLETE: the save was "
            f"cut off), passed over; resuming from "
            + (done[-1] if done else "step 0 (no complete checkpoint)"))


_ZERO3_MODEL = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
_ZERO_OPTIM = re.compile(r"^(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$")
#: the checkpoint layouts DeepSpeed 0.19 writes, by ZeRO stage: a layout loads only into an
#: engine of a stage that writes it (stages 1 and 2 share theirs; offloading changes nothing)
_LAYOUTS = {0: "without ZeRO (stage 0)", 1: "under ZeRO stage 1 or 2", 3: "under ZeRO stage 3"}


def zero_layout(tag_dir: str, meta: dict | None = None) -> int | None:
    """The checkpoint layout of a tag directory (a key of `_LAYOUTS`), from the file names
    its metadata records (or, without them, the directory's), None if they are not DeepSpeed's:
    ZeRO-3 writes a model-states file per rank, stages 1 and 2 one model-states file and
    an optimizer partition per rank, no ZeRO the model-states file alone."""
    names = (meta or {}).get("files")
    if not isinstance(names, dict):
        try:
            names = os.listdir(tag_dir)
        except OSError:
            return None
    if any(_ZERO3_MODEL.match(n) for n in names):
        return 3
    if "mp_rank_00_model_states.pt" not in names:
        return None
    return 1 if any(_ZERO_OPTIM.match(n) for n in names) else 0


def check_resume(run_dir: str, model_shape: tuple[int, int, int], world_size: int,
                 n_fields: int | None = None, vocabulary: dict | None = None,
                 freeze: str | None = None, zero_stage: int | None = None) -> dict | None:
    """Refuse, before any process group or engine exists, to resume a checkpoint this run
    could not load or would continue differently: another model shape, number of field
    columns, field vocabulary (column order), world size, ZeRO layout (stage 0, 1-2 or 3:
    DeepSpeed's load stops with a traceback on another) or set of trainable parameters
    (train.freeze: the ZeRO optimizer state holds the trainable ones only, and DeepSpeed
    stops with a traceback on another set). Every rank reads the small metadata
    file of the newest complete checkpoint and raises the same one-line error. `n_fields` and
    `vocabulary` are checked when given (they need the data's metadata). Returns the metadata,
    or None when there is no checkpoint to resume."""
    tag_dir = newest_tag_dir(run_dir)
    if tag_dir is None:
        return None
    meta = read_meta(tag_dir)
    saved = meta["model_config"]
    have = (saved["dim"], saved["heads"], saved["blocks"])
    if have != tuple(model_shape):
        raise ConfigError(f"--resume: {tag_dir} holds an AViT with dim/heads/blocks "
                          f"{have}, this run builds {tuple(model_shape)}; use the run's own "
                          "--config, or start a new run with train.init_from")
    check_fields(meta, tag_dir, n_fields, vocabulary)
    check_world(meta, tag_dir, world_size)
    saved_layout = zero_layout(tag_dir, meta)
    if zero_stage is not None and saved_layout is not None:
        ours = min(zero_stage, 1) if zero_stage < 3 else 3
        if ours != saved_layout:
            raise ConfigError(f"--resume: {tag_dir} was written {_LAYOUTS[saved_layout]} and "
                              f"this run's DeepSpeed config sets stage {zero_stage}: DeepSpeed "
                              "cannot load the one into the other; resume with a DeepSpeed "
                              "config of the checkpoint's ZeRO stage, or start a new run from "
                              f"its weights with train.init_from={run_dir}")
    saved_freeze = meta.get("freeze")          # absent in checkpoints written before it was
    if freeze is not None and saved_freeze is not None and saved_freeze != freeze:
        raise ConfigError(f"--resume: {tag_dir} was trained with train.freeze={saved_freeze}, "
                          f"this run sets {freeze}; its optimizer state covers those "
                          "parameters only. Resume with the same train.freeze, or start a new "
                          f"run from its weights with train.init_from={run_dir} to train "
                          "others")
    check_files(meta, tag_dir)
    return meta


def check_batch(meta: dict, tag_dir: str, micro: int, accumulation: int,
                world_size: int) -> str | None:
    """A resumed run takes the checkpoint's micro-batch (the loader's position in each
    dataset counts micro-batches of that size: another size is a one-line error here rather
    than the sampler's, after the process group and DeepSpeed's load); another gradient
    accumulation trains on from the checkpoint with another global batch, which a warning
    says (the run does not continue as the saved one would have). Checkpoints written
    before dsfm recorded the batch are not checked here. Returns the warning, or None."""
    saved = meta.get("batch")
    if not isinstance(saved, dict):
        return None
    if saved.get("micro") != micro:
        raise ConfigError(f"--resume: {tag_dir} was trained with micro-batches of "
                          f"{saved.get('micro')} (train_micro_batch_size_per_gpu), this run's "
                          f"DeepSpeed config sets {micro}; the loader's place in each dataset "
                          "counts micro-batches of the saved size: resume with that size (and "
                          "change gradient_accumulation_steps for another global batch), or "
                          "start a new run from its weights with train.init_from")
    if saved.get("accumulation") != accumulation:
        before, now = (micro * a * world_size for a in (saved.get("accumulation"), accumulation))
        return (f"warning: --resume: {tag_dir} was trained with gradient_accumulation_steps="
                f"{saved.get('accumulation')} ({before} samples per step), this run's DeepSpeed "
                f"config sets {accumulation} ({now} samples per step): the run goes on from the "
                "checkpoint with the new global batch, not as the saved run would have")
    return None


def check_sampler(meta: dict, tag_dir: str, ours: dict) -> None:
    """A resumed loader continues the saved sampler (its shuffles follow train.seed, its draws
    data.weights and data.same_dataset_across_ranks, its places in the datasets count their
    windows): another one was refused by the sampler's own state check only, after the process
    group, the engine and DeepSpeed's load. A one-line error here names what differs, from the
    layout train.py records in the metadata (`ours` is the same record for this run; the
    datasets, windows and shares are compared when it has them, i.e. when the data is there).
    Checkpoints written before dsfm recorded it are left to the sampler's check."""
    saved = meta.get("sampler")
    if not isinstance(saved, dict):
        return
    where = f"--resume: {tag_dir} was trained"
    fix = ("resume with the checkpoint's setting, or start a new run from its weights with "
           "train.init_from")
    for key in ("train.seed", "data.same_dataset_across_ranks"):
        if key in saved and key in ours and saved[key] != ours[key]:
            raise ConfigError(f"{where} with {key}={saved[key]}, this run sets {ours[key]}; "
                              f"the loader's place in the data follows it: {fix}")
    for key in ("data.n_steps_input", "data.dt_stride"):
        # refused even where every dataset keeps its count of windows (4 input steps at
        # stride 1 and 2 at stride 2 make as many): the saved place would go on over others
        if key in saved and key in ours and saved[key] != ours[key]:
            counts = [f" (dataset {name}: {before} train windows then, {now} now)"
                      for name, before, now in zip(ours.get("datasets", ()),
                                                   saved.get("windows", ()),
                                                   ours.get("windows", ())) if before != now]
            raise ConfigError(f"{where} with {key}={saved[key]}, this run sets {ours[key]}"
                              f"{counts[0] if counts else ''}; the loader's place in each "
                              f"dataset counts its windows, which this changes: {fix}")
    if "datasets" not in ours or "datasets" not in saved:
        return
    if saved["datasets"] != ours["datasets"]:
        raise ConfigError(f"{where} on datasets {', '.join(saved['datasets'])}, this run reads "
                          f"{', '.join(ours['datasets'])}; resume with the run's own "
                          "data.datasets and data.pdebench")
    for name, before, now in zip(ours["datasets"], saved["windows"], ours["windows"]):
        if before == now:
            continue
        raise ConfigError(f"{where} on {before} train windows of dataset {name}, which has "
                          f"{now} now (its files changed); the loader's place "
                          "in it counts windows: resume with the data it was trained on, or "
                          "start a new run from its weights with train.init_from")
    if not np.allclose(saved["shares"], ours["shares"]):
        before, now = ("/".join(f"{v:.3g}" for v in r["shares"]) for r in (saved, ours))
        raise ConfigError(f"{where} with data.weights={saved.get('data.weights')} (shares "
                          f"{before}), this run sets {ours.get('data.weights')} (shares {now}); "
                          f"the loader's draws follow them: {fix}")


def check_world(meta: dict, tag_dir: str, world_size: int, rank: int | None = None) -> None:
    """A checkpoint resumes only with the world size that wrote it (the sampler's shards
    depend on it), and a rank needs its own state file there."""
    saved = meta.get("world_size", len(glob.glob(os.path.join(tag_dir, "dsfm_rank*.pt"))))
    missing = rank is not None and not os.path.isfile(
        os.path.join(tag_dir, f"dsfm_rank{rank}.pt"))
    if saved != world_size or missing:
        raise ConfigError(f"{tag_dir} was written by {saved} ranks; this run has {world_size}. "
                          "Resume with the same world size, or start a new run from its "
                          "weights with train.init_from")


def check_fields(meta: dict, tag_dir: str, n_fields: int | None,
                 vocabulary: dict | None) -> None:
    """One-line errors for a checkpoint with other field columns or another vocabulary."""
    saved = meta["model_config"]["n_fields"]
    if n_fields is not None and saved != n_fields:
        raise ConfigError(f"--resume: {tag_dir} holds an AViT with {saved} field columns, this "
                          f"run builds {n_fields}; resume with the run's own data.datasets, "
                          "data.pdebench, model.n_fields and train.init_from")
    if vocabulary is not None and "vocabulary" in meta:
        vocab_mismatch(meta["vocabulary"], vocabulary, f"--resume: {tag_dir}")


def vocab_mismatch(saved: dict, ours: dict, where: str) -> None:
    """A one-line ConfigError if two field vocabularies (state dicts) differ."""
    if saved == ours:
        return
    a, b = list(saved["keys"]), list(ours["keys"])
    if saved.get("shared", False) != ours.get("shared", False):
        what = "shares columns between equal field names" if saved.get("shared") else \
            "gives each (dataset, field) its own column"
        raise ConfigError(f"{where}: its field vocabulary {what} and this run's does not "
                          "(data.shared_field_names)")
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    first = (f"column {i} is {a[i] if i < len(a) else 'absent'!r} there and "
             f"{b[i] if i < len(b) else 'absent'!r} here")
    raise ConfigError(f"{where}: its field vocabulary ({len(a)} fields) differs from this "
                      f"run's ({len(b)} fields): {first}; use the run's own data.datasets and "
                      "data.pdebench, in their order, and its train.init_from")


#: what torch.load and DeepSpeed say of a file that is cut short or damaged
DAMAGED = ("PytorchStreamReader", "zip archive", "central directory", "EOF", "load key",
           "truncated", "corrupt")


def load_latest(engine, run_dir: str, vocabulary: dict | None = None,
                n_fields: int | None = None) -> tuple[dict, dict] | None:
    """Load the newest complete checkpoint into the engine; (client_state, this rank's state),
    or None when the run directory has none. A checkpoint of another field vocabulary or
    number of field columns is refused with a one-line error before DeepSpeed loads it."""
    import torch.distributed as td

    ckpt_dir = checkpoint_dir(run_dir)
    found = tags(ckpt_dir)
    choice = [found[-1] if found else None]
    if td.is_initialized():     # rank 0's listing decides (a stale listing elsewhere cannot)
        td.broadcast_object_list(choice, src=0)
    tag = choice[0]
    if tag is None:
        return None
    rank = td.get_rank() if td.is_initialized() else 0
    world = td.get_world_size() if td.is_initialized() else 1
    tag_dir = os.path.join(ckpt_dir, tag)
    meta = read_meta(tag_dir)
    check_world(meta, tag_dir, world, rank)
    check_fields(meta, tag_dir, n_fields, vocabulary)
    check_files(meta, tag_dir)
    rank_file = os.path.join(tag_dir, f"dsfm_rank{rank}.pt")
    try:
        _, client = engine.load_checkpoint(ckpt_dir, tag=tag)
        if client is None:
            raise ConfigError(f"{tag_dir}: DeepSpeed could not load it")
        rank_state = torch.load(rank_file, weights_only=False)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as exc:
        # a file damaged after COMPLETE was written (a disk error, a copy cut short); not a
        # device out of memory or a peer lost during the load, whose advice would throw a good
        # checkpoint away
        if isinstance(exc, RuntimeError) and not any(m in str(exc) for m in DAMAGED):
            raise
        raise CheckpointError(
            f"{tag_dir}: unreadable on rank {rank} ({type(exc).__name__}: "
            f"{first_line(exc) or 'no detail'}); {_fallback(tag_dir)}") from None
    set_rng_state(rank_state.pop("rng"))
    fill_param_groups(engine)
    return client, rank_state


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO's holds it as `.optimizer`)."""
    opt = engine.optimizer
    while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def fill_param_groups(engine) -> None:
    """Give each loaded param group the hyperparameters it lacks from this optimizer's
    defaults: DeepSpeed's load puts back the param groups as saved, so a checkpoint of another
    Adam implementation (torch's AdamW, which dsfm runs without a GPU, resumed with the
    optimizer offloaded: DeepSpeedCPUAdam) stopped the first step with a KeyError
    ('bias_correction')."""
    opt = _inner_optimizer(engine)
    for group in opt.param_groups:
        for key, value in opt.defaults.items():
            group.setdefault(key, value)


def set_optimizer_params(engine, params: dict, lr: bool) -> None:
    """Set the config's optimizer `params` on the loaded param groups (those the groups hold;
    the lr only if `lr`): DeepSpeed's load restores them as saved (`schedule.optimizer_on_resume`,
    train.resume_schedule=new)."""
    for group in _inner_optimizer(engine).param_groups:
        for key, value in params.items():
            if key in group and (key != "lr" or lr):
                group[key] = tuple(value) if isinstance(group[key], tuple) else value


def restart_schedule(engine, new: dict | None = None) -> None:
    """Give the next step the rate of this run's schedule at the restored position. DeepSpeed's
    load restores the param groups' lr as saved, and its scheduler sets the next rate only
    after a step, so a run resumed on a changed schedule or optimizer lr
    (train.resume_schedule=new) made its first step at the saved rate. DeepSpeed's schedulers
    (dsfm's warmup classes among them) take their position as an argument. A torch scheduler
    (ZeRO stage 0) loads its saved settings over the config's, base rates included, so a run
    resumed with `new` (the ds_config of a changed schedule or lr under
    train.resume_schedule=new) went on with the old schedule while its log said it changed:
    it is built again from `new` and stepped to the restored position. An unchanged schedule
    gives the saved rate again."""
    from deepspeed.runtime import lr_schedules

    sched = engine.lr_scheduler
    if isinstance(sched, (lr_schedules.WarmupLR, lr_schedules.WarmupCosineLR,
                          lr_schedules.OneCycle, lr_schedules.LRRangeTest)):
        sched.step(sched.last_batch_iteration)
    elif new is not None and isinstance(sched, torch.optim.lr_scheduler.LRScheduler):
        engine.lr_scheduler = _replayed(sched, new["scheduler"].get("params", {}))


def _replayed(sched, params: dict):
    """A torch scheduler of `sched`'s class built from `params` over its optimizer, whose
    groups start from the optimizer's configured lr, and stepped as often as `sched` was: the
    rate a run on these settings from the start would have now."""
    import warnings

    opt = sched.optimizer
    for group in opt.param_groups:
        group.pop("initial_lr", None)
        group["lr"] = opt.defaults["lr"]
    with warnings.catch_warnings():     # "lr_scheduler.step() before optimizer.step()"
        warnings.simplefilter("ignore", UserWarning)
        fresh = type(sched)(opt, **params)
        for _ in range(sched.last_epoch):
            fresh.step()
    return fresh


def consolidate(run_dir_or_ckpt: str, tag: str | None = None) -> dict:
    """A consolidated fp32 state dict (from ZeRO-1, 2 or 3 partitions of any world size, or a
    checkpoint without ZeRO) with the model shape and field vocabulary beside it, in memory:
    what fine-tuning loads."""
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
    tag_dir = os.path.join(ckpt_dir, tag)
    if os.path.isfile(os.path.join(tag_dir, META)):
        check_files(read_meta(tag_dir), tag_dir, "export")
    client = _client_state(tag_dir)
    if zero_layout(tag_dir) == 0:
        # without ZeRO DeepSpeed saves the whole model's state dict beside the client state
        # (zero_to_fp32 finds no partitions there and fails with a TypeError)
        state = client["module"]
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
        if zero_layout(tag_dir) == 1:
            # DeepSpeed records frozen parameters for zero_to_fp32 from ZeRO-2 on: a ZeRO-1
            # run with train.freeze lost them (an export without blocks.*); at ZeRO-1 and 2 the
            # model-states file holds the whole module, trained weights included, in fp32
            state = {**client["module"], **state}
    missing = _missing_parameters(state, client["model_config"])
    if missing:
        raise ConfigError(f"{tag_dir}: the checkpoint's consolidated weights lack {len(missing)} "
                          f"of the model's parameters ({', '.join(missing[:3])}"
                          f"{', ...' if len(missing) > 3 else ''}); it cannot be exported")
    return {"model": {k: v.float().clone() for k, v in state.items()},
            "model_config": client["model_config"], "vocabulary": client["vocabulary"],
            "step": client["step"], "source": os.path.join(ckpt_dir, tag),
            "model_numerics": client.get("model_numerics")}


def _missing_parameters(state: dict, model_config: dict) -> list[str]:
    """The parameters and buffers of the checkpoint's model (built on the meta device: no
    memory) that `state` does not hold."""
    from dsfm.models.avit import AViT, AViTConfig

    with torch.device("meta"):
        model = AViT(AViTConfig(**model_config))
    return [k for k in model.state_dict() if k not in state]


def export_fp32(run_dir_or_ckpt: str, out: str, tag: str | None = None) -> str:
    """`consolidate` written to `out` (whole or not at all: a temporary file renamed); the
    tag exported. An `out` that is a directory, or that cannot be written, is a one-line
    ConfigError (it was an IsADirectoryError traceback after the whole consolidation)."""
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a directory; give a file name, e.g. "
                          f"{os.path.join(out, 'model_fp32.pt')}")
    payload = consolidate(run_dir_or_ckpt, tag)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        torch.save(payload, tmp)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as exc:
        if not _write_failed(exc):
            raise
        raise ConfigError(f"--out {out}: cannot write it ({type(exc).__name__}: "
                          f"{first_line(exc) or 'no detail'})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.basename(payload["source"])


def _client_state(tag_dir: str) -> dict:
    """The client state DeepSpeed saved beside the model (ZeRO-3 names its file per rank)."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        path = os.path.join(tag_dir, name)
        if os.path.isfile(path):
            return torch.load(path, weights_only=False, map_location="cpu")
    raise ConfigError(f"{tag_dir}: no DeepSpeed model-states file; is it a checkpoint?")


def load_pretrained(path: str) -> dict:
    """What `train.init_from` names: an exported file, or a run directory, whose newest
    complete checkpoint is consolidated in memory (its `export/model_fp32.pt` is used instead
    when it was exported from that same checkpoint; nothing is written, so ranks loading at
    once cannot race). One-line ConfigErrors for what cannot be loaded."""
    where = f"train.init_from {path}"
    path, tag = split_tag_dir(path)
    if tag is not None:                 # one checkpoint's folder: that one
        return _consolidated(path, tag, where)
    if os.path.isdir(path):
        # its checkpoints/ folder too, as the export CLI takes: "no complete checkpoint in
        # .../checkpoints/checkpoints" before
        path = run_dir_of(path)
        newest = tags(checkpoint_dir(path))
        if not newest:
            raise ConfigError(f"{where}: no complete checkpoint in {checkpoint_dir(path)}")
        export = os.path.join(path, "export", "model_fp32.pt")
        complete = os.path.join(checkpoint_dir(path), newest[-1], "COMPLETE")
        # exported from this very checkpoint: its tag, and written after it (a run directory
        # reused for a new run can hold an export of an older checkpoint of the same tag)
        if os.path.isfile(export) and os.path.getmtime(export) >= os.path.getmtime(complete):
            payload = _read_export(export, where)
            if os.path.basename(str(payload.get("source", ""))) == newest[-1]:
                return payload
        return _consolidated(path, newest[-1], where)
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file or run directory")
    return _read_export(path, where)


def _consolidated(path: str, tag: str, where: str) -> dict:
    """`consolidate(path, tag)` for `train.init_from` (`where`): its errors as one-line
    ConfigErrors that name the setting."""
    try:
        return consolidate(path, tag)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except Exception as exc:              # DeepSpeed's reader on a damaged checkpoint
        raise ConfigError(f"{where}: cannot consolidate {tag} "
                          f"({type(exc).__name__}: {first_line(exc)})") from None


def _read_export(path: str, where: str) -> dict:
    try:
        payload = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:              # not a torch file, truncated, another pickle
        raise ConfigError(f"{where}: not a readable PyTorch file ({type(exc).__name__}: "
                          f"{first_line(exc)})") from None
    for key in ("model", "model_config", "vocabulary"):
        if not isinstance(payload, dict) or key not in payload:
            raise ConfigError(f"{where}: not a dsfm export (no {key!r}); export one with "
                              "python -m dsfm.runtime.export RUN_DIR")
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

    def restore(self, hold_sigterm: bool = False) -> None:
        """The handlers found at the start back. `hold_sigterm`: SIGTERM stays noted and
        ignored, for a rank stopping on an error that is yet to say so: the launcher (DeepSpeed's,
        srun) sends it to the other ranks as soon as one exits with an error, which ended them
        before their line and train.log's were written. The caller puts SIGTERM's handler back
        after that (a launcher that waits no longer sends SIGKILL: DeepSpeed's after 30 s)."""
        for sig, handler in self._previous.items():
            if not (hold_sigterm and sig == signal.SIGTERM):
                signal.signal(sig, handler)
