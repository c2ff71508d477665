"""The history page at `/` (docs/history-page.md): quick checks of what Flask serves (HTML only at `/` and
under `/static/`, a strict Content-Security-Policy, JSON everywhere else), then a real headless Chromium
(Debian's, driven by Playwright) against the service under gunicorn with the suite's redis-server: listing,
search and paging, opening, downloading, deleting, importing, pinning, comparing, the degraded banner, the
API token, and a page of another origin that tries to use the service through the browser."""

from __future__ import annotations

import copy
import html.parser
import http.server
import random
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from servers import ROOT, RedisServer, ServiceProcess, debian_binary, free_port, request, wait_for

STATIC = ROOT / "static"
FIXTURE = orjson.loads((ROOT / "tests" / "fixtures" / "session-10kb.json").read_bytes())
TOKEN = "page-test-token-0123456789"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WANTED_CSP = {
    "default-src": {"'none'"}, "script-src": {"'self'"}, "style-src": {"'self'"}, "connect-src": {"'self'"},
    "img-src": {"'self'", "data:"}, "form-action": {"'none'"}, "frame-ancestors": {"'none'"},
    "base-uri": {"'none'"},
}
HOSTILE_ADDRESS = "127.0.0.2"  # a loopback address, but not a name the service's default CORS list trusts


def csp_of(header: str) -> dict[str, set[str]]:
    directives = (part.split() for part in header.split(";") if part.strip())
    return {name: set(values) for name, *values in directives}


# ------------------------------------------------------------------------------- what Flask serves (quick)


