"""Benchmark of issue #4: composing and sending the sample issue to N recipients.

Sends through Postfix's `smtp-sink` on loopback (`apt-get install postfix`; this script
starts the sink, the Postfix daemon need not run): an aiosmtpd sink tops out near 150
messages/s and would measure itself. Each figure runs in a child process, so that its
peak memory is its own. In the same run, it measures the naive approach (a new
EmailMessage and a new SMTP connection per message) and prints the ratio, and the
composing rate with DKIM signing on.

Targets (2 cores): composing >= 20,000 messages/s; sending >= 700 messages/s to
smtp-sink; peak memory for 100,000 recipients <= 1.2x that for 1,000.

    python bench/send.py [--big-send]   # --big-send: also send the 100,000 (2-3 minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qant_mail.app import issues, sending  # noqa: E402
from qant_mail.app.context import Context  # noqa: E402
from qant_mail.authoring.load import load  # noqa: E402
from qant_mail.authoring.render import RenderedIssue, Renderer, Slot  # noqa: E402
from qant_mail.base.config import Settings, load_settings  # noqa: E402
from qant_mail.delivery import dkim  # noqa: E402
from qant_mail.delivery.compose import MessageTemplate, Recipient  # noqa: E402
from qant_mail.delivery.transport import Reply, SmtpTransport, Transport  # noqa: E402
from qant_mail.store.ledger import State  # noqa: E402
from qant_mail.store.subscribers import Subscribers  # noqa: E402

SAMPLE = ROOT / "issues" / "2023-11-20.yaml"
SIGNED = ("rsa", "ed25519", "rsa+ed25519")
SECRET = "benchmark-secret-of-some-length"


def postfix_root() -> Path:
    """Return where Postfix's tools are: $QANT_BENCH_POSTFIX (Debian's package unpacked
    there by `apt-get download postfix && dpkg-deb -x postfix_*.deb DIR`), or /."""
    return Path(os.environ.get("QANT_BENCH_POSTFIX", "/"))


def postfix_tool(name: str) -> str:
    """Return the path of smtp-sink or smtp-source, or explain how to get it."""
    path = postfix_root() / "usr" / "sbin" / name
    if not path.exists():
        sys.exit(
            f"{name} not found under {postfix_root()}: `apt-get download postfix && dpkg-deb "
            "-x postfix_*.deb /opt/postfix` and QANT_BENCH_POSTFIX=/opt/postfix (or install "
            "postfix; its daemon need not run)"
        )
    return str(path)


def postfix_env() -> dict[str, str]:
    """The environment in which an unpacked Postfix finds its own libraries."""
    libraries = postfix_root() / "usr" / "lib" / "postfix"
    return {**os.environ, "LD_LIBRARY_PATH": str(libraries)}


def start_sink() -> tuple[subprocess.Popen[bytes], int]:
    """Start Postfix's smtp-sink on a free loopback port; return it and the port."""
    sink = postfix_tool("smtp-sink")
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    server = subprocess.Popen([sink, *user, f"127.0.0.1:{port}", "512"], env=postfix_env())
    time.sleep(0.5)
    return server, port


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def peak_mb() -> float:
    """Return this process's peak resident memory in MB."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def settings_for(port: int, store: Path) -> Settings:
    settings = load_settings(ROOT / "qant.toml", env={})
    smtp = settings.smtp.model_copy(update={"port": port, "security": "none", "connections": 4})
    return dataclasses.replace(
        settings, smtp=smtp, store=settings.store.model_copy(update={"path": str(store)})
    )


def rendered_sample(settings: Settings) -> RenderedIssue:
    return Renderer(settings).render(load(SAMPLE).issue)


class _Discard:
    """A transport that accepts and forgets: the pipeline without SMTP."""

    description = relay = "nowhere"

    def connect(self) -> _Discard:
        return self

    def send(self, sender: str, recipient: str, data: bytes, *, dot_safe: bool = False) -> Reply:
        return Reply(250, "2.0.0 discarded")

    def close(self) -> None:
        """Nothing to close."""


def signing_keys(kinds: list[str], domain: str) -> list[dkim.DkimKey]:
    """Fresh keys of the given kinds ("rsa", "ed25519")."""
    return [
        dkim.load_key(dkim.generate(kind)[0], domain=domain, selector=kind, where=kind)  # type: ignore[arg-type]
        for kind in kinds
    ]


def child_compose(count: int, kinds: list[str]) -> dict[str, float]:
    """Compose `count` messages from one template, signed with keys of `kinds`; return
    the rate and peak memory."""
    settings = settings_for(25, Path(tempfile.mkdtemp()) / "s.db")
    keys = signing_keys(kinds, settings.sender_domain)
    template = MessageTemplate(
        rendered_sample(settings), settings, secret=SECRET.encode(), keys=keys
    )
    recipients = (Recipient(f"reader{n}@example.com", f"Lecteur {n}", n) for n in range(count))
    size = 0
    # The rate is the median over chunks of 1,000 messages: one slow moment of a shared
    # machine does not make the figure.
    chunk_rates = []
    done = 0
    while done < count:
        chunk = min(1000, count - done)
        start = time.perf_counter()
        for _ in range(chunk):
            size = len(template.personalise(next(recipients)))
        chunk_rates.append(chunk / (time.perf_counter() - start))
        done += chunk
    return {"rate": statistics.median(chunk_rates), "peak_mb": peak_mb(), "size_kb": size / 1000}


def make_store(count: int) -> Path:
    """Return a database of `count` subscribers (built here, so that a child's peak
    memory is the send's, not the import's)."""
    path = Path(tempfile.mkdtemp()) / "store.db"
    store = Subscribers.open(path)
    rows = "email,name\n" + "".join(f"reader{n}@example.com,Lecteur {n}\n" for n in range(count))
    store.import_rows(rows, "bench")
    store.close()
    return path


def child_pipeline(store: Path, port: int | None, kinds: list[str]) -> dict[str, float]:
    """Plan, compose, sign with keys of `kinds` and send to every subscriber of `store`
    (to smtp-sink, or discarded)."""
    os.environ["QANT_SECRET_KEY"] = SECRET
    settings = settings_for(port or 25, store)
    for kind, variable in (("rsa", dkim.RSA_VARIABLE), ("ed25519", dkim.ED25519_VARIABLE)):
        if kind in kinds:
            os.environ[variable] = dkim.generate(kind)[0].decode()  # type: ignore[arg-type]
    settings = dataclasses.replace(
        settings,
        dkim=settings.dkim.model_copy(
            update={
                "selector": "rsa" if "rsa" in kinds else "",
                "ed25519_selector": "ed25519" if "ed25519" in kinds else "",
            }
        ),
    )
    transport: Transport = SmtpTransport(settings, env={}) if port else _Discard()
    ctx = Context(settings, transport=transport)
    prepared = issues.prepare(ctx, SAMPLE)
    start = time.perf_counter()
    report = sending.send(ctx, prepared)
    elapsed = time.perf_counter() - start
    sent = report.done[State.SENT]
    return {"rate": sent / elapsed, "peak_mb": peak_mb(), "sent": sent}


def child_naive(count: int, port: int) -> dict[str, float]:
    """A new EmailMessage and a new SMTP connection for each message."""
    import smtplib

    settings = settings_for(port, Path(tempfile.mkdtemp()) / "s.db")
    rendered = rendered_sample(settings)
    start = time.perf_counter()
    for n in range(count):
        values = {
            Slot.NAME: f"Lecteur {n}",
            Slot.EMAIL: f"reader{n}@example.com",
            Slot.UNSUBSCRIBE_URL: f"{settings.newsletter.base_url}/unsubscribe/{n}",
            Slot.PREFERENCES_URL: f"{settings.newsletter.base_url}/subscriptions/{n}",
            Slot.BROWSER_URL: rendered.web_url,
        }
        # Every slot a template may hold: a new one would otherwise stop this child.
        values |= {slot: "" for slot in Slot if slot not in values}
        html, text = rendered.fill(values)
        message = EmailMessage()
        message["From"] = f"{settings.sender.name} <{settings.sender.address}>"
        message["To"] = f"Lecteur {n} <reader{n}@example.com>"
        message["Subject"] = rendered.subject
        message["List-Unsubscribe"] = f"<{values[Slot.UNSUBSCRIBE_URL]}>"
        message.set_content(text)
        message.add_alternative(html, subtype="html")
        html_part = message.get_payload()[1]  # type: ignore[index]
        assert isinstance(html_part, EmailMessage)
        for asset in rendered.assets:
            maintype, subtype = asset.mime_type.split("/")
            html_part.add_related(
                asset.path.read_bytes(), maintype, subtype, cid=f"<{asset.content_id}>"
            )
        data = message.as_bytes()
        with smtplib.SMTP("127.0.0.1", port) as client:
            client.sendmail(settings.sender.address, [f"reader{n}@example.com"], data)
    return {"rate": count / (time.perf_counter() - start), "peak_mb": peak_mb()}


def run_store(count: int) -> str:
    """Build a database of `count` subscribers in a child process; return its path."""
    return subprocess.run(
        [sys.executable, __file__, "--child", "store", str(count)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def median_of(runs: int, *args: str) -> dict[str, float]:
    """Run a child `runs` times; return the run with the median rate."""
    results = sorted((run_child(*args) for _ in range(runs)), key=lambda r: r["rate"])
    return results[len(results) // 2]


def run_child(*args: str) -> dict[str, float]:
    return run_script(__file__, *args)


def run_script(script: str, *args: str) -> dict[str, float]:
    """Run a benchmark `script` as a child (`--child ARGS`: its peak memory is its own);
    return the JSON it prints last."""
    output = subprocess.run(
        [sys.executable, script, "--child", *args], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def time_import(count: int) -> float:
    folder = Path(tempfile.mkdtemp())
    path = folder / "list.csv"
    domains = ["gmail.com", "orange.fr", "free.fr", "laposte.net", "outlook.fr", "example.org"]
    lines = ["email,name"] + [
        f"reader.{n}@{domains[n % len(domains)]},Lecteur {n}" for n in range(count)
    ]
    path.write_text("\n".join(lines))
    store = Subscribers.open(folder / "store.db")
    start = time.perf_counter()
    store.import_csv(path)
    elapsed = time.perf_counter() - start
    shutil.rmtree(folder)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-send", action="store_true", help="send the 100,000 as well")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, count, *rest = args.child
        if kind == "store":
            print(make_store(int(count)))
            return
        if kind == "compose":
            result = child_compose(int(count), rest)
        elif kind == "pipeline":
            port = int(rest[0]) if rest and rest[0] != "-" else None
            result = child_pipeline(Path(count), port, rest[1:])
        else:
            result = child_naive(int(count), int(rest[0]))
        print(json.dumps(result))
        return

    server, port = start_sink()
    try:
        rows: list[tuple[str, float, float]] = []

        def show(label: str, result: dict[str, float]) -> None:
            rows.append((label, result["rate"], result["peak_mb"]))
            print(f"{label:58s} {result['rate']:10,.0f} msg/s {result['peak_mb']:8.1f} MB")

        print(f"{'figure':58s} {'rate':>16s} {'peak':>11s}")
        compose_small = median_of(3, "compose", "1000")
        show("compose, 1,000 recipients (median of 3 runs)", compose_small)
        compose_big = median_of(3, "compose", "100000")
        show("compose, 100,000 recipients (median of 3 runs)", compose_big)
        signed = {kind: median_of(3, "compose", "1000", *kind.split("+")) for kind in SIGNED}
        for kind, result in signed.items():
            show(f"compose + DKIM {kind}, 1,000 recipients (median of 3 runs)", result)
        small, big = Path(run_store(1000)), Path(run_store(100_000))
        # Signed and unsigned sends in the same rounds, interleaved: the machine's mood
        # weighs on both alike.
        sends: dict[str, list[dict[str, float]]] = {kind: [] for kind in ("unsigned", *SIGNED)}
        for _ in range(3):
            for kind in sends:
                kinds = [] if kind == "unsigned" else kind.split("+")
                sends[kind].append(run_child("pipeline", run_store(1000), str(port), *kinds))
        medians = {kind: sorted(r["rate"] for r in rows)[1] for kind, rows in sends.items()}
        for kind, rate in medians.items():
            print(
                f"{'send to smtp-sink, 1,000, ' + kind + ' (median of 3)':58s} {rate:10,.0f} msg/s"
            )
        pipeline_small = sends["unsigned"][1]
        if args.big_send:
            pipeline_big = run_child("pipeline", str(big), str(port))
            show("send to smtp-sink, 100,000", pipeline_big)
            pipeline_small_discard = pipeline_small
        else:
            pipeline_big = run_child("pipeline", str(big), "-")
            show("whole pipeline, 100,000, SMTP left out (discarded)", pipeline_big)
            pipeline_small_discard = run_child("pipeline", str(small), "-")
            show("whole pipeline, 1,000, SMTP left out (discarded)", pipeline_small_discard)
        naive = run_child("naive", "200", str(port))
        show("baseline: EmailMessage + new connection per message, 200", naive)
        print()
        print(f"message size: {compose_small['size_kb']:.0f} KB")
        print(f"sending vs the naive approach: {pipeline_small['rate'] / naive['rate']:.1f}x")
        for kind, result in signed.items():
            cost = 1000 / result["rate"] - 1000 / compose_small["rate"]
            ratio = medians[kind] / medians["unsigned"]
            print(
                f"DKIM {kind}: {cost:.2f} ms of CPU a message; signed send at {ratio:.2f}x "
                "the unsigned one (target >= 0.8)"
            )
        ratio = pipeline_big["peak_mb"] / pipeline_small_discard["peak_mb"]
        print(f"peak memory, 100,000 vs 1,000 recipients (same pipeline): {ratio:.2f}x")
        print(f"import of 100,000 CSV rows: {time_import(100_000):.1f} s")
        print("targets: compose >= 20,000 msg/s; send >= 700 msg/s; memory ratio <= 1.2")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
