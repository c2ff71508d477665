"""Service configuration: one typed, validated object built from the environment and `.env`.

Every setting is read here and nowhere else, so a bad value stops start-up with one line that names the
variable (docs/contract.md §4) instead of failing on the first request.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import ssl
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from dotenv import dotenv_values
from redis.connection import URL_QUERY_ARGUMENT_PARSERS, parse_url

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOCAL_STORES = ("SQLITE", "MEMORY")
LOCAL_STORE_SYNCS = ("FULL", "NORMAL")  # SQLite's `synchronous`: see docs/local-store.md
# The local store's caps: what a busy team saves in a day of Redis outage (docs/decisions.md, "The local store's
# caps"); the memory store holds its sessions in each worker's RAM, so it keeps the smaller former byte cap.
LOCAL_MAX_SESSIONS = 5000
LOCAL_MAX_BYTES = {"SQLITE": 4 * 1024**3, "MEMORY": 512 * 1024**2}
# What redis-py takes from a REDIS_URL query string (anything else would fail on the first connection, not here);
# the `ssl_` ones only on rediss://, where the files they name are loaded at start-up.
URL_OPTIONS = frozenset(URL_QUERY_ARGUMENT_PARSERS) | {
    "client_name", "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_cert_reqs",
    "ssl_ciphers"}


class ConfigError(ValueError):
    """A setting is invalid; the message is one line naming the variable."""


@contextlib.contextmanager
def exits_on_config_error() -> Iterator[None]:
    """Decorate a start-up entry point so that a bad setting exits with one line.

    Turn a `ConfigError` into what every start-up refusal gives: one line naming the setting or file on stderr,
    and exit status 2 (no traceback; `python app.py`, gunicorn's master and the CLI alike)."""
    try:
        yield
    except ConfigError as error:
        print(f"storyart: configuration error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass(frozen=True)
class S3Settings:
    """Off-site backup target and its AWS credentials.

    Where off-site backups go (`BACKUP_S3_URL`, `BACKUP_S3_ENDPOINT`) and the AWS credentials to reach it,
    read from the standard AWS variables (also from `.env`); without keys, boto3's own chain (AWS_PROFILE,
    ~/.aws/credentials, SSO, an instance role) finds them. The secrets never appear in a repr or a log."""

    bucket: str
    prefix: str = ""  # "" or ending in "/"
    endpoint: str | None = None  # None: AWS itself
    region: str | None = None
    profile: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)

    def url(self, name: str = "") -> str:
        """`s3://bucket/prefix/name` (the folder itself without a name)."""
        return f"s3://{self.bucket}/{self.prefix}{name}"


@dataclass(frozen=True)
class Config:
    """Settings with their documented defaults (see `.env.example`)."""

    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 7802
    app_env: str = "development"
    session_ttl_seconds: int = 604_800
    max_content_length: int = 50 * 1024 * 1024
    body_timeout: float = 60.0  # seconds a request body may take to arrive (deadline.py)
    send_timeout: float = 60.0  # seconds a client may take no byte of its answer (worker.py, devserver.py)
    cors_origins: tuple[str, ...] = ()
    log_level: str = "INFO"
    local_store: str = "sqlite"
    local_store_path: Path = Path("instance/sessions.sqlite3")
    local_store_sync: str = "FULL"
    local_max_sessions: int = LOCAL_MAX_SESSIONS
    local_max_bytes: int = LOCAL_MAX_BYTES["SQLITE"]
    redis_connect_timeout: float = 1.0
    redis_socket_timeout: float = 2.0
    redis_retry_interval: float = 3.0
    redis_max_connections: int = 16
    redis_pool_timeout: float = 10.0  # seconds a request waits for one of the process's connections to come free
    workers: int = 0
    threads: int = 0
    trusted_proxy_hops: int = 0
    redis_allow_eviction: bool = False
    redis_sentinels: tuple[tuple[str, int], ...] = ()  # (host, port) of each Sentinel; empty: REDIS_URL's host
    redis_sentinel_master: str | None = None  # the name the Sentinels monitor the master under
    redis_sentinel_username: str | None = None
    redis_sentinel_password: str | None = field(default=None, repr=False)
    redis_wait_replicas: int = 0  # replicas each save waits for (Redis WAIT); fewer: saved, and /health warns ...
    redis_require_replicas: bool = False  # ... unless this says a save is not in Redis until they confirm it
    import_max_items: int = 1000
    service_hosts: int = 1  # how many service hosts share the Redis ...
    service_host_index: int = 0  # ... and which one this is (their timestamps never meet, `allocator.Slot`)
    import_time_limit: float = 20.0  # seconds: well under the 60 s a proxy waits for an answer (nginx sample)
    compare_max_bytes: int = 16 * 1024 * 1024  # the two sessions of one compare together (compare.Budget)
    compare_concurrency: int = 1  # compares computing at once per process; more: 503 with Retry-After
    backup_dir: Path = Path("instance/backups")
    backup_keep: int = 7
    backup_s3: S3Settings | None = None  # an S3-compatible store for off-site copies (offsite.py)
    backup_schedule: str | None = None  # a cron expression: the running service takes backups (scheduler.py)
    allowed_hosts: tuple[str, ...] = ()  # beyond the loopback names, which are always allowed; "*": any
    api_token: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log
    users_file: Path = Path("instance/users.json")  # the users and their token hashes (users.py)
    auth_proxy_header: str | None = None  # the header a trusted authenticating proxy names the user in
    user_max_sessions: int = 0  # each user's quota (0: no limit), overridable per user in the users file
    user_max_bytes: int = 0
    share_max_seconds: int = 30 * 86_400  # the longest a share link may live
    activity_keep_days: int = 90  # how long the activity log keeps an event

    @property
    def redis_configured(self) -> bool:
        return self.redis_url is not None or bool(self.redis_sentinels)

    @property
    def redis_setting(self) -> str:
        """The variable that says where Redis is, for messages about that Redis."""
        return "REDIS_SENTINELS" if self.redis_sentinels else "REDIS_URL"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, dotenv_path: str | Path | None = ".env") -> Config:
        """Build from `environ` (default: the process environment) over the values of `.env`.

        The real environment always wins over `.env`, as python-dotenv's `override=False` does, but the file
        is read without touching `os.environ` so building a config has no side effects.
        """
        env: dict[str, str] = {}
        if dotenv_path is not None and Path(dotenv_path).is_file():
            env.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        env.update(os.environ if environ is None else environ)
        sentinels = _sentinels(env)
        hosts = _int(env, "SERVICE_HOSTS", 1, 1, 64)
        local_store = _choice(env, "LOCAL_STORE", "SQLITE", LOCAL_STORES)
        wait_replicas = _int(env, "REDIS_WAIT_REPLICAS", 1 if sentinels else 0, 0, 16)
        return cls(
            redis_url=_redis_url(env, sentinels),
            host=_host(env),
            port=_int(env, "REDIS_API_PORT", 7802, 1, 65535),
            app_env=_text(env, "APP_ENV", env.get("NODE_ENV") or "development").lower(),
            session_ttl_seconds=_int(env, "SESSION_TTL_SECONDS", 604_800, 0, 10 * 365 * 86_400),
            max_content_length=_int(env, "MAX_CONTENT_LENGTH", 50 * 1024 * 1024, 1024, 2**40),
            body_timeout=_float(env, "REQUEST_BODY_TIMEOUT", 60.0, 0.1, 3600),
            send_timeout=_float(env, "RESPONSE_SEND_TIMEOUT", 60.0, 0.1, 3600),
            cors_origins=_origins(env),
            log_level=_choice(env, "LOG_LEVEL", "INFO", LOG_LEVELS),
            local_store=local_store.lower(),
            local_store_path=_path(env, "LOCAL_STORE_PATH", "instance/sessions.sqlite3"),
            local_store_sync=_choice(env, "LOCAL_STORE_SYNC", "FULL", LOCAL_STORE_SYNCS),
            local_max_sessions=_int(env, _renamed(env, "LOCAL_STORE_MAX_SESSIONS", "MEMORY_MAX_SESSIONS"),
                                    LOCAL_MAX_SESSIONS, 1, 10_000_000),
            local_max_bytes=_int(env, _renamed(env, "LOCAL_STORE_MAX_BYTES", "MEMORY_MAX_BYTES"),
                                 LOCAL_MAX_BYTES[local_store], 1024, 2**44),
            redis_connect_timeout=_float(env, "REDIS_CONNECT_TIMEOUT", 1.0, 0.01, 60),
            redis_socket_timeout=_float(env, "REDIS_SOCKET_TIMEOUT", 2.0, 0.01, 300),
            redis_retry_interval=_float(env, "REDIS_RETRY_INTERVAL", 3.0, 0.05, 3600),
            redis_max_connections=_int(env, "REDIS_MAX_CONNECTIONS", 16, 1, 10_000),
            redis_pool_timeout=_float(env, "REDIS_POOL_TIMEOUT", 10.0, 0.01, 300),
            workers=_int(env, "WEB_CONCURRENCY", 0, 0, 64),
            threads=_int(env, "GUNICORN_THREADS", 0, 0, 256),
            trusted_proxy_hops=_int(env, "TRUSTED_PROXY_HOPS", 0, 0, 10),
            allowed_hosts=_hosts(env),
            backup_dir=_folder(env, "BACKUP_DIR", "instance/backups"),
            backup_keep=_int(env, "BACKUP_KEEP", 7, 1, 100_000),
            backup_s3=_backup_s3(env),
            backup_schedule=_schedule(env),
            redis_allow_eviction=_flag(env, "REDIS_ALLOW_EVICTION"),
            redis_sentinels=sentinels,
            redis_sentinel_master=_sentinel_master(env, sentinels),
            redis_sentinel_username=_sentinel_setting(env, "REDIS_SENTINEL_USERNAME", sentinels),
            redis_sentinel_password=_sentinel_setting(env, "REDIS_SENTINEL_PASSWORD", sentinels),
            redis_wait_replicas=wait_replicas,
            redis_require_replicas=_require_replicas(env, wait_replicas),
            import_max_items=_int(env, "IMPORT_MAX_ITEMS", 1000, 1, 1_000_000),
            service_hosts=hosts,
            service_host_index=_int(env, "SERVICE_HOST_INDEX", 0, 0, hosts - 1),
            import_time_limit=_float(env, "IMPORT_TIME_LIMIT_SECONDS", 20.0, 0.1, 3600),
            compare_max_bytes=_int(env, "COMPARE_MAX_BYTES", 16 * 1024 * 1024, 1024, 2**40),
            compare_concurrency=_int(env, "COMPARE_CONCURRENCY", 1, 1, 256),
            api_token=_token(env),
            users_file=_file(env, "USERS_FILE", "instance/users.json"),
            auth_proxy_header=_proxy_header(env),
            user_max_sessions=_int(env, "USER_MAX_SESSIONS", 0, 0, 100_000_000),
            user_max_bytes=_int(env, "USER_MAX_BYTES", 0, 0, 2**50),
            share_max_seconds=_int(env, "SHARE_MAX_SECONDS", 30 * 86_400, 60, 10 * 365 * 86_400),
            activity_keep_days=_int(env, "ACTIVITY_KEEP_DAYS", 90, 1, 100 * 365),
        )


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}: expected 1 or 0, got {env[name]!r}")


