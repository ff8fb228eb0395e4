"""`qant-mail stats`: an audience's figures from the counts the store keeps (joins by
source, leaves by way, bounces, each send's outcome), as a terminal view, JSON, and a
static page of charts that loads nothing."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image
from typer.testing import Result

from qant_mail.app import readers, report, subscribers_api
from qant_mail.app import stats as figures
from qant_mail.app.context import Context
from qant_mail.audience import tokens
from qant_mail.base.config import Settings
from qant_mail.store.subscribers import Signups, Status, Subscribers
from tests.browser import needs_chromium
from tests.smtp_server import SmtpServer
from tests.test_send import SECRET, send

if TYPE_CHECKING:
    from playwright.sync_api import Browser

Cli = Callable[..., Result]
SCREENSHOT = Path("/tmp/stats-report.png")


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tokens.SECRET_VARIABLE, SECRET)


@pytest.fixture
def ctx(local: Settings) -> Context:
    return Context(local, secret=SECRET.encode())


def fill(ctx: Context, smtp_server: SmtpServer, tmp_path: Path) -> dict[str, int]:
    """Readers who joined by three roads, a send to them (one address refused), then
    leaves by each way and a bounce; return the readers' numbers."""
    listing = tmp_path / "list.csv"
    listing.write_text("email\n" + "".join(f"r{n}@example.com\n" for n in range(6)))
    readers.import_csv(ctx, listing)
    readers.add(ctx, "cli@example.com")
    with ctx.db() as db:
        signups = Signups(db)
        number = signups.add("form@example.com", "", ["default"], "default", "2026-01-01", 2e9)
        assert number is not None
        pending = signups.get(number)
        assert pending is not None
        signups.confirm(pending, "default")
        people = {s.email: s.id for s in Subscribers(db).all()}
    smtp_server.handler.answers["r5@example.com"] = ["550 5.1.1 user unknown"]
    send(ctx.settings)
    secret = ctx.secret()
    for email, way in (("r0@example.com", "one-click"), ("r1@example.com", "page")):
        assert readers.unsubscribe_by_link(ctx, tokens.make(secret, people[email], email), way)
    mail = b"From: r2@example.com\r\nTo: leave@example.com\r\nSubject: unsubscribe\r\n\r\n"
    assert readers.unsubscribe_by_mail(lambda: ctx, mail, None).ok
    readers.unsubscribe(ctx, "cli@example.com")
    with ctx.db() as db:
        Subscribers(db).set_status("r3@example.com", Status.BOUNCED, "550 user unknown")
    return people


def test_the_figures_count_joins_by_source_leaves_by_way_and_what_each_send_became(
    ctx: Context, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    fill(ctx, smtp_server, tmp_path)
    found = figures.stats(ctx)
    (news,) = found.newsletters
    assert news.active == 2  # r4, form: r5's address was refused, which stops it
    assert news.joined == {"form": 1, "page": 0, "import": 6, "cli": 1, "api": 0, "other": 0}
    left = {"link": 1, "one-click": 1, "page": 0, "mail": 1, "cli": 1, "api": 0, "other": 0}
    assert news.left == left
    assert (news.bounced, news.complained) == (2, 0)
    assert found.by == "day"
    assert found.since == found.until  # the first reader joined today
    (today,) = news.periods
    assert (today.active, today.joins, today.leaves) == (2, 8, 6)
    (sent,) = news.sends
    assert (sent.recipients, sent.delivered, sent.failed) == (8, 7, 1)
    assert sent.unsubscribed == 4  # the bounce is not a leave


def test_an_unsubscription_counts_against_a_send_for_seven_days_only(
    ctx: Context, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    fill(ctx, smtp_server, tmp_path)
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=8)).replace(microsecond=0)
    with ctx.db() as db:
        db.execute(
            "UPDATE subscriptions SET status_changed_at = $1 WHERE status = 'unsubscribed'"
            " AND status_reason = 'one-click'",
            (later.isoformat(),),
        )
    (sent,) = figures.stats(ctx).newsletters[0].sends
    assert sent.unsubscribed == 3


def test_readers_who_joined_before_the_period_are_those_it_begins_with(
    ctx: Context, smtp_server: SmtpServer, tmp_path: Path
) -> None:
    fill(ctx, smtp_server, tmp_path)
    long_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=40)).replace(microsecond=0)
    with ctx.db() as db:  # the import, forty days ago
        db.execute(
            "UPDATE subscriptions SET created_at = $1 WHERE source LIKE 'import%'",
            (long_ago.isoformat(),),
        )
    since = figures.stats(ctx).until - dt.timedelta(days=14)
    found = figures.stats(ctx, since=since, by="week")
    (news,) = found.newsletters
    assert found.since.weekday() == 0  # weeks begin on Mondays
    assert news.active_at_start == 6
    assert [p.active for p in news.periods][-1] == news.active == 2
    assert sum(p.joins for p in news.periods) == 2
    everything = figures.stats(ctx, since=long_ago.date() - dt.timedelta(days=1), by="day")
    assert everything.newsletters[0].active_at_start == 0
    assert sum(p.joined["import"] for p in everything.newsletters[0].periods) == 6


