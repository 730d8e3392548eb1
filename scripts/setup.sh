#!/usr/bin/env bash
# Installs what image-builder's demo and tests need on a fresh Debian machine: the registry,
# buildah with runc, skopeo, umoci, busybox-static, git and prometheus from Debian's packages. protoc is vendored by
# the build (protoc-bin-vendored), so no system package is needed for it. Idempotent.
set -euo pipefail

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v buildah >/dev/null || need+=(buildah)
# RUN steps run in containers of their own (buildah's rootless isolation) inside a user
# namespace: runc; newuidmap/newgidmap to map the namespace; slirp4netns for their network.
command -v runc >/dev/null || need+=(runc)
command -v newuidmap >/dev/null || need+=(uidmap)
command -v slirp4netns >/dev/null || need+=(slirp4netns)
command -v skopeo >/dev/null || need+=(skopeo)
command -v umoci >/dev/null || need+=(umoci)
[[ -x /bin/busybox ]] || need+=(busybox-static)
command -v git >/dev/null || need+=(git)
# Prometheus scrapes the service's metrics in the observability test.
command -v prometheus >/dev/null || need+=(prometheus)

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Local builds run in a user namespace mapped from the service user's subordinate ids: give
# the user a range of 65536 ids after every range already given, unless it has one.
user=$(id -un)
for file in /etc/subuid /etc/subgid; do
  if ! grep -qE "^($user|$(id -u)):[0-9]+:[0-9]+" "$file" 2>/dev/null; then
    first=$(awk -F: 'BEGIN { end = 200000 } NF == 3 && $2 + $3 > end { end = $2 + $3 } END { print end }' "$file" 2>/dev/null || echo 200000)
    echo "setup: giving $user the subordinate ids $first-$((first + 65535)) in $file" >&2
    echo "$user:$first:65536" | $sudo tee -a "$file" >/dev/null
  fi
done
# slirp4netns, run by root of that namespace, opens /dev/net/tun: Debian's udev makes it
# 0666; some container hosts leave it 0600.
if [[ -c /dev/net/tun && $(stat -c %a /dev/net/tun) != 666 ]]; then
  echo "setup: making /dev/net/tun usable by user namespaces (mode 0666, Debian's default)" >&2
  $sudo chmod 0666 /dev/net/tun
fi

# moto: a local AWS endpoint (ECR's GetAuthorizationToken) for the ECR tests.
if ! python3 -c 'import moto.server' 2>/dev/null; then
  echo "setup: installing moto[server] from PyPI" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'moto[server]' >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo is missing: install a Rust toolchain (rustup) first" >&2; exit 1; }