class _Markup(html.parser.HTMLParser):
    """Every tag with its attributes, and the text inside <script> and <style> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inline: list[str] = []
        self._open: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._open = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag: str) -> None:
        self._open = None

    def handle_data(self, data: str) -> None:
        if self._open and data.strip():
            self.inline.append(f"<{self._open}>{data.strip()[:60]}")


def test_the_page_is_html_with_a_strict_content_security_policy(make_app) -> None:
    got = make_app().test_client().get("/")
    assert got.status_code == 200 and got.mimetype == "text/html"
    assert csp_of(got.headers["Content-Security-Policy"]) == WANTED_CSP
    assert got.headers["X-Content-Type-Options"] == "nosniff"
    assert got.headers["X-Frame-Options"] == "DENY"
    assert got.headers["Cache-Control"] == "no-cache"
    assert b"<main" in got.data


def test_the_page_has_nothing_inline_and_loads_only_its_own_files(make_app) -> None:
    """What the CSP would block must not be needed: no inline script, style or handler, nothing from another
    origin; and every file the page names is served, with the CSP and the type a browser executes."""
    client = make_app().test_client()
    markup = _Markup()
    markup.feed(client.get("/").get_data(as_text=True))
    assert markup.inline == []
    assert not [tag for tag, _ in markup.tags if tag == "style"]
    handlers = [(tag, name) for tag, attrs in markup.tags for name in attrs if name.startswith("on") or name == "style"]
    assert handlers == []
    files = {attrs[name] for _, attrs in markup.tags for name in ("src", "href")
             if attrs.get(name) and not attrs[name].startswith("#")}
    assert {f for f in files if not f.startswith("/static/")} == set()
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for path in sorted(files | {f"/static/{p.name}" for p in STATIC.glob("*.js")}):
        got = client.get(path)
        assert got.status_code == 200, path
        assert got.mimetype == types[Path(path).suffix] or (path.endswith(".js") and "javascript" in got.mimetype)
        assert csp_of(got.headers["Content-Security-Policy"]) == WANTED_CSP, path
        assert got.headers["Cross-Origin-Resource-Policy"] == "same-origin", path


def test_the_scripts_never_parse_data_as_html_and_import_only_their_own_modules() -> None:
    """Session text goes into the page as text nodes only; an HTML sink anywhere would make that a promise no
    test could keep for every field."""
    sinks = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|srcdoc")
    for script in STATIC.glob("*.js"):
        text = script.read_text(encoding="utf-8")
        assert not sinks.search(text), f"{script.name}: {sinks.search(text).group()}"
        for module in re.findall(r'from "([^"]+)"', text):
            assert module.startswith("./") and (STATIC / module[2:]).is_file(), f"{script.name} imports {module}"


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/index.html", 404), ("GET", "/static/nope.js", 404), ("GET", "/static/../app.py", 404),
    ("GET", "/static/%2e%2e/app.py", 404), ("POST", "/", 405), ("DELETE", "/", 405), ("GET", "/nope", 404),
    ("GET", "/api/v1/session/list?view=summary", 200), ("GET", "/health", 200),
])
def test_everything_but_the_page_stays_json(make_app, method: str, path: str, status: int) -> None:
    got = make_app().test_client().open(path, method=method)
    assert got.status_code == status, (method, path, got.data[:200])
    assert got.mimetype == "application/json"
    body = orjson.loads(got.data)
    assert body["success"] is (status == 200)


def test_the_page_loads_without_the_token_the_api_asks_for(make_app) -> None:
    client = make_app(api_token=TOKEN).test_client()
    assert client.get("/").status_code == 200
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/api/v1/session/list?view=summary").status_code == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/v1/session/list?view=summary", headers=headers).status_code == 200


# ------------------------------------------------------------------------------------------ a real browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the whole module; each test gets its own context (its own tab storage)."""
    from playwright.sync_api import sync_playwright

    executable = debian_binary("chromium", "/usr/bin/chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def site(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """The service under gunicorn on its own Redis database of the suite's redis-server."""
    env = {"REDIS_URL": f"redis://127.0.0.1:{redis_server.port}/7", "WEB_CONCURRENCY": "2"}
    service = ServiceProcess("gunicorn", env, tmp_path_factory.mktemp("page") / "gunicorn.log").start()
    yield service
    service.stop()


@pytest.fixture
def sessions(site: ServiceProcess, redis_server: RedisServer) -> Iterator[Sessions]:
    """The module's service with its Redis database emptied for this test."""
    db = redis_server.client(db=7)
    db.flushdb()
    yield Sessions(site.port)
    db.close()


class Sessions:
    """Seeding and reading sessions over HTTP, as a client of the API (not through the page)."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}/"
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def save(self, title: str, episode: int = 1, story: str = "story-1", **fields: Any) -> int:
        session = copy.deepcopy(FIXTURE)
        session.update(storyUuid=story, **fields)
        session["analyzedEpisode"].update(title=title, episodeNumber=episode)
        got = request(self.port, "POST", "/api/v1/session/save", orjson.dumps(session),
                      {"Content-Type": "application/json", **self.headers})
        assert got.status == 200, got.body
        return got.json()["timestamp"]

    def get(self, timestamp: int) -> Any:
        return request(self.port, "GET", f"/api/v1/session/{timestamp}", headers=self.headers)

    def export(self, timestamp: int) -> bytes:
        got = request(self.port, "GET", f"/api/v1/session/{timestamp}/export", headers=self.headers)
        assert got.status == 200
        return got.body

    def summaries(self) -> list[dict]:
        got = request(self.port, "GET", "/api/v1/session/list?view=summary&limit=100", headers=self.headers)
        assert got.status == 200, got.body
        return got.json()["sessions"]


class Tab:
    """A page in its own browser context, recording every console error, uncaught error and CSP violation;
    the test fails on any it did not `allow`."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.allowed: list[re.Pattern[str]] = []
        self.page.add_init_script(
            "document.addEventListener('securitypolicyviolation', (e) => "
            "console.error(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`));")
        self.page.on("console", lambda m: self.problems.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.problems.append(f"uncaught: {exc}"))

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [p for p in self.problems if not any(a.search(p) for a in self.allowed)]


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    opened = Tab(browser)
    yield opened
    opened.context.close()
    assert opened.unexpected() == [], "the page logged errors"


def rows(page: Any) -> Any:
    return page.locator("#session-rows tr")


def listed(page: Any) -> list[int]:
    return [int(ts) for ts in rows(page).evaluate_all("rows => rows.map(r => r.dataset.ts)")]


def open_list(page: Any, url: str, count: int) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    expect(rows(page)).to_have_count(count)


@pytest.mark.slow
def test_seeded_sessions_are_listed_newest_first_with_their_summaries(tab: Tab, sessions: Sessions) -> None:
    from playwright.sync_api import expect

    saved = [sessions.save("Undertow", 5), sessions.save("Riptide", 6), sessions.save("Slack Water", 7)]
    answer = tab.page.goto(sessions.url)
    assert csp_of(answer.headers["content-security-policy"]) == WANTED_CSP
    expect(rows(tab.page)).to_have_count(3)
    assert listed(tab.page) == sorted(saved, reverse=True)
    newest = rows(tab.page).first
    expect(newest.locator("a.title")).to_have_text("Slack Water")
    expect(newest.locator("td[data-label=Episode]")).to_have_text("7")
    expect(newest.locator("td[data-label=Beats]")).to_have_text("2")
    expect(newest.locator("td[data-label='Stored in']")).to_have_text("Redis")
    expect(tab.page.locator("#list-total")).to_have_text("3 sessions")
    expect(tab.page.locator("#health")).to_have_text("Redis connected")
    expect(tab.page.locator("#degraded")).to_be_hidden()


@pytest.mark.slow
def test_a_search_narrows_the_list_and_older_pages_load_on_demand(tab: Tab, sessions: Sessions) -> None:
    from playwright.sync_api import expect

    saved = [sessions.save(f"Tide {n}", n, story="story-tides") for n in range(12)]
    undertow = sessions.save("The Undertow", 99, story="story-other")
    page = tab.page
    open_list(page, sessions.url, 13)
    page.fill("#filter-q", "undertow")  # typing searches (case-insensitive), no button needed
    expect(rows(page)).to_have_count(1)
    assert listed(page) == [undertow]
    expect(page.locator("#list-total")).to_have_text("1 session")
    page.fill("#filter-q", "no such title")
    expect(rows(page)).to_have_count(0)
    expect(page.locator("#list-empty")).to_have_text("No session matches these filters.")
    page.click("#filters button[type=reset]")
    expect(rows(page)).to_have_count(13)
    page.fill("input[name=episode]", "3")
    expect(rows(page)).to_have_count(1)
    assert listed(page) == [saved[3]]
    page.fill("input[name=episode]", "")
    page.select_option("select[name=limit]", "10")
    page.fill("input[name=storyUuid]", "story-tides")
    expect(rows(page)).to_have_count(10)
    assert listed(page) == sorted(saved, reverse=True)[:10]
    page.click("#load-more")  # the next page through the `before` cursor
    expect(rows(page)).to_have_count(12)
    assert listed(page) == sorted(saved, reverse=True)
    expect(page.locator("#load-more")).to_be_hidden()


@pytest.mark.slow
def test_opening_a_session_shows_its_beats_and_prompts_as_text_and_downloads_it(tab: Tab, sessions: Sessions) -> None:
    from playwright.sync_api import expect

    hostile = '<img src=x onerror="window.pwned=1">Night Shift'
    session = copy.deepcopy(FIXTURE)
    beat = session["analyzedEpisode"]["scenes"][0]["beats"][0]
    beat["beat_title"] = "<script>window.pwned=2</script>The Door"
    beat["prompts"]["cinematic"]["prompt"] = "wide shot of a rain-slick <b>alley</b>, neon signs"
    timestamp = sessions.save(hostile, analyzedEpisode={**session["analyzedEpisode"], "title": hostile})
    page = tab.page
    open_list(page, sessions.url, 1)
    page.click("#session-rows a.title")
    expect(page.locator("#session-title")).to_have_text(hostile)  # the markup is text, nothing ran
    scene = FIXTURE["analyzedEpisode"]["scenes"][0]
    expect(page.locator(".scene h3")).to_have_text(f"Scene 1 {scene['title']}")
    expect(page.locator("li.beat")).to_have_count(len(scene["beats"]))
    expect(page.locator(".beat-title").first).to_have_text("<script>window.pwned=2</script>The Door")
    expect(page.locator(".beat-title").nth(1)).to_have_text(scene["beats"][1]["beat_title"])
    page.locator("li.beat summary").first.click()
    cinematic = page.locator("li.beat").first.locator(".prompt[data-kind=cinematic] .prompt-text")
    expect(cinematic).to_have_text("wide shot of a rain-slick <b>alley</b>, neon signs")
    expect(page.locator("li.beat").first.locator(".prompt[data-kind=vertical] .prompt-text")).to_have_text(
        scene["beats"][0]["prompts"]["vertical"]["prompt"])
    assert page.evaluate("window.pwned") is None
    assert page.locator("img[src=x], #session-view b, #session-view script").count() == 0
    assert page.url.endswith(f"#/session/{timestamp}")

    with page.expect_download() as download:
        page.click("#session-download")
    assert download.value.suggested_filename == f"storyart-session-{timestamp}.json"
    assert Path(download.value.path()).read_bytes() == sessions.export(timestamp)


@pytest.mark.slow
def test_delete_asks_first_then_removes_the_session(tab: Tab, sessions: Sessions) -> None:
    from playwright.sync_api import expect

    keep, doomed = sessions.save("Keep Me"), sessions.save("Delete Me")
    page = tab.page
    page.goto(f"{sessions.url}#/session/{doomed}")
    expect(page.locator("#session-title")).to_have_text("Delete Me")
    dialog = page.locator("#confirm-delete")
    page.click("#session-delete")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Delete Me")
    page.click("#confirm-delete-cancel")
    expect(dialog).to_be_hidden()
    assert sessions.get(doomed).status == 200  # cancelled: nothing happened
    page.click("#session-delete")
    dialog.locator("button[type=submit]").click()
    expect(rows(page)).to_have_count(1)  # back on the list, without it
    assert listed(page) == [keep]
    expect(page.locator("#toast")).to_contain_text("Deleted “Delete Me”")
    assert sessions.get(doomed).status == 404
    assert sessions.get(keep).status == 200


@pytest.mark.slow
def test_import_of_picked_and_dropped_files_shows_the_report(tab: Tab, sessions: Sessions) -> None:
    from playwright.sync_api import expect

    exported = copy.deepcopy(FIXTURE)
    exported["analyzedEpisode"]["title"] = "Imported With Its Time"
    exported["timestamp"] = int(time.time() * 1000) - 3_600_000
    good = orjson.dumps(exported)
    rejected = {k: v for k, v in FIXTURE.items() if k != "scriptText"}
    fresh = {**copy.deepcopy(FIXTURE), "analyzedEpisode": {**FIXTURE["analyzedEpisode"], "title": "Fresh"}}
    mixed = orjson.dumps([fresh, rejected])
    page = tab.page
    open_list(page, sessions.url, 0)
    page.click("#import-open")
    page.locator("#import-files").set_input_files([
        {"name": "good.json", "mimeType": "application/json", "buffer": good},
        {"name": "mixed.json", "mimeType": "application/json", "buffer": mixed},
        {"name": "broken.json", "mimeType": "application/json", "buffer": b'{"scriptText": "INT. LAB'},
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a session"},
    ])
    expect(page.locator("#import-chosen li")).to_have_count(4)
    expect(page.locator("#import-chosen li").nth(3)).to_contain_text("skipped: not a .json file")
    tab.allow(r"status of 400 \(BAD REQUEST\)")  # the broken file's answer
    page.click("#import-go")
    reports = page.locator("#import-report .report")
    expect(reports).to_have_count(3)
    expect(reports.nth(2)).to_contain_text("broken.json")
    expect(reports.nth(2).locator(".error")).to_contain_text("Not imported: The request body is not valid JSON")
    expect(reports.nth(0).locator("h3")).to_have_text("good.json 1 imported, 0 replaced, 0 rejected")
    expect(reports.nth(0).locator("tbody tr")).to_have_text(
        re.compile(rf"#1\s*imported\s*{exported['timestamp']}\s*Redis"))
    expect(reports.nth(1).locator("h3")).to_have_text("mixed.json 1 imported, 0 replaced, 1 rejected")
    expect(reports.nth(1).locator("tbody tr").nth(1)).to_contain_text("scriptText is missing")
    assert orjson.loads(sessions.get(exported["timestamp"]).body)["data"] == exported  # its timestamp kept

    # The same file again, dropped on the page: it replaces the session saved under its timestamp.
    drop = page.evaluate_handle("""(text) => {
        const data = new DataTransfer();
        data.items.add(new File([text], "again.json", {type: "application/json"}));
        return data;
    }""", good.decode())
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": drop})
    expect(page.locator("#import-chosen li")).to_have_count(1)
    page.click("#import-go")
    expect(reports.first.locator("h3")).to_have_text("again.json 0 imported, 1 replaced, 0 rejected")
    page.click("#import-close")
    expect(rows(page)).to_have_count(2)
    assert sorted(s["title"] for s in sessions.summaries()) == ["Fresh", "Imported With Its Time"]


@pytest.mark.slow
def test_the_csp_is_enforced_and_nothing_inline_runs(tab: Tab, sessions: Sessions) -> None:
    """The header is not decoration: a script element added to the page does not run and is reported."""
    from playwright.sync_api import expect

    sessions.save("Anything")
    page = tab.page
    open_list(page, sessions.url, 1)
    tab.allow(r"CSP violation: script-src-elem inline|Executing inline script violates")
    page.evaluate("""() => {
        const script = document.createElement("script");
        script.textContent = "window.inlineRan = true";
        document.body.append(script);
    }""")
    expect(page.locator("body")).to_be_visible()
    wait_for(lambda: any("CSP violation" in p for p in tab.problems), what="the CSP violation report", timeout=5)
    assert page.evaluate("window.inlineRan") is None
    page.focus("#session-rows a.title")  # keyboard only: a title is a link, Enter opens the session
    page.keyboard.press("Enter")
    expect(page.locator("li.beat")).to_have_count(2)
    page.click("#import-open")
    expect(page.locator("#import-dialog")).to_be_visible()
    page.keyboard.press("Escape")  # keyboard: dialogs close with Escape
    expect(page.locator("#import-dialog")).to_be_hidden()
    assert [p for p in tab.problems if "CSP" in p and "inline" not in p] == []


@pytest.mark.slow
def test_a_pinned_session_outlives_a_ttl_that_expires_the_others(tab: Tab, own_redis, service) -> None:
    from playwright.sync_api import expect

    ttl = 2
    app = service("app", REDIS_URL=own_redis().url, SESSION_TTL_SECONDS=str(ttl))
    seeded = Sessions(app.port)
    kept, lost = seeded.save("Keep Forever"), seeded.save("Let Expire")
    page = tab.page
    page.goto(f"{seeded.url}#/session/{kept}")
    pin = page.locator("#session-pin")
    expect(pin).to_have_attribute("aria-pressed", "false")
    pin.click()
    expect(pin).to_have_attribute("aria-pressed", "true")
    expect(pin).to_have_text("Unpin")
    expect(page.locator("#session-pinned")).to_be_visible()
    page.click("a.back")
    expect(rows(page)).to_have_count(2)
    expect(page.locator(f"#session-rows tr[data-ts='{kept}'] .badge.pin")).to_have_text("Pinned")
    expect(page.locator(f"#session-rows tr[data-ts='{lost}'] .badge.pin")).to_have_count(0)
    time.sleep(max(0.0, lost / 1000 + ttl + 0.5 - time.time()))  # past the TTL of both saves
    page.reload()
    expect(rows(page)).to_have_count(1)
    assert listed(page) == [kept]
    assert seeded.get(lost).status == 404 and seeded.get(kept).status == 200


@pytest.mark.slow
def test_compare_shows_a_changed_prompt_before_and_after(tab: Tab, sessions: Sessions) -> None:
    from playwright.sync_api import expect

    first = sessions.save("Undertow")
    episode = copy.deepcopy(FIXTURE["analyzedEpisode"])
    beat = episode["scenes"][0]["beats"][0]
    was = beat["prompts"]["cinematic"]["prompt"]
    beat["prompts"]["cinematic"]["prompt"] = f"{was}, rain-slick rooftop at dusk"
    second = sessions.save("Undertow", analyzedEpisode={**episode, "title": "Undertow"}, promptMode="manual")
    sessions.save("Unrelated")
    page = tab.page
    open_list(page, sessions.url, 3)
    page.check(f"#session-rows tr[data-ts='{second}'] input[type=checkbox]")
    expect(page.locator("#compare-go")).to_be_disabled()  # one more to pick
    page.check(f"#session-rows tr[data-ts='{first}'] input[type=checkbox]")
    page.click("#compare-go")
    expect(page).to_have_url(re.compile(rf"#/compare/{first}/{second}$"))  # older first: before -> after
    change = page.locator(f".changed-beat[data-beat='{beat['beatId']}'] .prompt-change[data-kind=cinematic]")
    expect(change.locator(".before")).to_contain_text(was)
    expect(change.locator(".after")).to_contain_text(f"{was}, rain-slick rooftop at dusk")
    marked = change.locator(".after ins").all_inner_texts()  # what was added, and only that, is marked
    assert len(marked) == 1 and marked[0].endswith(", rain-slick rooftop at dusk"), marked
    field = page.locator(".change[data-path=promptMode]")
    expect(field.locator(".before")).to_contain_text(FIXTURE["promptMode"])
    expect(field.locator(".after")).to_contain_text("manual")
    expect(page.locator(".beats-report > p.muted")).to_have_text("0 added, 0 removed, 1 changed, 1 unchanged")

    page.goto(f"{sessions.url}#/session/{first}")  # the same through "Compare with…" on a session
    expect(page.locator("#session-title")).to_have_text("Undertow")
    page.click("#session-compare")
    expect(page.locator("#pick-list a")).to_have_count(2)
    page.locator("#pick-list a", has_text="Undertow").click()
    expect(page).to_have_url(re.compile(rf"#/compare/{first}/{second}$"))
    expect(change.locator(".after")).to_contain_text("rain-slick rooftop at dusk")


@pytest.mark.slow
def test_compare_tells_a_scene_from_the_one_at_its_number_and_says_when_script_counts_are_coarse(
        tab: Tab, sessions: Sessions) -> None:
    """The first scene is numbered "#2", the second has no number (the report names it "#2" by its position):
    each shows its own title and its own beat's prompts. A script of 80,000 short lines in another order gets
    the counts of a coarser diff, and the page says they are at most that."""
    from playwright.sync_api import expect

    def episode(titles: tuple[str, str], prompts: tuple[str, str]) -> dict:
        beats = [[{"prompts": {"cinematic": {"prompt": prompt}}}] for prompt in prompts]
        return {"scenes": [{"sceneNumber": "#2", "title": titles[0], "beats": beats[0]},
                           {"title": titles[1], "beats": beats[1]}]}

    def script(seed: int) -> str:
        rng = random.Random(seed)
        return "\n".join(rng.choice([f"{chr(97 + i % 26)}{i // 26:02d}" for i in range(120)]) for _ in range(80_000))

    first = sessions.save("Collide", analyzedEpisode=episode(("Numbered", "Unnumbered"), ("one", "two")),
                          scriptText=script(1))
    second = sessions.save("Collide", scriptText=script(2), analyzedEpisode=episode(
        ("Numbered, retitled", "Unnumbered, retitled"), ("one, rewritten", "two, rewritten")))
    page = tab.page
    page.goto(f"{sessions.url}#/compare/{first}/{second}")
    titles = page.locator(".compare li > h3")
    expect(titles).to_have_text(["Scene #2 · Numbered, retitled", "Scene #2 (by position) · Unnumbered, retitled",
                                 "Scene #2, beat #1", "Scene #2 (by position), beat #1"])
    for beat, (was, now) in enumerate([("one", "one, rewritten"), ("two", "two, rewritten")]):
        change = page.locator(".changed-beat").nth(beat).locator(".prompt-change[data-kind=cinematic]")
        expect(change.locator(".before")).to_contain_text(was)
        expect(change.locator(".after")).to_contain_text(now)
    expect(page.locator(".inexact")).to_contain_text("at most")


@pytest.mark.slow
def test_a_backup_downloads_every_session(tab: Tab, sessions: Sessions) -> None:
    import zipfile

    from playwright.sync_api import expect

    saved = [sessions.save("One"), sessions.save("Two")]
    page = tab.page
    open_list(page, sessions.url, 2)
    with page.expect_download() as download:
        page.click("#backup")
    assert re.fullmatch(r"storyart-backup-.+\.zip", download.value.suggested_filename)
    with zipfile.ZipFile(download.value.path()) as backup:
        assert sorted(n for n in backup.namelist() if n.startswith("sessions/")) == [
            f"sessions/{ts}.json" for ts in sorted(saved)]
        assert backup.read(f"sessions/{saved[0]}.json") == sessions.export(saved[0])
    expect(page.locator("#toast")).to_have_text("Backup downloaded.")


class HostilePage(http.server.BaseHTTPRequestHandler):
    """A site on another origin whose page tries to read, delete and write sessions through the visitor's
    browser, to frame the history page and to load its script."""

    service = ""
    victim = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = HOSTILE_HTML.replace("SERVICE", self.service).replace("VICTIM", str(self.victim)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


HOSTILE_HTML = """<!doctype html><title>hostile</title>
<iframe id="framed" src="SERVICE/"></iframe>
<script>
const session = JSON.stringify({scriptText: "x", episodeContext: "{}", storyUuid: "evil",
  analyzedEpisode: {episodeNumber: 1, title: "Planted", scenes: []}});
async function attempt(name, make) {
  try { const r = await make(); return [name, "answered " + r.type + " " + r.status]; }
  catch (e) { return [name, "failed " + e.name]; }
}
window.results = (async () => Object.fromEntries(await Promise.all([
  attempt("read", () => fetch("SERVICE/api/v1/session/list?view=summary")),
  attempt("read latest", () => fetch("SERVICE/api/v1/session/latest", {credentials: "include"})),
  attempt("delete", () => fetch("SERVICE/api/v1/session/VICTIM", {method: "DELETE"})),
  attempt("save as json", () => fetch("SERVICE/api/v1/session/save", {method: "POST",
    headers: {"Content-Type": "application/json"}, body: session})),
  attempt("save blind", () => fetch("SERVICE/api/v1/session/save", {method: "POST", mode: "no-cors",
    headers: {"Content-Type": "text/plain"}, body: session})),
  attempt("import blind", () => fetch("SERVICE/api/v1/session/import", {method: "POST", mode: "no-cors",
    body: new Blob([session])})),
  new Promise((resolve) => {
    const script = document.createElement("script");
    script.src = "SERVICE/static/app.js";
    script.type = "module";
    script.onload = () => resolve(["script", "loaded"]);
    script.onerror = () => resolve(["script", "blocked"]);
    document.head.append(script);
  }),
])))();
</script>"""


@pytest.mark.slow
def test_a_page_of_another_origin_cannot_use_the_service_through_the_browser(browser: Any,
                                                                            sessions: Sessions) -> None:
    victim = sessions.save("Victim")
    before = sessions.summaries()
    HostilePage.service = sessions.url.rstrip("/")
    HostilePage.victim = victim
    server = http.server.ThreadingHTTPServer((HOSTILE_ADDRESS, free_port()), HostilePage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    context = browser.new_context()
    try:
        page = context.new_page()
        refusals: list[str] = []
        page.on("console", lambda m: refusals.append(m.text))
        page.goto(f"http://{HOSTILE_ADDRESS}:{server.server_address[1]}/")
        results = page.evaluate("window.results")
        framed = next(f for f in page.frames if f != page.main_frame)
        framed_text = framed.evaluate("document.body ? document.body.innerText : ''")
    finally:
        context.close()
        server.shutdown()
        server.server_close()
    assert results == {
        "read": "failed TypeError",  # no CORS header for this origin: the browser keeps the answer from the page
        "read latest": "failed TypeError",
        "delete": "failed TypeError",  # the preflight is refused, so the DELETE is never sent
        "save as json": "failed TypeError",
        "save blind": "answered opaque 0",  # sent, but not as JSON: the service refuses it (415) unread
        "import blind": "answered opaque 0",
        "script": "blocked",  # Cross-Origin-Resource-Policy: same-origin
    }
    assert "StoryArt sessions" not in framed_text  # frame-ancestors 'none': the page is not shown in a frame
    assert any("frame-ancestors" in text for text in refusals), refusals
    assert sessions.summaries() == before  # nothing changed, nothing was planted
    assert sessions.get(victim).status == 200


@pytest.mark.slow
def test_the_banner_says_when_the_service_is_degraded(tab: Tab, own_redis, service) -> None:
    from playwright.sync_api import expect

    redis = own_redis()
    app = service("app", REDIS_URL=redis.url, REDIS_RETRY_INTERVAL="0.2")
    Sessions(app.port).save("Before The Outage")
    page = tab.page
    open_list(page, f"http://127.0.0.1:{app.port}/", 1)
    expect(page.locator("#degraded")).to_be_hidden()
    redis.kill()
    page.reload()
    banner = page.locator("#degraded")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("Redis is disconnected. New saves go to the local store")
    expect(page.locator("#health")).to_have_text("Redis disconnected")
    expect(page.locator("#partial")).to_be_visible()  # the list says it shows the local store only
    during = Sessions(app.port).save("Saved During The Outage")
    page.reload()
    expect(rows(page)).to_have_count(1)
    expect(rows(page).first.locator("td[data-label='Stored in']")).to_have_text("local store")
    redis.start()  # empty: the session saved before is gone with it, the one saved during comes back
    wait_for(lambda: [s["storage"] for s in Sessions(app.port).summaries()] == ["redis"], what="the write-back")
    page.reload()
    expect(banner).to_be_hidden()
    expect(page.locator("#health")).to_have_text("Redis connected")
    assert listed(page) == [during]
    expect(rows(page).first.locator("td[data-label='Stored in']")).to_have_text("Redis")


@pytest.mark.slow
def test_the_api_token_is_asked_once_per_tab_and_again_when_wrong(browser: Any, service) -> None:
    from playwright.sync_api import expect

    app = service("app", API_TOKEN=TOKEN, LOCAL_STORE="memory")
    Sessions(app.port, TOKEN).save("Behind A Token")
    url = f"http://127.0.0.1:{app.port}/"
    first = Tab(browser)
    first.allow(r"401 \(UNAUTHORIZED\)")
    page = first.page
    page.goto(url)
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    page.fill("#token-input", "not-the-token-at-all")
    page.click("#token-form button[type=submit]")
    expect(page.locator("#token-text")).to_contain_text("did not accept that token")
    page.fill("#token-input", TOKEN)
    page.keyboard.press("Enter")
    expect(rows(page)).to_have_count(1)
    expect(dialog).to_be_hidden()
    page.reload()  # the same tab keeps the token for its life
    expect(rows(page)).to_have_count(1)
    expect(dialog).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('storyart.apiToken')") == TOKEN
    first.context.close()
    assert first.unexpected() == []

    second = Tab(browser)  # another tab does not have it
    second.allow(r"401 \(UNAUTHORIZED\)")
    second.page.goto(url)
    expect(second.page.locator("#token-dialog")).to_be_visible()
    second.page.click("#token-cancel")
    expect(second.page.locator("#list-empty")).to_contain_text("A valid API token is required")
    second.context.close()
    assert second.unexpected() == []
