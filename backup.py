"""Backups: every live session in one ZIP file, and restoring one (docs/backups.md).

The format is one a person can open anywhere: a ZIP (deflate) holding `sessions/<timestamp>.json`, each the
session's exact stored bytes, and `manifest.json` (written last, since the sessions stream in): the count, the
bytes, and per session its file, size, SHA-256 and whether it is pinned. The same bytes go to a file
(`write_file`: a temporary file in the same folder, fsync, `os.replace`, so a crash never leaves half a backup
under the final name) and to a download (`stream`), read from the storage a few sessions at a time, so memory
stays within a few MB whatever the number of sessions.

A restore checks each session against the manifest's hash, validates it like an import (`payload.draft_from`)
and saves its exact bytes under its own timestamp (`head + b"<ms>}"`, see `payload.Draft`), then pins it if it
was pinned; each item is reported as an import's is ("imported", "replaced" or "rejected" with "error").
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from allocator import now_ms
from files import sync_folder
from payload import Draft, PayloadError, draft_from, head_of, summarize
from storage import DEFAULT_OWNER, EVERY, Query, RedisState, SessionStorage, StorageUnavailable, WhenFull
from users import Users, is_key

FORMAT = "storyart-backup"
VERSION = 1
MANIFEST = "manifest.json"
NAME_PREFIX = "storyart-backup-"
_NAME = re.compile(r"^storyart-backup-\d{8}T\d{6}\.\d{3}Z\.zip$")  # what rotation may remove
_ENTRY = re.compile(r"^(sessions|users/[a-z0-9._@+-]{1,64})/\d{1,16}\.json$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
LAST_ZIP_SECOND = 4_354_819_198  # 2107-12-31 23:59:58, the last time a ZIP entry can carry
# What `zipfile` raises for a member it cannot give back: damaged (its CRC, its compressed data, cut short),
# encrypted (RuntimeError: a password is required) or compressed by a method it lacks (NotImplementedError).
UNREADABLE = (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError)
COMPRESS_LEVEL = 6  # zlib's default: see docs/backups.md for what levels 1 and 9 cost


class BackupError(Exception):
    """The backup or restore cannot be done; the message is one line saying why."""


class Step(NamedTuple):
    """Progress: `done` of `total` sessions, `bytes` of them so far."""

    done: int
    total: int
    bytes: int


OnStep = Callable[[Step], None]


def default_name(now: datetime | None = None) -> str:
    """`storyart-backup-<UTC time>.zip`, to the millisecond: names sort as the backups were made."""
    now = now or datetime.now(UTC)
    return f"{NAME_PREFIX}{now:%Y%m%dT%H%M%S}.{now.microsecond // 1000:03d}Z.zip"


# ----------------------------------------------------------------------------------------------- writing


@dataclass
class Backup:
    """A backup being written, produced while the sessions are read.

    `chunks` are the ZIP file's bytes, produced while the sessions are read; the counts are final once `chunks` is
    exhausted.
    """

    chunks: Iterator[bytes] = field(default_factory=lambda: iter(()))
    count: int = 0
    bytes: int = 0
    pinned: int = 0
    skipped: int = 0  # records that are not sessions (see `storage.Listing.skipped`)


class _Pipe(io.RawIOBase):
    """A write-only file for `zipfile` that keeps the written bytes until they are taken.

    It is not seekable, so `zipfile` writes each entry's sizes after its data, which every unzip tool reads.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        taken = b"".join(self._parts)
        self._parts.clear()
        return taken


def every_owner(users_file: Path) -> list[str]:
    """Every user's space: the default user's, then each user's in `USERS_FILE` (what a full backup takes)."""
    return [DEFAULT_OWNER, *(user.key for user in Users.open(users_file).all())]


def _file(owner: str, timestamp: int) -> str:
    """A session's file in the backup: `sessions/<ms>.json` for the default user, `users/<key>/<ms>.json` else."""
    return f"sessions/{timestamp}.json" if owner == DEFAULT_OWNER else f"users/{owner}/{timestamp}.json"


