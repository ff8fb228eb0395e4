"""Benchmark of issue #13: the store on PostgreSQL, beside SQLite in the same run.

Starts its own PostgreSQL server (Debian's, as the tests do) and Postfix's smtp-sink
(QANT_BENCH_POSTFIX, see bench/send.py), then measures, interleaving the stores round by
round and printing medians:

- a send of the sample issue to N readers into smtp-sink, as whole `qant-mail send`
  processes: one on SQLite, one on PostgreSQL, three at once on PostgreSQL (msg/s of the
  run as a whole);
- the ledger's own cost per message (claim a batch, record each reply), with a transport
  that discards: how much PostgreSQL's claims cost beside SQLite's (the whole send,
  planning included, but the store's driver imported before the clock starts);
- importing a CSV of R rows (PostgreSQL: COPY), and planning a run of all of them (one
  INSERT … SELECT);
- the peak memory of a sender for M recipients against that for 10,000 (discarding
  transport, in a child process each).

Each round prints its ratios: PostgreSQL's time over SQLite's for the ledger, the import
and the plan, against issue #18's bounds (1.2x, 1.5x, 2x), and the sends' rates (one
sender on PostgreSQL over one on SQLite, three over one); then come the medians, each
ratio's with its range over the rounds. `--tiny`: every figure small, one round. Without
a PostgreSQL server to start, it says so and ends with status 77.

    QANT_BENCH_POSTFIX=/opt/postfix python bench/postgres.py [--readers 3000]
        [--rows 1000000] [--memory-rows 100000] [--rounds 3] [--tiny]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from send import SECRET, _Discard, peak_mb, run_script, start_sink  # noqa: E402

from qant_mail.app import issues, sending  # noqa: E402
from qant_mail.app.context import Context  # noqa: E402
from qant_mail.base.config import Settings, Store, load_settings  # noqa: E402
from qant_mail.store.ledger import Ledger, State  # noqa: E402
from qant_mail.store.subscribers import Subscribers  # noqa: E402
from tests.postgres import PostgresUnavailable, create_database, running_postgres  # noqa: E402

SAMPLE = ROOT / "issues" / "2023-11-20.yaml"


def project(store: str, port: int) -> Path:
    """A project folder whose settings use `store` (a file or a URL) and the sink."""
    folder = Path(tempfile.mkdtemp(prefix="qant-bench-"))
    for name in ("templates", "issues", "assets"):  # those the checkout has
        if (ROOT / name).exists():
            subprocess.run(["cp", "-r", str(ROOT / name), str(folder / name)], check=True)
    text = (ROOT / "qant.toml").read_text()
    text = text.replace("[store]\n", f'[store]\nurl = "{_url(store)}"\n', 1)
    text = text.replace("port = 2525", f"port = {port}")
    (folder / "qant.toml").write_text(text)
    return folder


def _url(store: str) -> str:
    return store if store.startswith("postgresql://") else f"sqlite:///{store}"


def fill(store: str, count: int) -> None:
    """Give `store` `count` readers."""
    with Subscribers.open(store if store.startswith("postgresql://") else Path(store)) as list_:
        rows = "email,name\n" + "".join(f"r{n}@example.com,Lecteur {n}\n" for n in range(count))
        list_.import_rows(rows, "bench")


def send_processes(folder: Path, senders: int) -> float:
    """Run `senders` `qant-mail send` processes on the project; return the run's msg/s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QANT_")}
    env |= {"QANT_SECRET_KEY": SECRET, "QANT_CONFIG": str(folder / "qant.toml")}
    command = [sys.executable, "-m", "qant_mail", "send", "issues/2023-11-20.yaml", "--yes"]
    start = time.perf_counter()
    running = [
        subprocess.Popen(
            command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(senders)
    ]
    for process in running:
        if process.wait() not in (0, 3):  # OK, or PARTIAL (rows left to another)
            sys.exit(f"a send ended with status {process.returncode}")
    elapsed = time.perf_counter() - start
    settings = load_settings(folder / "qant.toml", env={})
    ledger = Ledger(settings.store_path)
    send = ledger.find("2023-11-20")
    assert send is not None
    sent = ledger.counts(send)[State.SENT]
    ledger.close()
    return sent / elapsed


def settings_on(store: str) -> Settings:
    settings = load_settings(ROOT / "qant.toml", env={})
    return dataclasses.replace(settings, store=Store(url=_url(store)))


def child(kind: str, store: str, count: str) -> None:
    """One measure in a process of its own (its peak memory is its own); prints JSON."""
    os.environ["QANT_SECRET_KEY"] = SECRET
    settings = settings_on(store)
    if kind == "ledger":  # the ledger's cost per message, SMTP taken away
        ctx = Context(settings, transport=_Discard())
        prepared = issues.prepare(ctx, SAMPLE)
        # The store's driver imported and a first connection made before the clock
        # starts, for both stores: psycopg's import alone is 60-90 ms of start-up, once a
        # process, which is not a cost a message (sqlite3 is imported by then already).
        warm = Ledger(settings.store_path)
        warm.find("-")
        warm.close()
        start = time.perf_counter()
        report = sending.send(ctx, prepared)
        rate = report.done[State.SENT] / (time.perf_counter() - start)
        print(json.dumps({"rate": rate, "peak_mb": peak_mb()}))
    elif kind == "import":
        path = Path(count)
        start = time.perf_counter()
        with Subscribers.open(settings.store_path) as list_:
            added = list_.import_csv(path, "bench").added
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "added": added, "peak_mb": peak_mb()}))
    elif kind == "plan":
        ledger = Ledger(settings.store_path)
        start = time.perf_counter()
        send = ledger.plan("2023-11-20", "hash", "Sujet")
        seconds = time.perf_counter() - start
        planned = sum(ledger.counts(send).values())
        ledger.close()
        print(json.dumps({"seconds": seconds, "planned": planned}))


