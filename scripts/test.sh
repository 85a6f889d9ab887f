#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for the tests and runs every test of the workspace:
# unit tests, WebRTC loopback, churn, HTTP errors and the headless-Chromium page test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
export PATH="$HOME/.cargo/bin:$PATH"
# The end-to-end tests each start a server and stream real-time media: running them side by side
# on a 2-core machine would measure the machine, not lipstream.
cargo test --workspace --all-targets -- --test-threads=1
