"""Each benchmark runs at a tiny size, so that none can break unseen (issue #22)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.postgres import _unavailable as postgres_unavailable

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


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


def run_bench(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run `bench/script` with `args` to its end; return what it printed."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QANT_")}
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{script} ended with {result.returncode}:\n{result.stderr}"
    return result.stdout


def postfix() -> dict[str, str]:
    """The environment in which the benchmarks find Postfix's smtp-sink and smtp-source
    (QANT_BENCH_POSTFIX, else /opt/postfix, else /); skip without them, or fail if
    QANT_TEST_REQUIRE_POSTFIX is set."""
    chosen = os.environ.get("QANT_BENCH_POSTFIX")
    candidates = [Path(chosen)] if chosen else [Path("/opt/postfix"), Path("/")]
    for root in candidates:
        if all((root / "usr" / "sbin" / tool).exists() for tool in ("smtp-sink", "smtp-source")):
            return {"QANT_BENCH_POSTFIX": str(root)}
    why = (
        f"no smtp-sink and smtp-source under {' or '.join(map(str, candidates))}: "
        "`apt-get download postfix && dpkg-deb -x postfix_*.deb /opt/postfix`"
    )
    if os.environ.get("QANT_TEST_REQUIRE_POSTFIX"):
        pytest.fail(f"Postfix's tools are needed here: {why}")
    pytest.skip(why)


def ratio_lines(output: str, words: str) -> list[str]:
    """The lines that hold `words` and a ratio (a figure followed by x)."""
    return [line for line in output.splitlines() if words in line and re.search(r"\d\.\d\dx", line)]


def test_send_benchmark_prints_each_rounds_ratios_and_the_signed_ones() -> None:
    output = run_bench("send.py", "--tiny", env=postfix())
    assert len(ratio_lines(output, "  compose + DKIM")) == 3  # rsa, ed25519, both: the round
    assert len(ratio_lines(output, "ratio signing cost / raw signature")) == 3  # medians
    assert len(ratio_lines(output, "signed send / unsigned send ratio")) == 3
    assert ratio_lines(output, "sending vs the naive approach")


def test_versus_benchmark_prints_the_cpu_per_message_beside_smtp_sources() -> None:
    # The other checkout is this one: what matters is that the comparison runs.
    output = run_bench("versus.py", "--tiny", "--signed", "--versus", str(ROOT), env=postfix())
    assert "round 1:" in output
    assert ratio_lines(output, "ms CPU/message; ratios: CPU/message")  # the round's
    assert len(ratio_lines(output, "ratio CPU/message / smtp-source's")) == 4  # medians
    assert len(ratio_lines(output, "with the sink's CPU meanwhile added")) == 4
    assert ratio_lines(output, "with the sink's share")  # the round's
    assert len(ratio_lines(output, "ratio RSA-signed send / unsigned send")) == 2
    assert len(ratio_lines(output, "ratio CPU/message this / versus")) == 2


def test_postgres_benchmark_prints_each_rounds_ratios() -> None:
    env = postfix()
    try:
        output = run_bench("postgres.py", "--tiny", env=env)
    except AssertionError as err:
        if "ended with 77" not in str(err):  # 77: no PostgreSQL server could start
            raise
        postgres_unavailable(str(err).splitlines()[-1])
        raise
    assert ratio_lines(output, "round 1: ratio of PostgreSQL's time to SQLite's")
    assert ratio_lines(output, "round 1: send")
    assert len(ratio_lines(output, "ratio of PostgreSQL's time to SQLite's")) == 4
    assert ratio_lines(output, "send, ratio of three senders to one on PostgreSQL")


def test_greylist_benchmark_prints_each_rounds_ratio() -> None:
    # The baseline is this checkout: no git worktree of an old revision is made.
    output = run_bench("greylist.py", "--tiny", "--baseline", str(ROOT))
    assert ratio_lines(output, "round 1:")
    assert ratio_lines(output, "ratio of the times to serve all, this tree / baseline:")


def test_subscribers_benchmark_prints_each_rounds_ratio() -> None:
    output = run_bench("subscribers.py", "--tiny")
    assert ratio_lines(output, "round 1:")
    assert len(re.findall(r"\d\.\d\dx \(\d", output)) == 2  # the medians, one a size
