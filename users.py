"""The people of a shared service: the users file, and which user a token or a proxy's header names.

`USERS_FILE` (JSON) holds each user's name, a SHA-256 of her token (never the token), her quota overrides and
when she was created. With no file, or an empty one, there are no users: the service is in single-user mode and
everything belongs to the default user (the one `API_TOKEN` names).

Every process keeps the file's contents in memory and re-reads it when the file changes (its mtime, size or inode),
so a token revoked by `flask users revoke` in another process, or on another host sharing the folder, stops working
at the next request of every worker. A change is made under an exclusive lock (re-read, change, write a temporary
file, rename it over the old one), so concurrent writers (several workers meeting a new proxy user, the CLI while
the service runs) never lose each other's changes and a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config import ConfigError
from files import sync_folder

NAME = re.compile(r"[A-Za-z0-9._@+-]{1,64}")  # user names; compared case-insensitively (their casefold is the key)
DEFAULT = "default"  # the default user's name: the owner of everything in single-user mode, named by API_TOKEN
LOCK_WAIT = 10.0  # seconds a change waits for another process's change to finish (each takes milliseconds)
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class User:
    """One user as the file describes her."""

    name: str  # as first written
    key: str  # name.casefold(): what storage keys and owners use
    max_sessions: int | None  # her override of USER_MAX_SESSIONS (0: no limit for her; None: the setting)
    max_bytes: int | None  # her override of USER_MAX_BYTES (0: no limit for her; None: the setting)
    has_token: bool  # False: revoked, or created by the auth proxy and never given one
    revoked: bool = False  # her token was revoked (and not rotated since)


@dataclass(frozen=True)
class _State:
    """One reading of the file: what it held, and the file's identity when read (None: there was no file)."""

    signature: tuple[int, int, int] | None = None
    users: dict[str, User] = field(default_factory=dict)  # by key
    tokens: dict[str, str] = field(default_factory=dict)  # SHA-256 hex of a token -> key
    raw: dict[str, Any] = field(default_factory=lambda: {"users": {}})  # the JSON, unknown fields kept


def key_of(name: str) -> str:
    """The key of a user name (her storage prefix and owner), or ValueError saying what a name may be."""
    if not isinstance(name, str) or not NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"user name {name!r} is invalid: use 1-64 characters of A-Z a-z 0-9 . _ @ + - "
                         "(not . or .. alone)")
    return name.casefold()


def is_key(text: object) -> bool:
    """Whether `text` is a user's key as storage, share tokens and backups write it (a valid name, casefolded)."""
    if not isinstance(text, str):
        return False
    try:
        return key_of(text) == text
    except ValueError:
        return False


