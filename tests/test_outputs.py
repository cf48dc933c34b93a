"""Nothing lost, nothing ambiguous (issue 16, docs/reliability.md "Outputs and run directories"): where each
command may write, one run per run directory, a metrics history that matches the weights, no stale
temps, and the CLI's own surface (--version, bare `ppow`, --print-defaults, quiet output).

Every refusal is checked for its one `error:` line, exit code 2, and an unchanged tree (`snapshot`)."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import warnings
import logging
from pathlib import Path

import pytest
import yaml

from ppow_plugin import outputs, quiet
from ppow_plugin.host import patching
from ppow_plugin.training import rundir, trainer
from ppow_plugin.cli import main as cli_main
from ppow_plugin.config import Config, config_to_dict, load_config
from ppow_plugin.errors import UserError
from cli_checks import ppow, snapshot
from tiny import overrides, recipe_file, wait_for_checkpoint

needs_host = pytest.mark.skipif(patching.patch_status().state != "patched",
                                reason="the EAGLE host is not installed and patched (`ppow patch apply`)")


def refused_unchanged(capsys, root: Path, match: str, *argv) -> None:
    before = snapshot(root)
    code, err = ppow(capsys, *argv)
    assert code == 2 and re.fullmatch("error: " + match, err), err
    assert snapshot(root) == before


def user_files(root: Path) -> Path:
    """A folder holding someone's work (what the issue's sweep lost)."""
    (root / "sub").mkdir(parents=True)
    (root / "thesis.tex").write_text("chapter 1")
    (root / "sub" / "data.csv").write_text("a,b\n1,2\n")
    (root / "notes").write_text("keep me")
    return root


def fake_drafter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    return path


# ---------------------------------------------------------------------------------------------------
# eval / compare / export / profile outputs


def test_eval_and_compare_refuse_a_non_empty_out_and_never_take_an_inputs_folder(tmp_path, capsys, monkeypatch):
    d1, d2 = fake_drafter(tmp_path / "d1"), fake_drafter(tmp_path / "d2")
    work = user_files(tmp_path / "work")
    refused_unchanged(capsys, tmp_path, rf"--out {work} is not empty \(notes, sub/, thesis.tex\); pass --force to "
                      "replace it, or choose a new folder", "eval", "--drafter", d1, "--out", work)
    refused_unchanged(capsys, tmp_path, rf"--out {work} is not empty .*", "compare", d1, d2, "--out", work)
    for force in ([], ["--force"]):  # an input's own folder: not even with --force
        refused_unchanged(capsys, tmp_path, rf"--out {d1} is the --drafter {d1}; writing there would destroy it: "
                          "choose a folder outside the inputs", "eval", "--drafter", d1, "--out", d1, *force)
        refused_unchanged(capsys, tmp_path, rf"--out {tmp_path} holds the --drafter {d1}; .*",
                          "eval", "--drafter", d1, "--out", tmp_path, *force)
        refused_unchanged(capsys, tmp_path, rf"--out {d2} is the drafter #2 {d2}; .*",
                          "compare", d1, d2, "--out", d2, *force)
        refused_unchanged(capsys, tmp_path, rf"--out {d1}/.. holds the --drafter .*",
                          "eval", "--drafter", d1, "--out", f"{d1}/..", *force)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  target: {d2}\n")  # the recipe's target is an input too
    refused_unchanged(capsys, tmp_path, rf"--out {d2} is the --target {d2}; .*",
                      "eval", "--recipe", recipe, "--drafter", d1, "--out", d2, "--force")
    # --force lets a non-empty, non-input folder through the guard (this fake drafter fails next, before any write)
    refused_unchanged(capsys, tmp_path, r"(?!--out).*", "eval", "--drafter", d1, "--target", d2,
                      "--out", work, "--force", "--benchmarks", "mt_bench", "--num-prompts", "1")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        refused_unchanged(capsys, tmp_path, f"--out {re.escape(out)} is the current directory or one of its parents; "
                          "replacing it would delete what you are working in: choose a new folder",
                          "eval", "--drafter", d1, "--out", out, "--force")


def test_export_and_profile_outputs_follow_the_same_rule(tmp_path, capsys, monkeypatch):
    src = fake_drafter(tmp_path / "src")
    report = tmp_path / "reports" / "report.json"
    report.parent.mkdir()
    report.write_text('{"tau": 2.0}')
    refused_unchanged(capsys, tmp_path, rf"output {tmp_path} holds the SRC {src}; .*",
                      "export", src, tmp_path, "--format", "eagle1", "--force")
    refused_unchanged(capsys, tmp_path, rf"output {report.parent} holds the --eval-report {report}; .*",
                      "export", src, report.parent, "--format", "eagle1", "--eval-report", report, "--force")
    monkeypatch.chdir(src)
    refused_unchanged(capsys, tmp_path, r"output \. is the current directory or one of its parents; .*",
                      "export", "../src", ".", "--format", "eagle1", "--force")
    monkeypatch.chdir(tmp_path)
    prof = tmp_path / "profile.json"
    prof.write_text("{}")
    refused_unchanged(capsys, tmp_path, rf"--out {prof} exists; pass --force to replace it, or choose a new file name",
                      "profile", "--out", prof)
    refused_unchanged(capsys, tmp_path, rf"--out {report} is the --eval-report {report}; .*",
                      "profile", "--out", report, "--eval-report", report, "--force")
    refused_unchanged(capsys, tmp_path, rf"--out {src} is a directory; pass a file name \(e.g. {src}/profile.json\)",
                      "profile", "--out", src, "--force")


def test_check_output_lets_through_new_empty_and_forced_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    full = user_files(tmp_path / "full")
    assert outputs.check_output("new/deeper", {}, False, "--out") == tmp_path / "new" / "deeper"
    assert outputs.check_output("empty", {"--drafter": "d"}, False, "--out") == tmp_path / "empty"
    assert outputs.check_output(full, {"--drafter": "d"}, True, "--out") == full
    with pytest.raises(outputs.UserError, match="is not empty"):
        outputs.check_output(full, {}, False, "--out")
    link = tmp_path / "link"
    link.symlink_to(full)  # a link to an input is that input
    with pytest.raises(outputs.UserError, match="is the --drafter"):
        outputs.check_output(link, {"--drafter": full}, True, "--out")


# ---------------------------------------------------------------------------------------------------
# run.output_dir


@needs_host
def test_run_dir_holding_someone_elses_files_or_the_runs_inputs_is_refused(tmp_path, capsys):
    work = user_files(tmp_path / "work")
    recipe = recipe_file(tmp_path, "sft", **{"run.output_dir": work})
    refused_unchanged(capsys, tmp_path, rf"run.output_dir {work} is not empty and holds no ppow run \(notes, sub/, "
                      r"thesis.tex\); choose a new or empty folder", "sft", recipe)
    drafter = fake_drafter(tmp_path / "runs" / "sft" / "drafter")
    recipe = recipe_file(tmp_path, "ppow", **{"run.output_dir": tmp_path / "runs" / "sft", "model.drafter": drafter})
    refused_unchanged(capsys, tmp_path, rf"run.output_dir {tmp_path / 'runs' / 'sft'} holds the model.drafter "
                      rf"{drafter}; writing there would destroy it: choose a folder outside the inputs",
                      "train", recipe)
    recipe = recipe_file(tmp_path, "sft", **{"run.output_dir": tmp_path})  # holds model.target and data.path
    refused_unchanged(capsys, tmp_path, rf"run.output_dir {tmp_path} holds the model.target .*", "sft", recipe)


# ---------------------------------------------------------------------------------------------------
# one run per run directory


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding `run_dir`'s lock until killed."""
    code = ("import sys, time; from ppow_plugin.training import rundir; l = rundir.RunLock(sys.argv[1]).__enter__(); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_run_lock_refuses_a_live_holder_and_takes_a_dead_ones(tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        assert (run / "run.lock").read_text() == f"{holder.pid}\n"
        with pytest.raises(outputs.UserError, match=rf"in use by another ppow run \(pid {holder.pid}\)"):
            rundir.RunLock(run).__enter__()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / "run.lock").exists()  # a crash leaves the file behind: stale, because the kernel dropped the lock
    with rundir.RunLock(run):
        assert (run / "run.lock").read_text() == f"{os.getpid()}\n"
    assert list(run.iterdir()) == []  # removed on exit
    fresh = tmp_path / "a" / "b"
    with rundir.RunLock(fresh):
        pass
    assert not (tmp_path / "a").exists()  # and so are the folders it created, when left empty
    with rundir.RunLock(run):
        with pytest.raises(outputs.UserError, match=rf"pid {os.getpid()}"):  # flock is per open file, not per process
            rundir.RunLock(run).__enter__()


