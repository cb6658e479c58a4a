"""The main job: MPP-style multi-physics pretraining of an Axial ViT under DeepSpeed.

    deepspeed dsfm/train.py --ds_config ds_configs/zero2.json          # the embedded demo
    deepspeed --hostfile hostfiles/raphael dsfm/train.py --ds_config ds_configs/zero2.json \
        --config dsfm/configs/mpp_b.yaml

Also runs as `python dsfm/train.py` (one process), under torchrun, mpirun or srun. The story of
a run: read the config, start the process group, find (or simulate) the data, build the field
vocabulary, the loader and the model, wrap it in a DeepSpeed engine, resume if asked, then train:
each micro-batch comes from one dataset, the loss is MPP's normalized MSE, checkpoints are
written every N steps and on SIGTERM/SIGUSR1 (also sent when the DeepSpeed launcher dies), and
the valid split is evaluated as NRMSE/VRMSE one step ahead and over an autoregressive rollout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

if __package__ in (None, ""):      # run as a script (deepspeed dsfm/train.py): make dsfm importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dsfm.config import RunConfig, dump, environment_sets, load_config  # noqa: E402
from dsfm.errors import ConfigError, DataError, DsfmError, first_line  # noqa: E402
from dsfm.helpfmt import HelpFormatter
from dsfm.models.avit import NUMERICS, numerics_note  # noqa: E402
from dsfm.monitor import board  # noqa: E402
from dsfm.monitor.session import RunMonitor  # noqa: E402
from dsfm.runtime import checkpoint, console, nonfinite, orphan, schedule  # noqa: E402
from dsfm.runtime import ds_config as ds_settings  # noqa: E402
from dsfm.runtime.dist import exit_process  # noqa: E402
from dsfm.runtime.engine import (  # noqa: E402
    all_reduce_,
    attention_choice,
    build_engine,
    check_devices,
    compile_choice,
    device,
    discover,
    finish,
    init_process_group,
    rank0_first,
    release_shm,
    set_tf32,
    told_by,
)
from dsfm.runtime.metrics import MetricsLogger  # noqa: E402
from dsfm.runtime.zero_blocks import gather_blocks_whole, held_gathered, whole_blocks  # noqa: E402
from dsfm.runtime.zero_local import keep_local_gradients, update_from_gradients  # noqa: E402
from dsfm.runtime.zero_norm import fuse_grad_norm  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(formatter_class=HelpFormatter, description=__doc__.split("\n")[0])
    # the shell expands ~ in `--run-dir ~/r` but not in `--run-dir=~/r`, which made a directory
    # named ~ under the working directory
    path = os.path.expanduser
    ap.add_argument("--ds_config", required=True, type=path, help="DeepSpeed JSON config "
                    "(batch, accumulation, clipping, optimizer, schedule, ZeRO stage)")
    ap.add_argument("--config", default=None, type=path, help="run preset YAML (default: "
                    "dsfm/configs/demo.yaml; a bare name is looked up in dsfm/configs/)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.max_steps=20 (repeatable)")
    ap.add_argument("--run-dir", default=None, type=path, help="output folder (default "
                    "runs/<name>-<timestamp>)")
    ap.add_argument("--resume", action="store_true", help="continue from the newest "
                    "checkpoint in --run-dir (default: the newest runs/<name>-* folder)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def read_configs(args: argparse.Namespace,
                 world_size: int) -> tuple[RunConfig, dict, list[str]]:
    """The run config and the DeepSpeed config, checked; warnings about the latter for the
    log."""
    cfg = load_config(args.config, args.sets, environment_sets())
    try:
        with open(args.ds_config, "rb") as fh:
            ds_config = json.load(fh)
    except OSError as exc:
        raise ConfigError(f"--ds_config {args.ds_config}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--ds_config {args.ds_config}: not valid JSON: byte {exc.start} "
                          f"({exc.object[exc.start]:#04x}) is not {exc.encoding} "
                          f"({exc.reason}); save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--ds_config {args.ds_config}: not valid JSON: {exc}") from None
    notes = ds_settings.check(ds_config, args.ds_config)
    ds_config = schedule.resolve(ds_config, cfg.train.max_steps, args.ds_config, world_size)
    ds_settings.probe(ds_config, args.ds_config)
    notes += schedule.check_length(ds_config, cfg.train.max_steps, args.ds_config)
    if cfg.model.compile is True and schedule.zero_stage(ds_config) == 3:
        raise ConfigError("model.compile is supported with ZeRO stages 0-2 (ZeRO-3 gathers "
                          f"parameters in module hooks that torch.compile would trace); "
                          f"{args.ds_config} sets stage 3")
    check_compile_mode(cfg, schedule.accumulation(ds_config, world_size))
    return cfg, ds_config, notes


def check_compile_mode(cfg: RunConfig, accumulation: int = 1) -> None:
    """model.compile_mode=reduce-overhead (the compiled blocks as CUDA graphs) needs the
    blocks compiled, the blocks not recomputed (a recomputed block would run its forward
    graph again inside the backward, where the graphs of its step are still in use) and one
    micro-batch a step: the parameters' gradients are the backward graphs' outputs, which
    the next micro-batch's replay overwrites, and accumulation keeps them across it."""
    if cfg.model.compile_mode == "default":
        return
    if accumulation > 1:
        raise ConfigError(f"model.compile_mode=reduce-overhead with {accumulation} micro-batches "
                          "a step (gradient_accumulation_steps): the CUDA graphs' next replay "
                          "would overwrite the gradients being accumulated; use one micro-batch "
                          "a step or compile_mode=default")
    if cfg.model.compile is False:
        raise ConfigError("model.compile_mode=reduce-overhead is a mode of the compiled blocks: "
                          "set model.compile=true (or auto)")
    if cfg.model.checkpoint_above_tokens is not None:
        raise ConfigError("model.compile_mode=reduce-overhead replays the compiled blocks as CUDA "
                          "graphs, which recomputed blocks would run again inside the backward: "
                          f"unset model.checkpoint_above_tokens "
                          f"({cfg.model.checkpoint_above_tokens}; --set "
                          "model.checkpoint_above_tokens=null) or use compile_mode=default")


@dataclass
class Checked:
    """What the checks before the process group read, for the run to use."""
    ds_config: dict
    pretrained: dict | None          # train.init_from's payload; dropped once in the model
    notes: list[str]
    eval_plan: dict[str, int] | None = None     # eval.plan_eval's, when the data was there
    train_split: list | None = None  # the train split as indexed, for the loader to reuse
    lr_schedule: int = schedule.LR_SCHEDULE     # how DeepSpeed's warmup schedulers run
    optimizer_params: dict | None = None        # set on the loaded optimizer (resume, "new")
    schedule_changed: bool = False   # resumed on another schedule or lr ("new")


