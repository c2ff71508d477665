"""People over real processes: a space per user, share links, the activity log and quotas (docs/contract.md §6).

Users are made with the real CLI (`flask --app app users add`), the service runs as gunicorn with 3 workers on a
real Redis (or `python app.py` on its SQLite store), and every request goes over HTTP.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import orjson
import pytest
import yaml

from servers import ROOT, ServiceProcess, request, wait_for

FIXTURES = ROOT / "tests" / "fixtures"
JSON = {"Content-Type": "application/json"}


def cli(users_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `flask --app app users ...`, as an operator runs it beside the service."""
    env = {**os.environ, "USERS_FILE": str(users_file), "REDIS_URL": ""}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "app", "users", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def add_user(users_file: Path, name: str, *options: str) -> str:
    """A new user's token: the last line of `users add` (shown once)."""
    done = cli(users_file, "add", name, *options)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def bearer(token: str) -> dict[str, str]:
    return {**JSON, "Authorization": f"Bearer {token}"}


def session_body(title: str) -> bytes:
    """The team's 10 KB session under another title, without a timestamp (the service assigns one)."""
    session = orjson.loads((FIXTURES / "session-10kb.json").read_bytes())
    session.pop("timestamp", None)
    session["title"] = title
    return orjson.dumps(session)


def save(port: int, token: str | None, title: str) -> int:
    answer = request(port, "POST", "/api/v1/session/save", session_body(title), bearer(token) if token else JSON)
    assert answer.status == 200, answer.body
    return answer.json()["timestamp"]


@pytest.fixture
def two_users(tmp_path: Path) -> tuple[Path, str, str]:
    users_file = tmp_path / "users.json"
    return users_file, add_user(users_file, "Alice"), add_user(users_file, "bob@example.org")


