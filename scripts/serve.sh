#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine, builds lipstream (release) and runs `lipstream serve`.
# Extra arguments go to `lipstream serve` (see `lipstream serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p lipstream
exec ./target/release/lipstream serve "$@"
