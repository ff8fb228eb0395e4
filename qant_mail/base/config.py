"""The newsletter's settings: `qant.toml`, overridden by `QANT_SECTION_KEY` variables."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, ValidationError

from qant_mail.base.addresses import (
    AddressError,
    check_display_name,
    check_one_line,
    is_plain_address,
)
from qant_mail.base.errors import ConfigError
from qant_mail.base.schema import Strict, readable_errors

CONFIG_NAME = "qant.toml"
ENV_PREFIX = "QANT_"
LOCALES_DIR = Path(__file__).parent.parent / "locales"

# Keys that hold secrets: they come from the environment only, never from a file that
# could be committed. The value is the variable to set instead.
SECRETS = {
    "password": "QANT_SMTP_PASSWORD",
    "secret": "QANT_SECRET_KEY",
    "secret_key": "QANT_SECRET_KEY",
    "private_key": "QANT_DKIM_PRIVATE_KEY",
    "dkim_private_key": "QANT_DKIM_PRIVATE_KEY",
    "ed25519_private_key": "QANT_DKIM_ED25519_PRIVATE_KEY",
    "imap_password": "QANT_BOUNCES_PASSWORD",
}


def _address(value: str) -> str:
    # The newsletter's own addresses need only be usable in headers; the full syntax
    # check (email-validator) is for subscribers' addresses.
    if not is_plain_address(value.strip()):
        raise ValueError(f"{value!r} is not a plain email address (name@domain.tld)")
    return value.strip()


def _name(value: str) -> str:
    try:
        return check_display_name(value)
    except AddressError as err:
        raise ValueError(str(err)) from err


def _one_line(value: str) -> str:
    try:
        return check_one_line(value, "the text")
    except AddressError as err:
        raise ValueError(str(err)) from err


_RELAY = re.compile(r"(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:(?P<port>[0-9]{1,5}))?")


def _relay(value: str) -> str:
    found = _RELAY.fullmatch(value.strip())
    if found is None or not 1 <= int(found["port"] or 1) <= 65535:
        raise ValueError(f"{value!r} is not a relay written host:port (like smtp.example.com:587)")
    return found.group()


def check_base_url(value: str) -> str:
    """Return a site's address without its trailing slash; raise ValueError if it is
    not an absolute http(s) URL without query or fragment."""
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", value):
        raise ValueError(f"{value!r} is not an absolute http(s) URL without query or fragment")
    return value.rstrip("/")


def check_timezone(value: str) -> str:
    """Return `value` if it names a time zone; raise ValueError otherwise."""
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as err:
        raise ValueError(f"{value!r} is not a time zone (like Europe/Paris or UTC)") from err
    return value


def _colour(value: str) -> str:
    if not re.fullmatch(r"#[0-9a-fA-F]{6}", value):
        raise ValueError(f"{value!r} is not a colour written #rrggbb")
    return value.lower()


Address = Annotated[str, AfterValidator(_address)]
DisplayName = Annotated[str, Field(min_length=1), AfterValidator(_name)]
Colour = Annotated[str, AfterValidator(_colour)]
Text = Annotated[str, Field(min_length=1)]
# An SMTP relay: "host" or "host:port" (the port of [smtp] when left out).
Relay = Annotated[str, AfterValidator(_relay)]
# Text that goes in a header or a title: one line, no control character.
Line = Annotated[str, Field(min_length=1), AfterValidator(_one_line)]
# RFC 2919's list-id: dot-atom text.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
ListLabel = Annotated[str, Field(pattern=rf"^({_ATEXT}(\.{_ATEXT})*)?$")]


# A newsletter's key: in issues (`newsletter:`), links, List-Id and the archive's paths.
NEWSLETTER_ID = r"^[a-z0-9][a-z0-9-]{0,31}$"
DEFAULT_NEWSLETTER = "default"


class Newsletter(Strict):
    """Who the newsletter is and how it speaks to readers."""

    # The key subscriptions and sends are stored under. Only the main newsletter
    # ([newsletter]) sets it; each [newsletters.NAME] is keyed by its NAME.
    id: Annotated[str, Field(pattern=NEWSLETTER_ID)] = DEFAULT_NEWSLETTER
    name: Line
    title: Line
    tagline: str = ""
    masthead: str = ""
    byline: Text
    locale: Annotated[str, Field(pattern=r"^[a-z]{2,3}([_-][A-Za-z]{2,4})?$")] = "fr"
    base_url: Annotated[str, AfterValidator(check_base_url)]
    logo: str | None = None
    # For dark mode, where the mail client supports it (transparent, light letters).
    logo_dark: str | None = None
    logo_alt: str = ""
    words_per_minute: Annotated[int, Field(ge=50, le=1000)] = 250
    postal_address: str = ""
    # Where the editors are: `schedule --at` times are read, and shown, in it.
    timezone: Annotated[str, AfterValidator(check_timezone)] = "UTC"
    # One sentence on the signup form and the reader's page: what it is, how often.
    description: str = ""
    # Offered on the public signup forms and the reader's page.
    public: bool = True
    # The issue file (YAML, relative to the settings) a reader gets once confirmed.
    welcome: str = ""
    # The label of the List-Id header (RFC 2919): mail clients file and filter by it.
    # Default: the sender's local part and domain, the newsletter's key before them
    # for every newsletter but the main one.
    list_id: ListLabel = ""
    # Where its archive lives under base_url: "" for the main newsletter, its key
    # for the others.
    archive_path: Annotated[str, Field(pattern=r"^([a-z0-9][a-z0-9-]*)?$")] | None = None
    # Its own relays, "host:port", tried in order (the first, then the fallbacks), with
    # the security, login and certificates of [smtp]. Empty: [smtp] host and fallback.
    relays: list[Relay] = Field(default_factory=list)
    # Whether a send of it to its list needs an approval; unset: [review] required.
    review_required: bool | None = None


class Sender(Strict):
    """The From and Reply-To of every message."""

    name: DisplayName
    address: Address
    reply_to: Address | None = None
    # A mailbox that treats any message to it as an unsubscription (List-Unsubscribe mailto).
    unsubscribe_address: Address | None = None


class Colours(Strict):
    """Brand colours, light and dark."""

    brand: Colour = "#0f4c81"
    text: Colour = "#1f2328"
    muted: Colour = "#5f6b76"
    background: Colour = "#f3f1ec"
    paper: Colour = "#ffffff"
    rule: Colour = "#e3ded3"
    dark_brand: Colour = "#8ab8ff"
    dark_text: Colour = "#e8e6e3"
    dark_muted: Colour = "#a9b1ba"
    dark_background: Colour = "#111315"
    dark_paper: Colour = "#1c1f22"
    dark_rule: Colour = "#33383d"


KindLabel = str  # a section's default label; "" means none


class Labels(Strict):
    """Every piece of text the templates show readers, in the newsletter's language."""

    # Labels keep their spaces: French puts a no-break space before ":" (" : ").
    model_config = ConfigDict(str_strip_whitespace=False)

    # The default label of each kind of section (an issue's `label:` replaces it).
    event: KindLabel
    special: KindLabel
    essentials: KindLabel
    expert: KindLabel
    letter: KindLabel
    story: KindLabel = ""
    text: KindLabel = ""
    quote: KindLabel = ""
    separator: Text
    read_more: KindLabel
    sources: KindLabel
    byline: Text
    reading_time: Text
    share: Text
    quote_marks: Text
    quote_separator: Text
    ps: KindLabel
    view_in_browser: Text
    unsubscribe: Text
    sent_to: Text
    expert_author: Text
    web_notice: Text
    archive: Text
    feed: Text
    unsubscribe_question: Text
    unsubscribe_button: Text
    unsubscribed: Text
    unsubscribe_invalid: Text
    preferences: Text
    subscribe: Text
    subscribe_intro: Text
    subscribe_email: Text
    subscribe_name: Text
    subscribe_choose: Text
    subscribe_sent: Text
    subscribe_invalid_email: Text
    subscribe_no_choice: Text
    subscribe_unavailable: Text
    confirm_subject: Line
    confirm_text: Text
    confirm_button: Text
    confirm_ignore: Text
    confirm_question: Text
    confirmed: Text
    confirm_invalid: Text
    reader_title: Text
    reader_intro: Text
    reader_subscribed: Text
    reader_not_subscribed: Text
    reader_stopped: Text
    reader_leave: Text
    reader_join: Text
    reader_saved: Text
    reader_invalid: Text