def check_inputs(cfg: RunConfig, args: argparse.Namespace, world_size: int,
                 ds_config: dict) -> Checked:
    """What can be refused before any process group waits: the model's shape, the output and
    data directories, the data (unless it is to be simulated: every dataset's train split
    indexed from its metadata and stats.yaml, the mixture's weights and micro-batch against
    its windows, the valid split against the evaluation), the pretrained weights of
    train.init_from, and a checkpoint to resume that this run could not load or would continue
    differently (model, field columns, vocabulary and the sampler's datasets, windows and
    weights when the data is there to tell, world size, learning-rate schedule, micro-batch,
    seed). Returns the DeepSpeed config to run with, the pretrained payload (None without
    init_from), notes for the log, the evaluation plan and how the warmup schedulers run (a
    checkpoint's, on resume)."""
    from dsfm.data.prepare import (
        check_preset_windows,
        check_to_generate,
        dataset_paths,
        datasets_in,
    )
    from dsfm.models.avit import AViTConfig

    data = cfg.data
    AViTConfig(cfg.model.n_fields or 1, *cfg.model_shape(), cfg.model.drop_path,
               **computed_as(cfg))
    run = None if args.run_dir is None else checkpoint.inside_a_run(args.run_dir)
    if run is not None:
        raise ConfigError(f"--run-dir {args.run_dir} is inside the run directory {run} (its "
                          "checkpoints or one of them): give the run directory itself")
    if os.path.exists(data.base) and not os.path.isdir(data.base):
        raise ConfigError(f"data.base {data.base} is a file, not a directory of datasets")
    paths = None
    if not data.generate or datasets_in(data.base, complete=True):
        paths = dataset_paths(data.base, data.datasets, data.pdebench)
    else:
        check_to_generate(data.base, data.datasets, data.pdebench, data.generate)
        check_preset_windows(data.base, data.datasets, data.generate, data.n_steps_input,
                             data.dt_stride,
                             cfg.train.rollout_steps if cfg.train.eval_batches else None)
    pretrained = None
    notes = []
    if cfg.train.init_from:
        pretrained = resumed_shape(cfg, args) if args.resume else None
        if pretrained is None:
            pretrained = checkpoint.load_pretrained(cfg.train.init_from)
            note = numerics_note(pretrained.get("model_numerics"),
                                 f"train.init_from {cfg.train.init_from}")
            notes += [note] if note else []
            check_pretrained(cfg, pretrained)     # a resumed one: check_resume, below
    n_fields = vocab = plan = indexed = sampler = optimizer_params = None
    lr_schedule = schedule.LR_SCHEDULE
    changed = False
    if paths is not None:
        micro = schedule.micro_batch(ds_config)
        mixture, indexed, sampler = check_mixture(cfg, paths, pretrained, micro, world_size)
        vocab = mixture.state_dict()
        n_fields = model_config(cfg, mixture, pretrained).n_fields
        if cfg.train.eval_batches:
            plan = plan_evaluation(cfg, paths, micro, world_size)
    if args.resume:
        run_dir = args.run_dir or newest_run(cfg)
        if run_dir is None:
            raise ConfigError(f"--resume: no runs/{cfg.name}-<timestamp> folder; give --run-dir")
        meta = checkpoint.check_resume(run_dir, cfg.model_shape(), world_size, n_fields, vocab,
                                         cfg.train.freeze, schedule.zero_stage(ds_config))
        note = checkpoint.passed_over(run_dir)
        notes += [note] if note else []
        if meta is not None:
            tag_dir = checkpoint.newest_tag_dir(run_dir)
            ds_config, note = schedule.on_resume(meta.get("scheduler", schedule.ABSENT),
                                                 ds_config, cfg.train.resume_schedule, tag_dir,
                                                 cfg.train.max_steps)
            notes += [note] if note else []
            changed = note is not None and cfg.train.resume_schedule == "new"
            lr_schedule, note = schedule.warmup_on_resume(meta.get("lr_schedule", 1), ds_config,
                                                          cfg.train.resume_schedule, tag_dir)
            notes += [note] if note else []
            ds_config, note, optimizer_params = schedule.optimizer_on_resume(
                meta.get("optimizer", schedule.ABSENT), ds_config, cfg.train.resume_schedule,
                tag_dir)
            notes += [note] if note else []
            changed = changed or optimizer_params is not None
            note = checkpoint.check_batch(meta, tag_dir, schedule.micro_batch(ds_config),
                                          schedule.accumulation(ds_config, world_size),
                                          world_size)
            notes += [note] if note else []
            checkpoint.check_sampler(meta, tag_dir, sampler_layout(cfg, sampler))
    elif args.run_dir is not None:
        found = checkpoint.tags(checkpoint.checkpoint_dir(args.run_dir))
        if found:
            # a new run here would count its steps from 0 under the old run's checkpoints:
            # each one it writes is older than theirs, so keep_checkpoints prunes it at once,
            # and a later --resume or export takes the old run's weights
            raise ConfigError(f"run directory {args.run_dir} already holds checkpoints (the "
                              f"newest {found[-1]}); add --resume to continue that run, or "
                              "give a new --run-dir")
    if args.run_dir is not None:          # last: a refused run leaves no directory behind
        if os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
            raise ConfigError(f"run directory {args.run_dir}: a file, not a folder (--run-dir "
                              "names the folder a run writes its checkpoints and logs in)")
        try:
            os.makedirs(args.run_dir, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"run directory {args.run_dir}: {exc.strerror or exc}") from None
        try:
            # one that exists but cannot be written was found by rank 0's logger only, after
            # the process group, while the other ranks went on to wait for it
            with tempfile.TemporaryFile(dir=args.run_dir):
                pass
        except OSError as exc:
            raise ConfigError(f"run directory {args.run_dir}: cannot write in it "
                              f"({exc.strerror or exc})") from None
    return Checked(ds_config, pretrained, notes, plan, indexed, lr_schedule, optimizer_params,
                   changed)


def resumed_shape(cfg: RunConfig, args: argparse.Namespace) -> dict | None:
    """For a fine-tuning run resumed from its own checkpoint: the model shape and field
    vocabulary that checkpoint records, in place of train.init_from's payload (its weights,
    "model", None: the checkpoint's replace them). Resuming used to read train.init_from's
    weights again (every ZeRO partition of a run directory, on every rank) only to overwrite
    them, and stopped when that file or run directory had been moved or deleted since. None
    when there is no checkpoint to resume, or it does not record the vocabulary."""
    run_dir = args.run_dir or newest_run(cfg)
    tag_dir = checkpoint.newest_tag_dir(run_dir) if run_dir else None
    if tag_dir is None:
        return None
    meta = checkpoint.read_meta(tag_dir)
    if "vocabulary" not in meta:
        return None
    shared = bool(meta["vocabulary"].get("shared", False))
    if shared != cfg.data.shared_field_names:
        raise ConfigError(f"--resume: {tag_dir} was trained with data.shared_field_names="
                          f"{shared}, this run sets {cfg.data.shared_field_names}; resume with "
                          "the run's own setting (it decides which column a field takes)")
    return {"model": None, "model_config": meta["model_config"],
            "vocabulary": meta["vocabulary"], "source": tag_dir}


def check_pretrained(cfg: RunConfig, pretrained: dict) -> None:
    """The pretrained model defines the architecture: a config that says otherwise is refused
    rather than silently overridden (the run's config.yaml must describe its model)."""
    where = f"train.init_from {cfg.train.init_from}"
    saved = pretrained["model_config"]
    have = (saved["dim"], saved["heads"], saved["blocks"])
    if have != cfg.model_shape():
        raise ConfigError(f"{where} is an AViT with dim/heads/blocks {have}, this config builds "
                          f"{cfg.model_shape()}; set model.size (or model.dim, model.heads and "
                          "model.blocks) to match")
    shared = bool(pretrained["vocabulary"].get("shared", False))
    if shared != cfg.data.shared_field_names:
        raise ConfigError(f"{where} was trained with data.shared_field_names={shared}; set it "
                          "the same (it decides which embedding column a field takes)")
    if cfg.model.n_fields is not None and cfg.model.n_fields < saved["n_fields"]:
        raise ConfigError(f"model.n_fields={cfg.model.n_fields} is below the "
                          f"{saved['n_fields']} field columns of {where}; raise it or leave it "
                          "unset")
    from dsfm.models.avit import AViT, AViTConfig

    # weights that do not fit the model they name (parameters missing, others, other shapes)
    # were refused only once loaded, after the process group: checked here on a model without
    # storage (the meta device), nothing copied
    with torch.device("meta"):
        skeleton = AViT(AViTConfig(**saved))
    load_weights(skeleton, pretrained["model"], where)


def load_weights(model, weights: dict, where: str) -> None:
    """train.init_from's weights into `model` (taken as they are, not copied, into a model on
    the meta device); a one-line ConfigError if they do not fit it."""
    try:
        model.load_state_dict(weights, assign=next(model.parameters()).is_meta)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
        raise ConfigError(f"{where}: the weights do not fit the model they were saved with "
                          f"({lines[0] if lines else exc})") from None


def newest_run(cfg: RunConfig) -> str | None:
    """The newest runs/<name>-<YYYYmmdd-HHMMSS> folder (not another preset's runs/<name>-x-*).
    Looked for where choose_run_dir puts it: a name with a / (`lab/exp1`) makes its runs in
    runs/lab/, where --resume did not look, saying there was no such folder."""
    parent, stem = os.path.split(os.path.join("runs", cfg.name))
    pattern = re.compile(re.escape(stem) + r"-\d{8}-\d{6}")
    old = sorted(d for d in os.listdir(parent) if pattern.fullmatch(d)) \
        if os.path.isdir(parent) else []
    return os.path.join(parent, old[-1]) if old else None


