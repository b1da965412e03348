#!/usr/bin/env bash
# Issue 37, items 3-4: time to the strong target by budget search, the default against a larger batch,
# a weight average and Madry's PGD-40, in one invocation on one quiet machine.
#
#   bash scripts/time_to_target.sh OUT DATA_DIR
#
# Every run trains first (quiet, one at a time; the budgets are wall-clock), then every model is graded:
# the strong cascade on the first 1,000 test images (two at a time, one thread each) and clean accuracy
# on the full test set. Re-running the script continues: finished runs and grades are kept.
set -euo pipefail
out=${1:?OUT}; data=${2:?DATA_DIR}
seeds=0,1,2
grade=(--target 0.87 --clean-target 0.98 --full-clean --eval-jobs 2 --eval-args '--examples 1000 --threads 1')
short=(--out "$out/short" --grid 30,45 --recipe default= --recipe "b400=--batch-size 400 --lr 2e-2"
       --recipe "ema=--ema-decay 0.995")
minute=(--out "$out/minute" --grid 60 --recipe default=)
madry=(--out "$out/pgd40" --grid 360 --recipe "madry-pgd40=--model mnist-small --eps 0.3 --eps-ramp 0.2 --optimizer adam --lr 5e-3 --lr-schedule onecycle --batch-size 100 --attack pgd --attack-steps 40")
search() { python scripts/budget_search.py --data-dir "$data" --seeds "$seeds" "$@"; }
for study in short minute madry; do
    declare -n flags=$study
    search "${flags[@]}" --train-only
done
for study in short minute madry; do
    declare -n flags=$study
    search "${flags[@]}" "${grade[@]}"
done
