#!/usr/bin/env bash
# Installs what building lipstream needs on a fresh Debian/Ubuntu machine; with --test, also what
# the tests need (headless Chromium, Node.js, playwright-core). Safe to run again: it skips what
# is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
[[ "${1:-}" == "--test" ]] && want_tests=1

sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi

# nasm: openh264 silently drops its assembly without it (2-3x slower); cmake: libopus.
packages=(build-essential pkg-config nasm cmake curl ca-certificates)
if [[ $want_tests -eq 1 ]]; then
  packages+=(chromium)
  if ! command -v node >/dev/null || [[ $(node -p 'process.versions.node.split(".")[0]') -lt 18 ]]; then
    packages+=(nodejs npm)
  fi
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Debian names the browser chromium; on Ubuntu that package is a snap shim, so accept any chromium binary.
if [[ " ${missing[*]} " == *" chromium "* ]] && command -v chromium >/dev/null; then
  missing=("${missing[@]/chromium}")
fi
if [[ -n "${missing[*]// /}" ]]; then
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends ${missing[*]}
fi

if ! command -v cargo >/dev/null; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "setup: installing the Rust toolchain (rustup)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

if [[ $want_tests -eq 1 ]]; then
  npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
  # NVRTC and the CUDA headers, from NVIDIA's wheels (~50 MB): the kernel-source test compiles
  # every .cu file for every supported GPU without one. Downloaded and unpacked, not installed.
  cuda=.cache/cuda
  if [[ ! -e $cuda/nvidia/cu13/lib/libnvrtc.so.13 ]]; then
    python3 -m pip --version >/dev/null 2>&1 || {
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-pip
    }
    echo "setup: fetching NVRTC and the CUDA headers"
    rm -rf "$cuda" && mkdir -p "$cuda/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$cuda/wheels" \
      nvidia-cuda-nvrtc==13.2.86 nvidia-cuda-runtime==13.2.86
    for w in "$cuda"/wheels/*.whl; do python3 -m zipfile -e "$w" "$cuda"; done
    rm -rf "$cuda/wheels"
  fi
fi
