"""Render an issue once: Jinja2 → MJML → HTML (mjml-python) → inlined CSS; and plain text."""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import enum
import hashlib
import html as html_lib
import math
import os
import re
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import css_inline
import jinja2
import mjml
from babel import Locale, UnknownLocaleError
from babel.dates import format_date
from babel.lists import format_list
from babel.numbers import format_decimal
from markupsafe import Markup, escape

from qant_mail.authoring import prose, typography
from qant_mail.authoring.images import ImageFileError, ImageInfo, prepared, probe
from qant_mail.authoring.model import Image, Issue
from qant_mail.base.config import Settings
from qant_mail.base.errors import ConfigError, TemplateError

# The built-in theme: every template, the style sheet, the skeleton of an issue. Inside
# the package, so that an installed qant-mail renders with no file of its own around it.
THEME = Path(__file__).resolve().parent.parent / "theme"
HTML_TEMPLATE = "email.mjml.j2"
TEXT_TEMPLATE = "email.txt.j2"
# The email is 600 px wide; sections have 24 px of padding on each side.
CONTENT_WIDTH = 552
TEXT_WIDTH = 72


class Slot(enum.StrEnum):
    """A per-recipient value: a placeholder in the render, filled for each subscriber."""

    NAME = "name"
    EMAIL = "email"
    UNSUBSCRIBE_URL = "unsubscribe_url"
    PREFERENCES_URL = "preferences_url"  # the reader's page: which newsletters they get
    BROWSER_URL = "browser_url"

    @property
    def token(self) -> str:
        """Return the placeholder written in the rendered HTML and text."""
        # Only characters that HTML escaping, CSS inlining and quoted-printable all leave
        # alone, and that no editor types by accident.
        return f"%%qant:{self.value}%%"


PLACEHOLDER = re.compile(r"%%qant:(" + "|".join(s.value for s in Slot) + r")%%")
# A paragraph of the text part that holds a per-recipient value is wrapped only once that
# value is known (a long address must not push a line past the width): the render marks
# it, as `\x02WIDTH\x1fINDENT\x1fHANGING\x1fTEXT\x03`, and `fill` or compose wrap it. The
# control characters cannot come from an issue or the settings, which refuse them.
DEFERRED_WRAP = re.compile("\x02(\\d+)\x1f([^\x1f]*)\x1f([^\x1f]*)\x1f([^\x03]*)\x03")


def wrap_deferred(text: str) -> str:
    """Wrap the marked paragraphs of a filled text part."""
    return DEFERRED_WRAP.sub(
        lambda m: "\n".join(prose.wrap(m[4], int(m[1]), m[2], m[3])) or m[2].rstrip(), text
    )


@dataclass(frozen=True)
class Asset:
    """A local image of the email: embedded (`cid:`) or hosted next to the issue's page."""

    source: Path  # the file the editor gave
    path: Path  # the file readers get: resized and recompressed (cached), or the source
    name: str  # its name in the issue's `images/` folder on the site
    content_id: str
    mime_type: str
    url: str  # how the HTML refers to it: cid:… when embedded, its address when hosted


@dataclass(frozen=True)
class RenderedIssue:
    """The email of an issue, with placeholders for the per-recipient values."""

    issue: Issue
    subject: str
    preheader: str
    html: str
    text: str
    assets: tuple[Asset, ...]
    words: int
    reading_minutes: int
    reading_time: str  # as the email says it: "7 mn à lire"
    web_url: str
    timings: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    def fill(
        self,
        values: Mapping[Slot, str],
        asset_url: Callable[[Asset], str] | None = None,
    ) -> tuple[str, str]:
        """Return (html, text) for one recipient: placeholders filled, escaped for HTML."""
        html = PLACEHOLDER.sub(lambda m: html_lib.escape(values[Slot(m.group(1))]), self.html)
        text = wrap_deferred(PLACEHOLDER.sub(lambda m: values[Slot(m.group(1))], self.text))
        if asset_url is not None:
            for asset in self.assets:
                html = html.replace(asset.url, html_lib.escape(asset_url(asset)))
        return html, text


# What the HTML part of the render under way typeset, for its text part, by the text:
# most of the texts are the same (a title, the words of a paragraph between two links),
# and typesetting them again was a third of the text part's time.
_TYPESET_ALREADY: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "_TYPESET_ALREADY", default=types.MappingProxyType({})
)


class Typeset(str):
    """Text of the text part already typeset: what a macro or a typesetting filter returns."""

    __slots__ = ()


