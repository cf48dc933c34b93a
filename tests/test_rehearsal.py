"""Rehearsal of every GPU recipe family on CPU with real-config targets (opt-in: PPOW_TEST_REHEARSAL=1; slow).

Per family: a random-weight target with the real config from ppow_plugin/known_configs (vocabulary, head_dim, GQA
ratio, rope, norms, positions; widths divided where memory forces it, see SHRINK) but only as many decoder
layers as the drafter's feature layers need (EAGLE-3: 5, the least for which (2, L//2, L-3) is ordered;
EAGLE-1: 2), and a word-level tokenizer whose words cover the whole vocabulary, built locally. Then, each
through the CLI in its own process, from the family's own recipes with the data, steps and sizes overridden
for a smoke run: `ppow sft` 2 steps -> `ppow train` 2 steps -> `ppow eval` 2 prompts (greedy, few new tokens)
-> `ppow export` to every format the family's hosts read (EAGLE-3: eagle3, speculators; EAGLE-1: eagle1,
eagle1-compact) -> a strict reload of each export. Wall time and peak RSS per stage go to
$PPOW_REHEARSAL_OUT/rehearsal-<family>.json (default: the test's tmp dir); docs/recipes.md has the figures.

Run one family at a time, niced, one thread:
    PPOW_TEST_REHEARSAL=1 OMP_NUM_THREADS=1 nice -n 10 pytest -q tests/test_rehearsal.py -k qwen3-8b
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from ppow_plugin.host import serving_names, target_arch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("PPOW_TEST_REHEARSAL") != "1",
                                                   reason="full-width rehearsal: set PPOW_TEST_REHEARSAL=1")]

ROOT = Path(__file__).resolve().parent.parent
REAL_CONFIGS = target_arch.KNOWN_CONFIGS  # packaged config-only copies of the recipes' targets
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "\n"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


class Family(NamedTuple):
    config: str            # ppow_plugin/known_configs/<config>
    sft: str               # recipe for the warm start (the family's own, else its sibling of the same drafter)
    ppow: str              # the family's PPOW recipe
    layers: int            # decoder layers kept
    formats: tuple[str, ...]  # `ppow export --format` values the family's hosts read
    width_divisor: int     # hidden, heads, KV heads, MLP width divided by this (head_dim, GQA ratio kept)


EAGLE3_FORMATS = ("eagle3", "speculators")  # EAGLE / SGLang / vLLM read eagle3; vLLM's training stack speculators
EAGLE1_FORMATS = ("eagle1", "eagle1-compact")
# Width: at full width the fp32 target, its fp32 copy in `ppow eval` and the drafter's AdamW states of an
# 8B-class family need ~17 GB (Llama-3.1-8B, 5 layers: 2.1 B target parameters), more than this shared
# 24 GB machine has free; those families divide hidden size, heads and MLP width by 4 and keep the
# vocabulary, head_dim (so Qwen3-32B stays decoupled: 16 x 128 != 1280), GQA ratio, rope, norms and
# positions. PPOW_REHEARSAL_FULL_WIDTH=1 runs them at divisor 1 (a machine with ~40 GB free).
SHRINK = 1 if os.environ.get("PPOW_REHEARSAL_FULL_WIDTH") == "1" else 4
FAMILIES = {
    "llama-3.1-8b": Family("llama-3.1-8b-instruct", "recipes/llama3/8B_eagle3_sft.yaml",
                           "recipes/llama3/8B_eagle3_ppow.yaml", 5, EAGLE3_FORMATS, SHRINK),
    "llama-3.3-70b": Family("llama-3.3-70b-instruct", "recipes/llama3/8B_eagle3_sft.yaml",
                            "recipes/llama3/70B_eagle3_ppow.yaml", 5, EAGLE3_FORMATS, 2 * SHRINK),
    "r1-distill-llama-8b": Family("deepseek-r1-distill-llama-8b", "recipes/llama3/8B_eagle3_sft.yaml",
                                  "recipes/deepseek-r1-distill-llama/8B_eagle3_ppow.yaml", 5, EAGLE3_FORMATS,
                                  SHRINK),
    "qwen3-8b": Family("qwen3-8b", "recipes/qwen3/8B_eagle3_sft.yaml", "recipes/qwen3/8B_eagle3_ppow.yaml",
                       5, EAGLE3_FORMATS, SHRINK),
    "qwen3-32b": Family("qwen3-32b", "recipes/qwen3/32B_eagle3_sft.yaml", "recipes/qwen3/32B_eagle3_ppow.yaml",
                        5, EAGLE3_FORMATS, SHRINK),
    # 32000 vocabulary, 2 layers: fits at full width (5120) in fp32
    "vicuna-13b": Family("vicuna-13b-v1.3", "recipes/vicuna/13B_eagle1_ppow.yaml",
                         "recipes/vicuna/13B_eagle1_ppow.yaml", 2, EAGLE1_FORMATS, 1),
}
# smoke-run overrides on top of each recipe: local data, 2 steps, short sequences, small rollouts, CPU
# fp32, torch engine: bf16 matmuls on a CPU without AVX512-BF16 are >100x slower than fp32 (measured: a
# 48 x 5120 x 5120 product 0.8 s in fp32, not done in 120 s in bf16), and DeepSpeed's bf16 ZeRO-2 path is
# scripts/gpu_check.sh's job
SMOKE = {"data.dataset": "jsonl", "data.max_len": 32, "data.heldout_fraction": 0.0, "data.micro_batch": 1,
         "run.max_steps": 2, "run.save_every": 1, "run.log_every": 1, "optim.grad_accum": 1,
         "optim.warmup_steps": 0, "dist.engine": "torch", "dist.device": "cpu", "dist.dtype": "fp32",
         "dist.target_dtype": "fp32"}
SFT_SMOKE = {"eagle3": {"sft.ttt_steps": 2}, "eagle1": {}}  # 2 training-time-test steps exercise the unroll
PPOW_SMOKE = {"rollout.group_size": 2, "rollout.window": 3, "rollout.prefixes_per_sequence": 1,
              "windowing.warmup_steps": 1}
# runs one CLI command in this process and writes its peak RSS (KiB) next to it
WRAPPER = ("import json, resource, sys\nfrom ppow_plugin import cli\ncode = 1\n"
           "try:\n    code = cli.main(sys.argv[2:])\nfinally:\n"
           "    json.dump({'rc': code, 'peak_rss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss},"
           " open(sys.argv[1], 'w'))\nsys.exit(code)\n")


def build_target(family: Family, out_dir: Path) -> dict:
    """Save the random fp32 target and its tokenizer; returns the config dict used."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    config_dict = json.loads((REAL_CONFIGS / family.config / "config.json").read_text())
    config_dict.pop("_known_config", None)
    d = family.width_divisor
    heads, kv_heads = config_dict["num_attention_heads"], config_dict["num_key_value_heads"]
    head_dim = config_dict.get("head_dim") or config_dict["hidden_size"] // heads
    config_dict.update(hidden_size=config_dict["hidden_size"] // d, num_attention_heads=heads // d,
                       num_key_value_heads=max(1, kv_heads // d), head_dim=head_dim,
                       intermediate_size=config_dict["intermediate_size"] // d)
    # token ids follow the local tokenizer (the architecture does not depend on them)
    config_dict.update(num_hidden_layers=family.layers, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    config = AutoConfig.for_model(**config_dict)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(out_dir)
    del model
    vocab = {w: i for i, w in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), config.vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" "), "removed"),
                                                pre_tokenizers.Split(Regex("\n"), "isolated")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return config_dict


def write_conversations(path: Path, vocab_size: int, n: int = 8) -> Path:
    """ShareGPT-style JSONL whose words are spread over the whole vocabulary (ids up to vocab_size - 1)."""
    rng = random.Random(0)
    word = lambda: f"w{rng.randrange(len(SPECIAL), vocab_size)}"  # noqa: E731
    with open(path, "w") as f:
        for i in range(n):
            turns = [{"from": "human", "value": " ".join(word() for _ in range(6))},
                     {"from": "gpt", "value": " ".join(word() for _ in range(30))}]
            f.write(json.dumps({"id": f"conv{i}", "conversations": turns}) + "\n")
    return path


def run_stage(name: str, args: list[str], work: Path, timings: dict) -> None:
    """One CLI command in a fresh process; records wall seconds and peak RSS; fails with its output."""
    stats = work / f"{name}.stats.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(stats), *args], cwd=work, env=env,
                          capture_output=True, text=True)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    peak = json.loads(stats.read_text())["peak_rss_kib"] / 2**20
    timings[name] = {"seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2)}
    print(f"{name}: {seconds:.1f} s, peak RSS {peak:.2f} GiB", file=sys.stderr)


def overrides(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def reload_strictly(fmt: str, out: Path, target: Path) -> None:
    """Each export read back the way its host reads it: EAGLE-1 host layout through the patched host's
    `EaModel` (strict `load_state_dict`); the others through `formats.load_drafter` against the target."""
    from transformers import AutoConfig

    from ppow_plugin.drafters import formats

    loaded = formats.load_drafter(out, AutoConfig.from_pretrained(target))
    assert loaded.format == ("eagle1" if fmt.startswith("eagle1") else "eagle3"), loaded.format
    if fmt == "eagle1":
        from ppow_plugin.host import eagle_compat

        ea_model = eagle_compat.load_ea_model(target, out)
        assert set(ea_model.ea_layer.state_dict()) == set(torch.load(out / "pytorch_model.bin", weights_only=True))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_recipe_family_rehearsal(name: str, tmp_path: Path) -> None:
    family = FAMILIES[name]
    work = tmp_path / name
    work.mkdir()
    target = work / "target"
    timings: dict = {}
    start = time.monotonic()
    config = build_target(family, target)
    timings["build_target"] = {"seconds": round(time.monotonic() - start, 1)}
    data = write_conversations(work / "convs.jsonl", config["vocab_size"])
    common = {**SMOKE, "model.target": str(target), "data.path": str(data)}

    kind = "eagle3" if family.formats == EAGLE3_FORMATS else "eagle1"
    run_stage("sft", ["sft", str(ROOT / family.sft), *overrides(
        {**common, **SFT_SMOKE[kind], "stage": "sft", "model.drafter": "null", "run.output_dir": str(work / "sft")})],
        work, timings)
    run_stage("train", ["train", str(ROOT / family.ppow), *overrides(
        {**common, **PPOW_SMOKE, "model.drafter": str(work / "sft" / "drafter"),
         "run.output_dir": str(work / "ppow")})], work, timings)
    drafter = work / "ppow" / "drafter"
    run_stage("eval", ["eval", "--drafter", str(drafter), "--target", str(target), "--benchmarks", "mt_bench",
                       "--num-prompts", "2", "--max-new-tokens", "4", "--depth", "3", "--top-k", "4",
                       "--total-tokens", "8", "--out", str(work / "eval")], work, timings)
    report = json.loads((work / "eval" / "report.json").read_text())
    overall = report["stats"]["overall"]
    assert overall["prompts"] == 2 and overall["cycles"] >= 2, overall
    assert [p["mismatch_at"] for p in report["prompts"]] == [None, None]  # EAGLE == HF greedy, token for token
    for fmt in family.formats:
        out = work / f"export-{fmt}"
        run_stage(f"export-{fmt}", ["export", str(work / "ppow"), str(out), "--format", fmt, "--target", str(target),
                                    "--verifier", serving_names.hub_id(family.config)], work, timings)
        start = time.monotonic()
        reload_strictly(fmt, out, target)
        timings[f"reload-{fmt}"] = {"seconds": round(time.monotonic() - start, 1)}

    sizes = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
             "vocab_size", "max_position_embeddings")
    result = {"family": name, "config": family.config, "layers": family.layers,
              "width_divisor": family.width_divisor, **{k: config[k] for k in sizes},
              "eval_overall": {k: overall[k] for k in ("prompts", "new_tokens", "cycles", "tau")}, "stages": timings,
              "threads": 1, "torch": torch.__version__}
    out_dir = Path(os.environ.get("PPOW_REHEARSAL_OUT", tmp_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rehearsal-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