def _renamed(env: Mapping[str, str], name: str, old_name: str) -> str:
    """The variable to read: `name`, or its former name when only that one is set."""
    return old_name if not env.get(name, "").strip() and env.get(old_name, "").strip() else name


def _path(env: Mapping[str, str], name: str, default: str) -> Path:
    """Parse a file path setting.

    A file path, relative to the working directory unless absolute (whether it is usable is checked when
    the store opens it)."""
    raw = _text(env, name, default)
    if "\0" in raw:
        raise ConfigError(f"{name}: not a usable path, got {raw!r}")
    return Path(raw).expanduser()


def _folder(env: Mapping[str, str], name: str, default: str) -> Path:
    """Parse a folder path setting.

    A folder path (created when first written to): a file of that name already there is refused now rather
    than at the first backup."""
    path = _path(env, name, default)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{name}: {str(path)!r} is a file, not a folder")
    return path


def _file(env: Mapping[str, str], name: str, default: str) -> Path:
    """Parse a file path setting whose file may not exist yet: a folder of that name is refused now."""
    path = _path(env, name, default)
    if path.is_dir():
        raise ConfigError(f"{name}: {str(path)!r} is a folder, not a file")
    return path


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")  # an HTTP field name (RFC 9110 token)


def _proxy_header(env: Mapping[str, str]) -> str | None:
    """Parse `AUTH_PROXY_HEADER`.

    `AUTH_PROXY_HEADER`: the header in which an authenticating proxy names the user (`X-Forwarded-User`). Any
    client can send any header, so it is believed only from the proxies `TRUSTED_PROXY_HOPS` counts: refused
    without them rather than letting every client name herself."""
    raw = env.get("AUTH_PROXY_HEADER", "").strip()
    if not raw:
        return None
    if not _HEADER_NAME.fullmatch(raw):
        raise ConfigError(f"AUTH_PROXY_HEADER: expected a header name like X-Forwarded-User, got {raw!r}")
    if raw.lower() in ("authorization", "cookie", "host"):
        raise ConfigError(f"AUTH_PROXY_HEADER: {raw!r} carries something else; name the header the proxy puts the "
                          "user name in, like X-Forwarded-User")
    if _int(env, "TRUSTED_PROXY_HOPS", 0, 0, 10) == 0:
        raise ConfigError("AUTH_PROXY_HEADER: set, but TRUSTED_PROXY_HOPS is 0 (any client could name any user); "
                          "set TRUSTED_PROXY_HOPS to the proxies in front of the service")
    return raw


