# Shared by scripts/headline.sh, scripts/arms.sh and scripts/converge.sh (sourced, not run): the per-family
# settings, training runs at equal wall time, JOBS at a time, resumable, and the simulated comparison. The
# caller sets PY (and, for train_arm and queue, OUT, MIN and JOBS) before sourcing, and defines its arms.

ppow() { $PY -m ppow_plugin.cli "$@"; }
# The step limit of a run that run.max_minutes ends (time-bounded arms, converge.sh's MINUTES rounds): one no
# run reaches, so the recipe's own run.max_steps cannot end it first.
NO_STEP_CAP=run.max_steps=1000000

# family_settings eagle1|eagle3: the per-family settings scripts/converge.sh and scripts/arms.sh share.
# SFT_LOSS: the start's own SFT loss (continued SFT); DEEP: arm 2's multi-depth SFT; PPOW_SFT: arm 4's SFT term;
# RATE_cst / RATE_deep / RATE_ppow: steps per training hour, one thread (converge.sh's budget is RATE_cst).
family_settings() {
  case $1 in
    eagle1) SFT_LOSS="sft.vocab_rows=4096"; DEEP="sft.vocab_rows=4096 sft.multi_step=4"; PPOW_SFT=""
            RATE_cst=14400; RATE_deep=2000; RATE_ppow=400 ;;
    eagle3) SFT_LOSS="sft.ttt_steps=4 model.draft_vocab_size=null data.num_conversations=2048"
            DEEP="sft.ttt_steps=8 model.draft_vocab_size=null data.num_conversations=2048"; PPOW_SFT="sft.ttt_steps=4"
            RATE_cst=2420; RATE_deep=1200; RATE_ppow=1500 ;;
    *) echo "error: family must be eagle1 or eagle3, not '$1'" >&2; exit 2 ;;
  esac
}

# validate_all < LINES: `ppow validate LINE` for every line ("[--no-path-check] RECIPE OVERRIDE...", one arm
# each), in one Python process (one start-up, not one per arm); echoes each, fails naming the first that
# does not validate (with ppow's error line).
validate_all() {
  $PY -c '
import contextlib, io, sys
from ppow_plugin import cli
for line in sys.stdin.read().splitlines():
    print("+ ppow validate " + line, flush=True)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = cli.main(["validate", *line.split()])
    if rc != 0:
        sys.exit(err.getvalue().strip() + "\nerror: the arm above does not validate")
'
}

# newest_step RUN_DIR: the step of the newest checkpoint (checkpoints/step-NNNNNN), or nothing.
newest_step() {
  local last
  last=$(ls -d "$1"/checkpoints/step-?????? 2> /dev/null | sort | tail -n 1)
  [ -n "$last" ] && echo $((10#${last##*step-}))
  return 0
}

# train_arm NAME SUBCMD RECIPE OVERRIDE...: `ppow SUBCMD RECIPE OVERRIDE...` in $OUT/NAME for MIN minutes of
# training time in all (NO_STEP_CAP unless an OVERRIDE sets run.max_steps; the τ probe's time excluded, as
# run.max_minutes does). Skipped when its drafter exists; an interrupted run resumes from its newest checkpoint
# with run.resume=true (run.max_minutes is the run's budget: the checkpoint carries its training time).
# Appends to $OUT/NAME.log; echoes the command.
train_arm() {
  local name=$1 sub=$2 recipe=$3 dir=$OUT/$1 resume="" 
  shift 3
  if [ -d "$dir/drafter" ]; then echo "= $name: done, $dir/drafter"; return 0; fi
  [ -n "$(newest_step "$dir")" ] && resume=run.resume=true
  case " $* " in *" run.max_steps="*) ;; *) set -- "$@" $NO_STEP_CAP ;; esac
  echo "+ ppow $sub $recipe $* run.output_dir=$dir run.max_minutes=$MIN $resume"
  ppow "$sub" "$recipe" "$@" "run.output_dir=$dir" "run.max_minutes=$MIN" $resume >> "$OUT/$name.log" 2>&1
}

# queue CMD ARG...: run CMD in the background once fewer than JOBS queued commands run; `wait` drains them.
queue() {
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  "$@" &
}

# train_all ARM...: `train_one ARM` (the caller's) for each, JOBS at a time; fails naming every arm that left
# no drafter (its log is $OUT/ARM.log).
train_all() {
  local arm failed=""
  for arm in "$@"; do queue train_one "$arm"; done
  wait || true
  for arm in "$@"; do [ -d "$OUT/$arm/drafter" ] || failed="$failed $arm"; done
  [ -z "$failed" ] || { echo "error: no drafter from:$failed; see $OUT/<arm>.log" >&2; return 1; }
}

# compare_into DIR DRAFTER_DIR,DRAFTER_DIR... NAMES COMPARE-ARG...: `ppow compare` into DIR (the first drafter is
# the paired reference; its output goes to DIR.log), skipped when DIR/compare.md exists.
compare_into() {
  local dir=$1 drafters=$2 names=$3
  shift 3
  [ -f "$dir/compare.md" ] && { echo "= $dir: done"; return 0; }
  echo "+ ppow compare ${drafters//,/ } --names $names $* --out $dir --force"
  ppow compare ${drafters//,/ } --names "$names" "$@" --out "$dir" --force > "$dir.log" 2>&1 ||
    { echo "error: ppow compare into $dir failed; see $dir.log" >&2; return 1; }
}
