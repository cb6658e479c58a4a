"""The run config: a typed tree read from YAML, every value overridable with `--set a.b=value`.

Validated in full before any process group waits, and strict: an unknown key (in the file or in
a `--set`) is an error that names it and lists the keys that exist there. DeepSpeed settings
(micro-batch size, accumulation, clipping, optimizer, ZeRO stage) are not repeated here: they live
in the `--ds_config` JSON and the run reads them from the engine.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dsfm.errors import ConfigError

PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
DEFAULT_CONFIG = os.path.join(PRESETS_DIR, "demo.yaml")


class _Strict(BaseModel):
    # strict: no true for 1, no 2.0 for 2, no "yes" for a number; no NaN or infinity anywhere
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True,
                              allow_inf_nan=False)


def _home(path):
    """`~` and `~user` at the start of a path, expanded: nothing else does (a `--set` is not a
    shell word the shell would expand, nor a YAML file), so `data.base=~/data` read or, with
    data.generate, simulated into a directory named `~` under the working directory."""
    if isinstance(path, list):
        return [_home(p) for p in path]
    return os.path.expanduser(path) if isinstance(path, str) else path


class DataConfig(_Strict):
    base: str = Field("data/demo", description="directory holding Well datasets "
                      "(<base>/<name>/data/<split>/*.hdf5 and stats.yaml); relative to the "
                      "working directory; $DSFM_DATA replaces it (a --set still wins)")
    generate: Optional[Literal["demo", "small"]] = Field(
        None, description="simulate this dsfm.sim preset into `base` when it holds no dataset")
    datasets: list[str] = Field(default_factory=list, description="dataset names under `base` "
                                "or paths to dataset directories; empty: every dataset in base")
    pdebench: list[str] = Field(default_factory=list, description="PDEBench HDF5 files or "
                                "directories, mixed in after the Well datasets; a relative "
                                "path is taken from the working directory, not from `base`")
    weights: Optional[list[Annotated[float, Field(ge=0)]]] = Field(
        None, description="mixture weights in the order of the datasets (uniform when unset)")
    n_steps_input: int = Field(4, ge=1, description="input frames per window (read by the "
                               "index, the loader and the model)")
    dt_stride: int = Field(1, ge=1)
    normalization: Optional[Literal["zscore", "rms"]] = "zscore"
    same_dataset_across_ranks: bool = Field(True, description="all ranks draw the same dataset "
                                            "at a step, as MPP does")
    shared_field_names: bool = Field(False, description="fields with equal names share one "
                                     "embedding column across datasets")
    num_workers: int = Field(2, ge=1, description="reader processes per rank")
    ring_slots: Optional[int] = Field(None, ge=2)

    _expand_home = field_validator("base", "datasets", "pdebench")(_home)


class ModelConfig(_Strict):
    size: Optional[Literal["Ti", "S", "B", "L"]] = Field(
        "Ti", description="MPP's published sizes; unset to give dim/heads/blocks yourself")
    dim: Optional[int] = Field(None, ge=4)
    heads: Optional[int] = Field(None, ge=1)
    blocks: Optional[int] = Field(None, ge=1)
    n_fields: Optional[int] = Field(None, ge=1, description="field-embedding columns; unset: "
                                    "the fields of the training mixture (spare columns leave "
                                    "room for fine-tuning)")
    drop_path: float = Field(0.2, ge=0.0, lt=1.0)
    attention: Literal["auto", "fused", "packed", "direct"] = Field(
        "auto", description="how the blocks attend their sequences: auto (packed on a GPU in "
        "fp32, the fastest measured there; fused in TF32 and on a CPU), fused (one kernel call per "
        "batch of sequences), packed (short sequences packed into ones of up to 64 under a "
        "block-diagonal bias, fuller tiles for the CUDA kernels), direct (sequences of up to 32 "
        "written out: with model.compile, products and sums the compiler fuses, in fp32; "
        "longer ones fused); the same numbers to fp32 rounding")
    backward_matmuls: Literal["autograd", "tn_dgrad", "tn"] = Field(
        "autograd", description="how the backward of the blocks' projections and MLP forms its "
        "matrix multiplies: autograd (F.linear's own: the input's gradient dy·W and the "
        "weight's dyᵀ·x, in cuBLAS's NN and NT layouts), tn_dgrad (the input's gradient in the "
        "forward's TN layout, both operands contiguous along the summed axis, after one copy "
        "of the weight), tn (the weight's gradient too, after a transposed copy of the "
        "activations and output gradient); the same numbers to fp32 rounding")
    fp32_matmuls: Literal["native", "3xtf32"] = Field(
        "native", description="how the fp32 matrix multiplies of the blocks' projections and "
        "MLP are computed: native (as train.tf32 says: strict fp32 on the CUDA cores, or TF32), "
        "3xtf32 (each as three products on TF32 tensor cores of the operands split into a TF32 "
        "head and tail, summed in fp32, for tensor-core speed in an fp32 run: on the CPU fp32's "
        "accuracy; on an H200 between TF32's and fp32's, each product's error 5-25 times "
        "strict fp32's (the tensor cores' accumulation), about 25 times below one TF32 "
        "product's; with backward_matmuls=autograd)")
    compile: bool | Literal["auto"] = Field(
        False, description="torch.compile each space-time block (regional: one graph for all "
        "blocks but the last, one for the last, on its decoded frame only; compiled once per "
        "input shape on first use); ZeRO stages 0-2. auto: compiled on a GPU with ZeRO stages "
        "0-2, eager on a CPU or with ZeRO-3")
    compile_mode: Literal["default", "reduce-overhead"] = Field(
        "default", description="torch.compile's mode for the compiled blocks: default, or "
        "reduce-overhead (each compiled block's forward and backward replayed as CUDA graphs: "
        "one launch per graph where the host otherwise issues each of inductor's kernels; "
        "AViT-B TF32 on an H200 62.6 ms a step against 79.1-96.9 in perf.train_bench, not yet "
        "measured through dsfm/train.py; on a GPU, with model.compile on and the blocks not "
        "recomputed; more memory per input shape)")

    checkpoint_above_tokens: Optional[int] = Field(
        None, ge=0, description="activation checkpointing of the space-time blocks for "
        "micro-batches of more tokens than this (B·T·H/16·W/16: a 512² micro-batch of 4 with 16 "
        "frames has 65,536): each block's input kept, the block computed again in the "
        "backward; the same values, one more forward of the blocks for those micro-batches; "
        "null: never")

    @field_validator("compile", mode="before")
    @classmethod
    def _true_false_or_auto(cls, value):
        if value is True or value is False or value == "auto":
            return value
        raise ValueError("must be true, false or auto")


class TrainConfig(_Strict):
    # lt: torch.manual_seed takes 64 bits; a larger seed stopped the run after the process group
    seed: int = Field(0, ge=0, lt=2**64)
    max_steps: int = Field(200, ge=1, description="optimizer steps (the run ends there)")
    log_every: int = Field(10, ge=1)
    checkpoint_every: int = Field(100, ge=0, description="0: only at the end and on signals")
    keep_checkpoints: int = Field(3, ge=1)
    max_nonfinite: int = Field(5, ge=1, description="non-finite losses in a row (each skips "
                               "its micro-batch), or updates ZeRO skipped for non-finite "
                               "gradients in a row, before the run stops")
    signal_check_every: int = Field(10, ge=1, description="steps between the ranks' agreement "
                                    "on a pending SIGTERM/SIGUSR1 (one tiny CPU all-reduce)")
    eval_every: int = Field(0, ge=0, description="0: evaluate once, at the end")
    eval_batches: int = Field(4, ge=0, description="valid micro-batches per dataset and rank; "
                              "0 disables evaluation")
    rollout_steps: int = Field(4, ge=1, description="autoregressive steps in evaluation")
    loss_units: Literal["physical", "normalized"] = Field(
        "physical", description="units of the normalized-MSE loss: physical (MPP's: the "
        "ratio over the raw target) or the loader's normalized values (data.normalization)")
    eval_at_start: bool = Field(False, description="also evaluate before the first step: the "
                                "baseline the run improves on")
    resume_schedule: Literal["check", "saved", "new"] = Field(
        "check", description="--resume when the learning-rate schedule resolves differently "
        "from the checkpoint's (\"auto\" steps follow max_steps), the optimizer's params "
        "differ (lr, betas, weight_decay, ...), or the checkpoint ran DeepSpeed's own warmup "
        "scheduler (dsfm.runtime.warmup): check refuses, saved continues on the checkpoint's "
        "settings, new switches to this run's")
    init_from: Optional[str] = Field(None, description="pretrained weights to fine-tune: an "
                                     "exported .pt file or a run directory")
    freeze: Literal["none", "middle", "processor"] = Field(
        "none", description="middle: train only field embedding and output head; processor: "
        "freeze the space-time blocks")
    progress: bool = True
    tf32: bool = Field(False, description="let CUDA matmuls and cuDNN convolutions use TF32 "
                       "tensor cores (10-bit mantissa inputs); off: strict fp32, also for the "
                       "convolutions, where PyTorch allows TF32 by default")
    fused_grad_norm: bool = Field(True, description="ZeRO: the clipping norm as one "
                                  "multi-tensor norm (as torch's clip_grad_norm_) instead of "
                                  "DeepSpeed's two operators per parameter tensor")
    local_gradients: bool = Field(True, description="ZeRO-2 on one rank: gradients taken "
                                  "where autograd leaves them, without DeepSpeed's "
                                  "per-parameter hooks, bucket copies and device "
                                  "synchronizations, which reduce nothing on one rank (the "
                                  "same values); more ranks always take DeepSpeed's own")
    zero3_whole_blocks: bool = Field(True, description="ZeRO-3: each space-time block's "
                                     "parameters gathered and released as one unit "
                                     "(DeepSpeed's leaf modules), not module by module inside "
                                     "it (the same values); a ds_config that sets "
                                     "zero_optimization.leaf_module keeps its own")

    _expand_home = field_validator("init_from")(_home)


class MonitorConfig(_Strict):
    interval_s: float = Field(1.0, gt=0, description="sampling period of the NVML and psutil "
                              "samplers (background threads)")
    gpu: bool = Field(True, description="sample this rank's GPU through NVML")
    system: bool = Field(True, description="sample CPU, memory, network and disk (psutil)")


class RunConfig(_Strict):
    name: str = "run"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        """The run's folder is runs/<name>-<time>: an empty name made runs/-<time>, and an
        absolute one or one with '..' put the run outside runs/."""
        if not name.strip() or name.startswith("/") or "\0" in name or \
                any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError("names the run's folder runs/<name>-<time>: give a non-empty name, "
                             "relative, without empty, '.' or '..' parts (lab/exp1 is fine)")
        if len(name.split("/")[-1].encode()) > 255 - len("-20261130-120000"):
            raise ValueError("is too long for the run's folder runs/<name>-<time> (a file "
                             "name holds 255 bytes)")
        return name

    def model_shape(self) -> tuple[int, int, int]:
        """(dim, heads, blocks), from the size preset with explicit values winning."""
        from dsfm.models.avit import SIZES
        base = SIZES[self.model.size] if self.model.size else (None, None, None)
        dim, heads, blocks = (v if v is not None else b for v, b in
                              zip((self.model.dim, self.model.heads, self.model.blocks), base))
        if None in (dim, heads, blocks):
            raise ConfigError("model: set model.size, or all of model.dim, model.heads and "
                              "model.blocks")
        return dim, heads, blocks


def _known_keys(model: type[BaseModel]) -> list[str]:
    return sorted(model.model_fields)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping: PyYAML keeps the last silently, so a
    second `train:` block would drop every value of the first."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue                      # `<<: *anchor`: merged keys may be overridden
            key = self.construct_object(key_node, deep=deep)
            mark = key_node.start_mark
            try:
                first = seen.get(key)
            except TypeError:                 # an unhashable key: PyYAML's own error follows
                continue
            if first is not None:             # by key, not by line: `{a: 1, a: 2}` is one line
                where = (f"lines {first.line + 1} and {mark.line + 1}" if first.line != mark.line
                         else f"line {mark.line + 1}, columns {first.column + 1} and "
                         f"{mark.column + 1}")
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice ({where}); the second would replace "
                    "the first", mark)
            seen[key] = mark
        return super().construct_mapping(node, deep=deep)


# Numbers as YAML 1.2 reads them, not PyYAML's YAML 1.1: 010 is ten (1.1: octal 8), 1:30 a
# string (1.1: 90, in base 60), 1e-3 a number (1.1: a string, which the strict config
# refused); 0x, 0o and 0b give a base. No field takes a date: 2024-05-01 is a string (a name)
_INT = re.compile(r"^[-+]?(?:[0-9][0-9_]*|0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|0[bB][01_]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
                    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, {"tag:yaml.org,2002:int": _INT, "tag:yaml.org,2002:float": _FLOAT}.get(tag, r))
            for tag, r in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def _construct_int(loader: yaml.SafeLoader, node) -> int:
    text = loader.construct_scalar(node)
    digits = text.replace("_", "").lstrip("+-")
    try:
        value = int(digits, 0 if digits[1:2] in tuple("xXoObB") else 10)
    except ValueError:                        # `!!int abc`: PyYAML's own raises a ValueError
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer",
                                                node.start_mark) from None
    return -value if text.startswith("-") else value


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class _Dumper(yaml.SafeDumper):
    """Quotes a string that YAML 1.1 or the loader above would read as a number, so that a
    run's config.yaml reads back as it was (`name: '1e3'` was written bare, read back as
    1000.0)."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: where, and what."""
    if isinstance(exc, yaml.reader.ReaderError):      # not text, or a control character
        if exc.encoding == "unicode":
            return f"character {exc.position}: {exc.character:#06x} ({exc.reason})"
        return (f"byte {exc.position}: {exc.character:#04x} is not {exc.encoding} "
                f"({exc.reason}); save the file as UTF-8")
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{what}"