def _host(env: Mapping[str, str]) -> str:
    """An IP address or a host name to listen on."""
    host = _text(env, "HOST", "127.0.0.1")
    if not _is_ip(host.strip("[]")) and not _HOSTNAME.match(host):
        raise ConfigError(f"HOST: expected an IP address or host name, got {host!r}")
    return host.strip("[]")


def _number(
    env: Mapping[str, str], name: str, default: float, low: float, high: float, parse: Callable[[str], float]
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name}: must be between {low:g} and {high:g}, got {raw!r}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    return int(_number(env, name, default, low, high, int))


def _float(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    return _number(env, name, default, low, high, float)


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = _text(env, name, default).upper()
    if value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {env[name]!r}")
    return value


_PASSWORD = re.compile(r"^([^:/]+://[^:@/]*):[^@]*@")  # scheme://user:PASSWORD@


def _redis_url(env: Mapping[str, str], sentinels: tuple[tuple[str, int], ...]) -> str | None:
    """Build the Redis URL from the settings.

    `REDIS_URL`, else `redis://REDIS_HOST:REDIS_PORT/0` when either is set, else no Redis (memory mode).
    With `REDIS_SENTINELS` the Sentinels name the master, so REDIS_URL may only carry what the data nodes need
    (user, password, database, TLS): a host there, or REDIS_HOST/REDIS_PORT, would contradict them."""
    url = env.get("REDIS_URL", "").strip()
    if url:
        shown = _PASSWORD.sub(r"\1:***@", url)  # never log a password, even of a URL that does not parse
        try:
            parts = urlsplit(url)
        except ValueError as error:  # an unbalanced [IPv6] bracket, say
            raise ConfigError(f"REDIS_URL: {error}, got {shown!r}") from None
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path or sentinels):
            raise ConfigError(f"REDIS_URL: expected redis://host:port/db, got {shown!r}")
        db = parts.path.lstrip("/")
        if parts.scheme != "unix" and db and not db.isdigit():
            raise ConfigError(f"REDIS_URL: the database must be a number, got {shown!r}")
        try:
            _ = parts.port  # raises for a port that is not a number from 0 to 65535
            options = parse_url(url)  # what redis-py will do with it, query options included
        except ValueError as error:
            raise ConfigError(f"REDIS_URL: {error}, got {shown!r}") from None
        if sentinels and (parts.scheme == "unix" or parts.hostname or parts.port):
            raise ConfigError(f"REDIS_URL: names a host, but with REDIS_SENTINELS the Sentinels name the master; "
                              f"leave it out (redis://user:password@/0), got {shown!r}")
        _check_url_options(parts.scheme, parse_qs(parts.query), options)
        return url
    host, port = env.get("REDIS_HOST", "").strip(), env.get("REDIS_PORT", "").strip()
    if not host and not port:
        return None
    if sentinels:
        name = "REDIS_HOST" if host else "REDIS_PORT"
        raise ConfigError(f"{name}: contradicts REDIS_SENTINELS (the Sentinels name the master); unset it")
    port_number = _int(env, "REDIS_PORT", 6379, 1, 65535)
    return f"redis://{host or '127.0.0.1'}:{port_number}/0"


