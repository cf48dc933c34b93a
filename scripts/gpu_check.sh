#!/usr/bin/env bash
# The GPU path, exercised end to end: tiny and SmolLM2-135M runs of `ppow sft`, `ppow train` (DeepSpeed
# ZeRO-2, bf16), `ppow eval`, `ppow profile` (CUDA timings synchronised) and `ppow export`, once in one
# process and once under `torchrun --nproc_per_node 1`. Fails loudly (exit 1, the offending log lines) on a
# non-zero exit, on any device or dtype mismatch message in a log, or when training did not run on CUDA
# in bf16. Prints per-step times (from two run lengths, so setup cancels) and tau.
#
# Run:   bash scripts/gpu_check.sh                 (needs a CUDA GPU, .venv from `make setup`, `ppow prepare`)
#        PPOW_GPU_CHECK_DRY=1 bash scripts/gpu_check.sh   (CPU dry run: fp32, torch engine, tiny only)
# Both drafter kinds: EAGLE-1 (host layout and compact exports) and EAGLE-3 (eagle3 export), from the
# SmolLM2 recipes with the target, data, device and dtype overridden.
# Knobs: PPOW_GPU_CHECK_OUT (default runs/gpu-check, must not exist), PPOW_GPU_CHECK_STEPS (10),
#        PPOW_GPU_CHECK_KINDS ("eagle1 eagle3").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PPOW_PYTHON:-.venv/bin/python}
OUT=${PPOW_GPU_CHECK_OUT:-runs/gpu-check}
STEPS=${PPOW_GPU_CHECK_STEPS:-10}
DRY=${PPOW_GPU_CHECK_DRY:-0}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# device or dtype trouble that does not always end the process
MISMATCH='Expected all tensors to be on the same device|found at least two devices|device-side assert|Expected .*(dtype|scalar type)|dtype mismatch|must have the same dtype|Input type \(.*\) and weight type|UserError: dist\.device'

die() { echo "gpu_check: FAIL: $*" >&2; exit 1; }

if [ -e "$OUT" ]; then echo "error: $OUT exists; remove it or set PPOW_GPU_CHECK_OUT" >&2; exit 2; fi
mkdir -p "$OUT"
if [ "$DRY" = 1 ]; then
  DEVICE=cpu DTYPE=fp32 ENGINE=torch SIZES="tiny" LAUNCHERS="python"
else
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
    || die "no CUDA device visible to torch (set PPOW_GPU_CHECK_DRY=1 for the CPU dry run)"
  DEVICE=cuda DTYPE=bf16 ENGINE=deepspeed SIZES="tiny smollm2" LAUNCHERS="python torchrun"
  "$PY" -c 'import torch; print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| cuda", torch.version.cuda)'
fi

# run NAME LAUNCHER ppow-args...: one CLI command, logged; fails on exit status or a mismatch message
run() {
  local name=$1 launcher=$2; shift 2
  local log="$OUT/$name.log" start end
  start=$(date +%s.%N)
  if [ "$launcher" = torchrun ]; then
    set -- "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m ppow_plugin.cli "$@"
  else
    set -- "$PY" -m ppow_plugin.cli "$@"
  fi
  if ! "$@" >"$log" 2>&1; then tail -n 40 "$log" >&2; die "$name exited non-zero (log: $log)"; fi
  end=$(date +%s.%N)
  if grep -En "$MISMATCH" "$log" >&2; then die "$name: device/dtype mismatch above (log: $log)"; fi
  echo "$name: $(echo "$end - $start" | bc) s"
  LAST_SECONDS=$(echo "$end - $start" | bc)
}

# check_run DIR: the trainer recorded the device and dtype it was asked for, and finite metrics
check_run() {
  "$PY" - "$1" "$DEVICE" "$DTYPE" <<'EOF'
import json, math, sys
from pathlib import Path
run, device, dtype = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
metas = [run / "drafter" / "ppow_meta.json", *sorted(run.glob("checkpoints/*/meta.json"))]
cfg = next((json.loads(m.read_text()).get("config", {}).get("dist") for m in metas if m.exists()), None) or {}
if cfg.get("device", device) not in (device, "auto") or cfg.get("dtype", dtype) != dtype:
    sys.exit(f"gpu_check: FAIL: {run} trained with dist {cfg}, expected device {device} dtype {dtype}")
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
bad = [r for r in rows if not math.isfinite(float(r.get("loss", "nan")))]
if not rows or bad:
    sys.exit(f"gpu_check: FAIL: {run}: {len(rows)} metric rows, {len(bad)} with a non-finite loss")
keys = [k for k in ("loss", "accept_len", "tau_est", "top1_acc") if k in rows[-1]]
print(f"  {run.name}: last step " + ", ".join(f"{k} {rows[-1][k]:.4g}" for k in keys))
EOF
}

