"""Pictures: resized to twice their display width and recompressed once; embedded in
each message, or hosted next to the issue's page and linked; the whole message's weight
checked in either mode."""

from __future__ import annotations

import dataclasses
import email
import random
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from PIL import Image

from qant_mail.authoring.archive import build_archive
from qant_mail.authoring.load import load
from qant_mail.authoring.render import Renderer
from qant_mail.base.config import Images, Settings
from qant_mail.delivery.compose import MessageTemplate, Recipient
from tests.conftest import check
from tests.isolated import run_cli

WriteIssue = Callable[..., Path]


def photo(path: Path, width: int, height: int, *, noise: bool = False) -> Path:
    """Write a JPEG photograph-like picture (noise does not compress)."""
    rng = random.Random(width * height)
    if noise:
        data = bytes(rng.randrange(256) for _ in range(width * height * 3))
        picture = Image.frombytes("RGB", (width, height), data)
    else:
        picture = Image.new("RGB", (width, height), (30, 80, 140))
        for x in range(0, width, 40):
            for y in range(0, height, 40):
                colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
                picture.paste(colour, (x, y, x + 20, y + 20))
    picture.save(path, "JPEG", quality=95)
    return path


def hosted(settings: Settings) -> Settings:
    return dataclasses.replace(settings, images=Images(mode="host"))


@pytest.fixture
def issue_with_a_big_photo(project: Path, write_issue: WriteIssue) -> Path:
    photo(project / "issues" / "grande.jpg", 3000, 2000)
    return write_issue(
        """\
        subject: S
        preheader: P
        sections:
          - event:
              title: T
              image: {src: grande.jpg, alt: Une grande photo, caption: Légende}
        """
    )


def test_a_picture_is_sent_at_twice_its_display_width_and_cached(
    project_settings: Settings, issue_with_a_big_photo: Path
) -> None:
    renderer = Renderer(project_settings)
    document = load(issue_with_a_big_photo)
    first = renderer.render(document.issue, key=document.key)
    photo_asset = next(a for a in first.assets if a.source.name == "grande.jpg")
    with Image.open(photo_asset.path) as sent:
        assert sent.size == (1104, 736)  # shown 552 px wide
    original = photo_asset.source.stat().st_size
    assert photo_asset.path.stat().st_size < original / 3
    made_at = photo_asset.path.stat().st_mtime_ns
    again = renderer.render(document.issue, key=document.key)
    cached = next(a for a in again.assets if a.source.name == "grande.jpg")
    assert cached.path == photo_asset.path
    assert cached.path.stat().st_mtime_ns == made_at


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_hosted_pictures_are_links_the_archive_publishes(
    project_settings: Settings, issue_with_a_big_photo: Path, tmp_path: Path
) -> None:
    settings = hosted(project_settings)
    document = load(issue_with_a_big_photo)
    rendered = Renderer(settings).render(document.issue, key=document.key)
    base = f"{settings.newsletter.base_url}/{document.key}/images/"
    sources = {a.name: a.url for a in rendered.assets}
    assert all(url.startswith(base) for url in sources.values())
    assert f'src="{base}grande.jpg"' in rendered.html
    message = parse(
        MessageTemplate(rendered, settings, secret=b"s" * 32).personalise(Recipient("a@b.fr"))
    )
    assert [p.get_content_type() for p in message.walk()] == [
        "multipart/alternative",
        "text/plain",
        "text/html",
    ]
    build_archive(settings, tmp_path / "site")
    published = tmp_path / "site" / document.key / "images" / "grande.jpg"
    assert (
        published.read_bytes()
        == next(a.path for a in rendered.assets if a.name == "grande.jpg").read_bytes()
    )


def test_embedded_pictures_travel_resized_inside_the_message(
    project_settings: Settings, issue_with_a_big_photo: Path
) -> None:
    document = load(issue_with_a_big_photo)
    rendered = Renderer(project_settings).render(document.issue, key=document.key)
    data = MessageTemplate(rendered, project_settings, secret=b"s" * 32).personalise(
        Recipient("a@b.fr")
    )
    images = [p for p in parse(data).walk() if p.get_content_maintype() == "image"]
    jpeg = next(p for p in images if p.get_content_type() == "image/jpeg")
    assert jpeg.get_filename() == "grande.jpg"
    content = jpeg.get_content()
    assert isinstance(content, bytes)
    asset = next(a for a in rendered.assets if a.name == "grande.jpg")
    assert content == asset.path.read_bytes()


def test_the_sample_is_several_times_lighter_with_hosted_images(settings: Settings) -> None:
    from tests.conftest import SAMPLE

    document = load(SAMPLE)
    sizes = {}
    for mode in ("embed", "host"):
        chosen = dataclasses.replace(settings, images=Images(mode=mode))
        rendered = Renderer(chosen).render(document.issue, key=document.key)
        template = MessageTemplate(rendered, chosen, secret=b"s" * 32)
        sizes[mode] = len(template.personalise(Recipient("a@b.fr")))
    assert sizes["host"] < sizes["embed"]


def test_check_weighs_the_whole_message_with_its_images(
    project: Path, project_settings: Settings, write_issue: WriteIssue
) -> None:
    photo(project / "issues" / "bruit.jpg", 1104, 1400, noise=True)
    path = write_issue(
        """\
        subject: S
        preheader: P
        sections:
          - event:
              title: T
              image: {src: bruit.jpg, alt: Du bruit}
        """
    )
    strict = dataclasses.replace(
        project_settings,
        lint=project_settings.lint.model_copy(
            update={"message_warning_bytes": 500_000, "message_error_bytes": 1_000_000}
        ),
    )
    (problem,) = check(path, Renderer(strict)).errors
    assert problem.field == "(email)"
    assert "with its 3 images embedded (the largest, bruit.jpg" in problem.message
    assert 'images] mode = "host"' in problem.message
    # Hosted, the pictures are no longer in the message: nothing to say.
    assert check(path, Renderer(hosted(strict))).problems == []


def test_a_gif_is_sent_as_it_is(project: Path, project_settings: Settings) -> None:
    frames = [Image.new("P", (800, 400), colour) for colour in (1, 2)]
    frames[0].save(project / "issues" / "anime.gif", save_all=True, append_images=frames[1:])
    (project / "issues" / "2024-01-15.yaml").write_text(
        "subject: S\nsections:\n  - event:\n      title: T\n"
        "      image: {src: anime.gif, alt: Une animation}\n"
    )
    document = load(project / "issues" / "2024-01-15.yaml")
    rendered = Renderer(project_settings).render(document.issue, key=document.key)
    gif = next(a for a in rendered.assets if a.name == "anime.gif")
    assert gif.path == gif.source
    assert gif.path.exists()


def test_a_cache_that_cannot_be_written_is_named_not_the_image(
    project: Path, project_settings: Settings, write_issue: WriteIssue
) -> None:
    photo(project / "issues" / "bruit.jpg", 1104, 1400, noise=True)
    path = write_issue(
        "subject: S\npreheader: P\nsections:\n  - event:\n"
        "      title: T\n      image: {src: bruit.jpg, alt: Du bruit}\n"
    )
    (project / ".cache").write_text("a file where the cache folder should be")
    outcome = run_cli(["check", str(path)], cwd=project)
    assert outcome.traceback == ""
    assert outcome.exit_code != 0
    assert f"{project / '.cache' / 'images'}: cannot write the image cache" in outcome.stderr
    assert "[paths] cache" in outcome.stderr
    assert "bruit.jpg" not in outcome.stderr
