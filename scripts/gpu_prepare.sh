#!/usr/bin/env bash
# Prepare here what the GPU machine lacks (../shared/reference/gpu-machine.md: Python 3.12, torch, transformers,
# accelerate, msgpack, ninja, psutil, py-cpuinfo are there; deepspeed, eagle-llm, hjson, pydantic are not, nothing
# can be downloaded there, and there is no `patch` binary). Writes, under OUT (default .gpu-wheels, git-ignored):
#   wheels/  Python 3.12 wheels: DeepSpeed 0.19.8 built here as a pure-Python wheel (DS_BUILD_OPS=0; it is
#            published as a source archive only) and the dependencies of it the image lacks (hjson, pydantic with
#            its binary pydantic-core at the versions installed here, annotated-types, typing-inspection, einops)
#   site/    eagle-llm 1.2.1 (a py3 wheel) installed without its dependencies and patched here (`ppow patch apply`
#            with the host found first on PYTHONPATH), so nothing is patched on the GPU machine
# On the GPU machine (carry OUT):
#   python -m pip install --no-deps --target /tmp/ppow-site OUT/wheels/*.whl
#   export PYTHONPATH=$PWD/OUT/site:/tmp/ppow-site:$PWD
#
#   bash scripts/gpu_prepare.sh [OUT]
# Not yet exercised on the GPU machine (issue 26: no GPU was lent); scripts/gpu_smoke.py is what uses it (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpu-wheels}
PY=${PYTHON:-.venv/bin/python}
rm -rf "$OUT"
mkdir -p "$OUT/wheels"
versions=$("$PY" -c "import importlib.metadata as m; print(' '.join(f'{p}=={m.version(p)}' for p in ('pydantic', 'pydantic-core')))")
# shellcheck disable=SC2086  # $versions is two words on purpose
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d "$OUT/wheels" $versions hjson annotated-types typing-inspection einops
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT/wheels" deepspeed==0.19.8
"$PY" -m pip install --quiet --no-deps --target "$OUT/site" eagle-llm==1.2.1
PYTHONPATH="$PWD/$OUT/site:$PWD" "$PY" -m ppow_plugin.cli patch apply
PYTHONPATH="$PWD/$OUT/site:$PWD" "$PY" -c "
import ppow_plugin.host.patching as p, sys
s = p.patch_status()
assert s.state == 'patched' and str(s.package_dir).startswith('$PWD/$OUT/site'), s
"
find "$OUT" -name __pycache__ -prune -exec rm -rf {} +  # 0.8 MB the GPU machine rebuilds: it travels (64 MiB a call)
ls -l "$OUT/wheels"
du -sh "$OUT"
