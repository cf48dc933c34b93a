"""Issue 28's experiment scripts: `DRY=1 scripts/arms.sh` validates every arm's exact config for both families
(and fails on an arm that does not validate), `DRY=1 scripts/headline.sh` still does after its training and
compare code moved to scripts/arms_lib.sh; scripts/curves.py's per-arm curves and the training minutes of a
resumed run; scripts/paired.py's tables against any drafter and the real-vs-simulated check."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARMS = ["cst", "deep_sft", "dense", "expected", "adaw", "no_adaw", "no_rdist", "gamma_prof",
        "gen_cst", "gen_dense", "gen_expected"]
STARTS = {"eagle1": "assets/drafters/smollm2-135m-eagle1-sft-gen-long",
          "eagle3": "assets/drafters/smollm2-135m-eagle3-sft-converged"}


@pytest.fixture(autouse=True)
def _fake_runs_need_no_memory(monkeypatch):
    """The fake runs below take no memory: arms.sh's JOBS-fits-in-memory check is off (MEM_GB_PER_JOB=0) unless
    a test sets it, so they pass on a machine whatever its free memory."""
    monkeypatch.setenv("MEM_GB_PER_JOB", "0")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dry(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "DRY": "1", "PY": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", *args], cwd=ROOT, env=full, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("family", ["eagle1", "eagle3"])
def test_arms_dry_run_validates_every_arm(family, tmp_path):
    out = tmp_path / "out"
    res = _dry(["scripts/arms.sh", STARTS[family], family, str(out)], tmp_path)
    assert res.returncode == 0, res.stderr + res.stdout
    assert "DRY=1: configs valid, nothing run" in res.stdout
    lines = [line for line in res.stdout.splitlines() if line.startswith("+ ppow validate ")]
    dirs = [line.rsplit("run.output_dir=", 1)[1] for line in lines]
    # every arm once; the ablations once per candidate BEST (dense, expected) while BEST is not chosen
    assert sorted(dirs) == sorted([str(out / a) for a in ARMS] + [str(out / a) for a in ARMS[4:8]])
    dense = next(line for line in lines if line.endswith("/dense"))
    assert "rollout.positions=all" in dense and "rollout.verify=data" in dense and "loss.estimator" not in dense
    expected = next(line for line in lines if line.endswith("/expected"))
    assert "loss.estimator=expected" in expected and "loss.sft_weight=1.0" in expected
    deep = next(line for line in lines if line.endswith("/deep_sft"))
    assert ("sft.multi_step=4" if family == "eagle1" else "sft.ttt_steps=8") in deep
    cst = next(line for line in lines if line.endswith("/cst"))  # default: one cycle of the SFT recipe's schedule
    assert "optim.lr=3.0e-4 optim.schedule=cosine optim.warmup_steps=100 optim.decay_over=minutes " in cst
    assert f"assets/drafters/smollm2-135m-{family}-sft-gen " in next(x for x in lines if x.endswith("/gen_cst"))
    assert not out.exists()  # nothing run, nothing written


@pytest.mark.parametrize("family", ["eagle1", "eagle3"])
def test_converge_dry_run_uses_the_family_settings_arms_uses(family, tmp_path):
    """converge.sh's continued SFT is arm 1's loss (family_settings in arms_lib.sh), its step budget arm 1's
    hourly rate, and LR / SCHEDULE / WARMUP reach the config."""
    out = tmp_path / "out"
    res = _dry(["scripts/converge.sh", STARTS[family], family, str(out)], tmp_path,
               LR="3e-4", SCHEDULE="cosine", WARMUP="100")
    assert res.returncode == 0, res.stderr + res.stdout
    line = next(x for x in res.stdout.splitlines() if x.startswith("DRY=1: config valid"))
    loss = {"eagle1": "sft.vocab_rows=4096", "eagle3": "sft.ttt_steps=4 model.draft_vocab_size=null"}[family]
    steps = {"eagle1": 14400, "eagle3": 2420}[family]
    assert line.rstrip().endswith(loss + (" data.num_conversations=2048" if family == "eagle3" else ""))
    assert f"run.max_steps={steps} " in line and f"run.save_every={steps // 12} " in line
    assert "optim.lr=3e-4 optim.schedule=cosine optim.warmup_steps=100" in line
    assert not out.exists()
    bad = _dry(["scripts/converge.sh", STARTS[family], "eagle2", str(out)], tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: family must be eagle1 or eagle3, not 'eagle2'"


def test_arms_dry_run_fails_on_an_invalid_arm(tmp_path):
    res = _dry(["scripts/arms.sh", STARTS["eagle1"], "eagle1", str(tmp_path / "o")], tmp_path,
               RUNS="cst expected", SFT_WEIGHT="-1")
    assert res.returncode != 0
    assert "loss.sft_weight (-1.0) must be >= 0" in res.stderr and "does not validate" in res.stderr
    res = _dry(["scripts/arms.sh", STARTS["eagle1"], "eagle1", str(tmp_path / "o")], tmp_path, RUNS="cst bogus")
    assert res.returncode == 2 and "unknown arm 'bogus'" in res.stderr


def test_headline_dry_run_still_validates(tmp_path):
    res = _dry(["scripts/headline.sh", "assets/drafters/smollm2-135m-eagle1-sft-gen", "eagle1"], tmp_path,
               OUT=str(tmp_path / "h"))
    assert res.returncode == 0, res.stderr + res.stdout
    assert res.stdout.count("+ ppow validate ") == 10 and "DRY=1: configs valid" in res.stdout


def _write_metrics(run: Path, rows: list[dict]) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "torn')


def test_curves_per_run_and_minutes_of_a_resumed_run(tmp_path):
    curves = _script("curves")
    # logged before `train_s`: segment 1, steps 1-4, 60 s each, a 30 s τ probe at step 2 (elapsed_s before it,
    # probe_s after it); killed at step 5 after its step-4 checkpoint; segment 2 resumes from step 4 with a
    # fresh clock, and the trainer cut the lost step 5 from metrics.jsonl
    rows = [{"step": 1, "elapsed_s": 60.0, "reward": 0.5, "zero_adv_frac": 0.4, "greedy_accept_len": 0.7},
            {"step": 2, "elapsed_s": 120.0, "reward": 0.6, "sim_tau": 2.0, "probe_s": 30.0},
            {"step": 3, "elapsed_s": 210.0, "reward": 0.7},
            {"step": 4, "elapsed_s": 270.0, "reward": 0.8},
            {"step": 5, "elapsed_s": 60.0, "reward": 1.0, "sim_tau": 2.1, "probe_s": 12.0},
            {"step": 6, "elapsed_s": 132.0, "reward": 1.1}]
    run = tmp_path / "runs" / "dense"
    _write_metrics(run, rows)
    assert curves.training_minutes(curves.read_rows(run)) == pytest.approx([1, 2, 3, 4, 5, 6])
    # the trainer's own run clock wins where logged (can fail: ignore it and the segments give 1 and 2)
    assert curves.training_minutes([{"elapsed_s": 60.0, "train_s": 600.0},
                                    {"elapsed_s": 120.0, "train_s": 660.0}]) == pytest.approx([10, 11])

    out = tmp_path / "curves"
    res = subprocess.run([sys.executable, "scripts/curves.py", str(run), "--per-run", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    text = (out / "dense.json").read_text()
    c = json.loads(text)
    # one line per top-level key and per curve (can fail: an indented dump puts every number on its own line)
    assert len(text.splitlines()) == 2 + len(c) + len(c["curves"]) + 1
    assert set(c["curves"]) == {"reward", "sim_tau", "zero_adv_frac", "greedy_accept_len"}
    assert {"clip_frac", "r_dist_rate", "grad_cos_prev"} <= set(c["absent"])
    assert c["curves"]["sim_tau"]["points"] == [[2, 2.0, 2.0], [5, 5.0, 2.1]]  # [step, training minutes, τ]
    assert c["steps"] == 6 and c["training_minutes"] == 6.0
    assert (out / "dense.png").stat().st_size > 1000
    titles = []  # the PNG's title names the arm, not this machine's path to it (the PNGs are committed)
    import matplotlib.figure
    orig = matplotlib.figure.Figure.suptitle
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **k: titles.append(t) or orig(self, t, **k))
        curves.plot_curves(c, tmp_path / "again.png")
    assert titles[0].startswith("dense: 6 steps") and str(tmp_path) not in titles[0]


def _report(d: Path, name: str, records: list[tuple[str, str, int, int]], mismatch=None) -> None:
    (d / name).mkdir(parents=True)
    prompts = [{"benchmark": b, "prompt_id": p, "new_tokens": t, "cycles": c, "mismatch_at": mismatch}
               for b, p, t, c in records]
    (d / name / "report.json").write_text(json.dumps({"settings": {}, "stats": {}, "prompts": prompts}))


def test_paired_table_against_any_drafter_and_the_real_check(tmp_path):
    paired = _script("paired")
    a, b = tmp_path / "cmp-a", tmp_path / "cmp-b"
    recs = [("mt_bench", str(i), 100, 50) for i in range(6)]
    _report(a, "start", recs)
    _report(a, "cst", [(bn, p, t, c - 5) for bn, p, t, c in recs])    # τ 100/45
    _report(b, "start", recs)                                          # the same start, a second compare
    _report(b, "no_rdist", [(bn, p, t, c - 10) for bn, p, t, c in recs])  # τ 100/40
    (a / "compare.json").write_text(json.dumps({"drafters": {"start": {}, "cst": {}}}))  # the compare's order
    reports = paired.load([a, b])
    assert list(reports) == ["start", "cst", "no_rdist"]
    text = paired.table(reports, "cst")
    assert "| cst | 2.222 (6) |" in text
    assert "| no_rdist | 2.500: +12.5 % [+12.5, +12.5] |" in text and "| start | 2.000: -10.0 %" in text
    pool = tmp_path / "pool"  # --pooled: one more column over both benchmarks' prompts
    _report(pool, "start", [("mt_bench", "0", 100, 50), ("humaneval", "0", 100, 50)])
    _report(pool, "cst", [("mt_bench", "0", 100, 40), ("humaneval", "0", 100, 50)])
    assert "| cst | 2.500: +25.0 % [+25.0, +25.0] | 2.000: +0.0 % [+0.0, +0.0] |\n" in paired.table(
        paired.load([pool]), "start")
    assert "| cst | 2.500: +25.0 % [+25.0, +25.0] | 2.000: +0.0 % [+0.0, +0.0] | 2.222: +11.1 %" in paired.table(
        paired.load([pool]), "start", pooled=True)
    _report(tmp_path / "cmp-c", "start", [("mt_bench", "0", 100, 49)])
    with pytest.raises(SystemExit, match="differs between compares"):
        paired.load([a, tmp_path / "cmp-c"])
    real = tmp_path / "real"
    _report(real, "start", recs[:2])
    _report(real, "cst", [("mt_bench", "0", 100, 44)], mismatch=17)
    lines = paired.agree(paired.load([real]), reports)
    assert lines[0].startswith("ok start: 2 prompts, 0 T = 0 mismatches, cycles equal to the simulation on 2 / 2")
    assert lines[1].startswith("DIFF cst: 1 prompts, 1 T = 0 mismatches, cycles equal to the simulation on 0 / 1")

    by = {"depth": 2, "benchmarks": {"mt_bench": {"roots": 9, "top1": [0.5, 0.25], "top3": [0.75, 0.5]},
                                     "overall": {"roots": 9, "top1": [0.5, 0.25], "top3": [0.75, 0.5]}}}
    rep = json.loads((a / "cst" / "report.json").read_text())
    (a / "cst" / "report.json").write_text(json.dumps({**rep, "settings": {"topk_by_depth": by}}))
    with pytest.raises(SystemExit, match="no per-depth figures"):  # start's report has none
        paired.depths(a)
    (a / "start" / "report.json").write_text(json.dumps({**rep, "settings": {"topk_by_depth": by}}))
    assert paired.depths(a).splitlines()[2:] == ["| drafter | benchmark | roots | depth 1 | depth 2 |",
                                                 "|---|---|---|---|---|",
                                                 "| start | mt_bench | 9 | 0.50 / 0.75 | 0.25 / 0.50 |",
                                                 "| cst | mt_bench | 9 | 0.50 / 0.75 | 0.25 / 0.50 |"]


def _fake_python(tmp_path: Path, source: str) -> Path:
    """An executable standing in for $PY: runs `source` (a fake `python -m ppow_plugin.cli`) with the arguments."""
    fake = tmp_path / "fakepy.py"
    fake.write_text(source)
    wrapper = tmp_path / "py"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


FAKE_PPOW = '''
import json, os, subprocess, sys
from pathlib import Path
args = sys.argv[1:]
if args and args[0].endswith("fill_features.py"):  # fills the feature cache: log it, fill nothing
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write("fill " + " ".join(args[1:]) + "\\n")
    sys.exit(0)
if args[:2] != ["-m", "ppow_plugin.cli"] or args[2] not in ("train", "sft", "compare"):
    sys.exit(subprocess.call([os.environ["REAL_PY"], *args]))  # validate, -c, scripts: the real thing
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args[2:]) + "\\n")
if args[2] == "compare":
    names = args[args.index("--names") + 1].split(",")
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    tau = json.loads(os.environ["FAKE_TAU"])  # name -> tau
    (out / "compare.json").write_text(json.dumps({"drafters": {n: {"overall": {"tau": tau.get(n, 2.0)}} for n in names}}))
    (out / "compare.md").write_text("fake\\n")
    benches = args[args.index("--benchmarks") + 1].split(",") if "--benchmarks" in args else ["tuning"]
    for n in names:  # one prompt per benchmark, τ 2
        (out / n).mkdir(exist_ok=True)
        (out / n / "report.json").write_text(json.dumps({"settings": {}, "prompts": [
            {"benchmark": b, "prompt_id": "0", "new_tokens": 100, "cycles": 50, "mismatch_at": None} for b in benches]}))
else:
    out = next(a.split("=", 1)[1] for a in args if a.startswith("run.output_dir="))
    if os.environ.get("FAKE_SLEEP"):  # a run that takes time: its end logged too, to see what ran side by side
        import time
        time.sleep(float(os.environ["FAKE_SLEEP"]))
        with open(os.environ["FAKE_LOG"], "a") as log:
            log.write("end " + out + "\\n")
    Path(out, "drafter").mkdir(parents=True)
'''


def test_arms_tunes_the_lr_on_the_tuning_prompts_and_trains_with_it(tmp_path):
    """Phase 0b: one TUNE_MIN run per candidate lr and arm, compared on the tuning prompts; the higher τ is
    the arm's lr and reaches its 60-min run; a second call reuses OUT/lr-ARM.txt (no more tuning runs)."""
    wrapper = _fake_python(tmp_path, FAKE_PPOW)
    log, out = tmp_path / "calls.log", tmp_path / "out"
    env = {**os.environ, "PY": str(wrapper), "REAL_PY": sys.executable, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "FAKE_LOG": str(log), "RUNS": "dense expected", "TUNE_LRS": "1.0e-6 3.0e-5",
           "TUNE_MIN": "7", "STOP_AFTER": "tune", "JOBS": "1",
           "FAKE_TAU": json.dumps({"tune-dense-3.0e-5": 2.2, "tune-dense-1.0e-6": 2.1,
                                   "tune-expected-1.0e-6": 2.3, "tune-expected-3.0e-5": 2.0})}
    run = lambda **e: subprocess.run(["bash", "scripts/arms.sh", STARTS["eagle1"], "eagle1", str(out)], cwd=ROOT,
                                     env={**env, **e}, capture_output=True, text=True, timeout=600)
    res = run()
    assert res.returncode == 0, res.stderr + res.stdout
    assert (out / "lr-dense.txt").read_text().strip() == "3.0e-5"
    assert (out / "lr-expected.txt").read_text().strip() == "1.0e-6"
    calls = log.read_text().splitlines()
    tunes = [c for c in calls if c.startswith("train ")]
    assert len(tunes) == 4
    # the feature cache is filled first (JOBS=1: one share, all of it, with arm 1's data), before any timed run
    assert calls[0].startswith("fill 0 1 recipes/smollm2/135M_eagle1_sft_generated.yaml ") and "data.path=" in calls[0]
    assert sum(c.startswith("fill ") for c in calls) == 1
    assert all("run.max_minutes=7" in c and "eval.every_steps=0 " in c for c in tunes)
    assert all("optim.schedule=cosine optim.decay_over=minutes" in c for c in tunes)  # PPOW_SCHEDULE's default
    assert sum("optim.lr=1.0e-6" in c for c in tunes) == 2 and sum("loss.estimator=expected" in c for c in tunes) == 2
    # the arms: each with its chosen lr, 60 minutes, no tuning again
    log.write_text("")
    res = run(STOP_AFTER="", RUNS="dense expected", TUNE_MIN="7")
    trains = [c for c in log.read_text().splitlines() if c.startswith("train ")]
    assert [c.split("run.output_dir=")[1].split()[0] for c in trains] == [f"{out}/dense", f"{out}/expected"]
    assert "optim.lr=3.0e-5" in trains[0] and "optim.lr=1.0e-6" in trains[1]
    assert all("run.max_minutes=60" in c for c in trains)


