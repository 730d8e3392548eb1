#!/usr/bin/env bash
# The whole test suite: unit and property tests, and the integration tests that run the real
# binary against a real registry, skopeo and umoci. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo test --workspace --no-fail-fast "$@"
