#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for the tests and runs every test of the workspace:
# unit tests, WebRTC loopback, churn, HTTP errors and the headless-Chromium page test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
export PATH="$HOME/.cargo/bin:$PATH"
# The NVRTC that setup fetched: CUDA kernel sources must compile here, GPU or not.
cuda="$PWD/.cache/cuda/nvidia/cu13"
export LD_LIBRARY_PATH="$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_INCLUDE="$cuda/include" LIPSTREAM_REQUIRE_NVRTC=1
# The end-to-end tests each start a server and stream real-time media: running them side by side
# on a 2-core machine would measure the machine, not lipstream.
cargo test --workspace --all-targets -- --test-threads=1
