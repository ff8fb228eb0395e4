"""`qant-mail stats --html DIR`: the figures as one static page, `DIR/index.html`, with
three charts per newsletter (its readers over time, joins against leaves, the outcome of
each send), each an inline SVG with a title, a description and the table of its figures
under it; in the newsletter's colours and language; no script, nothing loaded.

The charts are plain SVG written here, not a chart library's: those that draw in Python
either draw with JavaScript in the page (Bokeh, Plotly, Altair), or pull in a plotting
stack of their own for three simple shapes (matplotlib: numpy, fonts, a renderer), or are
no longer kept (pygal, last released in 2021; leather). A bar and a line are a few
rectangles and a path: written here, they take the newsletter's colours from CSS (dark
mode included), carry a title per mark, and add no dependency."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Callable, Sequence
from pathlib import Path

from qant_mail.app.context import Context
from qant_mail.app.stats import SOURCES, STOPS, WAYS, NewsletterStats, Period, Stats
from qant_mail.authoring.render import Renderer
from qant_mail.base.config import Colours
from qant_mail.base.files import write_all

# The size of each chart's drawing (it scales to the page's width), and its margins.
WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 40
# Outcomes that are not the brand's: the same in every newsletter, readable on both paper
# colours, told apart by more than hue (each has its legend, its title and its table).
BAD = {"failed": "#c0362c", "bounced": "#d98a00", "leave": "#c4622d"}

# The report's words, in the newsletter's language (French unless it is English); the
# editors read them, not the readers, so they are not among the settings' labels.
LABELS: dict[str, dict[str, str]] = {
    "fr": {
        "title": "{name}\u00a0: les chiffres",
        "period_day": "Du {since} au {until}, jour par jour.",
        "period_week": "Du {since} au {until}, semaine par semaine.",
        "active_now": "lecteurs aujourd’hui",
        "at_start": "{number} au début de la période",
        "audience": "Les lecteurs au fil du temps",
        "audience_desc": "Lecteurs à la fin de chaque période\u00a0: {first} au début, {last} "
        "à la fin.",
        "moves": "Arrivées et départs",
        "moves_desc": "{joins} arrivées, au-dessus de la ligne\u00a0; {leaves} départs "
        "(désinscriptions, adresses en échec, plaintes), en dessous.",
        "sends": "Ce que sont devenus les envois",
        "sends_desc": "Pour chacun des {count} envois\u00a0: remis, revenus en échec, "
        "refusés, en attente.",
        "no_send": "Aucun envoi sur la période.",
        "period": "Période",
        "figures": "Les chiffres, période par période",
        "week_of": "semaine du {date}",
        "readers": "Lecteurs",
        "joins": "Arrivées",
        "leaves": "Départs",
        "issue": "Numéro",
        "sent_on": "Envoyé le",
        "recipients": "Destinataires",
        "delivered": "Remis",
        "bounced": "En échec",
        "failed": "Refusés",
        "waiting": "En attente",
        "complained": "Plaintes",
        "unsubscribed": "Désinscrits sous 7 jours",
        "links": "Liens suivis",
        "links_desc": "Combien de fois chaque lien des envois a été suivi\u00a0: des comptes, "
        "jamais qui.",
        "link": "Lien",
        "clicks": "Clics",
        "joined_by": "Arrivées par origine",
        "left_by": "Départs par moyen",
        "source.form": "formulaire",
        "source.page": "page du lecteur",
        "source.import": "import",
        "source.cli": "ligne de commande",
        "source.api": "API",
        "source.other": "autre",
        "way.link": "lien",
        "way.one-click": "un clic",
        "way.page": "page du lecteur",
        "way.mail": "courriel",
        "way.cli": "ligne de commande",
        "way.api": "API",
        "way.other": "autre",
        "stop.bounced": "adresse en échec",
        "stop.complained": "plainte",
        "untracked": "Ces chiffres sont des comptes que la lettre tient pour servir ses "
        "lecteurs (leurs abonnements, ce que chaque envoi est devenu)\u00a0: ni pixel "
        "espion, ni lien propre à un lecteur, rien qui suive un lecteur.",
    },
    "en": {
        "title": "{name}: the figures",
        "period_day": "From {since} to {until}, day by day.",
        "period_week": "From {since} to {until}, week by week.",
        "active_now": "readers today",
        "at_start": "{number} when the period began",
        "audience": "Readers over time",
        "audience_desc": "Readers at the end of each period: {first} at the start, {last} "
        "at the end.",
        "moves": "Joins and leaves",
        "moves_desc": "{joins} joined, above the line; {leaves} left (unsubscribed, "
        "bounced, complained), below it.",
        "sends": "What became of each send",
        "sends_desc": "For each of the {count} sends: delivered, bounced, refused, waiting.",
        "no_send": "No send in the period.",
        "period": "Period",
        "figures": "The figures, period by period",
        "week_of": "week of {date}",
        "readers": "Readers",
        "joins": "Joined",
        "leaves": "Left",
        "issue": "Issue",
        "sent_on": "Sent on",
        "recipients": "Recipients",
        "delivered": "Delivered",
        "bounced": "Bounced",
        "failed": "Refused",
        "waiting": "Waiting",
        "complained": "Complaints",
        "unsubscribed": "Unsubscribed within 7 days",
        "links": "Links followed",
        "links_desc": "How often each link of the sends was followed: counts, never who.",
        "link": "Link",
        "clicks": "Clicks",
        "joined_by": "Joins by source",
        "left_by": "Leaves by way",
        "source.form": "form",
        "source.page": "reader's page",
        "source.import": "import",
        "source.cli": "command line",
        "source.api": "API",
        "source.other": "other",
        "way.link": "link",
        "way.one-click": "one-click",
        "way.page": "reader's page",
        "way.mail": "email",
        "way.cli": "command line",
        "way.api": "API",
        "way.other": "other",
        "stop.bounced": "bounced",
        "stop.complained": "complaint",
        "untracked": "These figures are counts the newsletter keeps to serve its readers "
        "(their subscriptions, what became of each send): no tracking pixel, no link of "
        "a reader's own, nothing that follows a reader.",
    },
}


def write_report(ctx: Context, found: Stats, folder: Path) -> Path:
    """Write the report of `found` as `folder/index.html`; return its path."""
    path = folder / "index.html"
    write_all({path: render_report(ctx, found).encode("utf-8")})
    return path


def render_report(ctx: Context, found: Stats) -> str:
    """Return the report of `found`: one HTML page, in the main newsletter's look."""
    main = ctx.renderer.for_newsletter(
        found.newsletters[0].key if len(found.newsletters) == 1 else None
    )
    words = _Words(main)
    sections = [
        _section(_Words(ctx.renderer.for_newsletter(n.key)), n, found) for n in found.newsletters
    ]
    title = " · ".join(words("title", name=n.name) for n in found.newsletters)
    return (
        f'<!DOCTYPE html>\n<html lang="{words.language}">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{_e(title)}</title>\n<style>\n{_style(main.settings.colours)}</style>\n"
        f"</head>\n<body>\n<main>\n{''.join(sections)}"
        f'<p class="note">{_e(words("untracked"))}</p>\n</main>\n</body>\n</html>\n'
    )


