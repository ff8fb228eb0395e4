"""`qant-mail doctor [FILE]`: the checks before a send, each saying what to do when it
fails. What needs no network (keys, alignment, the message's size against what the
relay said it takes, https) runs by itself, for `send` too (`offline_checks`); then the
DNS (DKIM, SPF, DMARC, MX), the public side (the site, a one-click unsubscription that
changes nobody, the archive, the feed), the issue's links, and the relay (EHLO,
STARTTLS, login, SIZE)."""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from qant_mail.app import issues
from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.authoring.load import load
from qant_mail.authoring.render import PLACEHOLDER
from qant_mail.base.config import Settings
from qant_mail.base.errors import ExitCode, IssueError, QantError
from qant_mail.base.files import write_all
from qant_mail.delivery.compose import Prepared, Recipient
from qant_mail.delivery.outbox import Rules, aligned
from qant_mail.delivery.transport import (
    Relays,
    SmtpTransport,
    TransportUnavailable,
    is_loopback,
)

if TYPE_CHECKING:
    # Imported where the network is asked: `send` runs the checks that need none, and
    # dnspython alone is a fifth of its start-up.
    from qant_mail.app.probe import Visit, Web
    from qant_mail.delivery.resolver import Answer, Resolver

# What the relays said they take (EHLO SIZE), kept under paths.cache by the last run
# that asked them: the checks without network compare a message with it.
RELAYS_FILE = "doctor-relays.json"
LINKS_FILE = "doctor-links.json"
ONE_CLICK_BODY = b"List-Unsubscribe=One-Click"
# A TXT record's strings hold 255 characters at most: longer values are cut (RFC 1035).
_TXT_STRING = 255


class Status(enum.StrEnum):
    """How a check came out: `blocking` would make the send fail (or its mail go unread
    or unsigned), `warning` lets it go worse than it could."""

    OK = "ok"
    WARNING = "warning"
    BLOCKING = "blocking"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Check:
    """One check: its name, how it came out, what was found, and what to do about it."""

    name: str
    status: Status
    detail: str
    advice: str = ""


@dataclass(frozen=True)
class DoctorReport:
    """Every check of a run, for the newsletter of the issue (or the main one)."""

    newsletter: str
    issue: Path | None
    checks: list[Check] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        """Return BLOCKING if a check would make the send fail, WARNINGS if some only
        warn, OK otherwise."""
        if any(c.status is Status.BLOCKING for c in self.checks):
            return ExitCode.BLOCKING
        if any(c.status is Status.WARNING for c in self.checks):
            return ExitCode.WARNINGS
        return ExitCode.OK

    def summary(self) -> str:
        """Say how many checks came out each way: "1 blocking, 2 warnings, 9 ok"."""
        counts = dict.fromkeys(Status, 0)
        for check in self.checks:
            counts[check.status] += 1
        parts = [
            f"{counts[Status.BLOCKING]} blocking",
            f"{counts[Status.WARNING]} warning{'' if counts[Status.WARNING] == 1 else 's'}",
            f"{counts[Status.OK]} ok",
        ]
        if counts[Status.SKIPPED]:
            parts.append(f"{counts[Status.SKIPPED]} skipped")
        return ", ".join(parts)

    def as_json(self) -> dict[str, object]:
        """Return the report as plain data, for scripts."""
        return {
            "newsletter": self.newsletter,
            "issue": str(self.issue) if self.issue is not None else None,
            "exit_code": int(self.exit_code),
            "checks": [
                {"name": c.name, "status": c.status.value, "detail": c.detail, "advice": c.advice}
                for c in self.checks
            ],
        }


