"""`GET /api/v1/session/<a>/compare/<b>` against the real app on Redis, SQLite and memory: a re-analysis of the
1 MB fixture, edited in known ways, is reported exactly that way; errors are 400/404/422 JSON. Compares built to
be expensive (scripts of many short repeated lines, sessions of millions of tiny values, pairs larger than
COMPARE_MAX_BYTES) get a bounded answer in process, and against a real gunicorn other requests are answered
while they run."""

from __future__ import annotations

import copy
import random
import threading
import time
from collections.abc import Callable

import orjson
import pytest
from flask.testing import FlaskClient

from compare import BYTES_PER_VALUE, SCRIPT_MAX_LINES, LineDiff, line_diff
from servers import PeakRss, ServiceProcess, request, save_request, wait_for

JSON = {"Content-Type": "application/json"}
FIRST, SECOND = 1_700_000_000_000, 1_700_000_100_000


def save(client: FlaskClient, session: dict, timestamp: int) -> None:
    answer = client.post("/api/v1/session/save", data=orjson.dumps({**session, "timestamp": timestamp}), headers=JSON)
    assert answer.status_code == 200, answer.data


def compared(client: FlaskClient, a: int | str, b: int | str):
    return client.get(f"/api/v1/session/{a}/compare/{b}")


def minimal(**fields: object) -> dict:
    """A session with only the fields a save requires, and `fields`."""
    return {"scriptText": "A", "episodeContext": "{}", "storyUuid": "u", "analyzedEpisode": {}, **fields}


def beats_of(session: dict) -> list[dict]:
    return [beat for scene in session["analyzedEpisode"]["scenes"] for beat in scene["beats"]]


def reanalysis(base: dict) -> dict:
    """`base` with one change of every kind the report names (each asserted below)."""
    session = copy.deepcopy(base)
    scenes = session["analyzedEpisode"]["scenes"]
    scenes[0]["beats"][0]["prompts"]["cinematic"]["prompt"] = "a new cinematic prompt"
    scenes[0]["beats"][1]["emotional_tone"] = "serene"
    scenes[0]["beats"][1]["prompts"]["vertical"]["seed"] += 1  # a prompt setting, not its text
    scenes[1]["beats"].pop()  # removed
    scenes[2]["beats"].append({"beatId": "brand-new", "beat_number": 99, "prompts": {}})  # added
    scenes[3]["beats"].append(scenes[4]["beats"].pop(0))  # moved to another scene, unchanged otherwise
    scenes[5]["title"] = "A Retitled Scene"
    scenes[5]["metadata"]["timing"] = "00:01"
    scenes.append({"sceneNumber": 100, "title": "Coda", "beats": []})
    lines = session["scriptText"].splitlines()
    lines[5] = "A rewritten line."  # 1 removed, 1 added
    lines[10:10] = ["New line one.", "New line two.", "New line three."]  # 3 added
    del lines[20]  # 1 removed
    session["scriptText"] = "\n".join(lines)
    context = orjson.loads(session["episodeContext"])
    context["episode"]["episode_title"] = "Retitled"
    context["episode"]["new_note"] = "added"
    del context["episode"]["core_themes"]
    session["episodeContext"] = orjson.dumps(context).decode()
    session["analyzedEpisode"]["title"] = "Retitled"
    session["promptMode"] = "manual"
    session["reviewer"] = "added"
    del session["selectedLLM"]
    return session