def _check_url_options(scheme: str, query: dict[str, list[str]], options: dict) -> None:
    """Validate the Redis URL's options at start-up.

    Refuse now what redis-py would refuse on every connection: an option it does not know, TLS options
    without TLS, and CA or client certificate files it cannot load (checked the way the TLS handshake will
    load them, so an unreadable or wrong file is named at start-up)."""
    for name in query:
        if name not in URL_OPTIONS:
            raise ConfigError(f"REDIS_URL: unknown option {name!r} in the query string")
        if name.startswith("ssl_") and scheme != "rediss":
            raise ConfigError(f"REDIS_URL: {name} needs a rediss:// URL (TLS), got {scheme}://")
    if scheme != "rediss":
        return
    if options.get("ssl_cert_reqs", "required") not in ("none", "optional", "required"):
        raise ConfigError(f"REDIS_URL: ssl_cert_reqs must be none, optional or required, got "
                          f"{options['ssl_cert_reqs']!r}")
    context = ssl.create_default_context()
    ca_file, ca_path = options.get("ssl_ca_certs"), options.get("ssl_ca_path")
    if ca_path and not os.path.isdir(ca_path):
        raise ConfigError(f"REDIS_URL: ssl_ca_path: {ca_path!r} is not a directory")
    try:
        if ca_file or ca_path:
            context.load_verify_locations(cafile=ca_file, capath=ca_path)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"REDIS_URL: ssl_ca_certs: cannot load CA certificates from {ca_file!r} "
                          f"({_reason(error)})") from None
    cert, key = options.get("ssl_certfile"), options.get("ssl_keyfile")
    if key and not cert:
        raise ConfigError("REDIS_URL: ssl_keyfile needs ssl_certfile (the client certificate it belongs to)")
    try:
        if cert:
            context.load_cert_chain(cert, key, password=options.get("ssl_password"))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"REDIS_URL: ssl_certfile: cannot load the client certificate {cert!r}"
                          f"{f' with the key {key!r}' if key else ''} ({_reason(error)})") from None


