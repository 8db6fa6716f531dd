#!/usr/bin/env bash
# Trains on a Cloud TPU VM or multi-host slice: create (or reuse) the TPU, install this
# repository on every worker, then run `python -m nerveseg_jax.train` on all workers.
# On a slice, jax.distributed.initialize() finds the other workers by itself.
#
#   TPU_NAME=nerve-v5e ZONE=us-west4-a launch/tpu_vm.sh -- \
#     --config configs/unet.py --workdir gs://BUCKET/runs/unet \
#     --config.data.data_dir=gs://BUCKET/tensorflow_datasets
#
# Options (before --):
#   --dry-run       print every command, run nothing
#   --skip-create   the TPU exists: skip describe/create
#   --skip-install  the code is installed: only run training
#   --detach        start training under nohup (log: $REMOTE_DIR/$LOG) and return
# Environment (defaults in launch/README.md): TPU_NAME, ZONE (required); PROJECT,
# ACCELERATOR_TYPE, RUNTIME_VERSION, SPOT, CODE_GCS, REMOTE_DIR, PYTHON_VERSION, LOG.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

create=1 install=1 detach=0
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --skip-create) create=0 ;;
    --skip-install) install=0 ;;
    --detach) detach=1 ;;
    --) shift; break ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (training arguments go after --)" ;;
  esac
  shift
done
train_args=("$@")

require_env TPU_NAME ZONE
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
SPOT="${SPOT:-0}"
CODE_GCS="${CODE_GCS:-}"
REMOTE_DIR="${REMOTE_DIR:-nerveseg_jax}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
LOG="${LOG:-train.log}"
[[ -z "$CODE_GCS" || "$CODE_GCS" == gs://* ]] || die "CODE_GCS must be a gs:// path, got $CODE_GCS"
check_shared_workdir "${train_args[@]}"

tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")

# 1. Create the TPU unless it is there (reusing keeps its disks and installed code).
# A preempted spot/preemptible TPU still exists but cannot run: delete, then create.
if ((create)); then
  create_cmd=("${tpu[@]}" create "$TPU_NAME" "${where[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ "$SPOT" == 1 ]] && create_cmd+=(--spot)
  delete_cmd=("${tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet)
  describe_cmd=("${tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)')
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${describe_cmd[@]}"
    echo "# if the state is PREEMPTED or TERMINATED:"
    run "${delete_cmd[@]}"
    echo "# if there is no such TPU (or it was just deleted):"
    run "${create_cmd[@]}"
  else
    echo "+ $(quote_args "${describe_cmd[@]}")"
    state="$("${describe_cmd[@]}" 2>/dev/null || true)"
    case "$state" in
      "") run "${create_cmd[@]}" ;;
      PREEMPTED | TERMINATED)
        echo "TPU $TPU_NAME is $state; recreating it"
        run "${delete_cmd[@]}"
        run "${create_cmd[@]}"
        ;;
      *) echo "reusing TPU $TPU_NAME (state $state)" ;;
    esac
  fi
fi

# 2. Ship this checkout to every worker and install it into a venv there. TPU VM
# images carry an older system Python, so uv provides Python $PYTHON_VERSION.
remote_tgz=/tmp/nerveseg_jax-code.tgz
if ((install)); then
  tgz="${TMPDIR:-/tmp}/nerveseg_jax-${TPU_NAME}.tgz"
  run tar -czf "$tgz" -C "$LAUNCH_REPO" --exclude=./.git --exclude=./runs \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=./.venv .
  if [[ -n "$CODE_GCS" ]]; then
    run gcloud storage cp "$tgz" "$CODE_GCS"
    fetch="gcloud storage cp $(quote_args "$CODE_GCS" "$remote_tgz")"
  else
    run "${tpu[@]}" scp "$tgz" "$TPU_NAME:$remote_tgz" "${where[@]}" --worker=all
    fetch=true
  fi
  dir="$(quote "$REMOTE_DIR")"
  setup="set -e; $fetch; mkdir -p $dir; tar -xzf $remote_tgz -C $dir; cd $dir"
  setup+="; python3 -m pip install -q --user uv"
  setup+="; python3 -m uv venv -q --allow-existing --python $(quote "$PYTHON_VERSION") .venv"
  setup+="; python3 -m uv pip install -q --python .venv/bin/python '.[tpu]'"
  run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$setup"
fi

# 3. Train on all workers at once. Preemption sends SIGTERM: train checkpoints, and
# running this script again resumes from the workdir.
train="$(quote_args .venv/bin/python -m nerveseg_jax.train "${train_args[@]}")"
if ((detach)); then
  # nohup and closed descriptors let ssh return while training goes on.
  train="nohup $train > $(quote "$LOG") 2>&1 < /dev/null &"
fi
train="cd $(quote "$REMOTE_DIR") && $train"
run "${tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$train"
