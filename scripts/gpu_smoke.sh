#!/usr/bin/env bash
# The GPU smoke check in one command, on the lent GPU machine (docs/gpu.md, "Smoke check"; issue 26).
# Here first: bash scripts/gpu_prepare.sh (writes the ignored .gpu-wheels/, carried to the machine). There:
#   bash scripts/gpu_smoke.sh $OUT/gpu_smoke.json [--families llama-3.1-8b]
# installs the prepared wheels into /tmp/ppow-site (no index: nothing is downloaded there), puts the patched
# eagle-llm of .gpu-wheels/site first on PYTHONPATH and runs scripts/gpu_smoke.py (exit 1: a check failed;
# the JSON report is written either way).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${GPU_WHEELS:-.gpu-wheels}
if [ $# -lt 1 ]; then
  echo "error: usage: bash scripts/gpu_smoke.sh REPORT.json [--families NAME,...]" >&2
  exit 2
fi
if [ ! -d "$W/wheels" ] || [ ! -d "$W/site/eagle" ]; then
  echo "error: $W/wheels or $W/site/eagle is missing; run bash scripts/gpu_prepare.sh on the build machine and carry $W" >&2
  exit 2
fi
out=$1
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ppow-site "$W"/wheels/*.whl
export PYTHONPATH="$PWD/$W/site:/tmp/ppow-site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 scripts/gpu_smoke.py --out "$out" "$@"