def run_child(*args: str) -> dict[str, float]:
    return run_script(__file__, *args)


def new_store(kind: str, server: Path) -> str:
    if kind == "postgresql":
        return create_database(server)
    return str(Path(tempfile.mkdtemp()) / "store.db")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3)
    parser.add_argument("--readers", type=int, default=3000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    # A sender to a million takes minutes on this machine: the memory figure compares
    # this many recipients with 10,000.
    parser.add_argument("--memory-rows", type=int, default=100_000)
    parser.add_argument("--memory-base", type=int, default=10_000, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help="every figure small: a check it runs")
    options = parser.parse_args()
    if options.child:
        child(*options.child)
        return
    if options.tiny:
        options.readers, options.rows, options.rounds = 100, 1000, 1
        options.memory_rows, options.memory_base = 2000, 500
    server, port = start_sink()
    try:
        with running_postgres() as pg:
            measure(options, pg, port)
    except PostgresUnavailable as err:
        print(f"no PostgreSQL server could be started here: {err}", file=sys.stderr)
        sys.exit(77)
    finally:
        server.terminate()
        server.wait()


# Issue #18's bounds on PostgreSQL's time beside SQLite's, measured in the same round.
BOUNDS = {"ledger": 1.2, "import": 1.5, "plan": 2.0}


def spread(values: list[float]) -> str:
    """Return the median of per-round ratios and their range: "1.23x (rounds 1.10-1.40)"."""
    middle = statistics.median(values)
    return f"{middle:.2f}x (rounds {min(values):.2f}-{max(values):.2f})"


def measure(options: argparse.Namespace, pg: Path, port: int) -> None:
    readers, rows, rounds = options.readers, options.rows, options.rounds
    runs: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {name: [] for name in BOUNDS}
    csv = Path(tempfile.mkdtemp()) / "rows.csv"
    with csv.open("w") as out:
        out.write("email,name\n")
        for n in range(rows):
            out.write(f"reader{n}@example.com,Lecteur {n}\n")
    cases = [("sqlite", 1), ("postgresql", 1), ("postgresql", 3)]
    send_ratios: dict[str, list[float]] = {"pg_sqlite": [], "three_one": []}
    for number in range(1, rounds + 1):  # interleaved: one of each per round
        sent: dict[tuple[str, int], float] = {}
        for kind, senders in cases:
            store = new_store(kind, pg)
            fill(store, readers)
            rate = send_processes(project(store, port), senders)
            sent[kind, senders] = rate
            runs.setdefault(f"send {readers:,}, {kind}, {senders} sender(s)", []).append(rate)
        send_ratios["pg_sqlite"].append(sent["postgresql", 1] / sent["sqlite", 1])
        send_ratios["three_one"].append(sent["postgresql", 3] / sent["postgresql", 1])
        print(
            f"round {number}: send {readers:,}: SQLite {sent['sqlite', 1]:,.0f} msg/s, "
            f"PostgreSQL {sent['postgresql', 1]:,.0f} msg/s (ratio "
            f"{send_ratios['pg_sqlite'][-1]:.2f}x), three senders on PostgreSQL "
            f"{sent['postgresql', 3]:,.0f} msg/s (ratio {send_ratios['three_one'][-1]:.2f}x one)",
            flush=True,
        )
        seconds: dict[str, dict[str, float]] = {}
        for kind in ("sqlite", "postgresql"):
            store = new_store(kind, pg)
            fill(store, readers)
            rate = run_child("ledger", store, "-")["rate"]
            runs.setdefault(f"ledger only, {kind} (msg/s)", []).append(rate)
            store = new_store(kind, pg)
            imported = run_child("import", store, str(csv))["seconds"]
            planned = run_child("plan", store, "-")["seconds"]
            runs.setdefault(f"import {rows:,}, {kind} (s)", []).append(imported)
            runs.setdefault(f"plan {rows:,}, {kind} (s)", []).append(planned)
            seconds[kind] = {"ledger": 1 / rate, "import": imported, "plan": planned}
        said = []
        for name in BOUNDS:
            ratio = seconds["postgresql"][name] / seconds["sqlite"][name]
            ratios[name].append(ratio)
            said.append(f"{name} {ratio:.2f}x")
        print(
            f"round {number}: ratio of PostgreSQL's time to SQLite's: " + ", ".join(said),
            flush=True,
        )
    label = f"figure (median of {rounds} interleaved rounds)"
    print(f"{label:52s} {'median':>10s}")
    for name, values in runs.items():
        print(f"{name:52s} {statistics.median(values):10,.2f}")
    for name, bound in BOUNDS.items():
        middle = statistics.median(ratios[name])
        verdict = "within" if middle <= bound else "OVER"
        print(
            f"{name}: ratio of PostgreSQL's time to SQLite's {spread(ratios[name])}; bound "
            f"{bound}x: {verdict}"
        )
    sqlite_ledger = statistics.median(runs["ledger only, sqlite (msg/s)"])
    pg_ledger = statistics.median(runs["ledger only, postgresql (msg/s)"])
    print(
        f"ledger cost per message: SQLite {1e6 / sqlite_ledger:.0f} µs, PostgreSQL "
        f"{1e6 / pg_ledger:.0f} µs (composing included in both)"
    )
    one_to_one = spread(send_ratios["pg_sqlite"])
    print(f"send, ratio of one sender on PostgreSQL to one on SQLite: {one_to_one}")
    print(f"send, ratio of three senders to one on PostgreSQL: {spread(send_ratios['three_one'])}")
    many, base = options.memory_rows, options.memory_base
    for kind in ("sqlite", "postgresql"):
        small, big = new_store(kind, pg), new_store(kind, pg)
        fill(small, base)
        fill(big, many)
        low = run_child("ledger", small, "-")["peak_mb"]
        high = run_child("ledger", big, "-")["peak_mb"]
        print(
            f"{kind:10s} sender peak memory: {many:,} recipients {high:.0f} MB, {base:,} "
            f"{low:.0f} MB: ratio {high / low:.2f}x (one measure each)"
        )


if __name__ == "__main__":
    main()
