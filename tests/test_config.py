"""The run config: YAML presets, --set overrides, strict validation; DeepSpeed schedule
resolution."""

import os

import pytest
import yaml

from dsfm.config import PRESETS_DIR, apply_set, dump, environment_sets, load_config
from dsfm.errors import ConfigError
from dsfm.runtime import ds_config as ds_settings
from dsfm.runtime import schedule


def test_every_preset_validates_and_names_a_model():
    names = sorted(f for f in os.listdir(PRESETS_DIR) if f.endswith(".yaml"))
    assert names == ["demo.yaml", "mpp_b.yaml", "mpp_l.yaml", "mpp_s.yaml", "mpp_ti.yaml"]
    for name in names:
        cfg = load_config(name)
        dim, heads, blocks = cfg.model_shape()
        assert dim % heads == 0 and blocks >= 1
    assert load_config("mpp_l.yaml").model_shape() == (1024, 16, 24)
    assert load_config().name == "demo"


def test_model_compile_is_true_false_or_auto_and_the_mpp_presets_say_auto():
    """model.compile=auto (the MPP presets): compiled where that was measured faster (a GPU,
    ZeRO stages 0-2: docs/performance.md), eager on a CPU, where each input shape's first step
    costs 20-45 s of compiling, and with ZeRO-3, which cannot compile (true is refused there).
    The demo keeps false: a run of seconds on a GPU."""
    from dsfm.runtime.engine import compile_choice

    for name in ("mpp_ti", "mpp_s", "mpp_b", "mpp_l"):
        assert load_config(name).model.compile == "auto", name
    # the presets recompute the blocks of micro-batches whose activations would crowd an
    # 80 GB GPU (docs/training.md): 512² ones for S, larger than 256² ones for B and L
    assert [load_config(n).model.checkpoint_above_tokens
            for n in ("mpp_ti", "mpp_s", "mpp_b", "mpp_l", "demo")] == [
        None, 32768, 16384, 8192, None]
    with pytest.raises(ConfigError, match="model.checkpoint_above_tokens"):
        load_config(None, ["model.checkpoint_above_tokens=-1"])
    assert load_config().model.compile is False
    assert load_config(None, ["model.compile=true"]).model.compile is True
    for bad in ("maybe", "1", "null"):
        with pytest.raises(ConfigError, match="model.compile: .*must be true, false or auto"):
            load_config(None, [f"model.compile={bad}"])
    for stage in (0, 1, 2):
        on, line = compile_choice("auto", stage, cuda=True)
        assert on and "compiled" in line and "model.compile=auto on a GPU" in line
        assert compile_choice("auto", stage, cuda=False) == (False, (
            "model: space-time blocks eager (model.compile=auto, no GPU: on a CPU each input "
            "shape's first step would spend 20-45 s compiling)"))
        assert compile_choice(True, stage, cuda=False)[0] is True
        assert compile_choice(False, stage, cuda=True) == (False, None)
    for cuda in (True, False):
        on, line = compile_choice("auto", 3, cuda=cuda)
        assert not on and "eager (model.compile=auto, ZeRO-3" in line


def test_model_attention_auto_packs_on_a_gpu_in_fp32_and_fuses_otherwise():
    """model.attention=auto (the default): packed on a GPU in fp32, where it was the fastest
    of the three (AViT-B compiled on an H200: 152.5 ms a step against 158.6 direct and 172.4
    fused), fused in TF32 (92.5 against 96.9 and 102.7) and on a CPU (no padded tiles to
    fill there); a named attention is kept as it is, with no log line."""
    from dsfm.runtime.engine import attention_choice

    assert load_config().model.attention == "auto"
    chosen, line = attention_choice("auto", cuda=True, tf32=False)
    assert chosen == "packed" and "model.attention=auto on a GPU in fp32" in line
    assert attention_choice("auto", cuda=True, tf32=True) == (
        "fused", "model: attention fused (model.attention=auto, TF32)")
    assert attention_choice("auto", cuda=False, tf32=False) == (
        "fused", "model: attention fused (model.attention=auto, no GPU)")
    for named in ("fused", "packed", "direct"):
        for cuda in (True, False):
            assert attention_choice(named, cuda=cuda, tf32=False) == (named, None)


def test_set_overrides_with_yaml_typed_values():
    cfg = load_config(None, ["train.max_steps=20", "train.log_every=1", "model.drop_path=0",
                             "data.datasets=[euler_2d, gray_scott_reaction_diffusion]",
                             "data.normalization=null", "train.progress=false"])
    assert cfg.train.max_steps == 20 and cfg.train.log_every == 1
    assert cfg.model.drop_path == 0.0 and cfg.data.normalization is None
    assert cfg.data.datasets == ["euler_2d", "gray_scott_reaction_diffusion"]
    assert cfg.train.progress is False
    again = yaml.safe_load(dump(cfg))
    assert again["train"]["max_steps"] == 20


