"""Benchmark of issue #9, item 5: a send through a greylisting server.

The server (tests/faulty_smtp.py) refuses each new (sender, recipient) pair with
"450 4.7.1 … Greylisted" for GREYLIST seconds, then accepts it. 24 readers, retries
after RETRY seconds (doubling), the run allowed 180 s. The same scenario runs against
the code of a baseline (default: the revision before the fix, in a git worktree; or a
checkout's folder), and against this tree, interleaved, ROUNDS times each. Each round
prints, for each, the readers served after 30 s and after 180 s and the time to serve
them all, and the ratio of this tree's time to the baseline's; then the medians, the
ratio's with its range. `--tiny` scales the scenario down (4 readers, 1 s, 6 s allowed).

    python bench/greylist.py [--baseline REV|DIR] [--rounds N] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Scenario:
    readers: int = 24
    greylist: float = 10.0  # seconds a new pair is refused
    retry: float = 10.0  # seconds before the first retry
    allowed: float = 180.0  # the run's
    early: float = 30.0  # when the readers served so far are counted


TINY = Scenario(readers=4, greylist=1.0, retry=1.0, allowed=6.0, early=2.0)

# Run in a child process with the code under test first on sys.path.
CHILD = r"""
import dataclasses, json, sys, threading, time
from pathlib import Path
code, tests, project = sys.argv[1], sys.argv[2], Path(sys.argv[3])
sys.path[:0] = [code, tests]
from faulty_smtp import Behaviour, FaultyServerFactory
try:  # this tree: the application layer
    from qant_mail.app import issues, sending
    from qant_mail.app.context import Context
    from qant_mail.base.config import Sending, load_settings
    from qant_mail.delivery.transport import SmtpTransport
    from qant_mail.store.subscribers import Subscribers
    def prepare_send(path, settings):
        return issues.prepare(Context(settings), path)
    def send_to_list(prepared, settings, transport, **options):
        return sending.send(Context(settings, transport=transport), prepared, **options)
except ImportError:  # a baseline from before the layers: one flat package
    from qant_mail.config import Sending, load_settings
    from qant_mail.send import send_to_list
    from qant_mail.subscribers import Subscribers
    from qant_mail.transport import SmtpTransport
    try:
        from qant_mail.pipeline import prepare_send
    except ImportError:  # from before the pipeline module
        from qant_mail.send import prepare as prepare_send
readers, greylist, retry, allowed, early = (float(a) for a in sys.argv[4:9])
factory = FaultyServerFactory()
server = factory(Behaviour(greylist_seconds=greylist))
settings = load_settings(project / "qant.toml", env={})
smtp = settings.smtp.model_copy(update={"host": server.host, "port": server.port,
                                        "security": "none", "connections": 4})
policy = Sending(retry_after_seconds=retry, max_attempts=6)
settings = dataclasses.replace(settings, smtp=smtp, sending=policy)
store = Subscribers.open(settings.store_path)
store.import_rows("email\n" + "".join(f"r{n}@example.com\n" for n in range(int(readers))), "b")
store.close()
issue = sorted((project / "issues").glob("2023-11-20.yaml"))[0]
prepared = prepare_send(issue, settings)
stop = threading.Event()
timeline = []
def watch():
    start = time.monotonic()
    while not stop.is_set():
        timeline.append((time.monotonic() - start, len(server.received)))
        time.sleep(0.25)
watcher = threading.Thread(target=watch, daemon=True); watcher.start()
start = time.monotonic()
timer = threading.Timer(allowed, stop.set); timer.start()
report = send_to_list(prepared, settings, SmtpTransport(settings, env={}), stop=stop)
done = time.monotonic() - start
timer.cancel(); stop.set(); watcher.join()
timeline.append((done, len(server.received)))
print(report, file=sys.stderr)
def served_at(t):
    return max([n for at, n in timeline if at <= t] or [0])
