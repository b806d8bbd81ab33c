#!/usr/bin/env bash
# The one test command: installs what the tests need (a real browser, a real
# redis-server), then formatting, lints, and every test over real sockets,
# real gRPC, real processes, a real browser and real containers.
set -euo pipefail
cd "$(dirname "$0")"

.ci/test-deps
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The cluster tests run the worker and gateway binaries as processes.
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi
