"""Each benchmark runs at a tiny size, so that none can break unseen (issue #22)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_render_benchmark_runs_at_a_tiny_size() -> None:
    done = subprocess.run(
        [sys.executable, "bench/render.py", "--rounds", "1", "--runs", "2", "--process-runs", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "x the Rust stages" in done.stdout
    assert "x python -c pass" in done.stdout
    assert "in-process / Rust stages: " in done.stdout
    assert "process / python -c pass: " in done.stdout