def _reason(error: OSError) -> str:
    """The short cause: `No such file or directory`, or an `ssl.SSLError`'s reason (`PEM lib`, ...)."""
    return getattr(error, "reason", None) or error.strerror or str(error)


_ADDRESS = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]\s]+)):(?P<port>\d{1,5})$")


def _sentinels(env: Mapping[str, str]) -> tuple[tuple[str, int], ...]:
    """`REDIS_SENTINELS`: comma-separated `host:port` (`[v6]:port` for an IPv6 address) of the Sentinels."""
    found: list[tuple[str, int]] = []
    for item in (part.strip() for part in env.get("REDIS_SENTINELS", "").split(",")):
        if not item:
            continue
        match = _ADDRESS.match(item)
        host = match and (match["v6"] or match["host"])
        if not match or not (_is_ip(host) or _HOSTNAME.match(host)) or not 0 < int(match["port"]) < 65536:
            raise ConfigError(f"REDIS_SENTINELS: expected host:port[,host:port...], got {item!r}")
        if (host, int(match["port"])) in found:
            raise ConfigError(f"REDIS_SENTINELS: {item!r} is listed twice")
        found.append((host, int(match["port"])))
    return tuple(found)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _sentinel_setting(env: Mapping[str, str], name: str, sentinels: tuple[tuple[str, int], ...]) -> str | None:
    """Read a setting that is only valid with Sentinels.

    A setting that only means something with `REDIS_SENTINELS`: refused without it (it would be silently
    ignored)."""
    value = env.get(name, "").strip()
    if value and not sentinels:
        raise ConfigError(f"{name}: set, but REDIS_SENTINELS is not (it applies to Sentinel only)")
    return value or None


