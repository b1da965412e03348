#!/usr/bin/env bash
# Grade trained runs the way issue 37's budget search passes a budget, on the full test set: clean
# accuracy first (psadv eval --attack none, seconds), then the strong cascade (APGD-CE, APGD-T, Square;
# 13-15 minutes a model on 2 cores, one at a time with 2 threads) only where clean accuracy reached
# 98%: a budget passes only if every seed reaches 98% clean and 87% strong. Each grade is written
# beside its run (clean.json, strong.json) and kept: re-running continues.
#
#   bash scripts/grade_full.sh DATA_DIR RUN_DIR...
set -euo pipefail
data=${1:?DATA_DIR}; shift
. "$(dirname "$0")/grading.sh"
for r in "$@"; do grade "$r" none clean.json; echo "$r clean $(field "$r/clean.json" clean_acc)"; done
for r in "$@"; do
  if python -c 'import json, sys; sys.exit(json.load(open(sys.argv[1]))["clean_acc"] < 0.98)' "$r/clean.json"; then
    grade "$r" strong strong.json; echo "$r strong $(field "$r/strong.json" robust_acc)"
  else
    echo "$r strong: not graded (clean under 98%)"
  fi
done
