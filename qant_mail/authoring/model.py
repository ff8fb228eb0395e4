"""The schema of an issue: an ordered list of sections, with images, links and sources."""

from __future__ import annotations

import datetime as dt
import difflib
import json
import re
import typing
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    StringConstraints,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from qant_mail.authoring import prose
from qant_mail.authoring.images import ImageFileError, ImageInfo, probe
from qant_mail.base.schema import Strict, describe_fields

# The name the schema is published under, next to the issues (`qant-mail new` writes it),
# so that an editor's YAML plugin finds it from the first line of every issue.
SCHEMA_FILE = "issue.schema.json"
_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")
# Characters no editor types on purpose; in a header or a template they break things.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")


def _no_control(value: str) -> str:
    found = _CONTROL.search(value)
    if found:
        raise ValueError(f"contains the control character U+{ord(found.group()):04X}; remove it")
    return value


def _markdown(value: str) -> str:
    _no_control(value)
    found = prose.problems(value)
    if found:
        first = found[0]
        raise PydanticCustomError("markdown", first.message, {"line_offset": first.line})
    return value


def _url(value: str) -> str:
    problem = prose.link_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _one_line(value: str) -> str:
    if "\n" in value.strip() or "\r" in value:
        raise ValueError("must fit on one line")
    return _no_control(value)


# The validators are single objects so that the text walk below can tell fields apart.
_MARKDOWN = AfterValidator(_markdown)
_LINK = AfterValidator(_url)

Text = Annotated[str, Field(min_length=1), AfterValidator(_one_line)]
OptionalText = Annotated[str, AfterValidator(_one_line)]
# Separators and prefixes keep their spaces: " : ", "PS. ", " • ".
Verbatim = Annotated[str, StringConstraints(strip_whitespace=False), AfterValidator(_one_line)]
Markdown = Annotated[str, _MARKDOWN]
Url = Annotated[str, _LINK]
Pixels = Annotated[int, Field(gt=0, le=10_000)]
# A label is the small line above a section: absent, the kind's default from [labels];
# written "", no label at all. Its spaces are the editor's: "Source : " keeps the one that
# separates it from what follows.
Label = Verbatim | None


class Link(Strict):
    """A link shown with its text: "Pour en savoir plus" entries and sources."""

    title: Text
    """The words shown for the link, as written."""
    url: Url
    """Where it leads: https://… (or mailto:…)."""


class Image(Strict):
    """An illustration: a https URL or a file next to the issue, always with alt text."""

    src: Text
    """A file next to the issue (`2024-02-29/schema.png`) or an https:// URL."""
    alt: Text
    """What the picture shows, for those who cannot see it."""
    caption: OptionalText = ""
    """The caption under the picture, exactly as shown (quotes included, if any)."""
    credit: OptionalText = ""
    """Who made the picture, shown after the caption exactly as written: "(Qant avec GPT-4o)"."""
    width: Pixels | None = None
    """Width in pixels; read from a local file when absent."""
    height: Pixels | None = None
    """Height in pixels; read from a local file when absent."""
    link: Url | None = None
    """Where a click on the picture leads."""

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
                raise ValueError(str(err)) from err
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
    def info(self) -> ImageInfo | None:
        """Return the type and size read from a local image file."""
        return self._info

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
    """The illustration, with its alt text, caption and credit."""


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


_BODY = BeforeValidator(_as_blocks, json_schema_input_type=Markdown | list[Block])
Body = Annotated[list[Block], _BODY]


class Story(Strict):
    """An article: label, title, lede, an image, a Markdown body and links to read more."""

    label: Label = None
    """The small line above the title; absent: `labels.story` (none by default); "": none."""
    title: Text
    """The article's headline."""
    lede: Markdown = ""
    """The chapô: the opening paragraph, in bold under the title (Markdown)."""
    image: Image | None = None
    """The illustration under the lede."""
    body: Body = Field(default_factory=list)
    """The text (Markdown), or a list of texts and `image:` blocks to place pictures in it."""
    links_label: Label = None
    """The line above the links; absent: `labels.read_more`; "": none."""
    links: list[Link] = Field(default_factory=list)
    """Links to read more, each `{title, url}`."""


class Event(Story):
    """The lead story (L'ÉVÉNEMENT)."""

    label: Label = None
    """The small line above the title; absent: `labels.event`; "": none."""


class Author(Strict):
    """Who wrote an opinion piece."""

    name: Text
    """Their name."""
    affiliation: OptionalText = ""
    """Where they work, shown after the name."""