def test_each_user_sees_only_her_own_sessions_on_every_route(service, own_redis, two_users) -> None:
    """Walks every path of openapi.yaml as Bob with Alice's timestamps: each is a 404 like a missing session, or
    (lists, latest, backup, activity, shares) shows none of hers; Redis holds Alice's keys under her prefix only."""
    users_file, alice, bob = two_users
    redis_server = own_redis()
    app = service("gunicorn", REDIS_URL=redis_server.url, USERS_FILE=str(users_file), WEB_CONCURRENCY="3")
    port = app.port
    mine = [save(port, alice, "alice one"), save(port, alice, "alice two")]
    theirs = save(port, bob, "bob one")
    assert request(port, "POST", f"/api/v1/session/{mine[0]}/pin", None, bearer(alice)).status == 200
    share = request(port, "POST", f"/api/v1/session/{mine[0]}/shares", b"", bearer(alice)).json()["share"]

    a, b = mine[0], mine[1]
    as_bob = bearer(bob)
    walked = {
        ("post", "/api/v1/session/save"): lambda: request(port, "POST", "/api/v1/session/save",
                                                           session_body("bob two"), as_bob).status == 200,
        ("get", "/api/v1/session/latest"): lambda: request(port, "GET", "/api/v1/session/latest", None,
                                                            as_bob).json()["data"]["title"] == "bob two",
        ("get", "/api/v1/session/list"): lambda: {s["timestamp"] for s in request(
            port, "GET", "/api/v1/session/list?view=summary", None, as_bob).json()["sessions"]}.isdisjoint(mine),
        ("get", "/api/v1/session/{timestamp}"): lambda: request(port, "GET", f"/api/v1/session/{a}", None,
                                                                 as_bob).status == 404,
        ("delete", "/api/v1/session/{timestamp}"): lambda: request(port, "DELETE", f"/api/v1/session/{a}", None,
                                                                    as_bob).status == 404,
        ("get", "/api/v1/session/{timestamp}/export"): lambda: request(
            port, "GET", f"/api/v1/session/{a}/export", None, as_bob).status == 404,
        ("post", "/api/v1/session/{timestamp}/pin"): lambda: request(port, "POST", f"/api/v1/session/{b}/pin",
                                                                      None, as_bob).status == 404,
        ("delete", "/api/v1/session/{timestamp}/pin"): lambda: request(port, "DELETE", f"/api/v1/session/{a}/pin",
                                                                        None, as_bob).status == 404,
        ("get", "/api/v1/session/{timestamp}/compare/{other}"): lambda: request(
            port, "GET", f"/api/v1/session/{theirs}/compare/{a}", None, as_bob).status == 404,
        ("post", "/api/v1/session/{timestamp}/shares"): lambda: request(
            port, "POST", f"/api/v1/session/{a}/shares", b"", as_bob).status == 404,
        ("get", "/api/v1/shares"): lambda: request(port, "GET", "/api/v1/shares", None, as_bob).json()["shares"] == [],
        ("delete", "/api/v1/shares/{id}"): lambda: request(port, "DELETE", f"/api/v1/shares/{share['id']}", None,
                                                            as_bob).status == 404,
        ("get", "/api/v1/activity"): lambda: all(e["timestamp"] not in mine for e in request(
            port, "GET", "/api/v1/activity", None, as_bob).json()["events"]),
        ("get", "/api/v1/me"): lambda: request(port, "GET", "/api/v1/me", None, as_bob).json()["user"]
        == "bob@example.org",
        ("post", "/api/v1/session/import"): lambda: _import_keeps_hers(port, as_bob, a),
        ("get", "/api/v1/backup"): lambda: f"sessions/{b}.json" not in zipfile.ZipFile(io.BytesIO(request(
            port, "GET", "/api/v1/backup", None, as_bob).body)).namelist(),  # (`a`: Bob imported his own under it)
        ("get", "/api/v1/shared/{token}"): lambda: request(port, "GET", f"/api/v1/shared/{share['token']}").json()
        ["data"]["timestamp"] == a,  # the link opens hers, without a token: what she made it for
    }
    documented = {(method, path) for path, item in yaml.safe_load((ROOT / "openapi.yaml").read_text())["paths"].items()
                  for method in item if method in ("get", "post", "delete") and path.startswith("/api/v1/")
                  and path != "/api/v1/openapi.json"}
    assert documented == set(walked), "walk every API route of openapi.yaml as another user"
    failed = [route for route, check in walked.items() if not check()]
    assert failed == []
    # Alice's sessions are untouched by all of Bob's attempts.
    listed = request(port, "GET", "/api/v1/session/list?view=summary", None, bearer(alice)).json()["sessions"]
    assert sorted(s["timestamp"] for s in listed) == sorted(mine)
    assert [s["pinned"] for s in listed if s["timestamp"] == a] == [True]

    keys = sorted(k.decode() for k in redis_server.client().scan_iter(count=1000))
    print("\n$ redis-cli --scan\n" + "\n".join(keys))
    hers = [k for k in keys if "alice" in k]
    assert hers and all(k.startswith("storyart:{u:alice}:") for k in hers)
    assert not any(str(b) in k for k in keys if not k.startswith("storyart:{u:alice}:"))  # (`a`: Bob's import)
    assert {f"storyart:{{u:alice}}:session:{ts}" for ts in mine} <= set(keys)
    assert not any(k.startswith("storyart:session:") for k in keys)  # nothing in the default user's space


def _import_keeps_hers(port: int, as_bob: dict[str, str], alice_ts: int) -> bool:
    """Bob imports a session under Alice's timestamp: it lands in his space; hers stays as it was."""
    item = orjson.loads(session_body("bob's import"))
    item["timestamp"] = alice_ts
    answer = request(port, "POST", "/api/v1/session/import", orjson.dumps(item), as_bob).json()
    return answer["results"][0]["status"] == "imported" and "{u:bob@example.org}" in answer["results"][0]["sessionKey"]


