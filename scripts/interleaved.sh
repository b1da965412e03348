#!/usr/bin/env bash
# Train recipes side by side at one time budget, seed by seed (every recipe for the first seed, then
# the next seed), so that the VM's drift within one invocation falls on all of them alike. Quiet, one
# run at a time, 2 threads, training only: grade with scripts/grade_full.sh. Re-running continues:
# finished runs are kept.
#
#   bash scripts/interleaved.sh OUT DATA_DIR BUDGET SEEDS NAME=FLAGS...
#   e.g. bash scripts/interleaved.sh runs/x ../shared/data 30 0,1,2 default= 'share=--clean-share 0.2'
set -euo pipefail
out=${1:?OUT}; data=${2:?DATA_DIR}; budget=${3:?BUDGET}; seeds=${4:?SEEDS}; shift 4
recipes=()
for r in "$@"; do recipes+=(--recipe "$r"); done
for seed in ${seeds//,/ }; do
  python scripts/budget_search.py --data-dir "$data" --out "$out" --train-only --seeds "$seed" --grid "$budget" \
      "${recipes[@]}"
done
