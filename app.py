"""StoryArt session service: the HTTP layer (docs/contract.md §1). Storage lives in `storage.py`, settings in
`config.py`.

`gunicorn app:app` serves the module-level `app`; `python app.py` runs the development server with graceful
shutdown on SIGINT and SIGTERM.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import random
import re
import signal
import socket
import sys
import threading
import time
import zlib
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import orjson
import yaml
from flask import Flask, Response, abort, g, request
from flask.json.provider import JSONProvider
from flask_cors import CORS
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import BaseConverter
from werkzeug.serving import WSGIRequestHandler, make_server

from allocator import now_ms
from config import Config, ConfigError
from drain import DrainRefusedBody
from payload import PayloadError, draft_from, parse_json, parse_session
from storage import Query, RedisState, SessionStorage, StorageUnavailable, Stored, build_storage, session_key

log = logging.getLogger("storyart")
access_log = logging.getLogger("storyart.access")

SERVICE_NAME = "storyart-session"
DEFAULT_CORS_ORIGINS = (re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?$", re.IGNORECASE),)
LIST_DEFAULT, LIST_MAX = 20, 100
MAX_TIMESTAMP = 2**53  # the largest integer a browser's JSON.parse reads exactly
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
OPENAPI_PATH = Path(__file__).resolve().with_name("openapi.yaml")

MESSAGES = {
    400: "The request is malformed.",
    404: "No such endpoint: {method} {path}.",
    405: "Method {method} is not allowed for {path}.",
    413: "The request body is larger than the limit of {limit} bytes (MAX_CONTENT_LENGTH).",
    415: "The request body must be declared as JSON (Content-Type: application/json).",
}


class OrjsonProvider(JSONProvider):
    """Flask's JSON through orjson: several times faster than the standard library on 1 MB sessions."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(orjson.dumps(obj), mimetype="application/json")


class ServiceFlask(Flask):
    """Flask with orjson, and JSON even for the automatic OPTIONS answer (CORS preflights)."""

    json_provider_class = OrjsonProvider

    def make_default_options_response(self) -> Response:
        response = super().make_default_options_response()
        response.set_data(b'{"success":true}')
        response.mimetype = "application/json"
        return response


class SessionIdConverter(BaseConverter):
    """Any path segment but the POST-only action names, so `GET /api/v1/session/save` is a 405, not a bad
    timestamp; the view itself answers non-digits with 400 as docs/contract.md §1 asks."""

    regex = r"(?!(?:save|import|latest|list)$)[^/]+"


def json_response(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers, mimetype="application/json")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"success": False, "error": message}, status, headers)


def session_response(found: Stored, partial: bool = False) -> Response:
    """Splice the stored bytes into the envelope: no parse, no re-serialization of a 1 MB session.

    The ETag names the timestamp, the store and the content hash recorded at save time, so polling with
    `If-None-Match` costs a 304 and no body."""
    etag = f"{found.timestamp}-{found.storage}-{content_hash(found)}"
    if request.if_none_match.contains_weak(etag):
        response = Response(status=304)
    else:
        body = b'{"success":true,"data":%s,"storage":"%s"%s}' % (
            found.body, found.storage.encode(), b',"partial":true' if partial else b"")
        response = Response(body, mimetype="application/json")
    response.set_etag(etag)
    response.headers["Cache-Control"] = "no-cache"
    return response


def content_hash(found: Stored) -> str:
    """The hash recorded at save time while the summary still describes these bytes (same size), else one
    computed now (a session written without a summary, or rewritten since by another tool)."""
    if found.summary:
        summary = orjson.loads(found.summary)
        if summary.get("etag") and summary.get("sizeBytes") == len(found.body):
            return summary["etag"]
    return f"{zlib.crc32(found.body):08x}"


def list_item(found: Stored) -> bytes:
    """The stored session object plus its `sessionKey`, spliced in before the closing brace."""
    return b'%s,"sessionKey":"%s"}' % (found.body.rstrip()[:-1], session_key(found.timestamp).encode())


def summary_item(found: Stored) -> bytes:
    """A summary record (whose body is the summary JSON) with its identity, ISO time and store."""
    saved_at = datetime.fromtimestamp(found.timestamp / 1000, UTC).isoformat(timespec="milliseconds")
    return orjson.dumps({"timestamp": found.timestamp, "sessionKey": session_key(found.timestamp),
                         **orjson.loads(found.body), "savedAt": saved_at.replace("+00:00", "Z"),
                         "storage": found.storage})


