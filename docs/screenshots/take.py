"""Screenshots of the history page for the README: `.venv/bin/python docs/screenshots/take.py`.

Starts a throwaway redis-server and the service under gunicorn on free loopback ports (tests/servers.py), saves
a few sessions made from tests/fixtures/, and has headless Chromium take `list.png`, `session.png`,
`compare.png` (when the service has the compare endpoint) and `narrow-dark.png` into this folder.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from servers import RedisServer, ServiceProcess, request  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EPISODES = [(1, "Cold Open"), (2, "Static on the Line"), (3, "Riptide"), (4, "Slack Water"), (5, "Undertow")]


def save(port: int, session: dict) -> int:
    got = request(port, "POST", "/api/v1/session/save", orjson.dumps(session), {"Content-Type": "application/json"})
    assert got.status == 200, got.body
    return got.json()["timestamp"]


def seed(port: int) -> tuple[int, int]:
    """Five episodes of one story (the last one twice, re-analysed with a changed prompt), one pinned."""
    small = orjson.loads((ROOT / "tests" / "fixtures" / "session-10kb.json").read_bytes())
    large = orjson.loads((ROOT / "tests" / "fixtures" / "session-1mb.json").read_bytes())
    for number, title in EPISODES[:-1]:
        session = copy.deepcopy(small)
        session["analyzedEpisode"].update(episodeNumber=number, title=title)
        timestamp = save(port, session)
        if number == 2:
            assert request(port, "POST", f"/api/v1/session/{timestamp}/pin").status == 200
    before = save(port, large)
    again = copy.deepcopy(large)
    beat = again["analyzedEpisode"]["scenes"][0]["beats"][0]
    cinematic = beat["prompts"]["cinematic"]
    added = ", rain-slick rooftop at dusk, neon reflections"
    cinematic["prompt"] = cinematic["prompt"].replace(", cinematic color grade", f"{added}, cinematic color grade")
    again["analyzedEpisode"]["scenes"][0]["beats"][1]["beat_title"] = "Door Slams Shut"
    again["promptMode"] = "manual"
    return before, save(port, again)


def main() -> int:
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        redis = RedisServer(work / "redis").start()
        service = ServiceProcess("gunicorn", {"REDIS_URL": redis.url}, work / "service.log").start()
        try:
            before, after = seed(service.port)
            served = request(service.port, "GET", f"/api/v1/session/{before}/compare/{after}").status == 200
            url = f"http://127.0.0.1:{service.port}/"
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 800}, color_scheme="light")
                page.goto(url)
                expect(page.locator("#session-rows tr")).to_have_count(len(EPISODES) + 1)
                page.screenshot(path=HERE / "list.png")
                page.set_viewport_size({"width": 1280, "height": 1280})
                page.goto(f"{url}#/session/{after}")
                page.locator("li.beat summary").first.click()
                expect(page.locator("li.beat .prompt").first).to_be_visible()
                page.screenshot(path=HERE / "session.png")
                if served:
                    page.goto(f"{url}#/compare/{before}/{after}")
                    expect(page.locator(".changed-beat").first).to_be_visible()
                    page.screenshot(path=HERE / "compare.png", full_page=True)
                else:
                    print("compare.png: skipped, this service has no compare endpoint", file=sys.stderr)
                narrow = browser.new_page(viewport={"width": 390, "height": 844}, color_scheme="dark")
                narrow.goto(url)
                expect(narrow.locator("#session-rows tr")).to_have_count(len(EPISODES) + 1)
                narrow.screenshot(path=HERE / "narrow-dark.png")
                browser.close()
        finally:
            service.stop()
            redis.kill_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
