#!/usr/bin/env bash
# Reads our CUDA kernels as the GPU runs them, without a GPU: compiles a kernel family with NVRTC
# for ARCH (as an engine build does), then prints every kernel's registers, shared memory and
# spills (cuobjdump -res-usage); with FUNCTION, also its SASS (written to .cache/sass/FUNCTION.sass)
# and the order of its tensor-core products and shared-memory loads, one letter each, between
# block barriers — the quickest way to see a load that stalls the product right after it.
#
#   scripts/kernel_sass.sh [--arch sm_90] FAMILY [FUNCTION]     e.g. attention flash_attention_64
#
# Needs `scripts/setup.sh --test` run once (NVRTC and the CUDA headers in .cache/cuda); fetches
# NVIDIA's cuobjdump and nvdisasm wheels (~10 MB, pinned to the NVRTC release) into .cache/cuda.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=sm_90
if [[ ${1:-} == --arch ]]; then arch=$2; shift 2; fi
family=${1:?usage: scripts/kernel_sass.sh [--arch sm_90] FAMILY [FUNCTION]}
function=${2:-}
cuda=$PWD/.cache/cuda/nvidia/cu13
[[ -e $cuda/lib/libnvrtc.so.13 ]] || { echo "no NVRTC in .cache/cuda: run scripts/setup.sh --test first"; exit 1; }
if [[ ! -x $cuda/bin/cuobjdump || ! -x $cuda/bin/nvdisasm ]]; then
  echo "fetching cuobjdump and nvdisasm"
  wheels=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheels" \
    nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86
  for w in "$wheels"/*.whl; do python3 -m zipfile -e "$w" .cache/cuda; done
  chmod +x "$cuda"/bin/*
  rm -rf "$wheels"
fi
export PATH=$cuda/bin:$PATH LD_LIBRARY_PATH=$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} CUDA_INCLUDE=$cuda/include
out=.cache/sass
cargo run -q --release -p lipstream-gpu --example cubins -- "$arch" "$out" "$family" > /dev/null
cubin=$out/$family.cubin
cuobjdump -res-usage "$cubin" | awk '
  /Function/ { name = $2; sub(/:$/, "", name) }
  /REG:/ { reg = ""; shared = ""; stack = ""; local_ = ""
    for (i = 1; i <= NF; i++) {
      if ($i ~ /^REG:/) reg = substr($i, 5)
      if ($i ~ /^SHARED:/) shared = substr($i, 8)
      if ($i ~ /^STACK:/) stack = substr($i, 7)
      if ($i ~ /^LOCAL:/) local_ = substr($i, 7)
    }
    printf "%-36s regs %4s  shared %6s B  stack %3s  local (spills) %s\n", name, reg, shared, stack, local_ }' | sort
if [[ -n $function ]]; then
  cuobjdump -sass -fun "$function" "$cubin" > "$out/$function.sass" 2> /dev/null
  grep -q "Function : $function\$" "$out/$function.sass" || { echo "no function $function in $family"; exit 1; }
  echo "SASS: $out/$function.sass ($(grep -c '/\*[0-9a-f]*\*/' "$out/$function.sass") instructions)"
  echo "order (H product, K/V ldmatrix plain/transposed, S 32-bit shared load, | barrier):"
  grep -oE '(HMMA|LDSM\.16\.MT?88|LDS(\.[0-9A-Z]+)?|BAR\.SYNC)' "$out/$function.sass" |
    sed -E 's/^HMMA$/H/; s/^LDSM\.16\.M88$/K/; s/^LDSM\.16\.MT88$/V/; s/^LDS.*/S/; s/^BAR\.SYNC$/|/' | tr -d '\n'
  echo
fi