# Labels of an earlier version, and what replaced them.
RETIRED_LABELS = {
    "caption_credit": "captions and credits are now shown as the issue writes them",
    "credit_only": "captions and credits are now shown as the issue writes them",
}


class Paths(Strict):
    """Where the editors' files live, relative to the settings file."""

    issues: str = "issues"
    # Templates of the newsletter's own, file by file over the built-in theme (a file
    # not there is the theme's); the folder need not exist.
    templates: str = "templates"
    output: str = "out"
    # Images resized for readers, made once: safe to delete.
    cache: str = ".cache"


class Images(Strict):
    """How readers get the issue's pictures."""

    # "embed": inside each message (nothing to publish; every reader downloads them all);
    # "host": linked from the archive's page of the issue (`qant-mail archive` publishes
    # them under base_url), which makes messages several times smaller.
    mode: Literal["embed", "host"] = "embed"


class Preview(Strict):
    """The sample subscriber that fills the per-recipient values of a preview."""

    sample_name: str = "Camille Lecteur"
    sample_email: Address = "lecteur@example.com"


class Lint(Strict):
    """Thresholds of `qant-mail check` for the email an inbox receives."""

    # Gmail clips a message whose HTML passes about 102 KB: stay clear of it. The error
    # weighs the HTML as written; the warning, as the message carries it (quoted-
    # printable, a few KB more), which is what Gmail counts.
    html_error_bytes: Annotated[int, Field(gt=0)] = 100_000
    html_warning_bytes: Annotated[int, Field(gt=0)] = 90_000
    # The whole message, images included when embedded: every reader downloads it, and
    # relays refuse big ones (Postfix's default limit is 10,240,000 bytes).
    message_warning_bytes: Annotated[int, Field(gt=0)] = 1_000_000
    message_error_bytes: Annotated[int, Field(gt=0)] = 10_000_000
    subject_max_chars: Annotated[int, Field(gt=0)] = 80
    preheader_max_chars: Annotated[int, Field(gt=0)] = 150


