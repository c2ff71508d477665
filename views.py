"""The API's views, each a thin step from the request to `storage.py` and back through `responses.py`.

They are module-level functions on one blueprint. What each answers is in `openapi.yaml`; the promises in
docs/contract.md §1.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, NoReturn

import orjson
import yaml
from flask import Blueprint, Response, abort, current_app, g, request, stream_with_context
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge
from werkzeug.routing import BaseConverter

from allocator import now_ms
from backup import default_name, stream
from compare import Budget, TooLarge, compare
from identity import Caller, loggable_address
from payload import Draft, PayloadError, content_hash, draft_from, parse_json, parse_session, value_limit
from responses import error, json_response, list_item, session_response, summary_item
from storage import (
    DEFAULT_OWNER,
    EVERY,
    Event,
    NotASession,
    Query,
    RedisState,
    SessionStorage,
    Share,
    StorageUnavailable,
    WhenFull,
)
from users import is_key

SERVICE_NAME = "storyart-session"
LIST_MAX = 100  # the largest page; without `limit` a list has every session
ACTIVITY_MAX = 500  # the most events one activity page has
DEFAULT_SHARE_SECONDS = 7 * 86_400
_SHARE_ID = re.compile(r"[0-9a-f]{16}")
_SHARE_SECRET = re.compile(r"[A-Za-z0-9_-]{32}")  # `secrets.token_urlsafe(24)`
# A share link's answer: no Referer carries the token on, no search engine keeps it, no cache keeps the session.
_SHARED_HEADERS = {"Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex", "Cache-Control": "no-store"}
MAX_TIMESTAMP = 2**53  # the largest integer a browser's JSON.parse reads exactly
OPENAPI_PATH = Path(__file__).resolve().with_name("openapi.yaml")
MESSAGES = {
    400: "The request is malformed.",
    404: "No such endpoint: {method} {path}.",
    405: "Method {method} is not allowed for {path}.",
    413: "The request body is larger than the limit of {limit} bytes (MAX_CONTENT_LENGTH).",
    415: "The request body must be declared as JSON (Content-Type: application/json).",
}

api = Blueprint("api", __name__)


class SessionIdConverter(BaseConverter):
    """Match a session id: any path segment but the POST-only action names.

    Excluding those makes `GET /api/v1/session/save` a 405, not a bad timestamp; the view itself answers non-digits with
    400 as docs/contract.md §1 asks.
    """

    regex = r"(?!(?:save|import|latest|list)$)[^/]+"


def _root() -> SessionStorage:
    """The storage as the service sees it (the default user's space): for /health and the share links."""
    return current_app.extensions["storyart"]


def _caller() -> Caller:
    return g.get("caller") or current_app.extensions["storyart-identity"].default


def _storage() -> SessionStorage:
    """The storage in the request's user's space: every session view sees hers only."""
    return _root().space(_caller().owner)


def _event(action: str, timestamp: int | None = None, share_id: str | None = None) -> Event:
    """An activity event of this request (docs/contract.md §6), stored with the change it records."""
    return Event(secrets.token_hex(8), now_ms(), action, loggable_address(request.remote_addr), timestamp, share_id)


_QUOTA_TURNS: dict[str, threading.Lock] = {}  # a user with quotas saves one at a time in each process


@contextmanager
def _quota_turn() -> Iterator[None]:
    """Hold the caller's turn to save while her quota is counted, when she has one (no one else waits)."""
    caller = _caller()
    if not caller.has_quota:
        yield
        return
    with _QUOTA_TURNS.setdefault(caller.owner, threading.Lock()):
        yield


def _over_quota(draft: Draft, space: SessionStorage, caller: Caller) -> str | None:
    """Why saving `draft` would pass the caller's quota (USER_MAX_SESSIONS, USER_MAX_BYTES), or None.

    Counted from what her space holds now; the same user's saves in other processes at the same moment may each
    pass it by one (docs/decisions.md, "Quotas")."""
    if not caller.has_quota:
        return None
    sessions, size = space.usage()
    replaced = space.get(draft.timestamp) if draft.timestamp is not None else None
    sessions += 0 if replaced else 1
    size += len(draft.head) + 20 - (len(replaced.body) if replaced else 0)
    if caller.max_sessions and sessions > caller.max_sessions:
        return (f"Quota reached: {caller.name} may keep {caller.max_sessions:,} sessions (USER_MAX_SESSIONS) and "
                f"keeps {sessions - 1:,}; delete some first. Nothing was saved.")
    if caller.max_bytes and size > caller.max_bytes:
        return (f"Quota reached: {caller.name} may keep {caller.max_bytes:,} bytes of sessions (USER_MAX_BYTES); "
                f"this save would make it {size:,}. Delete some first. Nothing was saved.")
    return None


@cache
def openapi_json() -> bytes:
    """`openapi.yaml` as JSON, read and converted once per process (on first use)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it
    return orjson.dumps(yaml.load(OPENAPI_PATH.read_text(encoding="utf-8"), Loader=loader))


@api.post("/api/v1/session/save")
def save() -> Response:
    if request.mimetype != "application/json":
        return error(415, MESSAGES[415])
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    try:
        draft = parse_session(_request_body(limit), now_ms(), value_limit(limit))
    except PayloadError as exc:
        return error(exc.status, str(exc))
    space = _storage()
    with _quota_turn():
        if refused := _over_quota(draft, space, _caller()):
            return error(403, refused)
        timestamp, where = space.save(draft, event=_event("save", draft.timestamp))
    return json_response({
        "success": True,
        "message": "Session saved successfully",
        "sessionKey": space.keys.session_key(timestamp),
        "timestamp": timestamp,
        "storage": where,
    })


@api.get("/api/v1/session/latest")
def latest() -> Response:
    found, partial = _storage().latest()
    return session_response(found, partial) if found else error(404, "No session found")


@api.get("/api/v1/session/list")
def list_sessions() -> Response:
    """List the stored sessions, streamed as they are read.

    Streamed: the sessions go out as they are read, a few at a time, so a bare list of every session (what
    the StoryArt session browser asks for) costs a worker the memory of a few sessions, not of all of them.
    """
    try:
        query, summaries = _list_query()
    except ValueError as exc:
        return error(400, str(exc))
    space = _storage()
    listing = space.listing(query, summaries)
    item = summary_item if summaries else list_item

    def generate() -> Iterator[bytes]:
        yield b'{"success":true,"sessions":['
        count = 0
        for row in listing.rows:
            yield b"," + item(row, space.keys) if count else item(row, space.keys)
            count += 1
        yield b'],"count":%d,"total":%d%s%s}' % (
            count, listing.total, b',"skipped":%d' % listing.skipped if listing.skipped else b"",
            b',"partial":true' if listing.partial else b"")

    return Response(stream_with_context(generate()), mimetype="application/json")


@api.get("/api/v1/session/<session_id:raw>")
def get_session(raw: str) -> Response:
    found = _storage().get(_timestamp(raw))
    return session_response(found) if found else error(404, "Session not found")


@api.get("/api/v1/session/<session_id:raw>/export")
def export_session(raw: str) -> Response:
    timestamp = _timestamp(raw)
    found = _storage().get(timestamp)
    if not found:
        return error(404, "Session not found")
    disposition = f'attachment; filename="storyart-session-{timestamp}.json"'
    return Response(found.body, mimetype="application/json", headers={"Content-Disposition": disposition})


@api.get("/api/v1/session/<session_id:raw>/compare/<session_id:other>")
def compare_sessions(raw: str, other: str) -> Response:
    """Answer what changed from session `raw` to session `other` (see `compare.py`).

    The compare is bounded as docs/contract.md §1 says: a compare that finds COMPARE_CONCURRENCY others under way in
    this process is a 503 at once (one holds the GIL for up to a second or two: more at once would keep other requests
    from their answers), and a pair over COMPARE_MAX_BYTES a 422 before it is parsed.
    """
    stamps = (_timestamp(raw), _timestamp(other))
    config = current_app.config["STORYART"]
    turns = current_app.extensions["storyart-compares"]
    if not turns.acquire(blocking=False):
        return error(503, f"The service is comparing other sessions (at most {config.compare_concurrency} at a time "
                          "per process, COMPARE_CONCURRENCY); retry in a second.", {"Retry-After": "1"})
    try:
        return _compared(stamps, Budget(config.compare_max_bytes))
    finally:
        _give_back_freed_heap()
        turns.release()


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; other C libraries may lack it
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def _give_back_freed_heap() -> None:
    """Hand the heap a compare freed back to the kernel.

    Each thread allocates from its own glibc arena, which keeps up to 64 MB free (gunicorn.conf.py): compares served one
    after another by different threads of a worker otherwise left it 180-220 MB larger after ten seconds of them, though
    only one ran at a time.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@contextmanager
def _without_cycle_collection() -> Iterator[None]:
    """Keep Python's cycle collector off while a compare runs.

    Parsing two sessions and comparing them makes up to a million objects and no reference cycle, yet each
    batch of new objects sets off Python's cycle collector, whose full passes over every object in the worker
    hold the GIL all along: 130,000 empty beats a side took 0.55-0.63 s of CPU with it, 0.34 s without, and
    other requests waited up to a second. The collector is off for that while (at most a few seconds, the
    budget sees to it): whatever cycles other threads leave meanwhile are collected after.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _compared(stamps: tuple[int, int], budget: Budget) -> Response:
    found = [_storage().get(timestamp) for timestamp in stamps]
    missing = list(dict.fromkeys(str(timestamp) for timestamp, row in zip(stamps, found, strict=True) if row is None))
    if missing:
        return error(404, f"Session{'s' if len(missing) > 1 else ''} {' and '.join(missing)} not found")
    bodies = [row.body for row in found]
    del found  # from here on only the bodies, then only what is parsed from them
    try:
        budget.take(bodies, "they")
        with _without_cycle_collection():
            before, after = orjson.loads(bodies[0]), orjson.loads(bodies[1])
            del bodies
            report = compare(before, after, budget)
    except TooLarge as exc:
        return error(422, f"Sessions {stamps[0]} and {stamps[1]} are too large to compare: {exc}.")
    return json_response({"success": True, "from": stamps[0], "to": stamps[1], **report})


@api.delete("/api/v1/session/<session_id:raw>")
def delete_session(raw: str) -> Response:
    timestamp = _timestamp(raw)
    space = _storage()
    if not space.delete(timestamp, event=_event("delete", timestamp)):
        return error(404, "Session not found")
    return json_response({"success": True, "message": "Session deleted",
                          "sessionKey": space.keys.session_key(timestamp), "timestamp": timestamp})


@api.post("/api/v1/session/<session_id:raw>/pin")
def pin_session(raw: str) -> Response:
    """Keep the session forever (until unpinned): caps and pruning never drop it."""
    return _pin(raw, pinned=True)


@api.delete("/api/v1/session/<session_id:raw>/pin")
def unpin_session(raw: str) -> Response:
    """Let the session expire again: its TTL starts now."""
    return _pin(raw, pinned=False)


def _pin(raw: str, *, pinned: bool) -> Response:
    timestamp = _timestamp(raw)
    space = _storage()
    if not space.pin(timestamp, pinned, event=_event("pin" if pinned else "unpin", timestamp)):
        return error(404, "Session not found")
    return json_response({"success": True, "timestamp": timestamp, "sessionKey": space.keys.session_key(timestamp),
                          "pinned": pinned})


@api.post("/api/v1/session/import")
def import_sessions() -> Response:
    """Import one session or an array of them, as exported, keeping their timestamps.

    Each item is validated like `save`. Bounded by IMPORT_MAX_ITEMS (413 before anything is stored) and
    IMPORT_TIME_LIMIT_SECONDS (the items not reached by then are reported `skipped`, so the answer comes well within the
    60 s a proxy waits). A retry stores nothing twice: an item with a timestamp replaces itself, and one without gets
    the timestamp it got the first time (its save id is its content's hash).
    """
    if request.mimetype != "application/json":
        return error(415, MESSAGES[415])
    limit, config = current_app.config["MAX_CONTENT_LENGTH"], current_app.config["STORYART"]
    try:
        parsed = parse_json(_request_body(limit), value_limit(limit))  # the whole body: all its sessions at once
    except PayloadError as exc:
        return error(exc.status, str(exc))
    if not isinstance(parsed, dict | list) or parsed == []:
        return error(400, "The import body must be a session object or a non-empty array of them.")
    items = parsed if isinstance(parsed, list) else [parsed]
    if len(items) > config.import_max_items:
        return error(413, f"The import has {len(items):,} items; at most {config.import_max_items:,} are taken per "
                          "request (IMPORT_MAX_ITEMS): send them in parts. Nothing was imported.")
    deadline = time.monotonic() + config.import_time_limit
    # "replaced" is decided by what the stores held when the import began: if Redis goes away midway, the rest go
    # to the local store, which cannot say what Redis has. (Unreachable from the start: only the local store's.)
    held = _storage().held([item["timestamp"] for item in items if isinstance(item, dict)
                            and type(item.get("timestamp")) is int and 0 < item["timestamp"] <= MAX_TIMESTAMP])[0]
    results = [_import_one(index, item, held) if time.monotonic() < deadline else _skipped(index)
               for index, item in enumerate(items)]
    statuses = [r["status"] for r in results]
    counts = {status: statuses.count(status) for status in ("imported", "replaced", "rejected", "skipped")}
    return json_response({"success": True, "complete": not counts["skipped"], **counts, "results": results})


@api.get("/api/v1/backup")
def download_backup() -> Response:
    """Download every live session as one ZIP file, streamed while the sessions are read.

    The file has the format of `flask --app app sessions backup` (see `backup.py`); while it streams, a worker holds a
    few sessions at a time, whatever their number.
    """
    backup = stream(_storage())
    disposition = f'attachment; filename="{default_name()}"'
    return Response(stream_with_context(backup.chunks), mimetype="application/zip",
                    headers={"Content-Disposition": disposition})


# ------------------------------------------------------------------ people: who, share links, activity


@api.get("/api/v1/me")
def me() -> Response:
    """Who the request is signed in as, for the history page."""
    identity = current_app.extensions["storyart-identity"]
    return json_response({"success": True, "user": _caller().name, "multiUser": identity.multi_user()})


@api.post("/api/v1/session/<session_id:raw>/shares")
def create_share(raw: str) -> Response:
    """Make a share link to one of the caller's sessions (docs/contract.md §6).

    It lives `expiresInSeconds` (default 7 days, at most SHARE_MAX_SECONDS) but never longer than the session
    itself unless that is pinned; the answer says the expiry it got. The token is in this answer only."""
    timestamp = _timestamp(raw)
    if request.mimetype != "application/json":  # no other site's form can make one (docs/history-page.md)
        return error(415, MESSAGES[415])
    config = current_app.config["STORYART"]
    try:
        wanted = _share_seconds(_request_body(64 * 1024), config.share_max_seconds)
    except ValueError as exc:
        return error(400, str(exc))
    space = _storage()
    session_expiry = space.expiry_of(timestamp)
    if session_expiry is None:
        return error(404, "Session not found")
    now = now_ms()
    token_secret = secrets.token_urlsafe(24)  # 192 random bits
    token = token_secret if space.owner == DEFAULT_OWNER else f"{space.owner}.{token_secret}"
    share = Share(secrets.token_hex(8), space.owner, timestamp, _token_sha(token), now,
                  min(now + wanted * 1000, session_expiry))
    space.add_share(share, _event("share", timestamp, share.id))
    body = {"id": share.id, "timestamp": timestamp, "url": f"{request.host_url}s/{token}", "token": token,
            "createdAt": share.created_at, "expiresAt": share.expires_at}
    return json_response({"success": True, "share": body}, 201)


def _share_seconds(body: bytes, longest: int) -> int:
    """How long a share link should live, from the request body (empty: the default); ValueError says why not."""
    default = min(DEFAULT_SHARE_SECONDS, longest)
    if not body.strip():
        return default
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError("The body must be a JSON object such as {\"expiresInSeconds\": 86400}, or empty.")
    seconds = parsed.get("expiresInSeconds", default)
    if type(seconds) is not int or not 60 <= seconds <= longest:
        raise ValueError(f"expiresInSeconds must be an integer from 60 to {longest} (SHARE_MAX_SECONDS).")
    return seconds


def _token_sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@api.get("/api/v1/shares")
def list_shares() -> Response:
    shares, partial = _storage().shares()
    return json_response({"success": True, "shares": [share.public() for share in shares],
                          **({"partial": True} if partial else {})})


@api.delete("/api/v1/shares/<share_id>")
def revoke_share(share_id: str) -> Response:
    """Revoke one of the caller's share links at once; another user's share id is one that does not exist."""
    if not _SHARE_ID.fullmatch(share_id) or not _storage().revoke_share(share_id, _event("revoke", None, share_id)):
        return error(404, "Share not found")
    return json_response({"success": True, "id": share_id, "revoked": True})


@api.get("/api/v1/shared/<token>")
def open_share(token: str) -> Response:
    """Read the session a share link names, without a user's token: the link's token is the permission.

    A token that never existed, one revoked, one expired and one whose session is gone all get the same 404."""
    owner, _, secret = token.rpartition(".")
    gone = error(404, "This share link does not exist, was revoked or has expired.", _SHARED_HEADERS)
    if not _SHARE_SECRET.fullmatch(secret) or (owner and not is_key(owner)):
        return gone
    shared_by = current_app.extensions["storyart-identity"].shown_name(owner)
    if shared_by is None:  # no space is opened for a name nobody has
        return gone
    space = _root().space(owner)
    share = space.find_share(_token_sha(token))
    if share is None or not share.open_at(now_ms()):
        return gone
    found = space.get(share.timestamp)
    if found is None:
        return gone
    if request.method == "GET":  # a HEAD (a link preview asking what is there) opens nothing
        space.share_opened(share, _event("share-opened", share.timestamp, share.id))
    body = b'{"success":true,"data":%s,"sharedBy":%s,"expiresAt":%d}' % (found.body, orjson.dumps(shared_by),
                                                                          share.expires_at)
    return Response(body, mimetype="application/json", headers=_SHARED_HEADERS)


@api.get("/api/v1/activity")
def activity() -> Response:
    """The caller's activity, newest first: `limit` events (default 50) from before `before` (ms)."""
    try:
        limit = _int_arg("limit", 50, 1, ACTIVITY_MAX)
        before = _int_arg("before", MAX_TIMESTAMP, 1, MAX_TIMESTAMP)
    except ValueError as exc:
        return error(400, str(exc))
    events, partial = _storage().events(before, limit)
    for event in events:
        del event["id"]
    return json_response({"success": True, "events": events, **({"partial": True} if partial else {})})


@api.get("/health")
def health() -> Response:
    """`storage` is where a save goes now; `localStore` is the fallback (and, without Redis, the home)."""
    sessions = _root()
    redis_state = sessions.check()
    local = sessions.local_report()
    degraded = redis_state in (RedisState.DOWN, RedisState.READ_ONLY)
    return json_response({
        "success": True,
        "status": "degraded" if degraded else "healthy",
        "redis": redis_state.value,
        **_master(sessions),
        "storage": sessions.saves_go_to,
        "memorySessions": local.sessions,
        "localStore": {"kind": local.kind, "path": local.location, "sessions": local.sessions, "bytes": local.bytes},
        **_replicated(sessions),
        **({"warnings": warnings} if (warnings := sessions.warnings) else {}),
        **_backups(),
        "service": SERVICE_NAME,
        "pid": os.getpid(),
    })


@api.get("/health/ready")
def ready() -> Response:
    """For load balancers: not ready while a configured Redis is unreachable (`/health` stays 200)."""
    sessions = _root()
    redis_state = sessions.check()
    if redis_state is RedisState.DOWN:
        return json_response({"success": False, "error": "Redis is configured but unreachable.",
                              "ready": False, "redis": redis_state.value, **_master(sessions)}, 503)
    return json_response({"success": True, "ready": True, "redis": redis_state.value, **_master(sessions)})


def _backups() -> dict[str, Any]:
    """Describe the last backup and, with a schedule, the next one, for /health.

    `lastBackup` (when, where, verified, or the error; null before the first) and, with BACKUP_SCHEDULE,
    `nextBackup` (see scheduler.py).
    """
    schedule = current_app.extensions["storyart-backups"]
    due = schedule.next_due()
    shown = datetime.fromtimestamp(due / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z") \
        if due else None
    return {"lastBackup": schedule.last(), **({"nextBackup": shown} if shown else {})}


def _replicated(sessions: SessionStorage) -> dict[str, bool]:
    """Report whether saves reach `REDIS_WAIT_REPLICAS` replicas now, for /health's `replicated`.

    `replicated` for /health, with `REDIS_WAIT_REPLICAS`: whether saves reach that many replicas now (false:
    they go on to the master alone, or with `REDIS_REQUIRE_REPLICAS` wait in the local store).
    """
    replicated = sessions.replicated
    return {} if replicated is None else {"replicated": replicated}


def _master(sessions: SessionStorage) -> dict[str, str | None]:
    """`redisMaster` for the health answers: the Redis saves go to (with Sentinel, the master it named last)."""
    return {"redisMaster": sessions.redis_master} if sessions.redis_configured else {}


@api.get("/api/v1/openapi.json")
def openapi() -> Response:
    """This API described by `openapi.yaml` (OpenAPI 3.1), as JSON."""
    return Response(openapi_json(), mimetype="application/json")


@api.errorhandler(StorageUnavailable)
def unavailable(exc: StorageUnavailable) -> Response:
    """Whatever a view asked of the storage could not be done safely now: nothing changed, retry later."""
    retry = str(max(1, round(_root().retry_interval)))
    return error(503, f"Storage is unavailable: {exc}; retry later.", {"Retry-After": retry})


@api.errorhandler(NotASession)
def not_a_session(exc: NotASession) -> Response:
    return error(422, str(exc))


def _import_one(index: int, item: Any, held: set[int]) -> dict[str, Any]:
    """Store one item; `held` (the timestamps that hold a session) gains one the item names."""
    space = _storage()
    try:
        draft = draft_from(item, now_ms())
        if draft.timestamp is None:
            draft = replace(draft, save_id=f"import-{content_hash(draft.head)}")
        with _quota_turn():
            if refused := _over_quota(draft, space, _caller()):
                return {"index": index, "status": "rejected", "error": refused}
            timestamp, where = space.save(draft, when_full=WhenFull.REFUSE,  # never evicts to make room
                                          event=_event("import", draft.timestamp))
    except (PayloadError, StorageUnavailable) as exc:
        return {"index": index, "status": "rejected", "error": str(exc)}
    existed = draft.timestamp is not None and timestamp in held
    if draft.timestamp is not None:
        held.add(timestamp)
    return {"index": index, "status": "replaced" if existed else "imported", "timestamp": timestamp,
            "sessionKey": space.keys.session_key(timestamp), "storage": where}


def _skipped(index: int) -> dict[str, Any]:
    return {"index": index, "status": "skipped",
            "error": "Not attempted: the import reached IMPORT_TIME_LIMIT_SECONDS. Send the skipped items again."}


def _timestamp(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 16:
        abort(400, "The timestamp in the path must be digits (ms since epoch).")
    return int(raw)


def _list_query() -> tuple[Query, bool]:
    """Parse the list's query string into a `Query`, and whether summaries were asked for.

    Raises ValueError saying what is wrong. Empty text filters count as absent.
    """
    view = request.args.get("view", "full")
    if view not in ("full", "summary"):
        raise ValueError("view must be full or summary.")
    query = Query(
        limit=_int_arg("limit", EVERY, 1, LIST_MAX),
        offset=_int_arg("offset", 0, 0, 10**9),
        since=_int_arg("since", None, 0, MAX_TIMESTAMP),
        until=_int_arg("until", None, 0, MAX_TIMESTAMP),
        before=_int_arg("before", None, 1, MAX_TIMESTAMP),
        story_uuid=_text_arg("storyUuid"),
        episode=_text_arg("episode"),
        text=_text_arg("q"),
    )
    return query, view == "summary"


def _request_body(limit: int) -> bytes:
    """Read the whole request body, refusing one over `limit` or one the server cannot read.

    It answers 413 when it is larger than `limit` (werkzeug stops reading a body without a Content-Length, i.e. chunked,
    at the limit without saying it cut it), 400 and `Connection: close` when the server cannot read it (a malformed
    chunk under gunicorn raises its own parser error here).
    """
    length = request.content_length
    try:
        if length is None:  # chunked: werkzeug stops at the limit, and a byte more says the body was larger
            body = request.get_data(cache=False)
            if len(body) >= limit and request.environ["wsgi.input"].read(1):
                _too_large(limit)
            return body
        if length > limit:
            _too_large(limit)
        # One read of the declared length: werkzeug's reads of 64 KiB made gunicorn copy what it had buffered
        # of the rest of the body at each one (1.1 ms of a 1 MB save's 7.7 ms, docs/benchmarks.md).
        body = request.environ["wsgi.input"].read(length)
        if len(body) != length:
            raise ClientDisconnected()
    except HTTPException:
        raise
    except Exception as exc:  # only reading the request happens here: whatever fails is the request's fault
        # Where a next request would begin is unknown, so the server closes the connection: the answer says so.
        abort(error(400, f"The request body could not be read ({type(exc).__name__}).", {"Connection": "close"}))
    return body


def _too_large(limit: int) -> NoReturn:
    """Answer 413 naming the limit this request was held to: MAX_CONTENT_LENGTH, or an endpoint's own."""
    if limit == current_app.config["MAX_CONTENT_LENGTH"]:
        raise RequestEntityTooLarge()  # the error handler names MAX_CONTENT_LENGTH
    abort(error(413, f"The request body is larger than the limit of {limit:,} bytes for this request."))


def _int_arg(name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 16 and low <= int(raw) <= high):
        raise ValueError(f"{name} must be an integer from {low} to {high}.")
    return int(raw)


def _text_arg(name: str, longest: int = 200) -> str | None:
    raw = request.args.get(name, "")
    if len(raw) > longest:
        raise ValueError(f"{name} must be at most {longest} characters.")
    return raw or None
