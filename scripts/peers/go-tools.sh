#!/usr/bin/env bash
# Builds the Go programs Debian lacks that the tests talk to, from their Go modules through the
# Go module proxy: grpcurl (server reflection) and Jaeger v2 (OTLP traces). Each is cached
# outside the clone, keyed by version:
#   ${IMAGE_BUILDER_CACHE:-/var/cache/image-builder}/go-tools/<name>-<version>/<name>
# A fresh machine takes about 10 minutes here (two cores, Jaeger is most of it); a cached one,
# none. Uses the Go on PATH (or /usr/local/go), else installs Debian's golang-go.
# Prints `NAME=path` lines for the test command to export. Idempotent.
set -euo pipefail

CACHE=${IMAGE_BUILDER_CACHE:-/var/cache/image-builder}
# name, module, version, main package in the module. Jaeger's module tag v1.76.0 is the
# Jaeger v2 release of the same day (cmd/jaeger is the v2 binary, OTLP in, query API out).
TOOLS=(
  "grpcurl github.com/fullstorydev/grpcurl v1.9.3 ./cmd/grpcurl"
  "jaeger github.com/jaegertracing/jaeger v1.76.0 ./cmd/jaeger"
)

say() { echo "go-tools: $*" >&2; }

go_bin() {
  if command -v go >/dev/null; then command -v go; return; fi
  if [[ -x /usr/local/go/bin/go ]]; then echo /usr/local/go/bin/go; return; fi
  local sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  say "installing Debian's golang-go"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends golang-go >/dev/null
  command -v go
}

for tool in "${TOOLS[@]}"; do
  read -r name module version package <<<"$tool"
  dest=$CACHE/go-tools/$name-$version
  if [[ ! -x $dest/$name ]]; then
    go=$(go_bin)
    started=$SECONDS
    say "building $name $version from $module (cached afterwards in $dest)"
    # Built inside the module's own source (its go.mod and replace directives apply, which
    # `go install module@version` refuses), fetched through the module proxy.
    export GOCACHE=$CACHE/go-build-modules GOMODCACHE=$CACHE/go-mod GOFLAGS=-mod=mod CGO_ENABLED=0
    src=$("$go" mod download -json "$module@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [[ -d $src ]] || { say "cannot download $module@$version"; exit 1; }
    work=$(mktemp -d "${TMPDIR:-/tmp}/go-tools.XXXXXX")
    cp -r "$src/." "$work/"
    chmod -R u+w "$work"
    mkdir -p "$dest.tmp"
    (cd "$work" && "$go" build -trimpath -o "$dest.tmp/$name" "$package") >&2
    rm -rf "$work"
    rm -rf "$dest"
    mv "$dest.tmp" "$dest"
    say "built $name in $((SECONDS - started)) s"
  fi
  upper=$(tr '[:lower:]-' '[:upper:]_' <<<"$name")
  echo "IMAGE_BUILDER_${upper}_BIN=$dest/$name"
done