class Smtp(Strict):
    """The relay that carries the messages (password: QANT_SMTP_PASSWORD)."""

    host: Text = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 587
    # "tls": implicit TLS (port 465); "starttls": upgrade after connecting (587);
    # "none": plain, for a relay on this machine or the local test inbox.
    security: Literal["tls", "starttls", "none"] = "starttls"
    verify_certificates: bool = True
    # A PEM file of certificate authorities to trust besides the system's: a relay whose
    # certificate a private CA signed. Relative to this file.
    ca_file: str = ""
    username: str = ""
    # A login over a plain connection sends the password in clear: refused unless the
    # relay is on this machine, or this says the network is trusted.
    allow_plaintext_login: bool = False
    timeout: Annotated[float, Field(gt=0)] = 30.0
    # The longest one message may take, replies included: past it, the message is
    # `unknown` (after its data) or tried again, and the connection is closed.
    message_timeout: Annotated[float, Field(gt=0)] = 120.0
    connections: Annotated[int, Field(ge=1, le=64)] = 4
    # Relays tried in order when this one cannot be reached, refuses the connection
    # (421, a TLS failure) or stops answering in the middle of a send: "host:port", with
    # the same security, login and certificates as this one.
    fallback: list[Relay] = Field(default_factory=list)
    helo_name: str = ""
    # Where bounces go (the envelope sender); the From address when empty.
    return_path: Address | None = None


