"""Benchmark of issues #4 and #22: composing and sending the sample issue to N recipients.

Sends through Postfix's `smtp-sink` on loopback (`apt-get install postfix`, or its package
unpacked under QANT_BENCH_POSTFIX; this script starts the sink, the Postfix daemon need
not run): an aiosmtpd sink tops out near 150 messages/s and would measure itself. Each
figure runs in a child process, so that its peak memory is its own. The figures that are
compared run in interleaved rounds; each round prints its figures and ratios, then come
the medians, each ratio's with its range over the rounds:

- the composing rate, unsigned and signed (DKIM RSA, Ed25519, both); a signed child also
  composes unsigned and signs ~700 bytes of header data with the bare keys, in turn, and
  prints the cost of signing over the raw signature's (issue #22: <= 1.15x);
- a send to smtp-sink, unsigned and signed, and the signed over the unsigned (>= 0.8x);
- the naive approach (a new EmailMessage and a new SMTP connection per message).

Then, once: the whole pipeline for 100,000 recipients, its peak memory against 1,000's,
and the import of 100,000 CSV rows.

Targets (2 cores): composing >= 50,000 messages/s (issue #22); sending >= 700
messages/s to smtp-sink; peak memory for 100,000 recipients <= 1.2x that for 1,000.

    QANT_BENCH_POSTFIX=/opt/postfix python bench/send.py [--rounds 3] [--big-send] [--tiny]
    # --big-send: also send the 100,000 (2-3 minutes); --tiny: every figure small
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ed25519, padding  # noqa: E402

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


def raw_sign(key: dkim.DkimKey, data: bytes) -> bytes:
    """Sign `data` with the key's algorithm and nothing else: the floor of signing."""
    private = key.private_key
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.sign(hashlib.sha256(data).digest())  # RFC 8463: PureEdDSA of the hash
    return private.sign(data, padding.PKCS1v15(), hashes.SHA256())