def test_without_users_a_single_user_needs_no_token_and_keeps_the_public_layout(service, own_redis) -> None:
    redis_server = own_redis()
    app = service("app", REDIS_URL=redis_server.url)
    ts = save(app.port, None, "mine")
    assert request(app.port, "GET", "/api/v1/me").json() == {"success": True, "user": "default", "multiUser": False}
    keys = {k.decode() for k in redis_server.client().scan_iter(count=1000)}
    assert f"storyart:session:{ts}" in keys and "storyart:sessions:index" in keys
    assert not any("{u:" in k for k in keys)


def test_once_a_user_exists_a_request_that_names_none_is_refused(service, tmp_path: Path) -> None:
    users_file = tmp_path / "users.json"
    app = service("app", USERS_FILE=str(users_file))
    before = save(app.port, None, "before users")  # single-user mode: the default user's
    token = add_user(users_file, "carol")
    for method, path in (("GET", "/api/v1/session/latest"), ("GET", f"/api/v1/session/{before}"),
                         ("GET", "/api/v1/activity"), ("POST", "/api/v1/session/save")):
        answer = request(app.port, method, path, b"{}" if method == "POST" else None, JSON)
        assert (answer.status, answer.json()["success"]) == (401, False), path
        assert request(app.port, method, path, b"{}" if method == "POST" else None, bearer("nope")).status == 401
    assert request(app.port, "OPTIONS", "/api/v1/session/latest",
                   headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "GET"}).status == 200
    assert request(app.port, "GET", "/health").status == 200
    assert request(app.port, "GET", "/api/v1/session/latest", None, bearer(token)).status == 404  # hers: empty


def test_a_revoked_token_is_refused_by_every_worker_within_a_second(service, own_redis, two_users) -> None:
    users_file, alice, _ = two_users
    app = service("gunicorn", REDIS_URL=own_redis().url, USERS_FILE=str(users_file), WEB_CONCURRENCY="3")
    seen: set[int] = set()
    wait_for(lambda: seen.add(request(app.port, "GET", "/health").json()["pid"]) or len(seen) == 3,
             "answers from all three workers")
    assert request(app.port, "GET", "/api/v1/me", None, bearer(alice)).status == 200
    done = cli(users_file, "revoke", "alice")
    assert done.returncode == 0, done.stderr
    revoked_at = time.monotonic()
    pids: set[int] = set()
    statuses = []
    while time.monotonic() < revoked_at + 1.0 or len(pids) < 3:  # within a second, on every worker
        statuses.append(request(app.port, "GET", "/api/v1/me", None, bearer(alice)).status)
        pids.add(request(app.port, "GET", "/health").json()["pid"])
    assert set(statuses) == {401}, statuses
    assert pids == seen