class Sending(Strict):
    """How fast, and how stubbornly, to send (0 means no limit)."""

    per_second: Annotated[float, Field(ge=0)] = 0
    per_hour: Annotated[int, Field(ge=0)] = 0
    per_day: Annotated[int, Field(ge=0)] = 0
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    retry_after_seconds: Annotated[float, Field(ge=0)] = 60.0
    # Several senders on one send (PostgreSQL): a sender renews its hold on the rows it
    # is sending every third of this; a sender silent for this long is taken for dead,
    # and the others send its rows.
    lease_seconds: Annotated[float, Field(ge=0.5, le=3600)] = 60.0


class Bounces(Strict):
    """Where bounces come back, and when an address counts as gone."""

    # A mailbox of yours (bounces@your-domain): each message's return path becomes
    # bounces+TOKEN@your-domain (VERP), which names the message a bounce is about.
    # Empty: the return path is smtp.return_path, or the sender's address.
    address: Address | None = None
    # Temporary failures (a full mailbox) seen in this many sends mark the address gone.
    soft_limit: Annotated[int, Field(ge=1, le=100)] = 3


def _store_url(value: str) -> str:
    value = value.strip()
    if not value:
        return value
    if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError(
            f"{value!r}: a store URL is sqlite:///PATH or postgresql://USER@HOST/DATABASE"
        )
    if re.search(r"://[^/@]*:[^/@]*@", value):
        raise ValueError(
            "the URL holds a password: secrets do not belong in the settings file; set "
            "QANT_STORE_PASSWORD (or QANT_STORE_PASSWORD_FILE) in the environment instead"
        )
    return value


class Store(Strict):
    """Where subscribers and the send ledger live: a SQLite file, or PostgreSQL."""

    path: str = "data/subscribers.db"
    # "sqlite:///data/subscribers.db" (relative to this file; sqlite:////abs for an
    # absolute path), or "postgresql://USER@HOST:PORT/DATABASE" (password:
    # QANT_STORE_PASSWORD, or libpq's own PGPASSWORD and ~/.pgpass). Empty: `path`.
    url: Annotated[str, AfterValidator(_store_url)] = ""
    # How long a sender waits for the database to come back (a server restarting, a
    # connection cut, a full disk) before it stops, leaving its rows for a re-run.
    reconnect_seconds: Annotated[float, Field(ge=0, le=3600)] = 60.0


class Dkim(Strict):
    """DKIM signing: an RSA key (QANT_DKIM_PRIVATE_KEY[_FILE]) under `selector`, an
    Ed25519 one (QANT_DKIM_ED25519_PRIVATE_KEY[_FILE]) under `ed25519_selector`, or both."""

    selector: str = ""
    ed25519_selector: str = ""
    domain: str = ""
    # Without a signature, Gmail and Yahoo treat a bulk sender as suspect and ignore
    # one-click unsubscription: a send to a relay elsewhere is refused unless this is
    # turned off on purpose. (The local test inbox needs none.)
    required: bool = True


class Signup(Strict):
    """The public signup form: double opt-in, and its limits against abuse."""

    # How long a confirmation link works.
    confirm_hours: Annotated[float, Field(gt=0, le=24 * 30)] = 48
    # Confirmation mails one address may receive in a day, however often it is entered.
    per_address_per_day: Annotated[int, Field(ge=1, le=100)] = 3
    # Signup requests one client (IP address) may make in an hour.
    per_client_per_hour: Annotated[int, Field(ge=1, le=10_000)] = 10
    # Behind a reverse proxy, the client is the last address of X-Forwarded-For, which
    # only a proxy you run may be trusted to write.
    trust_proxy: bool = False


