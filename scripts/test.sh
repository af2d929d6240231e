#!/usr/bin/env bash
# Set up, then run the whole test suite (unit, equivalence, CLI and doctests) on the CPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -p no:cacheprovider "$@"