def test_a_share_link_opens_without_a_token_and_stops_when_revoked_or_expired(service, own_redis, two_users) -> None:
    users_file, alice, bob = two_users
    redis_server = own_redis()
    app = service("gunicorn", REDIS_URL=redis_server.url, USERS_FILE=str(users_file), WEB_CONCURRENCY="3",
                  SESSION_TTL_SECONDS="3")
    port = app.port
    ts = save(port, alice, "shared")
    pinned = save(port, alice, "pinned")
    assert request(port, "POST", f"/api/v1/session/{pinned}/pin", None, bearer(alice)).status == 200
    made = request(port, "POST", f"/api/v1/session/{pinned}/shares", b'{"expiresInSeconds": 120}', bearer(alice))
    assert made.status == 201
    share = made.json()["share"]
    assert re.fullmatch(r"alice\.[A-Za-z0-9_-]{32}", share["token"])
    assert share["url"] == f"http://127.0.0.1:{port}/s/{share['token']}"
    assert 119_000 <= share["expiresAt"] - share["createdAt"] <= 120_000  # pinned: the asked expiry
    stored = request(port, "GET", f"/api/v1/session/{pinned}", None, bearer(alice))
    for _ in range(4):  # on whichever worker
        opened = request(port, "GET", f"/api/v1/shared/{share['token']}")
        assert opened.status == 200
        assert opened.body == stored.body.replace(b',"storage":"redis"}', b',"sharedBy":"Alice","expiresAt":%d}'
                                                  % share["expiresAt"])
        assert (opened.headers["referrer-policy"], opened.headers["x-robots-tag"]) == ("no-referrer", "noindex")
    page = request(port, "GET", f"/s/{share['token']}")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["x-robots-tag"] == "noindex" and page.headers["referrer-policy"] == "no-referrer"
    assert [s["opened"] for s in request(port, "GET", "/api/v1/shares", None, bearer(alice)).json()["shares"]] == [4]
    assert request(port, "POST", "/api/v1/shares", None, bearer(alice)).status == 405
    assert request(port, "DELETE", f"/api/v1/shares/{share['id']}", None, bearer(bob)).status == 404
    assert request(port, "DELETE", f"/api/v1/shares/{share['id']}", None, bearer(alice)).status == 200
    gone = request(port, "GET", f"/api/v1/shared/{share['token']}")
    assert gone.status == 404
    for token in ("alice." + "A" * 32, "A" * 32, "x", "..", "alice.", share["token"] + "x", "nobody." + "A" * 32):
        assert request(port, "GET", f"/api/v1/shared/{token}").body == gone.body  # never existed: the same
    # A share of a session that expires is capped at its expiry, and stops there.
    short = request(port, "POST", f"/api/v1/session/{ts}/shares", b"", bearer(alice)).json()["share"]
    assert short["expiresAt"] - short["createdAt"] <= 3000
    assert request(port, "GET", f"/api/v1/shared/{short['token']}").status == 200
    wait_for(lambda: request(port, "GET", f"/api/v1/shared/{short['token']}").status == 404, "the share's expiry",
             timeout=10)
    assert time.time() * 1000 >= short["expiresAt"] - 50
    # Bad requests change nothing.
    for body in (b"[]", b"{", b'{"expiresInSeconds": 10}', b'{"expiresInSeconds": 99999999999}',
                 b'{"expiresInSeconds": "60"}'):
        assert request(port, "POST", f"/api/v1/session/{pinned}/shares", body, bearer(alice)).status == 400
    too_large = request(port, "POST", f"/api/v1/session/{pinned}/shares", b" " * 70_000, bearer(alice))
    assert too_large.status == 413
    assert "65,536 bytes" in too_large.json()["error"]  # this request's limit, not MAX_CONTENT_LENGTH's
    assert len(request(port, "GET", "/api/v1/shares", None, bearer(alice)).json()["shares"]) == 2


def test_quota_refusals_store_nothing(service, own_redis, tmp_path: Path) -> None:
    users_file = tmp_path / "users.json"
    small = add_user(users_file, "dana", "--max-sessions", "0", "--max-bytes", "40000")  # no count limit: bytes
    capped = add_user(users_file, "erin")
    redis_server = own_redis()
    app = service("app", REDIS_URL=redis_server.url, USERS_FILE=str(users_file), USER_MAX_SESSIONS="2")
    port = app.port
    save(port, capped, "one")
    save(port, capped, "two")
    keys_before = sorted(redis_server.client().scan_iter(count=1000))
    refused = request(port, "POST", "/api/v1/session/save", session_body("three"), bearer(capped))
    assert refused.status == 403
    assert "USER_MAX_SESSIONS" in refused.json()["error"] and "2" in refused.json()["error"]
    imported = request(port, "POST", "/api/v1/session/import",
                       b"[%s,%s]" % (session_body("four"), session_body("five")), bearer(capped)).json()
    assert [r["status"] for r in imported["results"]] == ["rejected", "rejected"]
    assert "USER_MAX_SESSIONS" in imported["results"][0]["error"]
    assert sorted(redis_server.client().scan_iter(count=1000)) == keys_before
    actions = [e["action"] for e in request(port, "GET", "/api/v1/activity", None, bearer(capped)).json()["events"]]
    assert actions == ["save", "save"]
    # Her own limit: bytes. Three 10 KB sessions fit in 40,000 bytes, a fourth does not.
    for title in ("a", "b", "c"):
        save(port, small, title)
    over = request(port, "POST", "/api/v1/session/save", session_body("d"), bearer(small))
    assert over.status == 403 and "USER_MAX_BYTES" in over.json()["error"]
    assert request(port, "GET", "/api/v1/session/list?view=summary", None, bearer(small)).json()["total"] == 3