def test_a_reanalysis_is_reported_field_by_field(client: FlaskClient, session_1mb: bytes) -> None:
    base = orjson.loads(session_1mb)
    after = reanalysis(base)
    save(client, base, FIRST)
    save(client, after, SECOND)
    got = compared(client, FIRST, SECOND)
    assert got.status_code == 200 and got.mimetype == "application/json"
    report = got.get_json()
    assert report["success"] is True and report["from"] == FIRST and report["to"] == SECOND
    assert report["identical"] is False
    assert report["fields"] == {"added": ["reviewer"], "removed": ["selectedLLM"], "changed": ["promptMode"]}
    old_lines, new_lines = base["scriptText"].splitlines(), after["scriptText"].splitlines()
    assert len(new_lines) == len(old_lines) + 2
    assert report["scriptText"] == {"changed": True, "linesBefore": len(old_lines), "linesAfter": len(new_lines),
                                    "linesAdded": 4, "linesRemoved": 2, "exact": True}
    assert report["episodeContext"] == {"changed": True, "parsed": True, "fields": {
        "added": ["episode.new_note"], "removed": ["episode.core_themes"], "changed": ["episode.episode_title"]}}
    assert report["episode"] == {"added": [], "removed": [], "changed": ["title"]}

    scenes = base["analyzedEpisode"]["scenes"]
    assert report["scenes"] == {
        "added": [{"sceneNumber": 100}], "removed": [],
        "changed": [{"sceneNumber": scenes[5]["sceneNumber"], "added": [], "removed": [],
                     "changed": ["metadata.timing", "title"]}]}
    beats = report["beats"]
    assert beats["added"] == [{"beatId": "brand-new", "sceneNumber": scenes[2]["sceneNumber"]}]
    assert beats["removed"] == [{"beatId": scenes[1]["beats"][-1]["beatId"], "sceneNumber": scenes[1]["sceneNumber"]}]
    first, second, moved = scenes[0]["beats"][0], scenes[0]["beats"][1], scenes[4]["beats"][0]
    assert beats["changed"] == [
        {"beatId": first["beatId"], "sceneNumber": scenes[0]["sceneNumber"], "added": [], "removed": [],
         "changed": ["prompts.cinematic.prompt"],
         "prompts": {"cinematic": {"before": first["prompts"]["cinematic"]["prompt"],
                                   "after": "a new cinematic prompt"}}},
        {"beatId": second["beatId"], "sceneNumber": scenes[0]["sceneNumber"], "added": [], "removed": [],
         "changed": ["emotional_tone", "prompts.vertical.seed"], "prompts": {}},
        {"beatId": moved["beatId"], "sceneNumber": scenes[3]["sceneNumber"], "added": [], "removed": [],
         "changed": [], "prompts": {}, "movedFrom": scenes[4]["sceneNumber"]},
    ]
    assert beats["unchanged"] == len(beats_of(base)) - 1 - 3  # all but the removed one and the three changed


def common_lines(a: list[str], b: list[str]) -> int:
    """The length of a longest common subsequence, by the textbook table (small inputs only)."""
    above = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(above[j] + 1 if x == y else max(above[j + 1], row[j]))
        above = row
    return above[-1]


def test_the_line_counts_are_the_fewest_a_line_diff_needs(client: FlaskClient, session_10kb: bytes) -> None:
    """Whatever the edit, the counts are those of a minimal line diff (here: the script reversed)."""
    base = orjson.loads(session_10kb)
    after = {**base, "scriptText": "\n".join(reversed(base["scriptText"].splitlines()))}
    save(client, base, FIRST)
    save(client, after, SECOND)
    script = compared(client, FIRST, SECOND).get_json()["scriptText"]
    old, new = base["scriptText"].splitlines(), after["scriptText"].splitlines()
    common = common_lines(old, new)
    assert script["exact"] is True
    assert script["linesAdded"] == len(new) - common > 0 and script["linesRemoved"] == len(old) - common > 0


def test_the_line_diff_is_minimal_within_its_steps_and_a_diff_beyond() -> None:
    """Random small scripts over a few distinct lines (the hard case): with room, the fewest lines added and
    removed; with no room at all, the counts of a real diff (as many more added as removed, none below the
    fewest), `exact` false."""
    rng = random.Random(16)
    for _ in range(500):
        kinds = rng.choice(["ab", "abcd", "abcdefgh"])
        old = [rng.choice(kinds) for _ in range(rng.randrange(0, 40))]
        new = [rng.choice(kinds) for _ in range(rng.randrange(0, 40))]
        fewest = LineDiff(len(new) - common_lines(old, new), len(old) - common_lines(old, new), exact=True)
        assert line_diff(old, new) == fewest, (old, new)
        coarse = line_diff(old, new, steps=0)
        assert coarse.added - coarse.removed == len(new) - len(old), (old, new)
        assert coarse == fewest if coarse.exact else coarse.added >= fewest.added, (old, new)