def test_json_holds_each_newsletters_readers_and_each_sends_deliveries(
    ctx: Context, smtp_server: SmtpServer, tmp_path: Path, cli: Cli
) -> None:
    fill(ctx, smtp_server, tmp_path)
    data = json.loads(cli("stats", "--json").stdout)
    (news,) = data["newsletters"]
    assert news["key"] == "default"
    assert news["active"] == 2
    assert news["sends"][0]["issue"] == "2023-11-20"
    assert news["sends"][0]["delivered"] == 7
    assert news["sends"][0]["unsubscribed_within_7_days"] == 4
    assert news["left"]["mail"] == 1


def test_the_terminal_view_shows_periods_with_bars_and_each_send(
    ctx: Context, smtp_server: SmtpServer, tmp_path: Path, cli: Cli
) -> None:
    fill(ctx, smtp_server, tmp_path)
    result = cli("stats", "-n", "default", "--by", "day")
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "2 readers now" in out
    assert "█" in out
    assert "joined by source: form 1, import 6, cli 1" in out
    assert "left by way: link 1, one-click 1, mail 1, cli 1; bounced 2" in out
    assert re.search(r"2023-11-20 +\S+ +8 +7 +█[█▉-▏]* +1 +0 +0 +4\n", out), out
    assert cli("stats", "--by", "month").exit_code != 0
    assert cli("stats", "--since", "yesterday").exit_code != 0


def test_the_report_loads_nothing_from_elsewhere_and_runs_no_script(
    ctx: Context, smtp_server: SmtpServer, tmp_path: Path, cli: Cli
) -> None:
    fill(ctx, smtp_server, tmp_path)
    result = cli("stats", "--html", str(tmp_path / "report"))
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower()
    assert not re.search(r"\son\w+\s*=", page), "no event handler attributes"
    site = ctx.settings.newsletter.base_url
    for url in re.findall(r"""(?:src|href|url\()\s*=?\s*["']?([^"' )>]+)""", page):
        assert not url.startswith(("http:", "https:", "//")) or url.startswith(site), url
    assert "@import" not in page
    assert page.count("<svg") == 3
    assert page.count("<table>") >= 3
    assert '<html lang="fr">' in page
    assert "Les lecteurs au fil du temps" in page
    assert ctx.settings.colours.brand in page


def _pixels_of(shot: bytes, colour: str) -> int:
    wanted = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    colours: list[tuple[int, tuple[int, int, int]]] = (
        image.getcolors(maxcolors=image.width * image.height) or []  # type: ignore[assignment]
    )
    return sum(
        count
        for count, pixel in colours
        if all(abs(a - b) <= 12 for a, b in zip(pixel, wanted, strict=True))
    )


@pytest.mark.browser
@needs_chromium
def test_the_reports_charts_draw_in_a_browser(
    ctx: Context, smtp_server: SmtpServer, tmp_path: Path, browser: Browser
) -> None:
    fill(ctx, smtp_server, tmp_path)
    long_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=20)).replace(microsecond=0)
    with ctx.db() as db:  # some history to draw: half the import three weeks ago
        db.execute(
            "UPDATE subscriptions SET created_at = $1 WHERE source LIKE 'import%'"
            " AND status = 'unsubscribed'",
            (long_ago.isoformat(),),
        )
    found = figures.stats(ctx, since=long_ago.date() - dt.timedelta(days=1), by="day")
    path = report.write_report(ctx, found, tmp_path / "report")
    page = browser.new_page(viewport={"width": 820, "height": 900})
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(path.as_uri())
    boxes = page.eval_on_selector_all(
        "svg.chart",
        "els => els.map(e => [e.getBoundingClientRect().width, e.getBoundingClientRect().height,"
        " e.querySelectorAll('rect, polyline, circle').length])",
    )
    assert len(boxes) == 3
    for width, height, marks in boxes:
        assert width > 600
        assert height > 40
        assert marks > 0
    line = page.eval_on_selector(".line", "e => e.getBBox().width")
    assert line > 500  # the readers' line runs across the chart
    assert requests == [path.as_uri()]  # the page, and nothing else
    shot = page.screenshot(full_page=True)
    SCREENSHOT.write_bytes(shot)
    page.close()
    assert _pixels_of(shot, ctx.settings.colours.brand) > 2000  # the charts, in its colour
    assert _pixels_of(shot, report.BAD["leave"]) > 50
    assert _pixels_of(shot, report.BAD["failed"]) > 20


def test_readers_the_api_adds_and_lets_go_count_as_the_apis(ctx: Context) -> None:
    # The newsletter's website, a CMS or a shop is a source of its own, and a way out.
    consent = subscribers_api.ConsentRecord("shop checkout", "2026-01-01T09:30:00+01:00")
    added = subscribers_api.create(
        ctx, "shop@example.com", "", None, consent=consent, client="127.0.0.1"
    )
    assert added.reader is not None
    subscribers_api.create(ctx, "kept@example.com", "", None, consent=consent, client="x")
    subscribers_api.leave(ctx, added.reader.id)
    (news,) = figures.stats(ctx).newsletters
    assert news.joined["api"] == 2
    assert news.left["api"] == 1
    assert news.active == 1
