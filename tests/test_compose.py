"""The MIME message: built once, spliced per recipient, readable by any mail client."""

from __future__ import annotations

import dataclasses
import email
import random
import re
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest

from qant_mail.app import issues
from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.authoring.render import PLACEHOLDER, RenderedIssue
from qant_mail.base.config import Settings
from qant_mail.delivery.compose import ComposeError, MessageTemplate, Recipient, qp_encode

SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def template(sample_rendered: RenderedIssue, settings: Settings) -> MessageTemplate:
    return MessageTemplate(sample_rendered, settings, secret=SECRET, issue_key="2023-11-20")


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_message_parses_without_defects(template: MessageTemplate) -> None:
    message = parse(template.personalise(Recipient("lea@example.com", "Léa Dupont", 7)))
    for part in message.walk():
        assert part.defects == [], part.get_content_type()
    types = [part.get_content_type() for part in message.walk()]
    assert types[:4] == ["multipart/alternative", "text/plain", "multipart/related", "text/html"]
    assert types[4:] == ["image/png"] * 7  # the logo, its dark-mode variant, five pictures


def test_parts_decode_to_the_filled_render(
    template: MessageTemplate, sample_rendered: RenderedIssue
) -> None:
    recipient = Recipient("lea@example.com", "Léa Dupont", 7)
    message = parse(template.personalise(recipient))
    html, text = sample_rendered.fill(template.values(recipient))
    html_part = message.get_body(("html",))
    text_part = message.get_body(("plain",))
    assert html_part is not None
    assert text_part is not None
    assert html_part.get_content().replace("\r\n", "\n") == html.replace(
        "%%qant:browser_url%%", sample_rendered.web_url
    )
    assert text_part.get_content().replace("\r\n", "\n") == text
    assert not PLACEHOLDER.search(html_part.get_content())


def test_recipients_sharing_a_wrapping_each_read_their_own_values(
    template: MessageTemplate, sample_rendered: RenderedIssue
) -> None:
    # Paragraphs with a per-recipient value are laid out once per length of the values
    # and reused: a reused layout must still carry each reader's own values, and one-
    # character names, spaces, dots and addresses longer than a line take the slow way.
    rng = random.Random(22)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789.-_+"
    recipients = []
    for number in range(1, 300):
        length = rng.choice([1, 5, 12, 12, 12, 30, 70, 90])
        local = "".join(rng.choice(alphabet) for _ in range(length)).strip(".") or "x"
        local = local.replace("..", ".")
        name = rng.choice(["", "L", "Léa Dupont", "Jean-Édouard", "!", "a\tb"])
        recipients.append(Recipient(f"{local}@example.com", name, number * 977))
    for recipient in recipients:
        message = parse(template.personalise(recipient))
        html, text = sample_rendered.fill(template.values(recipient))
        text_part = message.get_body(("plain",))
        html_part = message.get_body(("html",))
        assert text_part is not None
        assert html_part is not None
        assert text_part.get_content().replace("\r\n", "\n") == text, recipient
        assert html_part.get_content().replace("\r\n", "\n") == html.replace(
            "%%qant:browser_url%%", sample_rendered.web_url
        )


def test_images_are_embedded_with_their_content_ids(template: MessageTemplate) -> None:
    message = parse(template.personalise(Recipient("a@example.com")))
    html_part = message.get_body(("html",))
    assert html_part is not None
    html = html_part.get_content()
    for part in message.walk():
        if part.get_content_maintype() == "image":
            content_id = part["Content-ID"].strip("<>")
            assert f"cid:{content_id}" in html
            assert part.get_content()[:8] == b"\x89PNG\r\n\x1a\n"


def test_headers_are_encoded_and_complete(template: MessageTemplate, settings: Settings) -> None:
    data = template.personalise(Recipient("lea@example.com", "Léa Dupont", 7))
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()
    assert re.search(rb"^Subject: =\?utf-8\?", head, re.MULTILINE)
    message = parse(data)
    assert message["Subject"] == "D’OpenAI à Kyutai, une question de gouvernance"
    assert message["To"] == "Léa Dupont <lea@example.com>"
    assert message["From"] == "Qant <lettre@qant.example>"
    assert message["Reply-To"] == "redaction@qant.example"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message["Precedence"] == "bulk"
    assert message["List-Id"] == "Qant <lettre.qant.example>"
    assert message["Date"]
    assert message["Message-ID"].endswith("@qant.example>")


