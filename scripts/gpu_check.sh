#!/usr/bin/env bash
# A short check that psadv trains and evaluates on CUDA GPUs; run it on a GPU machine after set-up.
#
#   scripts/gpu_check.sh [DATA_DIR]        DATA_DIR holds mnist/ [default: $PSADV_DATA_DIR, then ../shared/data]
#
# Three steps, each a few seconds to a minute, every one must succeed (set -euo pipefail):
#   1. single process, --device cuda: 60 PGD steps of MNIST training, checkpoint and summary;
#   2. MPI: a parameter server and 2 attackers (mpiexec -n 3, --device auto: psadv/devices.py puts
#      local rank r on GPU r mod n_gpus), 60 versions; every rank must report a cuda device;
#   3. psadv eval of step 1's checkpoint on the GPU: the default cascade (APGD-CE, APGD-T, Square)
#      at a small budget (10 iterations, 3 targets, 100 queries), 500 test images.
# It prints one summary line per step. Without a CUDA device it refuses at once (exit 3).
#
# Environment (optional):
#   PSADV            the psadv command [python3 -m psadv.cli]
#   PSADV_LAUNCHER   the MPI launcher for step 2 [mpiexec -n 3]
#   GPU_CHECK_DIR    where the runs go [a new temporary directory]
set -euo pipefail

read -r -a psadv <<< "${PSADV:-python3 -m psadv.cli}"
read -r -a launcher <<< "${PSADV_LAUNCHER:-mpiexec -n 3}"
python=${PYTHON:-python3}
data_dir=${1:-${PSADV_DATA_DIR:-../shared/data}}

gpus=$("$python" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [[ "$gpus" == 0 ]]; then
    echo "gpu_check: error: no CUDA device is visible to torch (torch.cuda.is_available() is False); run this on a GPU machine with a CUDA build of torch" >&2
    exit 3
fi
out=${GPU_CHECK_DIR:-$(mktemp -d -t psadv-gpu-check.XXXXXX)}
mkdir -p "$out"
current="start"
trap 'echo "gpu_check: FAILED during: $current (runs in $out)" >&2' ERR
echo "gpu_check: $gpus GPU(s): $("$python" -c 'import torch; print(", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))')"
echo "gpu_check: runs in $out"

common=(--data-dir "$data_dir" --steps 60 --batch-size 100 --attack-steps 10 --eval-every 30
        --eval-examples 500 --eval-steps 10 --log-every 10 --no-progress)
summaries=()

current="1. single process on cuda"
start=$SECONDS
"${psadv[@]}" train "${common[@]}" --device cuda --run-dir "$out/single"
summaries+=("$current: $("$python" - "$out/single" <<'PY'
import json, sys
run = sys.argv[1]
s = json.load(open(f"{run}/summary.json"))
c = json.load(open(f"{run}/config.json"))["config"]
assert s["stop_reason"] == "version budget" and s["version"] == 60, s
assert c["device"] == "cuda", c["device"]
rate = [r["examples_per_s"] for r in map(json.loads, open(f"{run}/metrics.jsonl")) if r["kind"] == "train"]
print(f"version {s['version']}, robust {s['last_eval']['robust_acc']:.2%} on the eval slice, {max(rate):,.0f} examples/s")
PY
), $((SECONDS - start)) s")

current="2. MPI server + 2 attackers on GPUs"
start=$SECONDS
"${launcher[@]}" "${psadv[@]}" train "${common[@]}" --device auto --run-dir "$out/mpi"
summaries+=("$current: $("$python" - "$out/mpi" <<'PY'
import json, sys
run = sys.argv[1]
s = json.load(open(f"{run}/summary.json"))
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
world = next(r for r in rows if r["kind"] == "world")
devices = [rank["device"] for rank in world["ranks"]]
assert all(d.startswith("cuda") for d in devices), devices
assert s["stop_reason"] == "version budget" and s["attackers"] == 2 and s["applied"] > 0, s
print(f"devices {' '.join(devices)}, version {s['version']}, {s['applied']} pushes applied, "
      f"mean staleness {s['staleness_mean']:.2f}")
PY
), $((SECONDS - start)) s")

current="3. eval on cuda"
start=$SECONDS
result=$("${psadv[@]}" eval "$out/single" --device cuda --attack strong --apgd-steps 10 --targets 3 --queries 100 \
    --examples 500 --json --no-progress)
summaries+=("$current: $("$python" - "$result" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
assert 0.0 <= r["robust_acc"] <= r["clean_acc"] <= 1.0, r
assert [a["name"] for a in r["attacks"]] == ["apgd-ce", "apgd-t", "square"], r["attacks"]
print(f"clean {r['clean_acc']:.2%}, robust {r['robust_acc']:.2%} ({r['attack']}, 500 images)")
PY
), $((SECONDS - start)) s")

trap - ERR
echo "gpu_check: summary"
printf '  %s\n' "${summaries[@]}"
echo "gpu_check: OK"
