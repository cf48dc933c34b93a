"""scripts/provenance.py: what a run's metrics say (a resumed run's steps counted once, the last 100 steps'
means, the τ probe), and its refusals (a record already there, no finished run) with one error line, exit 2
and nothing written. The τ check it measures is re-measured by tests/test_committed_drafters.py (slow)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("provenance", ROOT / "scripts" / "provenance.py")
provenance = importlib.util.module_from_spec(spec)
spec.loader.exec_module(provenance)


def test_a_resumed_runs_repeated_steps_count_once():
    rows = [{"step": s, "loss": 1.0, "train_s": s / 10} for s in range(10, 201, 10)]
    rows += [{"step": s, "loss": 3.0, "train_s": s / 10 + 1} for s in (190, 200)]  # resumed from step 180
    rows += [{"step": 200, "sim_tau": 2.34567, "train_s": 21.0}, {"step": 100, "sim_tau": 2.0}]
    got = provenance.training_record(rows)
    # steps 110..200 are the last 100: 8 rows at 1.0, 190 and 200 at 3.0 (their resumed rows win)
    assert got["final_metrics_mean_last_100_steps"] == {"loss": 1.4}
    assert got["steps"] == 200 and got["train_s"] == 21
    assert got["sim_tau_during_training_sharegpt16_128tok"] == {"100": 2.0, "200": 2.3457}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/provenance.py", *args, "--what", "w", "--command", "c"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_refuses_a_written_record_and_an_unfinished_run(tmp_path):
    committed = tmp_path / "committed"
    committed.mkdir()
    (committed / "provenance.json").write_text("{}")
    res = _run(str(tmp_path / "run"), str(committed))
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and "written once" in res.stderr
    assert (committed / "provenance.json").read_text() == "{}"
    (committed / "provenance.json").unlink()
    res = _run(str(tmp_path / "run"), str(committed))
    assert res.returncode == 2 and "is not a finished run" in res.stderr and "slim_drafter.py" in res.stderr
    assert sorted(p.name for p in committed.iterdir()) == []