def test_list_unsubscribe_carries_a_signed_opaque_token(template: MessageTemplate) -> None:
    message = parse(template.personalise(Recipient("lea@example.com", "Léa", 7)))
    (url,) = re.findall(r"<(https://[^>]+)>", message["List-Unsubscribe"])
    assert url.startswith("https://lettre.qant.example/unsubscribe/")
    token = url.rsplit("/", 1)[1]
    assert "lea" not in token
    assert tokens.subscriber_id(token) == 7
    assert tokens.verify(SECRET, token, 7, "LEA@example.com")
    assert not tokens.verify(SECRET, token, 7, "someone.else@example.com")
    assert not tokens.verify(b"another secret of enough length", token, 7, "lea@example.com")
    html_part = message.get_body(("html",))
    assert html_part is not None
    assert url in html_part.get_content()


def test_message_id_is_stable_per_issue_and_recipient(template: MessageTemplate) -> None:
    first = parse(template.personalise(Recipient("a@example.com")))["Message-ID"]
    again = parse(template.personalise(Recipient("A@example.com")))["Message-ID"]
    other = parse(template.personalise(Recipient("b@example.com")))["Message-ID"]
    assert first == again != other


def test_no_line_is_too_long_or_starts_with_a_dot(template: MessageTemplate) -> None:
    data = template.personalise(Recipient("a@example.com", "A " * 60))
    lines = data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    _, _, body = data.partition(b"\r\n\r\n")
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    assert not any(line.startswith(b".") for line in lines)
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_test_sends_are_marked_in_the_subject(
    sample_rendered: RenderedIssue, settings: Settings
) -> None:
    template = MessageTemplate(sample_rendered, settings, secret=SECRET, test=True)
    message = parse(template.personalise(Recipient("a@example.com")))
    assert message["Subject"].startswith("[TEST] D’OpenAI")


@pytest.mark.parametrize(
    ("address", "name"),
    [
        ("a@example.com\r\nBcc: victim@example.com", ""),
        ("a@example.com", "Eve\r\nBcc: victim@example.com"),
        ("a@example.com", "Eve\nX-Injected: yes"),
        ("<a@example.com>", ""),
        ("a@example.com, b@example.com", ""),
    ],
)
def test_headers_cannot_be_injected_through_a_recipient(
    template: MessageTemplate, address: str, name: str
) -> None:
    with pytest.raises(ComposeError):
        template.personalise(Recipient(address, name))


def test_names_with_specials_are_quoted_or_encoded(template: MessageTemplate) -> None:
    message = parse(template.personalise(Recipient("a@example.com", 'Dupont, "Jean" <x>')))
    assert message["To"].addresses[0].addr_spec == "a@example.com"
    assert message["To"].addresses[0].display_name == 'Dupont, "Jean" <x>'


def test_quoted_printable_round_trips_random_text() -> None:
    import quopri

    rng = random.Random(20231120)
    alphabet = "ab .=\t\n-é€😀" + "x" * 10
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400)))
        encoded = qp_encode(text.encode(), soft_end=rng.random() < 0.5)
        for line in encoded.split(b"\r\n"):
            assert len(line) <= 76
            assert not line.startswith(b".")
        # Hard line breaks are CRLF on the wire, as MIME wants.
        assert quopri.decodestring(encoded).replace(b"\r\n", b"\n").decode() == text


def test_sample_files_are_written_together(project: Path, project_settings: Settings) -> None:
    out = project / "out"
    written = issues.render_sample(
        Context(project_settings), project / "issues" / "2023-11-20.yaml", out
    )
    assert [p.name for p in written] == ["2023-11-20.html", "2023-11-20.txt", "2023-11-20.eml"]
    page = (out / "2023-11-20.html").read_text()
    assert "lecteur@example.com" in page
    assert 'src="../issues/2023-11-20/sam-altman-prend-la-porte.png"' in page
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)


def test_a_test_send_has_message_ids_of_its_own(
    sample_rendered: RenderedIssue, settings: Settings
) -> None:
    recipient = Recipient("lea@example.com", "Léa")
    real = MessageTemplate(sample_rendered, settings, secret=b"s" * 32, issue_key="2023-11-20")
    first = MessageTemplate(
        sample_rendered, settings, secret=b"s" * 32, issue_key="2023-11-20", test=True
    )
    second = MessageTemplate(
        sample_rendered, settings, secret=b"s" * 32, issue_key="2023-11-20", test=True
    )
    ids = {t.message_id(recipient) for t in (real, first, second)}
    assert len(ids) == 3
    # The real one stays stable: a re-run after a crash gives the same Message-ID.
    again = MessageTemplate(sample_rendered, settings, secret=b"s" * 32, issue_key="2023-11-20")
    assert again.message_id(recipient) == real.message_id(recipient)


def test_no_header_line_is_longer_than_78(template: MessageTemplate) -> None:
    message = template.personalise(Recipient("camille.lecteur-au-long-nom@example.com", "Camille"))
    head = message.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78
    assert b"List-Unsubscribe:\r\n <https://" in head