# target + data per size
"$PY" - "$OUT" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
import tiny
out = Path(sys.argv[1])
tiny.make_target(out / "tiny-target")
tiny.make_conversations(out / "convs.jsonl", n=24)
EOF
target_of() { if [ "$1" = tiny ]; then echo "$OUT/tiny-target"; else "$PY" -m ppow_plugin.cli prepare | sed -n 's/^target ready: //p'; fi; }

for size in $SIZES; do
  TARGET=$(target_of "$size")
  COMMON=("model.target=$TARGET" "data.dataset=jsonl" "data.path=$OUT/convs.jsonl" "data.max_len=128"
          "data.heldout_fraction=0.0" "dist.device=$DEVICE" "dist.dtype=$DTYPE" "dist.target_dtype=$DTYPE"
          "dist.engine=$ENGINE" "dist.zero_stage=2" "run.save_every=1000" "run.log_every=1" "optim.grad_accum=1")
  for kind in ${PPOW_GPU_CHECK_KINDS:-eagle1 eagle3}; do
  [ "$kind" = eagle1 ] && FORMATS="eagle1 eagle1-compact" || FORMATS="eagle3 speculators"
  KIND_ARGS=()  # the tiny target's vocabulary (128) is smaller than the recipe's draft vocabulary
  if [ "$kind" = eagle3 ] && [ "$size" = tiny ]; then KIND_ARGS=("model.draft_vocab_size=64"); fi
  for launcher in $LAUNCHERS; do
    tag="$size-$kind-$launcher"
    echo "== $tag: target $TARGET, device $DEVICE, $DTYPE, engine $ENGINE"
    run "sft-$tag" "$launcher" sft "recipes/smollm2/135M_${kind}_sft.yaml" "${COMMON[@]}" "${KIND_ARGS[@]}" \
      "run.max_steps=$STEPS" "run.output_dir=$OUT/sft-$tag"
    check_run "$OUT/sft-$tag"
    SFT_DRAFTER="$OUT/sft-$tag/drafter"
    run "train2-$tag" "$launcher" train "recipes/smollm2/135M_${kind}_ppow.yaml" "${COMMON[@]}" \
      "model.drafter=$SFT_DRAFTER" "run.max_steps=2" "run.output_dir=$OUT/train2-$tag"
    short=$LAST_SECONDS
    run "train-$tag" "$launcher" train "recipes/smollm2/135M_${kind}_ppow.yaml" "${COMMON[@]}" \
      "model.drafter=$SFT_DRAFTER" "run.max_steps=$STEPS" "run.output_dir=$OUT/train-$tag"
    check_run "$OUT/train-$tag"
    # (STEPS - 2) extra steps, so setup cancels (on a loaded CPU the difference is noise)
    echo "  PPOW step time ($tag): $(echo "scale=3; ($LAST_SECONDS - $short) / ($STEPS - 2)" | bc) s/step"
    run "eval-$tag" python eval --drafter "$OUT/train-$tag/drafter" --target "$TARGET" \
      --benchmarks mt_bench --num-prompts 3 --max-new-tokens 32 --out "$OUT/eval-$tag"
    "$PY" - "$OUT/eval-$tag/report.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))["stats"]["overall"]
print(f"  tau {s['tau']:.3f} over {s['prompts']} prompts ({s['cycles']} cycles)")
EOF
    run "profile-$tag" python profile --target "$TARGET" --drafter "$OUT/train-$tag/drafter" --repeats 3 \
      --prefix-len 64 --tree-sizes 1,8,26 --out "$OUT/profile-$tag.json"
    "$PY" - "$OUT/profile-$tag.json" "$DEVICE" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1]))
if not p["settings"]["device"].startswith(sys.argv[2]):
    sys.exit(f"gpu_check: FAIL: profile ran on {p['settings']['device']}, expected {sys.argv[2]}")
print(f"  gamma {p['gamma']:.3f}: drafter step {p['drafter_step_s']['mean'] * 1e3:.2f} ms, "
      f"target step {p['target_step_s']['mean'] * 1e3:.2f} ms ({p['settings']['device']})")
EOF
    for fmt in $FORMATS; do
      run "export-$fmt-$tag" python export "$OUT/train-$tag" "$OUT/export-$fmt-$tag" --format "$fmt" --target "$TARGET"
    done
  done
  done
done
echo "gpu_check: OK ($OUT)"