class _TextContext(jinja2.runtime.Context):
    """A template context whose text macros return `Typeset` text.

    Every value a macro writes has already gone through `finalize`; typesetting its whole
    output again at each level of nesting cost more than the rest of the text render."""

    def call(__self, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        value = super().call(__obj, *args, **kwargs)
        if type(value) is str and isinstance(__obj, jinja2.runtime.Macro):
            return Typeset(value)
        return value


class Renderer:
    """Renders issues with one newsletter's settings and templates (reuse it: it caches)."""

    def __init__(self, settings: Settings, *, compact: bool = True) -> None:
        """Make a renderer; not `compact`, it writes the HTML as MJML and css-inline do."""
        self.settings = settings
        self.compact = compact
        self.hosted = settings.images.mode == "host"
        try:
            self.locale = Locale.parse(settings.newsletter.locale.replace("-", "_"))
        except (UnknownLocaleError, ValueError) as err:
            raise ConfigError(
                f"{settings.path}: newsletter.locale: unknown locale {settings.newsletter.locale!r}"
            ) from err
        own = settings.templates_dir
        if settings.templates_required and not own.is_dir():
            raise ConfigError(f"{settings.path}: paths.templates: no folder {own}")
        # The newsletter's own files first, file by file; the built-in theme for the rest.
        self.template_dirs = [own, THEME] if own.is_dir() else [THEME]
        language = self.locale.language
        self.typeset_html = typography.for_locale(language, html=True)
        self.typeset_text = typography.for_locale(language, html=False)
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(self.template_dirs),
            autoescape=jinja2.select_autoescape(list(_MARKUP_SUFFIXES), default=False),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            auto_reload=True,
            # Compiling the templates costs more than rendering them: keep the bytecode.
            bytecode_cache=_bytecode_cache(),
            # Every value the text template writes gets the locale's typography: issue
            # texts, labels and settings alike. An HTML render is typeset as a whole, once
            # (`_render_template`), where text and attributes can be told apart.
            finalize=self._finalize,
        )
        self.env.context_class = _TextContext
        self.env.filters.update(
            markdown=self._markdown_filter,
            markdown_text=self._markdown_text_filter,
            label=self._label_filter,
            in_language=self._in_language_filter,
            wrap=self._wrap_filter,
            underline=lambda text, char="-": char * min(len(str(text)), TEXT_WIDTH),
        )
        # CSS rules stay in <style> as well as being inlined: @media (the phone layout)
        # and prefers-color-scheme (dark mode) only work from there. Nothing is fetched.
        self.inliner = css_inline.CSSInliner(keep_style_tags=True, load_remote_stylesheets=False)
        self._siblings: dict[str, Renderer] = {settings.newsletter.id: self}

    def for_newsletter(self, key: str | None) -> Renderer:
        """Return the renderer of newsletter `key` of the same installation (None: the
        main one); made once, and kept."""
        key = key or self.settings.main_id
        sibling = self._siblings.get(key)
        if sibling is None:
            sibling = Renderer(self.settings.for_newsletter(key), compact=self.compact)
            sibling._siblings = self._siblings
            self._siblings[key] = sibling
        return sibling

    def render(
        self, issue: Issue, *, key: str | None = None, web: bool = False, archived: bool = True
    ) -> RenderedIssue:
        """Render `issue` to HTML and text, with per-recipient placeholders; `key` names
        its page in the archive (the file name; default: the date); `web` renders that
        page, which carries no subscriber's links; not `archived` (a welcome), the email
        has no page in the archive to link to."""
        timings: dict[str, float] = {}
        key = key or issue.date.isoformat()
        assets: dict[tuple[Path, int], Asset] = {}
        context = self._context(issue, key, _Assets(self, key, assets))
        if not archived:
            context["web_url"] = ""
        context["web"] = web
        typeset: dict[str, str] = {}
        with _timed(timings, "template"):
            source = self._render_template(HTML_TEMPLATE, context, typeset)
        with _timed(timings, "mjml"):
            try:
                raw_html = mjml.mjml2html(source, disable_comments=True)
            except ValueError as err:  # how mjml-python reports invalid MJML
                raise TemplateError(f"{self._path(HTML_TEMPLATE)}: invalid MJML: {err}") from err
        with _timed(timings, "inline"):
            try:
                html = self._inline(raw_html)
            except css_inline.InlineError as err:
                raise TemplateError(f"{self._path(HTML_TEMPLATE)}: invalid CSS: {err}") from err
        with _timed(timings, "text"):
            # The HTML's own rule (an escaped apostrophe) needs an "&": without one, a
            # text comes out of both typographers the same.
            shared = {text: done for text, done in typeset.items() if "&" not in text}
            token = _TYPESET_ALREADY.set(shared)
            try:
                text = _tidy_text(self._render_template(TEXT_TEMPLATE, context))
            finally:
                _TYPESET_ALREADY.reset(token)
        return RenderedIssue(
            issue=issue,
            subject=self.typeset_text(issue.subject),
            preheader=self.typeset_text(issue.preheader),
            html=html,
            text=text,
            assets=tuple(assets.values()),
            words=context["words"],
            reading_minutes=context["reading_minutes"],
            reading_time=context["reading_time"],
            web_url=context["web_url"],
            timings=timings,
        )

    def format_date(self, day: dt.date) -> str:
        """Return `day` written out in the newsletter's language ("lundi 20 novembre 2023")."""
        return format_date(day, format="full", locale=self.locale)

    def format_number(self, number: float) -> str:
        """Return `number` written in the newsletter's language."""
        return str(format_decimal(number, locale=self.locale))

    def format_list(self, items: list[str]) -> str:
        """Return `items` as the language lists them ("A, B et C")."""
        return str(format_list(items, locale=self.locale))

    def render_notice(self, name: str, **context: Any) -> tuple[str, str]:
        """Render a one-off email (a signup's confirmation) from `NAME.mjml.j2` and
        `NAME.txt.j2` with the newsletter's look: HTML (MJML, CSS inlined) and text."""
        values = {**self._look(), **context}
        source = self._render_template(f"{name}.mjml.j2", values)
        try:
            html = self._inline(mjml.mjml2html(source, disable_comments=True))
        except (ValueError, css_inline.InlineError) as err:
            raise TemplateError(f"{self._path(name + '.mjml.j2')}: {err}") from err
        text = _tidy_text(self._render_template(f"{name}.txt.j2", values))
        return html, text

    def _inline(self, html: str) -> str:
        """Inline the style sheets into the HTML MJML wrote, compactly if so made."""
        if not self.compact:
            return self.inliner.inline(html)
        # The same look in fewer bytes. MJML's reset (Outlook's table spacing on `table,
        # td`, `p`, `img`) is for the clients that read <style>, Outlook among them, and
        # MJML does not inline it; inlined, it was repeated on every table and cell:
        # 12 KB of the sample's 86. Each element keeps the inline style of its classes.
        html = _MJML_RESET.sub(_NOT_INLINED, html, count=1)
        html = self.inliner.inline(html).replace(_NOT_INLINED, _MJML_RESET_TAG, 1)
        # What MJML's own minifier does (mergeOutlookConditionnals): Outlook reads the
        # same markup from one comment as from two that touch.
        return _ADJACENT_CONDITIONALS.sub("", html)

    def render_string(self, name: str, **context: Any) -> str:
        """Render another template of the folder (the skeleton of a new issue, say)."""
        return self._render_template(name, context)

    def render_page(self, name: str, **context: Any) -> str:
        """Render a public page (archive, unsubscribe) with the newsletter's look."""
        return self._render_template(name, {**self._look(), **context})

    def _look(self) -> dict[str, Any]:
        """Return what every page and one-off email of the newsletter shows of it."""
        settings = self.settings
        return {
            "archive_url": settings.archive_url,
            "newsletter": settings.newsletter,
            "colours": settings.colours,
            "labels": settings.labels,
            "lang": self.locale.language,
        }

    def _typeset(self, text: str) -> str:
        """Return `text` typeset for the text part: as the HTML part typeset it already,
        if it did."""
        done = _TYPESET_ALREADY.get().get(text)
        return self.typeset_text(text) if done is None else done

    @jinja2.pass_eval_context
    def _finalize(self, eval_ctx: jinja2.nodes.EvalContext, value: Any) -> Any:
        if isinstance(value, str) and not eval_ctx.autoescape and not isinstance(value, Typeset):
            return self._typeset(value)
        return value

    def _markdown_filter(self, text: str, lead: str = "") -> Markup:
        # `lead` is already-escaped HTML from the template (a bold title), never user HTML.
        return Markup(prose.to_html(text, str(lead)))

    def _markdown_text_filter(
        self, text: str, lead: str = "", marker: str = "", width: int = TEXT_WIDTH
    ) -> str:
        return Typeset(
            prose.to_text(
                text,
                width=width,
                lead=self._typeset(lead),
                marker=marker,
                typeset=self._typeset,
            )
        )

    @jinja2.pass_eval_context
    def _label_filter(self, eval_ctx: jinja2.nodes.EvalContext, label: str, **values: Any) -> str:
        """Fill a label's `{…}` fields; in HTML, escape the label and its values alike."""
        if eval_ctx.autoescape:
            return Markup(escape(label)).format(**values)
        return Typeset(self._typeset(label.format(**values)))

    @jinja2.pass_eval_context
    def _in_language_filter(
        self, eval_ctx: jinja2.nodes.EvalContext, text: str, lang: str | None = None
    ) -> str:
        """Mark `text` as written in `lang` when that is not the newsletter's language: in
        HTML a span with its `lang` (screen readers switch voice; the typography leaves
        it alone), in the text part a passage the typography keeps as written."""
        if not lang or lang.split("-")[0].lower() == self.locale.language:
            return text
        if eval_ctx.autoescape:
            return Markup('<span lang="{}">{}</span>').format(lang, text)
        return f"{typography.AS_WRITTEN_OPEN}{text}{typography.AS_WRITTEN_CLOSE}"

    def _wrap_filter(
        self, text: str, width: int = TEXT_WIDTH, indent: str = "", hanging: str | None = None
    ) -> str:
        text = self._typeset(str(text))
        rest = indent if hanging is None else hanging
        if PLACEHOLDER.search(text):
            return Typeset(f"\x02{width}\x1f{indent}\x1f{rest}\x1f{text}\x03")
        return Typeset("\n".join(prose.wrap(text, width, indent, rest)))

    def _path(self, name: str) -> Path:
        """Return the file that template `name` is read from: the newsletter's own, or
        the theme's."""
        for folder in self.template_dirs:
            if (folder / name).is_file():
                return folder / name
        return self.template_dirs[0] / name

    def _render_template(
        self, name: str, context: Mapping[str, Any], typeset: dict[str, str] | None = None
    ) -> str:
        """Render template `name`; an HTML one typeset, each text it typesets put in
        `typeset` if given."""
        try:
            template = self.env.get_template(name)
            output = template.render(context)
        except jinja2.TemplateNotFound as err:
            raise TemplateError(f"{self._path(str(err))}: template not found") from err
        except jinja2.TemplateSyntaxError as err:
            where = err.filename or self._path(name)
            raise TemplateError(f"{where}:{err.lineno}: {err.message}") from err
        except jinja2.TemplateError as err:
            raise TemplateError(f"{_template_frame(err, self._path(name))}: {err}") from err
        # What an autoescaped template writes is markup: typeset between its tags.
        if not _is_markup_template(name):
            return output
        return self.typeset_html.markup(output, typeset)

    def _context(self, issue: Issue, key: str, assets: _Assets) -> dict[str, Any]:
        settings = self.settings
        newsletter = settings.newsletter
        words = _count_words(issue)
        # Rounded to the nearest minute, as the reference issue announced its "7 mn".
        minutes = max(1, math.floor(words / newsletter.words_per_minute + 0.5))
        web_url = f"{settings.archive_url}/{key}/"
        labels = settings.labels
        return {
            "issue": issue,
            # The issue may override the newsletter's fixed texts; "" removes one.
            "tagline": _override(issue.tagline, newsletter.tagline),
            "byline": _override(issue.byline, newsletter.byline),
            "masthead_note": _override(issue.masthead, newsletter.masthead),
            "newsletter": newsletter,
            "sender": settings.sender,
            "colours": settings.colours,
            "labels": labels,
            "lang": self.locale.language,
            "date_long": self.format_date(issue.date),
            "words": words,
            "reading_minutes": minutes,
            "reading_time": labels.reading_time.format(
                minutes=format_decimal(minutes, locale=self.locale)
            ),
            "web_url": web_url,
            "archive_url": settings.archive_url,
            "recipient": {slot.value: slot.token for slot in Slot},
            "logo": self._logo("logo", assets),
            "logo_dark": self._logo("logo_dark", assets),
            "figure": lambda image: self._figure(image, assets),
            "content_width": CONTENT_WIDTH,
            "text_width": TEXT_WIDTH,
        }

    def _logo(self, setting: str, assets: _Assets) -> dict[str, Any] | None:
        logo = getattr(self.settings.newsletter, setting)
        if not logo:
            return None
        alt = self.settings.newsletter.logo_alt or self.settings.newsletter.name
        if logo.startswith("https://"):
            return {"src": logo, "alt": alt, "width": None, "height": None}
        path = self.settings.root / logo
        try:
            info = probe(path)
        except ImageFileError as err:
            raise ConfigError(f"{self.settings.path}: newsletter.{setting}: {err}") from err
        # The logo file is drawn at twice the size it is shown, for sharp high-DPI screens.
        width, height = info.width // 2, info.height // 2
        src = assets.add(path, info, width)
        return {"src": src, "alt": alt, "width": width, "height": height}

    def _figure(self, image: Image, assets: _Assets) -> dict[str, Any]:
        width, height = image.size
        if width and width > CONTENT_WIDTH:
            height = round(height * CONTENT_WIDTH / width) if height else None
            width = CONTENT_WIDTH
        if image.file is not None and image.info is not None:
            src = assets.add(image.file, image.info, width or CONTENT_WIDTH)
        else:
            src = image.src
        return {"src": src, "alt": image.alt, "width": width, "height": height, "image": image}


