#!/usr/bin/env bash
# Installs what image-builder's demo and tests need on a fresh Debian machine: the registry,
# buildah with runc, skopeo, umoci, busybox-static, git and prometheus from Debian's packages. protoc is vendored by
# the build (protoc-bin-vendored), so no system package is needed for it. Idempotent.
set -euo pipefail

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v buildah >/dev/null || need+=(buildah)
# RUN steps run in containers of their own (buildah's oci isolation): runc, and the CNI
# plugins of buildah's private network (a dependency of buildah's containers-common).
command -v runc >/dev/null || need+=(runc)
command -v skopeo >/dev/null || need+=(skopeo)
command -v umoci >/dev/null || need+=(umoci)
[[ -x /bin/busybox ]] || need+=(busybox-static)
command -v git >/dev/null || need+=(git)
# Prometheus scrapes the service's metrics in the observability test.
command -v prometheus >/dev/null || need+=(prometheus)

if ((${#need[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# moto: a local AWS endpoint (ECR's GetAuthorizationToken) for the ECR tests.
if ! python3 -c 'import moto.server' 2>/dev/null; then
  echo "setup: installing moto[server] from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]' >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo is missing: install a Rust toolchain (rustup) first" >&2; exit 1; }
