#!/usr/bin/env bash
# The whole test suite: unit and property tests, and the integration tests that run the real
# binary against a real registry, skopeo, umoci, and a real single-node Kubernetes. Installs
# and builds what it needs first (peers are cached under ${IMAGE_BUILDER_CACHE:-/var/cache/image-builder}).
set -euo pipefail
cd "$(dirname "$0")/.."
# CI builds a fresh clone once: incremental state would only take disk the test cluster needs.
if [[ -n ${CI:-} ]]; then
  export CARGO_INCREMENTAL=0
fi
# The build (about 10 GiB fresh) and the test cluster's containers share this disk; when it
# runs out, pods fail in ways that look like product faults, so say how much there is.
free_gib() { df --output=avail -BG "$1" | tail -1 | tr -dc 0-9; }
echo "free space: $(free_gib .) GiB here, $(free_gib /var/tmp) GiB in /var/tmp" >&2
if (($(free_gib /var/tmp) < 15)); then
  echo "warning: less than 15 GiB free in /var/tmp; the Kubernetes tests may fail for want of disk" >&2
fi
./scripts/setup.sh
# House rules first, so CI enforces them: formatting, and every lint of [workspace.lints].
cargo fmt --all --check
cargo clippy --workspace --all-targets --features image-builder/failpoints,image-builder/scenario -- -D warnings
# Every doc comment's links resolve: `cargo doc` builds without a warning.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
# The product carries no test rig: the test kit's dependencies stay out of its tree.
if cargo tree -e normal -p image-builder --prefix none \
    | grep -E '^(bcrypt|jsonwebtoken|rcgen|image-builder-testkit|image-builder-scenario) '; then
  echo "the image-builder crate depends on the test kit or the scenario runner (above); it must not" >&2
  exit 1
fi

# Kubernetes, etcd, containerd and runc from their Go modules, the builder image, grpcurl and
# Jaeger (cached by version; a fresh machine builds them once), then one test cluster for every
# test binary: started here, stopped on the way out.
IMAGE_BUILDER_KUBERNETES_BIN=$(./scripts/peers/kubernetes.sh)
export IMAGE_BUILDER_KUBERNETES_BIN
./scripts/peers/builder-image.sh >/dev/null
# grpcurl (reflection) and Jaeger v2 (traces), built from their Go modules and cached.
go_tools=$(./scripts/peers/go-tools.sh)
while IFS= read -r line; do export "${line?}"; done <<<"$go_tools"
# The deployment test runs the shipped release binary (and its debug file beside it) in the
# service's container image; tests/release.rs checks its size and backtraces.
IMAGE_BUILDER_RELEASE_BINARY=$(./scripts/release.sh)
export IMAGE_BUILDER_RELEASE_BINARY
cargo build --quiet -p image-builder-testkit
cluster_env=$(mktemp)
./target/debug/image-builder-testkit cluster --env-file "$cluster_env" &
cluster_pid=$!
trap 'kill -TERM $cluster_pid 2>/dev/null; wait $cluster_pid 2>/dev/null; rm -f "$cluster_env"' EXIT
for _ in $(seq 1 600); do
  [[ -s $cluster_env ]] && break
  kill -0 $cluster_pid 2>/dev/null || { echo "the test cluster did not start (above)" >&2; exit 1; }
  sleep 1
done
[[ -s $cluster_env ]] || { echo "the test cluster did not start within 10 minutes" >&2; exit 1; }
# shellcheck disable=SC1090
source "$cluster_env"
export IMAGE_BUILDER_TEST_KUBECONFIG IMAGE_BUILDER_TEST_CONTAINERD_SOCKET

status=0
cargo test --workspace --features image-builder/failpoints,image-builder/scenario --no-fail-fast "$@" || status=$?
echo "free space after the tests: $(free_gib .) GiB here, $(free_gib /var/tmp) GiB in /var/tmp" >&2
exit $status
