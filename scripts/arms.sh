#!/usr/bin/env bash
# Issue 28's experiment for one family: from a converged SFT start, at equal training wall time (MINUTES each,
# THREADS torch threads each, JOBS runs side by side on the same cores), continued SFT against PPOW and the
# controls that separate the reward from multi-depth training; arms 1, 3, 4 also from the non-converged
# `-sft-gen` start. One resumable command per family:
#
#   scripts/arms.sh START eagle1|eagle3 OUT          # DRY=1: validate every arm's config, print, run nothing
#
# START: the converged start (scripts/converge.sh shows it converged; the committed drafter, or a run's
# drafter dir). Resumable: rerun the same command. A finished arm (OUT/ARM/drafter) is skipped; an
# interrupted one resumes from its newest checkpoint with run.resume=true and the training minutes it has
# left (scripts/arms_lib.sh); a finished evaluation (OUT/<cmp>/compare.md) is kept. Every command is echoed;
# each arm's output is OUT/ARM.log, each compare's OUT/<cmp>.log.
#
# Knobs: RUNS     arms to run (default all below)           MINUTES  training minutes per arm (default 60)
#        JOBS     arms (and compares) side by side (2)      THREADS  torch threads per process (1)
#        MEM_GB_PER_JOB  memory one run needs (5: an EAGLE-3 arm's measured peak); JOBS beyond what the machine's
#                 available memory holds is refused before any work
#        GEN_START  the non-converged start (assets/drafters/smollm2-135m-<family>-sft-gen)
#        CST_LR   continued-SFT lr (3e-4, the SFT recipes')
#        CST_SCHEDULE  cosine (default): arms 1-2 as one cycle of the SFT recipes' schedule (100 warm-up steps,
#                 cosine to 0) over their MINUTES of training time (optim.decay_over=minutes, as the PPOW arms:
#                 every arm trains its whole hour; a step budget from the rates below ended arm 1 after ~36 of its
#                 60 minutes on free cores): `MINUTES=60 scripts/converge.sh`'s run, the stronger
#                 control (docs/results.md §8: +6.5 % / +4.3 % on MT-Bench in an hour against +4.7 % / +1.7 % at
#                 5e-5 constant); constant: lr CST_LR (then 5e-5, as the -long drafters) without warm-up
#        TUNE_LRS lr candidates of arms 3 and 4 ("" = the recipe's 5e-6; TUNE_LRS_dense, TUNE_LRS_expected for one
#                 arm; defaults: dense "5.0e-6 2.0e-5 5.0e-5", expected "5.0e-6 5.0e-5 3.0e-4", up to the SFT
#                 recipes' lr since arm 4 carries the SFT loss), each trained TUNE_MIN minutes (15) from START with
#                 PPOW_SCHEDULE over those minutes and compared on the tuning prompts (OUT/tuning-lr-ARM); the
#                 higher τ is the arm's lr (OUT/lr-ARM.txt), also for the ablations of it and its gen_ arm.
#                 LR_dense / LR_expected set one directly (no tuning runs for that arm). STOP_AFTER=tune stops there.
#        PPOW_SCHEDULE  cosine (default): the PPOW arms' lr after the recipe's warm-up decays to 0 over their
#                 MINUTES by training time (optim.decay_over=minutes: every variant, whatever its step rate, ends
#                 its decay when its hour does, as arm 1's cosine does); constant: the recipe's constant lr
#        POSITIONS  PPOW window starts, `all` or N chosen by ADAW (all)   SFT_WEIGHT  arm 4's loss.sft_weight (1.0)
#        CST_FROM arm 1 already trained: a finished run dir, rounds.sh's last round (OUT/round-r/sft, the hour that
#                 showed START converged, run by `MINUTES=60 scripts/converge.sh`, arm 1's settings; PROBE_EVERY=
#                 RATE_cst/PROBES gives it arm 1's τ probes; a step-budget round is another config and is refused).
#                 Checked (the same resolved config as arm 1 but for eval.*, run.save_every, run.max_minutes,
#                 run.output_dir, run.resume, run.grad_cosine; model.drafter the same dir as START; trained <=
#                 MINUTES + 1 %: the step that crosses it), then linked as OUT/cst instead of training it again:
#                 one hour saved per family.
#        BEST     the PPOW arm the ablations modify, dense|expected (default: the higher τ on the tuning prompts);
#                 given, every arm of RUNS trains in one queue (all side by side when JOBS covers RUNS)
#        ADAW_STARTS  starts ADAW (or uniform) picks in the ADAW ablation pair (32)
#        PROBES   τ probes per arm during training (6, and one of the start; eval.every_steps from the rates below)
#        BENCHES  "mt_bench:80 humaneval:164 sharegpt:200"  PER_DEPTH  the benchmark given --per-depth (mt_bench)
#        TUNING   tuning prompts (48; scripts/dev_prompts.py)  REAL  prompts per benchmark, real decoding (10)
#        T1       prompts per benchmark, real decoding at T = 1 (0: not run; 20 for a ±4 % interval, below)
#
# Arms (the recipe of each family; START unless gen_; every arm: model.drafter, run.max_minutes, the τ probe
# on 16 held-out ShareGPT prompts, eval.every_steps; data = the committed 2048 generated answers). The probe's
# prompts are the first 16 of the ShareGPT evaluation set: a training curve only, nothing is chosen by it.
#  1 cst        continued SFT: recipes/smollm2/135M_<f>_sft_generated.yaml, CST_LR and CST_SCHEDULE,
#               the start's own SFT loss (EAGLE-1 sft.vocab_rows=4096; EAGLE-3 sft.ttt_steps=4, its 8192 draft
#               vocabulary): exactly `MINUTES=60 scripts/converge.sh`'s run. Controls: "does more of the same
#               training still help".
#  2 deep_sft   arm 1 + the SFT loss at every draft depth PPOW's window trains (K = rollout.window):
#               EAGLE-1 sft.multi_step=4 (HASS-style: depths 2..5 re-drafted from the drafter's own features,
#               1 + 4 = K = 5, the host tree's depth); EAGLE-3 sft.ttt_steps=8 instead of the start's 4 (its SFT
#               already unrolls the training-time test; the depth control is more TTT steps, up to K = 8 =
#               eval.tree_depth + 1). Controls: "is PPOW's gain just training the deeper positions".
#  3 dense      PPOW, the paper's sampled estimator (G windows, clipped group-relative update, KL to the
#               target), dense: rollout.positions=POSITIONS rollout.verify=data (dense rollouts read the
#               data-path unroll: config requires verify=data) data.feature_cache=true data.max_len=512 (the
#               SFT runs' feature cache) dist.engine=torch (plain AdamW, as the SFT arms). lr: tuned (TUNE_LRS),
#               decaying over the arm's minutes (PPOW_SCHEDULE).
#  4 expected   arm 3 + loss.estimator=expected loss.sft_weight=SFT_WEIGHT (EAGLE-3: the SFT term with
#               sft.ttt_steps=4, arm 1's loss). The exact expected window reward and the token loss in one step.
#  5 ablations of BEST (dense or expected, chosen on the tuning prompts after arms 1-4 unless BEST is set):
#    no_rdist   BEST + reward.proximity_weight=0
#    gamma_prof BEST + reward.gamma_profile=OUT/profile.json (`ppow profile --drafter START` on this machine)
#    adaw       BEST with rollout.positions=ADAW_STARTS: ADAW (windowing.rule=sample) picks the starts.
#    no_adaw    the same with windowing.rule=uniform. With POSITIONS=all every start is taken and ADAW picks
#               nothing, so "without ADAW" is measured as this pair at ADAW_STARTS starts (and adaw vs BEST
#               shows what choosing fewer starts does at equal time); with POSITIONS=N, adaw is BEST and is
#               not run, no_adaw = BEST + windowing.rule=uniform.
#  gen_cst, gen_dense, gen_expected: arms 1, 3, 4 from GEN_START (the regime of docs/results.md §4).
#
# Evaluation (after training; reference = the start, paired 95 % bootstrap intervals):
#  - `ppow compare --simulate START ARM/drafter... --names start,ARM... --temperature 0 --max-new-tokens 128
#    --recipe <the family's PPOW recipe>` on each of BENCHES (MT-Bench 80, HumanEval 164, ShareGPT 200),
#    PER_DEPTH's with --per-depth (top-1 / top-3 per draft depth), into OUT/sim-<bench>; the same for GEN_START
#    and the gen_ arms into OUT/gen-sim-<bench>.
#  - the tuning prompts: OUT/tuning-main (START + arms 1-4; picks BEST), OUT/tuning-ablations, OUT/gen-tuning.
#  - the start, arm 1 and BEST on the benchmarks only -> OUT/before_after.md (what `make demo` prints).
#  - against arm 1: scripts/paired.py table --reference cst over all compares -> OUT/vs-cst.md (and
#    OUT/vs-gen_cst.md); against the start -> OUT/vs-start.md (OUT/vs-gen_start.md); the per-depth table of
#    all arms -> OUT/per-depth.md (OUT/gen-per-depth.md).
#  - real decoding (`ppow compare` without --simulate, T = 0) of START and BEST on the first REAL prompts of
#    MT-Bench and HumanEval (2 x 10 = 20), OUT/real-t0; `scripts/paired.py agree` checks 0 mismatches and
#    cycles identical to the simulation.
#  - curves: `scripts/curves.py OUT/<arm>... --per-run OUT/curves` (one JSON and one PNG per arm).
#  - T1=N (default 0: not run): real decoding at T = 1 of START, arm 1 and BEST on the first N prompts of
#    MT-Bench and of HumanEval, OUT/real-t1-<bench>, paired table OUT/vs-start-t1.md (and both pooled). There
#    is no simulation at T = 1 and each drafter samples its own answers: docs/results.md §7's runs (3-4
#    prompts a benchmark) gave paired intervals ±9-10 % wide on 6 prompts, so ±4 % needs ~(10/4)^2 x 6 ≈ 40
#    prompts (T1=20): 3 drafters x 40 x ~70-95 s ≈ 2.5-3 h on one thread per family (half with JOBS=2).
#
# Cost on this 2-core machine, JOBS=2 THREADS=1 (the τ probe's time is on top of MINUTES):
#  feature cache (step 0b, once per machine): one target pass per sequence, ~1 s each on one core at max_len 512:
#    2048 EAGLE-3 sequences in ~15 min with JOBS=2 (measured 2026-12-07); a full cache is checked in ~1 min.
#  lr tuning: 2 arms x 3 lr x TUNE_MIN 15 min, 2 at a time: 45 min, + 2 tuning compares (4 drafters x 48).
#  training: 11 arms (4 main, then 4 ablations + 3 gen_) x 60 min, 2 at a time: 6 rounds = 6 h per family
#    (arms 1-4 first, so that BEST is known after 2 h); the τ probes add
#    6 x 16 prompts per arm: ~1 min per arm (EAGLE-3: ~11 min before the walked simulation), ~0.1 h in all.
#  evaluation: measured (2026-12-07, one thread, the two cores already busy with two training runs, load ~7):
#    `ppow compare --simulate assets/drafters/smollm2-135m-<f>-sft-gen assets/drafters/smollm2-135m-<f>-sft-gen-long
#    --names gen,long --benchmarks mt_bench --num-prompts 5 --max-new-tokens 128 --temperature 0 --recipe
#    recipes/smollm2/135M_<f>_ppow.yaml` (cached target continuations), twice each: EAGLE-1 23.0 / 17.9 s wall,
#    0.66-0.85 s per prompt and drafter + ~11 s start-up; EAGLE-3 86.7 / 155.3 s, 5.9-17.3 s per prompt and
#    drafter (7.0 s in the first run; docs/results.md §3: ~5 s uncontended).
#    Simulations: (9 drafters x 444 benchmark prompts) + (4 x 444) + 3 tuning compares (5 + 5 + 4 drafters x 48)
#    = 6 444 prompt-drafters, plus --per-depth on MT-Bench for 13 drafters x 80 prompts (~+3 s a prompt for
#    EAGLE-1 and ~+1 simulation's time for EAGLE-3, docs/results.md §1b, §1c). One thread: EAGLE-1 ~2 h,
#    EAGLE-3 ~14.5 h at 7 s (~25 h at 12 s); JOBS=2: ~1 h / ~7-12 h. Since the walked EAGLE-3 simulation
#    (docs/results.md §3: 1.0-1.3 s per prompt and drafter, 6.4-6.9x) EAGLE-3 costs about what EAGLE-1 does:
#    ~2-2.5 h on one thread, ~1-1.3 h with JOBS=2. Real decoding, 2 drafters x 20 prompts:
#    EAGLE-1 ~95 s per prompt and drafter (measured in a 2-prompt smoke run of this script, load ~6),
#    ~1 h; EAGLE-3 ~45 s a prompt on two threads (docs/results.md §6), ~0.5-1 h.
#  In all, on two free cores: ~9 h per family (EAGLE-3 was 15-21 h before the walked simulation); training is
#    the largest cost now (RUNS without the ablations and gen_ arms: ~3.5 h per family).
# Curves (scripts/curves.py CURVES) the metrics provide: reward, greedy_accept_len (greedy-window k at the
# training positions), heldout_k (the same at every position of the τ probe's held-out continuations, every
# arm), sim_tau (τ probe), zero_adv_frac, r_dist_rate, clip_frac (sampled
# arms; the expected arm logs reward, greedy_accept_len only); SFT arms: top1_acc, multi_step_last_acc,
# ttt_last_acc; every arm: grad_cos_prev (run.grad_cosine: the cosine of consecutive steps' gradients, two
# sequences: the step's signal-to-noise, logged in training; benchmarks/ppow_dense.py measures it offline).
# Step rates used to space the τ probe and checkpoints (steps per training hour, one thread on a shared
# machine; estimates from docs/results.md §1b, §1c, §4, docs/algorithm.md's 15-min dense checks):
#  EAGLE-1 cst 14400, deep_sft 2000, PPOW dense 400; EAGLE-3 cst 2420, deep_sft 1200, PPOW dense 1500 (measured
#  2026-12-07: the data-path dense and expected arms at 0.20-0.23 steps/s on half a core, four arms on two
#  cores; the earlier 200 was the tree-verified step's, and spaced 60 minutes' probes every 20 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# = 3 ] || { echo "usage: scripts/arms.sh START_DRAFTER_DIR eagle1|eagle3 OUT   (DRY=1: validate only)" >&2; exit 2; }
START=$1 FAMILY=$2 OUT=$3
PY=${PY:-.venv/bin/python}
MIN=${MINUTES:-60}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
MEM=${MEM_GB_PER_JOB:-5}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
GEN_START=${GEN_START:-assets/drafters/smollm2-135m-$FAMILY-sft-gen}
DATA=assets/generated/smollm2-135m-sharegpt-2048
SFT_RECIPE=recipes/smollm2/135M_${FAMILY}_sft_generated.yaml
PPOW_RECIPE=recipes/smollm2/135M_${FAMILY}_ppow.yaml
POSITIONS=${POSITIONS:-all}
ADAW_STARTS=${ADAW_STARTS:-32}
PROBES=${PROBES:-6}
MAIN="cst deep_sft dense expected"
ABLATIONS="adaw no_adaw no_rdist gamma_prof"
[ "$POSITIONS" = all ] || ABLATIONS="no_adaw no_rdist gamma_prof"
GEN="gen_cst gen_dense gen_expected"
RUNS=${RUNS:-$MAIN $ABLATIONS $GEN}
. scripts/arms_lib.sh

