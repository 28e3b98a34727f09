#!/usr/bin/env bash
# ci-setup-slurm.sh -- CI's setup step for the Slurm tests (as root, Debian/Ubuntu).
# Installs slurmctld, slurmd, slurm-client and munge (apt-get, only what is missing) and starts the
# loopback test cluster, so that tests/test_slurm.py finds it up and its own start costs nothing.
# The pytest fixture does the same on its own; this script only moves the apt-get time and any
# install failure into a clearly named CI step. Stop with scripts/stop-slurm-test-cluster.sh.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ "$(id -u)" = 0 ] || { echo "ci-setup-slurm.sh: must run as root" >&2; exit 1; }
bash "$here/start-slurm-test-cluster.sh"