class _Words:
    """The report's words and numbers in one newsletter's language."""

    def __init__(self, renderer: Renderer) -> None:
        self.renderer = renderer
        locale = renderer.settings.newsletter.locale
        self.language = locale.replace("-", "_").split("_")[0]
        self.labels = LABELS.get(self.language, LABELS["en"])

    def __call__(self, key: str, **values: object) -> str:
        return self.labels[key].format(**values)

    def number(self, value: float) -> str:
        return self.renderer.format_number(value)

    def date(self, day: dt.date) -> str:
        return self.renderer.format_date(day)

    def period(self, period: Period, by: str) -> str:
        day = self.date(period.start)
        return self("week_of", date=day) if by == "week" else day


def _section(words: _Words, found: NewsletterStats, stats: Stats) -> str:
    since, until = words.date(stats.since), words.date(stats.until)
    heading = words("title", name=found.name)
    parts = [
        f'<section aria-labelledby="{found.key}-title">\n'
        f'<h1 id="{found.key}-title">{_e(heading)}</h1>\n'
        f"<p>{_e(words('period_' + stats.by, since=since, until=until))}</p>\n"
        f'<p class="now"><strong>{_e(words.number(found.active))}</strong> '
        f"{_e(words('active_now'))} "
        f"<span>({_e(words('at_start', number=words.number(found.active_at_start)))})</span>"
        "</p>\n",
        _audience(words, found, stats),
        _moves(words, found, stats),
        _sends(words, found),
        _links(words, found),
        "</section>\n",
    ]
    return "".join(parts)


# -- the charts -----------------------------------------------------------------------


