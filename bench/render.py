"""Benchmark of issues #2, #11 and #22: how long loading, rendering and `qant-mail render`
take, against anchors measured in the same rounds.

In rounds, interleaved: an in-process measurement (a child process loads and renders the
sample issue cold, its parsed bodies forgotten, `--runs` times, and reports the median of
each stage), then the whole `qant-mail render` process and an empty interpreter
(`python -c pass`), `--process-runs` times each. With `--versus DIR` (another checkout of
qant-mail, say the commit before a change), the same is measured of it in the same
rounds, its turn first in every other round, so that both figures share the machine's
state.

The anchors: in each run, after the render, the child times the two Rust stages alone
(mjml-python's `mjml2html` on the very MJML the render produced, css-inline on the very
HTML it was given); the in-process time is given as a ratio to theirs. The process time
is a ratio to the empty interpreter's. Printed: each round's figures and ratios, then
for each checkout the median of the rounds' figures and of their ratios, with the range.

Targets (issue #22): in-process <= 3.5x the Rust stages (goal: 2.5x); `qant-mail render`
<= 8x `python -c pass`.

    python bench/render.py [--rounds 5] [--runs 40] [--process-runs 5] [--versus DIR]
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = Path("issues") / "2023-11-20.yaml"
IN_PROCESS_TARGET, PROCESS_TARGET = 3.5, 8.0


class _Recorder:
    """Stands for a Rust stage in the renderer: records the input of each call."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.inputs: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.inputs.append((args, kwargs))
        return self.call(*args, **kwargs)

    def inline(self, *args: Any, **kwargs: Any) -> Any:  # as a css_inline.CSSInliner
        return self(*args, **kwargs)

    def timed_last(self) -> float:
        """Run the last recorded call again, alone; return its time in seconds."""
        args, kwargs = self.inputs[-1]
        start = time.perf_counter()
        self.call(*args, **kwargs)
        return time.perf_counter() - start


def child(root: Path, runs: int) -> None:
    """Measure the in-process pipeline of the checkout at `root`; print medians (ms)."""
    sys.path.insert(0, str(root))
    import mjml

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
    # The renderer calls `mjml.mjml2html` and its inliner's `inline`: both are recorded.
    to_html = _Recorder(mjml.mjml2html)
    mjml.mjml2html = to_html
    inline = _Recorder(renderer.inliner.inline)
    renderer.inliner = inline  # type: ignore[assignment]
    sample = root / SAMPLE
    renderer.render(load(sample).issue)  # templates compiled once, as for any second render
    stages: dict[str, list[float]] = {"load": [], "html": [], "inline": [], "text": []}
    whole: list[float] = []
    rust: list[float] = []
    for _ in range(runs):
        prose.clear_cache()  # a cold render: no parsed body is reused
        gc.collect()  # a collection of earlier runs' garbage does not land in this one
        start = time.perf_counter()
        issue = load(sample).issue
        loaded = time.perf_counter()
        rendered = renderer.render(issue)
        whole.append(time.perf_counter() - start)
        rust.append(to_html.timed_last() + inline.timed_last())
        stages["load"].append(loaded - start)
        stages["html"].append(rendered.timings["template"] + rendered.timings["mjml"])
        stages["inline"].append(rendered.timings["inline"])
        stages["text"].append(rendered.timings["text"])
    result = {name: statistics.median(values) * 1000 for name, values in stages.items()}
    result["pipeline"] = statistics.median(whole) * 1000
    result["pipeline_min"] = min(whole) * 1000
    result["rust"] = statistics.median(rust) * 1000
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


def _spread(values: list[float]) -> str:
    """Return the median of `values` and their range, as ratios."""
    return f"{statistics.median(values):.2f}x (range {min(values):.2f}-{max(values):.2f})"


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
            lines = [f"round {number + 1}: python -c pass {empty:.0f} ms"]
            order = list(roots.items())
            if number % 2:
                order.reverse()  # neither checkout always goes first
            for name, root in order:
                figures = in_process(root, args.runs)
                figures["in_process_ratio"] = figures["pipeline"] / figures["rust"]
                command = [sys.executable, "-m", "qant_mail", "render", str(SAMPLE), "-o", out]
                figures["process"] = process_ms(command, root, args.process_runs)
                figures["process_ratio"] = figures["process"] / empty
                for key, value in figures.items():
                    found[name].setdefault(key, []).append(value)
                lines.append(
                    f"  {name}: in-process {figures['pipeline']:.1f} ms (load "
                    f"{figures['load']:.1f}, html {figures['html']:.1f}, inline "
                    f"{figures['inline']:.1f}, text {figures['text']:.1f}) = "
                    f"{figures['in_process_ratio']:.2f}x the Rust stages "
                    f"({figures['rust']:.2f} ms); process {figures['process']:.0f} ms = "
                    f"{figures['process_ratio']:.2f}x python -c pass"
                )
            print("\n".join(lines), flush=True)

    print(f"medians of {args.rounds} rounds (ratios: median of the rounds' ratios, range):")
    for name, root in roots.items():
        figures = {key: statistics.median(values) for key, values in found[name].items()}
        print(
            f"  {name} ({root}): in-process {figures['pipeline']:.1f} ms (fastest run "
            f"{figures['pipeline_min']:.1f}) = load {figures['load']:.1f} + html "
            f"{figures['html']:.1f} + inline {figures['inline']:.1f} + text "
            f"{figures['text']:.1f} + the rest; Rust stages {figures['rust']:.2f} ms; "
            f"qant-mail render {figures['process']:.0f} ms\n"
            f"    in-process / Rust stages: {_spread(found[name]['in_process_ratio'])}, "
            f"target <= {IN_PROCESS_TARGET}x\n"
            f"    process / python -c pass: {_spread(found[name]['process_ratio'])}, "
            f"target <= {PROCESS_TARGET}x"
        )
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("(PYTHONDONTWRITEBYTECODE is set: the package's bytecode was compiled above)")


if __name__ == "__main__":
    main()