@cache
def openapi_json() -> bytes:
    """`openapi.yaml` as JSON, read and converted once per process (on first use)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it
    return orjson.dumps(yaml.load(OPENAPI_PATH.read_text(encoding="utf-8"), Loader=loader))


def create_app(config: Config | None = None, storage: SessionStorage | None = None) -> Flask:
    config = config or Config.from_env()
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = ServiceFlask(__name__)
    app.url_map.converters["session_id"] = SessionIdConverter
    app.url_map.merge_slashes = False  # a path with "//" is a JSON 404, not werkzeug's HTML 308 redirect
    if config.trusted_proxy_hops:
        hops = config.trusted_proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops)
    app.config.update(MAX_CONTENT_LENGTH=config.max_content_length, STORYART=config)
    app.wsgi_app = DrainRefusedBody(app.wsgi_app, config.max_content_length)  # a 413, not a reset, behind a proxy
    storage = storage or build_storage(config)
    app.extensions["storyart"] = storage
    CORS(
        app,
        resources={r"/api/*": {}, r"/health*": {}},
        origins=[re.compile(re.escape(o) + r"\Z", re.IGNORECASE) for o in config.cors_origins]
        or list(DEFAULT_CORS_ORIGINS),
        methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["Content-Type", "Authorization"],
        expose_headers=["ETag", "X-Request-ID"],
        supports_credentials=True,
        max_age=600,
    )
    _register_hooks(app, config.api_token)
    _register_routes(app, storage)
    if config.api_token is None and config.app_env == "production":
        log.warning("APP_ENV=production and no API_TOKEN: the session API is open to anyone who can reach it")
    log.info("StoryArt session service ready: Redis %s, local store %s%s", storage.redis_state.value,
             storage.local.kind, f" ({storage.local.location})" if storage.local.location else "")
    return app


def _register_hooks(app: Flask, api_token: str | None) -> None:
    @app.before_request
    def assign_request_id() -> None:
        # The environ and a PRNG draw rather than request.headers and uuid4: no header wrapper and no
        # getrandom() system call on every request (random reseeds itself in each forked worker).
        given = request.environ.get("HTTP_X_REQUEST_ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else f"{random.getrandbits(64):016x}"
        g.started = time.perf_counter()

    @app.before_request
    def require_token() -> Response | None:
        """With API_TOKEN set, /api/v1/... needs `Authorization: Bearer <token>`; preflights and /health don't."""
        if api_token is None or request.method == "OPTIONS" or not request.path.startswith("/api/v1/"):
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_token.encode()):
            return None
        return error(401, "A valid API token is required (Authorization: Bearer <token>).",
                     {"WWW-Authenticate": 'Bearer realm="storyart"'})

    @app.after_request
    def tag_and_log(response: Response) -> Response:
        """One access line per request; never any session content."""
        request_id = g.get("request_id", "-")
        response.headers["X-Request-ID"] = request_id
        elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        path = repr(request.path)[1:-1]  # control characters escaped: one request, one log line
        access_log.info("%s %s %s %d %s %.1fms %s", request_id, request.method, path,
                        response.status_code, response.content_length, elapsed_ms, request.remote_addr)
        return response

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        template = MESSAGES.get(code)
        if template is None:
            message = exc.description or exc.name
        else:
            message = template.format(method=request.method, path=request.path,
                                      limit=app.config["MAX_CONTENT_LENGTH"])
        if code == 400 and exc.description and "browser (or proxy)" not in exc.description:
            message = exc.description
        response = error(code, message)
        if code == 405 and getattr(exc, "valid_methods", None):
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected_error(exc: Exception) -> Response:
        request_id = g.get("request_id", "-")
        log.exception("unhandled error in %s %s (request id %s)", request.method, request.path, request_id)
        return error(500, f"Internal server error (request id {request_id}).")


