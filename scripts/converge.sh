#!/usr/bin/env bash
# Issue 28, step 1: is a start converged? Continue its SFT for a fixed budget, then compare start and
# continued drafter with paired intervals on the tuning prompts, MT-Bench and HumanEval.
#
#   scripts/converge.sh START_DRAFTER_DIR eagle1|eagle3 OUT        # DRY=1 only validates and prints
#
# Budget: STEPS steps (default: what 60 uncontended minutes gave when the start itself was trained:
# 14 400 for EAGLE-1, 2 420 for EAGLE-3, docs/results.md §1b and §1c). A step budget, not a wall-time
# one, so that other work on the machine cannot make the start look converged by starving its run;
# the run's wall time is in OUT/sft/metrics.jsonl. MINUTES=N instead: a time budget, N minutes of training
# (run.max_minutes, the cosine decaying over them: optim.decay_over=minutes), exactly arm 1 of
# scripts/arms.sh at MINUTES=N, so that the round that shows its start converged is linked as arm 1
# (arms.sh CST_FROM); the machine's other load then sets its steps: keep it as the arms will have it.
# The recipe's SFT loss and schedule: one cycle of lr LR (3e-4) with SCHEDULE (cosine, to 0 at the budget's
# end) after WARMUP steps (100), arm 1 of scripts/arms.sh.
# The first round (docs/results.md §8) ran LR=5e-5 SCHEDULE=constant WARMUP=0, as the -long drafters were
# trained. One torch thread (THREADS), the committed generated answers. PROBE_EVERY=N: a τ probe (16 held-out
# ShareGPT prompts) at the start and every N steps (default: none); every step logs grad_cos_prev
# (run.grad_cosine).
# Resumable: rerun the same command; training resumes from its newest checkpoint, finished
# evaluations are kept (OUT/cmp-*/compare.md).
# Evaluation: `ppow compare --simulate START OUT/sft/drafter`, T = 0, 128 new tokens, on the 48 tuning
# prompts (scripts/dev_prompts.py), MT-Bench 80 and HumanEval 164; paired 95 % intervals in compare.md
# and each report's JSON. "Converged" (issue 28): gain < +1 % with an interval covering 0.
set -euo pipefail
cd "$(dirname "$0")/.."
START=${1:?usage: scripts/converge.sh START_DRAFTER_DIR eagle1|eagle3 OUT}
FAMILY=${2:?family: eagle1 or eagle3}
OUT=${3:?OUT: the output dir}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-1}
LR=${LR:-3.0e-4} SCHEDULE=${SCHEDULE:-cosine} WARMUP=${WARMUP:-100}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
DATA=assets/generated/smollm2-135m-sharegpt-2048
RECIPE=recipes/smollm2/135M_${FAMILY}_sft_generated.yaml
. scripts/arms_lib.sh
family_settings "$FAMILY"
STEPS=${STEPS:-$RATE_cst}; SAVE=$(( STEPS / 12 > 0 ? STEPS / 12 : 1 ))
BUDGET="run.max_steps=$STEPS run.max_minutes=600"
if [ -n "${MINUTES:-}" ]; then
  BUDGET="$NO_STEP_CAP run.max_minutes=$MINUTES"
  [ "$SCHEDULE" = constant ] || BUDGET="$BUDGET optim.decay_over=minutes"
fi
ARGS="model.drafter=$START data.path=$DATA optim.lr=$LR optim.schedule=$SCHEDULE optim.warmup_steps=$WARMUP
      $BUDGET run.save_every=$SAVE run.output_dir=$OUT/sft
      eval.benchmarks=[sharegpt] eval.every_prompts=16 eval.max_new_tokens=128 eval.every_steps=${PROBE_EVERY:-0}
      run.grad_cosine=true $SFT_LOSS"
ppow validate "$RECIPE" $ARGS > /dev/null
[ "${DRY:-0}" = 1 ] && { echo "DRY=1: config valid: ppow sft $RECIPE" $ARGS; exit 0; }
mkdir -p "$OUT"
[ -f "$OUT/dev-prompts.jsonl" ] || $PY scripts/dev_prompts.py "$OUT/dev-prompts.jsonl" 48

if [ ! -f "$OUT/sft/drafter/model.safetensors" ]; then
  resume=""; ls "$OUT"/sft/checkpoints/step-* > /dev/null 2>&1 && resume="run.resume=true"
  echo "+ ppow sft $RECIPE" $ARGS $resume
  ppow sft "$RECIPE" $ARGS $resume
fi

cmp() {  # cmp NAME compare-args...
  local name=$1; shift
  [ -f "$OUT/cmp-$name/compare.md" ] && return 0
  echo "+ ppow compare --simulate $START $OUT/sft/drafter --names start,cont-sft $*"
  ppow compare --simulate "$START" "$OUT/sft/drafter" --names start,cont-sft --max-new-tokens 128 \
    --out "$OUT/cmp-$name" --force "$@"
}
cmp tuning48 --prompts "$OUT/dev-prompts.jsonl"
cmp mt_bench80 --benchmarks mt_bench --num-prompts 80
cmp humaneval164 --benchmarks humaneval --num-prompts 164
for f in "$OUT"/cmp-*/compare.md; do echo "== $f"; cat "$f"; done
