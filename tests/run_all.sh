#!/usr/bin/env bash
# The test suite, as the README and CI run it. Each launch has a wall-clock limit and
# every test a pytest-timeout limit, so a hung collective fails the run instead of
# stalling it. Each launch prints one summary (tests/ranks.py); every rank's log is kept
# in $HPCQN_TEST_LOGS.
#
#   bash tests/run_all.sh          # the serial tests, the MPI tests under mpiexec -n 1, 2
#                                  # and 3, the torch.distributed ones under torchrun on 2
#                                  # and 3 processes, ruff (under 10 minutes on 2 cores)
#   bash tests/run_all.sh --slow   # the tests marked slow (whole launches of hpcqn run,
#                                  # torchrun and mpiexec, the peers' suites, every docs
#                                  # code block and example) and the docs build; CI runs
#                                  # both
set -uo pipefail
cd "$(dirname "$0")/.."

# One thread per rank: several ranks share the cores.
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
LOGS="${HPCQN_TEST_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/hpcqn-tests.XXXXXX")}"
SELECT="not gpu and not slow"
status=0
start=$SECONDS

if [[ "${1:-}" == "--slow" ]]; then
    python -m pytest -m "slow and not mpi and not gpu" -q || status=1
    # The documentation site, warnings as errors (its code blocks ran above)
    python -m sphinx -W --keep-going -q -b html docs docs/_build/html || status=1
    echo "== $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
    exit "${status}"
fi

python -m pytest -m "not mpi and not gpu and not slow" -q || status=1

for ranks in 1 2 3; do
    dir="${LOGS}/mpi-${ranks}"
    timeout --kill-after=30 900 mpiexec -n "${ranks}" python tests/ranks.py run "${dir}" -- \
        --with-mpi -m "mpi and ${SELECT}" -q -p no:cacheprovider
    python tests/ranks.py summary "${dir}" "MPI tests on ${ranks} rank(s)" || status=1
done

# The MPI-marked tests of hpcqn.torch over torch.distributed (gloo), as torchrun launches
# them (the tests that use mpi4py of their own stay with mpiexec).
TORCHRUN_TESTS=(tests/test_comm.py tests/test_torch_mpi.py tests/test_torch_agreement_mpi.py
                tests/test_mkor_mpi.py tests/test_kfac_mpi.py tests/test_nonfinite_mpi.py
                tests/test_sequence_models_mpi.py)
for ranks in 2 3; do
    dir="${LOGS}/torchrun-${ranks}"
    timeout --kill-after=30 600 torchrun --standalone --nproc_per_node "${ranks}" \
        tests/ranks.py run "${dir}" -- --with-mpi -m "mpi and ${SELECT}" -q \
        -p no:cacheprovider "${TORCHRUN_TESTS[@]}" > "${LOGS}/torchrun-${ranks}.launcher.log" 2>&1
    python tests/ranks.py summary "${dir}" \
        "torch.distributed tests on ${ranks} process(es)" || status=1
done

ruff check . || status=1
echo "== $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s; every rank's log: ${LOGS}"
exit "${status}"
