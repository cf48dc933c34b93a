"""GPU smoke check (issue 26): random-weight targets at real width, built where it runs; one JSON report.

    python scripts/gpu_smoke.py --out $OUT/gpu_smoke.json              # GPU: real width, bf16 training
    python scripts/gpu_smoke.py --rehearsal --out /tmp/gpu_smoke.json  # CPU: width / 16, vocabulary 512, fp32

On the GPU machine run it through `bash scripts/gpu_smoke.sh $OUT/gpu_smoke.json`, which installs first what
`bash scripts/gpu_prepare.sh` prepared here (docs/gpu.md, "Smoke check"). Per family (Llama-3.1-8B's and Qwen3-8B's packaged configs, 5 decoder layers: the fewest EAGLE-3's feature layers
allow; full vocabulary and rope) it checks, each stage a CLI command in its own process:
  host_vs_hf   the host KV Llama's logits against transformers' on the device, fp32 (max |diff| <= 1e-3)
  sft          `ppow sft` 2 steps, DeepSpeed ZeRO-2 (bf16 on the GPU), a checkpoint each step; the device memory
               peak against `ppow plan`'s figure for the same shape (ratio printed, not judged)
  resume       the same run to step 3 with run.resume=true: resumed from step 2
  ppow         `ppow train` 1 step from that drafter (verification on the target's KV cache), started through
               torchrun (`python -m torch.distributed.run --standalone --nproc_per_node 1`, LOCAL_RANK set);
               its device memory peak against `ppow plan`'s figure (judged on CUDA: within PLAN_BAND)
  parity       one PPOW step in fp32 (dist.engine=torch) on the CPU and on the device, on the same windows: the
               CPU's prepared step (target pass, windows, rollouts, verification) moved to the device, where the
               loss and the drafter's gradient are computed again; |loss_cpu - loss_dev| <= LOSS_TOL * max(1,
               |loss_cpu|) and cosine(grad_cpu, grad_dev) >= GRAD_COS. Recorded, not judged: the device's own
               target pass against the CPU's (max |diff| of the features) and its verification of the CPU's
               windows (share of accept lengths equal; greedy near-ties may flip a few)
  profile      `ppow profile` of the exported drafter against the target (gamma, and the device it timed on:
               `ppow profile` picks CUDA when present, fp32)
  export       `ppow export --format eagle3`, a strict reload, and greedy tree decoding (fp32) token-equal to
               transformers' greedy decoding of the same prompt (the first mismatch reported, not hidden)
A failed check is recorded with its message and the script exits 1; the report is written either way. The
rehearsal compares the CPU with itself (the parity check then only proves the plumbing) and has no CUDA peak
to judge. Not covered yet (docs/gpu.md): the `deepspeed` launcher, more than one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
FAMILIES = {"llama-3.1-8b": ("llama-3.1-8b-instruct", "recipes/llama3/8B_eagle3_sft.yaml",
                             "recipes/llama3/8B_eagle3_ppow.yaml"),
            "qwen3-8b": ("qwen3-8b", "recipes/qwen3/8B_eagle3_sft.yaml", "recipes/qwen3/8B_eagle3_ppow.yaml")}
LOSS_TOL, GRAD_COS = 1e-3, 0.999  # parity: fp32 on both sides (TF32 matmuls off, torch's default)
PLAN_BAND = (0.75, 1.33)  # plan / measured CUDA peak of the ppow stage (the plan leaves out the CUDA context)
# one CLI command; writes its exit code and its device memory peak (CUDA) next to it
WRAPPER = ("import json, sys, torch\nfrom ppow_plugin import cli\ncode = 1\n"
           "try:\n    code = cli.main(sys.argv[2:])\nfinally:\n"
           "    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None\n"
           "    json.dump({'rc': code, 'cuda_peak_bytes': peak}, open(sys.argv[1], 'w'))\nsys.exit(code)\n")


def build_target(config_name: str, out: Path, rehearsal: bool, device: str) -> Path:
    """A random-weight target from a packaged known config (5 layers; rehearsal: width / 16, vocabulary 512)."""
    import test_rehearsal as r
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = json.loads((r.REAL_CONFIGS / config_name / "config.json").read_text())
    cfg.pop("_known_config", None)
    cfg.update(num_hidden_layers=5, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    if rehearsal:
        d = 16
        cfg.update(hidden_size=cfg["hidden_size"] // d, num_attention_heads=max(1, cfg["num_attention_heads"] // d),
                   num_key_value_heads=max(1, cfg["num_key_value_heads"] // d),
                   intermediate_size=cfg["intermediate_size"] // d, vocab_size=512)
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    del model
    tokenizer_for(config.vocab_size).save_pretrained(out)
    r.write_conversations(out.parent / "convs.jsonl", config.vocab_size, n=8)
    return out


def tokenizer_for(vocab_size: int):
    """Word-level ChatML tokenizer whose words cover the whole vocabulary (as tests/test_rehearsal.py)."""
    import test_rehearsal as r
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(r.SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(r.SPECIAL), vocab_size)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(" "), "removed"),
                                                pre_tokenizers.Split(Regex("\n"), "isolated")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = r.CHATML
    return tok


def host_vs_hf(target: Path, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    from ppow_plugin.host import eagle_compat
    hf = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).to(device).eval()
    host = eagle_compat.load_host_target(target, torch.float32, torch.device(device), positions=64)
    ids = torch.randint(4, hf.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        diff = float((host(ids).logits.float() - hf(ids).logits.float()).abs().max())
    del hf, host
    assert diff <= 1e-3, f"host logits differ from transformers' by {diff:.3g} (> 1e-3, fp32)"
    return {"max_abs_logit_diff": diff}


def cli_stage(name: str, args: list[str], work: Path, launcher: list[str] | None = None) -> dict:
    """One `ppow` command in a fresh process (through `launcher`, e.g. torchrun, when given); its wall time,
    exit code, CUDA peak and output tail."""
    stats, wrapper = work / f"{name}.stats.json", work / "ppow_wrapper.py"
    wrapper.write_text(WRAPPER)
    # one process, no launcher: a caller's launcher variables (a pytest process that ran DeepSpeed in-process keeps
    # its MASTER_PORT, still bound) must not reach DeepSpeed's single-process start-up
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    start = time.monotonic()
    proc = subprocess.run([*(launcher or [sys.executable]), str(wrapper), str(stats), *args], cwd=work, env=env,
                          capture_output=True, text=True, check=False)
    seconds = time.monotonic() - start
    rc = json.loads(stats.read_text())["rc"] if stats.exists() else proc.returncode
    out = {"seconds": round(seconds, 1), "rc": rc, "launcher": " ".join(launcher or ["python"]),
           "log_tail": (proc.stdout + proc.stderr)[-1500:]}
    if stats.exists() and json.loads(stats.read_text())["cuda_peak_bytes"] is not None:
        out["cuda_peak_gb"] = round(json.loads(stats.read_text())["cuda_peak_bytes"] / 1e9, 3)
    assert rc == 0, f"{name} exited {rc}: {out['log_tail'][-600:]}"
    return out


def greedy_equal(target: Path, drafter: Path, device: str, tokens: int = 24) -> dict:
    """EAGLE-3 tree decoding (fp32, greedy) against transformers' greedy decoding on the device."""
    from transformers import AutoModelForCausalLM

    from ppow_plugin.drafters import adapters
    from ppow_plugin.evaluation import tree_decode
    from ppow_plugin.host import eagle_compat
    host = eagle_compat.load_host_target(target, torch.float32, torch.device(device))
    drafter_model = adapters.load_eagle3_drafter(drafter, host).to(device).eval()
    hf = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).to(device).eval()
    ids = torch.randint(8, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, 12:].tolist()
        out = tree_decode.generate_eagle3(host, drafter_model, ids, tokens, 0.0, depth=3, top_k=4, total_tokens=8)
    got = out.output_ids[0, 12:12 + tokens].tolist()
    mismatch = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    assert mismatch is None, f"greedy tree decoding differs from transformers' at token {mismatch}"
    return {"tokens": tokens, "cycles": out.cycles, "tau": round(out.new_tokens / out.cycles, 3)}


