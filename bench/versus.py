"""Benchmark of issues #11 and #22: `qant-mail send` as a whole process against anchors.

All send the sample issue's message (its size, for smtp-source) to Postfix's `smtp-sink`
on loopback, in the same rounds, their order turning from round to round:

- `qant-mail send` to a list of N subscribers, as an editor runs it (a fresh copy of
  the list each time: a send is recorded and never repeated), at each connection count;
  with `--signed`, also signed with a fresh 2,048-bit RSA key (QANT_DKIM_PRIVATE_KEY,
  the settings' dkim selector set); with `--versus DIR`, also another checkout's
  `qant-mail send` (its own package imported: cwd and PYTHONPATH are that checkout);
- Postfix's `smtp-source`, a C load generator, with as many sessions, each kept open
  (`-d`), sending N messages of the same size: what the sink allows at all;
- mailmerge (PyPI, unless `--no-mailmerge`), in a virtual environment of its own, with
  its `raw` output, sending M messages whose template is the sample's message: one
  connection per message.

Each figure is a whole process, start-up included: its wall time, and its CPU time
(user + system, its own and its children's, from wait4). On loopback the kernel's work
of a transfer, the receiving side's included, is charged to the sender or to the sink,
not always in the same share: the sink's CPU time during each run (from /proc) is read
too, and the CPU ratio to smtp-source's is also given with it added to each side.
Each round prints the rates, the CPU per message, and the ratios: qant-mail's CPU per
message over smtp-source's (issue #22: <= 4x, goal 2.5x), qant-mail's wall rate over
smtp-source's (issue #11: >= 0.6x) and mailmerge's (>= 30x), the RSA-signed send's wall
rate over the unsigned one's (>= 0.8x). The last lines give the median of each per-round
ratio and its range.

    QANT_BENCH_POSTFIX=/opt/postfix python bench/versus.py [--rounds 5] [--messages 5000]
        [--connections 4] [--signed] [--versus /work/before] [--no-mailmerge] [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from send import free_port, postfix_env, postfix_tool  # noqa: E402

from qant_mail.app import issues  # noqa: E402
from qant_mail.app.context import Context  # noqa: E402
from qant_mail.base.config import load_settings  # noqa: E402
from qant_mail.delivery import dkim  # noqa: E402

SAMPLE = ROOT / "issues" / "2023-11-20.yaml"
MAILMERGE_VENV = ROOT / ".cache" / "bench-mailmerge"
SENDER = "lettre@qant.example"
SECRET = "benchmark-secret-of-some-length"

# Issue #22's bounds.
CPU_TARGET, CPU_GOAL, SIGNED_TARGET = 4.0, 2.5, 0.8


@dataclasses.dataclass(frozen=True)
class Measure:
    """One whole process: its wall time and its CPU time (user + system), in seconds;
    and the sink's CPU time meanwhile. On loopback the kernel's work of a TCP transfer
    (the receiving side's included) is charged to whichever of the two processes it ran
    under, and not always the same one: the sum of both is the steadier figure."""

    wall: float
    cpu: float
    sink: float = 0.0

    @property
    def both(self) -> float:
        """Return the CPU time of the process and of the sink together."""
        return self.cpu + self.sink


@dataclasses.dataclass(frozen=True)
class Checkout:
    """A qant-mail checkout whose `qant-mail send` is measured, and its list."""

    name: str
    root: Path
    store: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment its commands run in: its own package first, none of ours."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("QANT_")}
        env |= {
            "PYTHONPATH": str(self.root),
            "QANT_CONFIG": str(self.root / "qant.toml"),
            "QANT_SECRET_KEY": SECRET,
        }
        return env | extra


def measured(
    command: Sequence[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str],
    sink: Sink | None = None,
) -> Measure:
    """Run `command` to the end; return its wall time and its CPU time (its own and that
    of the children it waited for), read from wait4, and `sink`'s CPU time meanwhile."""
    with tempfile.TemporaryFile() as errors:
        sink_before = sink.cpu() if sink else 0.0
        start = time.perf_counter()
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=errors
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        sink_cpu = sink.cpu() - sink_before if sink else 0.0
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace")[-2000:]
            sys.exit(f"{' '.join(command)} ended with status {process.returncode}:\n{tail}")
    return Measure(wall, usage.ru_utime + usage.ru_stime, sink_cpu)


def mailmerge_command() -> Path:
    """Return mailmerge's command, installing it in its own environment the first time."""
    command = MAILMERGE_VENV / "bin" / "mailmerge"
    if not command.exists():
        venv.create(MAILMERGE_VENV, with_pip=True)
        pip = MAILMERGE_VENV / "bin" / "pip"
        subprocess.run([str(pip), "install", "--quiet", "mailmerge"], check=True)
    return command


def prepare_checkout(name: str, root: Path, rows: Path, work: Path, messages: int) -> Checkout:
    """Check that `root`'s own package is the one imported there; import the list with
    its own command (its database is its own)."""
    checkout = Checkout(name, root, work / f"list-{name}.db")
    found = subprocess.run(
        [sys.executable, "-c", "import qant_mail; print(qant_mail.__file__)"],
        cwd=root,
        env=checkout.env(),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(root):
        sys.exit(f"{name}: qant_mail is imported from {found}, not from {root}")
    subprocess.run(
        [sys.executable, "-m", "qant_mail", "subscribers", "import", str(rows)],
        cwd=root,
        env=checkout.env(QANT_STORE_PATH=str(checkout.store)),
        check=True,
        capture_output=True,
    )
    with contextlib.closing(sqlite3.connect(checkout.store)) as db:
        (listed,) = db.execute("SELECT count(*) FROM subscribers").fetchone()
    if listed != messages:  # a send to fewer would look fast
        sys.exit(f"{name}: the list holds {listed} subscribers, not {messages}")
    return checkout


def revision(root: Path) -> str:
    """Return `root`'s commit, and whether its package has changes not committed."""
    git = ["git", "-C", str(root)]
    head = subprocess.run(
        [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    changed = subprocess.run(
        [*git, "status", "--porcelain", "--", "qant_mail"], capture_output=True, text=True
    ).stdout.strip()
    return f"{head or '?'}{' + uncommitted changes in qant_mail/' if changed else ''}"


def spread(values: Sequence[float], unit: str = "x") -> str:
    """Return the median of `values` and their range: "1.23x (rounds 1.10-1.40x)"."""
    return (
        f"{statistics.median(values):.2f}{unit} (rounds {min(values):.2f}-{max(values):.2f}{unit})"
    )


@dataclasses.dataclass(frozen=True)
class Sink:
    """A running smtp-sink: its port, and its CPU time so far."""

    port: int
    pid: int

    def cpu(self) -> float:
        """Return the sink's CPU time (user + system) so far, in seconds."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        # The fields after the command's name (in parentheses, which may hold spaces):
        # the 14th and 15th of the line are user and system time, in clock ticks.
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def sink() -> Iterator[Sink]:
    """Run Postfix's smtp-sink on a free loopback port; yield it."""
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    server = subprocess.Popen(
        [postfix_tool("smtp-sink"), *user, f"127.0.0.1:{port}", "1024"],
        env=postfix_env(),
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        yield Sink(port, server.pid)
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=5000, help="N, per qant-mail run")
    parser.add_argument("--mailmerge-messages", type=int, default=200, help="M, per mailmerge run")
    parser.add_argument("--no-mailmerge", action="store_true", help="leave mailmerge out")
    parser.add_argument("--connections", default="4", help="qant-mail's, compared (1,2,4,8)")
    parser.add_argument("--signed", action="store_true", help="also RSA-signed sends")
    parser.add_argument(
        "--versus",
        type=Path,
        metavar="DIR",
        help="another checkout whose `qant-mail send` runs in the same rounds (before/after)",
    )
    parser.add_argument(
        "--qant-root",
        type=Path,
        default=ROOT,
        help="the checkout of qant-mail measured first (default: this one)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a check that it runs: 1 round of 100, no mailmerge"
    )
    args = parser.parse_args()
    if args.tiny:
        args.rounds, args.messages, args.no_mailmerge = 1, 100, True
    counts = [int(c) for c in args.connections.split(",")]
    messages: int = args.messages
    merged: int = args.mailmerge_messages
    postfix_tool("smtp-sink")  # found now: a missing tool stops the run before any work
    source = postfix_tool("smtp-source")
    for root in {args.qant_root.resolve(), *([args.versus.resolve()] if args.versus else [])}:
        # Compiled once, as an installed package is. Without it, a checkout whose bytecode
        # is not cached (PYTHONDONTWRITEBYTECODE, a fresh clone) compiles every module in
        # every process: some 50 ms of CPU a send, counted against it.
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "qant_mail")])

    work = Path(tempfile.mkdtemp(prefix="qant-versus-"))
    try:
        settings = load_settings(ROOT / "qant.toml", env={})
        message = issues.render_sample(Context(settings), SAMPLE, work)[2].read_bytes()  # .eml
        size = len(message)
        rows = work / "list.csv"
        rows.write_text(
            "email,name\n"
            + "".join(f"reader{n}@example.com,Lecteur {n}\n" for n in range(messages))
        )
        roots = [("this", args.qant_root.resolve())]
        if args.versus:
            roots.append(("versus", args.versus.resolve()))
        checkouts = [prepare_checkout(n, r, rows, work, messages) for n, r in roots]
        mailmerge = None if args.no_mailmerge else mailmerge_setup(work, message, merged)
        rsa_pem = dkim.generate("rsa")[0].decode() if args.signed else ""
        print(f"message: {size / 1000:.0f} KB; qant-mail and smtp-source send {messages:,} a run")
        for checkout in checkouts:
            print(f"{checkout.name}: {checkout.root} at {revision(checkout.root)}")
        print(
            f"{args.rounds} rounds; CPU: user + system of the whole process, start-up in "
            "(and of the sink meanwhile, where said)"
        )
        plan = Plan(counts, checkouts, messages, merged if mailmerge else 0, args.signed)
        with sink() as running:
            results = run_rounds(args.rounds, plan, source, running, size, rsa_pem, mailmerge)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summarise(results, plan)


def mailmerge_setup(work: Path, message: bytes, merged: int) -> tuple[Path, Path, Path, Path]:
    """mailmerge's command, template (the sample's message, addressed to each row of its
    list), list and server settings (the port, written when the sink runs)."""
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
        "email,name\n" + "".join(f"reader{n}@example.com,Lecteur {n}\n" for n in range(merged))
    )
    return mailmerge_command(), template, database, work / "server.conf"


