#!/usr/bin/env bash
# Build the llmscape image from the Containerfile with podman (make image). Usage:
#   scripts/image-build.sh [CONTEXT]     (CONTEXT: the source tree to build from; default: this repository)
# Settings (environment; make passes its command-line variables through):
#   IMAGE_TAG       the image's name (default llmscape:0.1.0)
#   IMAGE_BASE      registry (default: the Containerfile's python:3.11-slim-bookworm from docker.io),
#                   debootstrap (a Debian bookworm base made here by scripts/image-base.sh: no registry
#                   needed, only a Debian mirror), or any image name
#   PIP_CERT        a CA bundle (the site proxy's): mounted read-only into the build and named to pip
#   IMAGE_WHEELS    a folder of wheels mounted read-only and searched besides the index (an offline
#                   torch CPU wheel where PyTorch's index is not reachable; then also TORCH_INDEX=)
#   TORCH_INDEX     passed to the build when set, even empty (empty: torch from PyPI or IMAGE_WHEELS)
#   IMAGE_ISOLATION podman's build isolation (default chroot: runs where nested containers are refused)
# Prints the build time and the image size at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONTEXT=${1:-$ROOT}
TAG=${IMAGE_TAG:-llmscape:0.1.0}
BASE=${IMAGE_BASE:-registry}

if ! command -v podman >/dev/null 2>&1; then
  echo "[image] podman is missing. Fix: apt-get install podman (Debian/Ubuntu), dnf install podman (Fedora)" >&2
  exit 2
fi
args=(--isolation "${IMAGE_ISOLATION:-chroot}" --network host -f "$CONTEXT/Containerfile" -t "$TAG")
case "$BASE" in
  registry) ;;
  debootstrap)
    bash "$ROOT/scripts/image-base.sh"
    args+=(--build-arg "BASE=${BASE_TAG:-localhost/llmscape-base:bookworm}") ;;
  *) args+=(--build-arg "BASE=$BASE") ;;
esac
if [ -n "${PIP_CERT:-}" ]; then
  [ -r "$PIP_CERT" ] || { echo "[image] PIP_CERT=$PIP_CERT is not a readable file. Fix: name the CA bundle, or unset PIP_CERT" >&2; exit 2; }
  args+=(-v "$PIP_CERT:/run/llmscape-ca.crt:ro" --build-arg PIP_CERT=/run/llmscape-ca.crt)
fi
if [ -n "${IMAGE_WHEELS:-}" ]; then
  [ -d "$IMAGE_WHEELS" ] || { echo "[image] IMAGE_WHEELS=$IMAGE_WHEELS is not a folder. Fix: name a folder of wheels, or unset it" >&2; exit 2; }
  args+=(-v "$(cd "$IMAGE_WHEELS" && pwd):/run/llmscape-wheels:ro" --build-arg WHEELS=/run/llmscape-wheels)
fi
if [ -n "${TORCH_INDEX+set}" ]; then
  args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
fi

echo "[image] podman build ${args[*]} $CONTEXT"
start=$(date +%s)
if ! podman build "${args[@]}" "$CONTEXT"; then
  echo "[image] the build failed (above). Where no registry is reachable: make image IMAGE_BASE=debootstrap;" \
       "behind a site proxy: PIP_CERT=<its CA bundle> make image" >&2
  exit 1
fi
size=$(podman image inspect --format '{{.Size}}' "$TAG")
echo "[image] built $TAG in $(( $(date +%s) - start )) s; size $(( size / 1000000 )) MB ($size bytes)"
