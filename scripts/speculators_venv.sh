#!/usr/bin/env bash
# Build the separate venv the opt-in real-library export test uses (tests/test_export_speculators.py).
#
#   bash scripts/speculators_venv.sh [VENV_DIR]        # default /work/venvs/speculators
#   PPOW_SPECULATORS_PYTHON=VENV_DIR/bin/python pytest -q tests/test_export_speculators.py
#
# speculators pins transformers <= 5.19 while the project runs a newer one, so it cannot share .venv.
# torch is installed first, alone, so pip takes the CPU wheel (a local wheel where one is offered) and does
# not pull a CUDA build in as speculators' dependency.
set -euo pipefail
VENV=${1:-/work/venvs/speculators}
PY=${PYTHON:-python3}
SPECULATORS_VERSION=${SPECULATORS_VERSION:-0.9.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install -q "speculators==$SPECULATORS_VERSION" "torch==$TORCH_VERSION"
# speculators lists torchvision and torchaudio; the registry's wheels of them are CUDA builds that fail to load
# beside a CPU torch ("operator torchvision::nms does not exist"), and transformers then cannot import
# PreTrainedModel. Its EAGLE-3 code uses neither, and transformers imports torchvision only when installed.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio
"$VENV/bin/python" -c "from speculators import SpeculatorModel"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
print("speculators", md.version("speculators"), "| transformers", md.version("transformers"), "| torch", md.version("torch"))
PY