def run(ctx: Context, issue: Path | None, *, offline: bool = False) -> DoctorReport:
    """Run every check for a send of `issue` (None: of the main newsletter, without the
    checks of an issue's message and links); `offline`: only those needing no network."""
    checks: list[Check] = []
    prepared: Prepared | None = None
    key = ctx.settings.main_id
    if issue is not None:
        # A file that is no issue at all is bad input (exit 1), not a failed check.
        wanted = load(issue).issue.newsletter
        key = wanted if wanted is not None and wanted in ctx.settings.editions else key
        try:
            prepared = issues.prepare(ctx, issue)
        except QantError as err:
            checks.append(_unsendable(issue, err))
    settings = ctx.settings.for_newsletter(key)
    # With the network, the relays are asked their SIZE afresh below.
    checks += _offline(ctx, settings, prepared, known_size=offline)
    if offline:
        checks.append(
            Check(
                "network",
                Status.SKIPPED,
                "not asked (--offline): the DNS, the public side, the links, the relay",
            )
        )
        return DoctorReport(key, issue, checks)
    rules = _rules(ctx, key)
    if rules is not None:
        checks += _dns(settings, rules)
    from qant_mail.app.probe import Web

    web = Web(
        settings.doctor.timeout,
        _user_agent(settings),
        cache=settings.cache_dir / LINKS_FILE,
        max_age=settings.doctor.link_cache_hours * 3600,
        clock=ctx.clock,
    )
    checks += _public_side(ctx, settings, web)
    if prepared is not None:
        checks += _links(prepared, web, issue)
    checks += _relays(ctx, settings, prepared)
    return DoctorReport(key, issue, checks)


def offline_checks(ctx: Context, prepared: Prepared) -> list[Check]:
    """Return the checks of a prepared send that need no network: a key for each DKIM
    selector, the envelope and the signatures aligned with From, the message against
    the size the relay last said it takes, an https base_url."""
    return _offline(ctx, ctx.settings.for_newsletter(prepared.newsletter), prepared)


# -- without the network ---------------------------------------------------------------


def _offline(
    ctx: Context, settings: Settings, prepared: Prepared | None, *, known_size: bool = True
) -> list[Check]:
    checks = _signing(ctx, settings)
    rules = _rules(ctx, settings.newsletter.id)
    if rules is not None:
        checks.append(_envelope(rules))
    checks.append(_base_url(settings))
    if prepared is not None and known_size:
        checks.append(_size_known(settings, _message_size(prepared)))
    return checks


def _rules(ctx: Context, key: str) -> Rules | None:
    try:
        return ctx.outbox.rules(key)
    except QantError:
        return None  # said by `_signing`, which asks first


def _signing(ctx: Context, settings: Settings) -> list[Check]:
    """Check that each selector has its key, that a relay elsewhere gets signed mail,
    and that the signatures are on the From domain (DMARC)."""
    key = settings.newsletter.id
    try:
        rules = ctx.outbox.rules(key)
    except QantError as err:
        return [
            Check(
                "DKIM keys",
                Status.BLOCKING,
                str(err),
                "give each selector of [dkim] its private key: QANT_DKIM_PRIVATE_KEY (RSA) "
                "or QANT_DKIM_ED25519_PRIVATE_KEY, or the …_FILE variable naming its file",
            )
        ]
    try:
        signing = ctx.outbox.check(rules)
    except QantError as err:
        return [Check("DKIM keys", Status.BLOCKING, str(err), "`qant-mail dkim keygen`")]
    if not rules.keys:
        return [
            Check(
                "DKIM keys",
                Status.OK,
                "none: messages leave unsigned, to a relay on this machine (which may sign)",
            )
        ]
    checks = [Check("DKIM keys", Status.OK, signing)]
    from_domain = settings.sender_domain
    for dkim_key in rules.keys:
        if not aligned(dkim_key.domain, from_domain):
            checks.append(
                Check(
                    f"DKIM alignment ({dkim_key.selector})",
                    Status.WARNING,
                    f"d={dkim_key.domain} is not on the domain of From ({from_domain}): "
                    "DMARC passes on SPF alone",
                    f"sign on {from_domain}: leave dkim.domain empty (or set it to "
                    f"{from_domain}), and publish the key there",
                )
            )
    return checks


def _envelope(rules: Rules) -> Check:
    """Check that the envelope sender (where bounces go, what SPF checks) aligns with From."""
    from_domain = rules.settings.sender_domain
    envelope = rules.envelope
    how = " (VERP: bounces+TOKEN@…)" if rules.verp else ""
    misaligned = [note for note in rules.notes if "is not on the domain of" in note]
    if misaligned:
        return Check(
            "envelope sender",
            Status.WARNING,
            "; ".join(misaligned),
            f"use an address on {from_domain} (or below it) for bounces.address or "
            "smtp.return_path, with an MX and an SPF record",
        )
    return Check("envelope sender", Status.OK, f"{envelope}{how}, aligned with {from_domain}")


