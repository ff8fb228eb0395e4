"""Benchmark of issue #11: `qant-mail send` as a whole process against two anchors.

All three send the sample issue's message (its size, for smtp-source) to Postfix's
`smtp-sink` on loopback, in the same rounds, their order turning from round to round:

- `qant-mail send` to a list of N subscribers, as an editor runs it (a fresh copy of
  the list each time: a send is recorded and never repeated), at several connection
  counts, which is how the default `smtp.connections` is chosen;
- Postfix's `smtp-source`, a C load generator, with as many sessions, each kept open
  (`-d`), sending N messages of the same size: what the sink allows at all;
- mailmerge (PyPI), in a virtual environment of its own, with its `raw` output (its
  default, colourised, cannot print the UTF-8 quoted-printable parts), sending M
  messages whose template is the sample's message: one connection per message.

Each round prints each rate (messages a second of wall time, start-up included) and
the ratios of qant-mail's to both anchors; the last lines give the medians of the
per-round ratios. Targets (2 cores): >= 0.6x smtp-source, >= 30x mailmerge.

    QANT_BENCH_POSTFIX=/opt/postfix python bench/versus.py [--rounds 5] [--messages 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from send import free_port, postfix_env, postfix_tool  # noqa: E402

from qant_mail.app import issues  # noqa: E402
from qant_mail.app.context import Context  # noqa: E402
from qant_mail.base.config import load_settings  # noqa: E402

SAMPLE = ROOT / "issues" / "2023-11-20.yaml"
MAILMERGE_VENV = ROOT / ".cache" / "bench-mailmerge"
SENDER = "lettre@qant.example"


def mailmerge_command() -> Path:
    """Return mailmerge's command, installing it in its own environment the first time."""
    command = MAILMERGE_VENV / "bin" / "mailmerge"
    if not command.exists():
        venv.create(MAILMERGE_VENV, with_pip=True)
        pip = MAILMERGE_VENV / "bin" / "pip"
        subprocess.run([str(pip), "install", "--quiet", "mailmerge"], check=True)
    return command