class _Assets:
    """The local images of one render: each prepared for the width it is shown at (twice
    it, for high-DPI screens), named once in the issue's images folder."""

    def __init__(self, renderer: Renderer, key: str, found: dict[tuple[Path, int], Asset]):
        self.renderer, self.key, self.found = renderer, key, found

    def add(self, path: Path, info: ImageInfo, shown_width: int) -> str:
        """Return how the HTML refers to the image at `path`, shown `shown_width` wide."""
        asset = self.found.get((path, shown_width))
        if asset is not None:
            return asset.url
        settings = self.renderer.settings
        try:
            ready = prepared(path, info, 2 * shown_width, settings.cache_dir / "images")
            digest = _file_digest(ready)
        except OSError as err:
            raise ImageFileError(f"cannot prepare image {path}: {err.strerror}") from err
        name = _unique_name(path.name, {a.name for a in self.found.values()})
        name = name.rsplit(".", 1)[0] + ready.suffix if ready != path else name
        content_id = f"{hashlib.sha256(name.encode() + digest).hexdigest()[:16]}"
        content_id += f"{ready.suffix.lower()}@{settings.sender_domain}"
        if self.renderer.hosted:
            url = f"{settings.archive_url}/{self.key}/images/{quote(name)}"
        else:
            url = f"cid:{content_id}"
        asset = Asset(path, ready, name, content_id, info.mime_type, url)
        self.found[(path, shown_width)] = asset
        return url