class Audience(Strict):
    """What is counted of readers: only ever counts, never who."""

    # Each link of an issue goes through base_url/l/ISSUE/N, which adds one to that
    # link's count of the day and redirects: no reader, no cookie, no address kept.
    count_clicks: bool = False


class Review(Strict):
    """Approval before a send to the list."""

    # A send to the list needs an approval (`qant-mail approve`) of exactly what goes
    # out; a newsletter may say otherwise for itself (its `review_required`).
    required: bool = False


def _nameserver(value: str) -> str:
    value = value.strip()
    if value:
        nameserver_address(value)
    return value


def nameserver_address(value: str) -> tuple[str, int]:
    """Return the address and port of a DNS server written "IP", "IP:port" or
    "[IPv6]:port" (port 53 when left out); raise ValueError for anything else."""
    host, port = value, "53"
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") if rest.startswith(":") else rest or "53"
    elif value.count(":") == 1:  # more than one: an IPv6 address without a port
        host, port = value.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError as err:
        raise ValueError(
            f"{value!r} is not a DNS server's IP address, with a port if not 53 "
            "(like 9.9.9.9, 127.0.0.1:5353 or [::1]:5353)"
        ) from err
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: the port of a DNS server is 1 to 65535")
    return host, int(port)


class Doctor(Strict):
    """What `qant-mail doctor` asks of the network before a send."""

    # The DNS server asked: "IP", "IP:port" or "[IPv6]:port" (a resolver of your own,
    # one that sees what the world sees). Empty: the system's.
    nameserver: Annotated[str, AfterValidator(_nameserver)] = ""
    # The longest a DNS query, a web request or a step with the relay may take.
    timeout: Annotated[float, Field(gt=0, le=300)] = 10.0
    # How long a link that answered well is not asked again (kept under paths.cache);
    # 0: every link is asked at every run. A broken link is always asked again.
    link_cache_hours: Annotated[float, Field(ge=0, le=24 * 30)] = 24.0


def _left_out() -> Any:
    """Return the default of a table: validated as an empty one when left out."""
    # Not a default instance (`Colours()`): built at import, it would build its class's
    # validator there, which the validator of the whole file does not use, for every
    # command, the ones that read no settings too.
    return Field(default_factory=dict, validate_default=True)


class SettingsFile(Strict):
    """The schema of `qant.toml`."""

    newsletter: Newsletter
    # More newsletters of the same house: each [newsletters.NAME] table takes the keys
    # of [newsletter] (and [newsletters.NAME.sender], .labels, .colours), inheriting
    # what it does not set from the main newsletter. Validated in `_editions`.
    newsletters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    sender: Sender
    colours: Colours = _left_out()
    labels: Labels
    signup: Signup = _left_out()
    paths: Paths = _left_out()
    preview: Preview = _left_out()
    lint: Lint = _left_out()
    images: Images = _left_out()
    smtp: Smtp = _left_out()
    sending: Sending = _left_out()
    bounces: Bounces = _left_out()
    store: Store = _left_out()
    dkim: Dkim = _left_out()
    doctor: Doctor = _left_out()
    review: Review = _left_out()
    audience: Audience = _left_out()


class _Edition(Strict):
    """One newsletter's own settings, as validated."""

    newsletter: Newsletter
    sender: Sender
    labels: Labels
    colours: Colours


@dataclass(frozen=True)
class Edition:
    """What differs from one newsletter of the installation to another."""

    newsletter: Newsletter
    sender: Sender
    labels: Labels
    colours: Colours

    @property
    def archive_url(self) -> str:
        """Return the address of the newsletter's archive (its issues' pages, its feed)."""
        path = self.newsletter.archive_path
        return f"{self.newsletter.base_url}/{path}" if path else self.newsletter.base_url

    @property
    def list_id(self) -> str:
        """Return the label of its List-Id header."""
        if self.newsletter.list_id:
            return self.newsletter.list_id
        local, _, domain = self.sender.address.partition("@")
        if self.newsletter.id == DEFAULT_NEWSLETTER:
            return f"{local}.{domain}"
        return f"{self.newsletter.id}.{local}.{domain}"


