#!/usr/bin/env bash
# One process on this machine: the plain `rlft run`, for symmetry with the multi-process launchers.
# usage: launch/local.sh EXPERIMENT.py[:PRESET] [--workdir DIR] [--config.a.b=VALUE ...]
set -euo pipefail
exec "${PYTHON:-python}" -m rlft run "$@"
