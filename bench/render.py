"""Benchmark of issue #2: how long loading, rendering and the whole `render` command take.

Prints medians (ms) of each stage of the in-process pipeline on the sample issue, and of
the whole `qant-mail render` process, with ratios against baselines measured in the same
run. Targets on a 2-core machine: in-process pipeline <= 10 ms; whole process <= 0.35 s.

    python bench/render.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qant_mail import prose  # noqa: E402
from qant_mail.config import load_settings  # noqa: E402
from qant_mail.load import load  # noqa: E402
from qant_mail.render import Renderer  # noqa: E402

SAMPLE = ROOT / "issues" / "2023-11-20.yaml"


def median_ms(action: Callable[[], object], runs: int) -> float:
    """Return the median wall time of `action` in milliseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def process_ms(command: list[str], runs: int, env: dict[str, str]) -> float:
    """Return the median wall time of a whole process in milliseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="runs per in-process figure")
    parser.add_argument("--process-runs", type=int, default=15, help="runs per process figure")
    args = parser.parse_args()

    settings = load_settings(ROOT / "qant.toml", env={})
    renderer = Renderer(settings)
    document = load(SAMPLE)
    renderer.render(document.issue)  # warm the template cache, as any second render is

    def cold_load() -> object:
        prose.clear_cache()
        return load(SAMPLE)

    stages: dict[str, list[float]] = {"template+mjml": [], "inline": [], "text": []}
    whole: list[float] = []
    for _ in range(args.runs):
        prose.clear_cache()  # every figure is of a cold render: no parsed body is reused
        start = time.perf_counter()
        rendered = renderer.render(load(SAMPLE).issue)
        whole.append(time.perf_counter() - start)
        stages["template+mjml"].append(rendered.timings["template"] + rendered.timings["mjml"])
        stages["inline"].append(rendered.timings["inline"])
        stages["text"].append(rendered.timings["text"])

    def warm() -> object:
        # A re-render with the parsed bodies cached, as the preview does on each change.
        return renderer.render(load(SAMPLE).issue)

    def fresh_renderer() -> object:
        prose.clear_cache()
        return Renderer(settings).render(load(SAMPLE).issue)

    print(
        f"sample: {SAMPLE.relative_to(ROOT)}, {len(rendered.html.encode()) / 1000:.1f} KB of HTML"
    )
    print(f"{'stage':44s} {'median':>10s}")
    load_ms = median_ms(cold_load, args.runs)
    print(f"{'load + validate (YAML -> Issue)':44s} {load_ms:8.2f} ms")
    for name, values in stages.items():
        print(f"{'render: ' + name:44s} {statistics.median(values) * 1000:8.2f} ms")
    pipeline = statistics.median(whole) * 1000
    print(f"{'whole in-process pipeline (cold)':44s} {pipeline:8.2f} ms   (target <= 10 ms)")
    warm_ms = median_ms(warm, args.runs)
    print(f"{'whole in-process pipeline (bodies cached)':44s} {warm_ms:8.2f} ms")
    baseline = median_ms(fresh_renderer, max(5, args.runs // 5))
    print(
        f"{'baseline: new Renderer per issue':44s} {baseline:8.2f} ms   "
        f"(reusing one is {baseline / pipeline:.1f}x faster)"
    )

    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "qant_mail")], check=True)
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "qant_mail", "render", str(SAMPLE), "-o", out]
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
        whole_process = process_ms(command, args.process_runs, env)
    startup = process_ms([sys.executable, "-c", "pass"], args.process_runs, env)
    print(f"{'whole process: qant-mail render':44s} {whole_process:8.1f} ms   (target <= 350 ms)")
    print(
        f"{'baseline: python -c pass':44s} {startup:8.1f} ms   "
        f"(the command is {whole_process / startup:.0f}x an empty interpreter)"
    )


if __name__ == "__main__":
    main()