@dataclass(frozen=True)
class Settings:
    """Validated settings, with the folder they are relative to: those of one newsletter
    of the installation (`newsletter`, `sender`, `labels`, `colours`), the main one unless
    `for_newsletter` chose another, and what all of them share."""

    path: Path
    newsletter: Newsletter
    sender: Sender
    colours: Colours
    labels: Labels
    paths: Paths
    preview: Preview
    lint: Lint
    images: Images
    smtp: Smtp
    sending: Sending
    bounces: Bounces
    store: Store
    dkim: Dkim
    signup: Signup = dc_field(default_factory=Signup)
    doctor: Doctor = dc_field(default_factory=Doctor)
    review: Review = dc_field(default_factory=Review)
    audience: Audience = dc_field(default_factory=Audience)
    # Every newsletter of the installation by key, the main one first.
    editions: Mapping[str, Edition] = dc_field(default_factory=dict, compare=False)

    @property
    def main_id(self) -> str:
        """Return the key of the main newsletter: the one issues belong to by default."""
        return next(iter(self.editions), self.newsletter.id)

    @property
    def edition(self) -> Edition:
        """Return this newsletter's own settings."""
        return Edition(self.newsletter, self.sender, self.labels, self.colours)

    def for_newsletter(self, key: str | None) -> Settings:
        """Return the settings seen by newsletter `key` (None: the main one)."""
        key = key or self.main_id
        if key == self.newsletter.id:
            return self
        edition = self.editions.get(key)
        if edition is None:
            known = ", ".join(self.editions) or self.newsletter.id
            raise ConfigError(f"{self.path}: no newsletter {key!r} (known: {known})")
        return replace(
            self,
            newsletter=edition.newsletter,
            sender=edition.sender,
            labels=edition.labels,
            colours=edition.colours,
        )

    def all_newsletters(self) -> list[Settings]:
        """Return the settings of each newsletter, the main one first."""
        return [self.for_newsletter(key) for key in self.editions or [self.newsletter.id]]

    @property
    def archive_url(self) -> str:
        """Return the address of this newsletter's archive."""
        return self.edition.archive_url

    @property
    def review_required(self) -> bool:
        """Return whether a send of this newsletter to its list needs an approval."""
        own = self.newsletter.review_required
        return self.review.required if own is None else own

    @property
    def root(self) -> Path:
        """Return the project folder: the one holding the settings file."""
        return self.path.parent

    @property
    def issues_dir(self) -> Path:
        """Return the folder of the editors' YAML files."""
        return self.root / self.paths.issues

    @property
    def templates_dir(self) -> Path:
        """Return the folder of the newsletter's own templates (it may not exist: the
        built-in theme then serves every file)."""
        return self.root / self.paths.templates

    @property
    def templates_required(self) -> bool:
        """Return whether the settings name a templates folder, which must then exist."""
        return "templates" in self.paths.model_fields_set and self.paths.templates != "templates"

    @property
    def cache_dir(self) -> Path:
        """Return the folder of what is made once and kept (resized images)."""
        return self.root / self.paths.cache

    @property
    def output_dir(self) -> Path:
        """Return the folder `render` writes to by default."""
        return self.root / self.paths.output

    @property
    def store_path(self) -> Path | str:
        """Return the database of subscribers and sends: a SQLite file, or the URL of a
        PostgreSQL database (without its password)."""
        url = self.store.url
        if url.startswith(("postgresql://", "postgres://")):
            return url
        if url.startswith("sqlite:///"):
            return self.root / url.removeprefix("sqlite:///")
        return self.root / self.store.path

    @property
    def sender_domain(self) -> str:
        """Return the domain of the sender's address, for Message-IDs and List-Id."""
        return self.sender.address.rpartition("@")[2]

    @property
    def relays(self) -> tuple[tuple[str, int], ...]:
        """Return the relays of this newsletter's messages, (host, port) in the order
        they are tried: its own, or [smtp]'s host and then its fallbacks."""
        written = self.newsletter.relays or [
            f"{self.smtp.host}:{self.smtp.port}",
            *self.smtp.fallback,
        ]
        found: list[tuple[str, int]] = []
        for relay in written:
            parts = _RELAY.fullmatch(relay)
            assert parts is not None  # validated when the settings were read
            found.append((parts["host"].strip("[]"), int(parts["port"] or self.smtp.port)))
        return tuple(dict.fromkeys(found))


