#!/usr/bin/env bash
# Makes the builder image the Kubernetes executor runs (buildah, runc and git on Debian 12), from
# Debian's packages with mmdebstrap, with no registry on the internet: a docker archive that
# the tests import into the test node's containerd. Cached outside the clone, keyed by version:
#   ${IMAGE_BUILDER_CACHE:-/var/cache/image-builder}/builder-image-<version>/builder.tar
# Prints the archive's path on stdout; the image inside is named by $IMAGE (below).
# About 2 minutes on a fresh machine; none when cached. Idempotent.
set -euo pipefail

VERSION=bookworm-2
IMAGE=localhost/image-builder/builder:$VERSION
CACHE=${IMAGE_BUILDER_CACHE:-/var/cache/image-builder}
DEST=$CACHE/builder-image-$VERSION
ARCHIVE=$DEST/builder.tar

say() { echo "builder-image: $*" >&2; }

if [[ -s $ARCHIVE ]]; then
  say "cached at $ARCHIVE"
  echo "$ARCHIVE"
  exit 0
fi

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v umoci >/dev/null || need+=(umoci)
command -v skopeo >/dev/null || need+=(skopeo)
if ((${#need[@]})); then
  say "installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

started=$SECONDS
work=$(mktemp -d "${TMPDIR:-/tmp}/builder-image.XXXXXX")
trap 'rm -rf "$work"' EXIT

say "making a Debian bookworm root file system with buildah, runc and git"
mmdebstrap --quiet --variant=apt --mode=root \
  --include=buildah,runc,uidmap,git,ca-certificates \
  --aptopt='APT::Install-Recommends "false"' \
  --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
  bookworm "$work/rootfs.tar" http://deb.debian.org/debian

# Builds in a pod use the vfs driver (no overlay mounts inside a container). buildah runs as
# root of a user namespace nested in the pod's, mapped over all of the pod's 65536 ids from
# these subordinate ranges (newuidmap checks them), and RUN steps are runc containers in it.
mkdir -p "$work/etc/containers"
echo "root:0:65536" >"$work/etc/subuid"
echo "root:0:65536" >"$work/etc/subgid"
cat >"$work/etc/containers/storage.conf" <<'EOF'
[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF

layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:builder"
umoci unpack --image "$layout:builder" "$work/bundle" >/dev/null
tar -xf "$work/rootfs.tar" -C "$work/bundle/rootfs"
cp "$work/etc/containers/storage.conf" "$work/bundle/rootfs/etc/containers/storage.conf"
cp "$work/etc/subuid" "$work/etc/subgid" "$work/bundle/rootfs/etc/"
umoci repack --image "$layout:builder" "$work/bundle"
umoci config --image "$layout:builder" --os linux --architecture amd64 \
  --config.env BUILDAH_ISOLATION=oci --config.env STORAGE_DRIVER=vfs \
  --config.entrypoint /bin/sh --config.workingdir /
mkdir -p "$DEST"
skopeo copy --quiet "oci:$layout:builder" "docker-archive:$ARCHIVE.partial:$IMAGE"
mv "$ARCHIVE.partial" "$ARCHIVE"
echo "$IMAGE" >"$DEST/image-name"
say "made $IMAGE in $((SECONDS - started)) s: $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
echo "$ARCHIVE"