def test_arms_real_decoding_at_t1_when_asked(tmp_path):
    """T1=N: after the simulated tables, real decoding at T = 1 of the start, arm 1 and BEST on N prompts of
    MT-Bench and of HumanEval, one compare each, and a paired table with both pooled; T1 unset: none."""
    wrapper = _fake_python(tmp_path, FAKE_PPOW)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PY": str(wrapper), "REAL_PY": sys.executable, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "FAKE_LOG": str(log), "RUNS": "cst dense", "LR_dense": "1.0e-5", "BEST": "dense",
           "BENCHES": "mt_bench:2", "PER_DEPTH": "none", "REAL": "1", "JOBS": "2", "FAKE_TAU": "{}"}
    for t1, out in (("3", tmp_path / "t1"), ("0", tmp_path / "none")):
        log.write_text("")
        res = subprocess.run(["bash", "scripts/arms.sh", STARTS["eagle1"], "eagle1", str(out)], cwd=ROOT,
                             env={**env, "T1": t1}, capture_output=True, text=True, timeout=600)
        assert (out / "vs-cst.md").exists(), res.stderr + res.stdout  # the simulated tables came first
        rows = [x.split(" | ")[0] for x in (out / "before_after.md").read_text().splitlines() if x.startswith("| ")]
        assert rows == ["| drafter", "| start", "| cst", "| dense"]  # make demo's three rows
        t1_calls = [c for c in log.read_text().splitlines() if c.startswith("compare ") and "--temperature 1" in c]
        if t1 == "0":
            assert t1_calls == [] and not (out / "vs-start-t1.md").exists()
            continue
        assert sorted(c.split("--benchmarks ")[1].split()[0] for c in t1_calls) == ["humaneval", "mt_bench"]
        assert all("--names start,cst,dense " in c and "--num-prompts 3" in c and "--simulate" not in c
                   for c in t1_calls)
        head = (out / "vs-start-t1.md").read_text().splitlines()[2]
        assert head in ("| drafter | humaneval | mt_bench | all |", "| drafter | mt_bench | humaneval | all |")


