#!/usr/bin/env bash
# The one test command: installs what the tests need (a real browser, a real
# redis-server), then formatting, lints, and every test over real sockets,
# real gRPC, real processes, a real browser and real containers.
set -euo pipefail
cd "$(dirname "$0")"

step() { echo "test.sh: [$((SECONDS / 60))m$((SECONDS % 60))s] $*" >&2; }

step "test dependencies"
.ci/test-deps
step "cargo fmt --check"
cargo fmt --all -- --check
# The cluster tests run the worker and gateway binaries as processes. Built
# with the tests in one cargo call, so the bins see the same features as the
# test build (dev-dependencies add features to shared crates) and the test
# run below reuses them instead of building everything a second time.
step "cargo build (bins and tests)"
cargo build --workspace --all-targets
# After the build, whose proc-macros and build scripts it reuses: about a minute
# instead of three to six on a clean target directory.
step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi
step "done"
