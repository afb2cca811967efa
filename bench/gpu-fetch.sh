#!/usr/bin/env bash
# bench/gpu-fetch.sh: get ready, on a machine with network, what bench/gpu-check.sh needs on the GPU machine
# (which has no network and lacks PyAV, soundfile and soxr):
#   .whl/       cp312 manylinux x86_64 wheels of the packages the GPU image lacks (and their missing needs)
#   .gpu-data/  datasets/sanders copied from ../shared (../shared does not travel with the tree), and the
#               git revision the copy was made at
# Both folders are ignored by git; the device call names them in `carry`. Prints the total that the call
# would send (tracked + untracked-not-ignored files + the two folders) and exits 1 if it is over the device
# tool's 64 MiB limit.
#
# Usage: bash bench/gpu-fetch.sh            (SANDERS=DIR to copy another avatar folder; PYTHON=... for pip)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
SANDERS=${SANDERS:-${LIPSYNC_SHARED:-../shared}/datasets/sanders}
LIMIT=$((64 * 1024 * 1024))
# Pinned: the versions the development environment runs (pip list there). numpy, typing-extensions,
# torch, opencv, tqdm, aiohttp, triton, scikit-image, torchmetrics are on the GPU image already.
WHEELS=(av==18.1.0 soundfile==0.14.0 soxr==1.1.0 cffi==2.1.1 pycparser==3.12)
ON_IMAGE=(numpy typing-extensions typing_extensions)

[ -d "$SANDERS/full_body_img" ] || { echo "gpu-fetch: no avatar at $SANDERS (set SANDERS=DIR)" >&2; exit 2; }

rm -rf .whl
mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d .whl "${WHEELS[@]}"

# every wheel's own needs (extras aside) must be fetched too or be on the GPU image
fetched=$(for w in .whl/*.whl; do basename "$w" | cut -d- -f1 | tr 'A-Z_' 'a-z-'; done)
missing=0
for w in .whl/*.whl; do
    while read -r req; do
        [ -n "$req" ] || continue
        name=$(echo "$req" | sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr 'A-Z_' 'a-z-')
        if ! echo "$fetched" | grep -qx "$name" && ! printf '%s\n' "${ON_IMAGE[@]}" | tr '_' '-' | grep -qx "$name"; then
            echo "gpu-fetch: $(basename "$w") needs $name, neither fetched nor on the GPU image" >&2
            missing=1
        fi
    done < <(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra *==' || true)
done
[ "$missing" = 0 ] || exit 1

rm -rf .gpu-data
mkdir -p .gpu-data/datasets
cp -r "$SANDERS" .gpu-data/datasets/sanders
chmod -R u+w .gpu-data
{ git rev-parse HEAD 2>/dev/null || echo unknown; } > .gpu-data/revision.txt
echo "uncommitted changes at fetch time: $(git status --porcelain 2>/dev/null | grep -vc '^??' || true)" >> .gpu-data/revision.txt

bytes() { du -cb "$@" 2>/dev/null | tail -1 | cut -f1; }
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -r sh -c 'for f; do [ -f "$f" ] && printf "%s\0" "$f"; done' sh \
        | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
whl=$(bytes .whl)
data=$(bytes .gpu-data)
total=$((tree + whl + data))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
ls -l .whl | tail -n +2
echo "gpu-fetch: tree $(mib "$tree") + .whl $(mib "$whl") + .gpu-data $(mib "$data") = $(mib "$total") of the $(mib "$LIMIT") the device call may send"
if [ "$total" -gt "$LIMIT" ]; then
    echo "gpu-fetch: over the limit by $(mib $((total - LIMIT)))" >&2
    exit 1
fi
