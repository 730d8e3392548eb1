#!/usr/bin/env bash
# The whole test suite: unit and property tests, and the integration tests that run the real
# binary against a real registry, skopeo and umoci. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# House rules first, so CI enforces them: formatting, and every lint of [workspace.lints].
cargo fmt --all --check
cargo clippy --workspace --all-targets --features image-builder/failpoints -- -D warnings
# The product carries no test rig: the test kit's dependencies stay out of its tree.
if cargo tree -e normal -p image-builder --prefix none \
    | grep -E '^(bcrypt|jsonwebtoken|rcgen|image-builder-testkit) '; then
  echo "the image-builder crate depends on the test kit (above); it must not" >&2
  exit 1
fi
cargo test --workspace --features image-builder/failpoints --no-fail-fast "$@"