def find_config(start: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Return the settings file: `$QANT_CONFIG`, or `qant.toml` here or in a parent folder."""
    env = os.environ if env is None else env
    if explicit := env.get("QANT_CONFIG"):
        return Path(explicit)
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / CONFIG_NAME
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no {CONFIG_NAME} in {here} or its parent folders; run from the project "
        "folder, or pass --config (or set QANT_CONFIG)"
    )


def load_settings(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the settings file, applying environment overrides."""
    env = os.environ if env is None else env
    raw = _read_toml(path)
    sources: dict[tuple[str, str], str] = {}
    _refuse_secrets(path, raw)
    _apply_env(raw, env, sources)
    locale = raw.get("newsletter", {}).get("locale", "fr") if isinstance(raw, dict) else "fr"
    labels = raw.get("labels", {})
    own_labels = dict(labels) if isinstance(labels, dict) else {}
    if isinstance(labels, dict):
        _refuse_retired_labels(path, labels)
        raw["labels"] = {**_builtin_labels(locale), **labels}
    try:
        data = SettingsFile.model_validate(raw)
    except ValidationError as err:
        lines = []
        for problem in readable_errors(err, SettingsFile):
            where = sources.get(tuple(map(str, problem.loc[:2])))  # type: ignore[arg-type]
            origin = f"{where} (environment)" if where else f"{path}: {problem.dotted}"
            lines.append(f"{origin}: {problem.message}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from err
    for what in ("html", "message"):
        warning, error = f"{what}_warning_bytes", f"{what}_error_bytes"
        if getattr(data.lint, warning) > getattr(data.lint, error):
            raise ConfigError(f"{path}: lint.{warning} is above lint.{error}")
    editions = _editions(path, raw, data, own_labels)
    main = editions[data.newsletter.id]
    return Settings(
        path=path.resolve(),
        newsletter=main.newsletter,
        sender=data.sender,
        colours=data.colours,
        labels=data.labels,
        paths=data.paths,
        preview=data.preview,
        lint=data.lint,
        images=data.images,
        smtp=data.smtp,
        sending=data.sending,
        bounces=data.bounces,
        store=data.store,
        dkim=data.dkim,
        signup=data.signup,
        doctor=data.doctor,
        review=data.review,
        audience=data.audience,
        editions=editions,
    )


# What each newsletter sets for itself, never inherited from the main one.
_OWN_KEYS = ("description", "welcome", "list_id", "archive_path", "relays")
_SUBTABLES = ("sender", "labels", "colours")


def _editions(
    path: Path, raw: dict[str, Any], data: SettingsFile, base_labels: dict[str, Any]
) -> dict[str, Edition]:
    """Return every newsletter's own settings: the main one, then each [newsletters.NAME]
    with what it does not set taken from the main one."""
    main_newsletter = data.newsletter
    if main_newsletter.archive_path is None:
        main_newsletter = main_newsletter.model_copy(update={"archive_path": ""})
    editions = {
        main_newsletter.id: Edition(main_newsletter, data.sender, data.labels, data.colours)
    }
    base = {k: v for k, v in raw.get("newsletter", {}).items() if k not in (*_OWN_KEYS, "id")}
    problems: list[str] = []
    for key, table in data.newsletters.items():
        where = f"{path}: newsletters.{key}"
        if not re.fullmatch(NEWSLETTER_ID, key):
            problems.append(f"{where}: a newsletter's key is lower-case letters, digits and -")
            continue
        if key in editions:
            problems.append(f"{where}: the key {key!r} is the main newsletter's already")
            continue
        own = {k: v for k, v in table.items() if k not in _SUBTABLES}
        if "id" in own:
            problems.append(f"{where}.id: the key of the table is the newsletter's id")
            continue
        merged = {**base, **own, "id": key}
        merged.setdefault("archive_path", key)
        locale = merged.get("locale", "fr")
        labels = dict(_builtin_labels(locale))
        if locale == data.newsletter.locale:
            # The main newsletter's wording, unless this one speaks another language.
            labels.update(base_labels)
        candidate = {
            "newsletter": merged,
            "sender": {**data.sender.model_dump(exclude_none=True), **table.get("sender", {})},
            "labels": {**labels, **table.get("labels", {})},
            "colours": {**data.colours.model_dump(), **table.get("colours", {})},
        }
        try:
            edition = _Edition.model_validate(candidate)
        except ValidationError as err:
            for problem in readable_errors(err, _Edition):
                loc = list(map(str, problem.loc))
                dotted = ".".join(loc[1:] if loc[:1] == ["newsletter"] else loc)
                problems.append(f"{where}.{dotted}: {problem.message}")
            continue
        editions[key] = Edition(edition.newsletter, edition.sender, edition.labels, edition.colours)
    if problems:
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems))
    return editions


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: settings file not found") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 ({err.reason} at byte {err.start})") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err


