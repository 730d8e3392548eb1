#!/usr/bin/env bash
# The main job, end to end on a fresh machine: installs what is needed, starts a local
# registry and the service, runs a real build through the gRPC API, shows status and logs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --quiet -p image-builder --bin image-builder
cargo build --quiet -p image-builder-testkit --bin image-builder-testkit
exec ./target/debug/image-builder-testkit demo "$@"