def test_a_session_compared_with_itself_or_a_resave_is_identical(client: FlaskClient, session_1mb: bytes) -> None:
    base = orjson.loads(session_1mb)
    save(client, base, FIRST)
    save(client, base, SECOND)
    for a, b in ((FIRST, FIRST), (FIRST, SECOND)):
        report = compared(client, a, b).get_json()
        assert report["identical"] is True
        assert report["beats"] == {"added": [], "removed": [], "changed": [], "unchanged": len(beats_of(base))}
        assert report["scriptText"]["linesAdded"] == report["scriptText"]["linesRemoved"] == 0


def test_sessions_without_ids_or_parts_compare_by_position(client: FlaskClient) -> None:
    """Sessions need not carry `beatId`s, scene numbers or a parseable `episodeContext`: beats are then matched by
    their place in their scene, and a context that is not a JSON object is compared as text."""
    before = {"scriptText": "A", "episodeContext": "not json", "storyUuid": "u",
              "analyzedEpisode": {"scenes": [{"beats": [{"n": 1}, {"n": 2}]}, "not a scene"]}}
    after = {"scriptText": "A", "episodeContext": "{}", "storyUuid": "u",
             "analyzedEpisode": {"scenes": [{"beats": [{"n": 1}, {"n": 3}, {"n": 4}]}]}}
    save(client, before, FIRST)
    save(client, after, SECOND)
    report = compared(client, FIRST, SECOND).get_json()
    assert report["episodeContext"] == {"changed": True, "parsed": False}
    assert report["scenes"]["removed"] == [{"sceneNumber": "#2", "position": 2}]
    assert report["beats"]["added"] == [{"beatId": None, "sceneNumber": "#1", "scenePosition": 1, "index": 2}]
    assert report["beats"]["changed"] == [{"beatId": None, "sceneNumber": "#1", "scenePosition": 1, "index": 1,
                                           "added": [], "removed": [], "changed": ["n"], "prompts": {}}]
    assert report["beats"]["unchanged"] == 1


def test_missing_sessions_are_named_and_bad_timestamps_are_400(client: FlaskClient, session_10kb: bytes) -> None:
    save(client, orjson.loads(session_10kb), FIRST)
    for a, b, status, message in (
        (FIRST, 123, 404, "Session 123 not found"),
        (456, FIRST, 404, "Session 456 not found"),
        (456, 123, 404, "Sessions 456 and 123 not found"),
        (456, 456, 404, "Session 456 not found"),
        ("12a", FIRST, 400, "The timestamp in the path must be digits (ms since epoch)."),
        (FIRST, "-1", 400, "The timestamp in the path must be digits (ms since epoch)."),
    ):
        got = compared(client, a, b)
        assert (got.status_code, got.get_json()) == (status, {"success": False, "error": message})


@pytest.mark.parametrize("value", [b"[1, 2]", b"not json at all"])
def test_a_record_that_is_not_a_session_is_422(make_app, redis_server, redis_db, session_10kb: bytes,
                                                value: bytes) -> None:
    client = make_app(redis_url=redis_server.url).test_client()
    save(client, orjson.loads(session_10kb), FIRST)
    redis_db.set(f"storyart:session:{SECOND}", value, ex=600)  # another tool wrote it
    got = compared(client, FIRST, SECOND)
    assert got.status_code == 422 and got.get_json()["success"] is False
    assert str(SECOND) in got.get_json()["error"]
    pinned = client.post(f"/api/v1/session/{SECOND}/pin", headers={"Content-Type": "application/json"})
    assert pinned.status_code == 422 and pinned.get_json()["success"] is False  # as a read of it says
    assert not redis_db.smembers("storyart:sessions:pinned") and redis_db.ttl(f"storyart:session:{SECOND}") > 0


def test_reordered_beats_are_not_identical(client: FlaskClient, session_10kb: bytes) -> None:
    """Same beats, other order: every beat matches its twin, yet the sessions are not the same."""
    base = orjson.loads(session_10kb)
    swapped = copy.deepcopy(base)
    swapped["analyzedEpisode"]["scenes"][0]["beats"].reverse()
    save(client, base, FIRST)
    save(client, swapped, SECOND)
    report = compared(client, FIRST, SECOND).get_json()
    assert report["identical"] is False
    assert report["beats"] == {"added": [], "removed": [], "changed": [], "unchanged": len(beats_of(base))}


