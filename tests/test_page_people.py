"""People on the history page (docs/history-page.md, docs/contract.md §6) in Debian's headless Chromium against
`python app.py` with two users: who is signed in, a share link made from the page and opened by someone without
a token, read-only, then revoked from the Shares view, and the activity view listing what happened in order."""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from test_page import Sessions, Tab, browser, rows  # noqa: F401 - `browser` is a fixture of this module too

from users import Users

DAY = 86_400
GONE = "This link does not exist, was revoked or has expired."


def ms_of(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000


def sign_in(tab: Tab, url: str, token: str) -> None:
    from playwright.sync_api import expect

    tab.allow(r"401 \(UNAUTHORIZED\)")  # the first call, before the token is given
    tab.page.goto(url)
    expect(tab.page.locator("#token-dialog")).to_be_visible()
    tab.page.fill("#token-input", token)
    tab.page.keyboard.press("Enter")


def share_from_page(page: Any, seconds: str) -> str:
    """Make a share link to the session shown, through the Share dialog; its URL."""
    from playwright.sync_api import expect

    page.click("#session-share")
    page.select_option("#share-expiry", seconds)
    page.click("#share-go")
    expect(page.locator("#share-made")).to_be_visible()
    return page.locator("#share-url").input_value()


def test_a_user_shares_a_session_a_reader_opens_it_without_a_token_and_she_revokes_it(
        browser: Any, service, redis_server, tmp_path: Path) -> None:  # noqa: F811 - the imported fixture
    from playwright.sync_api import expect

    users_file = tmp_path / "users.json"
    people = Users.open(users_file)
    alice, bob = people.add("Alice")[1], people.add("bob@example.org")[1]
    redis_server.client(db=8).flushdb()
    app = service("app", REDIS_URL=f"redis://127.0.0.1:{redis_server.port}/8", USERS_FILE=str(users_file))
    Sessions(app.port, alice).save("Harbour Lights")
    Sessions(app.port, bob).save("Bob's Own")
    url = f"http://127.0.0.1:{app.port}/"

    owner = Tab(browser)
    owner.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url.rstrip("/"))
    page = owner.page
    sign_in(owner, url, alice)
    expect(page.locator("#whoami")).to_have_text("Signed in as Alice")
    expect(rows(page)).to_have_count(1)  # her session, not Bob's
    page.click("#session-rows a.title")
    expect(page.locator("#session-title")).to_have_text("Harbour Lights")
    shared_url = share_from_page(page, str(DAY))
    assert re.fullmatch(rf"{re.escape(url)}s/alice\.[A-Za-z0-9_-]{{32}}", shared_url), shared_url
    expires = ms_of(page.locator("#share-expires time").get_attribute("datetime"))
    assert abs(expires - (time.time() + DAY) * 1000) < 60_000
    expect(page.locator("#share-expires")).not_to_contain_text("sooner than asked")
    page.click("#share-copy")
    expect(page.locator("#share-status")).to_have_text("Link copied.")
    assert page.evaluate("navigator.clipboard.readText()") == shared_url
    page.click("#share-close")

    reader = Tab(browser)  # someone else's browser: no token, never asked for one
    reader.allow(r"404 \(NOT FOUND\)")  # the link's answer once revoked
    reader.page.goto(shared_url)
    shown = reader.page
    expect(shown.locator("#session-title")).to_have_text("Harbour Lights")
    expect(shown.locator("#shared-by")).to_have_text(re.compile(r"^Shared by Alice · until .+"))
    expect(shown.locator("li.beat")).to_have_count(2)
    read_only = "#session-delete, #session-pin, #session-share, #session-compare, #token-dialog, #list-view, a.back"
    assert shown.locator(read_only).count() == 0

    page.click("a.button[href='#/shares']")
    share = page.locator("#share-rows tr")
    expect(share).to_have_count(1)
    expect(share.locator("a.title")).to_have_text("Harbour Lights")
    expect(share.locator("td[data-label=Opened]")).to_have_text("1")
    expect(share.locator(".badge")).to_have_text("active")
    expect(share.locator("input.link")).to_have_value(shared_url)  # made in this page: it can be copied
    share.locator("button.revoke").click()
    expect(page.locator("#confirm-revoke")).to_contain_text("Harbour Lights")
    page.click("#confirm-revoke-cancel")
    expect(share.locator(".badge")).to_have_text("active")
    share.locator("button.revoke").click()
    page.click("#confirm-revoke-form button[type=submit]")
    expect(share.locator(".badge")).to_have_text("revoked")
    expect(share.locator("input.link")).to_have_count(0)

    shown.reload()
    expect(shown.locator("#session-body")).to_have_text(GONE)
    expect(shown.locator("#session-title")).to_have_text("Link not found")

    page.click("a.button[href='#/activity']")
    expect(page.locator("#activity-rows tr")).to_have_count(4)
    actions = page.locator("#activity-rows tr").evaluate_all("rows => rows.map(r => r.dataset.action)")
    assert actions == ["revoke", "share-opened", "share", "save"]
    expect(page.locator("#activity-rows td[data-label=From]")).to_have_text(["127.0.0.1"] * 4)
    expect(page.locator("#activity-rows a.title")).to_have_text(["Harbour Lights"] * 4)  # each names the session

    # Her own tab holds her token: the share link's page still sends none, and asks for none.
    owner.allow(r"404 \(NOT FOUND\)")
    sent: list[tuple[str, str | None]] = []
    page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
    page.goto(shared_url)
    expect(page.locator("#session-body")).to_have_text(GONE)
    assert page.evaluate("sessionStorage.getItem('storyart.apiToken')") == alice
    assert [u for u, auth in sent if "/api/" in u] == [f"{url}api/v1/shared/{shared_url.rsplit('/', 1)[1]}"]
    assert [u for u, auth in sent if auth] == []
    for tab in (owner, reader):
        tab.context.close()
        assert tab.unexpected() == []


