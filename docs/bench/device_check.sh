#!/usr/bin/env bash
# One command for the accelerator figures of docs/performance.md, in at most 8 minutes.
#
#   OUT=/some/empty/dir bash docs/bench/device_check.sh
#
# Runs from the repository root (found from this file's path) on a machine whose Python
# already has jax, flax, optax and orbax-checkpoint but maybe not ml_collections, clu and
# their small deps: those are installed offline from docs/bench/wheels into a temporary
# folder. Each measurement is its own process under its own time limit, writing its JSON
# as it goes; the report ($OUT/device_check.json and .md) is rewritten after each, so a
# failure or a timeout loses only that measurement.
#
# Environment (all optional but OUT):
#   OUT                     where the report, per-measurement JSON and logs go
#   DEVICE_CHECK_BUDGET_S   seconds for all measurements together (default 450)
#   DEVICE_CHECK_TINY=1     smoke configs and a few steps: a CPU rehearsal of the plumbing
#   TIMEOUT_UNET_BF16_S, TIMEOUT_UNET_FP32_S, TIMEOUT_IRV2_BF16_S   per-measurement caps
#   DEVICE_CHECK_ONLY       comma-separated measurements to run (default: all)
#   PYTHON                  the interpreter (default python3)
set -uo pipefail

: "${OUT:?set OUT to the folder for the results}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-python3}"
BUDGET_S="${DEVICE_CHECK_BUDGET_S:-450}"
TINY="${DEVICE_CHECK_TINY:-0}"
PARTS="$OUT/parts"
LOGS="$OUT/logs"
mkdir -p "$PARTS" "$LOGS"
: > "$PARTS/status.tsv"
SECONDS=0

log() { printf '[device_check %4ds] %s\n' "$SECONDS" "$*"; }

# --- offline deps: only those this Python cannot import already -----------------------
SITE="$(mktemp -d)"
LINK=""
cleanup() {
  rm -rf "$SITE"
  if [[ -n "$LINK" ]]; then rm -f "$LINK"; fi
}
trap cleanup EXIT

need=()
for whl in docs/bench/wheels/*.whl; do
  [[ -e "$whl" ]] || continue
  case "$(basename "$whl")" in
    absl_py-*) mod=absl ;;
    clu-*) mod=clu ;;
    ml_collections-*) mod=ml_collections ;;
    pyyaml-*|PyYAML-*) mod=yaml ;;
    wrapt-*) mod=wrapt ;;
    *) mod="" ;;
  esac
  if [[ -z "$mod" ]] || ! "$PY" -c "import $mod" 2>/dev/null; then
    need+=("$whl")
  fi
done
if ((${#need[@]})); then
  log "installing ${#need[@]} carried wheel(s) into $SITE"
  if ! "$PY" -m pip install -q --no-deps --no-index --target "$SITE" "${need[@]}" \
      > "$LOGS/wheels.log" 2>&1; then
    # No pip: a wheel is a zip of site-packages contents.
    for whl in "${need[@]}"; do "$PY" -m zipfile -e "$whl" "$SITE"; done
  fi
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

# The configs import nerveseg_jax.configs, which an install maps to configs/; in a bare
# checkout a link stands in for the install, removed on exit.
if ! "$PY" -c "import nerveseg_jax.configs" 2>/dev/null && [[ ! -e nerveseg_jax/configs ]]; then
  ln -s ../configs nerveseg_jax/configs && LINK="$REPO/nerveseg_jax/configs"
fi

# The package's XLA:CPU flags help only the host backend; off an explicit CPU run they
# are left out, so that an XLA build which no longer knows them cannot abort the check.
if [[ "${JAX_PLATFORMS:-}" != cpu ]]; then
  export NERVESEG_NO_XLA_FLAGS="${NERVESEG_NO_XLA_FLAGS:-1}"
fi

if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv > "$OUT/nvidia_smi.csv" 2>&1 || true
fi

# --- measurements ---------------------------------------------------------------------
if [[ "$TINY" == 1 ]]; then
  UNET="configs/unet.py:smoke"
  IRV2="configs/classifier.py:smoke"
  SIZES=(--steps 2 --frames 40 --fold_steps 2 --latency_iters 5 --infer_batch 4
         --config.data.augment.enabled=False)
  IRV2_SIZES=(--steps 1 --config.batch_size=2)
else
  UNET="configs/unet.py"
  IRV2="configs/classifier.py"
  # 300 fold steps and a 5635-frame set: the Kaggle train set, fold 0 held out.
  SIZES=(--steps 50 --fold_steps 300 --latency_iters 100 --infer_batch 64)
  IRV2_SIZES=(--steps 20)
fi

report() {
  "$PY" docs/bench/device_check_report.py --parts "$PARTS" --out "$OUT" \
    --budget_s "$BUDGET_S" --elapsed_s "$SECONDS" || log "report failed"
}

# measure NAME CAP_S ARGS...: runs the benchmark under min(CAP_S, what the budget has left).
measure() {
  local name="$1" cap="$2" left limit rc start
  shift 2
  if [[ -n "${DEVICE_CHECK_ONLY:-}" && ",$DEVICE_CHECK_ONLY," != *",$name,"* ]]; then
    return
  fi
  left=$((BUDGET_S - SECONDS))
  limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    log "$name: skipped, ${left}s of the budget left"
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$PARTS/status.tsv"
    report
    return
  fi
  log "$name: up to ${limit}s"
  start=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" \
    "$PY" -m nerveseg_jax.benchmark --keep_going --json "$PARTS/$name.json" "$@" \
    > "$LOGS/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >> "$PARTS/status.tsv"
  log "$name: exit $rc after $((SECONDS - start))s"
  report
}

# The default U-Net at bf16: train figures, input goodput with the set held on device,
# full-frame inference (batch-1 p50/p95, batched frames/s), and the short fold run.
measure unet_bf16 "${TIMEOUT_UNET_BF16_S:-210}" --config "$UNET" \
  --config.dtype=bfloat16 --fold "${SIZES[@]}"
measure unet_fp32 "${TIMEOUT_UNET_FP32_S:-90}" --config "$UNET" \
  --config.dtype=float32 --nopipeline --noinference "${SIZES[@]}"
measure irv2_bf16 "${TIMEOUT_IRV2_BF16_S:-150}" --config "$IRV2" \
  --config.dtype=bfloat16 --nopipeline --noinference "${IRV2_SIZES[@]}"
log "done: $OUT/device_check.md"
cat "$OUT/device_check.md"