def test_arms_with_best_given_train_every_arm_in_one_queue(tmp_path):
    """BEST set: arm 1, BEST, its ablations and the gen_ arms all start before any ends (JOBS covers them), so
    every arm trains under one contention beside the arm 1 it is compared with; BEST unset: the ablations wait
    for arms 1-4 (BEST is chosen from them)."""
    wrapper = _fake_python(tmp_path, FAKE_PPOW)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PY": str(wrapper), "REAL_PY": sys.executable, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "FAKE_LOG": str(log), "RUNS": "cst dense expected no_rdist gen_cst",
           "LR_dense": "1.0e-5", "LR_expected": "1.0e-5", "BENCHES": "mt_bench:2", "PER_DEPTH": "none",
           "REAL": "0", "JOBS": "5", "FAKE_TAU": "{}", "FAKE_SLEEP": "1"}
    for best, out in (("dense", tmp_path / "one"), ("", tmp_path / "two")):
        log.write_text("")
        res = subprocess.run(["bash", "scripts/arms.sh", STARTS["eagle3"], "eagle3", str(out)], cwd=ROOT,
                             env={**env, "BEST": best}, capture_output=True, text=True, timeout=600)
        assert (out / "vs-cst.md").exists(), res.stderr + res.stdout  # trained and compared (fake runs: no curves)
        events = [c.split()[0] if c.startswith("end ") else "start"
                  for c in log.read_text().splitlines() if c.startswith(("train ", "sft ", "end "))]
        assert events.count("start") == 5
        first_end = events.index("end")
        assert events[:first_end].count("start") == (5 if best else 3)


