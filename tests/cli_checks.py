"""What the bad-input tests check around a `ppow` command: its one `error:` line, and that nothing else on disk
changed (tests/test_outputs.py, tests/test_integrity.py)."""

from pathlib import Path

from ppow_plugin.cli import main as cli_main


def snapshot(root: Path, skip: Path | None = None) -> dict[str, bytes | None]:
    """Every path under `root` (outside `skip`) with its bytes (None for a directory)."""
    paths = sorted(p for p in root.rglob("*") if skip is None or not p.is_relative_to(skip))
    return {p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in paths}


def ppow(capsys, *argv) -> tuple[int, str]:
    """`ppow ...` in this process: exit code and its only `error:` line ("" if none)."""
    code = cli_main([str(a) for a in argv])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert len(lines) <= 1, lines
    return code, lines[0] if lines else ""
