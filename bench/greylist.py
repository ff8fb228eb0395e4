"""Benchmark of issue #9, item 5: a send through a greylisting server.

The server (tests/faulty_smtp.py) refuses each new (sender, recipient) pair with
"450 4.7.1 … Greylisted" for GREYLIST seconds, then accepts it. 24 readers, retries
after RETRY seconds (doubling), the run allowed 180 s. The same scenario runs against
the code of a baseline revision (default: before the fix) in a git worktree, and against
this tree, interleaved, ROUNDS times each; it prints, for each, the readers served after
30 s and after 180 s and the time to serve them all (medians).

    python bench/greylist.py [--baseline REV] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
READERS, GREYLIST, RETRY, ALLOWED = 24, 10.0, 10.0, 180.0

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
readers, greylist, retry, allowed = (float(a) for a in sys.argv[4:8])
factory = FaultyServerFactory()
server = factory(Behaviour(greylist_seconds=greylist))
settings = load_settings(project / "qant.toml", env={})
smtp = settings.smtp.model_copy(update={"host": server.host, "port": server.port,
                                        "security": "none", "connections": 4})
sending = Sending(retry_after_seconds=retry, max_attempts=6)
settings = dataclasses.replace(settings, smtp=smtp, sending=sending)
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
threading.Timer(allowed, stop.set).start()
report = send_to_list(prepared, settings, SmtpTransport(settings, env={}), stop=stop)
done = time.monotonic() - start
stop.set(); watcher.join()
timeline.append((done, len(server.received)))
print(report, file=sys.stderr)
def served_at(t):
    return max([n for at, n in timeline if at <= t] or [0])
all_at = next((at for at, n in timeline if n >= readers), None)
print(json.dumps({"at30": served_at(30), "at180": len(server.received),
                  "all_at": all_at, "elapsed": done}))
factory.stop()
"""


def run(code: Path, project: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "project"
        copy.mkdir()
        for name in ("qant.toml",):
            shutil.copy(project / name, copy / name)
        for name in ("templates", "issues"):
            shutil.copytree(project / name, copy / name)
        env = {**os.environ, "QANT_SECRET_KEY": "benchmark-secret-of-some-length"}
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(code), str(ROOT / "tests"), str(copy)]
            + [str(v) for v in (READERS, GREYLIST, RETRY, ALLOWED)],
            capture_output=True,
            text=True,
            env=env,
            check=True,
            timeout=ALLOWED + 60,
        )
        figures: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
        figures["report"] = result.stderr.strip().splitlines()[-1] if result.stderr else None
        return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="50f3db2", help="revision before the fix")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        baseline = Path(scratch) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline],
            check=True,
            capture_output=True,
        )
        try:
            results: dict[str, list[dict[str, Any]]] = {"baseline": [], "this tree": []}
            for _ in range(args.rounds):
                results["baseline"].append(run(baseline, baseline))
                results["this tree"].append(run(ROOT, ROOT))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)],
                check=False,
            )
    print(f"{READERS} readers, greylisted {GREYLIST:.0f} s, retries after {RETRY:.0f} s")
    print(f"{'code':<12} {'served at 30 s':>15} {'at 180 s':>9} {'all served after':>17}")
    for name, rows in results.items():
        for row in rows:
            print(f"  {name}: {row['report']}", file=sys.stderr)
    for name, rows in results.items():
        at30 = statistics.median(r["at30"] or 0 for r in rows)
        at180 = statistics.median(r["at180"] or 0 for r in rows)
        finished = [r["all_at"] for r in rows if r["all_at"] is not None]
        when = f"{statistics.median(finished):.1f} s" if len(finished) == len(rows) else "never"
        print(f"{name:<12} {at30:>15.0f} {at180:>9.0f} {when:>17}")


if __name__ == "__main__":
    main()