def _audience(words: _Words, found: NewsletterStats, stats: Stats) -> str:
    periods = found.periods
    top = _nice(max((p.active for p in periods), default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(i: int) -> float:
        return LEFT + (plot_w / 2 if len(periods) == 1 else plot_w * i / (len(periods) - 1))

    def y(value: int) -> float:
        return TOP + plot_h * (1 - value / top)

    points = [(x(i), y(p.active)) for i, p in enumerate(periods)]
    line = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
    marks = [_grid(words, top, y)]
    if points:
        area = f"{points[0][0]:.1f},{y(0):.1f} {line} {points[-1][0]:.1f},{y(0):.1f}"
        marks.append(f'<polygon class="area" points="{area}"/>')
        marks.append(f'<polyline class="line" points="{line}"/>')
        for (px, py), period in zip(points, periods, strict=True):
            label = f"{words.period(period, stats.by)}: {words.number(period.active)}"
            marks.append(
                f'<circle class="dot" cx="{px:.1f}" cy="{py:.1f}" r="3.5">'
                f"<title>{_e(label)}</title></circle>"
            )
    marks.append(_x_axis(words, periods, x))
    first = periods[0].active if periods else found.active
    description = words("audience_desc", first=words.number(first), last=words.number(found.active))
    table = _table(
        [words("period"), words("readers")],
        [[words.period(p, stats.by), words.number(p.active)] for p in periods],
    )
    return _figure(
        f"{found.key}-audience", words("audience"), description, marks, _folded(words, table)
    )


def _moves(words: _Words, found: NewsletterStats, stats: Stats) -> str:
    periods = found.periods
    top = _nice(max((max(p.joins, p.leaves) for p in periods), default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    middle = TOP + plot_h / 2
    slot = plot_w / max(len(periods), 1)
    bar = max(min(slot * 0.7, 40), 1)

    def x(i: int) -> float:
        return LEFT + slot * (i + 0.5)

    def height(value: int) -> float:
        return plot_h / 2 * value / top

    marks = [
        f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{middle}" y2="{middle}"/>',
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + 4}" text-anchor="end">'
        f"+{_e(words.number(top))}</text>",
        f'<text class="tick" x="{LEFT - 6}" y="{TOP + plot_h}" text-anchor="end">'
        f"−{_e(words.number(top))}</text>",
    ]
    for i, period in enumerate(periods):
        when = words.period(period, stats.by)
        if period.joins:
            h = height(period.joins)
            label = f"{when}: {words.number(period.joins)} {words('joins').lower()}"
            marks.append(
                f'<rect class="join" x="{x(i) - bar / 2:.1f}" y="{middle - h:.1f}" '
                f'width="{bar:.1f}" height="{h:.1f}"><title>{_e(label)}</title></rect>'
            )
        if period.leaves:
            h = height(period.leaves)
            label = f"{when}: {words.number(period.leaves)} {words('leaves').lower()}"
            marks.append(
                f'<rect class="leave" x="{x(i) - bar / 2:.1f}" y="{middle:.1f}" '
                f'width="{bar:.1f}" height="{h:.1f}"><title>{_e(label)}</title></rect>'
            )
    marks.append(_x_axis(words, periods, x))
    joins = sum(p.joins for p in periods)
    leaves = sum(p.leaves for p in periods)
    description = words("moves_desc", joins=words.number(joins), leaves=words.number(leaves))
    table = _table(
        [words("period"), words("joins"), words("leaves")],
        [
            [words.period(p, stats.by), words.number(p.joins), words.number(p.leaves)]
            for p in periods
        ],
    )
    totals = _table(
        [words("joined_by"), ""],
        [[words("source." + s), words.number(found.joined.get(s, 0))] for s in SOURCES],
    ) + _table(
        [words("left_by"), ""],
        [[words("way." + w), words.number(found.left.get(w, 0))] for w in WAYS]
        + [[words("stop." + s), words.number(getattr(found, s))] for s in STOPS],
    )
    legend = _legend([("join", words("joins")), ("leave", words("leaves"))])
    return _figure(
        f"{found.key}-moves",
        words("moves"),
        description,
        marks,
        legend + f'<div class="totals">{totals}</div>' + _folded(words, table),
    )


def _sends(words: _Words, found: NewsletterStats) -> str:
    sends = found.sends
    if not sends:
        return f"<h2>{_e(words('sends'))}</h2>\n<p>{_e(words('no_send'))}</p>\n"
    row, label_w, right = 34, 150, 210  # room on the right for the unsubscriptions
    height = TOP + row * len(sends) + 8
    plot_w = WIDTH - label_w - right
    top = max(max(s.recipients for s in sends), 1)
    marks = []
    kinds = ("delivered", "bounced", "failed", "waiting")
    for i, send in enumerate(sends):
        y = TOP + row * i
        marks.append(
            f'<text class="label" x="{label_w - 8}" y="{y + row / 2 + 4:.1f}" '
            f'text-anchor="end">{_e(send.issue)}</text>'
        )
        x = float(label_w)
        for kind, value in zip(
            kinds, (send.delivered, send.bounced, send.failed, send.other), strict=True
        ):
            if value <= 0:
                continue
            w = plot_w * value / top
            title = f"{send.issue}: {words.number(value)} {words(kind).lower()}"
            marks.append(
                f'<rect class="{kind}" x="{x:.1f}" y="{y + 6}" width="{w:.1f}" '
                f'height="{row - 12}"><title>{_e(title)}</title></rect>'
            )
            x += w
        after = f"{words.number(send.unsubscribed)} {words('unsubscribed').lower()}"
        marks.append(
            f'<text class="tick" x="{x + 6:.1f}" y="{y + row / 2 + 4:.1f}">{_e(after)}</text>'
        )
    description = words("sends_desc", count=words.number(len(sends)))
    legend = _legend([(k, words(k)) for k in kinds])
    columns = [
        *("issue", "sent_on", "recipients", "delivered", "bounced", "failed"),
        *("waiting", "complained", "unsubscribed"),
    ]
    table = _table(
        [words(c) for c in columns],
        [
            [
                s.issue,
                words.date(s.started_at.date()),
                *map(
                    words.number,
                    (
                        s.recipients,
                        s.delivered,
                        s.bounced,
                        s.failed,
                        s.other,
                        s.complained,
                        s.unsubscribed,
                    ),
                ),
            ]
            for s in sends
        ],
    )
    return _figure(f"{found.key}-sends", words("sends"), description, marks, legend + table, height)


def _links(words: _Words, found: NewsletterStats) -> str:
    """Return the counted links of the period's sends: how often each was followed."""
    if not found.links:
        return ""  # not counted ([audience] count_clicks off), or no link yet
    links = sorted(found.links, key=lambda c: (-c.clicks, c.issue, c.number))[:_TOP_LINKS]
    row, label_w = 26, 330
    height = TOP + row * len(links) + 8
    plot_w = WIDTH - label_w - 90
    top = max(max(c.clicks for c in links), 1)
    marks = []
    for i, link in enumerate(links):
        y = TOP + row * i
        shown = link.url.split("://", 1)[-1]
        shown = shown if len(shown) <= 48 else shown[:47] + "…"
        marks.append(
            f'<text class="label" x="{label_w - 8}" y="{y + row / 2 + 4:.1f}" '
            f'text-anchor="end">{_e(link.issue)} · {_e(shown)}</text>'
        )
        w = plot_w * link.clicks / top
        title = f"{link.url}: {words.number(link.clicks)} {words('clicks').lower()}"
        marks.append(
            f'<rect class="delivered" x="{label_w}" y="{y + 5}" width="{w:.1f}" '
            f'height="{row - 10}"><title>{_e(title)}</title></rect>'
        )
        marks.append(
            f'<text class="tick" x="{label_w + w + 6:.1f}" y="{y + row / 2 + 4:.1f}">'
            f"{_e(words.number(link.clicks))}</text>"
        )
    table = _table(
        [words("issue"), words("link"), words("clicks")],
        [[c.issue, c.url, words.number(c.clicks)] for c in found.links],
    )
    description = words("links_desc")
    return _figure(f"{found.key}-links", words("links"), description, marks, table, height)


_TOP_LINKS = 15  # the most followed links drawn; the table lists them all


def _figure(
    ident: str,
    title: str,
    description: str,
    marks: Sequence[str],
    after: str,
    height: int = HEIGHT,
) -> str:
    """Return a chart: its heading, the SVG (titled and described for screen readers),
    and what goes under it."""
    return (
        f'<figure aria-labelledby="{ident}-h">\n<h2 id="{ident}-h">{_e(title)}</h2>\n'
        f'<svg class="chart" id="{ident}" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-labelledby="{ident}-t {ident}-d" preserveAspectRatio="xMinYMin meet">'
        f'<title id="{ident}-t">{_e(title)}</title><desc id="{ident}-d">{_e(description)}</desc>'
        f"{''.join(marks)}</svg>\n<figcaption>{_e(description)}</figcaption>\n{after}</figure>\n"
    )


def _grid(words: _Words, top: int, y: Callable[[int], float]) -> str:
    lines = []
    for value in (0, top // 2, top):
        at = y(value)
        lines.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{at:.1f}" y2="{at:.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{at + 4:.1f}" text-anchor="end">'
            f"{_e(words.number(value))}</text>"
        )
    return "".join(lines)


def _x_axis(words: _Words, periods: Sequence[Period], x: Callable[[int], float]) -> str:
    """Return the dates under a chart: the first and the last period's (dates written
    out take room: two say the span, and each mark has its own title)."""
    if not periods:
        return ""
    y = HEIGHT - BOTTOM + 22
    ends = [(0, "start")] if len(periods) == 1 else [(0, "start"), (len(periods) - 1, "end")]
    return "".join(
        f'<text class="tick" x="{x(i):.1f}" y="{y}" text-anchor="{anchor}">'
        f"{_e(words.date(periods[i].start))}</text>"
        for i, anchor in ends
    )


def _folded(words: _Words, table: str) -> str:
    """Return a long table folded under its chart, opened with a click (no script)."""
    return f"<details><summary>{_e(words('figures'))}</summary>\n{table}</details>\n"


def _legend(items: Sequence[tuple[str, str]]) -> str:
    keys = "".join(
        f'<li><span class="key {kind}" aria-hidden="true"></span>{_e(label)}</li>'
        for kind, label in items
    )
    return f'<ul class="legend">{keys}</ul>\n'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<th scope="row">{_e(c)}</th>' if i == 0 else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


def _nice(value: int) -> int:
    """Return the round number at or above `value` a scale ends at (1, 2, 5, 10, 20…)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if value <= step * factor:
                return step * factor
        step *= 10


def _style(colours: Colours) -> str:
    light = colours.model_dump()
    names = ("brand", "text", "muted", "background", "paper", "rule")
    variables = "".join(f"--{n}: {light[n]}; " for n in names)
    dark = "".join(f"--{n}: {light['dark_' + n]}; " for n in names)
    bad = "".join(f"--{kind}: {colour}; " for kind, colour in BAD.items())
    return (
        f":root {{ {variables}{bad}color-scheme: light dark; }}\n"
        f"@media (prefers-color-scheme: dark) {{ :root {{ {dark}}} }}\n"
        "body { margin: 0; background: var(--background); color: var(--text);"
        " font: 16px/1.5 system-ui, sans-serif; }\n"
        "main { max-width: 780px; margin: 0 auto; padding: 24px 16px; }\n"
        "section, .note { background: var(--paper); border: 1px solid var(--rule);"
        " border-radius: 8px; padding: 8px 24px 16px; margin-bottom: 24px; }\n"
        ".note { color: var(--muted); font-size: 14px; padding: 16px 24px; }\n"
        "h1 { color: var(--brand); font-size: 26px; margin: 16px 0 4px; }\n"
        "h2 { font-size: 19px; margin: 0 0 8px; }\n"
        ".now strong { color: var(--brand); font-size: 32px; }\n"
        ".now span { color: var(--muted); }\n"
        "figure { margin: 32px 0 0; }\n"
        "figcaption { color: var(--muted); font-size: 14px; }\n"
        ".chart { width: 100%; height: auto; display: block; }\n"
        ".chart text { font: 12px system-ui, sans-serif; fill: var(--muted); }\n"
        ".chart .label { fill: var(--text); }\n"
        ".grid { stroke: var(--rule); }\n"
        ".axis { stroke: var(--muted); }\n"
        ".area { fill: var(--brand); fill-opacity: 0.15; }\n"
        ".line { fill: none; stroke: var(--brand); stroke-width: 3; stroke-linejoin: round; }\n"
        ".dot, .join, .delivered { fill: var(--brand); }\n"
        ".leave { fill: var(--leave); }\n"
        ".failed { fill: var(--failed); }\n"
        ".bounced { fill: var(--bounced); }\n"
        ".waiting { fill: var(--rule); }\n"
        ".legend { list-style: none; padding: 0; display: flex; gap: 16px; font-size: 14px; }\n"
        ".key { display: inline-block; width: 12px; height: 12px; margin-right: 6px;"
        " border-radius: 2px; }\n"
        ".key.join, .key.delivered { background: var(--brand); }\n"
        ".key.leave { background: var(--leave); }\n"
        ".key.failed { background: var(--failed); }\n"
        ".key.bounced { background: var(--bounced); }\n"
        ".key.waiting { background: var(--rule); }\n"
        "table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }\n"
        "th, td { padding: 2px 10px 2px 0; text-align: left; border-bottom: 1px solid"
        " var(--rule); }\n"
        "td { text-align: right; font-variant-numeric: tabular-nums; }\n"
        "summary { cursor: pointer; color: var(--brand); margin: 8px 0; }\n"
        ".totals { display: flex; gap: 32px; flex-wrap: wrap; }\n"
    )


def _e(text: str) -> str:
    return html.escape(text, quote=True)
