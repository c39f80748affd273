#!/usr/bin/env bash
# The whole test suite, as the README and CI run it:
#   serial tests, the MPI tests under mpiexec -n 1, 2 and 3, and ruff.
# Each mpiexec run has a wall-clock limit, and every test a pytest-timeout limit,
# so a hung collective fails the run instead of stalling it.
set -euo pipefail
cd "$(dirname "$0")/.."

# One thread per rank: several ranks share the cores.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1

python -m pytest -m "not mpi and not gpu" -q

for ranks in 1 2 3; do
    echo "== MPI tests on ${ranks} rank(s)"
    timeout --kill-after=30 900 mpiexec -n "${ranks}" \
        python -m pytest --with-mpi -m mpi -q -p no:cacheprovider
done

ruff check .