def parse_yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeyLoader)


def apply_set(raw: dict, assignment: str, origin: str = "--set") -> None:
    """Apply one `key.path=value` to the raw config dict; the value is parsed as YAML (numbers,
    booleans, null, lists). `origin` names where it came from in errors."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. train.max_steps=20")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node_model: type[BaseModel] = RunConfig
    node = raw
    for depth, part in enumerate(parts):
        fields = node_model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"{origin} {key}: unknown key {part!r} at {where}; known keys: "
                              f"{', '.join(_known_keys(node_model))}")
        if depth == len(parts) - 1:
            try:
                value = parse_yaml(text) if text.strip() else None
            except yaml.YAMLError as exc:
                raise ConfigError(f"{origin} {key}: cannot parse {text!r} as a YAML value "
                                  f"({_yaml_error(exc)})") from None
            # a section given as a mapping sets those keys in it: it replaced the section, so
            # --set train={max_steps: 5} put every other train key of the preset back to its
            # default without a word
            node[part] = _merged(node.get(part), value)
            return
        sub = fields[part].annotation
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            raise ConfigError(f"{origin} {key}: {'.'.join(parts[:depth + 1])} is a value, not a "
                              "section")
        if node.get(part) is None:            # absent, or "data:" with nothing under it
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[:depth + 1])} in the --config file is a "
                              f"{type(node).__name__}, not a section of keys; {origin} {key} "
                              "cannot go under it")
        node_model = sub


def _merged(old, new):
    """`new` over `old`, key by key where both are mappings (sections within sections too)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return new
    out = dict(old)
    for k, v in new.items():
        out[k] = _merged(old.get(k), v)
    return out


