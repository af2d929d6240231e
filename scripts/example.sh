#!/usr/bin/env bash
# Set up, then run the main job on the embedded example: map the tiny GPT-2's norms, convert it
# exactly to Pre-RMSNorm, and show the equivalence report.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
normsurgeon inspect examples/tiny-gpt2
normsurgeon convert examples/tiny-gpt2 --to rmsnorm -o out/tiny-gpt2-rmsnorm --overwrite
echo
cat out/tiny-gpt2-rmsnorm/equivalence_report.md