def _register_routes(app: Flask, storage: SessionStorage) -> None:
    @app.post("/api/v1/session/save")
    def save() -> Response:
        if request.mimetype != "application/json":
            return error(415, MESSAGES[415])
        try:
            draft = parse_session(_request_body(app.config["MAX_CONTENT_LENGTH"]), now_ms())
        except PayloadError as exc:
            return error(400, str(exc))
        try:
            timestamp, where = storage.save(draft)
        except StorageUnavailable as exc:
            return unavailable(exc, storage)
        return json_response({
            "success": True,
            "message": "Session saved successfully",
            "sessionKey": session_key(timestamp),
            "timestamp": timestamp,
            "storage": where,
        })

    @app.get("/api/v1/session/latest")
    def latest() -> Response:
        try:
            found, partial = storage.latest()
        except StorageUnavailable as exc:
            return unavailable(exc, storage)
        return session_response(found, partial) if found else error(404, "No session found")

    @app.get("/api/v1/session/list")
    def list_sessions() -> Response:
        try:
            query, summaries = _list_query()
        except ValueError as exc:
            return error(400, str(exc))
        total, rows, partial = storage.page(query, summaries)
        items = (summary_item(row) for row in rows) if summaries else (list_item(row) for row in rows)
        body = b'{"success":true,"count":%d,"total":%d,"sessions":[%s]%s}' % (
            len(rows), total, b",".join(items), b',"partial":true' if partial else b"")
        return Response(body, mimetype="application/json")

    @app.get("/api/v1/session/<session_id:raw>")
    def get_session(raw: str) -> Response:
        try:
            found = storage.get(_timestamp(raw))
        except StorageUnavailable as exc:
            return unavailable(exc, storage)
        return session_response(found) if found else error(404, "Session not found")

    @app.get("/api/v1/session/<session_id:raw>/export")
    def export_session(raw: str) -> Response:
        timestamp = _timestamp(raw)
        try:
            found = storage.get(timestamp)
        except StorageUnavailable as exc:
            return unavailable(exc, storage)
        if not found:
            return error(404, "Session not found")
        disposition = f'attachment; filename="storyart-session-{timestamp}.json"'
        return Response(found.body, mimetype="application/json", headers={"Content-Disposition": disposition})

    @app.delete("/api/v1/session/<session_id:raw>")
    def delete_session(raw: str) -> Response:
        timestamp = _timestamp(raw)
        try:
            deleted = storage.delete(timestamp)
        except StorageUnavailable as exc:
            return unavailable(exc, storage)
        if not deleted:
            return error(404, "Session not found")
        return json_response({"success": True, "message": "Session deleted", "sessionKey": session_key(timestamp),
                              "timestamp": timestamp})

    @app.post("/api/v1/session/import")
    def import_sessions() -> Response:
        """One session or an array of them, as exported: each validated like `save`, timestamps kept."""
        if request.mimetype != "application/json":
            return error(415, MESSAGES[415])
        try:
            parsed = parse_json(_request_body(app.config["MAX_CONTENT_LENGTH"]))
        except PayloadError as exc:
            return error(400, str(exc))
        if not isinstance(parsed, dict | list) or parsed == []:
            return error(400, "The import body must be a session object or a non-empty array of them.")
        items = parsed if isinstance(parsed, list) else [parsed]
        results = [_import_one(storage, index, item) for index, item in enumerate(items)]
        statuses = [r["status"] for r in results]
        counts = {status: statuses.count(status) for status in ("imported", "replaced", "rejected")}
        return json_response({"success": True, **counts, "results": results})

    @app.get("/health")
    def health() -> Response:
        """`storage` is where a save goes now; `localStore` is the fallback (and, without Redis, the home)."""
        redis_state = storage.check()
        try:
            held, held_bytes = storage.local.count()
        except StorageUnavailable:
            held = held_bytes = None
        degraded = redis_state in (RedisState.DOWN, RedisState.READ_ONLY)
        return json_response({
            "success": True,
            "status": "degraded" if degraded else "healthy",
            "redis": redis_state.value,
            "storage": storage.saves_go_to,
            "memorySessions": held,
            "localStore": {"kind": storage.local.kind, "path": storage.local.location, "sessions": held,
                           "bytes": held_bytes},
            "service": SERVICE_NAME,
            "pid": os.getpid(),
        })

    @app.get("/health/ready")
    def ready() -> Response:
        """For load balancers: not ready while a configured Redis is unreachable (`/health` stays 200)."""
        redis_state = storage.check()
        if redis_state is RedisState.DOWN:
            return json_response({"success": False, "error": "Redis is configured but unreachable.",
                                  "ready": False, "redis": redis_state.value}, 503)
        return json_response({"success": True, "ready": True, "redis": redis_state.value})

    @app.get("/api/v1/openapi.json")
    def openapi() -> Response:
        """This API described by `openapi.yaml` (OpenAPI 3.1), as JSON."""
        return Response(openapi_json(), mimetype="application/json")


