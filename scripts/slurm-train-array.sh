#!/usr/bin/env bash
# Train the study's models side by side: a SLURM job array, one model per task and GPU.
#
#   sbatch --array=0-5 scripts/slurm-train-array.sh            # six models, six GPUs
#
# Before: the shared stages, once (labels, split, image cache):
#   sbatch --wait --gres=gpu:0 --wrap ".venv/bin/kedro run --env nih --pipelines data_processing,augmentation"
# After, when every task has ended:
#   sbatch --dependency=afterok:<array job id> --wrap ".venv/bin/kedro run --env nih --pipelines reporting"
#
# Each task trains and predicts one model (`--pipelines training,baselines --namespaces <model>`)
# and locks only that model in data/nih (rare_cxr.runs.RunLocks): the tasks run at the same time,
# a second task of the same model waits, and so does a run that rewrites the shared stages.
# data/nih must be on storage every node sees (the locks are POSIX record locks; on NFS they need
# lockd, which most clusters run -- not checked here). Docs: docs/user-guide-nih.md.
#
# Settings (environment variables, all optional):
#   RARE_CXR_ENV     configuration environment (default nih; empty: the default environment)
#   RARE_CXR_MODELS  the models, indexed by SLURM_ARRAY_TASK_ID (default: the six of conf/nih)
#   RARE_CXR_PARAMS  extra --params, e.g. data_root=/data/nih
#   RARE_CXR_KEDRO   the kedro command (default .venv/bin/kedro)
#
#SBATCH --job-name=rare-cxr-train
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=3-00:00:00
#SBATCH --output=rare-cxr-train-%A_%a.log
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
env_name="${RARE_CXR_ENV-nih}"
read -r -a models <<< "${RARE_CXR_MODELS:-multiscale_resnet resnet_single_scale vgg16 inception_v3 densenet121 efficientnet_b0}"
task="${SLURM_ARRAY_TASK_ID:?run it as a job array (sbatch --array=0-5), or set SLURM_ARRAY_TASK_ID}"
if (( task >= ${#models[@]} )); then
  echo "SLURM_ARRAY_TASK_ID=$task, but only ${#models[@]} models: ${models[*]}" >&2
  exit 2
fi
model="${models[$task]}"
args=(run --pipelines training,baselines --namespaces "$model")
[[ -n "$env_name" ]] && args+=(--env "$env_name")
[[ -n "${RARE_CXR_PARAMS:-}" ]] && args+=(--params "$RARE_CXR_PARAMS")
echo "task $task: training $model (${args[*]})"
exec "${RARE_CXR_KEDRO:-.venv/bin/kedro}" "${args[@]}"