def _sentinel_master(env: Mapping[str, str], sentinels: tuple[tuple[str, int], ...]) -> str | None:
    """`REDIS_SENTINEL_MASTER`: required with `REDIS_SENTINELS`; one word, as Sentinel's `monitor` takes it."""
    name = _sentinel_setting(env, "REDIS_SENTINEL_MASTER", sentinels)
    if sentinels and not name:
        raise ConfigError("REDIS_SENTINEL_MASTER: required with REDIS_SENTINELS (the name the Sentinels monitor "
                          "the master under)")
    if name and any(c.isspace() or not c.isprintable() for c in name):
        raise ConfigError(f"REDIS_SENTINEL_MASTER: must be one word without control characters, got {name!r}")
    return name


def _require_replicas(env: Mapping[str, str], wait_replicas: int) -> bool:
    """Parse `REDIS_REQUIRE_REPLICAS`.

    `REDIS_REQUIRE_REPLICAS`: a save counts as in Redis only once `REDIS_WAIT_REPLICAS` replicas confirmed
    it (else it waits in the local store). Refused when no replica is waited for: it would change nothing."""
    required = _flag(env, "REDIS_REQUIRE_REPLICAS")
    if required and not wait_replicas:
        raise ConfigError("REDIS_REQUIRE_REPLICAS: set, but REDIS_WAIT_REPLICAS is 0 (no replica confirms a save); "
                          "set REDIS_WAIT_REPLICAS to the replicas each save needs")
    return required


def _token(env: Mapping[str, str]) -> str | None:
    """`API_TOKEN`: unset or empty means the API is open; a set token must be usable in a Bearer header."""
    token = env.get("API_TOKEN", "").strip()
    if not token:
        return None
    if len(token) < 16 or not re.fullmatch(r"[A-Za-z0-9._~+/=-]+", token):
        raise ConfigError("API_TOKEN: must be at least 16 characters of A-Z a-z 0-9 . _ ~ + / = -")
    return token


_ALLOWED_HOST = re.compile(r"^(\*|\.?[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?|\[[0-9a-f:.]+\])$")


def _hosts(env: Mapping[str, str]) -> tuple[str, ...]:
    """Parse `ALLOWED_HOSTS`.

    `ALLOWED_HOSTS`: names the service may be reached by besides localhost, 127.0.0.1 and [::1] (without a
    port; `.example.com` also allows its subdomains; `*` turns the check off)."""
    raw = env.get("ALLOWED_HOSTS", "").strip().lower()
    hosts = tuple(h.strip() for h in raw.split(",") if h.strip())
    for host in hosts:
        if not _ALLOWED_HOST.match(host):
            raise ConfigError(f"ALLOWED_HOSTS: {host!r} is not a host name, .suffix, [IPv6] or *")
    return hosts


_ORIGIN = re.compile(r"^https?://[^/\s]+$")


def _origins(env: Mapping[str, str]) -> tuple[str, ...]:
    """Exact origins from `CORS_ORIGINS`; empty means the default (any localhost origin)."""
    raw = env.get("CORS_ORIGINS", "").strip()
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin == "*":  # with credentials allowed, any web page the user visits could read and delete sessions
            raise ConfigError("CORS_ORIGINS: '*' (any origin) is refused: any web page could then read and delete "
                              "the sessions; list the StoryArt frontend's exact origins, e.g. http://localhost:3000")
        if not _ORIGIN.match(origin):
            raise ConfigError(f"CORS_ORIGINS: {origin!r} is not an origin like http://host:port")
    return origins


_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")  # S3's rules, loosened for other stores


