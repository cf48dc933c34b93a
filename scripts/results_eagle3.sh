#!/usr/bin/env bash
# Reproduces docs/results.md §5: EAGLE-3 SFT then PPOW on the embedded default, and tau of all four drafters
# (EAGLE-1 SFT/PPOW, EAGLE-3 SFT/PPOW) with one protocol: the 80 MT-Bench first turns, T=0, 32 new tokens.
# Needs scripts/results.sh run first for the EAGLE-1 PPOW drafter (runs/results/ppow/drafter).
# Knobs: SFT3_STEPS (330), SFT3_MINUTES (45), PPOW_MINUTES (10), EVAL80_TOKENS (32).
# Run it alone: several torch processes on 2 cores oversubscribe threads and run 10x slower.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=runs/results
SFT1=assets/drafters/smollm2-135m-eagle1-sft
if [ ! -f "$SFT1/model.safetensors" ]; then  # retired from the tree (issue 26): weights in git history
  echo "error: $SFT1 is retired; restore its weights with: $(grep -m1 '^ *git checkout' "$SFT1/RETIRED.md" | sed 's/^ *//')" >&2
  exit 2
fi
TOKENS=${EVAL80_TOKENS:-32}
mkdir -p "$OUT"
# HEAVY_LOCK=<file>: take this flock around each step (to queue with other heavy jobs on a shared machine).
step() { echo "+ $*"; ${HEAVY_LOCK:+flock "$HEAVY_LOCK"} /usr/bin/time -f "  wall %e s, peak RSS %M KB" "$@"; }

# 1. EAGLE-3 SFT from scratch (training-time test, 7 steps), cosine over SFT3_STEPS, capped in wall time.
[ -d "$OUT/eagle3-sft/drafter" ] || step $BIN/ppow sft recipes/smollm2/135M_eagle3_sft.yaml \
  "run.output_dir=$OUT/eagle3-sft" "run.max_steps=${SFT3_STEPS:-330}" "run.max_minutes=${SFT3_MINUTES:-45}"

# 2. PPOW from it, the same budget and lr as the EAGLE-1 PPOW run of scripts/results.sh.
[ -d "$OUT/eagle3-ppow/drafter" ] || step $BIN/ppow train recipes/smollm2/135M_eagle3_ppow.yaml \
  "model.drafter=$OUT/eagle3-sft/drafter" "run.output_dir=$OUT/eagle3-ppow" run.max_steps=100000 \
  "run.max_minutes=${PPOW_MINUTES:-10}" run.save_every=50

# 3. tau on the 80 MT-Bench first turns for every drafter (EAGLE-1: host static tree; EAGLE-3: dynamic tree 7/10/60).
# The EAGLE-1 SFT measurement of scripts/results.sh is this same command; reuse it when present.
[ -d "$OUT/sft-mtbench80" ] && [ ! -e "$OUT/mtbench80-eagle1-sft" ] && ln -s sft-mtbench80 "$OUT/mtbench80-eagle1-sft"
for pair in "eagle1-sft:$SFT1" "eagle1-ppow:$OUT/ppow/drafter" "eagle3-sft:$OUT/eagle3-sft/drafter" \
            "eagle3-ppow:$OUT/eagle3-ppow/drafter"; do
  name=${pair%%:*}; dir=${pair#*:}
  [ -d "$OUT/mtbench80-$name" ] || step $BIN/ppow eval --drafter "$dir" --benchmarks mt_bench --num-prompts 80 \
    --max-new-tokens "$TOKENS" --temperature 0 --out "$OUT/mtbench80-$name"
done
for name in eagle1-sft eagle1-ppow eagle3-sft eagle3-ppow; do echo "== $name"; cat "$OUT/mtbench80-$name/summary.md"; done
