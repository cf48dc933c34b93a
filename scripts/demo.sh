#!/usr/bin/env bash
# The README's main job, end to end on the embedded default (SmolLM2-135M-Instruct on CPU):
#   committed SFT drafter -> short PPOW run -> before/after evaluation -> export for the EAGLE host,
#   then the committed SFT and PPOW drafters' before/after table on every prompt (measured once, with its command).
#   and the converged EAGLE-3 start's table (start, continued SFT, PPOW; docs/results/arms-e3, issue 28).
# Run via `make demo` (which builds .venv and prepares the target first). ~10 min on 2 idle cores.
# Knobs: PPOW_DEMO_OUT (default runs/demo), PPOW_DEMO_STEPS (20), PPOW_DEMO_PROMPTS (5 per benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=${PPOW_DEMO_OUT:-runs/demo}
STEPS=${PPOW_DEMO_STEPS:-20}
PROMPTS=${PPOW_DEMO_PROMPTS:-5}
SFT=assets/drafters/smollm2-135m-eagle1-sft-gen  # the PPOW recipe's committed EAGLE-1 start (docs/results.md §1b)
PPOW=assets/drafters/smollm2-135m-eagle1-ppow    # the best committed PPOW drafter (docs/results.md §4)

if [ ! -f "$SFT/model.safetensors" ]; then
  echo "error: the committed SFT drafter $SFT is missing; train one with: $BIN/ppow sft recipes/smollm2/135M_eagle1_sft_generated.yaml" >&2
  exit 2
fi
if [ ! -f "$PPOW/before_after.md" ]; then
  echo "error: the committed PPOW drafter's table $PPOW/before_after.md is missing; restore it with: git checkout -- $PPOW" >&2
  exit 2
fi
CONVERGED=docs/results/arms-e3/before_after.md  # issue 28: the converged EAGLE-3 start, arm 1 and the best PPOW arm
if [ ! -f "$CONVERGED" ]; then
  echo "error: the converged-start table $CONVERGED is missing; restore it with: git checkout -- $CONVERGED" >&2
  exit 2
fi
if [ -e "$OUT" ]; then
  echo "error: $OUT exists; remove it or set PPOW_DEMO_OUT to a new directory" >&2
  exit 2
fi

echo "== 1/3 PPOW: $STEPS steps from $SFT"
$BIN/ppow train recipes/smollm2/135M_eagle1_ppow.yaml "model.drafter=$SFT" "run.output_dir=$OUT/ppow" \
  "run.max_steps=$STEPS" "run.save_every=$STEPS"

echo "== 2/3 evaluation: SFT start vs PPOW, $PROMPTS MT-Bench + $PROMPTS HumanEval prompts, T=0"
$BIN/ppow compare "$SFT" "$OUT/ppow/drafter" --names sft,ppow --benchmarks mt_bench,humaneval \
  --num-prompts "$PROMPTS" --max-new-tokens 64 --out "$OUT/compare"

echo "== 3/3 export for the EAGLE-1 host"
$BIN/ppow export "$OUT/ppow" "$OUT/export-eagle1" --format eagle1

echo
echo "Before/after (also in $OUT/compare/compare.md):"
cat "$OUT/compare/compare.md"
echo
echo "Exported drafter: $OUT/export-eagle1 (config.json + pytorch_model.bin, loads in eagle's EaModel)"
echo
echo "The committed drafters on every prompt ($PPOW/before_after.md; its command re-measures it, ~25 min cold):"
cat "$PPOW/before_after.md"
echo
echo "From a converged start (EAGLE-3 after six continued-SFT rounds; docs/results.md §4): the start, 60 min of"
echo "continued SFT (cst) and 60 min of PPOW (dense), simulated τ at T = 0, 128 new tokens, change vs the start:"
cat "$CONVERGED"