def unavailable(exc: StorageUnavailable, storage: SessionStorage) -> Response:
    retry = str(max(1, round(storage.retry_interval)))
    return error(503, f"Storage is unavailable: {exc}; retry later.", {"Retry-After": retry})


def _import_one(storage: SessionStorage, index: int, item: Any) -> dict[str, Any]:
    try:
        draft = draft_from(item, now_ms())
        existed = draft.timestamp is not None and storage.exists(draft.timestamp)
        timestamp, where = storage.save(draft)
    except (PayloadError, StorageUnavailable) as exc:
        return {"index": index, "status": "rejected", "error": str(exc)}
    return {"index": index, "status": "replaced" if existed else "imported", "timestamp": timestamp,
            "sessionKey": session_key(timestamp), "storage": where}


def _timestamp(raw: str) -> int:
    if not raw.isascii() or not raw.isdigit() or len(raw) > 16:
        abort(400, "The timestamp in the path must be digits (ms since epoch).")
    return int(raw)


def _list_query() -> tuple[Query, bool]:
    """The list's query string as a `Query`, and whether summaries were asked for; ValueError says what is
    wrong. Empty text filters count as absent."""
    view = request.args.get("view", "full")
    if view not in ("full", "summary"):
        raise ValueError("view must be full or summary.")
    query = Query(
        limit=_int_arg("limit", LIST_DEFAULT, 1, LIST_MAX),
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
    """The whole body: 413 when it is larger than `limit` (werkzeug stops reading a body without a
    Content-Length, i.e. chunked, at the limit without saying it cut it), 400 when the server cannot read it
    (a malformed chunk under gunicorn raises its own parser error here)."""
    try:
        body = request.get_data(cache=False)
        if request.content_length is None and len(body) >= limit and request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    except HTTPException:
        raise
    except Exception as exc:  # only reading the request happens here: whatever fails is the request's fault
        raise BadRequest(f"The request body could not be read ({type(exc).__name__}).") from None
    return body


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


def _create_or_exit() -> Flask:
    """The app from the environment, or exit with one line naming the bad variable or unusable file."""
    try:
        return create_app(Config.from_env())
    except ConfigError as exc:
        print(f"storyart: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class _ConnectionHandler(WSGIRequestHandler):
    """Keeps `server.idle` = the connections that have not begun a request (a browser's preconnect, a client
    that connected and said nothing), which a stopping server closes instead of waiting on them for ever."""

    def setup(self) -> None:
        super().setup()
        self.server.idle.add(self.connection)

    def parse_request(self) -> bool:
        self.server.idle.discard(self.connection)  # a request has begun: it will be finished
        return super().parse_request()

    def finish(self) -> None:
        self.server.idle.discard(self.connection)
        super().finish()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server answers what it cannot parse (a request line over 64 KiB: 414, a header over 64 KiB
        or more than 100 of them: 431, a garbled request line: 400) itself, with an HTML page; this service
        answers JSON (docs/contract.md §1), with a status line even to what looked like an HTTP/0.9 request."""
        self.log_error("code %d, message %s", code, message)
        reason = self.responses.get(code, ("Error",))[0]
        body = orjson.dumps({"success": False, "error": f"{reason}: {message}." if message else f"{reason}."})
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def serve(app: Flask, config: Config) -> None:
    """Development server that stops gracefully: on SIGINT/SIGTERM it stops accepting, lets requests in
    flight finish (their threads are joined), then flushes memory-held sessions to Redis."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the app logs each request itself
    server = make_server(config.host, config.port, app, threaded=True, request_handler=_ConnectionHandler)
    server.daemon_threads = False  # so server_close() joins the requests in flight
    server.idle = set()
    stopping, stopped = threading.Event(), threading.Event()

    def close_idle_connections() -> None:
        server.shutdown()
        while not stopped.wait(0.1):  # until the requests in flight are joined
            for connection in list(server.idle):
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)  # its handler reads EOF and ends

    def stop(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            log.info("%s received: finishing requests in flight", signal.Signals(signum).name)
            threading.Thread(target=close_idle_connections, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    log.info("listening on http://%s:%d", config.host, config.port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        stopped.set()
        app.extensions["storyart"].close()
        log.info("stopped")


app = _create_or_exit()

if __name__ == "__main__":
    serve(app, app.config["STORYART"])