family_settings "$FAMILY"
case ${CST_SCHEDULE:=cosine} in constant | cosine) ;;
  *) echo "error: CST_SCHEDULE must be constant or cosine, not '$CST_SCHEDULE'" >&2; exit 2 ;; esac
case ${PPOW_SCHEDULE:=cosine} in constant | cosine) ;;
  *) echo "error: PPOW_SCHEDULE must be constant or cosine, not '$PPOW_SCHEDULE'" >&2; exit 2 ;; esac
for arm in $RUNS; do
  case " $MAIN $ABLATIONS $GEN " in *" $arm "*) ;;
    *) echo "error: unknown arm '$arm'; choose from: $MAIN $ABLATIONS $GEN" >&2; exit 2 ;; esac
done

# every_steps: PROBES τ probes (and 12 checkpoints) over MINUTES at the arm's step rate.
every() { awk -v r="$1" -v m="$MIN" -v p="$2" 'BEGIN { n = int(r * m / 60 / p); print (n < 1 ? 1 : n) }'; }
schedule() {  # schedule RATE: the probe and checkpoint overrides
  echo "eval.benchmarks=[sharegpt] eval.every_prompts=16 eval.max_new_tokens=128" \
       "eval.every_steps=$(every "$1" "$PROBES") run.save_every=$(every "$1" 12) run.grad_cosine=true"
}
sft_args() {  # sft_args: arms 1-2's data and lr schedule
  case $CST_SCHEDULE in
    constant) echo "data.path=$DATA optim.lr=${CST_LR:-5.0e-5} optim.schedule=constant optim.warmup_steps=0" ;;
    cosine)   echo "data.path=$DATA optim.lr=${CST_LR:-3.0e-4} optim.schedule=cosine optim.warmup_steps=100" \
                   "optim.decay_over=minutes $NO_STEP_CAP" ;;
  esac
}
lr_of() {  # lr_of dense|expected: "optim.lr=X" once chosen (LR_<arm> or OUT/lr-<arm>.txt), else nothing
  local v; v=$(eval echo "\${LR_$1:-}")
  [ -z "$v" ] && [ -f "$OUT/lr-$1.txt" ] && v=$(cat "$OUT/lr-$1.txt")
  [ -n "$v" ] && echo "optim.lr=$v"
  return 0
}
ppow_args() {  # ppow_args POSITIONS sampled|expected
  local a="rollout.positions=$1 rollout.verify=data data.feature_cache=true data.max_len=512 dist.engine=torch"
  [ "$PPOW_SCHEDULE" = cosine ] && a="$a optim.schedule=cosine optim.decay_over=minutes"
  [ "$2" = expected ] && a="$a loss.estimator=expected loss.sft_weight=${SFT_WEIGHT:-1.0} $PPOW_SFT"
  echo "$a"
}
best_args() {  # best_args BEST [POSITIONS]
  if [ "$1" = expected ]; then ppow_args "${2:-$POSITIONS}" expected; else ppow_args "${2:-$POSITIONS}" sampled; fi
}

