#!/usr/bin/env bash
# Weekly maintenance: when scenario files were added or changed, continue the current model on them (incremental
# training), validate it, and ship it (convert + deploy) only if its validation scores did not regress against the
# previous version; then remove old versions.
#
#   bash scripts/weekly_maintenance.sh            (e.g. from cron: 0 3 * * 1 cd /path/to/repo && bash scripts/weekly_maintenance.sh)
#
# Settings (environment variables):
#   DNDTRAIN_CONFIG   config file passed to every dndtrain command (optional)
#   VALIDATE_LIMIT    score at most N held-out DM turns (default 0 = all; use the same value every week)
#   MAX_DROP          largest allowed drop of a validation score, in [0, 1] (default 0.02 = 2 points)
#   KEEP              model versions to keep (default 5; the current one is always kept)
#
# Log: logs/weekly_maintenance-YYYY-MM-DD.log. Exit status: 0 when the data is unchanged or the new model was
# deployed; 1 on any failure, and when the new model regressed (it stays current but is NOT deployed: review it and
# `dndtrain incremental rollback vN` if needed).
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=weekly_maintenance
PY=.venv/bin/python
VALIDATE_LIMIT="${VALIDATE_LIMIT:-0}"
MAX_DROP="${MAX_DROP:-0.02}"
KEEP="${KEEP:-5}"
CFG=()
if [ -n "${DNDTRAIN_CONFIG:-}" ]; then CFG=(--config "$DNDTRAIN_CONFIG"); fi
mkdir -p logs
LOG="logs/$NAME-$(date +%Y-%m-%d).log"

step() { echo; echo "==> [$(date +%H:%M:%S)] $*"; }
dndtrain() { "$PY" -m dndtrain "$@"; }
# Read one field of a JSON document on stdin.
field() { "$PY" -c 'import json, sys; v = json.load(sys.stdin).get(sys.argv[1]); print("" if v is None else v)' "$1"; }

validate_and_attach() {
  dndtrain validate "${CFG[@]}" --no-base --limit "$VALIDATE_LIMIT"
  dndtrain incremental attach "${CFG[@]}"
}

main() {
  echo "dndtrain weekly maintenance, $(date -u +%Y-%m-%dT%H:%M:%SZ), in $(pwd)"
  if [ ! -x "$PY" ]; then
    echo "error: $PY not found; run \`npm run setup\` first" >&2
    return 1
  fi

  step "Checking the scenario data"
  dndtrain data check

  step "Looking for new or changed scenario files"
  local changes before_json before has_scores
  before_json=$(dndtrain incremental check --json "${CFG[@]}")
  echo "$before_json"
  changes=$(echo "$before_json" | field changes)
  if [ "$changes" = "0" ]; then
    echo "No data changes since the current version: nothing to train."
    step "Removing old versions (keeping $KEEP)"
    dndtrain incremental cleanup --keep "$KEEP" "${CFG[@]}"
    return 0
  fi

  step "Making sure the current model is recorded as a version with validation scores (the baseline)"
  dndtrain incremental record "${CFG[@]}"
  before_json=$(dndtrain incremental check --json "${CFG[@]}")
  before=$(echo "$before_json" | field current_version)
  has_scores=$(echo "$before_json" | field has_scores)
  if [ "$has_scores" != "True" ]; then
    echo "$before has no validation scores yet; validating it first"
    validate_and_attach
  fi

  step "Incremental training on top of $before"
  dndtrain incremental train "${CFG[@]}"
  local after
  after=$(dndtrain incremental check --json "${CFG[@]}" | field current_version)
  if [ "$after" = "$before" ]; then
    echo "No new model was trained (only removed or held-out files changed); nothing to deploy."
    step "Removing old versions (keeping $KEEP)"
    dndtrain incremental cleanup --keep "$KEEP" "${CFG[@]}"
    return 0
  fi

  step "Validating $after"
  validate_and_attach

  step "Comparing $after with $before (largest allowed drop $MAX_DROP)"
  local rc=0
  dndtrain incremental compare --against "$before" --max-drop "$MAX_DROP" "${CFG[@]}" || rc=$?
  if [ "$rc" -eq 0 ]; then
    step "Exporting $after to GGUF"
    dndtrain convert "${CFG[@]}"
    step "Deploying $after into the app"
    dndtrain deploy "${CFG[@]}"
  fi

  step "Removing old versions (keeping $KEEP)"
  dndtrain incremental cleanup --keep "$KEEP" "${CFG[@]}"
  dndtrain incremental versions "${CFG[@]}"

  case "$rc" in
    0) echo; echo "Weekly maintenance done: $after deployed." ;;
    1) echo; echo "error: $after regressed against $before; NOT deployed (the app keeps the previous model)." >&2
       echo "Review logs and trained_models/validation_report.md; \`dndtrain incremental rollback $before\` restores $before." >&2
       return 1 ;;
    *) echo; echo "error: could not compare $after with $before (see above); NOT deployed." >&2
       return 1 ;;
  esac
}

echo "Logging to $LOG"
main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
