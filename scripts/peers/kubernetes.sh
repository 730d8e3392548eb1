#!/usr/bin/env bash
# Builds the Kubernetes control plane and kubelet the tests run (kube-apiserver, kubelet,
# kube-controller-manager, kube-scheduler), from Debian 12's source package of Kubernetes
# 1.20.2 with Debian's Go, and installs the Debian packages a node needs (etcd, containerd,
# the CNI plugins, kubectl). The binaries are cached outside the clone, keyed by version:
#   ${IMAGE_BUILDER_CACHE:-/var/cache/image-builder}/kubernetes-<version>/bin
# A fresh machine takes about 7 minutes here (two cores); a cached one, none.
# Prints the bin directory on stdout. Idempotent.
set -euo pipefail

VERSION=v1.20.2
DEBIAN_VERSION=1.20.5+really1.20.2-1.1+deb12u1
CACHE=${IMAGE_BUILDER_CACHE:-/var/cache/image-builder}
DEST=$CACHE/kubernetes-$VERSION-deb12u1
BINARIES=(kube-apiserver kubelet kube-controller-manager kube-scheduler)

say() { echo "kubernetes: $*" >&2; }

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"

cached=true
for b in "${BINARIES[@]}"; do [[ -x $DEST/bin/$b ]] || cached=false; done

# What a node needs from Debian, and Debian's Go 1.19 for the 1.20 tree.
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v containerd >/dev/null || need+=(containerd)
[[ -x /usr/lib/cni/bridge ]] || need+=(containernetworking-plugins)
command -v runc >/dev/null || need+=(runc)
command -v iptables >/dev/null || need+=(iptables)
command -v conntrack >/dev/null || need+=(conntrack)
command -v socat >/dev/null || need+=(socat)
command -v ip >/dev/null || need+=(iproute2)
command -v kubectl >/dev/null || need+=(kubernetes-client)
if ! $cached; then
  [[ -x /usr/lib/go-1.19/bin/go ]] || need+=(golang-1.19-go)
  [[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ]] || need+=(golang-github-modern-go-reflect2-dev)
  command -v dpkg-source >/dev/null || need+=(dpkg-dev)
fi
if ((${#need[@]})); then
  say "installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if $cached; then
  say "cached in $DEST/bin"
  echo "$DEST/bin"
  exit 0
fi

started=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/kubernetes-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Debian's source package, through a private apt state with deb-src lines (the machine's own
# lists stay as they are).
say "fetching Debian's source package kubernetes $DEBIAN_VERSION"
mkdir -p "$work/apt/lists/partial" "$work/src"
cat >"$work/apt/sources.list" <<EOF
deb-src http://deb.debian.org/debian bookworm main
deb-src http://deb.debian.org/debian-security bookworm-security main
EOF
apt_private=(-o "APT::Sandbox::User=root" -o "Dir::Etc::SourceList=$work/apt/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null" -o "Dir::State::Lists=$work/apt/lists"
  -o "Dir::Cache::srcpkgcache=" -o "Dir::Cache::pkgcache=")
apt-get "${apt_private[@]}" update -qq
(cd "$work/src" && apt-get "${apt_private[@]}" source --download-only -qq "kubernetes=$DEBIAN_VERSION" >/dev/null)
# apt checked the files against the signed Sources index; dpkg-source need not check again.
dpkg-source --no-check -x "$work"/src/kubernetes_*.dsc "$work/src/tree" >/dev/null

# GOPATH mode with Debian's Go 1.19, as the 1.20 tree expects.
export GOPATH=$work/gopath GO111MODULE=off GOFLAGS= CGO_ENABLED=0
export GOCACHE=$CACHE/go-build-1.19 PATH=/usr/lib/go-1.19/bin:$PATH
mkdir -p "$GOPATH/src/k8s.io"
ln -s "$work/src/tree" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"

# The vendored reflect2 1.0.1 crashes on Go >= 1.18: Debian's 1.0.2 replaces it.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod vendor/github.com/modern-go/reflect2/go.sum

# The tarball lacks the generated OpenAPI definitions the API server serves. They cover every
# package with the tag on any of its files (a type may carry it, as intstr.IntOrString does),
# named by import path: staging/src/k8s.io/x is k8s.io/x, pkg/... is k8s.io/kubernetes/pkg/...
say "generating the OpenAPI definitions"
go build -o "$work/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
tagged=$(grep -rl --include='*.go' '+k8s:openapi-gen=' pkg staging/src vendor 2>/dev/null |
  grep -v -e '/testdata/' -e '^pkg/generated/openapi/' | xargs -n1 dirname | sort -u |
  sed -e 's|^staging/src/||' -e 's|^vendor/||' -e 's|^pkg/|k8s.io/kubernetes/pkg/|' |
  sort -u | paste -sd, -)
"$work/openapi-gen" --input-dirs "$tagged" \
  --output-package k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  --go-header-file hack/boilerplate/boilerplate.generatego.txt \
  --report-filename /dev/null --output-base "$GOPATH/src"

version_flags=""
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  version_flags+=" -X $pkg.gitVersion=$VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
  version_flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
mkdir -p "$DEST/bin.partial"
for b in "${BINARIES[@]}"; do
  say "building $b"
  go build -trimpath -ldflags "-s -w $version_flags" -o "$DEST/bin.partial/$b" "./cmd/$b"
done
rm -rf "$DEST/bin"
mv "$DEST/bin.partial" "$DEST/bin"
say "built in $((SECONDS - started)) s into $DEST/bin"
echo "$DEST/bin"