# arm NAME [BEST]: "SUBCMD RECIPE OVERRIDE..." of the arm (the ablations' from BEST).
arm() {
  local name=$1 best=${2:-dense} start=$START
  case $name in gen_*) start=$GEN_START; name=${name#gen_} ;; esac
  case $name in
    cst)        echo "sft $SFT_RECIPE model.drafter=$start $(sft_args) $SFT_LOSS $(schedule $RATE_cst)" ;;
    deep_sft)   echo "sft $SFT_RECIPE model.drafter=$start $(sft_args) $DEEP $(schedule $RATE_deep)" ;;
    dense)      echo "train $PPOW_RECIPE model.drafter=$start $(ppow_args "$POSITIONS" sampled) $(lr_of dense) $(schedule $RATE_ppow)" ;;
    expected)   echo "train $PPOW_RECIPE model.drafter=$start $(ppow_args "$POSITIONS" expected) $(lr_of expected) $(schedule $RATE_ppow)" ;;
    no_rdist)   echo "train $PPOW_RECIPE model.drafter=$start $(best_args "$best") $(lr_of "$best") reward.proximity_weight=0 $(schedule $RATE_ppow)" ;;
    gamma_prof) echo "train $PPOW_RECIPE model.drafter=$start $(best_args "$best") $(lr_of "$best") reward.gamma_profile=${PROFILE:-$OUT/profile.json} $(schedule $RATE_ppow)" ;;
    adaw)       echo "train $PPOW_RECIPE model.drafter=$start $(best_args "$best" "$ADAW_STARTS") $(lr_of "$best") windowing.rule=sample $(schedule $RATE_ppow)" ;;
    no_adaw)    local n=$POSITIONS; [ "$n" = all ] && n=$ADAW_STARTS
                echo "train $PPOW_RECIPE model.drafter=$start $(best_args "$best" "$n") $(lr_of "$best") windowing.rule=uniform $(schedule $RATE_ppow)" ;;
  esac
}
in_runs() { case " $RUNS " in *" $1 "*) return 0 ;; esac; return 1; }
only() { local a out=""; for a in $1; do in_runs "$a" && out="$out $a"; done; echo $out; }
is_ablation() { case " $ABLATIONS " in *" $1 "*) return 0 ;; esac; return 1; }