def _digest(token: str) -> str:
    """What the file keeps of a token: its SHA-256.

    A fast hash is right here: tokens are 256 random bits (`secrets.token_urlsafe(32)`), so nothing is gained by
    a slow password hash (no dictionary to guess from), and each request pays for this hash.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class Users:
    """The users of `USERS_FILE`, kept current with the file; safe to share between threads."""

    def __init__(self, path: Path, state: _State) -> None:
        self.path = path
        self._state = state
        self._reading = threading.Lock()  # one thread re-reads a changed file; the others keep the last reading
        self._writing = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> Users:
        """Read the file (a missing one: no users); ConfigError naming USERS_FILE when it cannot be used."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"USERS_FILE: {str(path)!r} is a folder, not a file")
        return cls(path, _read(path))

    def any(self) -> bool:
        """At least one user exists (multi-user mode): a revoked one or one without a token counts too."""
        return bool(self._current().users)

    def by_token(self, token: str) -> User | None:
        """The user this token names; None for a token that is unknown or revoked.

        Looked up by its hash: comparing hashes of 256-bit random tokens leaks nothing through timing.
        """
        state = self._current()
        key = state.tokens.get(_digest(token)) if token else None
        return state.users.get(key) if key else None

    def by_name(self, name: str) -> User | None:
        """The user of this name (any case); None for an unknown or invalid name."""
        try:
            key = key_of(name)
        except ValueError:
            return None
        return self._current().users.get(key)

    def all(self) -> list[User]:
        """Every user, by key."""
        return sorted(self._current().users.values(), key=lambda user: user.key)

    def ensure(self, name: str) -> User:
        """The user a trusted authenticating proxy named: created without a token the first time, then the same one.

        ValueError for an invalid name or the default user's (a proxy cannot sign anybody in as her).
        """
        key = _usable_key(name)
        found = self._current().users.get(key)
        if found is not None:
            return found
        with self._change() as users:
            users.setdefault(key, _record(name, token_hash=None))
        return self._current().users[key]

    def add(self, name: str, *, max_sessions: int | None = None, max_bytes: int | None = None) -> tuple[User, str]:
        """Create a user with a new token: (the user, the token, which is kept nowhere); ValueError if she exists."""
        key = _usable_key(name)
        _check_quota(max_sessions, max_bytes)
        token = secrets.token_urlsafe(32)
        with self._change() as users:
            if key in users:
                raise ValueError(f"a user named {users[key].get('name', key)!r} already exists")
            users[key] = _record(name, token_hash=_digest(token), max_sessions=max_sessions, max_bytes=max_bytes)
        return self._current().users[key], token

    def rotate(self, name: str) -> str:
        """Give the user a new token (also after a revocation); the old one stops working."""
        token = secrets.token_urlsafe(32)
        with self._change() as users:
            record = _existing(users, name)
            record["tokenSha256"] = _digest(token)
            record.pop("revokedAt", None)
        return token

    def revoke(self, name: str) -> None:
        """Make the user's token stop working; the user, her sessions and shares stay (`rotate` gives a new one)."""
        with self._change() as users:
            record = _existing(users, name)
            if record.get("tokenSha256") is not None:
                record["tokenSha256"] = None
                record["revokedAt"] = _now_ms()

    def set_quota(self, name: str, *, max_sessions: int | None, max_bytes: int | None) -> None:
        """Set the user's quota overrides (None: the setting; 0: no limit for her)."""
        _check_quota(max_sessions, max_bytes)
        with self._change() as users:
            record = _existing(users, name)
            record["maxSessions"], record["maxBytes"] = max_sessions, max_bytes

    def _current(self) -> _State:
        """The latest reading, re-read first when the file changed since (one `os.stat`, about a microsecond)."""
        state = self._state
        if _signature(self.path) != state.signature:
            with self._reading:
                if _signature(self.path) != self._state.signature:
                    self._state = _read(self.path)
                state = self._state
        return state

    @contextlib.contextmanager
    def _change(self) -> Iterator[dict[str, dict[str, Any]]]:
        """Change the users under the file's lock: yields the freshly read `users` object; written if no error."""
        with self._writing, _locked(self.path):
            state = _read(self.path)
            raw = json.loads(json.dumps(state.raw))  # a copy: readers keep the state they have
            yield raw["users"]
            _write(self.path, raw)
            self._state = _read(self.path)


def _usable_key(name: str) -> str:
    key = key_of(name)
    if key == DEFAULT:
        raise ValueError(f"{DEFAULT!r} is the default user's name (the one API_TOKEN names); choose another")
    return key


