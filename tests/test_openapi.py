"""`openapi.yaml` stays true: it names exactly the routes Flask serves, every status the service answers is
documented for its operation with a body of the documented shape and the documented headers, and a
schemathesis run against a live gunicorn finds no 5xx and no response the document does not describe."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import schemathesis
import yaml
from flask.testing import FlaskClient

from servers import ROOT
from users import Users

SPEC_PATH = ROOT / "openapi.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
SPEC_OPERATIONS = [(path, method) for path, item in SPEC["paths"].items() for method in item if method in HTTP_METHODS]
AUTOMATIC = {"HEAD", "OPTIONS"}  # Flask answers these for every GET / every route; the spec says so once
JSON = {"Content-Type": "application/json"}
TOKEN = "test-token-0123456789abcdef"

# What the schemathesis run checks. Left out, on purpose:
# negative_data_rejection: an import reports a schema-violating item as `rejected` inside a 200, by design;
# positive_data_acceptance: JSON Schema counts `5.0` as an integer, the service refuses it as a timestamp,
#   and a schema cannot say "at most one day ahead of the server's clock".
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,use_after_free,ensure_resource_availability,unsupported_method,"
          "allow_header_conformance")
MAX_EXAMPLES = 50


def session(**extra: object) -> dict:
    return {"scriptText": "INT. LAB - NIGHT", "episodeContext": "{}", "storyUuid": "u-1",
            "analyzedEpisode": {"episodeNumber": 1, "title": "Pilot", "scenes": [{"beats": [{}, {}]}]}, **extra}


def template(path: str) -> str:
    """`/a/<conv:name>/b` and `/a/{name}/b` both as `/a/{}/b`."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", path)


# ------------------------------------------------------------------------------------- routes vs document


def test_every_flask_route_is_in_the_document_and_every_documented_one_is_served(make_app) -> None:
    app = make_app()
    served = {(template(rule.rule), method) for rule in app.url_map.iter_rules() if rule.endpoint != "static"
              for method in rule.methods - AUTOMATIC}
    documented = {(template(path), method.upper()) for path, item in SPEC["paths"].items()
                  for method in item if method in HTTP_METHODS}
    assert served - documented == set(), "served but not in openapi.yaml"
    assert documented - served == set(), "in openapi.yaml but not served"


def test_path_templates_declare_their_parameters() -> None:
    for path, item in SPEC["paths"].items():
        for method in (m for m in item if m in HTTP_METHODS):
            declared = {resolve(p)["name"] for p in [*item.get("parameters", []), *item[method].get("parameters", [])]
                        if resolve(p)["in"] == "path"}
            assert declared == set(re.findall(r"\{([^}]+)\}", path)), f"{method.upper()} {path}"


def test_schemathesis_loads_every_operation() -> None:
    loaded = schemathesis.openapi.from_path(SPEC_PATH)
    labels = sorted(result.ok().label for result in loaded.get_all_operations())  # .ok() raises on a broken one
    assert len(labels) == len(SPEC_OPERATIONS)


def test_the_document_is_served_as_json(make_app) -> None:
    got = make_app().test_client().get("/api/v1/openapi.json")
    assert got.status_code == 200 and got.mimetype == "application/json"
    assert orjson.loads(got.data) == SPEC


# ---------------------------------------------------------------------- every status, shape and header


@pytest.fixture(scope="module")
def document() -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_path(SPEC_PATH)


def resolve(node: dict) -> dict:
    """Follow `$ref`s (all local: `#/components/...`)."""
    while "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def conforms(document: schemathesis.BaseSchema, path: str, method: str, response) -> None:
    """The status is documented for the operation, the body has the documented shape, the documented
    required headers are there, and a body is JSON exactly when one is documented."""
    responses = SPEC["paths"][path][method.lower()]["responses"]
    status = str(response.status_code)
    assert status in responses, f"{method} {path} answered an undocumented {status}: {response.data[:200]!r}"
    documented = resolve(responses[status])
    for name, header in documented.get("headers", {}).items():
        if resolve(header).get("required"):
            assert name in response.headers, f"{method} {path} {status} lacks the {name} header"
    if "content" in documented and "application/json" not in documented["content"]:
        assert response.mimetype in documented["content"] and response.data  # a file: its type, no schema
    elif "content" in documented:
        assert response.mimetype == "application/json"
        document[path][method].validate_response(response)  # raises, naming the mismatch
    else:
        assert response.data == b""