@pytest.mark.parametrize("assignment,words", [
    ("train.max_stpes=3", ["unknown key 'max_stpes' at train", "max_steps"]),
    ("trian.max_steps=3", ["unknown key 'trian'", "train"]),
    ("train=3", ["train"]),
    ("train.max_steps.x=3", ["train.max_steps is a value"]),
    ("max_steps", ["expected key=value"]),
])
def test_unknown_or_malformed_keys_are_named(assignment, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [assignment])
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize("assignment,words", [
    ("train.max_steps=0", ["train.max_steps", "greater than or equal to 1"]),
    ("model.size=XL", ["model.size"]),
    ("model.drop_path=1.5", ["model.drop_path"]),
    ("data.normalization=minmax", ["data.normalization"]),
    ("train.freeze=everything", ["train.freeze"]),
    # strict: YAML reads yes/true as a boolean and 2.0 as a float; neither is a count
    ("model.size=ti", ["model.size: input should be 'Ti', 'S', 'B' or 'L' (got 'ti')"]),
    ("model.attention=flash", ["model.attention: input should be 'auto', 'fused', 'packed' "
                               "or 'direct' (got 'flash')"]),
    ("model.backward_matmuls=nt", ["model.backward_matmuls: input should be 'autograd', "
                                   "'tn_dgrad' or 'tn' (got 'nt')"]),
    ("model.fp32_matmuls=tf32", ["model.fp32_matmuls: input should be 'native' or '3xtf32' "
                                 "(got 'tf32')"]),
    ("train.max_steps=yes", ["train.max_steps", "valid integer", "got True"]),
    ("train.max_steps=2.0", ["train.max_steps", "valid integer", "got 2.0"]),
    ("model.n_fields=true", ["model.n_fields", "valid integer"]),
    ("train.progress=1", ["train.progress", "valid boolean"]),
    ("data.weights=[1, .nan, 1, 1]", ["data.weights.1", "finite number"]),
    ("data.weights=[1, -1, 1, 1]", ["data.weights.1", "greater than or equal to 0"]),
    ("monitor.interval_s=.inf", ["monitor.interval_s", "finite number"]),
    # torch.manual_seed took it after the process group: a traceback on every rank
    ("train.seed=18446744073709551616", ["train.seed", "less than 18446744073709551616"]),
    ("train.max_steps={a: 1", ["--set train.max_steps: cannot parse", "line 1, column"]),
])
def test_bad_values_are_named_with_what_was_given(assignment, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [assignment])
    for w in words:
        assert w in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, words", [
    ("train:\n  max_steps: 3\ntrain:\n  eval_batches: 0\n",
     ["line 3", "key 'train' given twice (lines 1 and 3)"]),
    ("data:\n  num_workers: 1\n  num_workers: 2\n", ["key 'num_workers' given twice"]),
    # a flow mapping on one line: the check compared line numbers, so PyYAML kept the last
    ("train: {max_steps: 10, max_steps: 20}\n",
     ["key 'max_steps' given twice (line 1, columns 9 and 24)"]),
    ("train:\n\tmax_steps: 3\n", ["not valid YAML at line 2, column 1", "'\\t'"]),
    ("data:\n  datasets: [a, b\n", ["not valid YAML at line 3"]),
    ("", ["the file is empty"]),
    ("train:\n  max_step: 3\n  max_nonfinit: 2\n",
     ["unknown key train.max_step (known there:", "max_steps", "; unknown key "
      "train.max_nonfinit"]),
])
def test_a_bad_yaml_file_is_one_line_naming_where(tmp_path, text, words):
    """A key given twice used to be kept silently (the second `train:` block dropped every
    value of the first); YAML syntax errors were four lines with caret art."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "\n" not in str(err.value)
    for w in words:
        assert w in str(err.value)


def test_a_list_where_a_section_belongs_is_blamed_on_the_file_not_the_set(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  - euler_2d\n")
    with pytest.raises(ConfigError, match="data in the --config file is a list, not a section"
                                          ".*; \\$DSFM_DATA data.base cannot go under it"):
        load_config(str(path), [], [("$DSFM_DATA", "data.base=/somewhere")])
    path.write_text("train:\n  max_step: 3\n")
    # the file's own key: no override is named (all of them were, here $DSFM_DATA's)
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key train.max_step "):
        load_config(str(path), [], [("$DSFM_DATA", "data.base=/somewhere")])
    path.write_text("train:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml with --set train.log_every: "
                                          r"train.log_every: input should be a valid integer"):
        load_config(str(path), ["train.max_steps=4", "train.log_every=x", "name=a"],
                    [("$DSFM_DATA", "data.base=/somewhere")])
    with pytest.raises(ConfigError, match=r"run.yaml with \$DSFM_DATA \(data.base\): data.base"):
        load_config(str(path), ["train.max_steps=4"], [("$DSFM_DATA", "data.base=")])
    path.write_text("data:\n  - euler_2d\n")
    path.write_text("data:\ntrain:\n  max_steps: 3\n")     # an empty section is fine
    assert load_config(str(path), ["data.base=/x"]).data.base == "/x"


def test_a_section_given_to_set_as_a_mapping_sets_those_keys_only():
    """--set train={max_steps: 5} replaced the whole section: the preset's other train keys
    (here mpp_b's checkpoint_every, eval_every, rollout_steps) went back to their defaults
    without a word. Now it sets the keys it names, as train.max_steps=5 does."""
    preset = load_config("mpp_b")
    cfg = load_config("mpp_b", ["train={max_steps: 5, log_every: 1}", "data={num_workers: 2}"])
    assert (cfg.train.max_steps, cfg.train.log_every, cfg.data.num_workers) == (5, 1, 2)
    assert cfg.train.model_dump(exclude={"max_steps", "log_every"}) == \
        preset.train.model_dump(exclude={"max_steps", "log_every"})
    assert cfg.data.datasets == preset.data.datasets and cfg.data.base == preset.data.base
    with pytest.raises(ConfigError, match="unknown key train.max_step"):
        load_config("mpp_b", ["train={max_step: 5}"])


@pytest.mark.parametrize("base", ["data #1", "2024", "on", "/x/[a]: b"])
def test_dsfm_data_is_taken_as_written(base):
    """$DSFM_DATA was read as YAML: `data #1` became `data`, and `2024` or `on` a number or a
    boolean the config refused."""
    cfg = load_config(None, [], environment_sets({"DSFM_DATA": base}))
    assert cfg.data.base == base
    assert environment_sets({}) == [] and environment_sets({"DSFM_DATA": ""}) == []



@pytest.mark.parametrize("base", ["/data/\U0001d4b3\U0001f30a", "/data/a\x7fb",
                                  "/data/\udcff\udc80"])
def test_dsfm_data_is_taken_as_written_whatever_its_characters(base):
    """$DSFM_DATA went through YAML as a JSON string: a character beyond the BMP (JSON writes
    it as two UTF-16 escapes, which YAML reads as two characters) became two lone surrogates,
    a path no file system call takes. A DEL and bytes that are not UTF-8 (Python's surrogate
    escapes) must come through too."""
    assert load_config(None, [], environment_sets({"DSFM_DATA": base})).data.base == base

def test_a_section_with_nothing_under_it_is_empty_in_the_file_as_under_a_set(tmp_path):
    """`model:` with its keys commented out was refused (a null section) unless a --set went
    under it, which took it as empty."""
    path = tmp_path / "run.yaml"
    path.write_text("name: x\ndata:\n  base: d\nmodel:\n  # size: S\ntrain:\n")
    cfg = load_config(str(path))
    assert cfg.model.size == "Ti" and cfg.train.max_steps == 200
    assert load_config(str(path), ["model.size=S"]).model.size == "S"


def test_presets_are_found_by_bare_name():
    assert load_config("mpp_ti").model.size == "Ti"
    assert load_config("mpp_ti.yaml").model.size == "Ti"
    with pytest.raises(ConfigError, match="presets by name: demo, mpp_b"):
        load_config("mpp_xl")


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\ntrain:\n  max_steps: 5\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: unknown key train.warmup"):
        load_config(str(path))
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))


def test_a_home_directory_in_a_path_is_expanded(tmp_path, monkeypatch):
    """`~` in a path value reached the data code as is (a `--set` is no shell word, a YAML
    file no shell): data.base=~/well was looked for under a directory named ~ in the working
    directory, and with data.generate simulated into one there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["data.base=~/well", "data.datasets=[~/more/euler_2d, shear_flow]",
                             "data.pdebench=[~/pde/*.h5]", "train.init_from=~/model.pt"])
    assert cfg.data.base == str(tmp_path / "well")
    assert cfg.data.datasets == [str(tmp_path / "more" / "euler_2d"), "shear_flow"]
    assert cfg.data.pdebench == [str(tmp_path / "pde" / "*.h5")]
    assert cfg.train.init_from == str(tmp_path / "model.pt")
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  base: ~/well\n")
    assert load_config(str(path)).data.base == str(tmp_path / "well")
    assert load_config(None, ["train.init_from=null"]).train.init_from is None