def test_a_scene_numbered_like_a_position_and_the_scene_at_that_position_do_not_collide(client: FlaskClient) -> None:
    """The first scene's `sceneNumber` is "#2" and the second has none (so it is named "#2" by its position):
    each is matched with itself, the changes of both are reported, and `position` tells them apart; so does a
    beat without a `beatId` in each (matched by its scene and its place there)."""
    def session(titles: tuple[str, str], prompts: tuple[str, str]) -> dict:
        beats = [[{"prompts": {"cinematic": {"prompt": prompt}}}] for prompt in prompts]
        return minimal(analyzedEpisode={"scenes": [
            {"sceneNumber": "#2", "title": titles[0], "beats": beats[0]},
            {"title": titles[1], "beats": beats[1]},
            {"sceneNumber": "#2", "title": "a repeated number", "beats": []},  # named "#3" by its position
        ]})

    save(client, session(("Numbered", "Unnumbered"), ("one", "two")), FIRST)
    save(client, session(("Numbered, retitled", "Unnumbered, retitled"), ("one, rewritten", "two, rewritten")), SECOND)
    report = compared(client, FIRST, SECOND).get_json()
    assert report["identical"] is False
    assert report["scenes"] == {"added": [], "removed": [], "changed": [
        {"sceneNumber": "#2", "added": [], "removed": [], "changed": ["title"]},
        {"sceneNumber": "#2", "position": 2, "added": [], "removed": [], "changed": ["title"]},
    ]}
    changed = ["prompts.cinematic.prompt"]
    assert report["beats"] == {"added": [], "removed": [], "unchanged": 0, "changed": [
        {"beatId": None, "sceneNumber": "#2", "index": 0, "added": [], "removed": [], "changed": changed,
         "prompts": {"cinematic": {"before": "one", "after": "one, rewritten"}}},
        {"beatId": None, "sceneNumber": "#2", "scenePosition": 2, "index": 0, "added": [], "removed": [],
         "changed": changed, "prompts": {"cinematic": {"before": "two", "after": "two, rewritten"}}},
    ]}


# ------------------------------------------------------------------------------------ bounded compares


def short_lines(count: int, seed: int, kinds: int = 120) -> str:
    """`count` lines of 3 characters, `kinds` different ones in a random order: each common enough to match
    almost anywhere on the other side, and rare enough (under 1%) that difflib did not skip it as junk."""
    rng = random.Random(seed)
    lines = [f"{chr(97 + i % 26)}{i // 26:02d}" for i in range(kinds)]
    return "\n".join(rng.choice(lines) for _ in range(count))


def test_a_script_of_80000_short_repeated_lines_is_counted_by_the_coarser_diff(make_app) -> None:
    """The issue's bomb (313 KB: difflib took 48 s on it, quadratic): the exact diff stops after its steps, and
    the counts are a real diff's, marked `exact: false`."""
    client = make_app(local_store="memory").test_client()
    save(client, minimal(scriptText=short_lines(80_000, 1)), FIRST)
    save(client, minimal(scriptText=short_lines(80_000, 2)), SECOND)
    script = compared(client, FIRST, SECOND).get_json()["scriptText"]
    assert script["exact"] is False and script["changed"] is True
    assert script["linesBefore"] == script["linesAfter"] == 80_000
    assert 0 < script["linesAdded"] == script["linesRemoved"] <= 80_000


def test_a_few_edits_in_a_script_of_80000_repeated_lines_are_counted_exactly(make_app) -> None:
    """The same kind of script, 100 lines deleted and 100 copies of its lines inserted: the fewest lines
    added and removed, `exact`."""
    client = make_app(local_store="memory").test_client()
    old = short_lines(80_000, 1).splitlines()
    new = list(old)
    rng = random.Random(8)
    for _ in range(100):
        del new[rng.randrange(len(new))]
    for _ in range(100):
        new.insert(rng.randrange(len(new)), rng.choice(old))
    save(client, minimal(scriptText="\n".join(old)), FIRST)
    save(client, minimal(scriptText="\n".join(new)), SECOND)
    script = compared(client, FIRST, SECOND).get_json()["scriptText"]
    assert script["exact"] is True and 0 < script["linesAdded"] == script["linesRemoved"] <= 100