_MJML_RESET_TAG = '<style type="text/css">'
_MJML_RESET = re.compile(re.escape(_MJML_RESET_TAG) + r"(?=\s*#outlook a)")
# css-inline leaves a <style> so marked as it is, and inlines none of its rules.
_NOT_INLINED = '<style type="text/css" data-css-inline="ignore">'
_ADJACENT_CONDITIONALS = re.compile(r"<!\[endif\]-->\s*<!--\[if mso \| IE\]>")


def _unique_name(name: str, taken: set[str]) -> str:
    stem, dot, suffix = name.rpartition(".")
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{stem}-{number}{dot}{suffix}"
    return candidate


@contextlib.contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Time a stage of a render, for the benchmark."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = time.perf_counter() - start


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Return a cache of compiled templates in the user's cache folder, if it is writable."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(base) / "qant-mail" / "jinja"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return jinja2.FileSystemBytecodeCache(str(folder))


def _file_digest(path: Path) -> bytes:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError as err:
        raise ImageFileError(f"cannot read image {path}: {err.strerror}") from err


def _count_words(issue: Issue) -> int:
    """Count the words a reader reads: Markdown bodies parsed, one-line texts as they are."""
    return sum(
        prose.words(text) if markdown else prose.plain_words(text)
        for text, markdown in issue.texts()
    )


def _is_markup_template(name: str) -> bool:
    return name.endswith(_MARKUP_SUFFIXES)


_MARKUP_SUFFIXES = ("mjml.j2", "html.j2")


def _override(value: str | None, default: str) -> str:
    return default if value is None else value


def _tidy_text(text: str) -> str:
    # The passages kept as written are typeset: their marks go. `str.translate` looked
    # each character of the text up in a table, a millisecond for the sample's 20 KB.
    if typography.AS_WRITTEN_OPEN in text or typography.AS_WRITTEN_CLOSE in text:
        text = text.replace(typography.AS_WRITTEN_OPEN, "").replace(typography.AS_WRITTEN_CLOSE, "")
    lines = [line.rstrip() for line in text.splitlines()]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip() + "\n"


# Led by what it matches, so that the search jumps to it (`\n{3,}` tried every place).
_BLANK_LINES = re.compile("\n\n\n+")


def _template_frame(err: BaseException, fallback: Path) -> str:
    """Return `template:line` of the template line that raised `err`, from its traceback."""
    tb = err.__traceback__
    where = str(fallback)
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name.endswith(".j2"):
            where = f"{name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where
