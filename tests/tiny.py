"""Tiny random Llama target + word-level ChatML tokenizer + JSONL conversations, for trainer tests.

Everything is built in a temp dir in well under a second; no downloads.
"""

from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path

import torch
import yaml
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = SPECIAL + ["user", "assistant", "system", "\n"] + [f"w{i}" for i in range(120)]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def free_port() -> int:
    """A TCP port free on this machine now, for a launcher's --master_port: a fixed one can be in use (a fresh-clone
    run once found 29661 taken: EADDRINUSE)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_target(out_dir: Path, layers: int = 6, seed: int = 0) -> Path:
    """Save a tiny random Llama (hidden 64, vocab 128, rope_theta 1e5) and its tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_theta=1e5, bos_token_id=2, eos_token_id=3, pad_token_id=0, tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(out_dir)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" "), "removed"),
                                                pre_tokenizers.Split(Regex("\n"), "isolated")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML
    tok.save_pretrained(out_dir)
    return out_dir


def make_conversations(path: Path, n: int = 12, seed: int = 0) -> Path:
    """ShareGPT-style JSONL: short user turns, longer assistant turns of counting-like word runs."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            turns = []
            for _ in range(2):
                start = rng.randrange(100)
                user = " ".join(f"w{rng.randrange(120)}" for _ in range(4))
                answer = " ".join(f"w{(start + k) % 120}" for k in range(rng.randint(20, 40)))
                turns += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
            f.write(json.dumps({"id": f"conv{i}", "conversations": turns}) + "\n")
    return path


def overrides(tmp: Path, stage: str, engine: str = "torch", **extra) -> list[str]:
    """Dotted overrides for a tiny, fast, fp32 run in `tmp`."""
    target = tmp / "target"
    if not target.exists():
        make_target(target)
        make_conversations(tmp / "convs.jsonl")
    base = {
        "stage": stage, "model.target": str(target), "data.dataset": "jsonl", "data.path": str(tmp / "convs.jsonl"),
        "data.max_len": 96, "data.heldout_fraction": 0.0, "dist.engine": engine, "dist.zero_stage": 2,
        "dist.dtype": "fp32", "dist.target_dtype": "fp32", "run.max_steps": 3, "run.save_every": 100,
        "run.output_dir": str(tmp / f"run-{stage}"), "optim.lr": 1e-3, "rollout.group_size": 4,
        "rollout.window": 4, "rollout.prefixes_per_sequence": 2, "windowing.warmup_steps": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def recipe_file(tmp: Path, stage: str, engine: str = "torch", **extra) -> Path:
    """The same tiny run as `overrides`, written as a YAML recipe (for CLI subprocess tests)."""
    tree: dict = {}
    for item in overrides(tmp, stage, engine=engine, **extra):
        key, value = item.split("=", 1)
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path = tmp / f"{stage}-{len(list(tmp.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def run_trainer(tmp: Path, stage: str, **extra):
    """Set up and train a tiny run; returns (trainer, drafter state before, target state before, export dir)."""
    from ppow_plugin.training import trainer
    from ppow_plugin.config import load_config

    t = trainer.Trainer(load_config(None, overrides(tmp, stage, **extra)))
    t.setup()
    before = {k: v.detach().clone() for k, v in t.drafter.state_dict().items()}
    target_before = {k: v.detach().clone() for k, v in t.target.state_dict().items()}
    out = t.train()
    t.cleanup()
    return t, before, target_before, out


def wait_for_checkpoint(proc, ckpt_dir: Path, step: int, log: Path | None = None, timeout: float = 300) -> None:
    """Block until `ckpt_dir/step-N` exists (renamed from .tmp: complete) while `proc` runs."""
    target = ckpt_dir / f"step-{step:06d}"
    deadline = time.time() + timeout
    while not target.exists():
        if proc.poll() is not None:
            detail = log.read_text() if log else proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"exited {proc.returncode} before {target.name}: {detail[-3000:]}")
        assert time.time() < deadline, f"no {target.name} within {timeout} s"
        time.sleep(0.05)


def greedy_continuation(target, prefix: torch.Tensor, n: int) -> torch.Tensor:
    """[n] the target's greedy tokens after `prefix`, one full forward each (no cache)."""
    seq = prefix
    for _ in range(n):
        with torch.no_grad():
            nxt = target.lm_head(target.model(input_ids=seq[None])[0])[0, -1].argmax()
        seq = torch.cat([seq, nxt[None]])
    return seq[prefix.numel():]
