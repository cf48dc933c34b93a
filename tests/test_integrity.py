"""Nothing silently wrong on disk (issue 30, docs/reliability.md "Files read back"): every file the program
reads back from its own caches and outputs is verified; a damaged cache entry is rebuilt with one warning,
damaged data is refused with one `error:` line; `ppow data generate` extends a run without gaps and writes
only through the output guard. Tiny random target through the CLI entry point; ~40 s in all."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ppow_plugin.data import continuations, feature_cache, samples
from ppow_plugin.data import generate as gen_data  # `generate` below runs the CLI
from ppow_plugin.data import shards as gen_shards
from ppow_plugin.drafters import drafter_source
from ppow_plugin.host import integrity
from ppow_plugin.cli import main as cli_main
from ppow_plugin.errors import UserError
from ppow_plugin.method.rollout import TargetPass
from cli_checks import ppow, snapshot
from tiny import make_conversations, make_target

ROOT = Path(__file__).resolve().parents[1]
D = ROOT / "assets" / "drafters" / "smollm2-135m-eagle1-sft-gen"
ASSET_CACHE = os.environ.get("PPOW_CACHE")  # where `ppow prepare` put the default target (None: ~/.cache/ppow)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("integrity")
    return make_target(tmp / "target", layers=2), make_conversations(tmp / "convs.jsonl", n=10)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PPOW_CACHE", str(tmp_path / "cache"))
    integrity._WARNED.clear()


def generate(capsys, tiny, out, *flags) -> tuple[int, str]:
    target, convs = tiny
    return ppow(capsys, "data", "generate", "--target", target, "--dataset", "jsonl", "--path", convs,
                "--max-new-tokens", "2", "--batch-size", "1", *flags, "--out", out)


def refused(capsys, root: Path, match: str, *argv) -> None:
    """One `error:` line matching `match`, exit 2, nothing under `root` written, changed or deleted (but the
    asset cache, $PPOW_CACHE = root/cache: the benchmarks' decoded-prompt cache is the program's own)."""
    skip = root / "cache"
    before = snapshot(root, skip)
    code, err = ppow(capsys, *argv)
    assert code == 2 and re.fullmatch("error: " + match, err), err
    assert snapshot(root, skip) == before


def indices(out: Path) -> list[list[int]]:
    return [s.index.tolist() for s in gen_shards.read_shards(out)]


# ---------------------------------------------------------------------------------------------------
# generated data: extended without a gap, never reused under other settings, damage refused


def test_extending_a_run_completes_its_partial_last_shard(tiny, tmp_path, capsys):
    g, fresh = tmp_path / "G", tmp_path / "fresh"
    assert generate(capsys, tiny, g, "--shard-size", "2", "--num-prompts", "3") == (0, "")
    assert indices(g) == [[0, 1], [2]]
    assert generate(capsys, tiny, g, "--shard-size", "2", "--num-prompts", "6") == (0, "")
    assert indices(g) == [[0, 1], [2, 3], [4, 5]]  # was [0,1] [2] [4,5]: index 3 never generated
    assert generate(capsys, tiny, fresh, "--shard-size", "2", "--num-prompts", "6") == (0, "")
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(gen_shards.read_shards(g), gen_shards.read_shards(fresh)))
    assert json.loads((g / "provenance.json").read_text())["totals"]["prompts"] == 6
    before = snapshot(g)
    assert generate(capsys, tiny, g, "--shard-size", "2", "--num-prompts", "4") == (0, "")  # fewer: nothing to do
    assert snapshot(g) == before


def test_unreadable_or_missing_provenance_is_refused_not_overwritten(tiny, tmp_path, capsys):
    g = tmp_path / "G"
    assert generate(capsys, tiny, g, "--shard-size", "2", "--num-prompts", "2") == (0, "")
    shard = gen_shards.read_shards(g)[0]
    (g / "provenance.json").write_text("{x")
    refused(capsys, tmp_path, re.escape(f"{g}/provenance.json is damaged (unreadable: JSONDecodeError: ")
            + r".*\); it records the settings its shards were made with, so they cannot be reused or checked: "
            + re.escape(f"restore the file, or delete {g} and generate again"),
            "data", "generate", "--target", tiny[0], "--dataset", "jsonl", "--path", tiny[1],
            "--max-new-tokens", "3", "--batch-size", "1", "--shard-size", "2", "--num-prompts", "4", "--out", g)
    (g / "provenance.json").unlink()  # gone altogether: the shards' settings are unknown as well
    refused(capsys, tmp_path, re.escape(f"{g} holds generated shards but no provenance.json, so the settings they "
                                        "were made with are unknown; restore the file, or pass another --out"),
            "data", "generate", "--target", tiny[0], "--dataset", "jsonl", "--path", tiny[1],
            "--max-new-tokens", "3", "--batch-size", "1", "--shard-size", "2", "--num-prompts", "4", "--out", g)
    again = gen_shards.read_shards(g)
    assert len(again) == 1 and again[0].index.tolist() == [0, 1]  # the max_new_tokens=2 shard, not reused as 3
    assert np.array_equal(again[0].ids, shard.ids)


def test_damaged_shard_is_refused_by_generate_validate_and_training(tiny, tmp_path, capsys):
    g = tmp_path / "G"
    assert generate(capsys, tiny, g, "--shard-size", "2", "--num-prompts", "4") == (0, "")
    path = g / "shard-00001.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    fix = re.escape(f"generated shard {path} is damaged (") + r"unreadable: .*" + re.escape(
        f"); delete it and rerun the `ppow data generate` that made {g} (its settings are in provenance.json) "
        "to regenerate it")
    refused(capsys, tmp_path, fix, "data", "generate", "--target", tiny[0], "--dataset", "jsonl", "--path", tiny[1],
            "--max-new-tokens", "2", "--batch-size", "1", "--shard-size", "2", "--num-prompts", "6", "--out", g)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stage: sft\nmodel: {{target: {tiny[0]}}}\ndata: {{dataset: generated, path: {g}}}\n")
    refused(capsys, tmp_path, fix, "validate", recipe)  # said "ok ... valid" before
    with pytest.raises(UserError, match=re.escape(f"generated shard {path} is damaged")):  # what sft/train read
        gen_shards.load_generated(g, max_len=64, heldout_fraction=0.0)


def test_validate_and_train_refuse_what_train_refused_only_after_loading_the_target(tiny, tmp_path, capsys):
    """`validate` runs every check `train` runs before it loads weights (preflight.py)."""
    e3 = ROOT / "assets" / "drafters" / "smollm2-135m-eagle3-sft-gen"
    recipe = ROOT / "recipes" / "smollm2" / "135M_eagle1_ppow.yaml"
    for cmd in ("validate", "train"):
        refused(capsys, tmp_path, re.escape(f"model.drafter={e3} holds an eagle3 drafter but the recipe says "
                                            "model.drafter_type=eagle1; set model.drafter_type=eagle3 or pass an "
                                            "EAGLE-1 drafter dir"),
                cmd, recipe, f"model.drafter={e3}", f"run.output_dir={tmp_path / 'run'}")
    refused(capsys, tmp_path, re.escape(f"data.path={D} is not a `ppow data generate` output dir (its "
                                        "provenance.json records no generation settings); pass the --out of "
                                        "`ppow data generate`"),  # said "raise data.max_len"
            "validate", recipe, "rollout.verify=data", f"data.path={D}")
    refused(capsys, tmp_path, re.escape(f"model.target={D} has no tokenizer (none of tokenizer.json, "
                                        "tokenizer.model, vocab.json, spiece.model, vocab.txt) (it is a drafter: "
                                        "pass the target it drafts for); pass a model directory with its tokenizer, "
                                        "or 'default'"),
            "validate", recipe, f"model.target={D}")


def test_a_target_without_a_tokenizer_is_one_line(tiny, tmp_path, capsys):
    no_tok = "has no tokenizer \\(none of tokenizer.json, tokenizer.model, vocab.json, spiece.model, vocab.txt\\) " \
             "\\(it is a drafter: pass the target it drafts for\\); pass a model directory with its tokenizer, " \
             "or 'default'"
    refused(capsys, tmp_path, re.escape(f"--target {D} ") + no_tok,
            "data", "generate", "--target", D, "--num-prompts", "1", "--out", tmp_path / "G")
    refused(capsys, tmp_path, re.escape(f"--target {D} ") + no_tok,
            "eval", "--drafter", D, "--target", D, "--simulate", "--benchmarks", "mt_bench", "--num-prompts", "1",
            "--out", tmp_path / "E")
    from ppow_plugin.training.trainer import _resolve_target  # what sft/train open (after the preflight above)
    with pytest.raises(UserError, match=re.escape(f"model.target={D} ") + no_tok):
        _resolve_target(str(D))


def test_duplicate_prompt_ids_are_refused_before_any_model_loads(tmp_path, capsys):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt":"Hello, who are you?","id":"a"}\n{"prompt":"Write a haiku about rain.","id":"a"}\n')
    refused(capsys, tmp_path, re.escape(f"{p}:2: id 'a' is also the id of line 1; give every prompt its own id "
                                        "(or leave the ids out: the line number is used)"),
            "compare", D, D, "--names", "a,b", "--simulate", "--max-new-tokens", "4", "--prompts", p,
            "--out", tmp_path / "C")  # was -25.0 % [-50, +0] for a drafter against itself


# ---------------------------------------------------------------------------------------------------
# `ppow data generate` under the output guard


def test_generate_out_follows_the_output_rules(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f").write_text("a file")
    notes = tmp_path / "N"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    drafters = tmp_path / "drafters"
    shutil.copytree(D, drafters / D.name)
    cases = [("f", "--out f exists and is not a directory; choose another path"),
             ("f/sub", f"--out f/sub is under {tmp_path}/f, which is a file, not a folder; choose another path"),
             (".", "--out . is the current directory or one of its parents; replacing it would delete what you are "
                   "working in: choose a new folder"),
             (notes, f"--out {notes} is not empty and holds no `ppow data generate` output (notes.txt); choose a "
                     "new or empty folder"),
             (drafters, f"--out {drafters} is not empty and holds no `ppow data generate` output ({D.name}/); "
                        "choose a new or empty folder"),
             (drafters / D.name, f"--out {drafters / D.name} is not empty and holds no `ppow data generate` output "
                                 "(config.json, model.safetensors, ppow_meta.json); choose a new or empty folder"),
             (tiny[0], f"--out {tiny[0]} is the --target {tiny[0]}; writing there would destroy it: choose a folder "
                       "outside the inputs")]
    for out, message in cases:
        refused(capsys, tmp_path, re.escape(message), "data", "generate", "--target", tiny[0], "--dataset", "jsonl",
                "--path", tiny[1], "--max-new-tokens", "2", "--batch-size", "1", "--num-prompts", "1", "--out", out)
    # a failure after the folder was made leaves no folder; asking for more prompts than exist says how many
    refused(capsys, tmp_path, re.escape("no prompt fits in --max-prompt-len 1 tokens; raise it"),
            "data", "generate", "--target", tiny[0], "--dataset", "jsonl", "--path", tiny[1], "--max-new-tokens", "2",
            "--batch-size", "1", "--num-prompts", "1", "--max-prompt-len", "1", "--out", tmp_path / "new" / "G")
    refused(capsys, tmp_path, re.escape(f"--num-prompts 100000 is more prompts than there are (jsonl:{tiny[1]} has ")
            + r"(\d+) train-split first turns within --max-prompt-len 256\): pass --num-prompts \1 or fewer",
            "data", "generate", "--target", tiny[0], "--dataset", "jsonl", "--path", tiny[1], "--max-new-tokens", "2",
            "--batch-size", "1", "--num-prompts", "100000", "--out", tmp_path / "G")


def test_generate_holds_a_lock_and_ctrl_c_prints_the_resume_command(tiny, tmp_path, capsys, monkeypatch):
    g = tmp_path / "G"
    code = ("import sys, time; from ppow_plugin.training import rundir; "
            "l = rundir.RunLock(sys.argv[1], '--out', 'generate.lock', 'ppow data generate').__enter__(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(g)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refused(capsys, tmp_path, re.escape(f"--out {g} is in use by another ppow data generate (pid {holder.pid}); "
                                            "wait for it to finish (or stop it), or choose another --out"),
                "data", "generate", "--target", tiny[0], "--dataset", "jsonl", "--path", tiny[1],
                "--max-new-tokens", "2", "--batch-size", "1", "--num-prompts", "2", "--out", g)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    real, calls = gen_data.generate_shard, []

    def ctrl_c_in_second_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(gen_data, "generate_shard", lambda *a, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    fresh = tmp_path / "new" / "G"  # Ctrl-C before the first shard is written: no folder is left behind
    assert cli_main(["data", "generate", "--target", str(tiny[0]), "--dataset", "jsonl", "--path", str(tiny[1]),
                     "--max-new-tokens", "2", "--batch-size", "1", "--num-prompts", "2", "--out", str(fresh)]) == 130
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(gen_data, "generate_shard", ctrl_c_in_second_shard)
    argv = ["data", "generate", "--target", str(tiny[0]), "--dataset", "jsonl", "--path", str(tiny[1]),
            "--max-new-tokens", "2", "--batch-size", "1", "--shard-size", "2", "--num-prompts", "4", "--out", str(g)]
    assert cli_main(argv) == 130
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (f"interrupted: the shards written so far are in {g}; continue with: ppow "
                    + " ".join(argv))
    assert indices(g) == [[0, 1]] and not (g / "generate.lock").exists()
    monkeypatch.setattr(gen_data, "generate_shard", real)
    assert cli_main(argv) == 0 and indices(g) == [[0, 1], [2, 3]]  # the printed command continues


# ---------------------------------------------------------------------------------------------------
# messages that name what the user typed; inputs read as given


def test_messages_name_the_flag_or_key_the_user_typed(tiny, tmp_path, capsys):
    refused(capsys, tmp_path, re.escape(f"--path {tmp_path} is a directory; pass one JSONL file (one conversation "
                                        "per line)"),
            "data", "generate", "--target", tiny[0], "--dataset", "jsonl", "--path", tmp_path, "--out", tmp_path / "G")
    refused(capsys, tmp_path, re.escape(f"--path {tmp_path}/none.jsonl is unreadable (FileNotFoundError); pass a "
                                        "UTF-8 JSONL file"),  # said data.path=
            "data", "generate", "--target", tiny[0], "--dataset", "jsonl", "--path", tmp_path / "none.jsonl",
            "--out", tmp_path / "G")
    recipe = ROOT / "recipes" / "smollm2" / "135M_eagle1_sft.yaml"
    refused(capsys, tmp_path, re.escape("eval.every_prompts=100 is more prompts than there are (mt_bench has 80): "
                                        "pass eval.every_prompts=80 or fewer"),  # said --num-prompts 100
            "validate", recipe, "eval.every_steps=10", "eval.every_prompts=100", "eval.benchmarks=[mt_bench]")


def test_prompt_files_dirs_boms_and_flags_they_replace(tmp_path, capsys):
    from ppow_plugin.data import eval_prompts
    p = tmp_path / "p.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"prompt": "Hello, who are you?"}\r\n{"prompt": "Write a haiku."}\r\n')
    assert [q.turns for q in eval_prompts.read_prompt_file(p)] == [("Hello, who are you?",), ("Write a haiku.",)]
    for flag, value in (("--benchmarks", "mt_bench"), ("--num-prompts", "5")):  # silently ignored before
        refused(capsys, tmp_path, re.escape(f"--prompts {p} replaces the benchmarks: every line of it is a prompt, "
                                            f"so {flag} has nothing to select; drop {flag} (or shorten the file)"),
                "eval", "--drafter", D, "--simulate", "--prompts", p, flag, value, "--out", tmp_path / "E")
    refused(capsys, tmp_path, re.escape(f"--prompts {tmp_path} is a directory; pass one JSONL file with one "
                                        '{"prompt": ...} per line'),  # said "does not exist"
            "eval", "--drafter", D, "--simulate", "--prompts", tmp_path, "--out", tmp_path / "E")


def test_compare_checks_every_drafter_before_evaluating_any(tmp_path, capsys, monkeypatch):
    if ASSET_CACHE is None:
        monkeypatch.delenv("PPOW_CACHE")
    else:
        monkeypatch.setenv("PPOW_CACHE", ASSET_CACHE)
    from ppow_plugin.evaluation import evaluate
    from ppow_plugin.host import assets
    if not (assets.cache_dir() / "targets" / assets.SMOLLM2_135M.name / "config.json").is_file():
        pytest.skip("the default target is not prepared (`ppow prepare`)")
    bad = tmp_path / "B"
    shutil.copytree(D, bad)
    truncate(bad / "model.safetensors")
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **kw: pytest.fail("evaluated before every drafter was checked"))
    refused(capsys, tmp_path, re.escape(f"{bad}/model.safetensors is unreadable or truncated (") + r".*"
            + re.escape("); re-export it"),
            "compare", D, bad, "--names", "a,b", "--simulate", "--benchmarks", "mt_bench", "--num-prompts", "1",
            "--max-new-tokens", "2", "--out", tmp_path / "C")


# ---------------------------------------------------------------------------------------------------
# fault injection: every on-disk format the program reads back, truncated, zeroed and bit-flipped


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero(path: Path) -> None:
    path.write_bytes(b"")


def flip(path: Path) -> None:
    """One bit of the content: the lowest bit of the first digit in a JSON file (still valid JSON, another
    number), else of the byte 3/4 of the way in (inside the largest array's payload, not a header)."""
    raw = bytearray(path.read_bytes())
    at = next(i for i, c in enumerate(raw) if chr(c).isdigit()) if path.suffix == ".json" else len(raw) * 3 // 4
    raw[at] ^= 1
    path.write_bytes(bytes(raw))


def _shard(tmp: Path) -> tuple[Path, object]:
    out = tmp / "G"
    out.mkdir()
    shard = gen_shards.Shard(np.arange(4000, dtype=np.uint16), np.array([0, 2000, 4000]),
                           np.array([5, 7], dtype=np.int32), np.array([0, 1]), np.array(["c0", "c1"]), 1.5)
    gen_shards.write_shard(out, 0, shard)
    gen_shards.write_provenance(out, {"settings": {"max_new_tokens": 2}, "target_sha256": "ab" * 32,
                                                     "source": "test", "totals": {"prompts": 2}})
    return out / "shard-00000.npz", lambda: gen_shards.read_shards(out)


def _provenance(tmp: Path):
    path, _ = _shard(tmp)
    return path.parent / gen_shards.PROVENANCE, lambda: gen_shards.read_provenance(path.parent)


class Sample:
    input_ids = torch.arange(64)
    loss_mask = torch.arange(64) >= 4


def _feature_entry(tmp: Path):
    cache = feature_cache.FeatureCache(tmp / "features", eagle3=False)
    torch.manual_seed(0)
    path = cache.put(Sample, TargetPass(features=torch.randn(64, 64), logits=None, hidden=None))
    head = torch.nn.Linear(64, 16, bias=False)
    return path, lambda: cache.get(Sample, head)


def _continuation_entry(tmp: Path):
    path = tmp / "sim" / "key.final.safetensors"
    continuations._save({"features": torch.randn(20, 8)}, path)
    return path, lambda: continuations._load(path)


def _scan_entry(tmp: Path):
    """The data-scan cache of `samples._scan_cached` (read returns None when it scanned again)."""
    from transformers import AutoTokenizer

    from ppow_plugin.data import datasets
    target = make_target(tmp / "target", layers=1)
    convs = datasets.load_jsonl_conversations(make_conversations(tmp / "convs.jsonl", n=4))
    tokenizer, scans = AutoTokenizer.from_pretrained(target), []
    real = samples.scan_conversations

    def read():
        samples.scan_conversations = lambda *a: scans.append(1) or real(*a)
        try:
            used, _ = samples._scan_cached(convs, tokenizer, target, 64, False)
        finally:
            samples.scan_conversations = real
        return None if len(scans) > 1 else used

    read()  # the first call scans and writes the entry
    return next((tmp / "cache" / "data").glob("scan-*.json")), read


def _checkpoint(tmp: Path):
    ckpt = tmp / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    torch.save({"w": torch.randn(64)}, ckpt / "engine.pt")
    drafter_source.write_checkpoint_meta(ckpt, {"step": 1, "config": {"optim": {"lr": 0.0003}}})  # as trainer does
    return ckpt / "engine.pt", lambda: drafter_source.checkpoint_problem(ckpt)


def _checkpoint_meta(tmp: Path):
    path, read = _checkpoint(tmp)
    return path.parent / "meta.json", read


# format -> (make one entry, what the program does with a damaged one: "rebuilt" | "refused" | "skipped")
FORMATS = {"generated shard": (_shard, "refused"), "provenance.json": (_provenance, "refused"),
           "feature-cache entry": (_feature_entry, "rebuilt"), "continuation-cache entry": (_continuation_entry, "rebuilt"),
           "data-scan cache entry": (_scan_entry, "rebuilt"), "checkpoint file": (_checkpoint, "skipped"),
           "checkpoint meta.json": (_checkpoint_meta, "skipped")}


@pytest.mark.parametrize("fault", [truncate, zero, flip], ids=["truncated", "zeroed", "bit-flipped"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_on_disk_format_is_rebuilt_or_refused_when_damaged(tmp_path, capsys, fmt, fault):
    """Switched off by hand (docs/reliability.md): with `integrity.load_npz`/`load_safetensors`/`read_json`
    not comparing the digest, the bit-flipped continuation entry, provenance.json, scan entry and checkpoint
    meta.json go red (npz members carry zip CRC-32s as well); with their exception handling removed, every
    truncated/zeroed case and the bit-flipped npz ones end in a traceback."""
    make, outcome = FORMATS[fmt]
    path, read = make(tmp_path)
    capsys.readouterr()
    good = read()
    assert (good is None if outcome == "skipped" else good is not None) and capsys.readouterr().err == ""
    fault(path)
    if outcome == "refused":
        with pytest.raises(UserError) as exc:
            read()
        assert str(path) in str(exc.value) and "damaged" in str(exc.value) and "\n" not in str(exc.value)
        assert re.search(r"(delete it and rerun|restore the file)", str(exc.value))
    elif outcome == "rebuilt":
        assert read() is None  # a miss: the caller recomputes and rewrites the entry
        err = capsys.readouterr().err
        assert err == f"warning: {fmt} {path} is damaged ({err.split('(', 1)[1].rsplit(')', 1)[0]}); rebuilding it\n"
    elif path.name == "engine.pt":  # "skipped": resume (and export) fall back to the previous checkpoint
        assert read() == "engine.pt missing or corrupt (hash mismatch)"
    elif fault is flip:  # "step": 0 instead of 1, still valid JSON: only meta.json's own digest tells
        assert read() == "meta.json damaged (content differs from the sha256 recorded when it was written)"
    else:
        assert read().startswith("meta.json damaged (unreadable: JSONDecodeError: ")


def test_a_damaged_ppow_meta_json_is_said_not_silently_dropped(tmp_path, capsys):
    """`ppow export` of a drafter dir reads its ppow_meta.json back for the step, stage and config it records."""
    copy = tmp_path / "D"
    shutil.copytree(D, copy)
    _, meta = drafter_source.read_source(copy, None)
    assert meta["stage"] == "sft" and capsys.readouterr().err == ""
    truncate(copy / "ppow_meta.json")
    _, meta = drafter_source.read_source(copy, None)
    assert meta["stage"] is None
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {copy}/ppow_meta.json is damaged (unreadable: JSONDecodeError: ") and err.endswith(
        "); the export records no step, stage or config from it\n") and err.count("\n") == 1