def stream(storage: SessionStorage, on_step: OnStep | None = None, owners: list[str] | None = None) -> Backup:
    """Return the backup of every live session (pinned ones included) of `owners`' spaces, newest first in each.

    Without `owners`, of `storage`'s own space (a user's download); `flask sessions backup` and the schedule pass
    `every_owner`, and the manifest names each session's owner, so a restore puts it back in her space.

    Raises `StorageUnavailable` at once when a configured Redis is unreachable (a backup would miss what it holds); if
    Redis goes away midway, or a listed session a store still holds could not be read (`storage.Listing.missed`),
    iterating `chunks` raises it before the manifest is written, so the file is never complete. (A session deleted or
    expired while the backup runs is simply not in it.) Session keys another tool wrote without the index are indexed
    first, so the backup has them too.
    """
    storage.index_every_key()
    listings = [(owner, storage.space(owner).listing(Query(limit=EVERY))) for owner in owners or [storage.owner]]
    if any(listing.partial for _, listing in listings):
        raise StorageUnavailable("Redis is unreachable, so a backup would miss the sessions it holds")
    total = sum(listing.total for _, listing in listings)
    backup = Backup()

    def chunks() -> Iterator[bytes]:
        pipe = _Pipe()
        entries = []
        with zipfile.ZipFile(pipe, "w", zipfile.ZIP_DEFLATED) as archive:
            for owner, listing in listings:
                for row in listing.rows:
                    name = _file(owner, row.timestamp)
                    archive.writestr(_member(name, row.timestamp), row.body, compresslevel=COMPRESS_LEVEL)
                    entries.append({"timestamp": row.timestamp, "file": name, "bytes": len(row.body),
                                    "sha256": hashlib.sha256(row.body).hexdigest(), "pinned": row.pinned,
                                    **({"owner": owner} if owner != DEFAULT_OWNER else {})})
                    backup.count += 1
                    backup.bytes += len(row.body)
                    backup.pinned += row.pinned
                    if on_step:
                        on_step(Step(backup.count, total, backup.bytes))
                    yield pipe.take()
                if listing.missed:
                    raise StorageUnavailable(f"{listing.missed} listed session(s) could not be read while the backup "
                                             "ran, though a store holds them; back up again")
                if listing.partial:
                    raise StorageUnavailable("Redis became unreachable during the backup")
                backup.skipped += listing.skipped
            manifest = {"format": FORMAT, "version": VERSION,
                        "createdAt": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                        "count": backup.count, "bytes": backup.bytes, "pinned": backup.pinned,
                        "skipped": backup.skipped, "sessions": entries}
            archive.writestr(_member(MANIFEST, now_ms()), orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        yield pipe.take()

    backup.chunks = chunks()
    return backup


def _member(name: str, timestamp: int) -> zipfile.ZipInfo:
    """Make a ZIP entry dated by its session's timestamp, readable by everyone on unpack.

    The date goes only as far as ZIP dates go (1980 to 2107); another tool may have written any number of ms under a
    session key.
    """
    when = max(time.gmtime(min(timestamp / 1000, LAST_ZIP_SECOND))[:6], (1980, 1, 1, 0, 0, 0))
    info = zipfile.ZipInfo(name, date_time=when)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def write_file(storage: SessionStorage, path: Path, on_step: OnStep | None = None,
               owners: list[str] | None = None) -> Backup:
    """Write the backup to `path` atomically.

    It is written into a temporary file next to it, flushed to the disk, then renamed over `path`. On any failure the
    temporary file is removed and `path` is untouched. Raises `BackupError` when the folder cannot be written,
    `StorageUnavailable` as `stream` does.
    """
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=folder, prefix=f".{path.name}.", suffix=".partial", delete=False)  # noqa: SIM115
    except OSError as error:
        raise BackupError(f"cannot write a backup in {folder}: {error.strerror or error}") from None
    temporary = Path(handle.name)
    try:
        with handle:
            backup = stream(storage, on_step, owners)
            for chunk in backup.chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise BackupError(f"cannot write the backup {path}: {error.strerror or error}") from None
        raise
    sync_folder(folder)
    return backup


