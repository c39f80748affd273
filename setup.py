"""hpcqn: distributed quasi-Newton and second-order optimizers for MPI jobs.

The package's metadata (PEP 621: name, version, dependencies, extras, the ``hpcqn``
command) is in pyproject.toml; this file lets tools that still call ``setup.py`` build
it."""

from setuptools import setup

setup()