def test_save_get_list_export_delete_import_conform(make_app, document, redis_server, redis_db, tmp_path) -> None:
    for settings in ({"local_store_path": tmp_path / "alone.sqlite3"}, {"redis_url": redis_server.url}):
        client = make_app(**settings).test_client()  # a fresh local store each time
        saved = client.post("/api/v1/session/save", data=orjson.dumps(session()), headers=JSON)
        conforms(document, "/api/v1/session/save", "POST", saved)
        ts = saved.get_json()["timestamp"]
        latest = client.get("/api/v1/session/latest")
        conforms(document, "/api/v1/session/latest", "GET", latest)
        for path in ("/api/v1/session/latest", f"/api/v1/session/{ts}"):
            templated = "/api/v1/session/latest" if path.endswith("latest") else "/api/v1/session/{timestamp}"
            conforms(document, templated, "GET", client.get(path))
            unchanged = client.get(path, headers={"If-None-Match": latest.headers["ETag"]})
            assert unchanged.status_code == 304
            conforms(document, templated, "GET", unchanged)
        for query in ("", "?view=summary", "?view=summary&storyUuid=u-1&episode=1&q=pil", f"?before={ts + 1}",
                      f"?since={ts}&until={ts}&limit=100&offset=0"):
            listed = client.get(f"/api/v1/session/list{query}")
            assert listed.get_json()["count"] == 1
            conforms(document, "/api/v1/session/list", "GET", listed)
        conforms(document, "/api/v1/session/{timestamp}/export", "GET", client.get(f"/api/v1/session/{ts}/export"))
        changed = client.post("/api/v1/session/save", headers=JSON, data=orjson.dumps(session(
            promptMode="manual", analyzedEpisode={"scenes": [{"beats": [{"prompts": {"x": "y"}}, {"beatId": "b"}]}]})))
        compared = client.get(f"/api/v1/session/{ts}/compare/{changed.get_json()['timestamp']}")
        assert all(compared.get_json()["beats"][part] for part in ("added", "removed", "changed"))
        conforms(document, "/api/v1/session/{timestamp}/compare/{other}", "GET", compared)
        imported = client.post("/api/v1/session/import", headers=JSON, data=orjson.dumps(
            [session(timestamp=ts), session(), {"scriptText": ""}, 7]))
        assert imported.get_json()["replaced"] == 1 and imported.get_json()["rejected"] == 2
        conforms(document, "/api/v1/session/import", "POST", imported)
        conforms(document, "/api/v1/session/{timestamp}", "DELETE", client.delete(f"/api/v1/session/{ts}"))
        conforms(document, "/api/v1/backup", "GET", client.get("/api/v1/backup"))
        conforms(document, "/health", "GET", client.get("/health"))
        conforms(document, "/health/ready", "GET", client.get("/health/ready"))
        conforms(document, "/api/v1/openapi.json", "GET", client.get("/api/v1/openapi.json"))


def test_errors_conform(make_app, document) -> None:
    client: FlaskClient = make_app(max_content_length=1024).test_client()
    cases = [
        ("/api/v1/session/latest", "GET", client.get("/api/v1/session/latest"), 404),
        ("/api/v1/session/{timestamp}", "GET", client.get("/api/v1/session/123"), 404),
        ("/api/v1/session/{timestamp}", "GET", client.get("/api/v1/session/12a"), 400),
        ("/api/v1/session/{timestamp}", "GET", client.get("/api/v1/session/save"), 405),
        ("/api/v1/session/{timestamp}", "DELETE", client.delete("/api/v1/session/import"), 405),
        ("/api/v1/session/{timestamp}", "DELETE", client.delete("/api/v1/session/123"), 404),
        ("/api/v1/session/{timestamp}", "DELETE", client.delete("/api/v1/session/x"), 400),
        ("/api/v1/session/{timestamp}/export", "GET", client.get("/api/v1/session/123/export"), 404),
        ("/api/v1/session/{timestamp}/export", "GET", client.get("/api/v1/session/-1/export"), 400),
        ("/api/v1/session/{timestamp}/compare/{other}", "GET", client.get("/api/v1/session/1/compare/2"), 404),
        ("/api/v1/session/{timestamp}/compare/{other}", "GET", client.get("/api/v1/session/1/compare/x"), 400),
        ("/api/v1/session/list", "GET", client.get("/api/v1/session/list?limit=101"), 400),
        ("/api/v1/session/list", "GET", client.get("/api/v1/session/list?view=all"), 400),
        ("/api/v1/session/save", "POST", client.post("/api/v1/session/save", data=b"{}", headers=JSON), 400),
        ("/api/v1/session/save", "POST", client.post("/api/v1/session/save", data=b"{"), 415),
        ("/api/v1/session/save", "POST",
         client.post("/api/v1/session/save", data=b" " * 2048, headers=JSON), 413),
        ("/api/v1/session/import", "POST", client.post("/api/v1/session/import", data=b"[]", headers=JSON), 400),
        ("/api/v1/session/import", "POST", client.post("/api/v1/session/import", data=b"[]"), 415),
        ("/api/v1/session/import", "POST",
         client.post("/api/v1/session/import", data=b" " * 2048, headers=JSON), 413),
    ]
    for path, method, response, status in cases:
        assert response.status_code == status, (method, path, response.data)
        conforms(document, path, method, response)