def _to(obj, device):
    """Tensors of a prepared step (dicts, named tuples, tuples) on `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple):
        moved = [_to(v, device) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else tuple(moved)
    return obj


def _loss_and_grads(t, item) -> tuple[float, list[torch.Tensor]]:
    t.drafter.zero_grad(set_to_none=True)
    result = t.stage.loss(item)
    result.loss.backward()
    grads = [p.grad.detach().to("cpu", torch.float64) for p in t.drafter.parameters() if p.grad is not None]
    return float(result.loss.detach()), grads


def ppow_parity(recipe: Path, overrides: dict, work: Path, device: str) -> dict:
    """One PPOW step, fp32, CPU against `device` on the CPU's windows (module docstring: the tolerances)."""
    from ppow_plugin.config import load_config
    from ppow_plugin.method import rollout
    from ppow_plugin.training import trainer
    runs = {}
    for where, dev in (("cpu", "cpu"), ("device", device)):
        cfg = load_config(recipe, [f"{k}={v}" for k, v in {**overrides, "dist.device": dev, "dist.dtype": "fp32",
                                                            "dist.target_dtype": "fp32", "dist.engine": "torch",
                                                            "dist.zero_stage": 0, "rollout.resample_tries": 0,
                                                            "run.output_dir": work / f"parity-{where}"}.items()])
        runs[where] = trainer.Trainer(cfg)
        runs[where].setup()
    cpu, dev = runs["cpu"], runs["device"]
    sample = cpu.data.next()
    item = cpu.stage.prepare(sample, step=0)
    assert item["rollout"] is not None, "the CPU step selected no window"
    moved = _to(item, dev.device)
    out = compare_steps(*_loss_and_grads(cpu, item), *_loss_and_grads(dev, moved))
    with torch.no_grad():  # the device's own target pass and verification of the same windows
        tpass = dev.stage.target_passes(dev.drafter, sample, moved["ids"], moved["valid"])
        ro, r = moved["rollout"], dev.cfg.rollout
        verified = rollout.verify_windows(dev.target, dev.kv, moved["ids"], ro.starts,
                                          dev.adapter.to_target_ids(dev.drafter, ro.draft_tokens), r.verify,
                                          r.verify_temperature, rollout.proposal_logprobs(ro.old_logprobs,
                                                                                          r.greedy_members), dev.gen)
    out.update(windows=list(ro.draft_tokens.shape),
               feature_max_abs_diff=float((tpass.features.float().cpu() - item["tpass"].features.float()).abs().max()),
               accept_len_equal_share=float((verified[0].cpu() == item["rollout"].accept_len).float().mean()))
    del runs, cpu, dev, moved
    ok, error = out.pop("ok"), out.pop("error")
    assert ok, error
    return out