@pytest.mark.parametrize("name", ["''", "' '", "/abs/x", "a/../b", "lab//x", "x/"])
def test_a_run_name_that_is_no_folder_name_is_refused(name):
    """name: '' made the run folder runs/-<time>; '/abs/x' or 'a/../b' put it outside runs/."""
    with pytest.raises(ConfigError, match="name: value error, names the run's folder"):
        load_config(None, [f"name={name}"])
    assert load_config(None, ["name=lab/exp1"]).name == "lab/exp1"
    with pytest.raises(ConfigError, match="name: value error, is too long for the run's folder"):
        load_config(None, ["name=" + "x" * 240])
    assert load_config(None, ["name=" + "x" * 239]).name == "x" * 239


def test_custom_model_shape_needs_all_three_numbers():
    cfg = load_config(None, ["model.size=null", "model.dim=64", "model.heads=4",
                             "model.blocks=2"])
    assert cfg.model_shape() == (64, 4, 2)
    with pytest.raises(ConfigError, match="model.dim, model.heads and model.blocks"):
        load_config(None, ["model.size=null", "model.dim=64", "model.heads=null"])
    raw = {}
    apply_set(raw, "model.dim=128")
    assert raw == {"model": {"dim": 128}}
    assert load_config("mpp_s.yaml", ["model.blocks=6"]).model_shape() == (384, 6, 6)
    # a --set model.size builds that size over the file's dim, heads and blocks (demo.yaml
    # sets all three, and they won: the demo's model, without a word); a --set of one of
    # them still wins over the size
    assert load_config(None, ["model.size=S"]).model_shape() == (384, 6, 12)
    assert load_config(None, ["model.blocks=6", "model.size=S"]).model_shape() == (384, 6, 6)
    assert load_config(None, ["model.size=S", "model.heads=12"]).model_shape() == (384, 12, 12)
    assert load_config(None, ["model.size=null"]).model_shape() == (96, 3, 4)


def test_auto_schedule_steps_come_from_the_run_length():
    ds = {"train_micro_batch_size_per_gpu": 4,
          "scheduler": {"type": "WarmupCosineLR",
                        "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"}}}
    out = schedule.resolve(ds, max_steps=400)
    assert out["scheduler"]["params"] == {"total_num_steps": 400, "warmup_num_steps": 20}
    assert ds["scheduler"]["params"]["total_num_steps"] == "auto"       # input untouched
    fixed = schedule.resolve({**ds, "scheduler": {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 50, "warmup_num_steps": 5}}}, max_steps=400)
    assert fixed["scheduler"]["params"] == {"total_num_steps": 50, "warmup_num_steps": 5}
    with pytest.raises(ConfigError, match="cos_min_ratio"):
        schedule.resolve({**ds, "scheduler": {"type": "WarmupCosineLR", "params": {
            "cos_min_ratio": "auto"}}}, max_steps=10)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        schedule.resolve({}, max_steps=10)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        schedule.resolve({"train_micro_batch_size_per_gpu": 2,
                          "gradient_accumulation_steps": 0}, max_steps=10)


