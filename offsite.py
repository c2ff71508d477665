"""Keep backups in `BACKUP_DIR` on this disk and, with `BACKUP_S3_URL`, in an S3-compatible store (docs/backups.md).

`take` is one backup as the `sessions backup` command and the schedule (`scheduler.py`) take it: the ZIP is
written to `BACKUP_DIR` first (`backup.write_file`, atomic), then every backup there that the store does not yet
hold verified is uploaded, the new one first, so one that failed is retried by the next backup. An upload counts
as off-site only once it is read back: the object's size and its metadata (`sha256`, `bytes`, `sessions`) are
checked with a HEAD, then the whole object is downloaded, streamed, and hashed again; only then is
`NAME.zip.sha256` written beside it (`<hex>  NAME.zip`, what `sha256sum -c` reads). That file is the mark of a
verified copy: a listing or a restore trusts an object only with it, a size above 0 equal to the metadata's
`bytes`, and the same hash in both; a restore also hashes what it downloads. Rotation (`BACKUP_KEEP`) runs in
each place on its own and always spares that place's newest verified backup.

boto3 is the client (AWS's own SDK: it speaks to every S3-compatible store with an endpoint URL, reads the
standard AWS variables and files, signs, retries and splits large uploads into parts); it is imported only when a
store is configured.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from backup import (
    FORMAT,
    MANIFEST,
    UNREADABLE,
    Backup,
    BackupError,
    OnStep,
    default_name,
    every_owner,
    rotate,
    write_file,
)
from config import Config, S3Settings
from storage import SessionStorage, StorageUnavailable

log = logging.getLogger(__name__)

NAME = re.compile(r"^storyart-backup-(\d{8}T\d{6}\.\d{3})Z\.zip$")  # what the service names (and rotates)
SIDECAR = ".sha256"  # NAME.zip.sha256: written only after the upload was read back and matched
CHUNK = 1024 * 1024
PART = 64 * 1024 * 1024  # larger uploads go in parts of this size (a few at a time: bounded memory)


class OffsiteError(BackupError):
    """The store cannot be reached, refused, or holds no verified copy; the message is one line saying why."""


@dataclass(frozen=True)
class Facts:
    """What identifies one backup file: its name, size, SHA-256 and how many sessions its manifest lists."""

    name: str
    bytes: int
    sha256: str
    sessions: int

    @classmethod
    def of(cls, path: Path) -> Facts:
        digest, size = hashlib.sha256(), 0
        with path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
        manifest = _manifest(path)
        return cls(path.name, size, digest.hexdigest(), manifest["count"] if manifest else 0)


@dataclass(frozen=True)
class Copy:
    """One backup in one place, as `sessions backups` lists it: `problem` says why it is not verified."""

    place: str  # "local" or "s3"
    name: str
    location: str  # the file's path or the object's s3:// URL
    sessions: int | None
    bytes: int
    problem: str | None = None

    @property
    def verified(self) -> bool:
        return self.problem is None


def made_at(name: str) -> datetime | None:
    """When a backup named by the service was made (from its name, which survives copies between places)."""
    found = NAME.match(name)
    return datetime.strptime(found[1] + "000", "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC) if found else None


# -------------------------------------------------------------------------------------------- this disk


def _manifest(path: Path) -> dict[str, Any] | None:
    """Return the backup's manifest if the file is a readable StoryArt backup, else None.

    Readable means its central directory and manifest are there: what a truncated or foreign file lacks.
    """
    try:
        with zipfile.ZipFile(path) as archive, archive.open(MANIFEST) as member:
            manifest = orjson.loads(member.read(64 * 1024 * 1024))
    except (KeyError, orjson.JSONDecodeError, *UNREADABLE):
        return None
    ok = isinstance(manifest, dict) and manifest.get("format") == FORMAT and type(manifest.get("count")) is int
    return manifest if ok else None


def local_copies(folder: Path) -> list[Copy]:
    """The backups in `folder` named as the service names them, oldest first."""
    if not folder.is_dir():
        return []
    copies = []
    for path in sorted(p for p in folder.iterdir() if NAME.match(p.name) and p.is_file()):
        manifest = _manifest(path)
        with contextlib.suppress(OSError):
            copies.append(Copy("local", path.name, str(path), manifest["count"] if manifest else None,
                               path.stat().st_size, None if manifest else "not a readable StoryArt backup"))
    return copies


# ----------------------------------------------------------------------------------------------- the store


class Store:
    """The S3-compatible store of `BACKUP_S3_URL`, through one boto3 client made on first use."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config as BotoConfig

            s = self.settings
            session = boto3.session.Session(aws_access_key_id=s.access_key, aws_secret_access_key=s.secret_key,
                                            aws_session_token=s.session_token, profile_name=s.profile,
                                            region_name=s.region)
            # Another store than AWS: path-style addresses (bucket.host needs DNS set up for it), and checksums only
            # where S3 requires them (some stores refuse the newer trailing checksums; the read-back checks anyway).
            style = {"s3": {"addressing_style": "path"}, "request_checksum_calculation": "when_required",
                     "response_checksum_validation": "when_required"} if s.endpoint else {}
            self._client = session.client("s3", endpoint_url=s.endpoint, config=BotoConfig(
                connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                user_agent_extra="storyart-session", **style))
        return self._client

    def url(self, key: str) -> str:
        return f"s3://{self.settings.bucket}/{key}"

    def key(self, name: str) -> str:
        return self.settings.prefix + name

    def copies(self) -> list[Copy]:
        """List the backups under the prefix, oldest first, each checked for what makes it verified.

        Only objects named as the service names them count; each check is a HEAD and its small checksum file, nothing
        large is downloaded.
        """
        sizes: dict[str, int] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.settings.bucket, Prefix=self.settings.prefix, Delimiter="/")
            for page in pages:
                for item in page.get("Contents", ()):
                    sizes[item["Key"][len(self.settings.prefix):]] = item["Size"]
        except Exception as error:  # noqa: BLE001 - botocore's and the connection's errors alike: one line
            raise OffsiteError(f"cannot list {self.settings.url()}: {reason(error)}") from None
        return [self._describe(self.key(name), sizes[name], name + SIDECAR in sizes)
                for name in sorted(sizes) if NAME.match(name)]

    def _describe(self, key: str, size: int, has_sidecar: bool) -> Copy:
        name = key.rsplit("/", 1)[-1]
        meta = self._head(key)["Metadata"]
        sessions = int(meta["sessions"]) if meta.get("sessions", "").isdigit() else None
        problem = _problem(size, meta, self._sidecar(key) if has_sidecar else None)
        return Copy("s3", name, self.url(key), sessions, size, problem)

    def _head(self, key: str) -> dict[str, Any]:
        try:
            return self.client.head_object(Bucket=self.settings.bucket, Key=key)
        except Exception as error:  # noqa: BLE001
            raise OffsiteError(f"cannot read {self.url(key)}: {reason(error)}") from None

    def _sidecar(self, key: str) -> str | None:
        """The hash in `key`'s checksum file, or None without one (an upload never read back)."""
        try:
            body = self.client.get_object(Bucket=self.settings.bucket, Key=key + SIDECAR)["Body"].read(1024)
        except Exception as error:  # noqa: BLE001
            if _missing(error):
                return None
            raise OffsiteError(f"cannot read {self.url(key + SIDECAR)}: {reason(error)}") from None
        return body.decode("ascii", "replace").split(" ", 1)[0].strip().lower()

    def upload(self, path: Path, facts: Facts) -> str:
        """Upload the backup at `path`, read it back, mark it verified, and return its URL.

        It is marked only once read back. Raises `OffsiteError` naming what failed: the upload, a size or hash that does
        not match, the mark.
        """
        from boto3.s3.transfer import TransferConfig

        key = self.key(facts.name)
        url = self.url(key)
        meta = {"sha256": facts.sha256, "bytes": str(facts.bytes), "sessions": str(facts.sessions)}
        try:
            self.client.upload_file(str(path), self.settings.bucket, key,
                                    ExtraArgs={"Metadata": meta, "ContentType": "application/zip"},
                                    Config=TransferConfig(multipart_threshold=PART, multipart_chunksize=PART,
                                                          max_concurrency=2))
        except Exception as error:  # noqa: BLE001
            raise OffsiteError(f"the upload of {facts.name} to {url} failed: {reason(error)}") from None
        head = self._head(key)
        if head["ContentLength"] != facts.bytes or head["Metadata"].get("sha256") != facts.sha256:
            raise OffsiteError(f"{url} holds {head['ContentLength']} bytes after the upload, not the {facts.bytes} of "
                               f"{facts.name} (or not its SHA-256)")
        size, digest = self._read_back(key, None)
        if (size, digest) != (facts.bytes, facts.sha256):
            raise OffsiteError(f"{url} read back as {size} bytes that do not match {facts.name}'s SHA-256")
        try:
            self.client.put_object(Bucket=self.settings.bucket, Key=key + SIDECAR, ContentType="text/plain",
                                   Body=f"{facts.sha256}  {facts.name}\n".encode())
        except Exception as error:  # noqa: BLE001
            raise OffsiteError(f"{url} was uploaded, but its checksum file could not be written: {reason(error)}") \
                from None
        return url

    def _read_back(self, key: str, into: Any) -> tuple[int, str]:
        """Download `key` streamed (into the open file `into`, if given): its size and SHA-256."""
        digest, size = hashlib.sha256(), 0
        try:
            body = self.client.get_object(Bucket=self.settings.bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if into is not None:
                    into.write(chunk)
        except OSError as error:
            if into is not None:  # the local file, not the store
                raise OffsiteError(f"cannot write the download of {self.url(key)}: {error.strerror or error}") \
                    from None
            raise OffsiteError(f"cannot read back {self.url(key)}: {reason(error)}") from None
        except Exception as error:  # noqa: BLE001
            raise OffsiteError(f"cannot read back {self.url(key)}: {reason(error)}") from None
        return size, digest.hexdigest()

    def fetch(self, key: str, into: Path) -> None:
        """Download the backup at `key` into the file `into`, if it is a verified copy.

        What arrives must have its size and SHA-256; otherwise raises `OffsiteError` saying why it is not restored from.
        """
        url = self.url(key)
        meta_head = self._head(key)
        problem = _problem(meta_head["ContentLength"], meta_head["Metadata"], self._sidecar(key))
        if problem:
            raise OffsiteError(f"{url} is not a verified backup ({problem}); it is not restored from")
        with into.open("wb") as handle:
            size, digest = self._read_back(key, handle)
        if (size, digest) != (meta_head["ContentLength"], meta_head["Metadata"]["sha256"]):
            raise OffsiteError(f"{url} arrived as {size} bytes that do not match its SHA-256 (damaged or changed in "
                               "the store); it is not restored from")

    def remove(self, names: list[str]) -> None:
        """Delete these backups and their checksum files, the checksum file first.

        A copy half removed thus reads as unverified, never as verified.
        """
        for name in names:
            key = self.key(name)
            try:
                self.client.delete_object(Bucket=self.settings.bucket, Key=key + SIDECAR)
                self.client.delete_object(Bucket=self.settings.bucket, Key=key)
            except Exception as error:  # noqa: BLE001
                raise OffsiteError(f"cannot remove {self.url(key)}: {reason(error)}") from None

    def key_of(self, url: str) -> str:
        """The key an `s3://bucket/key` URL names in this store's bucket; `OffsiteError` for another bucket."""
        bucket, _, key = url.removeprefix("s3://").partition("/")
        if bucket != self.settings.bucket or not key or key.endswith("/"):
            raise OffsiteError(f"{url} is not a backup in {self.settings.url()} (BACKUP_S3_URL)")
        return key


def _problem(size: int, meta: dict[str, str], sidecar: str | None) -> str | None:
    """Why an object is not a verified copy, or None when it is."""
    if size == 0:
        return "0 bytes"
    if sidecar is None:
        return f"no {SIDECAR} file: never read back after its upload"
    if meta.get("bytes") != str(size):
        return f"{size} bytes, its upload had {meta.get('bytes', 'an unknown number of')}: truncated or replaced"
    if meta.get("sha256") != sidecar:
        return f"its SHA-256 and its {SIDECAR} file differ"
    return None


def _missing(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


def reason(error: Exception) -> str:
    """Describe a botocore or connection error in one line, with no secret in it.

    botocore's messages carry the endpoint URL and error codes, never the keys.
    """
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
        code, message = response["Error"].get("Code", "?"), response["Error"].get("Message", "")
        return f"{code}" + (f": {message}" if message and message != code else "")
    return " ".join(str(error).split()) or type(error).__name__


# -------------------------------------------------------------------------------------------- one backup


@dataclass
class Outcome:
    """What one backup did: its file, its verified off-site copies, rotation's removals, and any error.

    The error is one line, set if the backup fell short anywhere.
    """

    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    due: int | None = None  # the scheduled time it was taken for (ms), None when a person asked
    path: Path | None = None
    written: Backup | None = None
    offsite: str | None = None  # the new backup's verified URL
    uploaded: list[str] = field(default_factory=list)  # every name verified off-site this time (older ones too)
    removed_local: list[Path] = field(default_factory=list)
    removed_offsite: list[str] = field(default_factory=list)
    error: str | None = None
    offsite_configured: bool = False
    seconds: float = 0.0  # how long it took

    @property
    def verified(self) -> bool:
        """The backup is in every configured place and its off-site copy was read back."""
        return self.written is not None and self.error is None and (self.offsite or not self.offsite_configured)

    def record(self) -> dict[str, Any]:
        """`lastBackup` in /health: when, where, verified, or the error."""
        where = [str(self.path)] if self.written is not None else []
        return {"at": _iso(self.at), "due": _iso(datetime.fromtimestamp(self.due / 1000, UTC)) if self.due else None,
                "where": [*where, *([self.offsite] if self.offsite else [])], "verified": bool(self.verified),
                "sessions": self.written.count if self.written is not None else None, "error": self.error}


def _iso(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def take(config: Config, storage: SessionStorage, on_step: OnStep | None = None, due: int | None = None) -> Outcome:
    """Take one backup into `BACKUP_DIR`, then off-site (see the module's docstring).

    It never raises for what the backup meets: the outcome says what failed. The local rotation runs even when the store
    failed.
    """
    started = time.monotonic()
    outcome = Outcome(due=due, offsite_configured=config.backup_s3 is not None)
    path = config.backup_dir / default_name()
    try:
        outcome.written = write_file(storage, path, on_step, every_owner(config.users_file))
    except (BackupError, StorageUnavailable) as error:
        outcome.error = f"no backup written: {error}"
        return outcome
    outcome.path = path
    if config.backup_s3 is not None:
        try:
            _offsite(Store(config.backup_s3), config, outcome)
        except OffsiteError as error:
            outcome.error = f"{path.name} is only in {config.backup_dir}, not off-site: {error} (the next backup " \
                            "uploads it again)"
    local = local_copies(config.backup_dir)
    newest = next((c.name for c in reversed(local) if c.verified), None)
    outcome.removed_local = rotate(config.backup_dir, config.backup_keep, spare=newest)
    outcome.seconds = time.monotonic() - started
    return outcome


def _offsite(store: Store, config: Config, outcome: Outcome) -> None:
    """Upload the local backups the store lacks verified, then rotate the store.

    Uploads go newest first, and only of backups the store's rotation would keep.
    """
    remote = {c.name: c for c in store.copies()}
    verified = {name for name, c in remote.items() if c.verified}
    local = [c.name for c in local_copies(config.backup_dir) if c.verified]
    pending = [name for name in local if name not in verified]
    window = set(sorted({*verified, *pending})[-config.backup_keep:])
    for name in sorted((n for n in pending if n in window), reverse=True):
        url = store.upload(config.backup_dir / name, Facts.of(config.backup_dir / name))
        verified.add(name)
        outcome.uploaded.append(name)
        if outcome.path is not None and name == outcome.path.name:
            outcome.offsite = url
    names = sorted({*remote, *verified})
    outcome.removed_offsite = doomed(names, verified, config.backup_keep)
    store.remove(outcome.removed_offsite)


def doomed(names: list[str], verified: set[str], keep: int) -> list[str]:
    """Which of `names` (oldest first) rotation removes: all but the newest `keep`, sparing the newest verified."""
    spare = max(verified & set(names), default=None)
    return [name for name in names[: max(0, len(names) - keep)] if name != spare]


def summary(outcome: Outcome) -> str:
    """The command's line (and the schedule's log line) for a backup that was written."""
    written, path = outcome.written, outcome.path
    assert written is not None and path is not None
    earlier = len(outcome.uploaded) - (1 if outcome.offsite else 0)
    parts = [f"Backed up {written.count} session(s) ({written.pinned} pinned, {_mb(written.bytes)}) to {path} "
             f"({_mb(path.stat().st_size)}) in {outcome.seconds:.1f} s"]
    if outcome.offsite:
        parts.append(f"; verified off-site at {outcome.offsite}"
                     + (f" (with {earlier} earlier backup(s))" if earlier > 0 else ""))
    if outcome.removed_local:
        parts.append(f"; removed {len(outcome.removed_local)} older backup(s)")
    if outcome.removed_offsite:
        parts.append(f"; removed {len(outcome.removed_offsite)} older backup(s) off-site")
    if written.skipped:
        parts.append(f"; skipped {written.skipped} record(s) that are not sessions")
    return "".join(parts) + "."


def _mb(count: int) -> str:
    return f"{count / 1_000_000:.1f} MB"


# --------------------------------------------------------------------------------------------- restoring


@contextlib.contextmanager
def fetched(config: Config, source: str | None, latest: bool) -> Iterator[tuple[Path, str]]:
    """Return the backup to restore as a local file, and how to name it.

    It is `source` as it is (a path), an `s3://` URL downloaded and checked into a temporary file removed afterwards, or
    with `latest` the newest verified backup of the store (of `BACKUP_DIR` when no store is configured). Raises
    `BackupError` (one line).
    """
    if latest == bool(source):
        raise BackupError("give either a backup (a path or an s3:// URL) or --latest")
    if source and not source.startswith("s3://"):
        yield Path(source), source
        return
    if config.backup_s3 is None:
        if source:
            raise BackupError(f"{source}: no store is configured (set BACKUP_S3_URL, and BACKUP_S3_ENDPOINT for a "
                              "store other than AWS)")
        found = [c for c in local_copies(config.backup_dir) if c.verified]
        if not found:
            raise BackupError(f"no backup in {config.backup_dir} (BACKUP_DIR)")
        yield Path(found[-1].location), found[-1].location
        return
    store = Store(config.backup_s3)
    if source:
        key = store.key_of(source)
    else:
        found = [c for c in store.copies() if c.verified]
        if not found:
            raise OffsiteError(f"no verified backup in {config.backup_s3.url()}")
        key = store.key(found[-1].name)
    with tempfile.TemporaryDirectory(prefix="storyart-restore-") as folder:
        path = Path(folder) / key.rsplit("/", 1)[-1]
        store.fetch(key, path)
        yield path, store.url(key)