def compare_steps(loss_cpu: float, grads_cpu: list[torch.Tensor], loss_dev: float,
                  grads_dev: list[torch.Tensor]) -> dict:
    """Loss and gradient of the same step on two devices against LOSS_TOL and GRAD_COS; "ok" and "error" say."""
    dot = sum(float((a * b).sum()) for a, b in zip(grads_cpu, grads_dev, strict=True))
    norms = [sum(float((g.double() * g.double()).sum()) for g in gs) ** 0.5 for gs in (grads_cpu, grads_dev)]
    cosine = dot / max(norms[0] * norms[1], 1e-300)
    errors = ([f"loss differs: {loss_cpu} (CPU) vs {loss_dev} (device), more than {LOSS_TOL} x max(1, |loss|)"]
              if abs(loss_cpu - loss_dev) > LOSS_TOL * max(1.0, abs(loss_cpu)) else [])
    errors += [f"gradient cosine {cosine:.6f} < {GRAD_COS}"] if cosine < GRAD_COS else []
    return {"ok": not errors, "error": "; ".join(errors), "loss_cpu": loss_cpu, "loss_device": loss_dev,
            "loss_tol": LOSS_TOL, "grad_cosine": cosine, "grad_cosine_min": GRAD_COS, "grad_norm_cpu": norms[0],
            "grad_norm_device": norms[1]}


def planned_gb(recipe: Path, overrides: dict) -> float:
    from ppow_plugin.config import load_config
    from ppow_plugin.host import target_arch
    from ppow_plugin.training import plan
    cfg = load_config(recipe, [f"{k}={v}" for k, v in overrides.items()])
    return plan.plan_memory(cfg, target_arch.load_target_arch(cfg)[0]).total_gb


def with_plan(out: dict, planned: float, judge: bool) -> dict:
    """The stage's CUDA peak next to the plan's figure; `judge`: outside PLAN_BAND fails the check."""
    out["plan_gb"] = round(planned, 3)
    if "cuda_peak_gb" in out:
        out["plan_over_peak"] = ratio = round(planned / out["cuda_peak_gb"], 3)
        assert not judge or PLAN_BAND[0] <= ratio <= PLAN_BAND[1], \
            f"plan {planned:.2f} GB vs CUDA peak {out['cuda_peak_gb']} GB: ratio {ratio} outside {PLAN_BAND}"
    return out


def _profiled(path: Path) -> dict:
    prof = json.loads(path.read_text())
    return {"gamma": prof["gamma"], "profile_device": (prof.get("settings") or {}).get("device")}