class Expert(Story):
    """An opinion piece (EXPERT), with its author named in its label line."""

    label: Label = None
    """The small line above the title; absent: `labels.expert`; "": only the author."""
    author: Author
    """Who wrote it."""


class Special(Strict):
    """A themed set of articles (NUMÉRO SPÉCIAL)."""

    label: Label = None
    """The small line, before the title; absent: `labels.special`; "": none."""
    title: OptionalText = ""
    """The theme, shown after the label."""
    intro: Markdown = ""
    """A presentation of the set (Markdown)."""
    articles: Annotated[list[Story], Field(min_length=1)]
    """The articles of the set, in order."""


class NewsItem(Strict):
    """A short news item: a bold lead-in, its text, its sources, maybe a picture after it."""

    title: Text
    """The lead-in, shown in bold before the text."""
    text: Markdown
    """What there is to know (Markdown)."""
    sources: list[Link] = Field(default_factory=list)
    """Where it comes from, each `{title, url}`."""
    image: Image | None = None
    """An illustration shown after the item."""


class Essentials(Strict):
    """Short news (L'ESSENTIEL): an optional lead story, then items with bold lead-ins."""

    label: Label = None
    """The small line above; absent: `labels.essentials`; "": none."""
    title: OptionalText = ""
    """A heading of its own, under the label (the companies cited, say)."""
    intro: Markdown = ""
    """A lead paragraph, under the heading."""
    lead: Story | None = None
    """A longer story before the items."""
    separator: Verbatim | None = None
    """What stands between a lead-in and its text, spaces included; absent: `labels.separator`."""
    sources_label: Label = None
    """The line above each item's sources; absent: `labels.sources`; "": none."""
    layout: Literal["bullets", "blocks"] = "bullets"
    """"bullets": a list, each lead-in in bold before its text; "blocks": each item under
    its lead-in as a small heading."""
    items: list[NewsItem] = Field(default_factory=list)
    """The news items, in order; none yet while the list is being written."""

    @model_validator(mode="after")
    def _not_empty(self) -> Essentials:
        if not (self.title or self.intro or self.lead or self.items):
            raise ValueError("needs a `title`, an `intro`, a `lead` story or some `items`")
        return self