def _base_url(settings: Settings) -> Check:
    url = settings.newsletter.base_url
    parts = urlsplit(url)
    if parts.scheme == "https":
        return Check("base_url", Status.OK, f"{url} (https)")
    if is_loopback(parts.hostname or ""):
        return Check(
            "base_url",
            Status.OK,
            f"{url}: plain http on this machine, a test setup (readers need https)",
        )
    return Check(
        "base_url",
        Status.WARNING,
        f"{url} is not https: Gmail and Yahoo ignore a one-click unsubscription that is "
        "not https (RFC 8058), and browsers warn on the reader's page",
        "serve the public side behind a reverse proxy with a certificate, and set "
        "newsletter.base_url to its https address",
    )


def _message_size(prepared: Prepared) -> int:
    """Return the size of one message of the send, as the sample reader gets it."""
    settings = prepared.template.settings
    sample = Recipient(settings.preview.sample_email, settings.preview.sample_name)
    return len(prepared.template.personalise(sample))


def _size_known(settings: Settings, size: int) -> Check:
    """Check the message against the SIZE each relay said it takes, when one said it."""
    known = _read_relays(settings)
    limits = {where: known[where] for where in _where(settings) if known.get(where)}
    if not limits:
        return Check(
            "message size",
            Status.OK,
            f"{_kb(size)}; the relay's limit is not known yet (`qant-mail doctor` asks it)",
        )
    too_small = {where: limit for where, limit in limits.items() if size > limit}
    if too_small:
        said = ", ".join(f"{where} takes {_kb(limit)}" for where, limit in too_small.items())
        return Check(
            "message size",
            Status.BLOCKING,
            f"the message is {_kb(size)}, and {said} (when last asked)",
            _smaller(settings),
        )
    smallest = min(limits.values())
    return Check("message size", Status.OK, f"{_kb(size)}, the relay takes {_kb(smallest)}")


# -- the DNS -----------------------------------------------------------------------------


def _dns(settings: Settings, rules: Rules) -> list[Check]:
    from qant_mail.delivery.resolver import Resolver

    resolver = Resolver(settings.doctor.nameserver, settings.doctor.timeout)
    checks = [_dkim_record(resolver, key.selector, key.domain, key.record) for key in rules.keys]
    # DMARC passes on a signature or an envelope that both aligns and verifies.
    verified = {
        key.domain for key, c in zip(rules.keys, checks, strict=True) if c.status is Status.OK
    }
    envelope_domain = rules.envelope.rpartition("@")[2]
    spf = _spf(resolver, envelope_domain, settings)
    checks.append(spf)
    checks.append(_dmarc(resolver, settings, rules, verified, spf.status is Status.OK))
    checks.append(_mx(resolver, envelope_domain))
    return checks


def _unasked(name: str, answer: Answer) -> Check:
    return Check(
        name,
        Status.WARNING,
        f"could not ask: {answer.problem}",
        "check the network, or [doctor] nameserver (a resolver that sees the world's DNS); "
        "then run `qant-mail doctor` again",
    )


def _dkim_record(resolver: Resolver, selector: str, domain: str, expected: str) -> Check:
    """Check that the key of `selector` is published, and is the one that signs."""
    name = f"{selector}._domainkey.{domain}"
    check = f"DKIM {name}"
    publish = f"publish: {name}. IN TXT {_txt(expected)}"
    answer = resolver.txt(name)
    if answer.unknown:
        return _unasked(check, answer)
    found = [tags for tags in map(_tags, answer.records) if "p" in tags]
    if not found:
        return Check(
            check, Status.BLOCKING, f"no DKIM record ({answer.problem or 'none'})", publish
        )
    wanted = _tags(expected)
    matching = [
        tags
        for tags in found
        if _b64(tags["p"]) == _b64(wanted["p"]) and tags.get("k", "rsa") == wanted.get("k", "rsa")
    ]
    if not matching:
        if any(not tags["p"] for tags in found):
            why = "the published key is revoked (p= is empty)"
        else:
            why = "the published key is not the one that signs (another key pair?)"
        return Check(check, Status.BLOCKING, why, f"replace the record; {publish}")
    if len(found) > 1:
        return Check(
            check,
            Status.WARNING,
            f"{len(found)} DKIM records at one name: a receiver may take either",
            f"keep only the one that matches; {publish}",
        )
    testing = " (t=y: testing; some receivers ignore it)" if "y" in matching[0].get("t", "") else ""
    return Check(check, Status.OK, f"published, matches the key{testing}")


