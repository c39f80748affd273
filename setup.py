"""hpcqn: distributed quasi-Newton and second-order optimizers for MPI jobs."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="hpcqn",
    version="0.1.0",
    description="Distributed quasi-Newton and second-order optimizers (mL-BFGS, MKOR, "
    "L-BFGS, K-FAC) for MPI and Slurm jobs",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["hpcqn", "hpcqn.*"]),
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "h5py>=3.6",
        "threadpoolctl>=3.1",
        "tomli>=1.1; python_version < '3.11'",
    ],
    extras_require={
        # mpi4py alone: build it against the cluster's MPI (see README).
        "mpi": ["mpi4py>=4.0"],
        # MPI from PyPI, for laptops and CI.
        "mpich": ["mpi4py>=4.0", "mpich"],
        "torch": ["torch>=2.1,<3"],
        "gpu": ["cupy-cuda12x>=13"],
        "plot": ["matplotlib>=3.5"],
        "bench": ["pytorch-optimizer>=4.1,<5"],
        # hpcqn.experiments (the built-in problems and the jobs of `hpcqn run`): their data
        # sets ship with scikit-learn.
        "experiments": ["scikit-learn>=1.2"],
        "test": [
            "pytest>=7",
            "pytest-mpi>=0.6",
            "pytest-timeout>=2.1",
            "scikit-learn>=1.2",
            "hypothesis>=6",
            "ruff>=0.4",
            # tests/test_array_api.py: the kernels under a strict array-API namespace
            "array-api-strict>=2.0",
            # tests/test_torch_suite.py: torch's optimizer test infrastructure imports it
            "expecttest",
        ],
    },
    entry_points={"console_scripts": ["hpcqn = hpcqn.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Mathematics",
        "Environment :: GPU :: NVIDIA CUDA",
    ],
)
