"""Who a request is: the user whose space it works in (docs/contract.md §6).

With no users in `USERS_FILE` everything is the default user's, as before users existed (with `API_TOKEN`, only
for requests that give it). Once a user exists, a request under `/api/` names one: `Authorization: Bearer <token>`
(`API_TOKEN` names the default user), or, behind an authenticating proxy, the `AUTH_PROXY_HEADER` it sets (trusted
because `TRUSTED_PROXY_HOPS` says every request comes through it). What needs nobody: CORS preflights, `/health`,
the history page's files, and share links (their token is the permission).
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import re
from dataclasses import dataclass

from config import Config, ConfigError
from stores.base import DEFAULT_OWNER
from users import DEFAULT, User, Users

OPEN_PREFIXES = ("/api/v1/shared/",)  # API paths a share link's token opens, without a user
_ADDRESS_CHARS = re.compile(r"[0-9A-Fa-f:.]{2,45}")  # what an IPv4 or IPv6 address is written with
_SCOPE_ID = re.compile(r"[A-Za-z0-9_.-]{1,16}")  # an interface name or number (`fe80::1%eth0`)


@dataclass(frozen=True, slots=True)
class Caller:
    """The user a request works for: her space, her name as shown, and her quotas (0: none)."""

    owner: str  # her space (`stores.base.Keys`): DEFAULT_OWNER for the default user, else her key
    name: str
    max_sessions: int = 0
    max_bytes: int = 0

    @property
    def has_quota(self) -> bool:
        return bool(self.max_sessions or self.max_bytes)


class Refused(Exception):
    """The request names no valid user: `status` (401, 403 or 503) and a message for the JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Identity:
    """Tell requests' users apart, from the users file and the settings."""

    def __init__(self, config: Config, users: Users) -> None:
        self.users = users
        self.api_token = config.api_token
        self.proxy_header = f"HTTP_{config.auth_proxy_header.upper().replace('-', '_')}" \
            if config.auth_proxy_header else None
        self.quotas = (config.user_max_sessions, config.user_max_bytes)
        self.default = Caller(DEFAULT_OWNER, DEFAULT)

    def multi_user(self) -> bool:
        return self.users.any()

    def caller(self, environ: dict, method: str, path: str) -> Caller | None:
        """The request's user; None for a request that needs none. Raises `Refused`.

        A file that broke while the service runs refuses every request (503) rather than let a revoked token
        back in."""
        if method == "OPTIONS" or not path.startswith("/api/") or path.startswith(OPEN_PREFIXES):
            return None
        try:
            if self.proxy_header is not None and (name := environ.get(self.proxy_header)):
                return self._proxied(name)
            scheme, _, token = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
            token = token.strip() if scheme.lower() == "bearer" else ""
            if token and self.api_token is not None and hmac.compare_digest(token.encode(), self.api_token.encode()):
                return self.default
            user = self.users.by_token(token) if token else None
            if user is not None:
                return self._of(user)
            if not token and self.api_token is None and not self.users.any():
                return self.default  # single-user mode, open as before users existed
        except ConfigError as error:
            raise Refused(503, f"The service cannot read its users now ({error}); retry later.") from None
        raise Refused(401, "A valid API token is required (Authorization: Bearer <token>).")

    def _proxied(self, name: str) -> Caller:
        try:
            return self._of(self.users.ensure(name))
        except ValueError as error:
            raise Refused(403, f"The signed-in user cannot use this service: {error}.") from None

    def _of(self, user: User) -> Caller:
        sessions, size = self.quotas
        return Caller(user.key, user.name, sessions if user.max_sessions is None else user.max_sessions,
                      size if user.max_bytes is None else user.max_bytes)

    def shown_name(self, owner: str) -> str | None:
        """How a space's owner is shown (`sharedBy`): her name as written, or `default`; None when nobody has it."""
        if owner == DEFAULT_OWNER:
            return DEFAULT
        user = self.users.by_name(owner)
        return user.name if user is not None else None


def loggable_address(value: str | None) -> str:
    """Return the client address to write into the access line, or `-`.

    It is `value` if it is one valid IPv4 or IPv6 address (a surrounding `[...]` dropped), else `-`. With
    TRUSTED_PROXY_HOPS it is the last `X-Forwarded-For` entry, which a client that reaches the service directly writes
    itself: nothing but an address may get from there into the line.
    """
    if not value or len(value) > 64:
        return "-"
    return _checked_address(value)


@functools.lru_cache(maxsize=1024)  # a few us per parse; the same few addresses come again and again
def _checked_address(value: str) -> str:
    text = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    address, percent, scope = text.partition("%")
    # ipaddress takes any scope id after "%", spaces and control characters included: only a plain name.
    if not _ADDRESS_CHARS.fullmatch(address) or (percent and not _SCOPE_ID.fullmatch(scope)):
        return "-"
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return "-"
    return text