def _spf(resolver: Resolver, domain: str, settings: Settings) -> Check:
    """Check the SPF record of the envelope's domain: one, and not letting anyone send."""
    check = f"SPF {domain}"
    publish = (
        f'publish: {domain}. IN TXT "v=spf1 mx {_spf_term(settings)} ~all" (or the '
        "include: your relay's provider gives)"
    )
    answer = resolver.txt(domain)
    if answer.unknown:
        return _unasked(check, answer)
    records = [r for r in answer.records if re.match(r"(?i)v=spf1(\s|$)", r)]
    if not records:
        return Check(
            check,
            Status.WARNING,
            "no SPF record: receivers cannot tell that your relay may send for "
            f"{domain}; DMARC then rests on DKIM alone",
            publish,
        )
    if len(records) > 1:
        return Check(
            check,
            Status.WARNING,
            f"{len(records)} SPF records: receivers treat that as an error (RFC 7208 4.5)",
            "merge them into one record",
        )
    if re.search(r"(?i)(^|\s)\+?all(\s|$)", records[0]):
        return Check(
            check,
            Status.WARNING,
            f"{records[0]!r} lets anyone send as {domain}",
            "end the record with ~all or -all",
        )
    return Check(check, Status.OK, records[0])


def _spf_term(settings: Settings) -> str:
    """Return the SPF term that lets the first relay send: its address, or its name's."""
    host = settings.relays[0][0] if settings.relays else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"a:{host}" if host and host != "localhost" else "a:YOUR-RELAY"
    if address.is_loopback:
        return "a:YOUR-RELAY"  # a relay on this machine: what the world sees is its host's
    return f"ip{address.version}:{address}"


def _dmarc(
    resolver: Resolver, settings: Settings, rules: Rules, signed: set[str], spf_ok: bool
) -> Check:
    """Check that a DMARC policy exists for From's domain, and that a signature on one of
    the domains `signed` (whose records verify) or the envelope (when `spf_ok`) aligns
    with From as it asks (relaxed or strict)."""
    from_domain = settings.sender_domain
    check = f"DMARC {from_domain}"
    # Without the list of public suffixes, the policy is looked for at the domain and
    # then each parent of two labels or more (the organisational domain is among them).
    labels = from_domain.split(".")
    answer: Answer | None = None
    record = ""
    for start in range(0, max(1, len(labels) - 1)):
        answer = resolver.txt("_dmarc." + ".".join(labels[start:]))
        if answer.unknown:
            return _unasked(check, answer)
        found = [r for r in answer.records if re.match(r"(?i)v=DMARC1\s*(;|$)", r)]
        if found:
            record = found[0]
            break
    if not record:
        return Check(
            check,
            Status.WARNING,
            "no DMARC record: Gmail and Yahoo want one from bulk senders",
            f'publish: _dmarc.{from_domain}. IN TXT "v=DMARC1; p=none; '
            f'rua=mailto:dmarc@{from_domain}"',
        )
    tags = _tags(record)
    policy = tags.get("p", "none").lower()
    strict_dkim = tags.get("adkim", "r").lower() == "s"
    strict_spf = tags.get("aspf", "r").lower() == "s"
    envelope_domain = rules.envelope.rpartition("@")[2]

    def same(domain: str, strict: bool) -> bool:
        return domain.lower() == from_domain.lower() if strict else aligned(domain, from_domain)

    by_dkim = [domain for domain in signed if same(domain, strict_dkim)]
    by_spf = spf_ok and same(envelope_domain, strict_spf)
    modes = f"adkim={'s' if strict_dkim else 'r'}, aspf={'s' if strict_spf else 'r'}"
    passes = [
        *(["DKIM aligned"] if by_dkim else []),
        *(["SPF aligned"] if by_spf else []),
    ]
    if passes:
        return Check(check, Status.OK, f"p={policy} ({modes}): {' and '.join(passes)}")
    why = (
        f"p={policy} ({modes}): neither a signature that verifies and aligns "
        f"({', '.join(key.domain for key in rules.keys) or 'none'}) nor an envelope with "
        f"SPF that aligns ({envelope_domain}) with From"
    )
    advice = f"sign on {from_domain} (dkim.domain empty) and use an envelope on {from_domain}" + (
        ", or relax the record (adkim=r; aspf=r)" if strict_dkim or strict_spf else ""
    )
    status = Status.WARNING if policy == "none" else Status.BLOCKING
    if status is Status.BLOCKING:
        why += f": receivers are told to {policy} the messages"
    return Check(check, status, why, advice)


