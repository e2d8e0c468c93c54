#!/usr/bin/env bash
# The GPU check (issue 11, item 9): ONE short call on a CUDA machine, bounded to 7.5 minutes.
#
#   bash bench/gpu_check.sh          # from anywhere; runs in the repository root
#
# Options:
#   --python PATH   the interpreter (default: .venv/bin/python when present, else python3)
#   --kit DIR       wheels from bench/gpu_kit.sh (default: bench/gpu-kit when the interpreter
#                   lacks kedro & co. and that folder exists)
#   --cpu-smoke     the CPU path below even where CUDA is present (CUDA_VISIBLE_DEVICES="")
#
# Environment (issue 19, item 4): the project's `.venv` has everything installed. On a stock
# PyTorch image (torch and friends, but no kedro, pydantic, omegaconf, ...) and no package
# index, the kit's wheels are installed with `pip install --no-index --no-deps --target` into a
# temporary folder (removed at exit) put first on PYTHONPATH: the image's own torch is used and
# nothing is installed into the image. The checkout's src/ is always put on PYTHONPATH ahead
# of what was there, so the check runs this checkout's code. docs/benchmarks.md, "The GPU
# kit", says how.
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
# Without CUDA (or with --cpu-smoke) it prints "no CUDA" and runs the CPU path of the same
# steps: (a) the gpu tests, which skip and say why; (b) bench/gpu_epoch.py on the CPU at smoke
# sizes (resnet18 [32, 64], 12 steps of 8 images: the same code, conf/nih loaded through a
# KedroSession, the synthetic on-disk cache, `fit`); (c) every script run_all.py runs starts
# (`--help`: their imports). tests/test_gpu_kit.py runs this path in a simulated stock image.
# Exit status: 0 when every step passed, 1 when one failed or ran out of time, 2 for a bad
# option or an environment that cannot run the check (what is missing is named).

set -u
HERE=$(pwd)
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
absolute() { # a path given on the command line is relative to where the user stood
    case $1 in /*) echo "$1" ;; *) echo "$HERE/$1" ;; esac
}
PY=""
KIT=""
CPU_SMOKE=0
while [ $# -gt 0 ]; do
    case $1 in
        --python) PY=${2:?--python needs a path}; [[ $PY == */* ]] && PY=$(absolute "$PY"); shift 2 ;;
        --kit) KIT=$(absolute "${2:?--kit needs a folder}"); shift 2 ;;
        --cpu-smoke) CPU_SMOKE=1; shift ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "[gpu_check] unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then
        PY=.venv/bin/python
    else
        PY=$(command -v python3 || command -v python) || {
            echo "[gpu_check] no python found: pass --python PATH" >&2
            exit 2
        }
    fi
fi
export KEDRO_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}
START_S=$(date +%s)
OUT_DIR="${OUT:-bench/results/gpu_check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT_DIR"
FAILED=()
# made here, not in main (which runs in a pipeline's subshell), so the trap sees it
KIT_SITE=$(mktemp -d "${TMPDIR:-/tmp}/rare-cxr-gpu-kit.XXXXXX") || exit 2
trap 'rm -rf "$KIT_SITE"' EXIT
# What the project imports beyond a stock PyTorch image (bench/gpu-kit.txt lists the wheels).
NEEDED_MODULES="kedro, kedro_datasets, omegaconf, pydantic"
# Where the gpu tests are collected from on a GPU (the CPU path takes tests/test_gpu.py). With
# the kit only that file: the other test modules import what a stock image lacks (mlflow,
# kedro-viz, nbclient) and would not collect.
GPU_TESTS=(tests --continue-on-collection-errors)