class Quote(Strict):
    """A quotation and its author: an epigraph, or a word of the week."""

    label: Label = None
    """The small line above; absent: `labels.quote` (none by default); "": none."""
    text: Text
    """The words quoted, without quotation marks: `labels.quote_marks` adds them."""
    author: OptionalText = ""
    """Who said it."""
    layout: Literal["block", "inline"] = "block"
    """"block": the author on a line of their own; "inline": after the quote, on its line."""
    separator: Verbatim | None = None
    """Between the quote and an inline author; absent: `labels.quote_separator` (" • ")."""
    lang: Annotated[str, Field(pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")] | None = None
    """The language of the words quoted, when not the newsletter's ("en"): they keep the
    typography they were written in, and screen readers read them in that language."""


class Letter(Strict):
    """A letter from the editors: salutation, body, closing, signature, PS."""

    label: Label = None
    """The small line above; absent: `labels.letter`; "": none (an unlabeled editorial)."""
    title: OptionalText = ""
    """A title for the letter."""
    salutation: OptionalText = ""
    """How it opens: "Chères lectrices, chers lecteurs,"."""
    body: Body
    """The letter (Markdown), or a list of texts and `image:` blocks."""
    closing: Markdown = ""
    """A closing sentence before the signature ("Écrivez-nous…")."""
    signature: OptionalText = ""
    """Who signs it."""
    ps_label: Verbatim | None = None
    """What opens the PS, as written ("PS. "); absent: `labels.ps`."""
    ps: Markdown = ""
    """A post-scriptum (Markdown)."""
    ps_signature: OptionalText = ""
    """Who signs the PS (initials)."""


class TextBlock(Strict):
    """Free text: an introduction, the week's headlines, an editorial note."""

    label: Label = None
    """The small line above; absent: `labels.text` (none by default); "": none."""
    title: OptionalText = ""
    """A title."""
    body: Body
    """The text (Markdown), or a list of texts and `image:` blocks."""


def _text_block(data: Any) -> Any:
    # `- text: "…"` is the short form of `- text: {body: "…"}`.
    return {"body": data} if isinstance(data, str) else data


class Placement(Strict):
    """A marker: the section takes no fields."""


class _Section(Strict):
    """One section of an issue: a mapping with a single key, its kind."""

    kind: ClassVar[str]

    @property
    def content(self) -> Any:
        """Return what the section holds (an `Event`, a `Quote`…)."""
        return getattr(self, self.kind)


class TextSection(_Section):
    """Free text, with an optional label and title: `- text: "…"`."""

    kind: ClassVar[str] = "text"
    text: Annotated[
        TextBlock, BeforeValidator(_text_block, json_schema_input_type=Markdown | TextBlock)
    ]
    """The text: Markdown, or `{label, title, body}`."""


class QuoteSection(_Section):
    """A quotation: `- quote: {text, author}`."""

    kind: ClassVar[str] = "quote"
    quote: Quote
    """The quotation."""


class LetterSection(_Section):
    """A letter from the editors: `- letter: {salutation, body, signature, ps}`."""

    kind: ClassVar[str] = "letter"
    letter: Letter
    """The letter."""


class EventSection(_Section):
    """The lead story: `- event: {title, lede, image, body, links}`."""

    kind: ClassVar[str] = "event"
    event: Event
    """The lead story."""


class StorySection(_Section):
    """An article under a label of its own, or none (a dossier, an alert…)."""

    kind: ClassVar[str] = "story"
    story: Story
    """The article."""


class SpecialSection(_Section):
    """A themed set of articles: `- special: {title, intro, articles}`."""

    kind: ClassVar[str] = "special"
    special: Special
    """The set."""


class EssentialsSection(_Section):
    """Short news: `- essentials: {title, lead, items}`."""

    kind: ClassVar[str] = "essentials"
    essentials: Essentials
    """The news."""


class ExpertSection(_Section):
    """An opinion piece: `- expert: {author, title, body}`."""

    kind: ClassVar[str] = "expert"
    expert: Expert
    """The piece."""


class MastheadSection(_Section):
    """Where the newsletter's masthead note goes: `- masthead: {}`."""

    kind: ClassVar[str] = "masthead"
    masthead: Placement | None
    """Nothing: the note is `newsletter.masthead`, or the issue's own `masthead`."""


SECTION_TYPES: tuple[type[_Section], ...] = (
    TextSection,
    QuoteSection,
    LetterSection,
    EventSection,
    StorySection,
    SpecialSection,
    EssentialsSection,
    ExpertSection,
    MastheadSection,
)
KINDS = tuple(t.kind for t in SECTION_TYPES)


def _section_kind(value: Any) -> str | None:
    if isinstance(value, _Section):
        return value.kind
    if isinstance(value, dict) and len(value) == 1:
        return str(next(iter(value)))
    return None


def _check_section(value: Any) -> Any:
    """Explain a section that is not a one-key mapping of a known kind."""
    if isinstance(value, _Section):
        return value
    if not isinstance(value, dict) or not value:
        raise PydanticCustomError(
            "section", "a section is a mapping of one kind, such as `- event: {title: …}`"
        )
    keys = [str(key) for key in value]
    kinds = [key for key in keys if key in KINDS]
    if len(kinds) > 1:
        raise PydanticCustomError(
            "section",
            "a section has one kind, this one has {count}: {kinds}; start a new `- ` item for each",
            {"count": len(kinds), "kinds": ", ".join(kinds)},
        )
    if len(keys) > 1:
        others = ", ".join(repr(k) for k in keys if k not in KINDS)
        where = f"inside `{kinds[0]}:` (indent it)" if kinds else "under the section's kind"
        raise PydanticCustomError(
            "section",
            "{others} belongs {where}; a section is `- KIND: {{…}}` with one kind of: {known}",
            {"others": others, "where": where, "known": ", ".join(KINDS)},
        )
    if not kinds:
        close = difflib.get_close_matches(keys[0], KINDS, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"the kinds are: {', '.join(KINDS)}"
        raise PydanticCustomError(
            "section", "unknown section kind {kind}; {hint}", {"kind": repr(keys[0]), "hint": hint}
        )
    return value


Section = Annotated[
    Annotated[TextSection, Tag("text")]
    | Annotated[QuoteSection, Tag("quote")]
    | Annotated[LetterSection, Tag("letter")]
    | Annotated[EventSection, Tag("event")]
    | Annotated[StorySection, Tag("story")]
    | Annotated[SpecialSection, Tag("special")]
    | Annotated[EssentialsSection, Tag("essentials")]
    | Annotated[ExpertSection, Tag("expert")]
    | Annotated[MastheadSection, Tag("masthead")],
    Discriminator(_section_kind),
    BeforeValidator(_check_section),
]


def _issue_schema_extra(schema: dict[str, Any], model: type[BaseModel]) -> None:
    describe_fields(schema, model)
    schema["title"] = "An issue of a qant-mail newsletter"
    # The date may be left to the file's name (2024-02-29.yaml).
    schema["required"] = [name for name in schema.get("required", []) if name != "date"]


# Keys of the first format, when sections had fixed places: say where they went.
_MOVED = {
    "intro": "the introduction is now a section: `sections: [- text: |…]`",
    "quote": "the quote is now a section: `sections: [- quote: {text, author}]`",
    "letter": "the letter is now a section: `sections: [- letter: {body, signature}]`",
    "event": "the event is now a section: `sections: [- event: {title, body}]`",
    "special": "the special is now a section: `sections: [- special: {title, articles}]`",
    "essentials": "the essentials are now a section: `sections: [- essentials: {items}]`",
    "expert": "the expert is now a section: `sections: [- expert: {author, title}]`",
}


class Issue(Strict):
    """One issue of the newsletter, as an editor writes it."""

    model_config = ConfigDict(json_schema_extra=_issue_schema_extra)
    unknown_key_hints: ClassVar[dict[str, str]] = _MOVED

    date: dt.date
    """The day of the issue, YYYY-MM-DD (default: the file's name)."""
    newsletter: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")] | None = None
    """Which newsletter it is an issue of: the NAME of its `[newsletters.NAME]` settings
    (absent: the main newsletter)."""
    subject: Text
    """The subject line."""
    preheader: OptionalText = ""
    """The line inboxes show after the subject (150 characters at most)."""
    title: OptionalText | None = None
    """The headline atop the email; absent: the subject; "": none."""
    tagline: OptionalText | None = None
    """This issue's tagline under the newsletter's title; absent: `newsletter.tagline`."""
    masthead: OptionalText | None = None
    """This issue's masthead note; absent: `newsletter.masthead`; "": none."""
    byline: OptionalText | None = None
    """Who signs the issue ("Par …"); absent: `newsletter.byline`."""
    draft: bool = False
    """`true` while the issue is not ready: `check` warns and the list never gets it."""
    share: list[Link] = Field(default_factory=list)
    """Share links shown under the byline, each `{title, url}`."""
    sections: Annotated[list[Section], Field(min_length=1)]
    """The body of the issue, in order: each item one section, `- KIND: {…}`."""

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
        return self.subject if self.title is None else self.title

    @property
    def places_masthead(self) -> bool:
        """Return whether a section says where the masthead note goes."""
        return any(isinstance(s, MastheadSection) for s in self.sections)

    @property
    def summary(self) -> str:
        """Return the opening text (Markdown) of the issue, or its preheader."""
        for section in self.sections:
            if isinstance(section, TextSection):
                for block in section.text.body:
                    if isinstance(block, str):
                        return block
        return self.preheader

    def images(self) -> list[Image]:
        """Return every image of the issue, in reading order."""
        return [value for _, value in walk(self, ()) if isinstance(value, Image)]

    def texts(self) -> Iterator[tuple[str, bool]]:
        """Yield the texts a reader reads, in order, with whether each is Markdown (alt
        texts and lists of links are left out: they are not read through)."""
        for section in self.sections:
            yield from _texts(section)


def json_schema() -> str:
    """Return the JSON Schema of an issue file (draft 2020-12), for editors' YAML plugins."""
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema"}
    schema.update(Issue.model_json_schema())
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def walk(value: Any, loc: tuple[str | int, ...]) -> Iterator[tuple[tuple[str | int, ...], Any]]:
    """Yield (location, value) for `value` and everything in it, depth first, in order."""
    yield loc, value
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from walk(getattr(value, name), (*loc, name))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from walk(item, (*loc, index))


def _texts(model: BaseModel) -> Iterator[tuple[str, bool]]:
    if isinstance(model, Link):
        return
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _texts(value)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    yield from _texts(item)
                elif isinstance(item, str) and _BODY in info.metadata:
                    yield item, True
        elif isinstance(value, str) and value and _shown_as_text(name, info.annotation, info):
            yield value, _MARKDOWN in info.metadata


def _shown_as_text(name: str, annotation: Any, info: Any) -> bool:
    # Link targets, image files, alt texts and layout choices are not read through.
    return (
        _LINK not in info.metadata
        and name not in ("src", "alt")
        and typing.get_origin(annotation) is not Literal
    )