def _mx(resolver: Resolver, domain: str) -> Check:
    """Check that the envelope's domain takes mail: bounces come back there, and many
    receivers refuse a sender whose domain cannot be answered."""
    check = f"bounces MX {domain}"
    publish = f"publish: {domain}. IN MX 10 your-mail-server.{domain}."
    answer = resolver.mx(domain)
    if answer.unknown:
        return _unasked(check, answer)
    if answer.records:
        hosts = [r.partition(" ")[2] for r in answer.records]
        if all(host in ("", ".", "@") for host in hosts):
            return Check(
                check,
                Status.BLOCKING,
                "a null MX: the domain says it takes no mail, so bounces are lost and "
                "receivers refuse the envelope",
                publish,
            )
        return Check(check, Status.OK, ", ".join(sorted(answer.records, key=_preference)))
    addresses = resolver.addresses(domain)
    if addresses.records:
        return Check(
            check,
            Status.WARNING,
            f"no MX: bounces go to its address ({', '.join(addresses.records)}), if it takes mail",
            publish,
        )
    return Check(
        check,
        Status.BLOCKING,
        f"no MX and no address ({answer.problem}): receivers refuse such an envelope, "
        "and no bounce can come back",
        publish,
    )


# -- the public side ---------------------------------------------------------------------


def _public_side(ctx: Context, settings: Settings, web: Web) -> list[Check]:
    base = settings.newsletter.base_url
    checks = []
    home = web.fetch(base + "/")
    if home.status is None:
        checks.append(
            Check(
                "site",
                Status.BLOCKING,
                f"{base}/: {home.problem}: readers' unsubscribe links go there",
                "start `qant-mail serve` (behind your reverse proxy) where base_url points",
            )
        )
    elif home.status >= 500:
        checks.append(Check("site", Status.WARNING, f"{base}/: {home.problem}", _serve_log()))
    else:
        checks.append(Check("site", Status.OK, f"{base}/ answers ({home.status})"))
    checks.append(_one_click(ctx, settings, web))
    archive = settings.archive_url
    hosted = settings.images.mode == "host"
    for name, url in (("archive", f"{archive}/"), ("feed", f"{archive}/feed.xml")):
        visit = web.fetch(url)
        if visit.ok:
            checks.append(Check(name, Status.OK, f"{url} ({visit.status})"))
            continue
        pictures = name == "archive" and hosted
        checks.append(
            Check(
                name,
                Status.BLOCKING if pictures else Status.WARNING,
                f"{url}: {visit.problem}"
                + (
                    ": the issue's pictures are linked from there (images.mode = host)"
                    if pictures
                    else ""
                ),
                "`qant-mail archive`, then publish the folder (or `qant-mail serve --archive …`)",
            )
        )
    return checks