def _existing(users: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    record = users.get(key_of(name))
    if record is None:
        raise ValueError(f"no user named {name!r}")
    return record


def _check_quota(max_sessions: int | None, max_bytes: int | None) -> None:
    for label, value in (("max_sessions", max_sessions), ("max_bytes", max_bytes)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"{label} must be a whole number of 0 or more (0: no limit), got {value!r}")


def _record(name: str, *, token_hash: str | None, max_sessions: int | None = None,
            max_bytes: int | None = None) -> dict[str, Any]:
    return {"name": name, "tokenSha256": token_hash, "maxSessions": max_sessions, "maxBytes": max_bytes,
            "createdAt": _now_ms()}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _signature(path: Path) -> tuple[int, int, int] | None:
    """The file's identity: a change to it (every write renames a new file into place) changes this.

    The inode changes with each rename and the size or mtime with nearly every change; the one change it could
    miss needs two writes within one clock tick of the kernel, the second reusing the first's freed inode with
    the same size, while a reader read between them.
    """
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError(f"USERS_FILE: cannot read {str(path)!r} ({error.strerror or error})") from None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def _read(path: Path) -> _State:
    """Read and check the file; a missing file is no users. ConfigError naming USERS_FILE for anything unusable."""
    shown = repr(str(path))
    try:
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())
            data = file.read()
    except FileNotFoundError:
        return _State()
    except OSError as error:
        raise ConfigError(f"USERS_FILE: cannot read {shown} ({error.strerror or error})") from None
    try:
        raw = json.loads(data) if data.strip() else {"users": {}}
    except ValueError as error:
        raise ConfigError(f"USERS_FILE: {shown} is not valid JSON ({error})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("users", {}), dict):
        raise ConfigError(f'USERS_FILE: {shown} must hold an object {{"users": {{...}}}}')
    raw.setdefault("users", {})
    users, tokens = {}, {}
    for key, record in raw["users"].items():
        user = _user(key, record, shown)
        users[key] = user
        if user.has_token:
            if record["tokenSha256"] in tokens:
                raise ConfigError(f"USERS_FILE: {shown}: users {tokens[record['tokenSha256']]!r} and {key!r} have "
                                  "the same token hash")
            tokens[record["tokenSha256"]] = key
    return _State((stat.st_mtime_ns, stat.st_size, stat.st_ino), users, tokens, raw)


def _user(key: str, record: Any, shown: str) -> User:
    """One entry of the file as a User, or ConfigError saying which entry and what is wrong with it."""
    where = f"USERS_FILE: {shown}: user {key!r}"
    if not isinstance(record, dict):
        raise ConfigError(f"{where} must be an object")
    name = record.get("name", key)
    if not isinstance(name, str) or not NAME.fullmatch(name) or name.casefold() != key:
        raise ConfigError(f"{where}: the name must be 1-64 characters of A-Z a-z 0-9 . _ @ + - whose lower case is "
                          f"the key, got {name!r}")
    token_hash = record.get("tokenSha256")
    if token_hash is not None and not (isinstance(token_hash, str) and _HEX64.fullmatch(token_hash)):
        raise ConfigError(f"{where}: tokenSha256 must be null or 64 lower-case hex digits")
    quotas = {}
    for field_name in ("maxSessions", "maxBytes"):
        value = record.get(field_name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"{where}: {field_name} must be null or a whole number of 0 or more, got {value!r}")
        quotas[field_name] = value
    return User(name=name, key=key, max_sessions=quotas["maxSessions"], max_bytes=quotas["maxBytes"],
                has_token=token_hash is not None, revoked=token_hash is None and "revokedAt" in record)


def _write(path: Path, raw: dict[str, Any]) -> None:
    """Replace the file in one step: a temporary file in its folder (mode 0600), flushed, renamed over it."""
    text = json.dumps(raw, indent=2, ensure_ascii=True) + "\n"
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise ConfigError(f"USERS_FILE: cannot write in {str(path.parent)!r} ({error.strerror or error})") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        _replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ConfigError(f"USERS_FILE: cannot write {str(path)!r} ({error.strerror or error})") from None
    sync_folder(path.parent)


def _replace(temporary: str, path: Path) -> None:
    """os.replace, retried briefly on Windows, where a reader holding the file open makes the rename fail."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            os.replace(temporary, path)
            return
        except PermissionError:
            if os.name != "nt" or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the exclusive lock of the users file (`<file>.lock`, next to it) for one change.

    An OS lock (flock on POSIX, msvcrt.locking on Windows) rather than a lock file created and removed: the OS
    lets go of it when its process dies, so a crashed writer never leaves a stale lock behind. The lock file
    stays (removing it would let two writers lock two different files).
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise ConfigError(f"USERS_FILE: cannot create the lock file {str(lock_path)!r} "
                          f"({error.strerror or error})") from None
    try:
        deadline = time.monotonic() + LOCK_WAIT
        pause = 0.001
        while not _try_lock(handle):
            if time.monotonic() > deadline:
                raise ConfigError(f"USERS_FILE: {str(path)!r} stayed locked by another process for {LOCK_WAIT:g} s "
                                  f"({str(lock_path)!r})")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        try:
            yield
        finally:
            _unlock(handle)
    finally:
        os.close(handle)


if os.name == "nt":  # pragma: no cover - Windows
    import msvcrt

    def _try_lock(handle: int) -> bool:
        os.lseek(handle, 0, os.SEEK_SET)
        try:
            msvcrt.locking(handle, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(handle: int) -> None:
        os.lseek(handle, 0, os.SEEK_SET)
        msvcrt.locking(handle, msvcrt.LK_UNLCK, 1)
else:
    import fcntl

    def _try_lock(handle: int) -> bool:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(handle: int) -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
