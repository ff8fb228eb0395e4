"""The schema of an issue: its sections, images, links and sources."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from qant_mail import prose
from qant_mail.images import ImageFileError, ImageInfo, probe
from qant_mail.schema import Strict

_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")
_URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:[^\s<>\"]+")


def _markdown(value: str) -> str:
    found = prose.problems(value)
    if found:
        first = found[0]
        raise PydanticCustomError("markdown", first.message, {"line_offset": first.line})
    return value


def _url(value: str) -> str:
    if not _URL.fullmatch(value):
        raise ValueError(f"{value!r} is not an absolute URL (https://…)")
    return value


def _one_line(value: str) -> str:
    if "\n" in value.strip():
        raise ValueError("must fit on one line")
    return value


Text = Annotated[str, Field(min_length=1), AfterValidator(_one_line)]
OptionalText = Annotated[str, AfterValidator(_one_line)]
Markdown = Annotated[str, AfterValidator(_markdown)]
Url = Annotated[str, AfterValidator(_url)]
Pixels = Annotated[int, Field(gt=0, le=10_000)]


class Link(Strict):
    """A link shown with its text: "Pour en savoir plus" entries and sources."""

    title: Text
    url: Url


class Image(Strict):
    """An illustration: a https URL or a file next to the issue, always with alt text."""

    src: Text
    alt: Text
    caption: OptionalText = ""
    credit: OptionalText = ""
    width: Pixels | None = None
    height: Pixels | None = None
    link: Url | None = None

    _file: Path | None = PrivateAttr(default=None)
    _info: ImageInfo | None = PrivateAttr(default=None)

    @field_validator("src")
    @classmethod
    def _check_src(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("https://"):
            return _url(value)
        if _SCHEME.match(value) and not re.match(r"[a-zA-Z]:[\\/]", value):
            raise ValueError(f"{value!r}: an image is a https:// URL or a file next to the issue")
        relative = PurePosixPath(value.replace("\\", "/"))
        if relative.is_absolute() or ".." in relative.parts or re.match(r"[a-zA-Z]:", value):
            raise ValueError(f"{value!r}: must be a file inside the issue's folder")
        context = info.context if isinstance(info.context, dict) else {}
        base = context.get("base_dir")
        if isinstance(base, Path):
            path = base / relative
            try:
                found = probe(path)
            except ImageFileError as err:
                raise ValueError(str(err)) from None
            context.setdefault("images", {})[value] = (path, found)
        return value

    @model_validator(mode="after")
    def _attach_file(self, info: ValidationInfo) -> Image:
        context = info.context if isinstance(info.context, dict) else {}
        probed = context.get("images", {}).get(self.src)
        if probed:
            self._file, self._info = probed
        return self

    @property
    def file(self) -> Path | None:
        """Return the local file of the image, or None when it is a URL."""
        return self._file

    @property
    def mime_type(self) -> str | None:
        """Return the Content-Type of a local image file."""
        return self._info.mime_type if self._info else None

    @property
    def size(self) -> tuple[int | None, int | None]:
        """Return (width, height): as written, else read from the file, kept in proportion."""
        width, height = self.width, self.height
        if self._info and (width is None or height is None):
            ratio = self._info.height / self._info.width
            if width is None and height is None:
                width, height = self._info.width, self._info.height
            elif width is None and height is not None:
                width = round(height / ratio)
            elif width is not None:
                height = round(width * ratio)
        return width, height


class Figure(Strict):
    """An image placed between paragraphs of a body."""

    image: Image


def _block_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "text"
    if isinstance(value, dict | Figure):
        return "figure"
    return None


Block = Annotated[
    Annotated[Markdown, Tag("text")] | Annotated[Figure, Tag("figure")],
    Discriminator(
        _block_kind,
        custom_error_type="body_block",
        custom_error_message="a body block is Markdown text or an `image:` mapping",
    ),
]


def _as_blocks(value: Any) -> Any:
    # A body is usually one Markdown text; a list is only needed to place images in it.
    return [value] if isinstance(value, str) else value


Body = Annotated[list[Block], BeforeValidator(_as_blocks)]


class Story(Strict):
    """An article: title, lede, an image, a Markdown body and links to read more."""

    title: Text
    lede: Markdown = ""
    image: Image | None = None
    body: Body = Field(default_factory=list)
    links: list[Link] = Field(default_factory=list)


class Quote(Strict):
    """The epigraph."""

    text: Text
    author: OptionalText = ""


class Letter(Strict):
    """A letter from the editor, opening the issue."""

    kicker: OptionalText | None = None
    title: OptionalText = ""
    body: Body
    signature: OptionalText = ""
    ps: Markdown = ""


class Event(Story):
    """The lead story (L'ÉVÉNEMENT)."""

    kicker: OptionalText | None = None


class Special(Strict):
    """A themed set of articles (NUMÉRO SPÉCIAL)."""

    kicker: OptionalText | None = None
    title: Text
    intro: Markdown = ""
    articles: Annotated[list[Story], Field(min_length=1)]


class Essential(Strict):
    """A short news item with its sources."""

    title: Text
    text: Markdown
    sources: list[Link] = Field(default_factory=list)


class Essentials(Strict):
    """Short news (L'ESSENTIEL): an optional lead story, then items."""

    kicker: OptionalText | None = None
    title: OptionalText = ""
    lead: Story | None = None
    items: list[Essential] = Field(default_factory=list)
    # "bullets": a list with each title as a bold lead-in (the reference issue);
    # "blocks": each item under its title as a small heading.
    layout: Literal["bullets", "blocks"] = "bullets"

    @model_validator(mode="after")
    def _not_empty(self) -> Essentials:
        if self.lead is None and not self.items:
            raise ValueError("needs a `lead` story or some `items`")
        return self


class Author(Strict):
    """Who wrote an opinion piece."""

    name: Text
    affiliation: OptionalText = ""


class Expert(Story):
    """An opinion piece (EXPERT)."""

    kicker: OptionalText | None = None
    author: Author


class Issue(Strict):
    """One issue of the newsletter, as an editor writes it."""

    date: dt.date
    subject: Text
    preheader: OptionalText = ""
    title: OptionalText | None = None
    byline: OptionalText | None = None
    intro: Markdown = ""
    draft: bool = False
    share: list[Link] = Field(default_factory=list)
    quote: Quote | None = None
    letter: Letter | None = None
    event: Event
    special: Special | None = None
    essentials: Essentials | None = None
    expert: Expert | None = None

    @model_validator(mode="before")
    @classmethod
    def _date_from_file_name(cls, data: Any, info: ValidationInfo) -> Any:
        context = info.context if isinstance(info.context, dict) else {}
        default = context.get("default_date")
        if isinstance(data, dict) and "date" not in data and default is not None:
            return {"date": default, **data}
        return data

    @property
    def headline(self) -> str:
        """Return the title shown atop the email: `title`, or the subject."""
        return self.title or self.subject

    def images(self) -> list[Image]:
        """Return every image of the issue, in reading order."""
        found: list[Image] = []
        if self.letter:
            found.extend(block.image for block in self.letter.body if isinstance(block, Figure))
        for story in self.stories():
            if story.image:
                found.append(story.image)
            found.extend(block.image for block in story.body if isinstance(block, Figure))
        return found

    def stories(self) -> list[Story]:
        """Return every article of the issue, in reading order."""
        found: list[Story] = [self.event]
        if self.special:
            found.extend(self.special.articles)
        if self.essentials and self.essentials.lead:
            found.append(self.essentials.lead)
        if self.expert:
            found.append(self.expert)
        return found
