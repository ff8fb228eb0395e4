"""What the world's DNS says of the newsletter's domains (dnspython): TXT records (DKIM,
SPF, DMARC) and mail exchangers, asked of the system's resolver or of `[doctor]
nameserver`, each answer or the reason there is none."""

from __future__ import annotations

from dataclasses import dataclass

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from qant_mail.base.config import nameserver_address


@dataclass(frozen=True)
class Answer:
    """The records of one name and type, or why there are none: `problem` says it in
    words, and `absent` is set when the DNS itself says so (no such name, no record of
    that type) rather than failing to answer."""

    name: str
    kind: str
    records: tuple[str, ...] = ()
    problem: str = ""
    absent: bool = False

    @property
    def unknown(self) -> bool:
        """Return whether the DNS could not be asked (a timeout, a failing server):
        nothing is known of the records."""
        return bool(self.problem) and not self.absent


class Resolver:
    """Asks one DNS server (`nameserver`, "IP[:port]") or the system's resolver, each
    question within `timeout` seconds."""

    def __init__(self, nameserver: str = "", timeout: float = 10.0) -> None:
        self.problem = ""  # why no question can be asked (no resolver configured)
        try:
            self.resolver = dns.resolver.Resolver(configure=not nameserver)
        except dns.exception.DNSException as err:
            self.resolver = dns.resolver.Resolver(configure=False)
            self.problem = f"no DNS resolver configured on this machine ({err})"
        if nameserver:
            host, port = nameserver_address(nameserver)
            self.resolver.nameservers = [host]
            self.resolver.port = port
        self.where = nameserver or "the system's resolver"
        # EDNS, so that a DKIM key (some 400 bytes) comes in one UDP answer; a server
        # that must truncate it is asked again over TCP.
        self.resolver.use_edns(0, 0, 1232)
        self.resolver.timeout = timeout
        self.resolver.lifetime = timeout

    def txt(self, name: str) -> Answer:
        """Return the TXT records of `name`, each record's strings joined (RFC 6376 3.6.2.2)."""
        return self._ask(name, "TXT")

    def mx(self, name: str) -> Answer:
        """Return the mail exchangers of `name`, as "PREFERENCE HOST" (host without its dot)."""
        return self._ask(name, "MX")

    def addresses(self, name: str) -> Answer:
        """Return the IPv4 and IPv6 addresses of `name` (a domain without MX gets its
        mail there: RFC 5321 5.1)."""
        four, six = self._ask(name, "A"), self._ask(name, "AAAA")
        if four.records or six.records:
            return Answer(name, "A/AAAA", four.records + six.records)
        return four if four.unknown or not six.problem else six

    def _ask(self, name: str, kind: str) -> Answer:
        if self.problem:
            return Answer(name, kind, problem=self.problem)
        asked = f"{kind} {name}"
        try:
            answer = self.resolver.resolve(
                dns.name.from_text(name), kind, search=False, raise_on_no_answer=False
            )
        except dns.resolver.NXDOMAIN:
            return Answer(name, kind, problem=f"{name}: no such name (NXDOMAIN)", absent=True)
        except dns.resolver.LifetimeTimeout:
            return Answer(name, kind, problem=f"{asked}: no answer from {self.where} in time")
        except dns.resolver.NoNameservers as err:
            return Answer(name, kind, problem=f"{asked}: {self.where} failed to answer ({err})")
        except (dns.exception.SyntaxError, dns.name.LabelTooLong, dns.name.EmptyLabel) as err:
            return Answer(name, kind, problem=f"{name!r} is not a domain name ({err})", absent=True)
        except dns.exception.DNSException as err:
            return Answer(name, kind, problem=f"{asked}: {err}")
        records = []
        for rdata in answer.rrset or ():
            if rdata.rdtype == dns.rdatatype.TXT:
                records.append(b"".join(rdata.strings).decode("utf-8", "replace"))
            elif rdata.rdtype == dns.rdatatype.MX:
                records.append(f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True)}")
            else:
                records.append(rdata.to_text())
        if not records:
            return Answer(name, kind, problem=f"{name}: no {kind} record", absent=True)
        return Answer(name, kind, tuple(records))