def rotate(folder: Path, keep: int, spare: str | None = None) -> list[Path]:
    """Remove the oldest backups in `folder` beyond the newest `keep`; return the removed ones.

    Only files named as `default_name` names them count, and the one named `spare` (the newest verified one) is never
    removed.
    """
    backups = sorted(p for p in folder.iterdir() if _NAME.match(p.name) and p.is_file())
    removed = [p for p in backups[: max(0, len(backups) - keep)] if p.name != spare]
    for old in removed:
        old.unlink(missing_ok=True)
    return removed


# --------------------------------------------------------------------------------------------- restoring


@dataclass
class Restored:
    """A restore's report: one result per manifest entry, shaped like an import's."""

    results: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        statuses = [r["status"] for r in self.results]
        return {status: statuses.count(status) for status in ("imported", "replaced", "rejected")}


def restore(storage: SessionStorage, path: Path, max_bytes: int, on_step: OnStep | None = None) -> Restored:
    """Restore every session of the backup at `path`.

    Sessions larger than `max_bytes` (MAX_CONTENT_LENGTH, what a save could have stored) are rejected unread. Raises
    `BackupError` when `path` is not a backup, and `StorageUnavailable` when a configured Redis is unreachable (pins
    need it, and so does replacing a session it holds) before anything is restored.
    """
    if storage.redis_configured and storage.check(when_down=True) is RedisState.DOWN:
        raise StorageUnavailable("Redis is configured but unreachable; restore when it answers again")
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as error:
        reason = "not a ZIP file" if isinstance(error, zipfile.BadZipFile) else (error.strerror or str(error))
        raise BackupError(f"{path} is not a StoryArt backup ({reason})") from None
    with archive:
        entries = _manifest(archive, path)
        # Whether a session is "replaced" is decided by what the stores held when the restore began, asked while
        # Redis answers: if Redis goes away midway, the rest go to the local store, which cannot say what Redis has.
        held: dict[str, set[int]] = {}
        for owner in {entry.get("owner", DEFAULT_OWNER) for entry in entries}:
            held[owner], asked = storage.space(owner).held([entry["timestamp"] for entry in entries
                                                             if entry.get("owner", DEFAULT_OWNER) == owner])
            if not asked:
                raise StorageUnavailable("Redis is configured but unreachable; restore when it answers again")
        report = Restored()
        done = size = 0
        for index, entry in enumerate(entries):
            owner = entry.get("owner", DEFAULT_OWNER)
            result = _restore_one(storage.space(owner), archive, entry, max_bytes, held[owner])
            report.results.append({"index": index, **result})
            done, size = done + 1, size + entry["bytes"]
            if on_step:
                on_step(Step(done, len(entries), size))
    return report


def _manifest(archive: zipfile.ZipFile, path: Path) -> list[dict[str, Any]]:
    """The manifest's session entries, each checked for the fields a restore relies on."""
    try:
        with archive.open(MANIFEST) as member:
            manifest = orjson.loads(member.read(64 * 1024 * 1024))
    except KeyError:
        raise BackupError(f"{path} is not a StoryArt backup (it has no {MANIFEST})") from None
    except (orjson.JSONDecodeError, *UNREADABLE) as error:
        raise BackupError(f"{path} is not a StoryArt backup (its {MANIFEST} cannot be read: {error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{path} is not a StoryArt backup (its {MANIFEST} is not a {FORMAT} manifest)")
    if manifest.get("version") != VERSION:
        raise BackupError(f"{path} is a StoryArt backup of version {manifest.get('version')!r}; this service "
                          f"reads version {VERSION}")
    entries = manifest.get("sessions")
    if not isinstance(entries, list) or not all(_well_formed(e) for e in entries):
        raise BackupError(f"{path} is not a StoryArt backup (its {MANIFEST} lists sessions it cannot describe)")
    return entries