def test_a_schedule_that_does_not_fit_the_run_is_named():
    """Each of these trained silently: a decay that ends before the run (the last steps at
    the floor rate, 0 under WarmupDecayLR's default), a warmup longer than the run, a
    WarmupDecayLR whose peak is DeepSpeed's 0.001 whatever optimizer.params.lr says; a total
    below a warmup that ends within the run (peak, then the floor at the next step) is
    refused."""
    def sched(name, **params):
        return {"optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
                "scheduler": {"type": name, "params": params}}

    def notes(ds, max_steps):
        resolved = schedule.resolve({**ds, "train_micro_batch_size_per_gpu": 1}, max_steps)
        return schedule.check_length(resolved, max_steps, "ds.json")

    assert notes(sched("WarmupCosineLR"), 100) == []                       # "auto": fits
    assert notes(sched("WarmupCosineLR", total_num_steps=200, warmup_num_steps=10), 100) == []
    assert notes(sched("WarmupCosineLR", total_num_steps=60, warmup_num_steps=10), 100) == [
        "warning: ds.json: scheduler WarmupCosineLR reaches its floor at step 61 "
        "(total_num_steps 60), before train.max_steps=100: steps 61-100 train at the floor "
        "rate (\"auto\" ends the schedule with the run)"]
    with pytest.raises(ConfigError, match="ds.json: scheduler WarmupCosineLR total_num_steps "
                                          "5 is below warmup_num_steps 10: the rate would "
                                          "fall from its peak"):
        notes(sched("WarmupCosineLR", total_num_steps=5, warmup_num_steps=10), 100)
    # a warmup longer than the run: the rate never peaks (and a decay it never reaches is
    # not refused: a short test run of a long schedule)
    for total in (5, "auto"):
        (note,) = notes(sched("WarmupCosineLR", total_num_steps=total, warmup_num_steps=500),
                        100)
        assert note == ("warning: ds.json: scheduler WarmupCosineLR warms up for 500 steps "
                        "(warmup_num_steps), beyond train.max_steps=100: the rate never "
                        "reaches its peak")
    (note,) = notes(sched("WarmupDecayLR"), 100)
    assert "WarmupDecayLR takes its peak rate from warmup_max_lr, not optimizer.params.lr " \
           "(0.0003), and none is given: the run peaks at DeepSpeed's default 0.001" in note
    assert notes(sched("WarmupDecayLR", warmup_max_lr=3e-4), 100) == []
    assert notes(sched("WarmupLR", warmup_max_lr=3e-4, warmup_num_steps=10), 100) == []


def test_a_resumed_schedule_is_checked_kept_or_switched():
    ds = {"train_micro_batch_size_per_gpu": 4,
          "scheduler": {"type": "WarmupCosineLR",
                        "params": {"total_num_steps": "auto", "warmup_num_steps": "auto"}}}
    short, long = schedule.resolve(ds, max_steps=100), schedule.resolve(ds, max_steps=200)
    same, note = schedule.on_resume(short["scheduler"], short, "check", "ckpt", 100)
    assert same is short and note is None
    assert schedule.on_resume(schedule.ABSENT, long, "check", "ckpt", 200) == (long, None)
    with pytest.raises(ConfigError, match="train.resume_schedule=saved"):
        schedule.on_resume(short["scheduler"], long, "check", "ckpt", 200)
    kept, note = schedule.on_resume(short["scheduler"], long, "saved", "ckpt", 200)
    assert kept["scheduler"] == short["scheduler"] and long["scheduler"] != short["scheduler"]
    assert note.startswith("warning:") and "ends at step 100" in note
    _, note = schedule.on_resume(long["scheduler"], short, "saved", "ckpt", 100)
    assert not note.startswith("warning:")              # the saved schedule covers the run
    new, note = schedule.on_resume(short["scheduler"], long, "new", "ckpt", 200)
    assert new is long and "jumps" in note
    # DeepSpeed cannot restore a schedule into a run without one, or none into one: refused
    # whatever the policy
    none = {"train_micro_batch_size_per_gpu": 4}
    for policy in ("check", "saved", "new"):
        with pytest.raises(ConfigError, match="without a learning-rate scheduler"):
            schedule.on_resume(None, long, policy, "ckpt", 200)
        with pytest.raises(ConfigError, match="this run has none"):
            schedule.on_resume(short["scheduler"], none, policy, "ckpt", 200)



def test_a_resume_between_deepspeeds_and_torchs_schedulers_is_refused_unless_saved():
    """DeepSpeed's load gives the saved scheduler state to this run's scheduler: a torch one's
    to one of DeepSpeed's stopped the run after the process group with KeyError
    ('last_batch_iteration'), and one of DeepSpeed's to a torch one restarted the new schedule
    at its step 0 while the log said the rate jumped to its value. train.resume_schedule=new
    refuses both before the process group; saved resumes on the checkpoint's scheduler."""
    ours = {"train_micro_batch_size_per_gpu": 4,
            "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}
    torch_ = {**ours, "scheduler": {"type": "StepLR", "params": {"step_size": 1}}}
    for saved, run in ((torch_, ours), (ours, torch_)):
        for policy in ("check", "new"):
            with pytest.raises(ConfigError, match=r"^--resume: ckpt was trained on .* one of "
                               r"DeepSpeed's and one of torch's, .* "
                               r"train.resume_schedule=saved") as exc:
                schedule.on_resume(saved["scheduler"], run, policy, "ckpt", 100)
            assert "\n" not in str(exc.value)
        kept, _ = schedule.on_resume(saved["scheduler"], run, "saved", "ckpt", 100)
        assert kept["scheduler"] == saved["scheduler"]
    # within one kind, new still switches
    other = {**torch_, "scheduler": {"type": "ExponentialLR", "params": {"gamma": 0.9}}}
    assert schedule.on_resume(torch_["scheduler"], other, "new", "ckpt", 100)[0] is other
    assert schedule.on_resume({"type": "WarmupCosineLR", "params": {}}, ours, "new", "ckpt",
                              100)[0] is ours

def test_resumed_optimizer_params_are_checked_kept_or_switched():
    """DeepSpeed's load restores the saved param groups: a config that changed betas, eps or
    weight_decay on --resume trained on with the saved ones, without a word."""
    saved = {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999],
                                         "weight_decay": 1e-3}}
    ours = {"train_micro_batch_size_per_gpu": 4, "scheduler": {"type": "WarmupCosineLR"},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95],
                                                      "weight_decay": 1e-3}}}
    assert schedule.optimizer_on_resume(saved, {**ours, "optimizer": saved}, "check", "ckpt")[
        1:] == (None, None)
    assert schedule.optimizer_on_resume(schedule.ABSENT, ours, "check", "ckpt") == (
        ours, None, None)                          # a checkpoint too old to say
    with pytest.raises(ConfigError, match=r"^--resume: ckpt was trained with other optimizer "
                       r"params than this run's DeepSpeed config sets \(betas \[0.9, 0.999\] "
                       r"-> \[0.9, 0.95\], lr 0.0003 -> 0.0001\), and DeepSpeed's load restores "
                       "the saved ones; set train.resume_schedule=new"):
        schedule.optimizer_on_resume(saved, ours, "check", "ckpt")
    kept, note, apply = schedule.optimizer_on_resume(saved, ours, "saved", "ckpt")
    assert kept["optimizer"] == saved and ours["optimizer"] != saved and apply is None
    assert "checkpoint's optimizer params" in note
    new, note, apply = schedule.optimizer_on_resume(saved, ours, "new", "ckpt")
    assert new is ours and apply == ours["optimizer"]["params"]
    assert note.startswith("warning:") and "the lr through the scheduler" in note
    for policy in ("check", "saved", "new"):           # another optimizer's state: refused
        with pytest.raises(ConfigError, match="trained with optimizer AdamW, this run's "
                                              "DeepSpeed config sets SGD"):
            schedule.optimizer_on_resume(saved, {**ours, "optimizer": {"type": "SGD"}}, policy,
                                         "ckpt")


