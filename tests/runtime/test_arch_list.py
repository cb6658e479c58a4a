"""TORCH_CUDA_ARCH_LIST entries that DeepSpeed's JIT builder cannot parse ("9.0a", set by the
GPU machine's CUDA image) are rewritten before it compiles FusedAdam."""

import os

import pytest

from dsfm.runtime.engine import deepspeed_arch_list, fix_arch_list


@pytest.mark.parametrize("value,fixed", [
    ("9.0a", "9.0"),
    ("8.0;9.0a;10.0a+PTX", "8.0;9.0;10.0+PTX"),
    ("8.0 8.6 9.0 9.0a", "8.0;8.6;9.0"),
    ("7.5+PTX", "7.5+PTX"),
    ("Hopper;9.0", "Hopper;9.0"),
])
def test_arch_list(value, fixed):
    assert deepspeed_arch_list(value) == fixed


def test_the_fixed_list_parses_as_deepspeed_reads_it():
    """DeepSpeed 0.19's own parse (builder.compute_capability_args) of every entry."""
    for cc in deepspeed_arch_list("8.0;9.0a;10.0a+PTX;12.0f").split(";"):
        assert all(int(part.split("+")[0]) >= 0 for part in cc.split("."))


def test_fix_arch_list_rewrites_the_environment(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    fix_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    fix_arch_list()
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