def test_control_characters_never_reach_a_header(
    sample_rendered: RenderedIssue, settings: Settings
) -> None:
    """Settings refuse them; values that come another way (built in code, a future
    source) are still stripped at the last step."""
    newsletter = settings.newsletter.model_copy(update={"name": "Qa\x07nt\r\nBcc: x"})
    sender = settings.sender.model_copy(update={"name": "Ré\x1bdaction\tQant"})
    hostile = dataclasses.replace(settings, newsletter=newsletter, sender=sender)
    composed = MessageTemplate(sample_rendered, hostile, secret=SECRET, issue_key="2023-11-20")
    head = composed.personalise(Recipient("lea@example.com", "", 7)).split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", head)
    assert b"\nBcc:" not in head
    message = parse(composed.personalise(Recipient("lea@example.com", "", 7)))
    assert message["List-Id"] == "Qant Bcc: x <lettre.qant.example>"
    assert message["From"] == "Rédaction Qant <lettre@qant.example>"


# Subjects an editor may write: the sample's, long French ones, emoji, long words, a word
# too long for any line, plain ASCII too long for one line, text that looks encoded.
SUBJECTS = [
    "D’OpenAI à Kyutai, une question de gouvernance",
    "L’Assemblée nationale adopte définitivement la loi de programmation militaire "
    "après des débats éprouvants sur l’IA",
    "🚀 Mistral lève 600 millions d’euros 🇫🇷🤖 : la pépite française décroche la lune 🌕✨",
    "Anticonstitutionnellement : l’intergouvernementalisation des hyperspécialisations "
    "électroencéphalographiques",
    "Éléphant" * 12,
    "This week at Qant: a plain ASCII subject far too long to fit on one header line at all",
    "Ce sujet contient =?utf-8?q?pas_un_mot?= codé",
]
NAMES = [
    "Léa Dupont",
    "François-Xavier de La Rochefoucauld-Montbel d’Écouen",
    "Zoë 😀 Anaïs",
    "Dupont, Léa",
]


def check_header_lines(head: bytes) -> None:
    """Assert RFC 2047's limits: a line holding an encoded word within 76 characters,
    each encoded word within 75; other lines within 78."""
    for line in head.split(b"\r\n"):
        assert len(line) <= (76 if b"=?" in line else 78), line
    for word in re.findall(rb"=\?[^?\s]+\?[bq]\?[^?\s]*\?=", head, re.IGNORECASE):
        assert len(word) <= 75, word


@pytest.mark.parametrize("test", [False, True])
@pytest.mark.parametrize("subject", SUBJECTS)
def test_encoded_headers_fold_within_76_characters_and_decode_exactly(
    sample_rendered: RenderedIssue, settings: Settings, subject: str, test: bool
) -> None:
    newsletter = settings.newsletter.model_copy(
        update={"name": "Qant — la lettre de l’IA et de la tech, chaque semaine, pour décideurs"}
    )
    sender = settings.sender.model_copy(
        update={"name": "Rédaction de Qant, l’hebdomadaire français de l’intelligence artificielle"}
    )
    config = dataclasses.replace(settings, newsletter=newsletter, sender=sender)
    rendered = dataclasses.replace(sample_rendered, subject=subject)
    template = MessageTemplate(rendered, config, secret=SECRET, test=test)
    for name in NAMES:
        data = template.personalise(
            Recipient("francois-xavier.de-la-rochefoucauld@example.com", name)
        )
        check_header_lines(data.split(b"\r\n\r\n", 1)[0])
        message = parse(data)
        assert message["Subject"] == ("[TEST] " if test else "") + subject
        assert message["To"].addresses[0].display_name == name
        assert message["From"].addresses[0].display_name == sender.name
        assert message["List-Id"] == f"{newsletter.name} <lettre.qant.example>"


@pytest.mark.parametrize("newsletter", ["", "finance"])
def test_a_send_mints_the_tokens_that_one_at_a_time_would(newsletter: str) -> None:
    # A send mints its tokens from a prepared HMAC state; links and Message-IDs must be
    # those the public side checks, made one at a time.
    minter = tokens.Minter(SECRET, newsletter)
    for number in (1, 255, 256, 70_000, 2**40 + 3, 2**63 - 1):
        address = f"Reader.{number}@Example.com"
        assert minter.make(number, address) == tokens.make(SECRET, number, address, newsletter)
        assert minter.make(number, address, tokens.READER) == tokens.make(
            SECRET, number, address, purpose=tokens.READER
        )
        assert minter.message_digest("2023-11-20", address, "ab12") == tokens.message_digest(
            SECRET, "2023-11-20", address, "ab12"
        )
        token = minter.make(number, address)
        assert tokens.verify(SECRET, token, number, address.lower())