# use_kit: the kit's wheels into $KIT_SITE, first on PYTHONPATH (the image stays untouched)
use_kit() {
    local want have wheels
    shopt -s nullglob
    wheels=("$KIT"/*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "[gpu_check] the kit folder $KIT holds no wheel: on a machine with a package index"
        echo "[gpu_check] run bash bench/gpu_kit.sh --python-version <this image's X.Y> and copy"
        echo "[gpu_check] bench/gpu-kit/ here"
        return 2
    fi
    have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    want=$(sed -n 's/^python_version=//p' "$KIT/KIT-INFO" 2>/dev/null)
    if [ -n "$want" ] && [ "$want" != "$have" ]; then
        echo "[gpu_check] the kit in $KIT is for Python $want but $PY is Python $have;"
        echo "[gpu_check] rebuild it with bash bench/gpu_kit.sh --python-version $have"
        return 2
    fi
    if [ -f "$KIT/SHA256SUMS" ] && ! (cd "$KIT" && sha256sum --check --quiet SHA256SUMS); then
        echo "[gpu_check] the wheels in $KIT do not match its SHA256SUMS (an incomplete copy?)"
        return 2
    fi
    echo "[gpu_check] installing the kit (${#wheels[@]} wheels from $KIT) into $KIT_SITE"
    if ! "$PY" -m pip install --quiet --no-index --no-deps --disable-pip-version-check \
        --target "$KIT_SITE" "${wheels[@]}"; then
        echo "[gpu_check] pip could not install the kit (its message is above)"
        return 2
    fi
    export PYTHONPATH="$KIT_SITE${PYTHONPATH:+:$PYTHONPATH}"
    GPU_TESTS=(tests/test_gpu.py)
}

# prepare_environment: src/ on PYTHONPATH, then the kit ahead of it where the interpreter lacks packages,
# then say where each piece comes from (torch is never installed by the check)
prepare_environment() {
    export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
    if [ -z "$KIT" ]; then
        if "$PY" -c "import ${NEEDED_MODULES}" 2>/dev/null; then
            echo "[gpu_check] $PY imports ${NEEDED_MODULES}: no kit needed"
        elif [ -d bench/gpu-kit ]; then
            KIT="$ROOT/bench/gpu-kit"
        else
            echo "[gpu_check] $PY cannot import ${NEEDED_MODULES} and there is no kit: on a"
            echo "[gpu_check] machine with a package index run bash bench/gpu_kit.sh, copy"
            echo "[gpu_check] bench/gpu-kit/ here (or pass --kit DIR), and run this again"
            return 2
        fi
    fi
    if [ -n "$KIT" ]; then
        use_kit || return $?
    fi
    "$PY" - <<'EOF' || return 2
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

print(f"[gpu_check] python {sys.version.split()[0]} ({sys.executable})")
for module, dist in [
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("kedro", "kedro"),
    ("kedro_datasets", "kedro-datasets"),
    ("omegaconf", "omegaconf"),
    ("pydantic", "pydantic"),
    ("rare_cxr", None),
]:
    try:
        found = importlib.import_module(module)
    except Exception as error:  # name what is missing instead of a bare traceback
        sys.exit(f"[gpu_check] cannot import {module}: {type(error).__name__}: {error}")
    version = importlib.metadata.version(dist) if dist else "(this checkout)"
    print(f"[gpu_check] {module} {version} from {Path(found.__file__).parent}")
state = "present" if importlib.util.find_spec("mlflow") else "absent"
print(f"[gpu_check] mlflow {state} (not needed: the check runs no pipeline, tracking never starts)")
EOF
}

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

# bench_scripts_start: run_all.py and each script it runs parse `--help`, i.e. import
bench_scripts_start() {
    local script
    for script in run_all bench_data_path bench_loader bench_training; do
        "$PY" "bench/$script.py" --help > /dev/null || {
            echo "[gpu_check] bench/$script.py does not start in this environment"
            return 1
        }
    done
    echo "[gpu_check] bench/run_all.py and the 3 scripts it runs start"
}

# cpu_path: the same steps at smoke sizes, where there is no GPU (or --cpu-smoke)
cpu_path() {
    run_capped "a: pytest -m gpu" 180 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs \
        -p no:cacheprovider
    run_capped "b: gpu_epoch.py on the CPU" 180 "$PY" bench/gpu_epoch.py --device cpu \
        --model smoke --steps 12 --val 8 --output "$OUT_DIR/gpu_steps.jsonl"
    # (c) every script run_all.py runs must start here (imports and argument parsing)
    export -f bench_scripts_start
    export PY
    run_capped "c: bench scripts start" 120 bash -c bench_scripts_start
    echo
    echo "[gpu_check] no CUDA: nothing measured on a GPU; CPU path done in $(($(date +%s) - START_S))s"
    if [ "${#FAILED[@]}" -gt 0 ]; then
        printf '[gpu_check] FAILED: %s\n' "${FAILED[@]}"
        return 1
    fi
    echo "[gpu_check] CPU path passed"
    return 0
}

main() {
    echo "[gpu_check] $(date -Is) in $(pwd), results in $OUT_DIR"
    prepare_environment || return $?
    if [ "$CPU_SMOKE" -eq 1 ]; then
        export CUDA_VISIBLE_DEVICES=""
        echo "[gpu_check] --cpu-smoke: no CUDA (CUDA_VISIBLE_DEVICES is empty); the CPU path runs"
        cpu_path
        return $?
    fi
    if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "[gpu_check] no CUDA: torch.cuda.is_available() is False on this machine -- the GPU"
        echo "[gpu_check] checks are skipped; the CPU path of the same steps runs instead"
        cpu_path
        return $?
    fi
    nvidia-smi -L 2>/dev/null || true
    "$PY" -c "import torch; print('[gpu_check] torch', torch.__version__, 'CUDA', \
torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"

    # (a) the gpu-marked tests (verbose: a timeout still leaves the passed ones in the log)
    run_capped "a: pytest -m gpu" 150 "$PY" -m pytest -m gpu "${GPU_TESTS[@]}" -v -rs \
        -p no:cacheprovider --junitxml "$OUT_DIR/pytest_gpu.xml"
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
