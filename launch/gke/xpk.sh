#!/usr/bin/env bash
# Submits training as an XPK workload (XPK writes and applies the JobSet itself) on an
# existing XPK cluster: a TPU slice (or several) or a pool of H100 nodes.
#
#   CLUSTER=my-xpk IMAGE=us-docker.pkg.dev/P/R/nerveseg:tpu launch/gke/xpk.sh tpu -- \
#     --config configs/unet.py --workdir gs://BUCKET/runs/unet
#   CLUSTER=my-xpk IMAGE=...:cuda NUM_NODES=4 launch/gke/xpk.sh gpu -- --config ...
#
# Options (before the target): --dry-run (print the xpk command, run nothing).
# Environment (defaults in launch/README.md): CLUSTER, IMAGE (required); JOB_NAME,
# PROJECT, ZONE, MAX_RESTARTS, GRACE_SECONDS, SPOT; for tpu TPU_TYPE, NUM_SLICES; for
# gpu DEVICE_TYPE, NUM_NODES.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
  shift
done
target="${1:-}"
[[ "$target" == tpu || "$target" == gpu ]] || die "first argument must be tpu or gpu, got '${target}'"
shift
if (($#)); then
  [[ "$1" == -- ]] || die "training arguments go after --, got $1"
  shift
fi
train_args=("$@")

require_env CLUSTER IMAGE
JOB_NAME="${JOB_NAME:-nerveseg}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
GRACE_SECONDS="${GRACE_SECONDS:-120}"
check_shared_workdir "${train_args[@]}"

for a in "${train_args[@]}"; do
  # XPK writes the command into its YAML as one block-scalar line (and, for GPUs, a
  # double-quoted string too): a newline would break the manifest.
  [[ "$a" != *[[:cntrl:]]* ]] || die "training argument has a control character: $(quote "$a")"
  if [[ "$target" == gpu && "$a" == *[\"\'\\]* ]]; then
    # XPK's GPU pods also get the command as env COMMAND: value: "<command>", where a
    # double quote ends the YAML string and a backslash (our quoting of ') starts an
    # escape. Such a manifest fails to apply, so refuse it here.
    die "XPK gpu workloads cannot carry quotes or backslashes in the command: $(quote "$a")" \
      "(use launch/gke/jobset.sh gpu, or a --config file that sets the value)"
  fi
done
train="python -m nerveseg_jax.train"
((${#train_args[@]})) && train+=" $(quote_args "${train_args[@]}")"
xpk=(xpk workload create --cluster="$CLUSTER" --workload="$JOB_NAME"
  --docker-image="$IMAGE" --max-restarts="$MAX_RESTARTS"
  # Training stopped by SIGTERM exits 143 after its checkpoint; XPK counts a non-zero
  # exit as a user-code failure and restarts the workload for it only with this flag.
  --restart-on-user-code-failure
  --termination-grace-period-seconds="$GRACE_SECONDS")
[[ -n "${PROJECT:-}" ]] && xpk+=(--project="$PROJECT")
[[ -n "${ZONE:-}" ]] && xpk+=(--zone="$ZONE")
[[ "${SPOT:-0}" == 1 ]] && xpk+=(--spot)
if [[ "$target" == tpu ]]; then
  # On TPU slices jax.distributed.initialize() finds its peers by itself.
  xpk+=(--tpu-type="${TPU_TYPE:-v5litepod-16}" --num-slices="${NUM_SLICES:-1}"
    --command="$train")
else
  # XPK's GPU pods name the coordinator host and each node's rank in their own
  # variables; map them onto the ones nerveseg_jax reads (one process per node).
  # shellcheck disable=SC2016  # expanded inside the pod, not here
  # No quotes: the values are a host name and numbers, and assignments are not split.
  env_map='NERVESEG_COORDINATOR=$JAX_COORDINATOR_ADDRESS:$JAX_COORDINATOR_PORT NERVESEG_NUM_PROCESSES=$NNODES NERVESEG_PROCESS_ID=$NODE_RANK'
  xpk+=(--device-type="${DEVICE_TYPE:-h100-80gb-8}" --num-nodes="${NUM_NODES:-2}"
    --command="$env_map $train")
fi
run "${xpk[@]}"
