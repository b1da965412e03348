#!/usr/bin/env bash
# The strong cascade (APGD-CE, APGD-T, Square) on the full test set, fail-fast: runs are graded in the
# order given, and once one seed of a budget (a run's parent directory, RECIPE/T<budget>) ends under
# 87%, that budget has failed and its remaining seeds are skipped. 13-15 minutes a model on 2 cores,
# one at a time with 2 threads; give the likeliest failures first. Grades are kept beside their runs
# (strong.json): re-running continues.
#
#   bash scripts/grade_strong.sh DATA_DIR RUN...
set -euo pipefail
data=${1:?DATA_DIR}; shift
. "$(dirname "$0")/grading.sh"
failed=" "
for r in "$@"; do
  budget=$(dirname "$r")
  case "$failed" in *" $budget "*) echo "$r strong: skipped ($budget already failed)"; continue;; esac
  grade "$r" strong strong.json
  acc=$(field "$r/strong.json" robust_acc)
  echo "$r strong $acc"
  python -c 'import sys; sys.exit(float(sys.argv[1]) < 0.87)' "$acc" || failed="$failed$budget "
done
