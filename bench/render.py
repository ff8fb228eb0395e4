"""Benchmark of issues #2 and #11: how long loading, rendering and `qant-mail render` take.

In rounds, interleaved: an in-process measurement (a child process loads and renders the
sample issue cold, its parsed bodies forgotten, `--runs` times, and reports the median of
each stage), then the whole `qant-mail render` process and an empty interpreter
(`python -c pass`), `--process-runs` times each. With `--versus DIR` (another checkout of
qant-mail, say the commit before a change), the same is measured of it in the same
rounds, so that both figures share the machine's state. Printed: each round's figures,
then the medians of the rounds, and the process time as a ratio to the empty
interpreter measured in the same round.

Targets on a 2-core machine: in-process pipeline <= 10 ms; whole process <= 0.35 s.

    python bench/render.py [--rounds 5] [--versus /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = Path("issues") / "2023-11-20.yaml"


def child(root: Path, runs: int) -> None:
    """Measure the in-process pipeline of the checkout at `root`; print medians (ms)."""
    sys.path.insert(0, str(root))
    try:  # a tree in layers
        from qant_mail.authoring import prose
        from qant_mail.authoring.load import load
        from qant_mail.authoring.render import Renderer
        from qant_mail.base.config import load_settings
    except ImportError:  # a baseline from before the layers: one flat package
        from qant_mail.config import load_settings  # type: ignore[import-not-found,no-redef]
        from qant_mail.load import load  # type: ignore[import-not-found,no-redef]
        from qant_mail.render import Renderer  # type: ignore[import-not-found,no-redef]

        from qant_mail import prose  # type: ignore[no-redef]

    settings = load_settings(root / "qant.toml", env={})
    renderer = Renderer(settings)
    sample = root / SAMPLE
    renderer.render(load(sample).issue)  # templates compiled once, as for any second render
    stages: dict[str, list[float]] = {"load": [], "html": [], "inline": [], "text": []}
    whole: list[float] = []
    for _ in range(runs):
        prose.clear_cache()  # a cold render: no parsed body is reused
        gc.collect()  # a collection of earlier runs' garbage does not land in this one
        start = time.perf_counter()
        issue = load(sample).issue
        loaded = time.perf_counter()
        rendered = renderer.render(issue)
        whole.append(time.perf_counter() - start)
        stages["load"].append(loaded - start)
        stages["html"].append(rendered.timings["template"] + rendered.timings["mjml"])
        stages["inline"].append(rendered.timings["inline"])
        stages["text"].append(rendered.timings["text"])
    result = {name: statistics.median(values) * 1000 for name, values in stages.items()}
    result["pipeline"] = statistics.median(whole) * 1000
    result["pipeline_min"] = min(whole) * 1000
    print(json.dumps(result))


def in_process(root: Path, runs: int) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, __file__, "--child", str(root), "--runs", str(runs)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def process_ms(command: list[str], cwd: Path, runs: int) -> float:
    """Return the median wall time of a whole process in milliseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=40, help="cold renders per round")
    parser.add_argument("--process-runs", type=int, default=5, help="processes per round")
    parser.add_argument("--versus", type=Path, help="another checkout, measured alongside")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.runs)
        return

    roots = {"this checkout": ROOT}
    if args.versus:
        roots["versus"] = args.versus.resolve()
    for root in roots.values():
        # Compiled once, as an installed package is; the first process would pay it.
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "qant_mail")])
    found: dict[str, dict[str, list[float]]] = {name: {} for name in roots}
    with tempfile.TemporaryDirectory() as out:
        for number in range(args.rounds):
            empty = process_ms([sys.executable, "-c", "pass"], ROOT, args.process_runs)
            line = [f"round {number + 1}: python -c pass {empty:.0f} ms"]
            for name, root in roots.items():
                figures = in_process(root, args.runs)
                command = [sys.executable, "-m", "qant_mail", "render", str(SAMPLE), "-o", out]
                figures["process"] = process_ms(command, root, args.process_runs)
                figures["ratio"] = figures["process"] / empty
                for key, value in figures.items():
                    found[name].setdefault(key, []).append(value)
                line.append(
                    f"[{name}: in-process {figures['pipeline']:.1f} ms (load "
                    f"{figures['load']:.1f}, html {figures['html']:.1f}, inline "
                    f"{figures['inline']:.1f}, text {figures['text']:.1f}); process "
                    f"{figures['process']:.0f} ms = {figures['ratio']:.1f}x python -c pass]"
                )
            print(" ".join(line), flush=True)

    print(f"medians of {args.rounds} rounds:")
    for name, root in roots.items():
        figures = {key: statistics.median(values) for key, values in found[name].items()}
        print(
            f"  {name} ({root}): in-process {figures['pipeline']:.1f} ms "
            f"(fastest run {figures['pipeline_min']:.1f}; target <= 10) = load "
            f"{figures['load']:.1f} + html {figures['html']:.1f} + inline "
            f"{figures['inline']:.1f} + text {figures['text']:.1f} + the rest; "
            f"qant-mail render {figures['process']:.0f} ms (target <= 350), "
            f"{figures['ratio']:.1f}x python -c pass"
        )
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("(PYTHONDONTWRITEBYTECODE is set: the package's bytecode was compiled above)")


if __name__ == "__main__":
    main()
