#!/usr/bin/env bash
# Attackers on a GPU machine: one process, then a parameter server with N attackers, and the
# scaling report over all of it. Made for one GPU and 16 cores, about 7 minutes, no network.
#
#   scripts/gpu_attackers.sh [DATA_DIR] [OUT]
#       DATA_DIR holds mnist/ [default: $PSADV_DATA_DIR, then ../shared/data]
#       OUT      where runs and report go [default: a new temporary directory]
#
# Steps (every one must succeed; set -euo pipefail):
#   1. one process on the GPU, 60 s, periodic strong evaluation (PGD gate, then APGD-CE, APGD-T
#      and Square on 500 test images) until --target-robust-acc: the single-device time to target;
#   2. CPU attackers, a core each: mpiexec -n 1+N for N = 1, 2, 4, 8, 15 (the server on the GPU,
#      the attackers with CUDA hidden), ATTACKER_SECONDS each: examples/s, staleness, c_s and c_a;
#   3. GPU attackers sharing the one GPU with the server, the same N;
#   4. the largest CPU-attacker job again for 60 s with the periodic strong evaluation: its
#      measured time to target;
#   5. psadv scaling-report over every run (report.md, report.json): measured and predicted
#      speedup, n* = c_a / c_s, and what N attackers buy.
# The MPI runs use psadv's MPI defaults; pass a recipe's options in PSADV_RECIPE to measure another.
# Without a CUDA device it refuses at once (exit 3).
#
# Environment (optional):
#   PSADV             the psadv command [python3 -m psadv.cli]
#   MPIEXEC           the MPI launcher [mpiexec]
#   PSADV_RECIPE      extra `psadv train` options for every run [none]
#   ATTACKER_COUNTS   the N of steps 2 and 3 [1 2 4 8 15]
#   ATTACKER_SECONDS  time budget of each run of steps 2 and 3 [15]
#   TARGET            robust accuracy of the time to target [0.87]
set -euo pipefail

read -r -a psadv <<< "${PSADV:-python3 -m psadv.cli}"
read -r -a recipe <<< "${PSADV_RECIPE:-}"
read -r -a counts <<< "${ATTACKER_COUNTS:-1 2 4 8 15}"
mpiexec=${MPIEXEC:-mpiexec}
python=${PYTHON:-python3}
seconds=${ATTACKER_SECONDS:-15}
target=${TARGET:-0.87}
data_dir=${1:-${PSADV_DATA_DIR:-../shared/data}}

gpus=$("$python" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [[ "$gpus" == 0 ]]; then
    echo "gpu_attackers: error: no CUDA device is visible to torch (torch.cuda.is_available() is False); run this on a GPU machine with a CUDA build of torch" >&2
    exit 3
fi
out=${2:-$(mktemp -d -t psadv-gpu-attackers.XXXXXX)}
mkdir -p "$out/runs"
current="start"
trap 'echo "gpu_attackers: FAILED during: $current (runs in $out)" >&2' ERR
echo "gpu_attackers: $gpus GPU(s): $("$python" -c 'import torch; print(torch.cuda.get_device_name(0))'), $(nproc) cores; runs in $out"

common=(--data-dir "$data_dir" --threads 1 --no-progress "${recipe[@]}")
to_target=(--eval-every 250 --eval-attack strong --eval-examples 500 --target-robust-acc "$target")

current="1. one process on the GPU"
"${psadv[@]}" train "${common[@]}" --device cuda --threads 4 --time-budget 60 "${to_target[@]}" \
    --run-dir "$out/runs/single"

for n in "${counts[@]}"; do
    current="2. $n CPU attackers"
    # MPMD: the server sees the GPU, the attackers do not (--device auto then picks the CPU)
    "$mpiexec" -n 1 "${psadv[@]}" train "${common[@]}" --device auto --time-budget "$seconds" \
        --run-dir "$out/runs/cpu-attackers-$n" : \
        -n "$n" env CUDA_VISIBLE_DEVICES= "${psadv[@]}" train "${common[@]}" --device auto \
        --time-budget "$seconds" --run-dir "$out/runs/cpu-attackers-$n"
done

for n in "${counts[@]}"; do
    current="3. $n GPU attackers"
    "$mpiexec" -n $((n + 1)) "${psadv[@]}" train "${common[@]}" --device auto --time-budget "$seconds" \
        --run-dir "$out/runs/gpu-attackers-$n"
done

largest=${counts[${#counts[@]}-1]}
current="4. $largest CPU attackers to the target"
"$mpiexec" -n 1 "${psadv[@]}" train "${common[@]}" --device auto --time-budget 60 "${to_target[@]}" \
    --run-dir "$out/runs/cpu-attackers-$largest-to-target" : \
    -n "$largest" env CUDA_VISIBLE_DEVICES= "${psadv[@]}" train "${common[@]}" --device auto \
    --time-budget 60 "${to_target[@]}" --run-dir "$out/runs/cpu-attackers-$largest-to-target"

current="5. scaling report"
"${psadv[@]}" scaling-report "$out/runs" --out "$out/report" --target "$target" --baseline single \
    --title "psadv attackers on $(hostname)"

trap - ERR
"$python" - "$out/runs" "$target" <<'PY'
import json, pathlib, sys
runs, target = pathlib.Path(sys.argv[1]), float(sys.argv[2])
print(f"gpu_attackers: run, attackers, examples/s (median of train rows), mean staleness, time to {target:.0%} strong")
for run in sorted(p for p in runs.iterdir() if (p / "summary.json").exists()):
    s = json.loads((run / "summary.json").read_text())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = sorted(r["examples_per_s"] for r in rows if r.get("kind") == "train" and r.get("examples_per_s"))
    rate = rates[len(rates) // 2] if rates else float("nan")
    ttt = s.get("time_to_target")
    print(f"  {run.name}: {s.get('attackers', 0)}, {rate:,.0f}, {s.get('staleness_mean')}, "
          f"{'%.1f s' % ttt if isinstance(ttt, (int, float)) else ttt or 'not reached'}")
PY
echo "gpu_attackers: report in $out/report/report.md"
echo "gpu_attackers: OK"