def _backup_s3(env: Mapping[str, str]) -> S3Settings | None:
    """Parse and check the off-site backup settings.

    `BACKUP_S3_URL` (`s3://bucket/prefix`), `BACKUP_S3_ENDPOINT` (any S3-compatible store; unset: AWS) and the
    credentials, checked now so that a typo stops start-up rather than the first backup. A URL never carries a
    secret here: one with `user:password@` is refused without repeating it."""
    raw = env.get("BACKUP_S3_URL", "").strip()
    endpoint = _s3_endpoint(env)
    if not raw:
        if endpoint:
            raise ConfigError("BACKUP_S3_ENDPOINT: set, but BACKUP_S3_URL is not (it names the bucket)")
        return None
    try:
        parts = urlsplit(raw)
    except ValueError:
        parts = None
    if parts is None or "@" in raw:
        raise ConfigError("BACKUP_S3_URL: expected s3://bucket/prefix (credentials go in AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, never in the URL)")
    if parts.scheme != "s3" or not _BUCKET.match(parts.netloc) or ".." in parts.netloc or parts.query \
            or parts.fragment:
        raise ConfigError(f"BACKUP_S3_URL: expected s3://bucket/prefix, got {raw!r}")
    prefix = parts.path.strip("/")
    if any(not c.isprintable() for c in prefix) or "//" in prefix or any(p in (".", "..") for p in prefix.split("/")):
        raise ConfigError(f"BACKUP_S3_URL: the prefix must be folder names separated by /, got {raw!r}")
    access_key = env.get("AWS_ACCESS_KEY_ID", "").strip() or None
    secret_key = env.get("AWS_SECRET_ACCESS_KEY", "").strip() or None
    if bool(access_key) != bool(secret_key):
        given, missing = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if access_key else \
            ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
        raise ConfigError(f"{missing}: required with {given} (for BACKUP_S3_URL)")
    settings = S3Settings(
        bucket=parts.netloc, prefix=f"{prefix}/" if prefix else "", endpoint=endpoint,
        region=env.get("AWS_REGION", "").strip() or env.get("AWS_DEFAULT_REGION", "").strip() or None,
        profile=None if access_key else env.get("AWS_PROFILE", "").strip() or None,
        access_key=access_key, secret_key=secret_key,
        session_token=env.get("AWS_SESSION_TOKEN", "").strip() or None if access_key else None)
    if not access_key:
        _check_aws_chain(settings)
    return settings


def _s3_endpoint(env: Mapping[str, str]) -> str | None:
    """`BACKUP_S3_ENDPOINT`: `http(s)://host[:port]` of an S3-compatible store."""
    raw = env.get("BACKUP_S3_ENDPOINT", "").strip()
    if not raw:
        return None
    try:
        parts = urlsplit(raw)
        _ = parts.port  # raises for a port that is not a number from 0 to 65535
    except ValueError:
        parts = None
    if parts is None or "@" in parts.netloc:
        raise ConfigError("BACKUP_S3_ENDPOINT: expected http(s)://host[:port] (credentials go in AWS_ACCESS_KEY_ID "
                          "and AWS_SECRET_ACCESS_KEY, never in the URL)")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment \
            or parts.path.strip("/"):
        raise ConfigError(f"BACKUP_S3_ENDPOINT: expected http(s)://host[:port], got {raw!r}")
    return raw.rstrip("/")


def _check_aws_chain(settings: S3Settings) -> None:
    """Check that boto3 can find AWS credentials.

    Without keys in the environment, boto3's chain must find some: AWS_PROFILE's profile or the default one
    in ~/.aws, SSO, a container or instance role. (boto3 is imported only when an S3 target is set.)"""
    import boto3
    from botocore.exceptions import BotoCoreError

    try:
        found = boto3.session.Session(profile_name=settings.profile).get_credentials()
    except BotoCoreError as error:  # an unknown profile, a config file that does not parse
        name = "AWS_PROFILE" if settings.profile else "BACKUP_S3_URL"
        raise ConfigError(f"{name}: cannot read the AWS credentials: {error}") from None
    if found is None:
        raise ConfigError("BACKUP_S3_URL: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or ~/.aws/credentials)")


def _schedule(env: Mapping[str, str]) -> str | None:
    """Parse and check `BACKUP_SCHEDULE`.

    `BACKUP_SCHEDULE`: a cron expression (five fields, `@daily` and the like, or a sixth field of seconds,
    croniter's extension), parsed by croniter; one that never comes due (`0 0 31 2 *`) is refused too."""
    raw = " ".join(env.get("BACKUP_SCHEDULE", "").split())
    if not raw:
        return None
    from croniter import CroniterError, croniter

    try:
        croniter(raw).get_next(float)
    except (CroniterError, ValueError, KeyError) as error:
        raise ConfigError(f"BACKUP_SCHEDULE: {raw!r} is not a cron expression that comes due ({error})") from None
    return raw