# 0. Every arm's config is checked before hours of compute (the ablations for both candidates of BEST
# while it is not chosen; before `ppow profile` has run, gamma_prof's paths are not checked, its values are).
for a in $RUNS; do
  for best in ${BEST:-dense expected}; do
    is_ablation "$a" || [ "$best" = "${BEST:-dense}" ] || continue
    args=$(arm "$a" "$best"); nocheck=""
    [ "$a" = gamma_prof ] && [ ! -f "${PROFILE:-$OUT/profile.json}" ] && nocheck="--no-path-check "
    echo "$nocheck${args#* } run.max_minutes=$MIN run.output_dir=$OUT/$a"
  done
done | validate_all
[ "${DRY:-0}" = 1 ] && { echo "DRY=1: configs valid, nothing run"; exit 0; }
# JOBS runs side by side must fit in memory: an EAGLE-3 arm peaked at 5.0 GB (anon RSS, 2026-12-07), and nine
# side by side on this 24 GB machine had the kernel kill four of them in their first minutes.
avail=$(awk '/^MemAvailable:/ { printf "%d", $2 / 1048576 }' /proc/meminfo 2> /dev/null || echo 0)
need=$(awk -v j="$JOBS" -v m="$MEM" 'BEGIN { printf "%d", j * m + 0.999 }')
if [ "$avail" -gt 0 ] && [ "$need" -gt "$avail" ]; then
  echo "error: JOBS=$JOBS runs need ~$need GB (MEM_GB_PER_JOB=$MEM each) but $avail GB is available;" \
       "lower JOBS to $(awk -v a="$avail" -v m="$MEM" 'BEGIN { n = int(a / m); print (n < 1 ? 1 : n) }')" >&2
  exit 2
