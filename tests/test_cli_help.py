"""Every command's --help names how to run it and says what it does in whole sentences."""

import importlib
import re

import pytest

# module imported, and the command the docs give for it
COMMANDS = [
    ("dsfm.data.check", "python -m dsfm.data.check"),
    ("dsfm.sim.__main__", "python -m dsfm.sim"),
    ("dsfm.sim.preview", "python -m dsfm.sim.preview"),
    ("dsfm.runtime.export", "python -m dsfm.runtime.export"),
    ("dsfm.runtime.slurm", "python -m dsfm.runtime.slurm"),
    ("dsfm.monitor.__main__", "python -m dsfm.monitor"),
    ("dsfm.monitor.report", "python -m dsfm.monitor.report"),
    ("perf.allreduce_sweep", "python -m perf.allreduce_sweep"),
    ("perf.feed_bench", "python -m perf.feed_bench"),
    ("perf.loader_bench", "python -m perf.loader_bench"),
    ("perf.monitor_overhead", "python -m perf.monitor_overhead"),
    ("perf.nccl_log", "python -m perf.nccl_log"),
    ("perf.op_count", "python -m perf.op_count"),
    ("perf.sim_bench", "python -m perf.sim_bench"),
    ("perf.topology", "python -m perf.topology"),
    ("perf.train_bench", "python -m perf.train_bench"),
    ("perf.well_reader_bench", "python -m perf.well_reader_bench"),
    ("perf.zero_host", "python -m perf.zero_host"),
]


@pytest.mark.parametrize("module,command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_help_names_the_command_and_ends_its_description(module, command, capsys):
    """Four perf benchmarks, the report and the export printed `usage: feed_bench.py ...`, a
    file name that does not run as a script (its imports need the package); well_reader_bench's
    description was its docstring's first line, which ended in "single process:" and lost the
    command that followed."""
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {command} "), out.splitlines()[0]
    description = out.split("\n\n")[1]
    assert not re.search(r"[:,]$", description.strip()), description


def test_check_help_says_it_takes_pdebench_files(capsys):
    """dsfm.data.check validates PDEBench files and sources as well as Well datasets; its
    --help said only 'Well-format files and dataset directories' and left PATH unexplained."""
    from dsfm.data import check

    with pytest.raises(SystemExit):
        check.main(["--help"])
    assert "PDEBench" in capsys.readouterr().out


@pytest.mark.parametrize("module,command", COMMANDS + [("dsfm.train", "python dsfm/train.py")],
                         ids=[c for _, c in COMMANDS] + ["train"])
def test_every_option_with_a_default_says_it_in_the_help(module, command, monkeypatch):
    """perf.train_bench's --sizes (Ti,S,B,L: a bare run does L at 128² even on a CPU),
    --frames, --res, --steps; loader_bench's --workers and --batch; dsfm.sim's --preset and
    --seed: a user could not learn their defaults from --help."""
    import argparse

    parsers = []

    def caught(self, args=None, namespace=None):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", caught)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args",
                        lambda self, *a, **k: caught(self))
    with pytest.raises(SystemExit):
        importlib.import_module(module).main([])
    [parser] = parsers
    silent = []
    for action in parser._actions:
        if (not action.option_strings or action.default is None or action.default is False
                or action.default in ("", [], (), argparse.SUPPRESS)
                or isinstance(action, argparse._StoreConstAction)):
            continue
        text = parser._get_formatter()._format_action(action)
        if "default" not in text.lower():
            silent.append(action.option_strings[-1])
    assert not silent, f"{command}: no default in the help of {', '.join(silent)}"