def test_a_script_of_more_lines_than_the_diff_takes_is_counted_not_diffed(make_app) -> None:
    """Past SCRIPT_MAX_LINES a side (each line would cost the diff ~100 bytes), the lines are counted without
    being split out, and every one counts as replaced: a diff, if the coarsest, `exact: false`."""
    client = make_app(local_store="memory").test_client()
    lines = SCRIPT_MAX_LINES + 1
    save(client, minimal(scriptText="a\n" * lines), FIRST)
    save(client, minimal(scriptText="b\r\n" * lines + "c"), SECOND)
    assert compared(client, FIRST, SECOND).get_json()["scriptText"] == {
        "changed": True, "linesBefore": lines, "linesAfter": lines + 1, "linesAdded": lines + 1,
        "linesRemoved": lines, "exact": False}


def test_a_pair_over_compare_max_bytes_is_a_422_naming_it(make_app, session_1mb: bytes) -> None:
    client = make_app(local_store="memory", compare_max_bytes=1_500_000).test_client()
    save(client, orjson.loads(session_1mb), FIRST)
    save(client, orjson.loads(session_1mb), SECOND)
    for a, b in ((FIRST, SECOND), (FIRST, FIRST)):
        got = compared(client, a, b)
        size = 2 * len(client.get(f"/api/v1/session/{FIRST}/export").data)
        assert (got.status_code, got.get_json()) == (422, {"success": False, "error": (
            f"Sessions {a} and {b} are too large to compare: they hold {size:,} bytes, more than the 1,500,000 a "
            "compare takes (COMPARE_MAX_BYTES).")})


def test_a_pair_of_many_tiny_values_is_a_422_before_it_is_parsed(make_app) -> None:
    """Empty beats cost a worker ~150 bytes each once parsed and compared (600,000 of them: +170 MB and 3.5 s),
    in 1.8 MB: the JSON values are counted first, at most one per 32 bytes of COMPARE_MAX_BYTES."""
    client = make_app(local_store="memory").test_client()
    session = minimal(analyzedEpisode={"scenes": [{"beats": [{}] * 300_000}]})
    save(client, session, FIRST)
    save(client, session, SECOND)
    got = compared(client, FIRST, SECOND)
    limit = 16 * 1024 * 1024 // BYTES_PER_VALUE
    assert (got.status_code, got.get_json()) == (422, {"success": False, "error": (
        f"Sessions {FIRST} and {SECOND} are too large to compare: they hold more than {limit:,} JSON values, the "
        "most a compare takes (one per 32 bytes of COMPARE_MAX_BYTES).")})


def test_an_episode_context_of_many_tiny_values_is_a_422(make_app) -> None:
    """`episodeContext` is a JSON document inside a string: its values count as well, before it is parsed."""
    client = make_app(local_store="memory").test_client()
    context = orjson.dumps({"episode": {"items": [{}] * 300_000}}).decode()
    save(client, minimal(episodeContext=context), FIRST)
    save(client, minimal(scriptText="B", episodeContext=context), SECOND)
    got = compared(client, FIRST, SECOND)
    assert got.status_code == 422
    assert "with their episodeContext documents, they hold more than" in got.get_json()["error"]


def test_a_compare_beyond_compare_concurrency_is_a_503_with_retry_after(make_app, session_10kb: bytes) -> None:
    """Two compares under way in this process (COMPARE_CONCURRENCY=2, their turns held here): a third is
    answered at once, 503 with Retry-After; once one ends, compares are answered again."""
    app = make_app(local_store="memory", compare_concurrency=2)
    client = app.test_client()
    save(client, orjson.loads(session_10kb), FIRST)
    save(client, orjson.loads(session_10kb), SECOND)
    turns = app.extensions["storyart-compares"]
    assert turns.acquire(blocking=False) and turns.acquire(blocking=False)
    try:
        busy = compared(client, FIRST, SECOND)
    finally:
        turns.release()
    assert (busy.status_code, busy.headers["Retry-After"], busy.get_json()) == (503, "1", {"success": False, "error": (
        "The service is comparing other sessions (at most 2 at a time per process, COMPARE_CONCURRENCY); retry in "
        "a second.")})
    assert compared(client, FIRST, SECOND).get_json()["identical"] is True
    turns.release()


# ------------------------------------------------------------------------------------- a real gunicorn