def choose_run_dir(args: argparse.Namespace, cfg: RunConfig) -> str:
    """--run-dir, or for --resume the newest runs/<name>-*, or a new runs/<name>-<time>; rank
    0 decides and tells the others so a timestamp cannot differ between ranks."""
    import torch.distributed as td

    choice = [args.run_dir]
    if td.get_rank() == 0 and choice[0] is None:
        if args.resume:
            choice = [newest_run(cfg)]
            if choice[0] is None:
                raise ConfigError(f"--resume: no runs/{cfg.name}-<timestamp> folder; give "
                                  "--run-dir")
        else:
            choice = [os.path.join("runs", f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")]
    td.broadcast_object_list(choice, src=0)
    return choice[0]


def check_mixture(cfg: RunConfig, paths: list[str], pretrained: dict | None, micro: int,
                  world_size: int):
    """Index the train split of every dataset as the loader will (metadata and stats.yaml,
    no data read), check that the mixture's weights and micro-batch fit its windows, and return
    the field vocabulary the loader will build (the pretrained one first when fine-tuning, then
    the mixture's fields in dataset order), the indexed datasets, for the loader, and the
    mixture's sampler (rank 0's)."""
    from dsfm.data.prefetch import index_dataset, refuse_one_name_twice
    from dsfm.data.sampler import MixtureSampler

    data = cfg.data
    vocab = new_vocabulary(cfg, pretrained)
    indexed = [index_dataset(path, "train", data.n_steps_input, 1, data.dt_stride,
                             data.normalization) for path in paths]
    sources = [i.source for i in indexed]
    check_grids([(i.path, i.source) for i in indexed])
    for source in sources:
        vocab.add(source.vocabulary_name, source.channel_names)
    refuse_one_name_twice(indexed)
    names = [s.name for s in sources]
    if data.weights is not None and len(data.weights) != len(sources):
        raise ConfigError(f"data.weights has {len(data.weights)} numbers for "
                          f"{len(sources)} datasets ({', '.join(names)})")
    if data.weights is not None and not any(data.weights):
        raise ConfigError(f"data.weights {data.weights}: no dataset would be drawn; give at "
                          f"least one of {', '.join(names)} a positive weight")
    sampler = MixtureSampler([len(s) for s in sources], micro, cfg.train.seed, 0, world_size,
                             data.weights, data.same_dataset_across_ranks, names)
    return vocab, indexed, sampler


def sampler_layout(cfg: RunConfig, sampler=None) -> dict:
    """What a checkpoint records of the loader's sampling, for checkpoint.check_sampler to
    compare on --resume before any process group: the options it follows and, given the
    sampler, the datasets, their train windows and their shares of the mixture."""
    data = cfg.data
    layout = {"train.seed": cfg.train.seed,
              "data.same_dataset_across_ranks": data.same_dataset_across_ranks,
              "data.n_steps_input": data.n_steps_input, "data.dt_stride": data.dt_stride,
              "data.weights": data.weights}
    if sampler is not None:
        layout.update(datasets=list(sampler.names), windows=list(sampler.sizes),
                      shares=sampler.weights.tolist())
    return layout


def check_grids(datasets) -> None:
    """Every dataset of the mixture, (path, source) pairs, on a grid the AViT takes: 2D, H and
    W multiples of the patch. Otherwise the first micro-batch drawn from one that is not would
    stop the run mid-training, with a traceback."""
    from dsfm.models.avit import grid_problem

    for path, source in datasets:
        problem = grid_problem(tuple(source.spatial_shape))
        if problem:
            raise ConfigError(f"dataset {source.name} ({path}) {problem}; leave it out of "
                              "data.datasets and data.pdebench")


def plan_evaluation(cfg: RunConfig, paths: list[str], micro: int, world_size: int):
    """eval.plan_eval for this run; a ConfigError when the valid split cannot serve it."""
    from dsfm.eval import plan_eval

    return plan_eval(paths, n_steps_input=cfg.data.n_steps_input,
                     rollout_steps=cfg.train.rollout_steps, batch_size=micro,
                     batches=cfg.train.eval_batches, world_size=world_size,
                     dt_stride=cfg.data.dt_stride)


def new_vocabulary(cfg: RunConfig, pretrained: dict | None):
    from dsfm.data.fields import FieldVocabulary

    return FieldVocabulary.from_state_dict(pretrained["vocabulary"]) if pretrained \
        else FieldVocabulary(shared=cfg.data.shared_field_names)


def computed_as(cfg: RunConfig) -> dict:
    """How the run's config has the model compute (the same numbers to fp32 rounding, so the
    run's config decides, not what a checkpoint's weights were trained with)."""
    m = cfg.model
    # (torch.cuda.is_available: the checks before the process group run this, before each
    # rank has chosen its GPU, and must not open a CUDA context on the first one)
    attention = attention_choice(m.attention, torch.cuda.is_available(), cfg.train.tf32)[0]
    return {"attention": attention, "backward_matmuls": m.backward_matmuls,
            "fp32_matmuls": m.fp32_matmuls}


def model_config(cfg: RunConfig, vocab, pretrained: dict | None):
    """The AViT this run trains: the config's shape, and field columns for every field of the
    vocabulary (at least model.n_fields; when fine-tuning, at least the pretrained ones). A
    model.n_fields below the vocabulary's fields is refused, when fine-tuning too: there it
    was raised to them without a word, so the run's config.yaml named fewer columns than its
    model and checkpoints hold."""
    from dsfm.models.avit import AViTConfig

    dim, heads, blocks = cfg.model_shape()
    if cfg.model.n_fields is not None and cfg.model.n_fields < len(vocab):
        held = (f" ({len(pretrained['vocabulary']['keys'])} of them pretrained, from "
                f"train.init_from {cfg.train.init_from})"
                if pretrained and pretrained["model"] is not None else "")  # None: resumed
        raise ConfigError(f"model.n_fields={cfg.model.n_fields} but the mixture has "
                          f"{len(vocab)} fields{held}; raise it or leave it unset")
    if pretrained:
        n_fields = max(pretrained["model_config"]["n_fields"], len(vocab),
                       cfg.model.n_fields or 0)
        return AViTConfig(**{**pretrained["model_config"], "n_fields": n_fields,
                             "drop_path": cfg.model.drop_path, **computed_as(cfg)})
    return AViTConfig(cfg.model.n_fields or len(vocab), dim, heads, blocks, cfg.model.drop_path,
                      **computed_as(cfg))


def build_vocabulary_and_model(cfg: RunConfig, pretrained: dict | None, loader_factory, log,
                               compiled: tuple[bool, str | None] = (False, None)):
    """The field vocabulary (the pretrained one first, if fine-tuning), the loader that extends
    it with the mixture's fields, and the AViT sized for it; `compiled`: whether to compile its
    blocks, and the log's line on it (`compile_choice`)."""
    from dsfm.models.avit import AViT, n_parameters

    vocab = new_vocabulary(cfg, pretrained)
    loader = loader_factory(vocab)
    try:
        config = model_config(cfg, vocab, pretrained)
        torch.manual_seed(cfg.train.seed)
        if pretrained:
            # the run's config as `model_config` made it, at the pretrained width first
            model = AViT(replace(config, n_fields=pretrained["model_config"]["n_fields"]))
            if pretrained["model"] is not None:     # None: resumed (`resumed_shape`)
                load_weights(model, pretrained["model"], f"train.init_from {cfg.train.init_from}")
            model.add_fields(config.n_fields - model.n_fields)
            if pretrained["model"] is None:
                log.text(f"fine-tuning run resumed: {len(vocab)} fields as its checkpoint "
                         f"{pretrained['source']} records (train.init_from "
                         f"{cfg.train.init_from} not read: the checkpoint holds the weights)")
            else:
                log.text(f"fine-tuning from {cfg.train.init_from}: {len(vocab)} fields "
                         f"({len(pretrained['vocabulary']['keys'])} pretrained)")
        else:
            model = AViT(config)
        {"middle": model.freeze_middle, "processor": model.freeze_processor,
         "none": model.unfreeze}[cfg.train.freeze]()
        if compiled[0]:
            graphs = cfg.model.compile_mode == "reduce-overhead"
            model.compile_blocks(**({"mode": "reduce-overhead"} if graphs else {}))
            if graphs:
                log.text("model: the compiled blocks replayed as CUDA graphs "
                         "(model.compile_mode=reduce-overhead" + (
                             ")" if torch.cuda.is_available() else
                             "; no GPU: PyTorch compiles them without graphs)"))
        elif cfg.model.compile_mode != "default":
            log.text(f"model: model.compile_mode={cfg.model.compile_mode} unused: the blocks run "
                     "eager")
        if compiled[1]:
            log.text(compiled[1])
        chose = attention_choice(cfg.model.attention, torch.cuda.is_available(),
                                 cfg.train.tf32)[1]
        if chose:
            log.text(chose)
        model.checkpoint_above_tokens = cfg.model.checkpoint_above_tokens
        if model.checkpoint_above_tokens is not None:
            log.text(f"model: the blocks' activations recomputed in the backward for micro-batches "
                     f"of more than {model.checkpoint_above_tokens:,} tokens "
                     "(model.checkpoint_above_tokens)")
    except BaseException:
        loader.close()
        raise
    log.text(f"model: AViT dim {model.config.dim}, {model.config.heads} heads, "
             f"{model.config.blocks} blocks, {model.n_fields} field columns: "
             f"{n_parameters(model):,} parameters ({n_parameters(model, True):,} trainable)")
    return vocab, loader, model


def largest_over_ranks(device: torch.device):
    """For `AViT.tokens_across_ranks`: a micro-batch's tokens → the largest of every rank's
    (an all-reduce, on `device`), so that the ranks decide alike whether to recompute."""
    import torch.distributed as td

    def largest(tokens: int) -> int:
        n = torch.tensor([tokens], dtype=torch.int64, device=device)
        return int(all_reduce_(n, td.ReduceOp.MAX).item())
    return largest


def nonfinite_where(dataset: str, world_size: int) -> str:
    """Where a non-finite loss was, for its warning: the dataset, and on several ranks that it
    is rank 0's (a collective found the loss non-finite on at least one)."""
    return (f"dataset {dataset}" if world_size == 1 else
            f"rank 0's dataset {dataset}; NaN/Inf on at least one rank")


def nonfinite_micro_batches(flags: list, device) -> list[tuple[int, str]]:
    """After a skipped update, on every rank (a collective; ZeRO's skip is the same on all):
    the micro-batches whose loss was not finite on at least one rank, as (index, this rank's
    dataset). `flags`: this rank's (dataset, finite tensor) per micro-batch of the step."""
    import torch.distributed as td

    if not flags:
        return []
    finite = torch.stack([f.reshape(()) for _, f in flags]).to(device=device, dtype=torch.int32)
    all_reduce_(finite, td.ReduceOp.MIN)
    return [(i, flags[i][0]) for i, ok in enumerate(finite.tolist()) if not ok]


def last_batch_failure(loader) -> DataError | None:
    """The loader's error for NaN/Inf in the last batch it handed out, or None. On CUDA that
    check is read one next() late, so that a batch with NaN has gone through its step when the
    loader says so: read where the step's non-finite loss is (the host waits there anyway),
    the data error stops the run at the batch's own step and names its file, rather than a
    step later, or not at all once train.max_nonfinite skipped updates have stopped the run
    (as the weights' or the learning rate's fault). On the CPU every batch was checked as it
    was handed out: None. The loader closes itself on an error."""
    try:
        loader.check_last()
    except DataError as exc:
        return exc
    return None


def data_stop(exc: BaseException | None, failed: int, at: int, saved: int, run_dir: str,
              told: str = "", skipped: bool = True, written: bool = True) -> str:
    """Why every rank stops after rank `failed`'s loader failed during step `at` (`exc`: this
    rank's error, if its loader failed too; `told`: rank `failed`'s, which every rank repeats).
    `skipped`: every rank skipped the update of step `at` (ZeRO), else it stopped before it
    (its micro-batch was skipped before the backward). `saved`: the step of the checkpoint that
    holds the run: the last update applied's (`written` now, or on disk already), or a later
    one on disk, written on a signal during skipped updates; 0: none."""
    if saved == 0:      # no update yet (a fresh run's first step), and no checkpoint
        then = ("every rank stopped before the first update, with nothing to checkpoint: mend "
                "or replace the file and start the run again")
    else:
        then = (f"every rank skipped the update of step {at}" if skipped else
                f"every rank stopped before the update of step {at}")
        then += (f" after writing the checkpoint of step {saved}" if written else
                 f"; the checkpoint of step {saved} holds the run")
        then += (f": mend or replace the file, then --resume --run-dir {run_dir} continues "
                 f"from step {saved}")
    if exc is not None:
        return f"{exc}; {then}"
    return f"rank {failed}'s loader failed at step {at}: {told}; {then}"


def eval_data_stop(exc, at: int, run_dir: str) -> str:
    """Why every rank stops after a rank's loader failed in the evaluation at step `at`
    (`exc`: the EvaluationDataError every rank raised), its checkpoint written (at step 0,
    before any update, there is none to write)."""
    what = (f"evaluation at step {at} (valid split; the evaluation's own loader, whose steps "
            f"count its batches): {exc}")
    if at == 0:
        return (f"{what}; every rank stopped before the first update, with nothing to "
                "checkpoint: mend or replace the file and start the run again (or set "
                "train.eval_at_start=false)")
    return (f"{what}; every rank stopped after writing the checkpoint of step {at}: mend or "
            f"replace the file, then --resume --run-dir {run_dir} evaluates step {at} and goes "
            "on")


def nonfinite_stop(n: int, step: int, first_step: int, applied: int, run_dir: str,
                   what: str = "non-finite losses", before_any_update: bool | None = None) -> str:
    """Why the run stops after `n` non-finite losses (or updates skipped for non-finite
    gradients) in a row, the last at step `step + 1`, and what to try. `applied`: the step of
    the last update applied before them (the resumed step if none was), whose weights gave
    them: a checkpoint of that step or later holds those weights, so the advice names the
    newest one before it. `before_any_update`: whether no update was ever applied (by default:
    the step is the first)."""
    head = f"{n} {what} in a row at step {step + 1}"
    if step == 0 if before_any_update is None else before_any_update:
        return (f"{head}, before any update, so not the learning rate: the loader found the "
                "inputs finite, so look for values too large for fp32 in the model "
                "(data.normalization off, or a stats.yaml that does not fit the data), "
                "weights of train.init_from that are not, or input frames uniform over space "
                "in every field (the model's stem divides them by its epsilon: "
                "docs/training.md)")
    fix = "the run diverged; lower the learning rate (ds_config optimizer.params.lr)"
    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    kept = [int(t[len("step"):]) for t in checkpoint.tags(ckpt_dir)]
    before = [k for k in kept if k < applied]
    after = [checkpoint.TAG.format(k) for k in kept if k >= applied]
    if before:
        fix += (f" and resume from the checkpoint of step {before[-1]} ({ckpt_dir}) with "
                "train.resume_schedule=new, which takes the new rate")
        if after:
            fix += (f"; move {', '.join(after)} aside first (--resume takes the newest): "
                    f"{'they hold' if len(after) > 1 else 'it holds'} the weights of step "
                    f"{applied}, whose losses were not finite")
    elif after:
        fix += (f" and start again: the checkpoints kept ({', '.join(after)}) hold the weights "
                f"of step {applied}, whose losses were not finite")
    elif first_step == 0:
        fix += " and start again (no checkpoint was written)"
    if what == "non-finite losses":
        fix += ("; unless the data holds input frames uniform over space in every field, which "
                "the model's stem divides by its epsilon (docs/training.md)")
    return f"{head}: {fix}"


def config_changes(saved: dict | None, ours: dict, prefix: str = "") -> list[str]:
    """`key: before -> now` for each run setting a resumed run changed (nested as dotted
    keys; none for a checkpoint that recorded no config). A key the checkpoint's dsfm did not
    have yet is no change of the user's: left out."""
    if not isinstance(saved, dict):
        return []
    out = []
    for key in sorted(set(saved) & set(ours)):
        before, now = saved[key], ours[key]
        if isinstance(before, dict) and isinstance(now, dict):
            out += config_changes(before, now, f"{prefix}{key}.")
        elif before != now:
            out.append(f"{prefix}{key}: {before!r} -> {now!r}")
    return out


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's torch stream after the model is built (drop-path masks differ between
    data-parallel ranks, as their data does); the initialisation itself is the same on all."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


#: what gloo and NCCL say when the other end of a collective has gone away
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "remote process exited", "NCCL communicator was aborted")


