"""`ppow patch` logic, on a private copy of the installed eagle-llm package (the real install is never touched)."""

import hashlib
import shutil
from pathlib import Path

import pytest

from ppow_plugin.host import patching
from ppow_plugin.errors import UserError

REAL_PACKAGE = patching.find_package_dir()
pytestmark = pytest.mark.skipif(REAL_PACKAGE is None, reason="eagle-llm is not installed")
NAMES = [p.name for p in patching.patch_files()]


def _tree_hashes(package_dir: Path) -> dict[str, str]:
    """sha256 of every file under the package (the state file and bytecode excluded)."""
    return {
        str(p.relative_to(package_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(package_dir.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.name != patching.STATE_FILE
    }


@pytest.fixture
def host_copy(tmp_path: Path) -> Path:
    """A clean copy of the installed host (`<tmp>/site/eagle` + its dist-info), reverted if the real one
    is patched (the copied state file carries the diffs needed to do that)."""
    site = tmp_path / "site"
    shutil.copytree(REAL_PACKAGE, site / "eagle", ignore=shutil.ignore_patterns("__pycache__"))
    for info in REAL_PACKAGE.parent.glob("eagle_llm-*.dist-info"):
        shutil.copytree(info, site / info.name)
    package_dir = site / "eagle"
    if patching.patch_status(package_dir).state != "clean":
        patching.revert_patches(package_dir)
    assert patching.patch_status(package_dir).state == "clean"
    return package_dir


def test_unpatched_copy_reports_clean(host_copy: Path) -> None:
    status = patching.patch_status(host_copy)
    assert (status.installed, status.version, status.package_dir) == (True, "1.2.1", host_copy.resolve())
    assert status.applied == () and list(status.pending) == NAMES and not status.fully_patched
    assert "state: clean" in str(status)
    with pytest.raises(UserError, match="run `ppow patch apply`"):
        patching.require_patched_host(host_copy)


def test_apply_twice_then_revert_is_byte_identical(host_copy: Path) -> None:
    before = _tree_hashes(host_copy)

    assert patching.apply_patches(host_copy) == NAMES
    status = patching.patch_status(host_copy)
    assert status.fully_patched and list(status.applied) == NAMES and status.pending == ()
    patching.require_patched_host(host_copy)  # does not raise
    after = _tree_hashes(host_copy)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"model/cnets.py", "model/modeling_llama_kv.py", "model/ea_model.py", "model/kv_cache.py"}
    for rel in changed:  # the patched host still parses
        compile((host_copy / rel).read_bytes(), rel, "exec")
    assert b"\r\n" in (host_copy / "model/cnets.py").read_bytes()  # CRLF file kept its line endings

    assert patching.apply_patches(host_copy) == []  # second apply: a no-op
    assert _tree_hashes(host_copy) == after

    assert patching.revert_patches(host_copy) == NAMES[::-1]
    assert _tree_hashes(host_copy) == before
    assert not (host_copy / patching.STATE_FILE).exists()
    assert patching.patch_status(host_copy).state == "clean"
    assert patching.revert_patches(host_copy) == []


def test_wrong_version_is_refused(host_copy: Path) -> None:
    metadata = next(host_copy.parent.glob("eagle_llm-*.dist-info")) / "METADATA"
    metadata.write_text(metadata.read_text().replace("Version: 1.2.1", "Version: 1.2.0", 1))
    assert patching.patch_status(host_copy).state == "wrong-version"
    for action in (patching.apply_patches, patching.require_patched_host):
        with pytest.raises(UserError, match=r"pip install --no-deps eagle-llm==1\.2\.1"):
            action(host_copy)


def test_missing_host_is_reported(tmp_path: Path) -> None:
    status = patching.patch_status(tmp_path / "site" / "eagle")
    assert (status.installed, status.state) == (False, "missing")
    with pytest.raises(UserError, match=r"pip install --no-deps eagle-llm==1\.2\.1"):
        patching.require_patched_host(tmp_path / "site" / "eagle")


def test_hand_edited_host_is_refused(host_copy: Path) -> None:
    cnets = host_copy / "model" / "cnets.py"
    cnets.write_bytes(cnets.read_bytes() + b"# local edit\r\n")
    assert patching.patch_status(host_copy).state == "modified"
    with pytest.raises(UserError, match="force-reinstall"):
        patching.apply_patches(host_copy)


def test_failing_patch_rolls_back_the_series(host_copy: Path, tmp_path: Path) -> None:
    patch_dir = tmp_path / "patches"
    shutil.copytree(patching.DEFAULT_PATCH_DIR, patch_dir)
    (patch_dir / "0099-does-not-apply.patch").write_text(
        "--- a/eagle/model/utils.py\n+++ b/eagle/model/utils.py\n@@ -1,1 +1,1 @@\n-no such line\n+x\n")
    before = _tree_hashes(host_copy)
    with pytest.raises(UserError, match="0099-does-not-apply.patch does not apply"):
        patching.apply_patches(host_copy, patch_dir)
    assert _tree_hashes(host_copy) == before
    assert patching.patch_status(host_copy, patch_dir).state == "clean"


def test_reinstall_over_patched_host_leaves_no_stale_state(host_copy: Path, tmp_path: Path) -> None:
    pristine = tmp_path / "pristine"
    shutil.copytree(host_copy, pristine)
    patching.apply_patches(host_copy)
    for rel in ("model/cnets.py", "model/modeling_llama_kv.py", "model/ea_model.py", "model/kv_cache.py"):  # pip
        shutil.copyfile(pristine / rel, host_copy / rel)
    assert patching.patch_status(host_copy).state == "clean"
    assert patching.apply_patches(host_copy) == NAMES


def test_host_patched_by_an_older_series_takes_the_new_patch_alone(host_copy: Path, tmp_path: Path) -> None:
    """A host patched before the newest patch existed (e.g. 0001-0003, then 0004 added for Qwen2): `apply`
    applies only the new one, `revert` still restores the wheel's bytes."""
    older = tmp_path / "older"
    older.mkdir()
    for path in patching.patch_files()[:-1]:
        shutil.copy(path, older / path.name)
    clean = _tree_hashes(host_copy)
    assert patching.apply_patches(host_copy, older) == NAMES[:-1]
    status = patching.patch_status(host_copy)
    assert status.state == "partial" and list(status.pending) == NAMES[-1:]
    with pytest.raises(UserError, match="not patched \\(partial\\); run `ppow patch apply`"):
        patching.require_patched_host(host_copy)

    assert patching.apply_patches(host_copy) == NAMES[-1:]
    assert patching.patch_status(host_copy).fully_patched
    assert patching.revert_patches(host_copy) == NAMES[::-1]
    assert _tree_hashes(host_copy) == clean