@pytest.mark.slow
def test_the_activity_log_holds_exactly_the_actions_in_order_across_an_outage(service, own_redis, two_users) -> None:
    users_file, alice, _ = two_users
    durable = ("--appendonly", "yes", "--appendfsync", "always")
    redis_server = own_redis(*durable)
    app = service("gunicorn", REDIS_URL=redis_server.url, USERS_FILE=str(users_file), WEB_CONCURRENCY="2",
                  REDIS_RETRY_INTERVAL="0.5")
    port = app.port
    first = save(port, alice, "before the outage")
    assert request(port, "POST", f"/api/v1/session/{first}/pin", None, bearer(alice)).status == 200
    redis_server.kill()
    during = request(port, "POST", "/api/v1/session/save", session_body("during"), bearer(alice)).json()
    assert during["storage"] == "memory"
    share = request(port, "POST", f"/api/v1/session/{during['timestamp']}/shares", b"", bearer(alice))
    assert share.status == 201
    assert request(port, "GET", f"/api/v1/shared/{share.json()['share']['token']}").status == 200
    assert request(port, "DELETE", f"/api/v1/session/{first}", None, bearer(alice)).status == 503  # nothing done
    redis_server.restart(*durable)
    wait_for(lambda: request(port, "GET", "/health").json()["localStore"]["sessions"] == 0 and not _pending(app),
             "the write-back")
    events = settled(port, "/api/v1/activity", alice)["events"]
    expected = [("share-opened", during["timestamp"]), ("share", during["timestamp"]), ("save", during["timestamp"]),
                ("pin", first), ("save", first)]
    assert [(e["action"], e["timestamp"]) for e in events] == expected
    assert [e["at"] for e in events] == sorted((e["at"] for e in events), reverse=True)
    assert all(e["from"] == "127.0.0.1" for e in events)
    assert redis_server.client().exists(f"storyart:{{u:alice}}:session:{during['timestamp']}")  # written back, hers
    in_redis = redis_server.client().zrange("storyart:{u:alice}:activity", 0, -1)
    assert [orjson.loads(e)["action"] for e in reversed(in_redis)] == [action for action, _ in expected]
    shares = settled(port, "/api/v1/shares", alice)["shares"]
    assert [(s["opened"], s["revoked"]) for s in shares] == [(1, False)]
    assert redis_server.client().hget("storyart:{u:alice}:shares:opened", shares[0]["id"]) == b"1"


def settled(port: int, path: str, token: str) -> dict:
    """The answer once it comes from Redis: a worker that has not seen Redis back yet answers what it holds, and
    says `partial`."""
    answers: list[dict] = []
    wait_for(lambda: not answers.append(request(port, "GET", path, None, bearer(token)).json())
             and "partial" not in answers[-1], f"an answer of {path} from Redis")
    return answers[-1]


def _pending(app: ServiceProcess) -> bool:
    """Whether the local store still holds shares or activity waiting for Redis (read from its file)."""
    import sqlite3

    with sqlite3.connect(app.env["LOCAL_STORE_PATH"]) as db:
        return any(db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() for table in ("shares", "activity"))


