"""StoryArt session service: the HTTP layer (SPEC §1). Storage lives in `storage.py`, settings in `config.py`.

`gunicorn app:app` serves the module-level `app`; `python app.py` runs the development server with graceful
shutdown on SIGINT and SIGTERM.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import sys
import threading
import time
from typing import Any

import orjson
from flask import Flask, Response, g, request
from flask.json.provider import JSONProvider
from flask_cors import CORS
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import BaseConverter
from werkzeug.serving import make_server

from config import Config, ConfigError
from payload import PayloadError, parse_session
from storage import SessionStorage, StorageFull, Stored, build_storage, now_ms, session_key

log = logging.getLogger("storyart")
access_log = logging.getLogger("storyart.access")

SERVICE_NAME = "storyart-session"
DEFAULT_CORS_ORIGINS = (re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?$", re.IGNORECASE),)
LIST_DEFAULT, LIST_MAX = 20, 100
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")

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
    timestamp; the view itself answers non-digits with 400 as SPEC §1 asks."""

    regex = r"(?!(?:save|import)$)[^/]+"


def json_response(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status, headers, mimetype="application/json")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"success": False, "error": message}, status, headers)


def session_response(found: Stored) -> Response:
    """Splice the stored bytes into the envelope: no parse, no re-serialization of a 1 MB session."""
    body = b'{"success":true,"data":%s,"storage":"%s"}' % (found.body, found.storage.encode())
    return Response(body, mimetype="application/json")


def list_item(found: Stored) -> bytes:
    """The stored session object plus its `sessionKey`, spliced in before the closing brace."""
    return b'%s,"sessionKey":"%s"}' % (found.body[:-1], session_key(found.timestamp).encode())


def create_app(config: Config | None = None, storage: SessionStorage | None = None) -> Flask:
    config = config or Config.from_env()
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = ServiceFlask(__name__)
    app.url_map.converters["session_id"] = SessionIdConverter
    if config.trusted_proxy_hops:
        hops = config.trusted_proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops, x_port=hops)
    app.config.update(MAX_CONTENT_LENGTH=config.max_content_length, STORYART=config)
    storage = storage or build_storage(config)
    app.extensions["storyart"] = storage
    CORS(
        app,
        resources={r"/api/*": {}, r"/health*": {}},
        origins=list(config.cors_origins) or list(DEFAULT_CORS_ORIGINS),
        methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["Content-Type", "Authorization"],
        expose_headers=["ETag", "X-Request-ID"],
        supports_credentials=True,
        max_age=600,
    )
    _register_hooks(app)
    _register_routes(app, storage)
    log.info("StoryArt session service ready: Redis %s, storage %s", storage.redis_state,
             "redis" if storage.redis is not None else "memory")
    return app


def _register_hooks(app: Flask) -> None:
    @app.before_request
    def assign_request_id() -> None:
        # The environ and a PRNG draw rather than request.headers and uuid4: no header wrapper and no
        # getrandom() system call on every request (random reseeds itself in each forked worker).
        given = request.environ.get("HTTP_X_REQUEST_ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else f"{random.getrandbits(64):016x}"
        g.started = time.perf_counter()

    @app.after_request
    def tag_and_log(response: Response) -> Response:
        """One access line per request; never any session content."""
        request_id = g.get("request_id", "-")
        response.headers["X-Request-ID"] = request_id
        elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        access_log.info("%s %s %s %d %s %.1fms %s", request_id, request.method, request.path,
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
            draft = parse_session(request.get_data(cache=False), now_ms())
        except PayloadError as exc:
            return error(400, str(exc))
        try:
            timestamp, where = storage.save(draft)
        except StorageFull as exc:
            retry = str(max(1, round(storage.retry_interval)))
            return error(503, f"Storage is unavailable: {exc}; retry later.", {"Retry-After": retry})
        return json_response({
            "success": True,
            "message": "Session saved successfully",
            "sessionKey": session_key(timestamp),
            "timestamp": timestamp,
            "storage": where,
        })

    @app.get("/api/v1/session/latest")
    def latest() -> Response:
        found = storage.latest()
        return session_response(found) if found else error(404, "No session found")

    @app.get("/api/v1/session/list")
    def list_sessions() -> Response:
        try:
            limit = _int_arg("limit", LIST_DEFAULT, 1, LIST_MAX)
            offset = _int_arg("offset", 0, 0, 10**9)
        except ValueError as exc:
            return error(400, str(exc))
        total, rows = storage.page(offset, limit)
        body = b'{"success":true,"count":%d,"total":%d,"sessions":[%s]}' % (
            len(rows), total, b",".join(list_item(row) for row in rows))
        return Response(body, mimetype="application/json")

    @app.get("/api/v1/session/<session_id:raw>")
    def get_session(raw: str) -> Response:
        if not raw.isascii() or not raw.isdigit() or len(raw) > 16:
            return error(400, "The timestamp in the path must be digits (ms since epoch).")
        found = storage.get(int(raw))
        return session_response(found) if found else error(404, "Session not found")

    @app.get("/health")
    def health() -> Response:
        redis_state = storage.check()
        return json_response({
            "success": True,
            "status": "degraded" if redis_state == "disconnected" else "healthy",
            "redis": redis_state,
            "storage": "redis" if redis_state == "connected" else "memory",
            "memorySessions": len(storage.memory),
            "service": SERVICE_NAME,
            "pid": os.getpid(),
        })


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 10 and low <= int(raw) <= high):
        raise ValueError(f"{name} must be an integer from {low} to {high}.")
    return int(raw)


def _load_config() -> Config:
    """The config, or exit with one line naming the bad variable (SPEC §4)."""
    try:
        return Config.from_env()
    except ConfigError as exc:
        print(f"storyart: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def serve(app: Flask, config: Config) -> None:
    """Development server that stops gracefully: on SIGINT/SIGTERM it stops accepting, lets requests in
    flight finish (their threads are joined), then flushes memory-held sessions to Redis."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the app logs each request itself
    server = make_server(config.host, config.port, app, threaded=True)
    server.daemon_threads = False  # so server_close() joins the requests in flight
    stopping = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            log.info("%s received: finishing requests in flight", signal.Signals(signum).name)
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    log.info("listening on http://%s:%d", config.host, config.port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        app.extensions["storyart"].close()
        log.info("stopped")


app = create_app(_load_config())

if __name__ == "__main__":
    serve(app, app.config["STORYART"])
