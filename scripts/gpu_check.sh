#!/usr/bin/env bash
# One check of everything that runs only on a GPU (docs/training.md, "Checking a GPU"):
# the CUDA tests, `zforcing bench --device cuda` for each preset, a short training per data
# kind and precision followed by evaluate and sample, and a one-process torchrun over NCCL.
# One line per check, PASS or FAIL with its figure; the exit status is 1 if any failed.
#
#   scripts/gpu_check.sh                 # on a machine with one GPU: a few minutes
#   scripts/gpu_check.sh --device cpu    # the same checks at tiny sizes, without a GPU
#   scripts/gpu_check.sh --only bench    # the checks whose names contain a word
#
# It runs the zforcing of this tree (installed or not) with PYTHON (default python3), which
# needs zforcing's dependencies and pytest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_check.py" "$@"