def test_an_auth_proxy_names_the_user_and_a_client_cannot(service, tmp_path: Path) -> None:
    """nginx sets X-Forwarded-User per location (as an auth_request or oauth2-proxy setup does once someone signed
    in); a name the proxy sends for the first time becomes a user; what a client sends itself is overwritten."""
    from test_proxy import Nginx

    users_file = tmp_path / "users.json"
    add_user(users_file, "alice")  # multi-user mode: a request names someone
    app = service("gunicorn", USERS_FILE=str(users_file), TRUSTED_PROXY_HOPS="1", AUTH_PROXY_HEADER="X-Forwarded-User",
                  ALLOWED_HOSTS="storyart.example")
    nginx = Nginx(tmp_path / "nginx", app.port)
    locations = "\n".join(f"""    location /as-{name}/ {{
        proxy_pass http://127.0.0.1:{app.port}/;
        proxy_set_header Host storyart.example;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-User "{name}";
    }}""" for name in ("alice", "frank"))
    (nginx.prefix / "storyart.conf").write_text(
        f"server {{\n    listen 127.0.0.1:{nginx.port};\n{locations}\n}}\n", encoding="utf-8")
    nginx.start()
    try:
        as_alice = request(nginx.port, "POST", "/as-alice/api/v1/session/save", session_body("via proxy"),
                           {**JSON, "X-Forwarded-User": "frank"})
        assert as_alice.status == 200 and as_alice.json()["sessionKey"].startswith("storyart:{u:alice}:")
        ts = as_alice.json()["timestamp"]
        frank = request(nginx.port, "GET", "/as-frank/api/v1/me", None, {"X-Forwarded-User": "alice"}).json()
        assert frank["user"] == "frank"
        assert request(nginx.port, "GET", f"/as-frank/api/v1/session/{ts}").status == 404
        assert request(nginx.port, "GET", f"/as-alice/api/v1/session/{ts}").status == 200
        assert "frank" in orjson.loads(users_file.read_bytes())["users"]
    finally:
        nginx.stop()



def test_a_backup_takes_every_users_sessions_and_a_restore_puts_each_back_in_her_space(service, own_redis,
                                                                                       two_users, tmp_path) -> None:
    users_file, alice, bob = two_users
    redis_server = own_redis()
    app = service("app", REDIS_URL=redis_server.url, USERS_FILE=str(users_file), API_TOKEN="default-token-0123456789")
    port = app.port
    hers, his = save(port, alice, "hers"), save(port, bob, "his")
    mine = save(port, "default-token-0123456789", "the default user's")
    assert request(port, "POST", f"/api/v1/session/{hers}/pin", None, bearer(alice)).status == 200
    env = {**os.environ, "USERS_FILE": str(users_file), "REDIS_URL": redis_server.url,
           "LOCAL_STORE_PATH": app.env["LOCAL_STORE_PATH"]}

    def flask(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flask", "--app", "app", "sessions", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    target = tmp_path / "all.zip"
    assert flask("backup", str(target)).returncode == 0
    with zipfile.ZipFile(target) as archive:
        names = set(archive.namelist())
        manifest = orjson.loads(archive.read("manifest.json"))
    assert names == {f"sessions/{mine}.json", f"users/alice/{hers}.json", f"users/bob@example.org/{his}.json",
                     "manifest.json"}
    assert {(e.get("owner"), e["timestamp"], e["pinned"]) for e in manifest["sessions"]} == {
        (None, mine, False), ("alice", hers, True), ("bob@example.org", his, False)}
    # Alice's own download has hers only.
    with zipfile.ZipFile(io.BytesIO(request(port, "GET", "/api/v1/backup", None, bearer(alice)).body)) as archive:
        assert set(archive.namelist()) == {f"users/alice/{hers}.json", "manifest.json"}
    before = {who: request(port, "GET", f"/api/v1/session/{ts}", None, bearer(token)).body
              for who, ts, token in (("alice", hers, alice), ("bob", his, bob))}
    redis_server.client().flushall()
    restored = flask("restore", str(target))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    for who, ts, token in (("alice", hers, alice), ("bob", his, bob)):
        assert request(port, "GET", f"/api/v1/session/{ts}", None, bearer(token)).body == before[who]
    assert request(port, "GET", f"/api/v1/session/{hers}", None, bearer(bob)).status == 404
    listed = request(port, "GET", "/api/v1/session/list?view=summary", None, bearer(alice)).json()["sessions"]
    assert [(s["timestamp"], s["pinned"]) for s in listed] == [(hers, True)]
    assert redis_server.client().exists(f"storyart:session:{mine}", f"storyart:{{u:alice}}:session:{hers}") == 2
