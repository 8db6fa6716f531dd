# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run): a dry-run aware command
# runner and argument handling. Every script prints each command before it runs it,
# so a dry run shows exactly what a real run would do.

DRY_RUN="${DRY_RUN:-0}"

# The repository root: scripts package and install the code from here.
# shellcheck disable=SC2034  # used by the scripts that source this file
LAUNCH_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Prints the script's leading comment block (its documentation).
usage() {
  local line
  while IFS= read -r line; do
    [[ "$line" == '#!'* ]] && continue
    [[ "$line" == '#'* && "$line" != '#SBATCH'* ]] || break
    line="${line#\#}"
    echo "${line# }"
  done <"$0"
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Prints the command, quoted so it can be pasted into a shell, then runs it unless
# this is a dry run.
run() {
  echo "+ $(quote_args "$@")"
  if [[ "${DRY_RUN}" != 1 ]]; then
    "$@"
  fi
}

# Quotes one argument for a POSIX shell: as is when safe, else in single quotes
# (readable in dry-run output, unlike printf %q).
quote() {
  local safe='^[A-Za-z0-9_./:=@,+%-]+$' q="'\\''"
  if [[ -n "$1" && "$1" =~ $safe ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/$q}"
  fi
}

# Joins arguments into one shell-quoted string (for remote or wrapped commands).
quote_args() {
  local out="" a
  for a in "$@"; do
    out+=" $(quote "$a")"
  done
  printf '%s' "${out# }"
}

# Fails with a message naming every listed variable that is unset or empty.
require_env() {
  local v missing=()
  for v in "$@"; do
    [[ -n "${!v:-}" ]] || missing+=("$v")
  done
  if ((${#missing[@]})); then
    die "set ${missing[*]} in the environment (see launch/README.md)"
  fi
}

# Warns when the training arguments put the workdir where other hosts cannot see it:
# every process must read and write the same checkpoint directory.
check_shared_workdir() {
  local a workdir=""
  while (($#)); do
    a="$1"
    shift
    case "$a" in
      --workdir=*) workdir="${a#--workdir=}" ;;
      --workdir) workdir="${1:-}" ;;
    esac
  done
  if [[ -z "$workdir" ]]; then
    echo "$(basename "$0"): warning: no --workdir given; each host would write" \
      "its own ./runs/<config>. Pass --workdir gs://BUCKET/... or a shared path." >&2
  elif [[ "$workdir" != gs://* && "$workdir" != /* ]]; then
    echo "$(basename "$0"): warning: --workdir $workdir is relative; use" \
      "gs://... or an absolute path on a shared file system." >&2
  fi
}
