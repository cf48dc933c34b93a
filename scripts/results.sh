#!/usr/bin/env bash
# Reproduces the numbers in docs/results.md on the embedded default (SmolLM2-135M-Instruct, CPU).
# Each step prints its command; outputs go under runs/results/. Total ~1 h on 2 otherwise idle cores.
# Knobs: PPOW_MINUTES (wall time of the PPOW run and of the continued-SFT control, default 12),
#        PROMPTS (per benchmark in the comparison, default 10), TOKENS (new tokens per prompt, 64),
#        EVAL80_TOKENS (new tokens per prompt for the 80-prompt SFT measurement, default TOKENS).
# Run it alone: several torch processes on 2 cores oversubscribe threads and run 10x slower.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=runs/results
SFT=assets/drafters/smollm2-135m-eagle1-sft
if [ ! -f "$SFT/model.safetensors" ]; then  # retired from the tree (issue 26): weights in git history
  echo "error: $SFT is retired; restore its weights with: $(grep -m1 '^ *git checkout' "$SFT/RETIRED.md" | sed 's/^ *//')" >&2
  exit 2
fi
MIN=${PPOW_MINUTES:-12}
PROMPTS=${PROMPTS:-10}
TOKENS=${TOKENS:-64}
EVAL80_TOKENS=${EVAL80_TOKENS:-$TOKENS}
mkdir -p "$OUT"
step() { echo "+ $*"; /usr/bin/time -f "  wall %e s, peak RSS %M KB" "$@"; }

# 1. tau of the committed SFT drafter on the 80 MT-Bench first turns (held out from training), T=0.
[ -d "$OUT/sft-mtbench80" ] || step $BIN/ppow eval --drafter "$SFT" --benchmarks mt_bench --num-prompts 80 \
  --max-new-tokens "$EVAL80_TOKENS" --temperature 0 --out "$OUT/sft-mtbench80"

# 2. PPOW step cost vs an SFT step on the same sequences, and peak memory.
step $BIN/python benchmarks/ppow_step_cost.py --drafter "$SFT" | tee "$OUT/step_cost.txt"

# 3. gamma on this machine.
step $BIN/ppow profile --drafter "$SFT" --repeats 5 --out "$OUT/profile.json" | tee "$OUT/profile.txt"

# 4. PPOW from the SFT drafter, then continued SFT (CST) for the same wall time, same lr.
[ -d "$OUT/ppow/drafter" ] || step $BIN/ppow train recipes/smollm2/135M_eagle1_ppow.yaml "model.drafter=$SFT" \
  "run.output_dir=$OUT/ppow" run.max_steps=100000 "run.max_minutes=$MIN" run.save_every=50
[ -d "$OUT/cst/drafter" ] || step $BIN/ppow sft recipes/smollm2/135M_eagle1_sft.yaml "model.drafter=$SFT" \
  "run.output_dir=$OUT/cst" run.max_steps=100000 "run.max_minutes=$MIN" optim.lr=5.0e-5 optim.schedule=constant \
  optim.warmup_steps=0 run.save_every=100

# 5. One protocol for all three: MT-Bench + HumanEval, T=0 and T=1.
for T in 0 1; do
  [ -d "$OUT/compare-t$T" ] || step $BIN/ppow compare "$SFT" "$OUT/cst/drafter" "$OUT/ppow/drafter" \
    --names sft,cst,ppow --benchmarks mt_bench,humaneval --num-prompts "$PROMPTS" --max-new-tokens "$TOKENS" \
    --temperature "$T" --out "$OUT/compare-t$T"
done
cat "$OUT"/compare-t0/compare.md "$OUT"/compare-t1/compare.md