def test_a_checkpoint_of_deepspeeds_own_warmup_is_refused_kept_or_switched():
    """Checkpoints written before dsfm ran DeepSpeed's warmup schedulers as its own (no
    "lr_schedule" in their metadata: 1) hold the same position, which dsfm's classes read as a
    step whose rate is up to two steps further on: resuming is refused unless
    train.resume_schedule says which to follow. Other schedulers are built as before."""
    ds = schedule.resolve({"train_micro_batch_size_per_gpu": 4,
                           "scheduler": {"type": "WarmupCosineLR", "params": {
                               "total_num_steps": "auto", "warmup_num_steps": "auto"}}}, 100)
    with pytest.raises(ConfigError, match="DeepSpeed's own WarmupCosineLR, whose first two "
                                          "updates .* train.resume_schedule=saved") as exc:
        schedule.warmup_on_resume(1, ds, "check", "ckpt")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("--resume: ckpt ")
    version, note = schedule.warmup_on_resume(1, ds, "saved", "ckpt")
    assert version == 1 and "DeepSpeed's own WarmupCosineLR" in note
    version, note = schedule.warmup_on_resume(1, ds, "new", "ckpt")
    assert version == schedule.LR_SCHEDULE == 2 and note.startswith("warning:")
    for policy in ("check", "saved", "new"):
        assert schedule.warmup_on_resume(2, ds, policy, "ckpt") == (2, None)
        for other in ({"train_micro_batch_size_per_gpu": 4},
                      {**ds, "scheduler": {"type": "OneCycle", "params": {}}}):
            assert schedule.warmup_on_resume(1, other, policy, "ckpt") == (2, None)


def test_shipped_ds_configs_are_fp32_with_clipping_and_resolve():
    import json
    root = os.path.join(os.path.dirname(PRESETS_DIR), "..", "ds_configs")
    stages = {}
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        with open(os.path.join(root, name)) as fh:
            ds = json.load(fh)
        out = schedule.resolve(ds, max_steps=1000)
        assert ds_settings.check(ds, name) == []           # fp32, nothing unknown
        ds_settings.probe(out, name)                        # and DeepSpeed's parser takes it
        assert out["gradient_clipping"] == 1.0 and out["optimizer"]["type"] == "AdamW"
        assert out["scheduler"]["type"] == "WarmupCosineLR"
        stages[name] = out["zero_optimization"]
    assert stages["zero2.json"]["stage"] == 2 and stages["zero3.json"]["stage"] == 3
    assert stages["zero3_offload.json"]["offload_optimizer"]["device"] == "cpu"


def test_shipped_ds_configs_warm_up_linearly_then_decay_to_one_percent():
    """docs/training.md promises linear warmup then cosine decay to 1 % of the peak, but
    DeepSpeed's WarmupCosineLR warms up logarithmically unless warmup_type says otherwise: at
    MPP's 200,000 steps (10,000 of warmup) the rate was at half its peak after 100 steps. The
    rates are those each step's update uses, from the class the engine builds (dsfm's: step n
    at n/W of the peak; DeepSpeed's made steps 1 and 2 at 0 and reached the peak at no step)."""
    import json

    import torch

    from dsfm.runtime.warmup import scheduler_class

    root = os.path.join(os.path.dirname(PRESETS_DIR), "..", "ds_configs")
    for name in ("zero2.json", "zero3.json", "zero3_offload.json"):
        with open(os.path.join(root, name)) as fh:
            out = schedule.resolve(json.load(fh), max_steps=2000)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        cls = scheduler_class(out["scheduler"]["type"], schedule.LR_SCHEDULE)
        sched = cls(opt, **out["scheduler"]["params"])
        ratios = []
        for _ in range(2000):
            ratios.append(opt.param_groups[0]["lr"])
            sched.step()
        warmup = out["scheduler"]["params"]["warmup_num_steps"]
        assert warmup == 100
        # step n of the warmup is at n / warmup of the peak, the peak at step 100
        assert ratios[:warmup] == pytest.approx([n / warmup for n in range(1, warmup + 1)])
        assert ratios[warmup - 1] == pytest.approx(1.0) and ratios[warmup] < 1.0, name
        # the cosine reaches 1 % just past the last step
        assert ratios[-1] == pytest.approx(0.01, abs=1e-5) and ratios[-1] > 0.01