def test_arms_refuses_more_jobs_than_memory_holds(tmp_path):
    """JOBS x MEM_GB_PER_JOB above the available memory: one error line naming the JOBS that fits, exit 2, no
    OUT and no run started (nine EAGLE-3 arms at ~5 GB each once had four killed by the kernel)."""
    wrapper = _fake_python(tmp_path, FAKE_PPOW)
    log, out = tmp_path / "calls.log", tmp_path / "out"
    log.write_text("")
    env = {**os.environ, "PY": str(wrapper), "REAL_PY": sys.executable, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "FAKE_LOG": str(log), "RUNS": "cst", "FAKE_TAU": "{}", "JOBS": "3",
           "MEM_GB_PER_JOB": "100000"}
    res = subprocess.run(["bash", "scripts/arms.sh", STARTS["eagle3"], "eagle3", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    err = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert res.returncode == 2 and len(err) == 1 and "JOBS=3 runs need ~300000 GB" in err[0]
    assert err[0].endswith("lower JOBS to 1")
    assert not out.exists() and log.read_text() == ""


def test_arms_lr_candidates_per_arm(tmp_path):
    """Without TUNE_LRS each PPOW arm tunes its own candidates (arm 4, with the SFT loss in it, up to the SFT
    lr); TUNE_LRS_<arm> replaces one arm's; PPOW_SCHEDULE=constant leaves the recipe's schedule."""
    wrapper = _fake_python(tmp_path, FAKE_PPOW)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNE_LRS")}
    env.update(PY=str(wrapper), REAL_PY=sys.executable, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               FAKE_LOG=str(log), RUNS="dense expected", STOP_AFTER="tune", JOBS="2", FAKE_TAU="{}")

    def lrs(out, **e):
        log.write_text("")
        res = subprocess.run(["bash", "scripts/arms.sh", STARTS["eagle1"], "eagle1", str(tmp_path / out)], cwd=ROOT,
                             env={**env, **e}, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr + res.stdout
        trains = [c for c in log.read_text().splitlines() if c.startswith("train ")]
        got = {arm: sorted(c.split("optim.lr=")[-1].split()[0] for c in trains
                           if ("loss.estimator=expected" in c) == (arm == "expected")) for arm in ("dense", "expected")}
        return got, trains
    got, _ = lrs("a")
    assert got == {"dense": ["2.0e-5", "5.0e-5", "5.0e-6"], "expected": ["3.0e-4", "5.0e-5", "5.0e-6"]}
    got, trains = lrs("b", TUNE_LRS_expected="1.0e-4", PPOW_SCHEDULE="constant")
    assert got == {"dense": ["2.0e-5", "5.0e-5", "5.0e-6"], "expected": ["1.0e-4"]}
    assert not any("optim.schedule=" in c or "decay_over" in c for c in trains)


def test_arms_cosine_continued_sft_decays_over_its_minutes(tmp_path):
    """Arms 1-2 train their whole MINUTES (no step budget) with the cosine decaying over them, as PPOW's arms."""
    res = _dry(["scripts/arms.sh", STARTS["eagle1"], "eagle1", str(tmp_path / "o")], tmp_path,
               RUNS="cst deep_sft", CST_SCHEDULE="cosine", CST_LR="3e-4", MINUTES="30")
    assert res.returncode == 0, res.stderr + res.stdout
    cst, deep = (next(x for x in res.stdout.splitlines() if x.endswith(f"/{a}")) for a in ("cst", "deep_sft"))
    for line in (cst, deep):
        assert ("optim.schedule=cosine optim.warmup_steps=100 optim.decay_over=minutes run.max_steps=1000000 "
                in line) and "run.max_minutes=30 " in line
    assert "optim.lr=3e-4 " in cst and "sft.multi_step=4" in deep
    bad = _dry(["scripts/arms.sh", STARTS["eagle1"], "eagle1", str(tmp_path / "o")], tmp_path, CST_SCHEDULE="step")
    assert bad.returncode != 0 and "CST_SCHEDULE must be constant or cosine, not 'step'" in bad.stderr


def test_arms_links_arm_1_from_the_round_that_ran_its_config(tmp_path):
    """CST_FROM: a finished run with arm 1's resolved config (eval and checkpoint spacing aside), from START, in
    <= MINUTES of training, becomes OUT/cst without training; a different lr, another start or too many minutes
    are refused (exit 2, nothing linked)."""
    from ppow_plugin.config import config_to_dict, load_config
    dry = _dry(["scripts/arms.sh", STARTS["eagle1"], "eagle1", str(tmp_path / "o")], tmp_path, RUNS="cst")
    line = next(x for x in dry.stdout.splitlines() if x.startswith("+ ppow validate ") and x.endswith("/cst"))
    recipe, *overrides = line.split()[3:-1]  # without run.output_dir

    def finished(name: str, extra: list[str], train_s: float) -> Path:
        run = tmp_path / name
        (run / "drafter").mkdir(parents=True)
        cfg = config_to_dict(load_config(ROOT / recipe, [*overrides, *extra, "eval.every_steps=2400",
                                                         "run.max_minutes=600", "run.save_every=1200"]))
        (run / "drafter" / "ppow_meta.json").write_text(json.dumps({"config": cfg}))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 14400, "train_s": train_s}) + "\n")
        return run

    wrapper = _fake_python(tmp_path, FAKE_PPOW)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PY": str(wrapper), "REAL_PY": sys.executable, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "FAKE_LOG": str(log), "RUNS": "cst", "JOBS": "1", "FAKE_TAU": "{}"}
    arms = lambda out, run: subprocess.run(["bash", "scripts/arms.sh", STARTS["eagle1"], "eagle1", str(out)],
                                           cwd=ROOT, env={**env, "CST_FROM": str(run)}, capture_output=True,
                                           text=True, timeout=600)
    good = finished("round", [f"model.drafter={ROOT / STARTS['eagle1']}"], 3601.0)  # the step that crossed 60 min
    res = arms(tmp_path / "ok", good)
    assert (tmp_path / "ok" / "cst").resolve() == good.resolve(), res.stderr
    assert not any(c.startswith("sft ") for c in log.read_text().splitlines())
    for name, extra, train_s, why in [
            ("lr", ["optim.lr=5e-5"], 3400.0, "optim.lr=5e-05 (arm 1: 0.0003)"),
            ("other", ["model.drafter=" + str(ROOT / STARTS["eagle3"])], 3400.0, "it continued"),
            ("long", [], 3700.0, "it trained 61.7 min, more than MINUTES=60")]:
        res = arms(tmp_path / f"out-{name}", finished(name, extra, train_s))
        assert res.returncode == 2 and why in res.stderr, (name, res.stderr)
        assert not (tmp_path / f"out-{name}" / "cst").exists()