def test_the_other_user_sees_her_own_links_and_a_link_capped_at_its_session(
        browser: Any, service, redis_server, tmp_path: Path) -> None:  # noqa: F811 - the imported fixture
    from playwright.sync_api import expect

    users_file = tmp_path / "users.json"
    people = Users.open(users_file)
    people.add("Alice")  # two users: the service asks every request for a user
    bob = people.add("bob@example.org")[1]
    redis_server.client(db=9).flushdb()
    app = service("app", REDIS_URL=f"redis://127.0.0.1:{redis_server.port}/9", USERS_FILE=str(users_file),
                  SESSION_TTL_SECONDS=str(2 * DAY))
    saved = Sessions(app.port, bob).save("Night Ferry")
    url = f"http://127.0.0.1:{app.port}/"
    tab = Tab(browser)
    sign_in(tab, f"{url}#/shares", bob)
    page = tab.page
    expect(page.locator("#whoami")).to_have_text("Signed in as bob@example.org")
    expect(page.locator("#shares-empty")).to_have_text(re.compile(r"^No share links yet"))
    page.goto(f"{url}#/session/{saved}")
    share_from_page(page, str(30 * DAY))  # longer than the session lives: the link ends with it
    expect(page.locator("#share-expires")).to_contain_text("sooner than asked")
    expires = ms_of(page.locator("#share-expires time").get_attribute("datetime"))
    assert abs(expires - (saved / 1000 + 2 * DAY) * 1000) < 60_000
    page.click("#share-close")
    page.reload()  # the page forgets the link: the service keeps no copy of its token
    page.click("a.button[href='#/shares']")
    share = page.locator("#share-rows tr")
    expect(share).to_have_count(1)
    expect(share.locator(".badge")).to_have_text("active")
    expect(share.locator("td[data-label=Link]")).to_have_text("Not shown: the service keeps no copy of it")
    expect(page.locator("#shares-total")).to_have_text("1 link, 1 active")
    tab.context.close()
    assert tab.unexpected() == []