@pytest.mark.slow
def test_compare_bombs_leave_others_answered_and_the_worker_bounded(service: Callable[..., ServiceProcess],
                                                                    session_1mb: bytes) -> None:
    """gunicorn with one worker, so every request meets the compares in one process. Three clients compare
    expensive pairs, each until every pair has been answered twice (a 503 waits its Retry-After, as the page's
    user would): the 80,000-line scripts, two 590 KB sessions of such lines, 260,000 empty beats (just under
    the values a compare takes) and two 17.8 MB sessions (over COMPARE_MAX_BYTES). Meanwhile `/health` and
    `/api/v1/session/latest` are asked in turn: each is answered within 2 s (within one on a quiet machine);
    every compare gets its answer within seconds, and the worker grows by less than 200 MB."""
    server = service("gunicorn", WEB_CONCURRENCY="1", LOG_LEVEL="WARNING")
    padded = orjson.loads(session_1mb)
    pairs = {
        "80,000 lines": [minimal(scriptText=short_lines(80_000, seed)) for seed in (1, 2)],
        "590 KB": [minimal(scriptText=short_lines(116_000, seed)) for seed in (1, 2)],
        "empty beats": [minimal(scriptText=text, analyzedEpisode={"scenes": [{"beats": [{}] * 130_000}]})
                        for text in "AB"],
        "17.8 MB": [{**padded, "padding": str(seed) * 16_800_000} for seed in (1, 2)],
    }
    paths = {}
    for number, (name, (before, after)) in enumerate(pairs.items()):
        stamps = [FIRST + 2 * number, FIRST + 2 * number + 1]
        for session, stamp in zip((before, after), stamps, strict=True):
            assert save_request(server.port, orjson.dumps({**session, "timestamp": stamp})).status == 200
        paths[name] = f"/api/v1/session/{stamps[0]}/compare/{stamps[1]}"
    latest = save_request(server.port, orjson.dumps(minimal(timestamp=SECOND)))  # so /latest reads a small one
    assert latest.status == 200

    done, answers, probes = threading.Event(), [], []

    def bomb(start: int) -> None:
        names = list(paths)
        for turn in range(start, 10_000):
            if done.is_set():
                return
            name = names[turn % len(names)]
            began = time.monotonic()
            got = request(server.port, "GET", paths[name], timeout=30)
            answers.append((name, got, time.monotonic() - began))
            if got.status == 503:
                done.wait(int(got.headers["retry-after"]))

    def probe() -> None:
        for turn in range(1_000_000):
            if done.is_set():
                return
            began = time.monotonic()
            got = request(server.port, "GET", "/health" if turn % 2 else "/api/v1/session/latest", timeout=30)
            probes.append((got.status, time.monotonic() - began))

    def every_pair_answered_twice() -> bool:
        counted = [name for name, got, _ in answers if got.status != 503]
        return all(counted.count(name) >= 2 for name in paths)

    threads = [threading.Thread(target=bomb, args=(start,), daemon=True) for start in range(3)]
    threads.append(threading.Thread(target=probe, daemon=True))
    with PeakRss(server.proc.pid, interval=0.01) as rss:
        for thread in threads:
            thread.start()
        try:
            wait_for(every_pair_answered_twice, "two answers to every pair", timeout=120)
        finally:
            done.set()
            for thread in threads:
                thread.join(60)
    for name, got, took in answers:
        assert got.status in (200, 422, 503) and got.headers["content-type"] == "application/json", (name, got.body)
        assert took < 10, f"a compare of the {name} pair took {took:.1f} s"
    report = {name: got.json() for name, got, _ in answers if got.status != 503}
    assert report["80,000 lines"]["scriptText"]["exact"] is False
    assert report["590 KB"]["scriptText"]["exact"] is False
    assert report["empty beats"]["beats"]["unchanged"] == 130_000
    assert "COMPARE_MAX_BYTES" in report["17.8 MB"]["error"]
    slowest = max(took for _, took in probes)
    assert len(probes) >= 10 and all(status == 200 for status, _ in probes)
    assert slowest < 2, f"a probe waited {slowest:.2f} s while compares ran"
    assert rss.growth < 200 * 2**20, f"the worker grew by {rss.growth / 2**20:.0f} MB"