def _one_click(ctx: Context, settings: Settings, web: Web) -> Check:
    """POST a one-click unsubscription (RFC 8058) of nobody, as a mail provider would."""
    check = "one-click unsubscribe"
    try:
        secret = ctx.secret()
    except QantError as err:
        return Check(check, Status.BLOCKING, str(err))
    key = settings.newsletter.id
    token = tokens.make_probe(secret, "" if key == settings.main_id else key)
    url = f"{settings.newsletter.base_url}/unsubscribe/{token}"
    shown = f"{settings.newsletter.base_url}/unsubscribe/…"
    visit = web.fetch(
        url,
        "POST",
        ONE_CLICK_BODY,
        {"Content-Type": "application/x-www-form-urlencoded"},
        follow=False,
    )
    if visit.ok:
        return Check(check, Status.OK, f"POST {shown} answers {visit.status} (a test token)")
    if visit.status == 404 and visit.url == url:
        return Check(
            check,
            Status.BLOCKING,
            f"POST {shown}: 404: the site does not take our links",
            "the site must run with the same QANT_SECRET_KEY (or QANT_SECRET_KEYS) as this "
            "machine, and a qant-mail that knows doctor's test token; or base_url points "
            "at another site",
        )
    return Check(
        check,
        Status.BLOCKING,
        f"POST {shown}: {visit.problem}: Gmail and Yahoo want one-click unsubscription",
        "start `qant-mail serve` where base_url points; its proxy must pass POST "
        "/unsubscribe/… through",
    )


def _serve_log() -> str:
    return "see the log of `qant-mail serve` (or of its reverse proxy)"


# -- the issue's links -------------------------------------------------------------------


