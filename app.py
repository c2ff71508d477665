"""StoryArt session service: the application factory (docs/contract.md §1).

`create_app` builds the Flask app from a `Config`: the storage (`storage.py`), the views (`views.py`), the
history page (`page.py`), CORS, the request hooks and the error handlers that keep every other answer JSON.
`gunicorn app:app` serves the module-level `app`; `python app.py` runs the development server (`devserver.py`).
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time

from flask import Flask, Response, g, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from cli import sessions, users
from config import Config, exits_on_config_error
from deadline import BodyDeadline
from drain import DrainRefusedBody
from identity import Identity, Refused, loggable_address
from page import page
from responses import OrjsonProvider, error
from scheduler import Scheduler
from storage import SessionStorage, build_storage
from users import Users
from views import MESSAGES, SessionIdConverter, api

log = logging.getLogger(__name__)
access_log = logging.getLogger("storyart.access")  # a channel, not a module: operators filter on its name

DEFAULT_CORS_ORIGINS = (re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?$", re.IGNORECASE),)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")


class ServiceFlask(Flask):
    """Flask with orjson, and JSON even for the automatic OPTIONS answer (CORS preflights)."""

    json_provider_class = OrjsonProvider

    def make_default_options_response(self) -> Response:
        response = super().make_default_options_response()
        response.set_data(b'{"success":true}')
        response.mimetype = "application/json"
        return response


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
    app.wsgi_app = BodyDeadline(app.wsgi_app, config.body_timeout)  # a trickled body cannot keep a thread
    storage = storage or build_storage(config)
    app.extensions["storyart"] = storage
    app.extensions["storyart-compares"] = threading.BoundedSemaphore(config.compare_concurrency)  # views.py
    app.extensions["storyart-backups"] = Scheduler(config, storage)  # started by the server (BACKUP_SCHEDULE)
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
    identity = Identity(config, Users.open(config.users_file))
    app.extensions["storyart-identity"] = identity  # views.py
    _register_hooks(app, identity, (*LOOPBACK_HOSTS, *config.allowed_hosts))
    _register_error_handlers(app)
    app.register_blueprint(api)
    app.register_blueprint(page)  # the history page at `/` (docs/history-page.md)
    app.cli.add_command(sessions)
    app.cli.add_command(users)
    if config.api_token is None and config.app_env == "production":
        log.warning("APP_ENV=production and no API_TOKEN: the session API is open to anyone who can reach it")
    local = storage.local_report()
    log.info("StoryArt session service ready: Redis %s, local store %s%s", storage.redis_state.value,
             local.kind, f" ({local.location})" if local.location else "")
    return app


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Tell whether a `Host` header names this service.

    It does when it is a name of `allowed` (any port), a subdomain of a `.name`, or anything with `*`. Flask's
    TRUSTED_HOSTS would do this, but werkzeug compares the part before the first colon, so it can never trust an IPv6
    literal such as `[::1]`.
    """
    host = host.strip().lower()
    name, bracket, rest = host.partition("]")
    if bracket:  # [v6] or [v6]:port
        name, port = name + "]", rest.removeprefix(":")
        if rest and not rest.startswith(":"):
            return False
    else:
        name, _, port = host.partition(":")
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        return False
    return any(a == "*" or name == a or (a.startswith(".") and name.endswith(a)) for a in allowed)


def _register_hooks(app: Flask, identity: Identity, allowed_hosts: tuple[str, ...]) -> None:
    @app.before_request
    def assign_request_id() -> None:
        # The environ and a PRNG draw rather than request.headers and uuid4: no header wrapper and no
        # getrandom() system call on every request (random reseeds itself in each forked worker).
        given = request.environ.get("HTTP_X_REQUEST_ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else f"{random.getrandbits(64):016x}"
        g.started = time.perf_counter()

    @app.before_request
    def require_known_host() -> Response | None:
        """Refuse a request whose `Host` header does not name this service.

        No page whose name was rebound to this address may use the service: its requests carry its own name
        in `Host`. (A request without `Host` is no browser's.)
        """
        host = request.environ.get("HTTP_HOST")
        if host is None or host_allowed(host, allowed_hosts):
            return None
        return error(400, f"This service is not reached by the name {host[:100]!r}; add it to ALLOWED_HOSTS "
                          "if it should be.")

    @app.before_request
    def answer_any_api_preflight() -> Response | None:
        """Answer a CORS preflight for any API path, including endpoints this service lacks.

        A browser asks before it calls an endpoint this service does not have (the later StoryArt server's
        routes): answer the preflight, so the page can read the JSON 404 that follows. CORS decides the
        headers, so a disallowed origin still gets none.
        """
        if request.method == "OPTIONS" and request.path.startswith("/api/") and request.url_rule is None:
            return app.make_default_options_response()
        return None

    @app.before_request
    def identify() -> Response | None:
        """Name the request's user (`identity.py`).

        `g.caller` is whose space the views work in (None: a request that needs no user); a request that must
        name a user and does not gets 401."""
        try:
            g.caller = identity.caller(request.environ, request.method, request.path)
        except Refused as refused:
            return error(refused.status, str(refused),
                         {"WWW-Authenticate": 'Bearer realm="storyart"'} if refused.status == 401 else None)
        return None

    @app.after_request
    def tag_and_log(response: Response) -> Response:
        """One access line per request; never any session content."""
        request_id = g.get("request_id", "-")
        response.headers["X-Request-ID"] = request_id
        elapsed_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
        path = repr(request.path)[1:-1]  # control characters escaped: one request, one log line
        size = response.content_length if response.content_length is not None else "-"  # "-": streamed
        access_log.info("%s %s %s %d %s %.1fms %s", request_id, request.method, path,
                        response.status_code, size, elapsed_ms, loggable_address(request.remote_addr))
        return response


def _register_error_handlers(app: Flask) -> None:
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


with exits_on_config_error():  # one line naming the bad variable or unusable file, exit 2
    app = create_app(Config.from_env())

if __name__ == "__main__":
    from devserver import serve

    serve(app, app.config["STORYART"])