@pytest.mark.parametrize("family", ["eagle1", "eagle3"])
def test_converge_minutes_round_is_arm_1(family, tmp_path):
    """converge.sh with MINUTES=60 resolves to arm 1's config (what CST_FROM compares); its default step budget
    does not (CST_FROM would refuse such a round)."""
    from ppow_plugin.config import config_to_dict, load_config
    skip = ("eval.", "run.save_every", "run.output_dir")

    def resolved(line: str) -> dict:
        recipe, *overrides = line.split()
        flat = {f"{s}.{k}": v for s, sec in config_to_dict(load_config(ROOT / recipe, overrides)).items()
                if isinstance(sec, dict) for k, v in sec.items()}
        return {k: v for k, v in flat.items() if not k.startswith(skip)}

    arm = _dry(["scripts/arms.sh", STARTS[family], family, str(tmp_path / "o")], tmp_path, RUNS="cst")
    arm_line = next(x for x in arm.stdout.splitlines() if x.startswith("+ ppow validate ") and x.endswith("/cst"))
    want = resolved(arm_line.removeprefix("+ ppow validate "))
    rounds = {}
    for budget in ("60", None):
        env = {"MINUTES": budget} if budget else {}
        res = _dry(["scripts/converge.sh", STARTS[family], family, str(tmp_path / "c")], tmp_path, **env)
        assert res.returncode == 0, res.stderr + res.stdout
        line = next(x for x in res.stdout.splitlines() if x.startswith("DRY=1: config valid"))
        rounds[budget] = resolved(line.split(": ppow sft ", 1)[1])
    assert rounds["60"] == want
    differs = {k for k in want if rounds[None].get(k) != want[k]}
    assert differs == {"optim.decay_over", "run.max_steps", "run.max_minutes"}