Results = dict[str, list[Measure]]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the rounds run."""

    counts: list[int]  # qant-mail's connections (smtp-source's sessions)
    checkouts: list[Checkout]
    messages: int  # a run of qant-mail or smtp-source
    merged: int  # a run of mailmerge; 0: no mailmerge
    signed: bool

    def kinds(self) -> tuple[str, ...]:
        return ("", " signed") if self.signed else ("",)


def run_rounds(
    rounds: int,
    plan: Plan,
    source: str,
    running: Sink,
    size: int,
    rsa_pem: str,
    mailmerge: tuple[Path, Path, Path, Path] | None,
) -> Results:
    """Run every job once a round, in an order that turns; print each round's figures."""
    work = plan.checkouts[0].store.parent
    port = running.port
    messages = plan.messages

    def run_qant(checkout: Checkout, connections: int, signed: bool) -> Measure:
        copy = work / "send.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)
        shutil.copy(checkout.store, copy)
        extra = {
            "QANT_SMTP_HOST": "127.0.0.1",
            "QANT_SMTP_PORT": str(port),
            "QANT_SMTP_SECURITY": "none",
            "QANT_SMTP_CONNECTIONS": str(connections),
            "QANT_STORE_PATH": str(copy),
        }
        if signed:
            extra |= {"QANT_DKIM_SELECTOR": "bench", dkim.RSA_VARIABLE: rsa_pem}
        issue = checkout.root / "issues" / SAMPLE.name
        command = [sys.executable, "-m", "qant_mail", "send", str(issue), "--yes"]
        result = measured(command, cwd=checkout.root, env=checkout.env(**extra), sink=running)
        with contextlib.closing(sqlite3.connect(copy)) as db:
            (sent,) = db.execute("SELECT count(*) FROM deliveries WHERE state = 'sent'").fetchone()
        if sent != messages:
            sys.exit(f"{checkout.name}: {sent} messages sent, not {messages}")
        return result

    def run_source(sessions: int) -> Measure:
        command = [source, "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
        command += ["-f", SENDER, "-t", "reader@example.com", f"127.0.0.1:{port}"]
        return measured(command, env=postfix_env(), sink=running)

    def run_mailmerge() -> Measure:
        assert mailmerge is not None
        command_path, template, database, server_conf = mailmerge
        server_conf.write_text(f"[smtp_server]\nhost = 127.0.0.1\nport = {port}\nratelimit = 0\n")
        command = [str(command_path), "--template", str(template), "--database", str(database)]
        command += ["--config", str(server_conf), "--no-dry-run", "--no-limit"]
        command += ["--output-format", "raw"]
        return measured(command, cwd=work, env=dict(os.environ))

    jobs: list[tuple[str, Callable[[], Measure]]] = []
    if mailmerge:
        jobs.append(("mailmerge", run_mailmerge))
    for c in plan.counts:
        jobs.append((f"source {c}", functools.partial(run_source, c)))
        for checkout in plan.checkouts:
            for kind in plan.kinds():
                qant = functools.partial(run_qant, checkout, c, bool(kind))
                jobs.append((f"{checkout.name} {c}{kind}", qant))
    results: Results = {name: [] for name, _ in jobs}
    for number in range(rounds):
        shift = number % len(jobs)
        for name, job in jobs[shift:] + jobs[:shift]:
            results[name].append(job())
        print(f"round {number + 1}:", flush=True)
        for line in round_lines(results, plan):
            print(f"  {line}", flush=True)
    return results


def cpu_ms(measure: Measure, messages: int) -> float:
    """Return the CPU time per message of a run of `messages`, in ms."""
    return 1000 * measure.cpu / messages


def qant_label(plan: Plan, checkout: Checkout, kind: str, connections: int) -> str:
    signed = ", RSA-signed" if kind else ""
    name = f" ({checkout.name})" if len(plan.checkouts) > 1 else ""
    return f"qant-mail{name}{signed}, {connections} conn."


def round_lines(results: Results, plan: Plan) -> Iterator[str]:
    """The last round's figures, and its ratios."""
    messages = plan.messages
    merge = results["mailmerge"][-1] if plan.merged else None
    if merge:
        yield (
            f"mailmerge: {plan.merged / merge.wall:,.0f}/s, "
            f"{cpu_ms(merge, plan.merged):.3f} ms CPU/message"
        )
    for c in plan.counts:
        source = results[f"source {c}"][-1]
        yield (
            f"smtp-source, {c} sessions: {messages / source.wall:,.0f}/s, "
            f"{cpu_ms(source, messages):.3f} ms CPU/message"
        )
        for checkout in plan.checkouts:
            for kind in plan.kinds():
                run = results[f"{checkout.name} {c}{kind}"][-1]
                line = (
                    f"{qant_label(plan, checkout, kind, c)}: {messages / run.wall:,.0f}/s, "
                    f"{cpu_ms(run, messages):.3f} ms CPU/message; ratios: CPU/message "
                    f"{run.cpu / source.cpu:.2f}x smtp-source's ({run.both / source.both:.2f}x "
                    "with the sink's share), wall rate "
                    f"{source.wall / run.wall:.2f}x smtp-source's"
                )
                if merge:
                    to_merge = (messages / run.wall) / (plan.merged / merge.wall)
                    line += f", {to_merge:.0f}x mailmerge's"
                if kind:
                    unsigned = results[f"{checkout.name} {c}"][-1]
                    line += f", signed/unsigned {unsigned.wall / run.wall:.2f}x"
                yield line
        if len(plan.checkouts) == 2:
            this, other = plan.checkouts
            for kind in plan.kinds():
                mine = results[f"{this.name} {c}{kind}"][-1]
                theirs = results[f"{other.name} {c}{kind}"][-1]
                yield (
                    f"CPU/message {this.name} / {other.name}"
                    f"{', RSA-signed' if kind else ''}, {c} conn.: {mine.cpu / theirs.cpu:.2f}x"
                )


def summarise(results: Results, plan: Plan) -> None:
    """Print the median of each figure, and of each per-round ratio with its range."""
    messages = plan.messages
    print(f"medians of {len(results[f'source {plan.counts[0]}'])} rounds, ratios' range:")
    merges = results.get("mailmerge", [])
    if merges:
        print(f"  mailmerge: {statistics.median(plan.merged / m.wall for m in merges):,.0f}/s")
    for c in plan.counts:
        sources = results[f"source {c}"]
        cpu = statistics.median(cpu_ms(m, messages) for m in sources)
        rate = statistics.median(messages / m.wall for m in sources)
        print(f"  smtp-source, {c} sessions: {rate:,.0f}/s, {cpu:.3f} ms CPU/message")
        for checkout in plan.checkouts:
            for kind in plan.kinds():
                runs = results[f"{checkout.name} {c}{kind}"]
                cpu = statistics.median(cpu_ms(m, messages) for m in runs)
                rate = statistics.median(messages / m.wall for m in runs)
                to_cpu = [m.cpu / s.cpu for m, s in zip(runs, sources, strict=True)]
                to_wall = [s.wall / m.wall for m, s in zip(runs, sources, strict=True)]
                label = qant_label(plan, checkout, kind, c)
                print(f"  {label}: {rate:,.0f}/s, {cpu:.3f} ms CPU/message")
                print(
                    f"    ratio CPU/message / smtp-source's: {spread(to_cpu)} "
                    f"(target <= {CPU_TARGET}, goal {CPU_GOAL})"
                )
                both = [m.both / s.both for m, s in zip(runs, sources, strict=True)]
                print(f"      with the sink's CPU meanwhile added to each: {spread(both)}")
                print(f"    ratio wall rate / smtp-source's: {spread(to_wall)} (target >= 0.6)")
                if merges:
                    to_merge = [
                        (messages / m.wall) / (plan.merged / w.wall)
                        for m, w in zip(runs, merges, strict=True)
                    ]
                    print(f"    ratio wall rate / mailmerge's: {spread(to_merge)} (target >= 30)")
                if kind:
                    unsigned = results[f"{checkout.name} {c}"]
                    wall = [u.wall / m.wall for m, u in zip(runs, unsigned, strict=True)]
                    cpu_ratio = [m.cpu / u.cpu for m, u in zip(runs, unsigned, strict=True)]
                    print(
                        f"    ratio RSA-signed send / unsigned send, wall rate: {spread(wall)} "
                        f"(target >= {SIGNED_TARGET}); CPU: {spread(cpu_ratio)}"
                    )
        if len(plan.checkouts) == 2:
            this, other = plan.checkouts
            for kind in plan.kinds():
                mine, theirs = results[f"{this.name} {c}{kind}"], results[f"{other.name} {c}{kind}"]
                ratio = [m.cpu / t.cpu for m, t in zip(mine, theirs, strict=True)]
                print(
                    f"  ratio CPU/message {this.name} / {other.name}"
                    f"{', RSA-signed' if kind else ''}, {c} conn.: {spread(ratio)}"
                )


if __name__ == "__main__":
    main()
