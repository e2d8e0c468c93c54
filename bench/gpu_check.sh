#!/usr/bin/env bash
# The GPU check (issue 11, item 9): ONE short call on a CUDA machine, bounded to 7.5 minutes.
#
#   bash bench/gpu_check.sh          # from anywhere; runs in the repository root
#
# Results (logs, JSON lines, the regenerated benchmarks doc, a summary against the targets) go
# to $OUT when it is set (a remote machine's output folder), else bench/results/gpu_check-<time>.
# Steps, each under its own `timeout` and all under one overall deadline (GPU_CHECK_BUDGET_S,
# default 450 s), so nothing can hang the call:
#   (a) pytest -m gpu             AMP bf16/fp16, channels_last, torch.compile, predict and
#                                 augmentation on CUDA (tests/test_gpu.py)
#   (b) bench/gpu_epoch.py        60 steps of the conf/nih training (ResNet-50 multi-scale
#                                 [224, 448], AMP, channels_last) through `fit` and the real
#                                 loader, on a synthetic NIH-sized cache: img/s, peak memory,
#                                 GPU utilisation; then 40 steps of plain ResNet-50 at 224
#   (c) bench/run_all.py --gpu    the benchmark suite with the GPU sections (shortened epochs)
# Without CUDA it prints "no CUDA", shows the gpu tests skipping, and exits 0.
# Exit status: 0 when every step passed, 1 when one failed or ran out of time.

set -u
cd "$(dirname "$0")/.." || exit 1
PY=.venv/bin/python
[ -x "$PY" ] || PY=python
export KEDRO_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
START_S=$(date +%s)
OUT_DIR="${OUT:-bench/results/gpu_check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR"
FAILED=()

# run_capped NAME CAP_S CMD...: run CMD under `timeout` for min(CAP_S, time left before the
# deadline); `timeout` kills the step's whole process group (DataLoader workers included)
run_capped() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START_S) - 5))
    if [ "$left" -lt 20 ]; then
        echo "[gpu_check] $name: skipped, only ${left}s left of the ${BUDGET_S}s budget"
        FAILED+=("$name (no time left)")
        return
    fi
    [ "$cap" -gt "$left" ] && cap=$left
    echo
    echo "[gpu_check] ($name) up to ${cap}s: $*"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$cap" "$@"
    rc=$?
    echo "[gpu_check] ($name) exit $rc after $(($(date +%s) - t0))s"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        FAILED+=("$name (timed out after ${cap}s)")
    elif [ "$rc" -ne 0 ]; then
        FAILED+=("$name (exit $rc)")
    fi
}

main() {
    echo "[gpu_check] $(date -Is) in $(pwd), results in $OUT_DIR"
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "[gpu_check] no CUDA: torch.cuda.is_available() is False on this machine -- the GPU"
        echo "[gpu_check] checks are skipped; the gpu tests show their skip reason:"
        timeout -k 10 180 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider
        echo "[gpu_check] no CUDA: nothing measured, exit 0"
        return 0
    fi
    nvidia-smi -L 2>/dev/null || true
    "$PY" -c "import torch; print('[gpu_check] torch', torch.__version__, 'CUDA', \
torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"

    # (a) the gpu-marked tests (verbose: a timeout still leaves the passed ones in the log)
    run_capped "a: pytest -m gpu" 150 "$PY" -m pytest -m gpu tests -v -rs -p no:cacheprovider \
        --continue-on-collection-errors \
        --junitxml "$OUT_DIR/pytest_gpu.xml"
    # (b) a few steps of the conf/nih configuration, then ResNet-50 at 224 (the 3,000 img/s target)
    run_capped "b: conf/nih steps" 90 "$PY" bench/gpu_epoch.py --model nih --steps 60 \
        --output "$OUT_DIR/gpu_steps.jsonl"
    run_capped "b: resnet50 224 steps" 60 "$PY" bench/gpu_epoch.py --model resnet50-224 \
        --steps 40 --output "$OUT_DIR/gpu_steps.jsonl"
    # (c) the benchmark suite with its GPU sections; the CPU-only sections already measured on
    # the CPU machine (loop overhead, GFLOPs) are left out to stay inside the budget
    run_capped "c: run_all --gpu" 240 "$PY" bench/run_all.py --gpu \
        --training-sections gpu,epoch --epoch-fraction 0.5 \
        --data-seconds 3 --loader-seconds 3 --step-timeout 180 \
        --results-dir "$OUT_DIR/run_all" --doc "$OUT_DIR/benchmarks.md"

    echo
    echo "[gpu_check] summary against the targets (also in $OUT_DIR/summary.txt):"
    "$PY" - "$OUT_DIR" <<'EOF' | tee "$OUT_DIR/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
rows = []
for path in [out / "gpu_steps.jsonl", *sorted(out.glob("run_all/*/training.jsonl"))]:
    if path.exists():
        rows += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
for r in rows:
    if r.get("case") == "skipped":
        print(f"{r.get('section')}: skipped ({r.get('reason')})")
    elif r.get("section") == "gpu":
        print(f"in-memory {r['case']:<22} {r['mode']:<18} batch {r['batch']:>3}: "
              f"{r['images_per_s']:>8,.0f} img/s, peak {r['peak_mem_gib']} GiB")
    elif r.get("section") == "epoch" and r.get("mode") != "cpu":
        print(f"through fit {r['case']:<30} batch {r['batch']:>3} cache {r['input']} px, "
              f"{r['steps']} steps: {r['images_per_s']:,.0f} img/s (epoch), "
              f"{r.get('steady_images_per_s') or 0:,.0f} img/s (after warm-up); "
              f"GPU util mean {r['gpu_util_mean']} % / median {r['gpu_util_median']} % "
              f"({r['gpu_util_samples']} samples); peak {r['peak_mem_gib']} GiB allocated, "
              f"{r.get('peak_reserved_gib')} GiB reserved; NIH epoch "
              f"~{r.get('nih_epoch_min_steady') or r['nih_epoch_min']} min")
print("targets: ResNet-50 at 224 >= 3,000 img/s on an H100 (AMP + channels_last); GPU "
      "utilisation >= 90% through the real loader; conf/nih multi-scale img/s + peak memory; "
      "one NIH epoch (112,120 images) extrapolated")
EOF
    echo "[gpu_check] done in $(($(date +%s) - START_S))s; results in $OUT_DIR"
    if [ "${#FAILED[@]}" -gt 0 ]; then
        printf '[gpu_check] FAILED: %s\n' "${FAILED[@]}"
        return 1
    fi
    return 0
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
