#!/bin/bash
# The job step every hpcqn sbatch template runs: srun starts one rank per task, the run
# directory is keyed by the job id (a requeued job keeps its id, so it resumes from its
# latest checkpoint), and exit code 3 (SIGUSR1/SIGTERM caught, checkpoint written)
# requeues the job.
#   bash slurm/hpcqn-step.sh JOB.toml [srun options...]
set -uo pipefail
job=${1:?usage: hpcqn-step.sh JOB.toml [srun options...]}
shift
run_dir=${HPCQN_RUN_DIR:-runs/${SLURM_JOB_NAME:-hpcqn}-${SLURM_JOB_ID:-local}}
echo "hpcqn: job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}), $job, run dir $run_dir"
srun "$@" hpcqn run "$job" --output "$run_dir/summary.json"
status=$?
if [ "$status" -eq 3 ]; then
    echo "hpcqn: stopped by a signal after a checkpoint; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