def child_compose(count: int, kinds: list[str]) -> dict[str, float]:
    """Compose `count` messages from one template; return the rate and peak memory.

    Signed with keys of `kinds`, the same child also composes the messages unsigned and
    signs ~700 bytes of their header data with the bare keys, chunk by chunk in turn, so
    that the cost of signing (signed time less unsigned) is set beside the raw signature's
    time measured in the same moments."""
    settings = settings_for(25, Path(tempfile.mkdtemp()) / "s.db")
    rendered = rendered_sample(settings)
    keys = signing_keys(kinds, settings.sender_domain)
    templates = {"unsigned": MessageTemplate(rendered, settings, secret=SECRET.encode())}
    if keys:
        templates["signed"] = MessageTemplate(rendered, settings, secret=SECRET.encode(), keys=keys)
    head = templates["unsigned"].personalise(Recipient("reader@example.com", "Lecteur", 0))
    header_data = head.partition(b"\r\n\r\n")[0][:700].ljust(700, b"x")
    size = 0
    # Each figure is the median over chunks of up to 1,000 messages: one slow moment of a
    # shared machine does not make it.
    seconds: dict[str, list[float]] = {name: [] for name in [*templates, "raw"]}
    done = 0
    while done < count:
        chunk = min(1000, count - done)
        recipients = [
            Recipient(f"reader{n}@example.com", f"Lecteur {n}", n)
            for n in range(done, done + chunk)
        ]
        for name, template in templates.items():
            start = time.perf_counter()
            for recipient in recipients:
                size = len(template.personalise(recipient))
            seconds[name].append((time.perf_counter() - start) / chunk)
        if keys:
            start = time.perf_counter()
            for _ in recipients:
                for key in keys:
                    raw_sign(key, header_data)
            seconds["raw"].append((time.perf_counter() - start) / chunk)
        done += chunk
    unsigned = statistics.median(seconds["unsigned"])
    result = {"rate": 1 / unsigned, "peak_mb": peak_mb(), "size_kb": size / 1000}
    if keys:
        signed = statistics.median(seconds["signed"])
        raw = statistics.median(seconds["raw"])
        result |= {
            "rate": 1 / signed,
            "unsigned_rate": 1 / unsigned,
            "signing_ms": 1000 * (signed - unsigned),
            "raw_ms": 1000 * raw,
        }
    return result


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


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each figure measures."""

    compose: int = 1000  # a compose child's messages
    compose_big: int = 100_000  # the big compose child's (its peak memory)
    send: int = 1000  # a send's readers (signed and unsigned, into smtp-sink)
    big: int = 100_000  # the big pipeline's readers (peak memory)
    naive: int = 200  # the naive approach's messages
    rows: int = 100_000  # the CSV import's rows
    rounds: int = 3


TINY = Sizes(compose=200, compose_big=2000, send=100, big=2000, naive=20, rows=1000, rounds=1)


def spread(values: list[float]) -> str:
    """Return the median of per-round ratios and their range: "1.23x (rounds 1.10-1.40)"."""
    middle = statistics.median(values)
    return f"{middle:.2f}x (rounds {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-send", action="store_true", help="send the 100,000 as well")
    parser.add_argument("--rounds", type=int, help="rounds of the interleaved figures (3)")
    parser.add_argument("--tiny", action="store_true", help="every figure small: a check it runs")
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
    sizes = TINY if args.tiny else Sizes()
    if args.rounds:
        sizes = dataclasses.replace(sizes, rounds=args.rounds)
    server, port = start_sink()
    try:
        measure(sizes, port, big_send=args.big_send)
    finally:
        server.terminate()
        server.wait()


def measure(sizes: Sizes, port: int, *, big_send: bool) -> None:
    """Run the figures in interleaved rounds, printing each round's; then the medians."""
    n, big = f"{sizes.compose:,}", f"{sizes.compose_big:,}"
    figures: dict[str, list[dict[str, float]]] = {}
    sends = ("unsigned", *SIGNED)
    for number in range(1, sizes.rounds + 1):
        found: dict[str, dict[str, float]] = {}
        found["compose"] = run_child("compose", str(sizes.compose))
        found["compose big"] = run_child("compose", str(sizes.compose_big))
        for kind in SIGNED:
            found[f"compose {kind}"] = run_child("compose", str(sizes.compose), *kind.split("+"))
        # Signed and unsigned sends in the same round, in turn: the machine's mood weighs
        # on both alike.
        for kind in sends:
            kinds = [] if kind == "unsigned" else kind.split("+")
            store = run_store(sizes.send)
            found[f"send {kind}"] = run_child("pipeline", store, str(port), *kinds)
        found["naive"] = run_child("naive", str(sizes.naive), str(port))
        for name, result in found.items():
            figures.setdefault(name, []).append(result)
        print(f"round {number}:", flush=True)
        print(
            f"  compose: {n} {found['compose']['rate']:,.0f} msg/s, "
            f"{big} {found['compose big']['rate']:,.0f} msg/s",
            flush=True,
        )
        for kind in SIGNED:
            signed = found[f"compose {kind}"]
            print(
                f"  compose + DKIM {kind}: {signed['rate']:,.0f} msg/s (unsigned, same child: "
                f"{signed['unsigned_rate']:,.0f}); signing {signed['signing_ms']:.3f} ms, raw "
                f"signature {signed['raw_ms']:.3f} ms: ratio "
                f"{signed['signing_ms'] / signed['raw_ms']:.2f}x",
                flush=True,
            )
        unsigned = found["send unsigned"]["rate"]
        said = [f"unsigned {unsigned:,.0f} msg/s"]
        for kind in SIGNED:
            rate = found[f"send {kind}"]["rate"]
            said.append(f"{kind} {rate:,.0f} msg/s (ratio {rate / unsigned:.2f}x)")
        print(f"  send {sizes.send:,} to smtp-sink: " + ", ".join(said), flush=True)
        naive = found["naive"]["rate"]
        print(
            f"  naive approach {naive:,.0f} msg/s: the send is ratio {unsigned / naive:.1f}x it",
            flush=True,
        )

    def median(name: str, key: str = "rate") -> float:
        return statistics.median(r[key] for r in figures[name])

    def peak(name: str) -> float:
        return statistics.median(r["peak_mb"] for r in figures[name])

    rounds = sizes.rounds
    print()
    print(f"{'figure (median of ' + str(rounds) + ' rounds)':58s} {'rate':>16s} {'peak':>11s}")

    def show(label: str, rate: float, peak_mb: float | None = None) -> None:
        memory = f" {peak_mb:8.1f} MB" if peak_mb is not None else ""
        print(f"{label:58s} {rate:10,.0f} msg/s{memory}")

    show(f"compose, {n} recipients", median("compose"), peak("compose"))
    show(f"compose, {big} recipients", median("compose big"), peak("compose big"))
    for kind in SIGNED:
        show(f"compose + DKIM {kind}, {n} recipients", median(f"compose {kind}"))
    for kind in sends:
        show(f"send to smtp-sink, {sizes.send:,}, {kind}", median(f"send {kind}"))
    show(f"baseline: EmailMessage + new connection per message, {sizes.naive}", median("naive"))
    small, many = Path(run_store(sizes.send)), Path(run_store(sizes.big))
    if big_send:
        pipeline_big = run_child("pipeline", str(many), str(port))
        show(f"send to smtp-sink, {sizes.big:,}", pipeline_big["rate"], pipeline_big["peak_mb"])
        pipeline_small = figures["send unsigned"][rounds // 2]
    else:
        pipeline_big = run_child("pipeline", str(many), "-")
        label = f"whole pipeline, {sizes.big:,}, SMTP left out (discarded)"
        show(label, pipeline_big["rate"], pipeline_big["peak_mb"])
        pipeline_small = run_child("pipeline", str(small), "-")
        label = f"whole pipeline, {sizes.send:,}, SMTP left out (discarded)"
        show(label, pipeline_small["rate"], pipeline_small["peak_mb"])
    print()
    print(f"message size: {figures['compose'][0]['size_kb']:.0f} KB")
    ratios = [
        s["rate"] / b["rate"]
        for s, b in zip(figures["send unsigned"], figures["naive"], strict=True)
    ]
    print(f"sending vs the naive approach: ratio {spread(ratios)}")
    for kind in SIGNED:
        composed = figures[f"compose {kind}"]
        cost = [r["signing_ms"] / r["raw_ms"] for r in composed]
        sent = [
            s["rate"] / u["rate"]
            for s, u in zip(figures[f"send {kind}"], figures["send unsigned"], strict=True)
        ]
        print(
            f"DKIM {kind}: signing {median(f'compose {kind}', 'signing_ms'):.3f} ms of CPU a "
            f"message, raw signature {median(f'compose {kind}', 'raw_ms'):.3f} ms; ratio "
            f"signing cost / raw signature {spread(cost)} (target <= 1.15); signed send / "
            f"unsigned send ratio {spread(sent)} (target >= 0.8)"
        )
    ratio = pipeline_big["peak_mb"] / pipeline_small["peak_mb"]
    print(f"peak memory, {sizes.big:,} vs {sizes.send:,} recipients (same pipeline): {ratio:.2f}x")
    print(f"import of {sizes.rows:,} CSV rows: {time_import(sizes.rows):.1f} s")
    print("targets: compose >= 50,000 msg/s (issue #22); send >= 700 msg/s; memory ratio <= 1.2")


if __name__ == "__main__":
    main()
