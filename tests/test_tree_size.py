"""The working tree travels to the lent GPU machine (issue 26), which refuses more than 64 MiB per call, and the
committed drafters are kept small for it: EAGLE-1/-3 stored fp16 (`scripts/slim_drafter.py`), superseded ones
retired (RETIRED.md, weights in git history only).

Can fail: the size check reports the tree of commit 6437d55 (before the drafters were slimmed: 110.6 MB) as
over the limit (`test_the_check_fails_the_tree_before_the_slimming`); a retired dir's error names its restore
command, and that command's commit must hold the weights.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ppow_plugin import cli
from ppow_plugin.drafters import export, formats
from ppow_plugin.host import eagle_compat, patching

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20  # the device tool's limit on what travels per call (tracked tree + carried paths)
CARRIED = ROOT / ".gpu-wheels"  # what docs/gpu.md's smoke command carries (scripts/gpu_prepare.sh), when built
BEFORE_SLIMMING = "6437d55"  # main before issue 26's slimming: 110.6 MB tracked
DRAFTERS = ROOT / "assets" / "drafters"
RETIRED = sorted(p.parent for p in DRAFTERS.glob("*/RETIRED.md"))


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def in_git_checkout() -> bool:
    try:
        return git("rev-parse", "--show-toplevel").strip() == str(ROOT)
    except (OSError, subprocess.CalledProcessError):
        return False


needs_git = pytest.mark.skipif(not in_git_checkout(), reason="not a git checkout: no tracked tree to measure")


def tracked_bytes(commit: str | None = None) -> int:
    """Sum of the tracked files' sizes: the working tree's (`git ls-files`), or one commit's (`git ls-tree`)."""
    if commit is not None:
        return sum(int(line.split()[3]) for line in git("ls-tree", "-r", "-l", commit).splitlines()
                   if line.split()[3] != "-")
    names = [n for n in git("ls-files", "-z").split("\0") if n]
    return sum((ROOT / n).stat().st_size for n in names if (ROOT / n).is_file())


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def over_limit(tracked: int, carried: int = 0, limit: int = LIMIT) -> str | None:
    """None when it travels; else what is measured, against what."""
    total = tracked + carried
    if total <= limit:
        return None
    return (f"the tree that travels to the GPU machine is {total / 2**20:.1f} MiB (tracked {tracked / 2**20:.1f}, "
            f"carried {carried / 2**20:.1f}), {(total - limit) / 2**20:.1f} MiB over the {limit / 2**20:.0f} MiB "
            "per call; store drafters fp16 (scripts/slim_drafter.py) or retire superseded ones (RETIRED.md)")


@needs_git
def test_the_tracked_tree_travels_to_the_gpu_machine():
    tracked, carried = tracked_bytes(), dir_bytes(CARRIED)
    problem = over_limit(tracked, carried)
    assert problem is None, problem
    print(f"tracked {tracked / 2**20:.2f} MiB + carried {carried / 2**20:.2f} MiB; "
          f"headroom {(LIMIT - tracked - carried) / 2**20:.2f} MiB of {LIMIT / 2**20:.0f}")


@needs_git
def test_the_check_fails_the_tree_before_the_slimming():
    try:
        before = tracked_bytes(BEFORE_SLIMMING)
    except subprocess.CalledProcessError:
        pytest.skip(f"commit {BEFORE_SLIMMING} is not in this clone's history (shallow clone)")
    problem = over_limit(before)
    assert problem and problem.startswith("the tree that travels to the GPU machine is 105.5 MiB"), problem
    assert over_limit(tracked_bytes(), limit=1 << 20)  # and today's tree against a 1 MiB limit


def test_kept_drafters_are_stored_fp16_without_embeddings():
    kept = sorted(p.parent for p in DRAFTERS.glob("*/model.safetensors"))
    assert len(kept) == 4, kept
    for d in kept:
        state = load_file(d / "model.safetensors")
        assert formats.EMBED_KEY not in state, d.name
        assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}, d.name


@needs_git
@pytest.mark.parametrize("drafter", RETIRED, ids=[p.name for p in RETIRED])
def test_a_retired_drafter_says_how_to_restore_it(drafter: Path, tmp_path: Path, capsys):
    assert RETIRED, "no retired drafter dir"
    assert not (drafter / "model.safetensors").exists() and (drafter / "provenance.json").is_file()
    rel = drafter.relative_to(ROOT).as_posix()
    found = re.search(rf"git checkout ([0-9a-f]{{7,40}}) -- {re.escape(rel)}/model\.safetensors",
                      (drafter / "RETIRED.md").read_text())
    assert found, f"{drafter}/RETIRED.md names no `git checkout COMMIT -- {rel}/model.safetensors`"
    command = found.group(0)
    git("cat-file", "-e", f"{found.group(1)}:{rel}/model.safetensors")  # the command restores something
    code = cli.main(["validate", str(ROOT / "recipes/smollm2/135M_eagle1_ppow.yaml"), f"model.drafter={drafter}",
                     f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and re.fullmatch(r"error: [^\n]*", err) and err.endswith(f"restore them with: {command}"), err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(patching.patch_status().state != "patched", reason="the EAGLE host is not patched")
def test_slim_drafter_writes_fp16_that_loads_upcast(tmp_path: Path):
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    drafter = eagle_compat.new_eagle1_drafter(cfg)
    src = export.save_drafter_dir(tmp_path / "fp32", drafter.state_dict(), eagle_compat.eagle1_config_dict(cfg), {})
    script = [sys.executable, str(ROOT / "scripts" / "slim_drafter.py")]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([*script, str(src), str(tmp_path / "slim")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    slim = load_file(tmp_path / "slim" / "model.safetensors")
    assert {v.dtype for v in slim.values()} == {torch.float16}
    fresh = eagle_compat.new_eagle1_drafter(cfg)
    eagle_compat.load_drafter_weights(fresh, {**slim, formats.EMBED_KEY: drafter.embed_tokens.weight})
    for k, v in fresh.state_dict().items():  # fp32, as trained; equal to the fp16 values (an exact upcast)
        assert v.dtype == torch.float32, k
        if k in slim:
            assert torch.equal(v, slim[k].float()) and (v - drafter.state_dict()[k]).abs().max() < 1e-2, k
    refused = subprocess.run([*script, str(tmp_path), str(tmp_path / "x")], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: ")
    assert not (tmp_path / "x").exists()
