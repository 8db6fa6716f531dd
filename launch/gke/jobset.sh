#!/usr/bin/env bash
# Renders a JobSet manifest from jobset-tpu.yaml or jobset-gpu.yaml and applies it
# with kubectl. Needs the JobSet controller on the cluster and an image built with
# launch/gke/Dockerfile.
#
#   IMAGE=us-docker.pkg.dev/P/R/nerveseg:tpu launch/gke/jobset.sh tpu -- \
#     --config configs/unet.py --workdir gs://BUCKET/runs/unet
#   IMAGE=... NUM_NODES=4 launch/gke/jobset.sh gpu -- --config ... --workdir gs://...
#
# Options (before the target): --dry-run (print the manifest and the kubectl
# command), --render (print only the manifest, e.g. > job.yaml).
# Environment (defaults in launch/README.md): IMAGE (required); JOB_NAME, NAMESPACE,
# SERVICE_ACCOUNT, MAX_RESTARTS, GRACE_SECONDS, SPOT, NUM_NODES; for tpu NUM_SLICES,
# TPU_ACCELERATOR, TPU_TOPOLOGY, CHIPS_PER_NODE; for gpu GPU_ACCELERATOR,
# GPUS_PER_NODE, COORDINATOR_PORT.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

render_only=0
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --render) render_only=1 ;;
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

require_env IMAGE
export IMAGE
export JOB_NAME="${JOB_NAME:-nerveseg}"
export NAMESPACE="${NAMESPACE:-default}"
export SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-default}"
export MAX_RESTARTS="${MAX_RESTARTS:-3}"
export GRACE_SECONDS="${GRACE_SECONDS:-120}"
export NUM_SLICES="${NUM_SLICES:-1}"
export TPU_ACCELERATOR="${TPU_ACCELERATOR:-tpu-v5-lite-podslice}"
export TPU_TOPOLOGY="${TPU_TOPOLOGY:-4x4}"
export CHIPS_PER_NODE="${CHIPS_PER_NODE:-4}"
export GPU_ACCELERATOR="${GPU_ACCELERATOR:-nvidia-h100-80gb}"
export GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export COORDINATOR_PORT="${COORDINATOR_PORT:-1234}"
if [[ "$target" == tpu ]]; then
  export NUM_NODES="${NUM_NODES:-4}"  # TPU VM hosts per slice: 4x4 v5e = 4 hosts
else
  export NUM_NODES="${NUM_NODES:-2}"
fi

# Pod names get suffixes appended, and Kubernetes caps names at 63 characters.
[[ "$JOB_NAME" =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] \
  || die "JOB_NAME must be lowercase letters, digits and '-', at most 40 characters: $JOB_NAME"
for v in MAX_RESTARTS GRACE_SECONDS NUM_SLICES NUM_NODES CHIPS_PER_NODE GPUS_PER_NODE COORDINATOR_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
if [[ "${SPOT:-0}" == 1 ]]; then
  export SPOT_SELECTOR='cloud.google.com/gke-spot: "true"'
else
  export SPOT_SELECTOR='# on-demand nodes (SPOT=1 for spot)'
fi

# The training arguments as a JSON list, which is also a YAML flow sequence.
json="["
sep=""
for a in "${train_args[@]}"; do
  [[ "$a" != *[[:cntrl:]]* ]] || die "training argument has a control character: $(quote "$a")"
  a="${a//\\/\\\\}"
  a="${a//\"/\\\"}"
  json+="$sep\"$a\""
  sep=", "
done
export TRAIN_ARGS_JSON="$json]"
check_shared_workdir "${train_args[@]}"

command -v envsubst >/dev/null || die "envsubst not found: install gettext-base (Debian/Ubuntu) or gettext"
template="$(dirname "${BASH_SOURCE[0]}")/jobset-$target.yaml"
# Only our variables: anything else that looks like $X in the template stays as is.
# shellcheck disable=SC2016  # envsubst wants the names, not their values
vars='${JOB_NAME} ${NAMESPACE} ${SERVICE_ACCOUNT} ${MAX_RESTARTS} ${GRACE_SECONDS}
${NUM_SLICES} ${NUM_NODES} ${TPU_ACCELERATOR} ${TPU_TOPOLOGY} ${CHIPS_PER_NODE}
${GPU_ACCELERATOR} ${GPUS_PER_NODE} ${COORDINATOR_PORT} ${SPOT_SELECTOR} ${IMAGE}
${TRAIN_ARGS_JSON}'
manifest="$(envsubst "$vars" <"$template")"
if [[ "$manifest" =~ \$\{[A-Z_]+\} ]]; then
  die "$template uses ${BASH_REMATCH[0]}, which jobset.sh does not set"
fi

if ((render_only)); then
  printf '%s\n' "$manifest"
  exit 0
fi
out="${TMPDIR:-/tmp}/${JOB_NAME}.jobset.yaml"
if [[ "$DRY_RUN" == 1 ]]; then
  echo "# $out:"
  printf '%s\n' "$manifest"
else
  printf '%s\n' "$manifest" >"$out"
fi
run kubectl apply -f "$out"
echo "# follow: kubectl logs -n $NAMESPACE -f -l jobset.sigs.k8s.io/jobset-name=$JOB_NAME"