def test_train_batch_size_must_match_the_world():
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
          "train_batch_size": 64}
    assert schedule.resolve(ds, 10, world_size=8)["train_batch_size"] == 64
    with pytest.raises(ConfigError, match=r"64 != micro-batch 4 × accumulation 2 × 4 ranks"):
        schedule.resolve(ds, 10, world_size=4)
    derived = {"train_micro_batch_size_per_gpu": 4, "train_batch_size": 96}
    assert schedule.resolve(derived, 10, world_size=24)
    with pytest.raises(ConfigError, match="not a multiple"):
        schedule.resolve(derived, 10, world_size=5)
    # the global batch alone, as DeepSpeed reads it: micro = total / (accumulation × ranks)
    alone = {"train_batch_size": 96, "gradient_accumulation_steps": 2}
    got = schedule.resolve(alone, 10, world_size=24)
    assert got["train_micro_batch_size_per_gpu"] == 2 and "train_micro_batch_size_per_gpu" \
        not in alone
    assert schedule.resolve({"train_batch_size": 96}, 10, world_size=8)[
        "train_micro_batch_size_per_gpu"] == 12
    with pytest.raises(ConfigError, match=r"train_batch_size 96 is not a multiple of "
                                          r"accumulation 2 × 9 ranks; set train_micro"):
        schedule.resolve(alone, 10, world_size=9)
    with pytest.raises(ConfigError, match="set train_micro_batch_size_per_gpu .* or "
                                          "train_batch_size"):
        schedule.resolve({"gradient_accumulation_steps": 2}, 10)


BASE_DS = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999]}},
           "scheduler": {"type": "WarmupCosineLR",
                         "params": {"total_num_steps": 10, "warmup_num_steps": 1}},
           "zero_optimization": {"stage": 2}}


