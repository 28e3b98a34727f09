#!/usr/bin/env bash
# A Debian bookworm base image for the Containerfile where no container registry can be reached (only a
# Debian mirror): debootstrap a minimal root file system, then `podman import` it under BASE_TAG.
# Python 3.11 and the compiler come later, from the Containerfile's own apt-get step.
# Needs root (debootstrap), debootstrap and podman (both in Debian: apt-get install debootstrap podman).
# Idempotent: an existing BASE_TAG is kept (podman rmi it to rebuild).
set -euo pipefail
TAG=${BASE_TAG:-localhost/llmscape-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=${IMAGE_WORKDIR:-/var/tmp/llmscape-image}

for tool in debootstrap podman; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "[image-base] $tool is missing. Fix: apt-get install debootstrap podman (Debian/Ubuntu)" >&2
    exit 2
  fi
done
if [ "$(id -u)" != 0 ]; then
  echo "[image-base] debootstrap needs root. Fix: run as root, or build from the registry image (make image)" >&2
  exit 2
fi
if podman image exists "$TAG"; then
  echo "[image-base] $TAG exists; keeping it"
  exit 0
fi

rootfs="$WORK/rootfs.partial"  # a half-made tree from an interrupted run is discarded, never imported
rm -rf "$rootfs"
mkdir -p "$WORK"
echo "[image-base] debootstrap --variant=minbase bookworm from $MIRROR into $rootfs"
debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR"
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
EOF
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" --numeric-owner -c . | podman import --change 'CMD ["/bin/bash"]' - "$TAG"
rm -rf "$rootfs"
echo "[image-base] imported $TAG"
