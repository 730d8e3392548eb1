#!/usr/bin/env bash
# Builds the single-node Kubernetes the tests run, from the Go modules of each project through
# the Go module proxy, with the machine's Go (no source change):
#   Kubernetes  kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kubectl
#   etcd        the server
#   containerd  containerd, its runc shim, ctr
#   runc        with seccomp (user namespaces for pods need runc >= 1.2; Debian's is 1.1.5)
# Each is cached outside the clone, keyed by its version:
#   ${IMAGE_BUILDER_CACHE:-/var/cache/image-builder}/node/<name>-<version>/
# and the directory printed on stdout links them all by name. A fresh two-core machine takes
# about 15 minutes (Kubernetes' shared packages are most of it); a cached one, none.
# Installs the Debian packages a node needs (CNI plugins, iptables, ...). Idempotent.
set -euo pipefail

KUBERNETES=v1.37.2
ETCD=v3.7.3
CONTAINERD=v2.4.2
RUNC=v1.5.3
# The Go these modules ask for (their go.mod `go` lines).
GO_MIN=1.26.6

CACHE=${IMAGE_BUILDER_CACHE:-/var/cache/image-builder}
NODE=$CACHE/node

say() { echo "kubernetes: $*" >&2; }

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"

# What a node needs from Debian, and what cgo needs to build runc.
need=()
[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
command -v iptables >/dev/null || need+=(iptables)
command -v conntrack >/dev/null || need+=(conntrack)
command -v socat >/dev/null || need+=(socat)
command -v ip >/dev/null || need+=(iproute2)
if [[ ! -x $NODE/runc-$RUNC/runc ]]; then
  [[ -e /usr/include/seccomp.h ]] || need+=(libseccomp-dev)
  command -v pkg-config >/dev/null || need+=(pkg-config)
  command -v gcc >/dev/null || need+=(gcc libc6-dev)
fi
if ((${#need[@]})); then
  say "installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# shellcheck source=local-go.sh
source "$(dirname "$0")/local-go.sh"
go_bin() {
  local_go "$GO_MIN" && return
  say "these builds need Go $GO_MIN or later (the go.mod of each module names it); none found"
  exit 1
}

export GOMODCACHE=$CACHE/go-mod GOFLAGS=-mod=mod GOTOOLCHAIN=local

# build NAME VERSION FILES...: runs the function build_NAME into a fresh directory unless
# $NODE/NAME-VERSION already holds FILES.
build() {
  local name=$1 version=$2
  shift 2
  local dest=$NODE/$name-$version file missing=false
  for file in "$@"; do [[ -x $dest/$file ]] || missing=true; done
  $missing || return 0
  local started=$SECONDS work
  work=$(mktemp -d "${TMPDIR:-/tmp}/node-build.XXXXXX")
  rm -rf "$dest.partial"
  mkdir -p "$dest.partial"
  say "building $name $version (cached afterwards in $dest)"
  ( cd "$work" && "build_$name" "$version" "$dest.partial" ) >&2
  rm -rf "$work" "$dest"
  mv "$dest.partial" "$dest"
  say "built $name in $((SECONDS - started)) s"
}

# A module's own source, writable, in the current directory (its go.mod and replace lines
# apply, which `go install module@version` refuses).
module_source() {
  local src
  src=$("$GO" mod download -json "$1@$2" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -d $src ]] || { say "cannot download $1@$2"; exit 1; }
  cp -r "$src/." .
  chmod -R u+w .
}

# Kubernetes: a scratch module requiring k8s.io/kubernetes, with each staging module its go.mod
# replaces by a relative path (not in the module's zip) taken at the matching v0.x release.
build_kubernetes() {
  local version=$1 out=$2 minor=${1#v1.}
  minor=${minor%%.*}
  local gomod
  gomod=$("$GO" mod download -json "k8s.io/kubernetes@$version" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  {
    echo "module image-builder.test/kubernetes"
    echo "go $GO_MIN"
    echo "require k8s.io/kubernetes $version"
    sed -n 's|^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/src/k8s.io/.*$|replace \1 => \1 v0.'"${version#v1.}"'|p' "$gomod"
  } >go.mod
  cat >tools.go <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
EOF
  "$GO" mod tidy
  local flags="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    flags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  # No cgo anywhere: one build of the shared packages serves all five (with cgo, the kubelet
  # alone recompiles them, about 8 minutes here).
  local b
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet; do
    say "  $b"
    CGO_ENABLED=0 "$GO" build -p 2 -trimpath -tags selinux,notest,grpcnotrace \
      -ldflags "$flags" -o "$out/$b" "k8s.io/kubernetes/cmd/$b"
  done
}

# etcd: the server module's go.mod replaces its siblings by relative paths, so it is built as
# a dependency of a scratch module (its requirements name the same versions).
build_etcd() {
  local version=$1 out=$2
  printf 'module image-builder.test/etcd\ngo %s\nrequire go.etcd.io/etcd/server/v3 %s\n' "$GO_MIN" "$version" >go.mod
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' >tools.go
  "$GO" mod tidy
  CGO_ENABLED=0 "$GO" build -p 2 -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3
}

build_containerd() {
  local version=$1 out=$2
  module_source github.com/containerd/containerd/v2 "$version"
  local flags="-s -w -X github.com/containerd/containerd/v2/version.Version=$version"
  CGO_ENABLED=0 "$GO" build -p 2 -trimpath -tags urfave_cli_no_docs,no_btrfs -ldflags "$flags" \
    -o "$out/containerd" ./cmd/containerd
  CGO_ENABLED=0 "$GO" build -p 2 -trimpath -tags urfave_cli_no_docs,no_btrfs,no_grpc -ldflags "$flags" \
    -o "$out/containerd-shim-runc-v2" ./cmd/containerd-shim-runc-v2
  CGO_ENABLED=0 "$GO" build -p 2 -trimpath -tags urfave_cli_no_docs,no_btrfs -ldflags "$flags" \
    -o "$out/ctr" ./cmd/ctr
}

# runc: cgo (its nsenter is C) with libseccomp; without libpathrs (a Rust library Debian 12
# lacks; runc's own path checks serve instead).
build_runc() {
  local version=$1 out=$2
  module_source github.com/opencontainers/runc "$version"
  CGO_ENABLED=1 "$GO" build -p 2 -trimpath -buildmode=pie -tags seccomp,urfave_cli_no_docs \
    -ldflags "-s -w -X main.version=${version#v}" -o "$out/runc" .
}

if [[ ! -x $NODE/kubernetes-$KUBERNETES/kubelet || ! -x $NODE/etcd-$ETCD/etcd ||
      ! -x $NODE/containerd-$CONTAINERD/containerd || ! -x $NODE/runc-$RUNC/runc ]]; then
  GO=$(go_bin)
  export GOCACHE=$CACHE/go-build-node
fi
build kubernetes "$KUBERNETES" kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet
build etcd "$ETCD" etcd
build containerd "$CONTAINERD" containerd containerd-shim-runc-v2 ctr
build runc "$RUNC" runc

# One directory naming every binary of this set of versions.
bin=$NODE/bin-$KUBERNETES-etcd$ETCD-containerd$CONTAINERD-runc$RUNC
if [[ ! -d $bin ]]; then
  rm -rf "$bin.partial"
  mkdir -p "$bin.partial"
  for dir in "kubernetes-$KUBERNETES" "etcd-$ETCD" "containerd-$CONTAINERD" "runc-$RUNC"; do
    for file in "$NODE/$dir"/*; do ln -s "$file" "$bin.partial/$(basename "$file")"; done
  done
  mv "$bin.partial" "$bin"
fi
say "cached in $bin"
echo "$bin"