def _quoted(text: str) -> str:
    """`text` as a YAML double-quoted scalar that reads back as it is: every character but
    printable ASCII escaped by its code point (JSON's escapes split one beyond the BMP into two
    UTF-16 halves, which YAML reads as two lone surrogates)."""
    return '"' + "".join(c if " " <= c <= "~" and c not in '"\\' else f"\\U{ord(c):08x}"
                         for c in text) + '"'


def environment_sets(environ: Mapping[str, str] = os.environ) -> list[tuple[str, str]]:
    """Settings from the environment, as `load_config`'s `env_sets`: $DSFM_DATA is data.base,
    taken as it is written (it was read as YAML: a path `data #1` was cut at the comment, and
    one named `2024` read as a number and refused)."""
    base = environ.get("DSFM_DATA")
    return [("$DSFM_DATA", "data.base=" + _quoted(base))] if base else []


def _section(loc: tuple) -> type[BaseModel]:
    """The config class that holds the key at `loc` (for listing its known keys)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        sub = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            break
        model = sub
    return model


def _describe(error: ValidationError, source: str) -> str:
    """Every problem, on one line: `source: key: what (got value)`; `; ` between them."""
    parts = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            known = _known_keys(_section(e["loc"]))
            parts.append(f"unknown key {loc} (known there: {', '.join(known)})")
        else:
            msg = e["msg"][:1].lower() + e["msg"][1:]
            parts.append(f"{loc}: {msg} (got {e.get('input')!r})")
    return f"{source}: " + "; ".join(parts)


def _find_config(path: str) -> str:
    """A file, or a preset of dsfm/configs/ by name, with or without .yaml."""
    if os.path.isfile(path):
        return path
    for name in (path, path + ".yaml"):
        if os.path.isfile(os.path.join(PRESETS_DIR, name)):
            return os.path.join(PRESETS_DIR, name)
    return path


def load_config(path: str | None = None, sets: list[str] = (),
                env_sets: Sequence[tuple[str, str]] = ()) -> RunConfig:
    """Read the YAML preset (default: the embedded demo), apply `env_sets` ((origin,
    key=value): settings from the environment, such as $DSFM_DATA) then `--set`s, validate."""
    path = _find_config(path or DEFAULT_CONFIG)
    try:
        with open(path, "rb") as fh:         # bytes: PyYAML names an undecodable one
            raw: Any = parse_yaml(fh)
    except OSError as exc:
        presets = sorted(f[:-5] for f in os.listdir(PRESETS_DIR) if f.endswith(".yaml"))
        raise ConfigError(f"--config {path}: {exc.strerror} (presets by name: "
                          f"{', '.join(presets)})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML at {_yaml_error(exc)}") from None
    if raw is None:
        raise ConfigError(f"--config {path}: the file is empty (give the sections to set, "
                          "say train: with max_steps; see dsfm/configs/demo.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections at the top level, "
                          f"got a {type(raw).__name__}")
    for name, field in RunConfig.model_fields.items():
        # "data:" with every key under it commented out is an empty section (as a --set
        # under it already takes it), not a section that is null
        if name in raw and raw[name] is None and isinstance(field.annotation, type) \
                and issubclass(field.annotation, BaseModel):
            raw[name] = {}
    for origin, s in env_sets:
        apply_set(raw, s, origin)
    for s in sets:
        apply_set(raw, s)
    _size_over_file_shape(raw, sets)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        # the overrides that reach a refused key (all of them were named, the sound ones too)
        bad = [".".join(str(p) for p in e["loc"]) for e in exc.errors()]

        def reaches(key: str) -> bool:
            key = key.strip()
            return any(b == key or b.startswith(key + ".") or key.startswith(b + ".")
                       for b in bad)

        touched = [f"{origin} ({s.split('=', 1)[0]})" for origin, s in env_sets
                   if reaches(s.split("=", 1)[0])]
        touched += [f"--set {s.split('=', 1)[0]}" for s in sets if reaches(s.split("=", 1)[0])]
        raise ConfigError(_describe(exc, path + (f" with {', '.join(touched)}"
                                                 if touched else ""))) from None
    cfg.model_shape()
    return cfg


def _size_over_file_shape(raw: dict, sets: Sequence[str]) -> None:
    """A `--set model.size=S` builds S: the file's model.dim, heads and blocks are dropped
    (those a --set gives still win over the size). Set in the file, they won over the --set, so
    on demo.yaml, which sets all three, `--set model.size=S` built the demo's model without a
    word."""
    keys = [s.split("=", 1)[0].strip() for s in sets]
    model = raw.get("model")
    if "model.size" not in keys or not isinstance(model, dict) or model.get("size") is None:
        return
    for part in ("dim", "heads", "blocks"):
        if f"model.{part}" not in keys:
            model.pop(part, None)


def dump(cfg: RunConfig) -> str:
    return yaml.dump(cfg.model_dump(), Dumper=_Dumper, sort_keys=False)
