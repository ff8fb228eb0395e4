"""Benchmark of issue #11: `qant-mail subscribers import` streams its CSV file.

Each import runs the real command in a child process of its own, into a new list, and
reports that child's peak resident memory (VmHWM) and its time. Rounds alternate the
sizes, small to large and back. Target: importing 1,000,000 rows peaks at <= 1.2x the
memory of importing 10,000 (the interpreter and its libraries are most of the latter).
Each round prints each size's peak over the smallest's, measured in that round; then
the medians, each ratio's with its range. `--tiny`: 1 round of 1,000 and 5,000 rows.

    python bench/subscribers.py [--rounds 3] [--sizes 10000,100000,1000000] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DOMAINS = ("gmail.com", "orange.fr", "free.fr", "laposte.net", "outlook.fr", "example.org")


def write_list(path: Path, rows: int) -> None:
    """Write a CSV of `rows` distinct readers, as a newsletter's export would look."""
    with path.open("w", encoding="utf-8") as out:
        out.write("email,name\n")
        for n in range(rows):
            out.write(f"reader.{n}@{DOMAINS[n % len(DOMAINS)]},Lecteur n°{n}\n")


def child(csv: Path, store: Path) -> None:
    """Run `subscribers import` here, then print this process's peak memory and time."""
    import os

    from qant_mail.cli import app

    os.environ["QANT_STORE_PATH"] = str(store)
    os.environ["QANT_CONFIG"] = str(ROOT / "qant.toml")
    start = time.perf_counter()
    app(["subscribers", "import", str(csv)], standalone_mode=False)
    elapsed = time.perf_counter() - start
    peak = 0.0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    print(json.dumps({"peak_mb": peak, "seconds": elapsed}))


def measure(csv: Path, folder: Path) -> dict[str, float]:
    store = folder / f"list-{time.monotonic_ns()}.db"
    output = subprocess.run(
        [sys.executable, __file__, "--child", str(csv), str(store)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--tiny", action="store_true", help="1 round of 1,000 and 5,000 rows")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.tiny:
        args.rounds, args.sizes = 1, "1000,5000"
    sizes = [int(s) for s in args.sizes.split(",")]
    smallest = sizes[0]
    ratios: dict[int, list[float]] = {size: [] for size in sizes}
    with tempfile.TemporaryDirectory(prefix="qant-import-") as scratch:
        folder = Path(scratch)
        files = {size: folder / f"list-{size}.csv" for size in sizes}
        for size, path in files.items():
            write_list(path, size)
        found: dict[int, list[dict[str, float]]] = {size: [] for size in sizes}
        for number in range(args.rounds):
            order = sizes if number % 2 == 0 else sizes[::-1]
            for size in order:
                found[size].append(measure(files[size], folder))
            base = found[smallest][-1]["peak_mb"]
            said = []
            for size in sizes:
                row = found[size][-1]
                ratios[size].append(row["peak_mb"] / base)
                said.append(
                    f"{size:,} rows {row['peak_mb']:.1f} MB (ratio {ratios[size][-1]:.2f}x) "
                    f"in {row['seconds']:.2f} s"
                )
            print(f"round {number + 1}: " + "; ".join(said), flush=True)
    print(f"{'rows':>10s} {'peak MB':>9s} {'ratio (rounds)':>22s} {'seconds':>8s} {'rows/s':>9s}")
    for size in sizes:
        peak = statistics.median(r["peak_mb"] for r in found[size])
        seconds = statistics.median(r["seconds"] for r in found[size])
        ratio = statistics.median(ratios[size])
        spread = f"{ratio:.2f}x ({min(ratios[size]):.2f}-{max(ratios[size]):.2f})"
        print(f"{size:>10,} {peak:9.1f} {spread:>22s} {seconds:8.2f} {size / seconds:9,.0f}")
    print(
        f"(medians of {args.rounds} rounds, the ratio's of the per-round ratios; target: "
        f"{sizes[-1]:,} rows <= 1.2x the peak of {smallest:,})"
    )


if __name__ == "__main__":
    main()