def peer_lost(exc: RuntimeError) -> str | None:
    """The line of a collective's error that says a peer has gone, or None for any other
    error (whose traceback is then the right report)."""
    for line in str(exc).splitlines():
        if any(p in line for p in PEER_LOST):
            return re.sub(r"^\[[^\]]*\] ?", "", line.strip())[:160]
    return None


def before_group(env) -> str:
    """The prefix of an error before the process group: which rank says it, when several run
    (none knows yet whether the others failed too)."""
    return f" (rank {env.rank} of {env.world_size})" if env and env.world_size > 1 else ""


def say_error(line: str) -> None:
    """One write of the line and its newline (print makes two), so that the lines of ranks
    failing at once do not interleave in the launcher's output."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.keep_going()    # a launcher's pipe that closes first must not end a checkpoint
    # SIGUSR1 (Slurm's --signal warning: checkpoint and carry on) must not end the start-up
    # (data, model, engine, the checkpoint's load), where its default action would: there is
    # nothing new to checkpoint until the first step, from which checkpoint.Preemption
    # handles it. SIGTERM keeps its default and ends a start-up at once.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sigterm = signal.getsignal(signal.SIGTERM)      # held by a failing train(): put back last
    env = None
    try:
        env = discover()
        orphan.watch(env.rank)        # SIGTERM if the launcher dies
        cfg, ds_config, ds_notes = read_configs(args, env.world_size)
        checked = check_inputs(cfg, args, env.world_size, ds_config)
        checked.notes += ds_notes
        checked.notes += check_devices(env, torch.cuda.device_count()
                                       if torch.cuda.is_available() else 0)
        ds_config = checked.ds_config
    except DsfmError as exc:
        say_error(f"error{before_group(env)}: {exc}")    # every rank that fails here
        return 2
    try:
        init_process_group(env)
    except torch.distributed.DistError as exc:     # the rendezvous: a port in use, no server
        busy = "EADDRINUSE" in str(exc) or "address already in use" in str(exc)
        say_error(f"error{before_group(env)}: the process group's rendezvous at {env.master_addr}:"
                  f"{env.master_port} failed ({first_line(exc)[:200]})"
                  + ("; that port is in use: set MASTER_PORT to a free one (or the "
                     "launcher's --master_port)" if busy else ""))
        return 2
    log, rc, run_dir = None, None, None
    try:
        run_dir = choose_run_dir(args, cfg)
        try:
            log = MetricsLogger(run_dir, env.rank)
        except OSError as exc:
            raise ConfigError(f"run directory {run_dir}: {exc.strerror or exc}") from None
        if env.rank == 0:
            with open(os.path.join(run_dir, "config.yaml"), "w") as fh:
                fh.write(dump(cfg))
            with open(os.path.join(run_dir, "ds_config.json"), "w") as fh:
                json.dump(ds_config, fh, indent=2)
        for note in checked.notes:
            log.text(note)
        log.text(f"run {cfg.name}: {run_dir} | {env.world_size} rank(s) via {env.described()}, "
                 f"{'CUDA' if torch.cuda.is_available() else 'CPU (gloo)'}, ZeRO stage "
                 f"{schedule.zero_stage(ds_config)}")
        try:
            rc = train(cfg, ds_config, checked, args, env, run_dir, log)
        except RuntimeError as exc:
            lost = peer_lost(exc) if env.world_size > 1 else None
            if lost is None:
                raise
            raise DsfmError(f"another rank stopped while this one waited for it in a "
                            f"collective ({lost}); its own error is in its output") from None
        return rc
    except DsfmError as exc:
        msg = f"error (rank {env.rank}): {exc}"
        say_error(msg)
        if log is not None:
            log.text(msg, console=False)
        return 1
    except KeyboardInterrupt:   # Ctrl-C: every rank of the terminal's foreground group at once
        msg = f"interrupted (rank {env.rank}, SIGINT): stopped without a checkpoint"
        if run_dir is not None:
            done = checkpoint.tags(checkpoint.checkpoint_dir(run_dir))
            msg += (f"; --resume --run-dir {run_dir} continues from step {int(done[-1][4:])}"
                    if done else "; none was written")
            msg += " (SIGTERM checkpoints before it stops)"
        say_error(msg)
        if log is not None:
            log.text(msg, console=False)
        return 130
    finally:
        try:
            if log is not None:
                log.close()
        finally:               # a log that cannot be written must not keep /dev/shm buffers
            try:
                (finish if rc == 0 else release_shm)(env)
            finally:
                signal.signal(signal.SIGTERM, sigterm)


def train(cfg: RunConfig, ds_config: dict, checked: Checked, args, env, run_dir: str,
          log: MetricsLogger) -> int:
    import torch.distributed as td
    from tqdm import tqdm

    from dsfm.data.prefetch import WellLoader
    from dsfm.data.prepare import dataset_paths
    from dsfm.eval import EvaluationDataError, evaluate, format_table, nmse

    log.text(set_tf32(cfg.train.tf32))
    if cfg.model.fp32_matmuls == "3xtf32":
        log.text("numerics: the blocks' projections and MLP as three TF32 tensor-core products "
                 "each, summed in fp32 (model.fp32_matmuls=3xtf32: nearer fp32 than TF32, not "
                 "fp32: on an H200 5-25 times strict fp32's error)")
    micro = schedule.micro_batch(ds_config)
    data = cfg.data
    paths = rank0_first(lambda: dataset_paths(data.base, data.datasets, data.pdebench,
                                              data.generate, progress=cfg.train.progress),
                        "data")                     # the others wait while rank 0 simulates
    if env.rank != 0:
        paths = dataset_paths(data.base, data.datasets, data.pdebench)

    indexed = checked.train_split                  # as the checks read it, if they could
    checked.train_split = None

    def make_loader(vocab):
        same = indexed is not None and [i.path for i in indexed] == paths
        return WellLoader(indexed if same else paths, split="train",
                          n_steps_input=data.n_steps_input, n_steps_output=1,
                          batch_size=micro, num_workers=data.num_workers,
                          seed=cfg.train.seed, rank=env.rank, world_size=env.world_size,
                          normalization=data.normalization, weights=data.weights,
                          same_dataset_across_ranks=data.same_dataset_across_ranks,
                          dt_stride=data.dt_stride, ring_slots=data.ring_slots,
                          vocabulary=vocab)

    compiled = compile_choice(cfg.model.compile, schedule.zero_stage(ds_config),
                              device().type == "cuda")
    vocab, loader, model = build_vocabulary_and_model(cfg, checked.pretrained, make_loader, log,
                                                      compiled)
    checked.pretrained = None                       # its weights are in the model now
    torch.manual_seed(rank_seed(cfg.train.seed, env.rank))
    try:
        # data simulated since the checks: its grids checked here, on every rank alike
        check_grids(zip(paths, (d.source for d in loader.datasets)))
        names = [d.source.name for d in loader.datasets]
        log.text("data: " + ", ".join(f"{n} ({len(d.source)} windows)"
                                      for n, d in zip(names, loader.datasets)))
        for n, d in zip(names, loader.datasets):
            if d.source.unused_fields:
                log.text(f"data: {n}: time-invariant fields {', '.join(d.source.unused_fields)} "
                         "are not model inputs (the AViT takes and predicts the time-varying "
                         "fields; docs/training.md)")
        plan = checked.eval_plan
        if cfg.train.eval_batches and plan is None:    # data simulated since the checks
            plan = plan_evaluation(cfg, paths, micro, env.world_size)
        if plan is not None:
            short = [f"{n} {b}" for n, b in plan.items() if b < cfg.train.eval_batches]
            if short:
                log.text(f"evaluation: train.eval_batches={cfg.train.eval_batches}, but the "
                         "valid split holds fewer micro-batches per rank of " + ", ".join(short)
                         + " (one pass, each window once; the eval JSON gives the windows "
                         "evaluated and the split_windows held)")
        affine = (loader.affine if cfg.train.loss_units == "physical" and data.normalization
                  else lambda name: (None, None))
        zero3 = schedule.zero_stage(ds_config) == 3
        if zero3:
            why = (gather_blocks_whole(model, ds_config) if cfg.train.zero3_whole_blocks
                   else "train.zero3_whole_blocks is false")               # None: marked
        engine, _, _ = build_engine(model, ds_config, fused_grad_norm=False,
                                    lr_schedule=checked.lr_schedule, local_gradients=False,
                                    whole_blocks=False)
        if zero3:
            # counted after initialize, which marks the leaf modules a ds_config names itself
            units = whole_blocks(engine.module)
            log.text("ZeRO-3 gathers parameters " + (
                f"block by block ({len(model.zero3_blocks())} blocks, each as one unit; "
                "train.zero3_whole_blocks)" if why is None else
                f"of {units} modules as one unit each, the others' module by module ({why})"
                if units else f"module by module ({why})"), console=False)
            log.text(held_gathered(engine), console=False)
            if (env.world_size > 1 and model.checkpoint_above_tokens is not None
                    and not cfg.data.same_dataset_across_ranks):
                model.tokens_across_ranks = largest_over_ranks(engine.device)
                log.text("model: the ranks' micro-batches may differ in size (data.same_dataset_"
                         "across_ranks=false): the largest micro-batch of the ranks decides for "
                         "all of them whether the blocks are recomputed, as ZeRO-3 gathers a "
                         "recomputed block's parameters again (model.checkpoint_above_tokens)")
        why = (fuse_grad_norm(engine) if cfg.train.fused_grad_norm     # None: installed
               else "train.fused_grad_norm is false")
        log.text("gradient norm: " + ("one multi-tensor norm per step (train.fused_grad_norm)"
                                      if why is None else f"DeepSpeed's own ({why})"),
                 console=False)
        why = (keep_local_gradients(engine) if cfg.train.local_gradients   # None: installed
               else "train.local_gradients is false")
        log.text("gradients: " + ("taken in place on one rank (train.local_gradients)"
                                  if why is None else f"DeepSpeed's reduction ({why})"),
                 console=False)
        if why is None:
            why = update_from_gradients(engine)                       # None: installed
            log.text("update: " + ("from the gradients where they lie, no flat copy"
                                   if why is None else f"from DeepSpeed's flat copy ({why})"),
                     console=False)
        accum = engine.gradient_accumulation_steps()
        why = nonfinite.skips_nonfinite_updates(engine)                 # None: the step skips
        on_device = why is None
        log.text("non-finite losses: " + (
            "caught on the device; the step skips an update whose gradients are not finite "
            "(no host read before each backward)" if on_device else
            f"read before each backward, the micro-batch skipped ({why})"), console=False)
        client_state = {"model_config": asdict(model.config), "vocabulary": vocab.state_dict(),
                        "config": cfg.model_dump(), "scheduler": ds_config.get("scheduler"),
                        # not "optimizer": without ZeRO, DeepSpeed keeps the optimizer's state
                        # under that key in the file the client state goes to
                        "optimizer_config": ds_config.get("optimizer"),
                        "lr_schedule": checked.lr_schedule,
                        "model_numerics": NUMERICS, "freeze": cfg.train.freeze,
                        "batch": {"micro": micro, "accumulation": accum},
                        "sampler": sampler_layout(cfg, loader.sampler)}
        dev = engine.device
        # the loss of the steps since the last log line (a resumed run continues the window)
        loss_sum = torch.zeros(len(names), device=dev, dtype=torch.float64)
        loss_n = torch.zeros(len(names), device=dev, dtype=torch.float64)
        # on_device: non-finite losses of steps DeepSpeed did not skip (none, unless a ZeRO
        # optimizer stops skipping non-finite norms); read where the host waits anyway
        unskipped = torch.zeros(1, device=dev, dtype=torch.float64)

        def check_unskipped(at: int) -> None:
            """Collective: stop if a non-finite loss reached an update since the last check."""
            if not on_device:
                return
            n = int(all_reduce_(unskipped.clone()).item())
            if n:
                raise DsfmError(
                    f"{n} micro-batches with a non-finite loss reached an update by step {at}: "
                    "DeepSpeed's step did not skip them (dsfm/runtime/nonfinite.py expects "
                    f"{type(engine.optimizer).__name__} to skip a non-finite gradient norm); "
                    "the weights may no longer be finite, so nothing was saved")

        def evaluated(at: int) -> bool:
            """Whether the run directory holds the evaluation of step `at` (rank 0's answer,
            for every rank: the evaluation is collective)."""
            answer = [False]
            if env.rank == 0:    # written whole since; one an older dsfm cut short is redone
                try:
                    with open(os.path.join(run_dir, f"eval_step{at:08d}.json")) as fh:
                        answer = [isinstance(json.load(fh), dict)]
                except (OSError, ValueError):
                    pass
            if env.world_size > 1:
                td.broadcast_object_list(answer, src=0)
            return bool(answer[0])

        step = saved_at = 0
        client = {}                     # the resumed checkpoint's client state
        # the resumed step's evaluation is missing (a signal checkpoints and stops before it,
        # as a kill during it leaves it), so the run makes it before training on (or, at
        # train.max_steps, as its final one)
        redo_eval = False
        if args.resume:
            resumed = checkpoint.load_latest(engine, run_dir, vocab.state_dict(),
                                             model.config.n_fields)  # ZeRO-3: partitioned
            if resumed is None:
                log.text(f"--resume: no checkpoint in {run_dir}; starting from step 0")
            else:
                client, rank_state = resumed
                if checked.optimizer_params is not None:      # train.resume_schedule=new
                    checkpoint.set_optimizer_params(engine, checked.optimizer_params,
                                                    lr=not ds_config.get("scheduler"))
                checkpoint.restart_schedule(engine, ds_config if checked.schedule_changed
                                            else None)
                loader.load_state_dict(rank_state["loader"])
                if "loss_window" in rank_state:
                    loss_sum.copy_(rank_state["loss_window"][0])
                    loss_n.copy_(rank_state["loss_window"][1])
                step = saved_at = int(client["step"])
                redo_eval = bool(cfg.train.eval_batches) and (
                    step >= cfg.train.max_steps or bool(cfg.train.eval_every) and
                    step % cfg.train.eval_every == 0) and not evaluated(step)
                # its scalars from before, if the dead run logged them, go with the records
                # of the steps after the checkpoint
                log.resume_at(step, redo_eval=redo_eval)
                log.text(f"resumed from step {step} ({checkpoint.checkpoint_dir(run_dir)})")
                note = numerics_note(client.get("model_numerics"), "the checkpoint")
                if note:
                    log.text(note)
                changed = config_changes(client.get("config"), cfg.model_dump())
                if changed:   # what was refused is not here: its checks ran before the group
                    log.text("--resume: settings changed since the checkpoint: "
                             + "; ".join(changed))
                if step >= cfg.train.max_steps:
                    log.text(f"the checkpoint already reaches train.max_steps="
                             f"{cfg.train.max_steps}: nothing to train")

        if step == 0:
            # a run directory whose earlier run died before its first checkpoint (started
            # again, with or without --resume): its records would stand beside the new ones
            dropped = log.resume_at(-1)
            if dropped:
                log.text(f"run directory {run_dir}: {dropped} metrics records of an earlier run "
                         "that left no checkpoint dropped (this run starts at step 0)")
        first_step = applied = step     # applied: the step of the last update applied
        skipped_in_a_row = 0            # updates ZeRO skipped (non-finite gradients) just now
        losses_in_a_row = 0             # of them, those whose losses were not finite
        bad_in_a_row = 0                # without ZeRO: non-finite micro-batches skipped just now
        deferred = False                # a checkpoint_every step's checkpoint, not yet written
        if "streak" in client:
            # a checkpoint written during skipped updates (on a signal): the count towards
            # train.max_nonfinite and the advice's last update applied go on from there
            streak = client["streak"]
            applied, skipped_in_a_row = int(streak["applied"]), int(streak["skipped"])
            losses_in_a_row = int(streak["losses"])
        rewind = None                   # what a data stop saves (set at the first step)

        def save(at: int, rewound: dict | None = None) -> None:
            """Collective. During updates skipped in a row, the weights are those whose losses
            or gradients were not finite: a checkpoint written then (on a signal, at the end)
            prunes no older one. `rewound`: the loader, random and loss-window state to save
            in place of the current ones (a data stop's, from before the step after `at`)."""
            nonlocal saved_at, deferred
            check_unskipped(at)
            state = rewound or {"loader": loader.state_dict(),
                                "loss_window": (loss_sum, loss_n)}
            window = tuple(t.cpu() for t in state["loss_window"])
            # (a rewound state is of the start of the step after an update applied: no streak;
            # a deferred checkpoint is this one; a step ends on a finite micro-batch, which
            # ends a streak of skipped ones without ZeRO)
            streak = {"applied": applied, "skipped": 0, "losses": 0} if rewound \
                else {"applied": applied, "skipped": skipped_in_a_row,
                      "losses": losses_in_a_row}
            with monitor.outside_training():
                path = checkpoint.save(engine, run_dir, at,
                                       {**client_state, "step": at, "streak": streak},
                                       {**state, "step": at, "loss_window": window},
                                       cfg.train.keep_checkpoints,
                                       prune=not skipped_in_a_row)
            saved_at = at
            deferred = False
            log.text(f"checkpoint: {path}" + (
                f" (after {skipped_in_a_row} skipped updates: no older checkpoint pruned)"
                if skipped_in_a_row else ""), console=bool(skipped_in_a_row))

        def run_eval(at: int) -> None:
            if not cfg.train.eval_batches:
                return
            try:
                with monitor.outside_training():
                    results = evaluate(engine, paths, n_steps_input=data.n_steps_input,
                                       rollout_steps=cfg.train.rollout_steps, batch_size=micro,
                                       batches=cfg.train.eval_batches, vocabulary=vocab,
                                       seed=cfg.train.seed, rank=env.rank,
                                       world_size=env.world_size,
                                       normalization=data.normalization,
                                       dt_stride=data.dt_stride, num_workers=data.num_workers,
                                       plan=plan)
            except EvaluationDataError as exc:
                # every rank, at once: the progress since the last checkpoint is kept
                if at and saved_at != at:
                    save(at)
                raise DataError(eval_data_stop(exc, at, run_dir)) from None
            except DsfmError as exc:
                # a valid file's bad values read as the training's, at a "step" that is the
                # evaluation loader's batch
                raise type(exc)(f"evaluation at step {at} (valid split; the evaluation's own "
                                f"loader, whose steps count its batches): {exc}") from None
            k = cfg.train.rollout_steps
            scalars = {}
            for name, fields in results.items():
                for fname, m in fields.items():
                    for key in ("nrmse_1step", "vrmse_1step", f"nrmse_rollout{k}",
                                f"vrmse_rollout{k}"):
                        scalars[f"eval/{name}/{fname}/{key}"] = m[key]
            log.scalars(at, scalars)
            log.text(f"evaluation at step {at} (valid split, physical units):\n"
                     + format_table(results, k))
            if env.rank == 0:       # whole or not at all: `evaluated` takes it as done
                path = os.path.join(run_dir, f"eval_step{at:08d}.json")
                with open(path + ".tmp", "w") as fh:
                    json.dump(results, fh, indent=2)
                os.replace(path + ".tmp", path)

        monitor = RunMonitor(model.config, dev, cfg.monitor.interval_s, cfg.monitor.gpu,
                             cfg.monitor.system, notice=log.text,
                             frozen=frozenset(n for n, p in model.named_parameters()
                                              if not p.requires_grad))
        log.custom_scalars(board.layout(names, gpu=dev.type == "cuda"))
        preemption = checkpoint.Preemption()

        def on_signal(flag: int) -> bool:
            """Checkpoint at this step (once) for a signal the ranks agreed on; whether to stop
            (SIGTERM, level 2)."""
            then = " and stopping" if flag == 2 else ""
            if step == 0:               # during an evaluation before the first step
                log.text(f"signal received before the first step: nothing to checkpoint{then}")
            elif saved_at == step:      # written before the evaluation, or resumed from
                log.text(f"signal received: the checkpoint of step {step} is written{then}")
            else:
                log.text(f"signal received: checkpointing at step {step}{then}")
                save(step)
            return flag == 2

        # to a file (a Slurm log, nohup), not a terminal: a redraw every 30 s, not every 0.1 s
        # (ten a second over a three-day run is some 200 MB of log)
        tty = sys.stdout.isatty()
        bar = tqdm(total=cfg.train.max_steps, initial=step, unit="step", dynamic_ncols=True,
                   disable=env.rank != 0 or not cfg.train.progress, file=sys.stdout,
                   mininterval=0.1 if tty else 30.0)
        stop = False
        evaluating = cfg.train.eval_at_start and step == 0
        if evaluating:
            run_eval(0)
        elif redo_eval and step < cfg.train.max_steps:
            evaluating = True
            run_eval(step)
        if evaluating:                  # a signal during it: as after the loop's evaluations
            signal_flag = preemption.requested()
            if signal_flag:
                stop = on_signal(signal_flag)
        engine.train()
        # this rank's loader error (a NaN in a file, a file gone bad, a reader that died), after
        # which its micro-batches are stand-ins (zeros shaped like the last one's dataset's)
        data_failed, last = None, None

        def data_failure_agreed() -> int | None:
            """Collective, where every rank skips the same update (ZeRO) or micro-batch, as a
            stand-in's NaN loss makes them: the lowest rank whose loader failed, or None."""
            t = torch.tensor([env.world_size - env.rank if data_failed else 0], device=dev)
            v = int(all_reduce_(t, td.ReduceOp.MAX).item())
            return env.world_size - v if v else None

        def stop_for_data(failed: int, at: int, skipped: bool) -> None:
            """Every rank: the checkpoint of the last update applied (which the data error did
            not reach), with every rank's loader, loss window and random state as they were
            before the step after it (`rewind`), then stop; `at`: the step the error came in.
            The failing rank's loader stopped short of its peers': saved where each stood, the
            ranks would resume at different places in the sampler, and with the same dataset
            on every rank they would draw different datasets from then on. Every rank's line
            names the file: the failing rank may be ended before it says so."""
            told = told_by(failed, None if data_failed is None else str(data_failed), dev)
            # (one written since, on a signal during skipped updates, is of a step's end too)
            written = saved_at < applied
            if written:
                save(applied, rewind)
            raise DsfmError(data_stop(data_failed, failed, at, saved_at, run_dir, told,
                                      skipped=skipped, written=written))
        lr = float(engine.get_lr()[0])
        while step < cfg.train.max_steps and not stop:
            if step == applied:     # what a data stop saves, until an update is applied again
                rewind = {"loader": loader.state_dict(), "rng": checkpoint.rng_state(),
                          "loss_window": (loss_sum.clone(), loss_n.clone())}
            skipped_before = engine.skipped_steps
            done = 0
            flags = []          # on_device: (dataset, finite) of each micro-batch, read on a skip
            monitor.timer.begin_step()
            while done < accum:
                # after a data error the other ranks are in this step's collectives already:
                # join them on stand-ins, skip the update with them, and stop with a checkpoint
                batch, data_failed = loader.next_or_stand_in(data_failed, last)
                if data_failed is None:
                    last = batch.dataset
                monitor.timer.start()
                pred = engine(batch.x, batch.field_ids, batch.bcs_host)
                scale, shift = affine(batch.dataset)
                loss = nmse(pred, batch.y[:, 0], scale=scale, shift=shift)
                if data_failed is not None:
                    loss = loss * float("nan")
                if on_device:   # a non-finite loss makes the gradients NaN: the step skips
                    backward_loss, finite = nonfinite.guard(loss)
                    flags.append((batch.dataset, finite))
                    unskipped.add_(torch.logical_not(finite))
                else:
                    backward_loss = loss
                    finite = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
                    all_reduce_(finite, td.ReduceOp.MIN)
                if not on_device and not finite.item():   # every rank skips it together
                    data_failed = data_failed or last_batch_failure(loader)
                    failed = data_failure_agreed()
                    if failed is not None:
                        stop_for_data(failed, step + 1, skipped=False)
                    bad_in_a_row += 1
                    where = nonfinite_where(batch.dataset, env.world_size)
                    log.text(f"warning: non-finite loss at step {step + 1} ({where}): "
                             f"micro-batch skipped ({bad_in_a_row} in a row)")
                    del batch, pred, loss, backward_loss     # and the graph with them
                    if bad_in_a_row >= cfg.train.max_nonfinite:
                        raise DsfmError(nonfinite_stop(bad_in_a_row, step, first_step,
                                                       applied, run_dir))
                    continue
                bad_in_a_row = 0
                monitor.timer.lap("forward")
                engine.backward(backward_loss)
                monitor.timer.lap("backward")
                lr = float(engine.get_lr()[0])   # the rate this step's update uses
                engine.step()
                monitor.timer.lap("optimizer")
                monitor.micro_batch(tuple(batch.x.shape), loader.last_wait_s)
                d = names.index(batch.dataset)
                if on_device:   # the window's mean is of the finite losses
                    loss_sum[d] += torch.where(finite, loss.detach().double(), 0.0)
                    loss_n[d] += finite
                else:
                    loss_sum[d] += loss.detach().double()
                    loss_n[d] += 1
                done += 1
                del batch, pred, loss, backward_loss, finite
            monitor.timer.end_step()
            step += 1
            if engine.skipped_steps > skipped_before:   # ZeRO found inf/NaN gradients
                skipped_in_a_row += 1
                bad = nonfinite_micro_batches(flags, engine.device) if on_device else []
                for _, finite in flags:       # skipped: these did not reach the weights
                    unskipped.sub_(torch.logical_not(finite).to(unskipped.dtype))
                data_failed = data_failed or last_batch_failure(loader)
                failed = data_failure_agreed()
                if failed is not None:
                    stop_for_data(failed, step, skipped=True)
                losses_in_a_row = losses_in_a_row + 1 if bad else 0
                if bad:
                    i, dataset = bad[0]
                    where = nonfinite_where(dataset, env.world_size)
                    if accum > 1:
                        where = f"micro-batch {i + 1} of {accum}, {where}"
                    log.text(f"warning: non-finite loss at step {step} ({where}): DeepSpeed "
                             f"skipped the update ({skipped_in_a_row} in a row)")
                else:
                    log.text(f"warning: non-finite gradients at step {step}: DeepSpeed skipped "
                             f"the update ({skipped_in_a_row} in a row)")
                if skipped_in_a_row >= cfg.train.max_nonfinite:
                    losses = losses_in_a_row == skipped_in_a_row
                    raise DsfmError(nonfinite_stop(
                        skipped_in_a_row, step - 1, first_step, applied, run_dir,
                        "non-finite losses" if losses else
                        "updates skipped for non-finite gradients",
                        before_any_update=applied == 0 and skipped_in_a_row == step))
            else:
                skipped_in_a_row = losses_in_a_row = 0
                applied = step
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                check_unskipped(step)
                sums = all_reduce_(torch.cat([loss_sum, loss_n])).cpu()
                per = sums[:len(names)] / sums[len(names):].clamp(min=1)
                counted = float(sums[len(names):].sum())
                # None: every loss of the window was non-finite (its updates skipped)
                mean = float(sums[:len(names)].sum()) / counted if counted else None
                grad_norm = engine.get_global_grad_norm()
                scalars = {"train/loss": mean, "train/lr": lr,
                           "train/grad_norm": None if grad_norm is None else float(grad_norm)}
                for i, name in enumerate(names):
                    if sums[len(names) + i] > 0:
                        scalars[f"train/loss/{name}"] = float(per[i])
                everyone = board.gather(monitor.collect())       # collective: all ranks
                if everyone is not None:
                    scalars.update(board.combine(everyone))
                log.scalars(step, scalars)
                shown = "n/a" if mean is None else format(mean, ".5f")
                bar.set_postfix(loss="n/a" if mean is None else f"{mean:.4f}",
                                lr=f"{scalars['train/lr']:.2e}", refresh=tty)
                # no norm (stage 0 without clipping, ZeRO's compute_grad_norm off): "n/a", where
                # the line said 0.000
                grad = scalars["train/grad_norm"]
                log.text(f"step {step:>7d}  loss {shown}  lr {scalars['train/lr']:.3e}  "
                         f"grad {'n/a' if grad is None else format(grad, '.3f')}  "
                         f"{scalars.get('perf/samples_per_sec', 0):.1f} samples/s  "
                         f"step {scalars.get('time/step_ms', 0):.1f} ms (data wait "
                         f"{scalars.get('perf/data_wait_pct', 0):.1f}%)", console=False)
                if step % cfg.train.log_every == 0:
                    # not at a last step between log steps: the checkpoint written there keeps
                    # the window, so that a run resumed for more steps logs the same mean at
                    # its next log step as a run that never stopped
                    loss_sum.zero_()
                    loss_n.zero_()
            signal_flag = preemption.requested() \
                if step % cfg.train.signal_check_every == 0 else 0
            if signal_flag:
                stop = on_signal(signal_flag)
            elif deferred or (cfg.train.checkpoint_every
                              and step % cfg.train.checkpoint_every == 0):
                if not skipped_in_a_row:
                    save(step)
                elif not deferred:
                    # its weights gave this step non-finite losses or gradients: written after
                    # the next update applied, so that it cannot prune a sound one
                    deferred = True
                    log.text(f"checkpoint of step {step} deferred: its update was skipped")
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and not stop:
                run_eval(step)
                # a signal that came during the evaluation (minutes, with many batches) is
                # acted on now, not signal_check_every steps later: Slurm's SIGKILL follows
                # its SIGTERM after KillWait. Collective: every rank evaluates at this step.
                # At the last step the run checkpoints and ends next anyway.
                signal_flag = preemption.requested() if step < cfg.train.max_steps else 0
                if signal_flag:
                    stop = on_signal(signal_flag)
        bar.close()
        if stop:
            log.text(f"stopped at step {step} on a signal; resume with --resume --run-dir "
                     f"{run_dir}")
            return 0
        if saved_at != step:            # not at a signal or a checkpoint_every step just now
            save(step)
        if step > first_step and not (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            run_eval(step)
        elif step == first_step and redo_eval:
            # a finished run resumed: evaluated already, unless a signal stopped it at its
            # last step or a kill cut off its final evaluation
            run_eval(step)
        if compiled[0]:
            from torch._dynamo.utils import counters
            log.text(f"compiled graphs: {counters['stats']['unique_graphs']} (two per input "
                     "shape, periodicity and training/evaluation: the last block's, on its "
                     "decoded frame only, and the other blocks')")
            if cfg.model.compile_mode == "reduce-overhead" and torch.cuda.is_available():
                log.text(f"CUDA graphs: {counters['inductor']['cudagraph_skips']} compiled "
                         "graphs run without them (PyTorch's cudagraph_skips)")
        log.text(f"done: {step} steps; run directory {run_dir}")
        return 0
    except BaseException:
        failing = True
        raise
    finally:
        loader.close()
        if "preemption" in locals():    # failing: SIGTERM held until main has said why
            preemption.restore(hold_sigterm="failing" in locals())
        if "monitor" in locals():
            monitor.close()


if __name__ == "__main__":
    exit_process(main())