class _Links(HTMLParser):
    """Collect the targets of an HTML document's links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href.strip())


def issue_links(html: str) -> list[str]:
    """Return the web addresses an issue's HTML links to, each once: not the
    per-reader ones (%%qant:…%% placeholders), not mailto: or anchors."""
    parser = _Links()
    parser.feed(html)
    parser.close()
    found = [
        href
        for href in parser.links
        if urlsplit(href).scheme in ("http", "https") and not PLACEHOLDER.search(href)
    ]
    return list(dict.fromkeys(found))


def _links(prepared: Prepared, web: Web, issue: Path | None) -> list[Check]:
    links = issue_links(prepared.rendered.html)
    if not links:
        return [Check("links", Status.OK, "the issue links to no web page")]
    visits = web.check_all(links)
    broken = [visit for visit in visits.values() if not visit.ok]
    if not broken:
        return [Check("links", Status.OK, f"all {len(links)} links answer")]
    where = f" in {issue.name}" if issue is not None else ""
    checks = []
    for visit in broken:
        checks.append(
            Check(
                f"link {visit.url}",
                Status.WARNING,
                visit.problem,
                _link_advice(visit, where),
            )
        )
    return checks


def _link_advice(visit: Visit, where: str) -> str:
    if visit.status is not None and visit.status in (401, 403, 429):
        return f"open it in a browser: some sites refuse robots; if it fails there, fix it{where}"
    if visit.problem.startswith(("redirect loop", "more than")):
        return f"the site sends the link round in circles: link to the page it means{where}"
    return f"fix or remove the link{where}"


# -- the relay -------------------------------------------------------------------------


def _relays(ctx: Context, settings: Settings, prepared: Prepared | None) -> list[Check]:
    """Open a session with each relay as a send does (EHLO, STARTTLS, login), and
    compare the SIZE it states with the message."""
    try:
        transport = ctx.outbox.transport_for(settings.newsletter.id)
    except QantError as err:
        return [Check("relay", Status.BLOCKING, str(err), "fix [smtp] (and its password)")]
    if isinstance(transport, Relays):
        relays = transport.transports
    elif isinstance(transport, SmtpTransport):
        relays = [transport]
    else:
        return [Check("relay", Status.SKIPPED, f"messages go to {transport.description}")]
    size = _message_size(prepared) if prepared is not None else None
    results: list[tuple[SmtpTransport, dict[str, str] | TransportUnavailable]] = []
    for relay in relays:
        try:
            results.append((relay, relay.features()))
        except TransportUnavailable as err:
            results.append((relay, err))
    reachable = any(not isinstance(found, TransportUnavailable) for _, found in results)
    checks: list[Check] = []
    known = _read_relays(settings)
    for relay, found in results:
        name = f"relay {relay.where}"
        if isinstance(found, TransportUnavailable):
            checks.append(
                Check(
                    name,
                    Status.WARNING if reachable else Status.BLOCKING,
                    str(found) + (" (a fallback answers)" if reachable else ""),
                    _relay_advice(str(found)),
                )
            )
            continue
        limit = _size_limit(found)
        known[relay.where] = limit or 0
        steps = "EHLO" + (", STARTTLS" if relay.security == "starttls" else "")
        steps += ", TLS" if relay.security == "tls" else ""
        steps += f", login as {relay.username}" if relay.username else ""
        takes = f"takes up to {_kb(limit)}" if limit else "states no size limit"
        if size is not None and limit and size > limit:
            checks.append(
                Check(
                    name,
                    Status.BLOCKING,
                    f"{steps}: ok; but it {takes} and the message is {_kb(size)}",
                    _smaller(settings),
                )
            )
            continue
        message = f"; the message is {_kb(size)}" if size is not None else ""
        checks.append(Check(name, Status.OK, f"{steps}: ok; it {takes}{message}"))
    _write_relays(settings, known)
    return checks


def _relay_advice(problem: str) -> str:
    if "login" in problem:
        return "check smtp.username and QANT_SMTP_PASSWORD (or QANT_SMTP_PASSWORD_FILE)"
    if "certificate" in problem:
        return (
            "smtp.ca_file for a relay whose certificate a private CA signed; "
            "smtp.verify_certificates = false only for a relay you control"
        )
    if "STARTTLS" in problem:
        return 'the relay offers no STARTTLS: security = "tls" (port 465), or another relay'
    return "check [smtp] host, port and security, and that the relay lets this machine in"


def _size_limit(features: dict[str, str]) -> int | None:
    """Return the SIZE the relay states in bytes (RFC 1870), None when it states none."""
    value = features.get("size", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def _smaller(settings: Settings) -> str:
    embedded = settings.images.mode == "embed"
    return (
        'link the pictures instead of embedding them (images.mode = "host", then '
        "`qant-mail archive`), or use fewer or smaller pictures"
        if embedded
        else "use fewer or smaller pictures, or a relay that takes larger messages"
    )


def _where(settings: Settings) -> list[str]:
    return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in settings.relays]


def _read_relays(settings: Settings) -> dict[str, int]:
    try:
        data = json.loads((settings.cache_dir / RELAYS_FILE).read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, int) and v >= 0}


def _write_relays(settings: Settings, known: dict[str, int]) -> None:
    # Not written, the next run without network does not know the limit, and says so.
    with contextlib.suppress(QantError):
        write_all({settings.cache_dir / RELAYS_FILE: json.dumps(known).encode()})


# -- helpers ---------------------------------------------------------------------------


def _unsendable(issue: Path, err: QantError) -> Check:
    detail = str(err)
    if isinstance(err, IssueError):
        shown = [problem.short() for problem in err.problems[:3]]
        more = len(err.problems) - len(shown)
        detail += ": " + "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
    return Check(
        "issue",
        Status.BLOCKING,
        detail,
        f"`qant-mail check {issue}` lists what to fix; the checks of its message are skipped",
    )


def _tags(record: str) -> dict[str, str]:
    """Return the tags of a DKIM or DMARC record ("v=DKIM1; k=rsa; p=…")."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def _b64(value: str) -> str:
    return re.sub(r"\s+", "", value)


def _txt(value: str) -> str:
    return " ".join(f'"{value[i : i + _TXT_STRING]}"' for i in range(0, len(value), _TXT_STRING))


def _preference(record: str) -> int:
    first = record.partition(" ")[0]
    return int(first) if first.isdigit() else 0


def _kb(size: int | None) -> str:
    if size is None:
        return "?"
    return f"{size / 1_000_000:.1f} MB" if size >= 1_000_000 else f"{size / 1000:.1f} KB"


def _user_agent(settings: Settings) -> str:
    import qant_mail

    return f"qant-mail/{qant_mail.__version__} (link check; +{settings.newsletter.base_url})"
