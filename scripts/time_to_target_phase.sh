#!/usr/bin/env bash
# Issue 37, item 4 after the phase-form input gradient (results/input-gradient.toml): the default at
# 30 s (the budget it missed before, results/time-to-target-recipes.toml), 38 s and 45 s, and Madry's PGD-40
# at 360 s, both with the faster step, in one invocation on one quiet machine.
#
#   bash scripts/time_to_target_phase.sh OUT DATA_DIR
#
# As scripts/time_to_target.sh: every run trains first (quiet, one at a time), then every model is
# graded: the strong cascade on the first 1,000 test images (two at a time, one thread each), clean
# accuracy on the full test set. Re-running the script continues: finished runs and grades are kept.
set -euo pipefail
out=${1:?OUT}; data=${2:?DATA_DIR}
seeds=0,1,2
grade=(--target 0.87 --clean-target 0.98 --full-clean --eval-jobs 2 --eval-args '--examples 1000 --threads 1')
short=(--out "$out/short" --grid 30,38,45 --recipe default=)
madry=(--out "$out/pgd40" --grid 360 --recipe "madry-pgd40=--model mnist-small --eps 0.3 --eps-ramp 0.2 --optimizer adam --lr 5e-3 --lr-schedule onecycle --batch-size 100 --attack pgd --attack-steps 40")
search() { python scripts/budget_search.py --data-dir "$data" --seeds "$seeds" "$@"; }
for study in short madry; do
    declare -n flags=$study
    search "${flags[@]}" --train-only
done
for study in short madry; do
    declare -n flags=$study
    search "${flags[@]}" "${grade[@]}"
done
