#!/usr/bin/env bash
# The GPU kit (issue 19, item 4): on a machine WITH a package index, download the wheels that a
# stock PyTorch GPU image lacks, so that bench/gpu_check.sh runs on an air-gapped GPU node.
#
#   bash bench/gpu_kit.sh                          # Python 3.12, manylinux x86_64 -> bench/gpu-kit/
#   bash bench/gpu_kit.sh --python-version 3.11    # for an image with another Python
#
# Then copy the repository with bench/gpu-kit/ to the GPU node and run, there, in one call:
#   bash bench/gpu_check.sh          # finds bench/gpu-kit/ when the image lacks kedro & co.
#
# What: the pinned list bench/gpu-kit.txt (kedro, omegaconf, pydantic, ... : see its comments),
# each wheel alone (`pip download --no-deps --only-binary=:all:`), for the target Python and
# platform, whatever this machine runs. Never torch: the check uses the image's own.
# Checks: one wheel per listed pin; the total size is printed and must stay within --max-mib
# (default 64 MiB) or nothing is written. The kit folder also gets KIT-INFO (target Python and
# platforms, read by gpu_check.sh) and SHA256SUMS (checked by gpu_check.sh after the copy).
# The folder is replaced only once everything passed.
# Options:
#   --python-version X.Y   target interpreter (default 3.12, the stock image's)
#   --platform TAG         wheel platform tag, repeatable (default: manylinux2014_x86_64 and
#                          manylinux_2_28_x86_64); compiled wheels (pydantic-core) need one
#   --dest DIR             output folder (default bench/gpu-kit, gitignored)
#   --list FILE            pinned requirements (default bench/gpu-kit.txt)
#   --max-mib N            size limit in MiB (default 64)
# The pip that downloads is $PYTHON's, else .venv/bin/python's, else python3's.
# Exit status: 0 kit written; 1 over the size limit or a wheel missing; 2 bad usage or
# pip download failed (no package index reachable, or a pin that does not exist for the target).

set -euo pipefail
HERE=$(pwd)
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PYTHON_VERSION=3.12
PLATFORMS=()
DEST=bench/gpu-kit
LIST=bench/gpu-kit.txt
MAX_MIB=64

die() {
    echo "[gpu_kit] error: $2" >&2
    exit "$1"
}
absolute() { # a path given on the command line is relative to where the user stood
    case $1 in /*) echo "$1" ;; *) echo "$HERE/$1" ;; esac
}

while [ $# -gt 0 ]; do
    case $1 in
        --python-version) PYTHON_VERSION=${2:?--python-version needs X.Y}; shift 2 ;;
        --platform) PLATFORMS+=("${2:?--platform needs a tag}"); shift 2 ;;
        --dest) DEST=$(absolute "${2:?--dest needs a folder}"); shift 2 ;;
        --list) LIST=$(absolute "${2:?--list needs a file}"); shift 2 ;;
        --max-mib) MAX_MIB=${2:?--max-mib needs a number}; shift 2 ;;
        -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) die 2 "unknown option '$1' (see --help)" ;;
    esac
done
[[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || die 2 "--python-version must look like 3.12, got '$PYTHON_VERSION'"
[[ $MAX_MIB =~ ^[0-9]+$ ]] || die 2 "--max-mib must be a whole number of MiB, got '$MAX_MIB'"
[ -f "$LIST" ] || die 2 "the list $LIST does not exist"
[ ${#PLATFORMS[@]} -gt 0 ] || PLATFORMS=(manylinux2014_x86_64 manylinux_2_28_x86_64)

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=$(command -v python3 || command -v python) || die 2 "no python found (set PYTHON=...)"
fi

# the pins, without comments and blank lines
mapfile -t PINS < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' "$LIST" | grep -v '^$')
[ ${#PINS[@]} -gt 0 ] || die 2 "$LIST lists no package"
for pin in "${PINS[@]}"; do
    [[ $pin =~ ^[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+$ ]] ||
        die 2 "$LIST: '$pin' is not an exact pin (name==version): the kit must be reproducible"
done

STAGE="$DEST.partial-$$"
trap 'rm -rf "$STAGE"' EXIT
rm -rf "$STAGE"
mkdir -p "$STAGE"
PLATFORM_ARGS=()
for p in "${PLATFORMS[@]}"; do PLATFORM_ARGS+=(--platform "$p"); done

echo "[gpu_kit] ${#PINS[@]} wheels from $LIST for Python $PYTHON_VERSION (${PLATFORMS[*]}), pip of $PY"
if ! "$PY" -m pip download --quiet --no-deps --only-binary=:all: --disable-pip-version-check \
    --python-version "$PYTHON_VERSION" "${PLATFORM_ARGS[@]}" --dest "$STAGE" "${PINS[@]}"; then
    die 2 "pip download failed (pip's message is above): no package index reachable, or a pin
  with no wheel for Python $PYTHON_VERSION on ${PLATFORMS[*]}; $DEST was left as it was"
fi

shopt -s nullglob
WHEELS=("$STAGE"/*.whl)
[ ${#WHEELS[@]} -eq ${#PINS[@]} ] ||
    die 1 "expected ${#PINS[@]} wheels (one per pin), got ${#WHEELS[@]}: $(cd "$STAGE" && ls)"

echo "[gpu_kit] size of each wheel:"
TOTAL=0
for w in "${WHEELS[@]}"; do
    size=$(stat -c %s "$w")
    TOTAL=$((TOTAL + size))
    awk -v s="$size" -v n="$(basename "$w")" 'BEGIN { printf "[gpu_kit]   %9.1f KiB  %s\n", s / 1024, n }'
done
TOTAL_MIB=$(awk -v t="$TOTAL" 'BEGIN { printf "%.2f", t / 1048576 }')
LIMIT=$((MAX_MIB * 1048576))
if [ "$TOTAL" -gt "$LIMIT" ]; then
    die 1 "the kit is $TOTAL_MIB MiB ($TOTAL bytes), over the $MAX_MIB MiB limit; $DEST was left as it was"
fi

(cd "$STAGE" && sha256sum -- *.whl > SHA256SUMS)
{
    echo "python_version=$PYTHON_VERSION"
    echo "platforms=${PLATFORMS[*]}"
    echo "wheels=${#WHEELS[@]}"
    echo "bytes=$TOTAL"
    echo "list=$(realpath --relative-to="$ROOT" "$LIST" 2>/dev/null || echo "$LIST")"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$STAGE/KIT-INFO"
rm -rf "$DEST"
mv "$STAGE" "$DEST"
echo "[gpu_kit] kit: ${#WHEELS[@]} wheels, $TOTAL_MIB MiB in total (limit $MAX_MIB MiB) in $DEST"
case $(realpath "$DEST") in
    "$ROOT"/*) WHERE=$(realpath --relative-to="$ROOT" "$DEST") ;;
    *) WHERE="<where you copied $DEST>" ;;
esac
echo "[gpu_kit] copy it with the repository; on the GPU node, from the repository root:"
echo "[gpu_kit]   bash bench/gpu_check.sh --kit $WHERE"