fi
mkdir -p "$OUT"
[ -f "$OUT/dev-prompts.jsonl" ] || $PY scripts/dev_prompts.py "$OUT/dev-prompts.jsonl" "${TUNING:-48}"
if in_runs gamma_prof && [ -z "${PROFILE:-}" ] && [ ! -f "$OUT/profile.json" ]; then
  echo "+ ppow profile --drafter $START --out $OUT/profile.json"
  ppow profile --drafter "$START" --out "$OUT/profile.json"
fi

# 0b. The feature cache filled before any timed run (JOBS processes, a share each; quick when it is full), so that
# no arm pays the target's passes inside its minutes: the first arms would otherwise, the later ones not.
a=$(arm cst); pids=""
for s in $(seq 0 $((JOBS - 1))); do $PY scripts/fill_features.py "$s" "$JOBS" ${a#* } "run.max_minutes=$MIN" >> "$OUT/fill.log" 2>&1 & pids="$pids $!"; done
for p in $pids; do wait "$p" || { echo "error: filling the feature cache failed; see $OUT/fill.log" >&2; exit 1; }; done
tail -n "$JOBS" "$OUT/fill.log"

train_one() { local a; a=$(arm "$1" "${BEST:-dense}"); train_arm "$1" ${a%% *} ${a#* }; }
SIMARGS="--simulate --temperature 0 --max-new-tokens 128 --recipe $PPOW_RECIPE"
group() {  # group START_NAME START ARM...: "START,OUT/ARM/drafter,... START_NAME,ARM,..." for compare_into
  local n=$1 d=$2 a
  shift 2
  for a in "$@"; do d="$d,$OUT/$a/drafter"; n="$n,$a"; done
  echo "$d $n"
}
cmp_dirs=""
compare() { cmp_dirs="$cmp_dirs $1"; queue compare_into "$@"; }  # compare DIR ...: compare_into, JOBS at a time

# 0c. The lr of arms 3 and 4: TUNE_LRS, TUNE_MIN minutes each from START (no τ probe), JOBS at a time; the
# higher τ on the tuning prompts is the arm's lr (OUT/lr-ARM.txt; LR_<arm> or an existing file skips this).
tune_one() {  # tune_one ARM LR
  local a; a=$(arm "$1")
  MIN=${TUNE_MIN:-15} train_arm "tune-$1-$2" ${a%% *} ${a#* } "optim.lr=$2" eval.every_steps=0
}
lrs_of() {  # lrs_of dense|expected: its lr candidates, TUNE_LRS_<arm> if set, else TUNE_LRS if set, else its default
  local var=TUNE_LRS_$1
  if [ -n "${!var+x}" ]; then echo "${!var}"
  elif [ -n "${TUNE_LRS+x}" ]; then echo "$TUNE_LRS"
  else case $1 in dense) echo "5.0e-6 2.0e-5 5.0e-5" ;; expected) echo "5.0e-6 5.0e-5 3.0e-4" ;; esac
  fi
}
tuned=""
for a in dense expected; do
  lrs=$(lrs_of "$a")
  in_runs "$a" && [ -z "$(lr_of "$a")" ] && [ -n "$lrs" ] || continue
  for lr in $lrs; do queue tune_one "$a" "$lr"; done
  tuned="$tuned $a"
done
wait || true
for a in $tuned; do
  runs=""; for lr in $(lrs_of "$a"); do runs="$runs tune-$a-$lr"; done
  for r in $runs; do [ -d "$OUT/$r/drafter" ] || { echo "error: no drafter from $r; see $OUT/$r.log" >&2; exit 1; }; done
  compare_into "$OUT/tuning-lr-$a" $(group start "$START" $runs) $SIMARGS --prompts "$OUT/dev-prompts.jsonl"
  $PY -c 'import json, sys; d = json.load(open(sys.argv[1]))["drafters"]; prefix = sys.argv[2]
print(max(sys.argv[3:], key=lambda r: d[r]["overall"]["tau"])[len(prefix):])' \
    "$OUT/tuning-lr-$a/compare.json" "tune-$a-" $runs > "$OUT/lr-$a.txt"
  echo "= lr of $a: $(cat "$OUT/lr-$a.txt"), the higher τ on the tuning prompts ($OUT/tuning-lr-$a/compare.md)"
done
[ "${STOP_AFTER:-}" = tune ] && { echo "STOP_AFTER=tune: lr chosen; rerun without it for the arms"; exit 0; }

# 1. Arms 1-4, JOBS at a time (arm 1 linked from CST_FROM when given); then BEST on the tuning prompts.
if [ -n "${CST_FROM:-}" ] && in_runs cst && [ ! -e "$OUT/cst" ]; then
  a=$(arm cst)
  $PY - "$CST_FROM" "$START" "$MIN" ${a#* } "run.max_minutes=$MIN" <<'EOF' || exit 2
import json, os, sys
from ppow_plugin.config import config_to_dict, load_config
run, start, minutes, recipe, *overrides = sys.argv[1:]
def fail(why):
    sys.exit(f"error: CST_FROM={run} is not arm 1: {why}; train arm 1 instead (unset CST_FROM)")
try:
    done = json.load(open(os.path.join(run, "drafter", "ppow_meta.json")))["config"]
    last = json.loads(open(os.path.join(run, "metrics.jsonl")).read().splitlines()[-1])
except (OSError, ValueError, KeyError, IndexError) as e:
    fail(f"no finished run there ({e})")
skip = {"eval", "run.save_every", "run.max_minutes", "run.output_dir", "run.resume", "run.grad_cosine",
        "model.drafter"}
flat = lambda cfg: {f"{s}.{k}" if isinstance(sec, dict) else s: v for s, sec in cfg.items()
                    for k, v in (sec.items() if isinstance(sec, dict) else [(None, sec)])}
want, have = flat(config_to_dict(load_config(recipe, overrides))), flat(done)
diff = [f"{k}={have.get(k)!r} (arm 1: {v!r})" for k, v in want.items()
        if k not in skip and k.split(".")[0] not in skip and have.get(k) != v]
if diff:
    fail("its config differs in " + ", ".join(diff))
if os.path.realpath(have["model.drafter"]) != os.path.realpath(start):
    fail(f"it continued {have['model.drafter']}, not START {start}")
if last["train_s"] > float(minutes) * 60 * 1.01:  # run.max_minutes stops after the step that crosses it
    fail(f"it trained {last['train_s'] / 60:.1f} min, more than MINUTES={minutes}")
EOF
  echo "= cst: linked from CST_FROM=$CST_FROM (rounds.sh's last round; its config is arm 1's)"
  ln -s "$(realpath "$CST_FROM")" "$OUT/cst"
fi
# BEST given: the ablations do not wait for arms 1-4, so every arm of RUNS goes in one queue (JOBS at a time: all
# of them side by side when JOBS covers RUNS, one contention for every arm, each compared with an arm 1 trained
# beside it); else arms 1-4 first, then BEST is chosen and the rest trained.
if [ -n "${BEST:-}" ]; then train_all $(only "$MAIN $ABLATIONS $GEN"); else train_all $(only "$MAIN"); fi
main=$(only "$MAIN")
[ -n "$main" ] && compare_into "$OUT/tuning-main" $(group start "$START" $main) $SIMARGS \
  --prompts "$OUT/dev-prompts.jsonl"
if [ -z "${BEST:-}" ] && in_runs dense && in_runs expected; then
  BEST=$($PY -c 'import json, sys; d = json.load(open(sys.argv[1]))["drafters"]
print(max(("dense", "expected"), key=lambda a: d[a]["overall"]["tau"]))' "$OUT/tuning-main/compare.json")
  echo "= BEST=$BEST: the higher τ on the tuning prompts ($OUT/tuning-main/compare.md)"
fi
BEST=${BEST:-dense}
echo "$BEST" > "$OUT/best.txt"
for a in $(only "$ABLATIONS"); do echo "  $a: ppow $(arm "$a" "$BEST")"; done

# 2. The ablations of BEST and the gen_ arms.
train_all $(only "$ABLATIONS $GEN")
abl=$(only "$ABLATIONS")
[ -n "$abl" ] && compare "$OUT/tuning-ablations" $(group start "$START" $abl) $SIMARGS --prompts "$OUT/dev-prompts.jsonl"

# 3. Simulated τ on the benchmarks (PER_DEPTH's with --per-depth), converged and gen_ groups, JOBS at a time.
conv=$(only "$MAIN $ABLATIONS")
gen=$(only "$GEN")
for bench in ${BENCHES:-mt_bench:80 humaneval:164 sharegpt:200}; do
  b=${bench%%:*}; n=${bench##*:}; extra=""
  [ "$b" = "${PER_DEPTH:-mt_bench}" ] && extra=--per-depth
  [ -n "$conv" ] && compare "$OUT/sim-$b" $(group start "$START" $conv) $SIMARGS --benchmarks "$b" \
    --num-prompts "$n" $extra
  [ -n "$gen" ] && compare "$OUT/gen-sim-$b" $(group gen_start "$GEN_START" $gen) $SIMARGS --benchmarks "$b" \
    --num-prompts "$n" $extra
done
[ -n "$gen" ] && compare "$OUT/gen-tuning" $(group gen_start "$GEN_START" $gen) $SIMARGS --prompts "$OUT/dev-prompts.jsonl"
wait || true
for d in $cmp_dirs; do [ -f "$d/compare.md" ] || { echo "error: no $d/compare.md; see $d.log" >&2; exit 1; }; done

# 4. Paired tables against the start and against arm 1 (scripts/paired.py), per group.
tables() {  # tables START_NAME ARM1_NAME COMPARE_DIR...
  local s=$1 ref=$2
  shift 2
  $PY scripts/paired.py table --reference "$s" --out "$OUT/vs-$s.md" "$@" > /dev/null
  in_runs "$ref" && $PY scripts/paired.py table --reference "$ref" --out "$OUT/vs-$ref.md" "$@" > /dev/null
  return 0
}
[ -n "$conv" ] && tables start cst "$OUT"/sim-*/ "$OUT"/tuning-*/
if [ -n "$conv" ] && in_runs cst && in_runs "$BEST"; then  # make demo's table: start, arm 1, BEST, held-out only
  $PY scripts/paired.py table --reference start --drafters "start,cst,$BEST" --out "$OUT/before_after.md" \
    "$OUT"/sim-*/ > /dev/null
fi
[ -n "$gen" ] && tables gen_start gen_cst "$OUT"/gen-sim-*/ "$OUT/gen-tuning/"
pd=${PER_DEPTH:-mt_bench}  # one per-depth table per group
[ -n "$conv" ] && [ -d "$OUT/sim-$pd" ] && $PY scripts/paired.py depths "$OUT/sim-$pd" --out "$OUT/per-depth.md" > /dev/null
[ -n "$gen" ] && [ -d "$OUT/gen-sim-$pd" ] &&
  $PY scripts/paired.py depths "$OUT/gen-sim-$pd" --out "$OUT/gen-per-depth.md" > /dev/null

# 5. Real decoding at T = 0 on REAL x 2 prompts: 0 mismatches, cycles identical to the simulation.
real=$(only "$BEST")
if [ "${REAL:-10}" != 0 ] && [ -n "$real" ]; then
  compare_into "$OUT/real-t0" $(group start "$START" $real) --temperature 0 --max-new-tokens 128 --recipe "$PPOW_RECIPE" \
    --benchmarks mt_bench,humaneval --num-prompts "${REAL:-10}"
  $PY scripts/paired.py agree "$OUT/real-t0" "$OUT"/sim-*/ | tee "$OUT/real-t0-agree.txt" || disagree=1
fi

# 5b. Real decoding at T = 1 (T1 prompts of MT-Bench and of HumanEval; 0 = not run): START, arm 1 and BEST, each
# drafter decoding its own sampled answers, paired over prompts; one compare per benchmark, JOBS at a time.
if [ "${T1:-0}" != 0 ] && [ -n "$real" ]; then
  cmp_dirs=""
  for b in mt_bench humaneval; do
    compare "$OUT/real-t1-$b" $(group start "$START" $(only "cst $BEST")) --temperature 1 --max-new-tokens 128 \
      --recipe "$PPOW_RECIPE" --benchmarks "$b" --num-prompts "$T1"
  done
  wait || true
  for d in $cmp_dirs; do [ -f "$d/compare.md" ] || { echo "error: no $d/compare.md; see $d.log" >&2; exit 1; }; done
  $PY scripts/paired.py table --reference start --pooled --out "$OUT/vs-start-t1.md" "$OUT"/real-t1-*/ > /dev/null
fi

# 6. Curves: one JSON and one PNG per arm.
arms=""; for a in $RUNS; do arms="$arms $OUT/$a"; done
$PY scripts/curves.py $arms --per-run "$OUT/curves" --json "$OUT/curves/quarters.json"
cat "$OUT"/vs-*.md "$OUT"/*per-depth.md
[ -z "${disagree:-}" ] || { echo "error: real decoding and simulation disagree: $OUT/real-t0-agree.txt" >&2; exit 1; }