def _well_formed(entry: Any) -> bool:
    return (isinstance(entry, dict) and type(entry.get("timestamp")) is int and entry["timestamp"] > 0
            and isinstance(entry.get("file"), str) and bool(_ENTRY.match(entry["file"]))
            and type(entry.get("bytes")) is int and entry["bytes"] >= 0
            and isinstance(entry.get("sha256"), str) and bool(_SHA256.match(entry["sha256"]))
            and type(entry.get("pinned")) is bool and _owned(entry))


def _owned(entry: dict[str, Any]) -> bool:
    """Whether an entry names its owner as a backup writes it: none (the default user's), or a user's key."""
    owner = entry.get("owner", DEFAULT_OWNER)
    if owner == DEFAULT_OWNER:
        return entry["file"].startswith("sessions/")
    return is_key(owner) and entry["file"].startswith(f"users/{owner}/")


def _restore_one(storage: SessionStorage, archive: zipfile.ZipFile, entry: dict[str, Any], max_bytes: int,
                 held: set[int]) -> dict[str, Any]:
    """Restore one entry; `held` (the timestamps that hold a session) gains the one restored."""
    timestamp = entry["timestamp"]
    rejected = {"status": "rejected", "timestamp": timestamp}
    try:
        body = _read(archive, entry["file"], max_bytes)
    except BackupError as error:
        return {**rejected, "error": str(error)}
    if hashlib.sha256(body).hexdigest() != entry["sha256"]:
        return {**rejected, "error": f"{entry['file']} does not match its SHA-256 in the manifest (the backup was "
                                     "changed or damaged)"}
    try:
        draft = _exact_draft(body, timestamp)
        stored, where = storage.save(draft, when_full=WhenFull.REFUSE)  # never evicts to make room
    except (PayloadError, StorageUnavailable) as error:
        return {**rejected, "error": str(error)}
    existed = stored in held
    held.add(stored)
    if entry["pinned"]:
        try:
            storage.pin(stored, True)
        except StorageUnavailable as error:
            return {**rejected, "error": f"stored, but it could not be pinned ({error}); restore again to pin it"}
    return {"status": "replaced" if existed else "imported", "timestamp": stored,
            "sessionKey": storage.keys.session_key(stored), "storage": where, "pinned": entry["pinned"]}


def _read(archive: zipfile.ZipFile, name: str, max_bytes: int) -> bytes:
    """The member's bytes, at most `max_bytes` of them whatever its header claims (a ZIP bomb stops there)."""
    try:
        with archive.open(name) as member:
            body = member.read(max_bytes + 1)
    except KeyError:
        raise BackupError(f"{name} is missing from the backup") from None
    except UNREADABLE as error:
        raise BackupError(f"{name} cannot be read ({error})") from None
    if len(body) > max_bytes:
        raise BackupError(f"{name} is larger than MAX_CONTENT_LENGTH ({max_bytes} bytes)")
    return body


def _exact_draft(body: bytes, timestamp: int) -> Draft:
    """Make a `Draft` that stores `body` byte for byte under `timestamp`.

    It is validated like an import's item. A session the service wrote ends in `<timestamp>}` and is kept as it is; one
    another tool wrote otherwise is stored as a save would store it (its fields and values the same, its bytes
    re-serialized).
    """
    try:
        session = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise PayloadError(f"The session is not valid JSON: {error}.") from None
    if isinstance(session, dict) and session.get("timestamp") != timestamp:
        raise PayloadError(f"The session's timestamp is not {timestamp}, the one the manifest names.")
    draft = draft_from(session, now_ms())
    head = head_of(body, timestamp)
    if len(head) == len(body) or draft.render(timestamp) == body:  # another tool's bytes, or a save's own
        return draft
    fields = {k: v for k, v in session.items() if k != "timestamp"}
    return Draft(bytes(head), timestamp, summarize(fields, len(body), head), draft.save_id)