FAKE_ROUNDS = '''
import json, os, re, shutil, subprocess, sys
from pathlib import Path
args = sys.argv[1:]
if args[:2] != ["-m", "ppow_plugin.cli"] or args[2] not in ("sft", "compare"):
    sys.exit(subprocess.call([os.environ["REAL_PY"], *args]))
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(" ".join(args[2:]) + "\\n")
if args[2] == "sft":  # the continued drafter: a copy of its start
    get = lambda key: next(a.split("=", 1)[1] for a in args if a.startswith(key + "="))
    shutil.copytree(get("model.drafter"), Path(get("run.output_dir")) / "drafter")
else:
    out = Path(args[args.index("--out") + 1])
    value, low, high = json.loads(os.environ["FAKE_GAINS"])[re.search(r"round-(\\d+)", str(out)).group(1)]
    out.mkdir(parents=True, exist_ok=True)
    change = {"value": value, "low": low, "high": high, "text": f"{value:+.1%} [{low:+.1%}, {high:+.1%}]"}
    (out / "compare.json").write_text(json.dumps({"drafters": {"start": {"overall": {"tau": 2.0}},
                                                   "cont-sft": {"overall": {"tau": 2.0, "tau_change_vs_reference": change}}}}))
    (out / "compare.md").write_text("fake\\n")
'''