def timed(command: list[str], **options: object) -> float:
    """Run `command` to the end; return its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, **options)  # type: ignore[call-overload]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=2000, help="N, per qant-mail run")
    parser.add_argument("--mailmerge-messages", type=int, default=200, help="M, per mailmerge run")
    parser.add_argument("--connections", default="1,2,4,8", help="qant-mail's, compared")
    parser.add_argument(
        "--qant-root",
        type=Path,
        default=ROOT,
        help="the checkout of qant-mail to run (another commit's worktree, for a before/after)",
    )
    args = parser.parse_args()
    qant_root: Path = args.qant_root.resolve()
    counts = [int(c) for c in args.connections.split(",")]
    messages: int = args.messages
    merged: int = args.mailmerge_messages

    work = Path(tempfile.mkdtemp(prefix="qant-versus-"))
    settings = load_settings(ROOT / "qant.toml", env={})
    message = issues.render_sample(Context(settings), SAMPLE, work)[2].read_bytes()  # the .eml
    size = len(message)
    # The list is imported by the measured checkout's own command: its database is its own.
    store = work / "list.db"
    rows = work / "list.csv"
    rows.write_text(
        "email,name\n" + "".join(f"reader{n}@example.com,Lecteur {n}\n" for n in range(messages))
    )
    subprocess.run(
        [sys.executable, "-m", "qant_mail", "subscribers", "import", str(rows)],
        cwd=qant_root,
        env={
            **os.environ,
            "QANT_CONFIG": str(qant_root / "qant.toml"),
            "QANT_STORE_PATH": str(store),
        },
        check=True,
        capture_output=True,
    )
    with sqlite3.connect(store) as db:
        (listed,) = db.execute("SELECT count(*) FROM subscribers").fetchone()
    db.close()
    if listed != messages:  # a send to fewer would look fast
        sys.exit(f"the list holds {listed} subscribers, not {messages}")

    # mailmerge's template: the sample's message, addressed to each row of its list.
    header_end = message.index(b"\r\n\r\n")
    headers = [
        line
        for line in message[:header_end].decode("ascii").split("\r\n")
        if not line.lower().startswith("to:")
    ]
    template = work / "template.txt"
    template.write_bytes(
        ("TO: {{email}}\n" + "\n".join(headers)).encode()
        + message[header_end:].replace(b"\r\n", b"\n")
    )
    database = work / "database.csv"
    database.write_text(
        "email,name\n"
        + "".join(f"reader{n}@example.com,Lecteur {n}\n" for n in range(args.mailmerge_messages))
    )
    server_conf = work / "server.conf"
    mailmerge = mailmerge_command()

    sink = postfix_tool("smtp-sink")
    source = postfix_tool("smtp-source")
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    server = subprocess.Popen(
        [sink, *user, f"127.0.0.1:{port}", "1024"], env=postfix_env(), stderr=subprocess.DEVNULL
    )
    server_conf.write_text(f"[smtp_server]\nhost = 127.0.0.1\nport = {port}\nratelimit = 0\n")
    time.sleep(0.5)

    def run_qant(connections: int) -> float:
        copy = work / "send.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)
        shutil.copy(store, copy)
        env = {
            **os.environ,
            "QANT_CONFIG": str(qant_root / "qant.toml"),
            "QANT_SMTP_PORT": str(port),
            "QANT_SMTP_CONNECTIONS": str(connections),
            "QANT_STORE_PATH": str(copy),
            "QANT_SECRET_KEY": "benchmark-secret-of-some-length",
        }
        issue = qant_root / "issues" / SAMPLE.name
        command = [sys.executable, "-m", "qant_mail", "send", str(issue), "--yes"]
        return messages / timed(command, cwd=qant_root, env=env, stderr=subprocess.DEVNULL)

    def run_source(sessions: int) -> float:
        command = [source, "-d", "-s", str(sessions), "-m", str(args.messages), "-l", str(size)]
        command += ["-f", SENDER, "-t", "reader@example.com", f"127.0.0.1:{port}"]
        return messages / timed(command, env=postfix_env())

    def run_mailmerge() -> float:
        command = [str(mailmerge), "--template", str(template), "--database", str(database)]
        command += ["--config", str(server_conf), "--no-dry-run", "--no-limit"]
        command += ["--output-format", "raw"]
        return merged / timed(command, cwd=work)

    print(
        f"qant-mail: {qant_root}\nmessage: {size / 1000:.0f} KB; qant-mail and smtp-source "
        f"send {messages:,} a run, mailmerge {merged:,}; {args.rounds} rounds"
    )
    to_source: dict[int, list[float]] = {c: [] for c in counts}
    to_mailmerge: dict[int, list[float]] = {c: [] for c in counts}
    rates: dict[str, list[float]] = {}
    try:
        for number in range(args.rounds):
            jobs: list[tuple[str, object]] = [("mailmerge", None)]
            for c in counts:
                jobs += [("qant", c), ("source", c)]
            shift = number % len(jobs)
            jobs = jobs[shift:] + jobs[:shift]
            found: dict[str, float] = {}
            for kind, connections in jobs:
                if kind == "mailmerge":
                    found["mailmerge"] = run_mailmerge()
                elif kind == "qant":
                    assert isinstance(connections, int)
                    found[f"qant {connections}"] = run_qant(connections)
                else:
                    assert isinstance(connections, int)
                    found[f"source {connections}"] = run_source(connections)
            for name, rate in found.items():
                rates.setdefault(name, []).append(rate)
            line = [f"round {number + 1}: mailmerge {found['mailmerge']:.0f}/s"]
            for c in counts:
                qant, anchor = found[f"qant {c}"], found[f"source {c}"]
                to_source[c].append(qant / anchor)
                to_mailmerge[c].append(qant / found["mailmerge"])
                line.append(
                    f"[{c} conn.: qant-mail {qant:.0f}/s, smtp-source {anchor:.0f}/s, "
                    f"{qant / anchor:.2f}x; {qant / found['mailmerge']:.0f}x mailmerge]"
                )
            print(" ".join(line), flush=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    print("medians:")
    print(f"  mailmerge: {statistics.median(rates['mailmerge']):.0f} messages/s")
    for c in counts:
        print(
            f"  {c} connection(s): qant-mail {statistics.median(rates[f'qant {c}']):.0f}/s, "
            f"smtp-source {statistics.median(rates[f'source {c}']):.0f}/s; "
            f"per-round ratios: {statistics.median(to_source[c]):.2f}x smtp-source "
            f"(target >= 0.6), {statistics.median(to_mailmerge[c]):.0f}x mailmerge "
            "(target >= 30)"
        )


if __name__ == "__main__":
    main()