def family_checks(name: str, work: Path, rehearsal: bool, device: str, dtype: str, checks: dict,
                  save=lambda: None) -> dict:
    """Fills `checks` one check at a time, calling `save` after each (a report killed at a limit keeps them)."""
    config_name, sft_recipe, ppow_recipe = FAMILIES[name]

    def check(key, fn):
        try:
            checks[key] = {"ok": True, **fn()}
        except Exception as exc:  # recorded, then the next check runs
            checks[key] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000],
                           "traceback": traceback.format_exc()[-1500:]}
        save()
        return checks[key]["ok"]

    target = work / "target"
    if not check("build_target", lambda: {"path": str(build_target(config_name, target, rehearsal, device))}):
        return checks
    check("host_vs_hf", lambda: host_vs_hf(target, device))
    common = {"model.target": target, "data.dataset": "jsonl", "data.path": work / "convs.jsonl",
              "data.max_len": 64, "data.heldout_fraction": 0.0, "data.micro_batch": 1, "optim.grad_accum": 1,
              "optim.warmup_steps": 0, "dist.device": device, "dist.dtype": dtype, "dist.target_dtype": dtype,
              "dist.engine": "deepspeed", "dist.zero_stage": 2, "run.save_every": 1, "run.log_every": 1,
              **({"model.draft_vocab_size": 256} if rehearsal else {})}
    kv = lambda d: [f"{k}={v}" for k, v in d.items()]  # noqa: E731
    sft = {**common, "sft.ttt_steps": 2, "model.drafter": "null", "run.output_dir": work / "sft"}

    def sft_stage():  # the peak printed next to the plan, not judged (the ppow stage's is)
        out = cli_stage("sft", ["sft", str(ROOT / sft_recipe), *kv({**sft, "run.max_steps": 2})], work)
        return with_plan(out, planned_gb(ROOT / sft_recipe, {**sft, "run.max_steps": 2}), judge=False)

    if check("sft", sft_stage):
        def resume():
            out = cli_stage("resume", ["sft", str(ROOT / sft_recipe), *kv({**sft, "run.max_steps": 3}),
                                       "run.resume=true"], work)
            assert "at step 2" in out["log_tail"], "did not resume from step 2"
            return out
        check("resume", resume)
        ppow = {**common, "model.drafter": work / "sft" / "drafter", "run.output_dir": work / "ppow",
                "rollout.group_size": 2, "rollout.window": 3, "rollout.prefixes_per_sequence": 1,
                "windowing.warmup_steps": 1, "run.max_steps": 1}
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
        check("ppow", lambda: with_plan(cli_stage("ppow", ["train", str(ROOT / ppow_recipe), *kv(ppow)], work,
                                                  torchrun), planned_gb(ROOT / ppow_recipe, ppow), judge=True))
        check("parity", lambda: ppow_parity(ROOT / ppow_recipe, ppow, work, device))

        def export():
            out = cli_stage("export", ["export", str(work / "sft"), str(work / "eagle3"), "--format", "eagle3"], work)
            return {**out, **greedy_equal(target, work / "eagle3", device)}
        if check("export", export):
            check("profile", lambda: cli_stage("profile", [
                "profile", "--target", str(target), "--drafter", str(work / "eagle3"), "--repeats", "2",
                "--tree-sizes", "1,8", "--prefix-len", "32", "--out", str(work / "profile.json")], work)
                | _profiled(work / "profile.json"))
    return checks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON report path (an existing file is replaced)")
    ap.add_argument("--rehearsal", action="store_true", help="CPU, tiny width, fp32 (what CI runs)")
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args()
    if not args.rehearsal and not torch.cuda.is_available():
        print("error: no CUDA device visible; pass --rehearsal for the CPU form", file=sys.stderr)
        return 2
    unknown = [n for n in args.families.split(",") if n not in FAMILIES]
    if unknown:
        print(f"error: --families {','.join(unknown)}: not a family; choose from {','.join(FAMILIES)}", file=sys.stderr)
        return 2
    device, dtype = ("cpu", "fp32") if args.rehearsal else ("cuda", "bf16")
    import transformers
    report = {"machine": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
              "device": device, "dtype": dtype, "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "families": {}}
    start = time.monotonic()

    def save(done: bool = False) -> None:  # after every check: a command killed at its limit keeps what ran
        report.update(seconds=round(time.monotonic() - start, 1), finished=done,
                      ok=done and all(c["ok"] for fam in report["families"].values() for c in fam.values()))
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    for name in args.families.split(","):
        with tempfile.TemporaryDirectory(prefix=f"gpu-smoke-{name}-") as tmp:
            family_checks(name, Path(tmp), args.rehearsal, device, dtype, report["families"].setdefault(name, {}),
                          save)
            if device == "cuda":
                torch.cuda.empty_cache()
    save(done=True)
    print(json.dumps({name: {k: c["ok"] for k, c in fam.items()} for name, fam in report["families"].items()}))
    print(f"report written to {args.out}: {'ok' if report['ok'] else 'FAILED'} in {report['seconds']} s")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