def test_a_compare_too_large_or_busy_conforms(make_app, document) -> None:
    app = make_app(compare_max_bytes=1024)
    client = app.test_client()
    stamps = [client.post("/api/v1/session/save", data=orjson.dumps(session(scriptText="x" * 600)),
                          headers=JSON).get_json()["timestamp"] for _ in range(2)]
    path = f"/api/v1/session/{stamps[0]}/compare/{stamps[1]}"
    too_large = client.get(path)
    assert too_large.status_code == 422 and "COMPARE_MAX_BYTES" in too_large.get_json()["error"]
    conforms(document, "/api/v1/session/{timestamp}/compare/{other}", "GET", too_large)
    turns = app.extensions["storyart-compares"]
    assert turns.acquire(blocking=False)  # a compare under way in this process
    try:
        busy = client.get(path)
    finally:
        turns.release()
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    conforms(document, "/api/v1/session/{timestamp}/compare/{other}", "GET", busy)


def test_401_with_a_token_conforms_and_health_needs_none(make_app, document) -> None:
    client = make_app(api_token=TOKEN).test_client()
    for path, item in SPEC["paths"].items():
        concrete = path.replace("{timestamp}", "123")
        for method in (m for m in item if m in HTTP_METHODS):
            response = client.open(concrete, method=method.upper(), data=b"{}", headers=JSON)
            secured = item[method].get("security", SPEC["security"])
            if secured:
                assert response.status_code == 401, (method, path)
                assert response.headers["WWW-Authenticate"] == 'Bearer realm="storyart"'
            else:  # open to anyone; a share link that does not exist (`{token}` is none) is a 404
                assert response.status_code == (404 if path == "/api/v1/shared/{token}" else 200), (method, path)
            conforms(document, path, method.upper(), response)
    authorized = client.get("/api/v1/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    assert authorized.status_code == 200


def test_users_shares_activity_and_quotas_conform(make_app, document, redis_server, redis_db, tmp_path) -> None:
    """Two users, in Redis: who is signed in, a quota refusal, a share made, listed, opened, revoked and gone,
    another user's session and share as 404s, the activity log and its bad page, and the 401 without a token."""
    people = Users.open(tmp_path / "users.json")
    alice = {"Authorization": f"Bearer {people.add('Alice', max_sessions=1)[1]}", **JSON}
    bob = {"Authorization": f"Bearer {people.add('bob')[1]}", **JSON}
    client = make_app(redis_url=redis_server.url, users_file=tmp_path / "users.json").test_client()
    me = client.get("/api/v1/me", headers=alice)
    assert me.get_json() == {"success": True, "user": "Alice", "multiUser": True}
    conforms(document, "/api/v1/me", "GET", me)
    conforms(document, "/api/v1/me", "GET", client.get("/api/v1/me"))  # 401
    saved = client.post("/api/v1/session/save", data=orjson.dumps(session()), headers=alice)
    assert saved.get_json()["sessionKey"].startswith("storyart:{u:alice}:session:")
    conforms(document, "/api/v1/session/save", "POST", saved)
    over = client.post("/api/v1/session/save", data=orjson.dumps(session()), headers=alice)
    assert over.status_code == 403 and "USER_MAX_SESSIONS" in over.get_json()["error"]
    conforms(document, "/api/v1/session/save", "POST", over)
    ts = saved.get_json()["timestamp"]
    shares = "/api/v1/session/{timestamp}/shares"
    made = client.post(f"/api/v1/session/{ts}/shares", data=b'{"expiresInSeconds": 3600}', headers=alice)
    assert made.status_code == 201 and made.get_json()["share"]["token"].startswith("alice.")
    conforms(document, shares, "POST", made)
    for body, headers, status in ((b"", alice, 201), (b"[]", alice, 400), (b'{"expiresInSeconds": 1}', alice, 400),
                                  (b"", bob, 404)):
        answer = client.post(f"/api/v1/session/{ts}/shares", data=body, headers=headers)
        assert answer.status_code == status, (body, answer.data)
        conforms(document, shares, "POST", answer)
    share = made.get_json()["share"]
    opened = client.get(f"/api/v1/shared/{share['token']}")
    assert opened.get_json()["sharedBy"] == "Alice"
    conforms(document, "/api/v1/shared/{token}", "GET", opened)
    conforms(document, "/s/{token}", "GET", client.get(f"/s/{share['token']}"))
    listed = client.get("/api/v1/shares", headers=alice)
    assert [(s["id"], s["opened"]) for s in listed.get_json()["shares"]][-1] == (share["id"], 1)
    conforms(document, "/api/v1/shares", "GET", listed)
    for headers, status in ((bob, 404), (alice, 200), (alice, 200)):
        revoked = client.delete(f"/api/v1/shares/{share['id']}", headers=headers)
        assert revoked.status_code == status
        conforms(document, "/api/v1/shares/{id}", "DELETE", revoked)
    gone = client.get(f"/api/v1/shared/{share['token']}")
    assert gone.status_code == 404
    conforms(document, "/api/v1/shared/{token}", "GET", gone)
    activity = client.get("/api/v1/activity?limit=10", headers=alice)
    assert [e["action"] for e in activity.get_json()["events"]] == ["revoke", "share-opened", "share", "share", "save"]
    conforms(document, "/api/v1/activity", "GET", activity)
    conforms(document, "/api/v1/activity", "GET", client.get("/api/v1/activity?limit=0", headers=alice))  # 400


def test_503_with_retry_after_and_not_ready_conform(make_app, document) -> None:
    """Redis configured but dead (nothing listens on port 1) and a session larger than memory may hold."""
    app = make_app(redis_url="redis://127.0.0.1:1/0", local_max_bytes=1024, redis_connect_timeout=0.5)
    client = app.test_client()
    full = client.post("/api/v1/session/save", data=orjson.dumps(session(scriptText="x" * 4096)), headers=JSON)
    assert full.status_code == 503 and int(full.headers["Retry-After"]) >= 1
    conforms(document, "/api/v1/session/save", "POST", full)
    backup = client.get("/api/v1/backup")
    assert backup.status_code == 503 and int(backup.headers["Retry-After"]) >= 1
    conforms(document, "/api/v1/backup", "GET", backup)
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    conforms(document, "/health/ready", "GET", ready)
    health = client.get("/health")
    assert health.get_json()["status"] == "degraded"
    conforms(document, "/health", "GET", health)


# ---------------------------------------------------------------------------------- schemathesis, live


@pytest.mark.slow
def test_schemathesis_against_live_gunicorn_finds_nothing(service, redis_server, redis_db, tmp_path: Path,
                                                         capsys) -> None:
    """Every operation, a bounded number of examples each, against gunicorn (3 workers, Redis). The CLI is
    given the file and the live server's URL: loading the document from /api/v1/openapi.json makes
    schemathesis 4.32 leave that operation out (test_the_document_is_served_as_json covers the two being
    equal)."""
    server = service("gunicorn", REDIS_URL=redis_server.url)
    base = f"http://127.0.0.1:{server.port}"
    report = tmp_path / "schemathesis.json"
    command = [sys.executable, "-m", "schemathesis.cli", "run", str(SPEC_PATH), "--url", base,
               "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--seed", "20261124",
               "--generation-database", "none", "--request-timeout", "10",
               "--report", "json", "--report-json-path", str(report), "--no-color"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert report.exists(), run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(report.read_text())
    statuses = [int(m.group(1)) for m in re.finditer(r"storyart\.access: \S+ \S+ \S+ (\d{3}) ", server.log())]
    figures = (f"schemathesis {result['schemathesis_version']}: {result['operations']['tested']} operations, "
               f"{result['test_cases']['generated']} examples, {result['test_cases']['with_failures']} failing "
               f"({len(result['failures'])} unique failures, {len(result['errors'])} errors) in "
               f"{result['running_time']:.1f}s; the server logged {len(statuses)} requests, "
               f"{sum(s >= 500 for s in statuses)} of them 5xx")
    with capsys.disabled():
        print(f"\n{figures}")
    assert run.returncode == 0, run.stdout[-8000:]
    assert result["operations"]["tested"] == result["operations"]["total"] == len(SPEC_OPERATIONS)
    assert result["test_cases"]["with_failures"] == 0 and result["failures"] == [] and result["errors"] == []
    assert result["test_cases"]["generated"] >= len(SPEC_OPERATIONS) * 5, figures
    assert statuses and max(statuses) < 500, figures

