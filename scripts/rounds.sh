#!/usr/bin/env bash
# Issue 28: continued-SFT rounds until a start is converged. Round r continues round r-1's drafter (round 1:
# START) with scripts/converge.sh into OUT/round-r and compares it with its start on the tuning prompts, MT-Bench
# 80 and HumanEval 164. The start of round r is converged when round r gains < +1 % on the tuning prompts and
# on MT-Bench 80 with both paired 95 % intervals covering 0 (the issue's test); then OUT/converged.txt names
# it and round r's drafter is continued SFT's hour from it. One resumable command per family:
#
#   scripts/rounds.sh START eagle1|eagle3 OUT          # MAX_ROUNDS (8); converge.sh's knobs pass through
#
# Rerun the same command after an interruption: finished rounds are read back, the unfinished one resumes.
# Prints one line per finished round (the gains, the verdict); OUT/rounds.md is the table so far.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# = 3 ] || { echo "usage: scripts/rounds.sh START_DRAFTER_DIR eagle1|eagle3 OUT" >&2; exit 2; }
START=$1 FAMILY=$2 OUT=$3
PY=${PY:-.venv/bin/python}
MAX=${MAX_ROUNDS:-8}
[ -d "$START" ] || { echo "error: START $START is not a drafter directory; pass a drafter dir or a run's drafter/" >&2; exit 2; }
DRY=1 bash scripts/converge.sh "$START" "$FAMILY" "$OUT/round-1" > /dev/null  # the family and config, before any work

# verdict ROUND_DIR: "converged" or "not", the tuning and the MT-Bench gain, tab-separated, from its compare.json
verdict() {
  $PY - "$1" <<'EOF'
import json, sys
gains, ok = [], True
for bench in ("tuning48", "mt_bench80"):
    c = json.load(open(f"{sys.argv[1]}/cmp-{bench}/compare.json"))["drafters"]["cont-sft"]["overall"]
    ch = c["tau_change_vs_reference"]
    ok &= ch["value"] < 0.01 and ch["low"] <= 0 <= ch["high"]
    gains.append(ch["text"])
print("\t".join(["converged" if ok else "not", *gains]))
EOF
}

prev=$START
mkdir -p "$OUT"
printf '| round | start | tuning 48 | MT-Bench 80 | start converged |\n|---|---|---|---|---|\n' > "$OUT/rounds.md"
for r in $(seq 1 "$MAX"); do
  dir=$OUT/round-$r
  bash scripts/converge.sh "$prev" "$FAMILY" "$dir" > "$dir.log" 2>&1 ||
    { echo "error: round $r failed; see $dir.log" >&2; exit 1; }
  IFS=$'\t' read -r word tune mt <<< "$(verdict "$dir")"
  echo "| $r | $prev | $tune | $mt | $word |" >> "$OUT/rounds.md"
  echo "round $r from $prev: tuning48 $tune; mt_bench80 $mt: start $word"
  if [ "$word" = converged ]; then
    echo "$prev" > "$OUT/converged.txt"
    echo "= converged start: $prev (round $r's drafter, $dir/sft/drafter, is continued SFT's hour from it)"
    exit 0
  fi
  prev=$dir/sft/drafter
done
echo "error: no converged start after $MAX rounds; the latest drafter is $prev (MAX_ROUNDS=N for more)" >&2
exit 1
