#!/usr/bin/env bash
# The whole test suite: unit and property tests, and the integration tests that run the real
# binary against a real registry, skopeo and umoci. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# House rules first, so CI enforces them: formatting, and every lint of [workspace.lints].
cargo fmt --all --check
cargo clippy --workspace --all-targets --features image-builder/failpoints -- -D warnings
cargo test --workspace --features image-builder/failpoints --no-fail-fast "$@"
