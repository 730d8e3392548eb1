#!/usr/bin/env bash
# Builds the Go programs Debian lacks that the tests talk to, from their Go modules through the
# Go module proxy: grpcurl (server reflection) and Jaeger v2 (OTLP traces). Each is cached
# outside the clone, keyed by version:
#   ${IMAGE_BUILDER_CACHE:-/var/cache/image-builder}/go-tools/<name>-<version>/<name>
# A fresh machine takes about 6 minutes here (two cores: grpcurl 1, Jaeger 5); a cached one,
# none. Uses the Go on PATH (or /usr/local/go) when it is 1.24.6 or later, else fetches a Go
# toolchain from the Go module proxy into the cache.
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

# Jaeger's go.mod asks for Go 1.24.6 or later.
GO_MIN=1.24.6
GO_TOOLCHAIN=1.25.4

# shellcheck source=local-go.sh
source "$(dirname "$0")/local-go.sh"

# A Go new enough: the one on PATH or in /usr/local/go, else the toolchain the Go module
# proxy serves (golang.org/toolchain), unpacked into the cache.
go_bin() {
  local_go "$GO_MIN" && return
  local dest=$CACHE/go-toolchain-$GO_TOOLCHAIN
  if [[ ! -x $dest/bin/go ]]; then
    say "fetching Go $GO_TOOLCHAIN from the Go module proxy"
    command -v unzip >/dev/null || {
      local sudo=""
      [[ $(id -u) -eq 0 ]] || sudo="sudo"
      $sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends unzip curl >/dev/null
    }
    local zip
    zip=$(mktemp "${TMPDIR:-/tmp}/go-toolchain.XXXXXX.zip")
    curl -fsSL -o "$zip" "https://proxy.golang.org/golang.org/toolchain/@v/v0.0.1-go$GO_TOOLCHAIN.linux-amd64.zip"
    rm -rf "$dest.tmp"
    mkdir -p "$dest.tmp"
    unzip -q "$zip" -d "$dest.tmp"
    rm -f "$zip"
    rm -rf "$dest"
    mv "$dest.tmp/golang.org/toolchain@v0.0.1-go$GO_TOOLCHAIN.linux-amd64" "$dest"
    rm -rf "$dest.tmp"
    chmod +x "$dest"/bin/* "$dest"/pkg/tool/*/* 2>/dev/null || true
  fi
  echo "$dest/bin/go"
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