def test_only_rank_zero_takes_the_lock(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "1")
    assert rundir.lock_for_rank(tmp_path) is None
    monkeypatch.setenv("RANK", "0")
    assert isinstance(rundir.lock_for_rank(tmp_path), rundir.RunLock)
    monkeypatch.delenv("RANK")
    assert isinstance(rundir.lock_for_rank(tmp_path), rundir.RunLock)


@needs_host
def test_second_train_is_refused_at_once_and_ctrl_c_prints_the_resume_command(tmp_path):
    run = tmp_path / "run"
    recipe = recipe_file(tmp_path, "sft", **{"run.output_dir": run, "run.max_steps": 100000, "run.save_every": 1})
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-m", "ppow_plugin.cli", "sft", str(recipe), "run.keep_last=2", "run.resume=false"]
    # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: under `bash .ci/run &` Ctrl-C would never reach the run. A terminal's Ctrl-C always does.
    first = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for_checkpoint(first, run / "checkpoints", 1)
        before = snapshot(tmp_path, skip=run)  # the running run's own files change meanwhile
        second = subprocess.Popen([*argv[:-1], "run.resume=true"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(second.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 2 and second.stdout.read() == ""
        assert second.stderr.read() == (f"error: run.output_dir {run} is in use by another ppow run (pid {first.pid}); "
                                        "wait for it to finish (or stop it), or choose another run.output_dir\n")
        # refused before torch loads: CPU time, which the 2 shared cores' load does not inflate (measured ~0.25 s)
        assert usage.ru_utime + usage.ru_stime < 1.0, usage
        assert snapshot(tmp_path, skip=run) == before
        assert (run / "run.lock").read_text() == f"{first.pid}\n" and first.poll() is None  # the first runs on
        first.send_signal(signal.SIGINT)  # Ctrl-C
        assert first.wait(timeout=120) == 130
    finally:
        first.kill()
        first.wait()
    last = first.stderr.read().splitlines()[-1]
    command = shlex.join(["ppow", "sft", str(recipe), "run.keep_last=2", "run.resume=true"])
    assert last == f"interrupted: checkpoints so far are in {run / 'checkpoints'}; continue with: {command}"
    assert not (run / "run.lock").exists()


# ---------------------------------------------------------------------------------------------------
# metrics history, stale temps, the interrupted line


def metric_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def train(tmp_path, **extra) -> trainer.Trainer:
    t = trainer.Trainer(load_config(None, overrides(tmp_path, "sft", **extra)))
    t.setup()
    t.train()
    t.cleanup()
    return t


def test_cut_history_keeps_complete_rows_up_to_the_step(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4, 4, 4, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 6, "lo')  # torn last row (SIGKILL)
    assert rundir.cut_history(tmp_path, 3) == tmp_path / "metrics.jsonl.before-resume-1"
    assert metric_steps(tmp_path / "metrics.jsonl") == [1, 2, 3]
    assert (tmp_path / "metrics.jsonl.before-resume-1").read_text().startswith("".join(rows))
    assert rundir.cut_history(tmp_path, 3) is None  # nothing to cut: left alone, nothing moved aside
    assert rundir.cut_history(tmp_path, 0) == tmp_path / "metrics.jsonl.before-resume-2"
    assert (tmp_path / "metrics.jsonl").read_text() == ""


@needs_host
def test_metrics_after_resume_fallback_and_fresh_start_list_each_step_once(tmp_path, capfd):
    common = {"run.save_every": 1, "run.keep_last": 5}
    train(tmp_path, **common, **{"run.max_steps": 4})
    run = tmp_path / "run-sft"
    assert metric_steps(run / "metrics.jsonl") == [1, 2, 3, 4]
    newest = run / "checkpoints" / "step-000004" / "engine.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # corrupt: resume falls back to step 3
    train(tmp_path, **common, **{"run.max_steps": 5, "run.resume": True})
    assert metric_steps(run / "metrics.jsonl") == [1, 2, 3, 4, 5]  # was [1, 2, 3, 4, 4, 5]
    assert metric_steps(run / "metrics.jsonl.before-resume-1") == [1, 2, 3, 4]
    cut = "metrics.jsonl cut back to step 3; the earlier rows are in metrics.jsonl.before-resume-1"
    assert cut in capfd.readouterr().err
    for ckpt in (run / "checkpoints").iterdir():
        ckpt.rename(run / "checkpoints" / f"step-{ckpt.name[-6:]}.tmp")  # nothing usable: "starting fresh"
    train(tmp_path, **common, **{"run.max_steps": 2, "run.resume": True})
    assert metric_steps(run / "metrics.jsonl") == [1, 2]
    assert metric_steps(run / "metrics.jsonl.before-resume-2") == [1, 2, 3, 4, 5]


@needs_host
def test_stale_temp_dirs_of_a_killed_run_are_removed_and_only_those(tmp_path, capfd):
    train(tmp_path, **{"run.max_steps": 2, "run.save_every": 1})
    run = tmp_path / "run-sft"
    left = ["checkpoints/step-000003.tmp", "checkpoints/.step-000002.old-123", ".drafter.tmp-abc", ".drafter.old-9"]
    for rel in left:  # what SIGKILL during a checkpoint save or an export leaves
        (run / rel).mkdir()
        (run / rel / "engine.pt").write_bytes(b"partial")
    (run / "notes.txt").write_text("mine")
    (run / "checkpoints" / "step-000003.tmp.mine").write_text("not our name")
    capfd.readouterr()
    train(tmp_path, **{"run.max_steps": 3, "run.save_every": 1, "run.resume": True})
    assert not any((run / rel).exists() for rel in left)
    assert (run / "notes.txt").read_text() == "mine" and (run / "checkpoints" / "step-000003.tmp.mine").exists()
    assert ("removed what an interrupted run left: .drafter.old-9, .drafter.tmp-abc, "
            "checkpoints/.step-000002.old-123, checkpoints/step-000003.tmp") in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------------
# eval flags, --version, bare ppow, help, --print-defaults


def test_eval_num_prompts_beyond_the_benchmark_and_empty_benchmarks_are_refused(tmp_path, capsys):
    d = fake_drafter(tmp_path / "d")
    out = tmp_path / "o"
    refused_unchanged(capsys, tmp_path, r"--num-prompts 100000 is more prompts than there are \(mt_bench has 80\): "
                      "pass --num-prompts 80 or fewer", "eval", "--drafter", d, "--out", out,
                      "--benchmarks", "mt_bench", "--num-prompts", "100000")
    refused_unchanged(capsys, tmp_path, r"--num-prompts 81 is more prompts than there are \(mt_bench has 80\): pass "
                      "--num-prompts 80 or fewer or leave out mt_bench", "eval", "--drafter", d, "--out", out,
                      "--benchmarks", "mt_bench,humaneval", "--num-prompts", "81")
    refused_unchanged(capsys, tmp_path, r"--benchmarks \[''\]: eval.benchmarks \(\[''\]\) must be a non-empty list, "
                      r"e.g. \[mt_bench, humaneval, sharegpt\]",
                      "eval", "--drafter", d, "--out", out, "--benchmarks", "")
    assert not out.exists()


def test_version_bare_ppow_and_where_recipe_keys_are_listed(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0 and re.fullmatch(r"ppow \d+\.\d+\.\d+\n", capsys.readouterr().out)
    assert cli_main([]) == 2
    help_ = capsys.readouterr().err
    assert all(f"\n    {cmd} " in help_ for cmd in ("train", "sft", "eval", "export", "validate"))
    for cmd in ("train", "sft", "eval"):
        with pytest.raises(SystemExit):
            cli_main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--verbose" in text
        if cmd != "eval":
            assert "`ppow validate --print-defaults` lists every key with its default" in text
    with pytest.raises(SystemExit):
        cli_main(["eval", "--help"])
    assert "(default: ./eval-report)" in " ".join(capsys.readouterr().out.split())


def test_print_defaults_is_a_recipe_of_every_key_with_its_default(tmp_path, capsys):
    assert cli_main(["validate", "--print-defaults"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "defaults.yaml").write_text(text)
    assert yaml.safe_load(text) == config_to_dict(Config())
    assert config_to_dict(load_config(tmp_path / "defaults.yaml")) == config_to_dict(Config())
    assert ppow(capsys, "validate") == (2, "error: validate needs a recipe YAML (or --print-defaults to list every "
                                           "key)")


# ---------------------------------------------------------------------------------------------------
# quiet output


def test_known_third_party_noise_is_hidden_and_everything_else_kept(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    shown: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: shown.append(record.getMessage())
    loggers = {name: logging.getLogger(name) for name, _, _ in quiet.LOG_NOISE}
    for lg in loggers.values():  # all undone after the test (conftest sets transformers to errors only)
        monkeypatch.setattr(lg, "filters", list(lg.filters))
        monkeypatch.setattr(lg, "handlers", [collect])
        monkeypatch.setattr(lg, "propagate", False)
        monkeypatch.setattr(lg, "level", logging.WARNING)
        lg.manager._clear_cache()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.hide_third_party_noise()
        warnings.warn("`rope_scaling` is deprecated and will be removed", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    assert os.environ["TQDM_DISABLE"] == "1"
    for name, text, _ in quiet.LOG_NOISE:
        loggers[name].warning(f"x {text} y")
        loggers[name].warning("a warning nobody listed")
    assert shown == ["a warning nobody listed"] * len(quiet.LOG_NOISE)
    monkeypatch.undo()
    logging.getLogger().manager._clear_cache()  # forget the levels cached while the test's were set


@needs_host
def test_train_prints_at_most_two_lines_before_the_progress_bar(tmp_path):
    recipe = recipe_file(tmp_path, "sft", **{"run.output_dir": tmp_path / "run", "run.max_steps": 1})
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "ppow_plugin.cli", "sft", str(recipe)], env=env,
                          capture_output=True, text=True, check=True)
    shown = [x.rstrip("\r").split("\r")[-1] for x in done.stderr.split("\n")]  # a redrawn bar is one line
    shown = [x for x in shown if x.strip()]
    before_bar = shown[:next(i for i, x in enumerate(shown) if x.startswith("train:"))]
    # the data scan's bar (fresh target: no scan cache), then its counts; without the filters also 10 lines
    # of GenerationMixin (twice), rope_scaling and "Loading weights" bars (`--verbose` shows them)
    assert len(before_bar) <= 2 and before_bar[-1].startswith("data: "), done.stderr
    assert done.stdout.splitlines() == [f"drafter written to {tmp_path / 'run' / 'drafter'}"]


def test_paths_the_system_cannot_take_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """Found by the CLI fuzz: a NUL byte in a path and a name longer than the OS allows were tracebacks."""
    monkeypatch.chdir(tmp_path)
    drafter = Path(__file__).resolve().parents[1] / "assets" / "drafters" / "smollm2-135m-eagle1-sft-gen"
    refused_unchanged(capsys, tmp_path, r"--drafter contains a NUL byte; pass a real value",
                      "eval", "--drafter", "a\x00b", "--out", "o")
    refused_unchanged(capsys, tmp_path, r"out: a name in it is longer than the system allows \(255 bytes\); pass a shorter one",
                      "eval", "--drafter", drafter, "--out", "x" * 300)
    with pytest.raises(UserError, match="NUL byte"):
        outputs.check_output("o", {"--drafter": "\x00"}, False, "--out")