def _refuse_secrets(path: Path, raw: dict[str, Any], prefix: str = "") -> None:
    for section, values in raw.items():
        if not isinstance(values, dict):
            continue
        for key, value in values.items():
            if key.lower() in SECRETS:
                raise ConfigError(
                    f"{path}: {prefix}{section}.{key}: secrets do not belong in the settings "
                    f"file; set {SECRETS[key.lower()]} (or {SECRETS[key.lower()]}_FILE, a file "
                    "holding it) in the environment instead"
                )
            if isinstance(value, dict):  # [newsletters.NAME.sender] and the like
                _refuse_secrets(path, {key: value}, f"{prefix}{section}.")


def _refuse_retired_labels(path: Path, labels: dict[str, Any]) -> None:
    for key, reason in RETIRED_LABELS.items():
        if key in labels:
            raise ConfigError(f"{path}: labels.{key}: no longer used ({reason}); remove it")
    quote = labels.get("quote")
    if isinstance(quote, str) and "{text}" in quote:
        raise ConfigError(
            f"{path}: labels.quote: now the label above a quote section; the marks around "
            "the quote are `labels.quote_marks` (rename the key)"
        )


def _apply_env(raw: dict[str, Any], env: Mapping[str, str], sources: dict[Any, str]) -> None:
    """Override `section.key` with `QANT_SECTION_KEY` for every key the schema knows."""
    for section, field in SettingsFile.model_fields.items():
        model = field.annotation
        if not isinstance(model, type):
            continue
        for key in getattr(model, "model_fields", {}):
            variable = f"{ENV_PREFIX}{section}_{key}".upper()
            if variable in env:
                target = raw.setdefault(section, {})
                if isinstance(target, dict):
                    target[key] = env[variable]
                    sources[(section, key)] = variable


def _builtin_labels(locale: object) -> dict[str, str]:
    """Return the labels shipped for `locale` (`fr_CA` falls back to `fr`), or none."""
    if not isinstance(locale, str):
        return {}
    for name in (locale.replace("-", "_"), locale.split("_")[0].split("-")[0]):
        candidate = LOCALES_DIR / f"{name}.toml"
        if candidate.is_file():
            with candidate.open("rb") as handle:
                return {str(k): str(v) for k, v in tomllib.load(handle).items()}
    return {}
