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

# The same MPI-marked tests of hpcqn.torch over torch.distributed (gloo), as torchrun
# launches them (tests that use mpi4py of their own stay with mpiexec).
TORCHRUN_TESTS="tests/test_comm.py tests/test_torch_mpi.py tests/test_torch_agreement_mpi.py
  tests/test_mkor_mpi.py tests/test_kfac_mpi.py tests/test_nonfinite_mpi.py
  tests/test_sequence_models_mpi.py"
for ranks in 2 3; do
    echo "== torch.distributed tests on ${ranks} process(es) (torchrun, gloo)"
    # shellcheck disable=SC2086
    timeout --kill-after=30 600 torchrun --standalone --nproc_per_node "${ranks}" \
        -m pytest --with-mpi -m mpi -q -p no:cacheprovider ${TORCHRUN_TESTS}
done

ruff check .