def _with(path: str, value):
    """BASE_DS with the value at a dotted path replaced (None: removed)."""
    import copy
    out = copy.deepcopy(BASE_DS)
    *parents, last = path.split(".")
    node = out
    for p in parents:
        node = node.setdefault(p, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return out


@pytest.mark.parametrize("path, value, needle", [
    ("fp16", {"enabled": True}, "fp16.enabled is True: dsfm trains in fp32"),
    ("bf16", {"enabled": True}, "bf16.enabled is True"),
    ("bfloat16", {"enabled": True}, "bfloat16.enabled is True"),     # bf16's older name
    ("fp16", {"enabled": "auto"}, "fp16.enabled is 'auto'"),
    # these two trained silently in 16 bits: the forward under torch.autocast, and every
    # gradient cast to bf16 and back for its all-reduce (on one rank as well)
    ("torch_autocast", {"enabled": True, "dtype": "bfloat16"},
     "torch_autocast.enabled is True: dsfm trains in fp32"),
    ("communication_data_type", "BF16", "communication_data_type is 'BF16': the gradients"),
    ("zero_optimization.stage", 5, "zero_optimization: .*stage"),
    ("zero_optimization", 2, "DeepSpeed refuses it: .* argument after \\*\\* must be a mapping"),
    ("zero_optimization.stagee", 2, "zero_optimization: .*stagee"),
    ("optimizer.type", "AdamWW", "optimizer type 'AdamWW' .*did you mean 'adamw'"),
    ("optimizer.params.lr", "abc", "optimizer.params.lr is the string 'abc', not a number"),
    ("scheduler.type", "WarmupCosine", "scheduler type 'WarmupCosine'.*WarmupCosineLR"),
    ("scheduler.params.total_num_steps", "Auto", "did you mean \"auto\""),
    ("scheduler", {"type": "WarmupCosineLRR", "params": {"total_num_steps": "auto"}},
     "scheduler type 'WarmupCosineLRR'.*did you mean 'WarmupCosineLR'"),
    ("gradient_clipping", "one", "gradient_clipping must be a number >= 0"),
    ("gradient_clipping", -1, "gradient_clipping must be a number >= 0"),
    ("gradient_acumulation_steps", 4, "unknown key 'gradient_acumulation_steps'.*did you mean "
                                      "'gradient_accumulation_steps'"),
    ("zero_optimisation", {"stage": 2}, "did you mean 'zero_optimization'"),
    # these passed and stopped deepspeed.initialize (or the first step) with a traceback
    ("optimizer", None, "no optimizer section"),
    ("optimizer", {"type": "SGD", "params": {"lr": 1e-3}},
     "optimizer 'SGD' under ZeRO stage 2: .*zero_allow_untested_optimizer"),
    ("scheduler", {"type": "StepLR", "params": {"step_size": 5}},
     "scheduler 'StepLR' is a torch.optim.lr_scheduler class, which cannot drive ZeRO"),
    ("prescale_gradients", True, "prescale_gradients under ZeRO stage 2: DeepSpeed does not"),
    ("gradient_predivide_factor", 2.0, "gradient_predivide_factor 2.0 under ZeRO stage 2"),
    ("steps_per_print", 0, "steps_per_print must be a positive integer, got 0"),
    # DeepSpeed takes "3" for 3; dsfm's own stage checks did not: --resume stopped with a
    # TypeError, and model.compile passed under ZeRO-3 to fail in torch.compile
    ("zero_optimization.stage", "3", r"zero_optimization.stage must be an integer \(0-3\), "
                                     "got '3'"),
    # DeepSpeed's automatic leaf modules: the first backward stopped with a traceback
    ("zero_optimization", {"stage": 3, "stage3_module_granularity_threshold": 5000},
     "stage3_module_granularity_threshold 5000: DeepSpeed would gather the AViT's smallest "
     "modules as leaf modules.*train.zero3_whole_blocks"),
])
def test_a_ds_config_that_cannot_train_is_one_line_before_the_process_group(path, value,
                                                                           needle):
    """Each of these passed dsfm's checks and ended in DeepSpeed: a traceback on every rank
    after the process group started, a crash at the first step, or (the misspelt keys, the
    negative clipping) a run that silently trained otherwise. (What ZeRO cannot take is
    checked by `probe`, after the batch sizes.)"""
    cfg = _with(path, value)
    with pytest.raises(ConfigError, match=needle) as exc:
        ds_settings.check(cfg, "ds.json")
        ds_settings.probe(cfg, "ds.json")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("ds.json: ")


def test_deepspeed_parser_refusals_are_one_line():
    """What only DeepSpeed's own parser knows (a typo inside its fp16 section, a
    communication type): refused before the process group, pydantic's lines joined."""
    for extra, needle in (({"fp16": {"enabled": False, "loss_scal": 1}}, "loss_scal"),
                          ({"communication_data_type": "fp33"}, "fp33")):
        with pytest.raises(ConfigError, match=f"DeepSpeed refuses it: .*{needle}") as exc:
            ds_settings.probe({**BASE_DS, **extra}, "ds.json")
        assert "\n" not in str(exc.value)
    ds_settings.probe(BASE_DS, "ds.json")


def test_what_the_scheduler_refuses_is_one_line_before_the_process_group():
    """WarmupCosineLR refuses a warmup of 0 steps in its constructor, inside
    deepspeed.initialize on every rank; a torch scheduler is built the same way."""
    bad = schedule.resolve(_with("scheduler.params.warmup_num_steps", 0), 10)
    assert ds_settings.check(bad, "ds.json") == []
    with pytest.raises(ConfigError, match="WarmupCosineLR refuses .*warmup_num_steps must be "
                                          "a positive integer, got 0") as exc:
        ds_settings.probe(bad, "ds.json")
    assert "\n" not in str(exc.value)
    torch_sched = {**_with("zero_optimization.stage", 0),
                   "scheduler": {"type": "StepLR", "params": {"gama": 0.5}}}
    assert ds_settings.check(torch_sched, "ds.json") == []     # stage 0: torch's are fine
    with pytest.raises(ConfigError, match="StepLR refuses .*gama"):
        ds_settings.probe(torch_sched, "ds.json")
    torch_sched["scheduler"]["params"] = {"step_size": 5, "gamma": 0.5}
    ds_settings.probe(torch_sched, "ds.json")
    untested = {**_with("optimizer", {"type": "SGD", "params": {"lr": 1e-3}}),
                "zero_allow_untested_optimizer": True}
    assert ds_settings.check(untested, "ds.json") == []


@pytest.mark.parametrize("name, why", [
    ("ReduceLROnPlateau", "steps on a metric, which DeepSpeed's engine does not pass"),
    ("LambdaLR", "takes a Python function"),
    ("SequentialLR", "takes scheduler objects"),
    ("LRScheduler", "is no learning-rate scheduler class"),
    ("Optimizer", "is no learning-rate scheduler class"),
])
def test_torch_schedulers_deepspeed_cannot_drive_are_refused(name, why):
    """DeepSpeed's engine steps ReduceLROnPlateau with the train batch size for its metric
    (its step() without one raises TypeError, and the engine retries with that): the batch
    size never improves, so the rate was cut every patience + 1 steps without a word. The
    others need Python objects and stopped deepspeed.initialize after the process group."""
    cfg = {**_with("zero_optimization.stage", 0), "scheduler": {"type": name, "params": {}}}
    with pytest.raises(ConfigError, match=f"ds.json: scheduler {name!r} {why}") as exc:
        ds_settings.check(cfg, "ds.json")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("optimizer, zero, needle", [
    ({"type": "AdamW", "params": {"lr": -1e-3}}, {"stage": 2},
     r"optimizer AdamW \(torch.optim.AdamW, which dsfm runs in place of FusedAdam without a "
     r"GPU\) refuses its params \{'lr': -0.001\}: Invalid learning rate: -0.001"),
    ({"type": "Adam", "params": {"betas": [0.9]}}, {"stage": 2}, "refuses its params"),
    ({"type": "AdamW", "params": {"lr": 1e-3, "beta": [0.9, 0.99]}}, {"stage": 2},
     "unexpected keyword argument 'beta'"),
    ({"type": "AdamW", "params": {"lr": 1e-3, "max_grad_norm": 1.0}}, {"stage": 2},
     "DeepSpeed refuses params.max_grad_norm; clip with the top-level \"gradient_clipping\""),
    ({"type": "Adagrad", "params": {"lr": 1e-2, "weight_decay": -1}}, {"stage": 2},
     r"optimizer Adagrad \(torch.optim.Adagrad\) refuses .*Invalid weight_decay"),
    ({"type": "SGD", "params": {"lr": 0.1, "momentun": 0.9}}, {"stage": 0},
     "SGD.*unexpected keyword argument 'momentun'"),
    # DeepSpeedCPUAdam checks no range: this one trained uphill, lr -0.001, without a word
    ({"type": "AdamW", "params": {"lr": -1e-3}}, {"stage": 2, "offload_optimizer":
                                                  {"device": "cpu"}},
     r"optimizer AdamW refuses its params \{'lr': -0.001\}: Invalid learning rate"),
    ({"type": "Lion", "params": {"lr": 1e-4}}, {"stage": 2},
     "Lion: DeepSpeed builds it as FusedLion, a CUDA op, and this machine has no GPU"),
])
def test_what_the_optimizer_refuses_is_one_line_before_the_process_group(optimizer, zero,
                                                                        needle):
    """These passed the checks and stopped deepspeed.initialize on every rank with a
    traceback, after the process group, or (the offloaded negative rate) trained silently."""
    cfg = {**BASE_DS, "optimizer": optimizer, "zero_optimization": zero}
    assert ds_settings.check(cfg, "ds.json") == []
    with pytest.raises(ConfigError, match=needle) as exc:
        ds_settings.probe(cfg, "ds.json")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("ds.json: ")


def test_the_optimizer_is_checked_as_a_gpu_builds_it():
    """With a GPU, Adam and AdamW are DeepSpeed's FusedAdam, which takes bias_correction (torch's
    does not), has no amsgrad, and checks no range: a negative rate trained uphill there."""
    check = ds_settings._check_optimizer_params
    adam = {**BASE_DS, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3,
                                                                 "bias_correction": False}}}
    check(adam, "ds.json", cuda=True)
    with pytest.raises(ConfigError, match="unexpected keyword argument 'bias_correction'"):
        check(adam, "ds.json", cuda=False)
    for params, needle in (({"lr": -1.0}, r"AdamW refuses its params \{'lr': -1.0\}: Invalid "
                                          "learning rate"),
                           ({"lr": 1e-3, "amsgrad": True}, r"\(FusedAdam\): DeepSpeed's "
                                                           "FusedAdam has no amsgrad"),
                           ({"foreach": True}, r"AdamW \(FusedAdam\) refuses its params")):
        with pytest.raises(ConfigError, match=needle):
            check({**BASE_DS, "optimizer": {"type": "AdamW", "params": params}}, "ds.json",
                  cuda=True)
    check({**BASE_DS, "optimizer": {"type": "Lion", "params": {"lr": 1e-4}}}, "ds.json",
          cuda=True)


