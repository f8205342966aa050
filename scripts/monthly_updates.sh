#!/usr/bin/env bash
# Monthly update: refresh the tool registry from the data (scan, extend, docs), retrain the model from scratch on all
# scenario files, validate it, export and deploy it, run the runtime test, and write a report.
#
#   bash scripts/monthly_updates.sh               (e.g. from cron: 0 2 1 * * cd /path/to/repo && bash scripts/monthly_updates.sh)
#
# Settings (environment variables):
#   DNDTRAIN_CONFIG   config file passed to every dndtrain command (optional)
#   VALIDATE_LIMIT    score at most N held-out DM turns (default 0 = all)
#   MAX_DROP          largest allowed drop of a validation score vs the previous version (default 0.02 = 2 points)
#   FORCE_DEPLOY      1: deploy even when the new model regressed (default 0)
#   KEEP              model versions to keep (default 5; the current one is always kept)
#
# Log: logs/monthly_updates-YYYY-MM-DD.log; report: logs/monthly_report-YYYY-MM-DD.md.
# Exit status: 0 when the new model was deployed and passed the runtime test; 1 on any failure, when the new model
# regressed (not deployed unless FORCE_DEPLOY=1), or when the runtime test failed.
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=monthly_updates
PY=.venv/bin/python
VALIDATE_LIMIT="${VALIDATE_LIMIT:-0}"
MAX_DROP="${MAX_DROP:-0.02}"
FORCE_DEPLOY="${FORCE_DEPLOY:-0}"
KEEP="${KEEP:-5}"
CFG=()
if [ -n "${DNDTRAIN_CONFIG:-}" ]; then CFG=(--config "$DNDTRAIN_CONFIG"); fi
DAY=$(date +%Y-%m-%d)
mkdir -p logs
LOG="logs/$NAME-$DAY.log"
REPORT="logs/monthly_report-$DAY.md"
PARTS=$(mktemp -d)
trap 'rm -rf "$PARTS"' EXIT

step() { echo; echo "==> [$(date +%H:%M:%S)] $*"; }
dndtrain() { "$PY" -m dndtrain "$@"; }
field() { "$PY" -c 'import json, sys; v = json.load(sys.stdin).get(sys.argv[1]); print("" if v is None else v)' "$1"; }
# Run a dndtrain command, show its output and keep a copy for the report.
keep() { local part=$1; shift; dndtrain "$@" 2>&1 | tee "$PARTS/$part.txt"; }

write_report() {
  local status=$1
  {
    echo "# dndtrain monthly update, $DAY"
    echo
    echo "Result: **$status**"
    echo
    for part in data_stats tools_scan tools_extend train validate compare convert deploy runtime versions; do
      [ -s "$PARTS/$part.txt" ] || continue
      echo "## ${part//_/ }"
      echo
      echo '```text'
      # progress bars and carriage returns make the log unreadable in markdown
      sed -e 's/.*\r//' "$PARTS/$part.txt" | { grep -v -E '^\s*$|it/s\]|s/it\]|Warning: |warnings\.warn\(' || true; } | tail -n 60
      echo '```'
      echo
    done
    echo "Full log: $LOG"
  } > "$REPORT.tmp"
  mv "$REPORT.tmp" "$REPORT"
  echo "Report: $REPORT"
}

main() {
  echo "dndtrain monthly update, $(date -u +%Y-%m-%dT%H:%M:%SZ), in $(pwd)"
  if [ ! -x "$PY" ]; then
    echo "error: $PY not found; run \`npm run setup\` first" >&2
    return 1
  fi

  step "Tools: scan the data for unregistered tools, extend the registry, write the tool docs"
  keep tools_scan tools scan
  keep tools_extend tools extend
  dndtrain tools docs

  step "Checking the scenario data"
  dndtrain data check
  keep data_stats data stats

  local before=""
  if [ -d trained_models/dnd_model ]; then
    step "Recording the current model as a version (the backup)"
    if dndtrain incremental record "${CFG[@]}"; then
      before=$(dndtrain incremental check --json "${CFG[@]}" | field current_version)
    else
      echo "(no current model to back up)"
    fi
  fi

  step "Full retraining on all scenario files"
  keep train train "${CFG[@]}"
  dndtrain incremental record "${CFG[@]}"
  local after
  after=$(dndtrain incremental check --json "${CFG[@]}" | field current_version)

  step "Validating $after"
  local vrc=0
  keep validate validate "${CFG[@]}" --limit "$VALIDATE_LIMIT" || vrc=$?
  [ "$vrc" -eq 0 ] || { echo "error: validation failed" >&2; write_report "FAILED (validation)"; return 1; }
  dndtrain incremental attach "${CFG[@]}"

  local rc=0
  if [ -n "$before" ] && [ "$before" != "$after" ]; then
    step "Comparing $after with the previous model $before (largest allowed drop $MAX_DROP)"
    keep compare incremental compare --against "$before" --max-drop "$MAX_DROP" "${CFG[@]}" || rc=$?
    if [ "$rc" -eq 3 ]; then
      echo "(the previous model has no validation scores; deploying without a comparison)"
      rc=0
    fi
  fi
  if [ "$rc" -ne 0 ] && [ "$FORCE_DEPLOY" != "1" ]; then
    keep versions incremental versions "${CFG[@]}"
    echo "error: $after regressed against $before; NOT deployed (FORCE_DEPLOY=1 deploys anyway;" \
         "\`dndtrain incremental rollback $before\` restores the previous model)." >&2
    write_report "NOT DEPLOYED: $after regressed against $before"
    return 1
  fi

  step "Exporting $after to GGUF"
  keep convert convert "${CFG[@]}"
  step "Deploying $after into the app"
  keep deploy deploy "${CFG[@]}"
  step "Runtime test of the deployed model"
  local trc=0
  keep runtime test "${CFG[@]}" || trc=$?

  step "Removing old versions (keeping $KEEP)"
  dndtrain incremental cleanup --keep "$KEEP" "${CFG[@]}"
  keep versions incremental versions "${CFG[@]}"

  if [ "$trc" -ne 0 ]; then
    write_report "DEPLOYED $after, runtime test FAILED"
    echo "error: the runtime test of the deployed model failed (see above)" >&2
    return 1
  fi
  write_report "DEPLOYED $after (runtime test passed)"
  echo; echo "Monthly update done: $after deployed."
}

echo "Logging to $LOG"
main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