all_at = next((at for at, n in timeline if n >= readers), None)
print(json.dumps({"early": served_at(early), "late": len(server.received),
                  "all_at": all_at, "elapsed": done}))
factory.stop()
"""


def run(code: Path, project: Path, scenario: Scenario) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "project"
        copy.mkdir()
        for name in ("qant.toml",):
            shutil.copy(project / name, copy / name)
        for name in ("templates", "issues", "assets"):  # those the checkout has
            if (project / name).exists():
                shutil.copytree(project / name, copy / name)
        env = {**os.environ, "QANT_SECRET_KEY": "benchmark-secret-of-some-length"}
        values = (s.readers, s.greylist, s.retry, s.allowed, s.early) if (s := scenario) else ()
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(code), str(ROOT / "tests"), str(copy)]
            + [str(v) for v in values],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=scenario.allowed + 60,
        )
        if result.returncode != 0:
            sys.exit(f"the send of {code} failed:\n{result.stderr[-2000:]}")
        figures: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
        figures["report"] = result.stderr.strip().splitlines()[-1] if result.stderr else None
        return figures


@contextlib.contextmanager
def baseline_code(baseline: str) -> Iterator[Path]:
    """Yield the baseline's folder: `baseline` if it is one, else a git worktree of that
    revision (removed after)."""
    if Path(baseline).is_dir():
        yield Path(baseline).resolve()
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(folder), baseline],
            check=True,
            capture_output=True,
        )
        try:
            yield folder
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder)],
                check=False,
            )


def all_served(row: dict[str, Any]) -> str:
    return "never" if row["all_at"] is None else f"{row['all_at']:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--baseline", default="50f3db2", help="revision before the fix, or a checkout's folder"
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="the scenario scaled down")
    args = parser.parse_args()
    scenario = TINY if args.tiny else Scenario()
    s = scenario
    print(
        f"{s.readers} readers, greylisted {s.greylist:.0f} s, retries after {s.retry:.0f} s, "
        f"{s.allowed:.0f} s allowed",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {"baseline": [], "this tree": []}
    ratios: list[float] = []
    with baseline_code(args.baseline) as baseline:
        for number in range(1, args.rounds + 1):
            old = run(baseline, baseline, scenario)
            new = run(ROOT, ROOT, scenario)
            results["baseline"].append(old)
            results["this tree"].append(new)
            said = (
                f"round {number}: baseline {old['early']} served at {s.early:.0f} s, all after "
                f"{all_served(old)}; this tree {new['early']} at {s.early:.0f} s, all after "
                f"{all_served(new)}"
            )
            if old["all_at"] and new["all_at"]:
                ratios.append(new["all_at"] / old["all_at"])
                said += (
                    f"; ratio of the times to serve all (this tree / baseline) {ratios[-1]:.2f}x"
                )
            print(said, flush=True)
    for name, rows in results.items():
        for row in rows:
            print(f"  {name}: {row['report']}", file=sys.stderr)
    early, late = f"served at {s.early:.0f} s", f"at {s.allowed:.0f} s"
    print(f"medians of {args.rounds} rounds:")
    print(f"{'code':<12} {early:>15} {late:>9} {'all served after':>17}")
    for name, rows in results.items():
        at_early = statistics.median(r["early"] or 0 for r in rows)
        at_late = statistics.median(r["late"] or 0 for r in rows)
        finished = [r["all_at"] for r in rows if r["all_at"] is not None]
        when = f"{statistics.median(finished):.1f} s" if len(finished) == len(rows) else "never"
        print(f"{name:<12} {at_early:>15.0f} {at_late:>9.0f} {when:>17}")
    if ratios:
        print(
            f"ratio of the times to serve all, this tree / baseline: "
            f"{statistics.median(ratios):.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})"
        )
    else:
        print("ratio of the times to serve all: none (a run never served them all)")


if __name__ == "__main__":
    main()