def test_string_parameters_deepspeed_takes_are_accepted():
    """WarmupLR's warmup_type and torch schedulers' strategies are strings; only numeric
    parameters must be numbers."""
    ok = _with("scheduler.params.warmup_type", "linear")
    assert ds_settings.check(ok, "ds.json") == []
    ds_settings.probe(ok, "ds.json")
    with pytest.raises(ConfigError, match="warmup_min_ratio is the string 'low'"):
        ds_settings.check(_with("scheduler.params.warmup_min_ratio", "low"), "ds.json")


def test_yaml_merge_keys_are_not_duplicates():
    from dsfm.config import parse_yaml
    merged = parse_yaml("a: &b {x: 1, y: 1}\nc:\n  <<: *b\n  y: 2\n")
    assert merged["c"] == {"x": 1, "y": 2}            # an explicit key overrides a merged one


def test_a_ds_config_key_deepspeed_may_not_read_is_a_warning():
    assert ds_settings.check(BASE_DS, "ds.json") == []
    assert ds_settings.check(_with("fp16", {"enabled": False}), "ds.json") == []
    assert ds_settings.check(_with("tensorboard", {"enabled": False}), "ds.json") == []
    notes = ds_settings.check(_with("my_comment", "for the 4-node runs"), "ds.json")
    assert len(notes) == 1 and "'my_comment' is not a key DeepSpeed" in notes[0]



def test_exponents_without_a_dot_are_numbers():
    """PyYAML (YAML 1.1) reads 1e-3 as a string, which the strict config would refuse (the lax
    one converted it): such exponents are numbers, as in YAML 1.2."""
    cfg = load_config(None, ["monitor.interval_s=5e-1", "model.drop_path=1E-1"])
    assert cfg.monitor.interval_s == 0.5 and cfg.model.drop_path == 0.1
    with pytest.raises(ConfigError, match="valid integer \\(got 1000.0\\)"):
        load_config(None, ["train.max_steps=1e3"])


@pytest.mark.parametrize("assignment, value", [
    ("train.seed=010", 10),                   # YAML 1.1: octal, 8
    ("train.seed=0o17", 15),
    ("train.seed=0x1F", 31),
    ("train.seed=-0", 0),
    ("train.seed=10_000", 10000),
    ("name=12:30", "12:30"),                  # YAML 1.1: 750, in base 60
    ("name=2024-05-01", "2024-05-01"),        # YAML 1.1: a date
])
def test_numbers_are_read_as_yaml_1_2_reads_them(assignment, value):
    """PyYAML (YAML 1.1) read 010 as 8 and 1:30 as 90 without a word, and a date-like name
    as a date, which the strict config refused."""
    key, _ = assignment.split("=", 1)
    section, _, field = key.rpartition(".")
    cfg = load_config(None, [assignment])
    assert getattr(getattr(cfg, section) if section else cfg, field) == value


def test_a_number_yaml_1_1_read_in_base_60_or_a_bad_int_tag_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train.max_steps: input should be a valid integer "
                                          r"\(got '1:30'\)"):
        load_config(None, ["train.max_steps=1:30"])
    with pytest.raises(ConfigError, match="--set train.max_steps: cannot parse .*'abc' is not "
                                          "an integer"):
        load_config(None, ["train.max_steps=!!int abc"])
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  seed: 010\n  max_steps: 1:30\n")
    with pytest.raises(ConfigError, match=r"got '1:30'"):
        load_config(str(path))


def test_a_run_config_dumped_reads_back_the_same(tmp_path):
    """dump() wrote strings that read back as numbers bare (`name: 1e3` read back as 1000.0),
    so a run's config.yaml given as --config was refused."""
    cfg = load_config(None, ["name='1e3'", "data.datasets=['010', '0o7', '1:30', 2024-05-01]",
                             "data.weights=[1, 1e-9, 0.5, 2e20]"])
    path = tmp_path / "config.yaml"
    path.write_text(dump(cfg))
    assert load_config(str(path)) == cfg
    assert yaml.safe_load(path.read_text())["data"]["datasets"] == ["010", "0o7", "1:30",
                                                                   "2024-05-01"]