def test_rounds_continue_sft_until_an_hour_gains_nothing(tmp_path):
    """rounds.sh: round r starts from round r-1's drafter; the first round whose gain is < +1 % with an
    interval covering 0 (tuning and MT-Bench) names its start converged; a rerun trains nothing again; a gain
    of +0.5 % [+0.1, +0.9] (interval above 0) is not converged; MAX_ROUNDS without convergence fails."""
    wrapper = _fake_python(tmp_path, FAKE_ROUNDS)
    log, out = tmp_path / "calls.log", tmp_path / "out"
    gains = {"1": [0.065, 0.05, 0.08], "2": [0.005, 0.001, 0.009], "3": [0.004, -0.003, 0.011]}
    env = {**os.environ, "PY": str(wrapper), "REAL_PY": sys.executable, "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "FAKE_LOG": str(log), "FAKE_GAINS": json.dumps(gains)}
    run = lambda **e: subprocess.run(["bash", "scripts/rounds.sh", STARTS["eagle1"], "eagle1", str(out)], cwd=ROOT,
                                     env={**env, **e}, capture_output=True, text=True, timeout=900)
    res = run()
    assert res.returncode == 0, res.stderr + res.stdout
    assert (out / "converged.txt").read_text().strip() == f"{out}/round-2/sft/drafter"
    sfts = [c for c in log.read_text().splitlines() if c.startswith("sft ")]
    assert [c.split("model.drafter=")[1].split()[0] for c in sfts] == [
        STARTS["eagle1"], f"{out}/round-1/sft/drafter", f"{out}/round-2/sft/drafter"]
    table = (out / "rounds.md").read_text().splitlines()
    assert len(table) == 5 and table[-1].endswith("| converged |") and table[-2].endswith("| not |")
    log.write_text("")
    assert run().returncode == 0 and "sft " not in log.read_text()  # resumed: read back, nothing retrained
    res = run(MAX_ROUNDS="2")
    assert res.returncode == 1 and "no converged start after 2 rounds" in res.stderr
