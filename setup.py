"""dsfm: pretraining scientific foundation models (MPP, AION-style) with DeepSpeed."""

from setuptools import find_packages, setup

setup(
    name="dsfm",
    version="0.1.0",
    description="DeepSpeed stack for pretraining scientific foundation models on The Well, "
                "PDEBench and tokenized astronomy data",
    python_requires=">=3.10",
    packages=find_packages(include=["dsfm", "dsfm.*", "perf", "perf.*"]),
    # normalize.c: the fused kernel dsfm.data.native compiles on first use
    package_data={"dsfm": ["configs/*.yaml", "data/*.c"], "perf": ["profiles/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "h5py>=3.8",
        "numpy>=1.24",
        "nvidia-ml-py>=12.535",
        "psutil>=5.9",
        "tensorboard>=2.14",
        "pyyaml>=6",
        "pydantic>=2",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        # the cluster's own MPI library provides mpirun; see docs/cluster.md
        "mpi": ["mpi4py>=4.0"],
        # CI brings its own MPI (MPICH from PyPI) so the mpirun launch is tested everywhere
        "test": ["pytest>=7", "pytest-xdist>=3.5", "the-well==1.2.0", "mpi4py>=4.1",
                 "mpich>=5.0"],
    },
)
