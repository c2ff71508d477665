"""Housekeeping commands, run as `flask --app app sessions <command>` in the service's folder (with its `.env`)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click
import redis
from flask import current_app
from flask.cli import AppGroup

import offsite
from backup import BackupError, Step, default_name, every_owner, restore, write_file
from config import Config, exits_on_config_error
from storage import INDEX_KEY, SessionStorage, StorageUnavailable
from users import Users

sessions = AppGroup("sessions", help="Housekeeping for the stored StoryArt sessions.")


@sessions.command("reindex")
def reindex() -> None:
    """Rebuild Redis's session index from the session keys (SCAN, in batches; safe while the service runs)."""
    storage = current_app.extensions["storyart"]
    try:
        adopted = storage.reindex()
    except redis.RedisError as error:
        raise click.ClickException(f"Redis could not be reached: {error}") from None
    if adopted is None:
        click.echo("No Redis is configured (REDIS_URL): the local store keeps its own index; nothing to do.")
        return
    click.echo(f"Indexed {adopted.sessions} session(s) in {INDEX_KEY} ({adopted.indexed} were missing).")


@sessions.command("backup")
@click.argument("path", required=False, type=click.Path(path_type=Path))
def backup(path: Path | None) -> None:
    """Write every live session (pinned ones included) to one ZIP file.

    It goes to PATH (a file, or a folder to put a new one in), else a new file in BACKUP_DIR, where only the newest
    BACKUP_KEEP backups are kept; then (with BACKUP_S3_URL) it and every earlier one the store lacks are uploaded, each
    read back before it counts.
    """
    config: Config = current_app.config["STORYART"]
    storage = _shared_storage()
    if path is None:
        with Progress("backed up") as progress:
            outcome = offsite.take(config, storage, progress)
        current_app.extensions["storyart-backups"].record(outcome)
        if outcome.written is not None:
            click.echo(offsite.summary(outcome))
        if outcome.error:
            raise click.ClickException(outcome.error)
        return
    target = path / default_name() if path.is_dir() else path
    started = time.monotonic()
    with Progress("backed up") as progress:
        try:
            written = write_file(storage, target, progress, every_owner(config.users_file))
        except (BackupError, StorageUnavailable) as error:
            raise click.ClickException(f"no backup written: {error}") from None
    click.echo(f"Backed up {written.count} session(s) ({written.pinned} pinned, {_size(written.bytes)}) to {target} "
               f"({_size(target.stat().st_size)}) in {time.monotonic() - started:.1f} s"
               + (f"; skipped {written.skipped} record(s) that are not sessions" if written.skipped else "") + ".")


@sessions.command("backups")
def list_backups() -> None:
    """List the backups in BACKUP_DIR and in the store (BACKUP_S3_URL).

    Each shows its name, sessions, bytes, age, and whether it is verified (a readable backup here; off-site, one read
    back after its upload, whole and unchanged). Exit status 1 when the store cannot be listed.
    """
    config: Config = current_app.config["STORYART"]
    copies = offsite.local_copies(config.backup_dir)
    failure = None
    if config.backup_s3 is not None:
        try:
            copies += offsite.Store(config.backup_s3).copies()
        except offsite.OffsiteError as error:
            failure = error
    click.echo(f"{'where':<6} {'name':<42} {'sessions':>8} {'bytes':>12} {'age':>6}  verified")
    for copy in copies:
        made = offsite.made_at(copy.name)
        age = _age(time.time() - made.timestamp()) if made else "?"
        sessions_held = "?" if copy.sessions is None else str(copy.sessions)
        click.echo(f"{copy.place:<6} {copy.name:<42} {sessions_held:>8} {copy.bytes:>12} {age:>6}  "
                   + ("yes" if copy.verified else f"NO: {copy.problem}"))
    where = f"{config.backup_dir}" + (f" and {config.backup_s3.url()}" if config.backup_s3 else "")
    click.echo(f"{len(copies)} backup(s) in {where}.")
    if failure is not None:
        raise click.ClickException(str(failure))


def _age(seconds: float) -> str:
    """`45 s`, `12 min`, `5 h`, `3 d`."""
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit}"
    return f"{max(0, seconds):.0f} s"


@sessions.command("restore")
@click.argument("source", required=False)
@click.option("--latest", is_flag=True, help="The newest verified backup in the store (BACKUP_S3_URL), or in "
                                             "BACKUP_DIR when no store is configured.")
def restore_backup(source: str | None, latest: bool) -> None:
    """Restore every session of the backup at SOURCE under its own timestamp.

    SOURCE is a file, or s3://bucket/prefix/NAME.zip in the store; each session is restored byte for byte, pinned if it
    was. A backup in the store is restored only if it is a verified copy and arrives with its SHA-256. Exit status 1
    when any session was rejected, 2 when SOURCE is not a (verified) backup.
    """
    config: Config = current_app.config["STORYART"]
    storage = _shared_storage()
    started = time.monotonic()
    try:
        with offsite.fetched(config, source, latest) as (path, shown), Progress("restored") as progress:
            try:
                report = restore(storage, path, config.max_content_length, progress)
            except BackupError as error:  # named as the user named it, not as the temporary download
                raise BackupError(str(error).replace(str(path), shown, 1)) from None
    except BackupError as error:
        click.echo(f"Error: {error}", err=True)
        raise click.exceptions.Exit(2) from None
    except StorageUnavailable as error:
        raise click.ClickException(f"nothing restored: {error}") from None
    for result in report.results:
        if result["status"] == "rejected":
            click.echo(f"  {result['timestamp']}  rejected: {result['error']}")
        else:
            pinned = ", pinned" if result["pinned"] else ""
            click.echo(f"  {result['timestamp']}  {result['status']} ({result['storage']}{pinned})")
    counts = report.counts()
    click.echo(f"Restored {counts['imported'] + counts['replaced']} of {len(report.results)} session(s) from {shown}: "
               f"{counts['imported']} imported, {counts['replaced']} replaced, {counts['rejected']} rejected, in "
               f"{time.monotonic() - started:.1f} s.")
    if counts["rejected"]:
        raise click.exceptions.Exit(1)


users = AppGroup("users", help="The people of a shared service: their tokens and quotas (USERS_FILE).")
# These commands need no app: they read USERS_FILE from the settings (the service's .env), so they also run as
# `python -c "from cli import users; users()"`, and a change reaches every running worker at its next request.


def _settings() -> Config:
    """The service's settings (its `.env`); a bad one stops with one line naming it (exit 2)."""
    with exits_on_config_error():
        return Config.from_env()


def _users(config: Config | None = None) -> Users:
    """The users file the settings name (from `.env` unless given); an unusable one stops with one line (exit 2)."""
    with exits_on_config_error():
        return Users.open((config or _settings()).users_file)


@contextlib.contextmanager
def _refusals() -> Iterator[None]:
    """An invalid name, a user that exists or does not: one line and exit 1; an unusable file: one line, exit 2."""
    with exits_on_config_error():
        try:
            yield
        except ValueError as error:
            raise click.ClickException(str(error)) from None


@users.command("add", with_appcontext=False)
@click.argument("name")
@click.option("--max-sessions", type=click.IntRange(min=0), help="Her cap on sessions (0: none; default: "
                                                                 "USER_MAX_SESSIONS).")
@click.option("--max-bytes", type=click.IntRange(min=0), help="Her cap on bytes (0: none; default: USER_MAX_BYTES).")
def add_user(name: str, max_sessions: int | None, max_bytes: int | None) -> None:
    """Create the user NAME and print her new token alone on the last line (shown this once, kept nowhere)."""
    people = _users()
    with _refusals():
        user, token = people.add(name, max_sessions=max_sessions, max_bytes=max_bytes)
    click.echo(f"Added {user.name}. The token, shown once (`users rotate {user.name}` makes a new one):")
    click.echo(token)


@users.command("list", with_appcontext=False)
def list_users() -> None:
    """List the users: name, whether her token is set, her quotas (never a token or its hash)."""
    config = _settings()
    people = _users(config)
    everyone = people.all()
    click.echo(f"{'name':<24} {'token':<8} {'max sessions':>16} {'max bytes':>20}")
    for user in everyone:
        token = "set" if user.has_token else "revoked" if user.revoked else "none"
        click.echo(f"{user.name:<24} {token:<8} {_quota(user.max_sessions, config.user_max_sessions):>16} "
                   f"{_quota(user.max_bytes, config.user_max_bytes):>20}")
    click.echo(f"{len(everyone)} user(s) in {people.path}; * = the setting (USER_MAX_SESSIONS, USER_MAX_BYTES).")


def _quota(own: int | None, setting: int) -> str:
    """`100`, `none` (no limit), or the setting's value marked with `*` when she has no override."""
    value = setting if own is None else own
    return ("none" if value == 0 else str(value)) + ("*" if own is None else "")


@users.command("revoke", with_appcontext=False)
@click.argument("name")
def revoke_user(name: str) -> None:
    """Make NAME's token stop working now, on every worker; she and her sessions stay (`rotate` gives a new one)."""
    with _refusals():
        _users().revoke(name)
    click.echo(f"Revoked the token of {name}.")


@users.command("rotate", with_appcontext=False)
@click.argument("name")
def rotate_user(name: str) -> None:
    """Give NAME a new token, printed alone on the last line; her old one stops working now."""
    with _refusals():
        token = _users().rotate(name)
    click.echo(f"New token for {name}, shown once (the old one no longer works):")
    click.echo(token)


@users.command("quota", with_appcontext=False)
@click.argument("name")
@click.option("--max-sessions", help="Her cap on sessions: a number (0: none), or `setting` for USER_MAX_SESSIONS.")
@click.option("--max-bytes", help="Her cap on bytes: a number (0: none), or `setting` for USER_MAX_BYTES.")
def set_user_quota(name: str, max_sessions: str | None, max_bytes: str | None) -> None:
    """Set NAME's quota overrides (an option left out keeps her current one)."""
    with _refusals():
        people = _users()
        user = people.by_name(name)
        if user is None:
            raise ValueError(f"no user named {name!r}")
        people.set_quota(name, max_sessions=_override(max_sessions, user.max_sessions, "--max-sessions"),
                         max_bytes=_override(max_bytes, user.max_bytes, "--max-bytes"))
    click.echo(f"Set the quotas of {user.name}.")


def _override(given: str | None, current: int | None, option: str) -> int | None:
    if given is None:
        return current
    if given.strip().lower() == "setting":
        return None
    if not given.strip().isdigit():
        raise ValueError(f"{option}: expected a whole number of 0 or more, or `setting`, got {given!r}")
    return int(given)


def _shared_storage() -> SessionStorage:
    """Return the storage, unless it lives only in this command's own process.

    That is LOCAL_STORE=memory without Redis: a backup of it would be empty and a restore into it would end with the
    command.
    """
    storage: SessionStorage = current_app.extensions["storyart"]
    if storage.in_this_process_only:
        raise click.ClickException("LOCAL_STORE=memory keeps sessions inside the running service's process, "
                                   "out of this command's reach: use GET /api/v1/backup, or the SQLite store")
    return storage


class Progress:
    """Show a backup's progress on stderr while it runs.

    `backed up 12/50 sessions, 36.0 MB, about 4 s left` on stderr, rewritten in place, at most 10 times a
    second; only when stderr is a terminal (a cron job's log gets the summary line alone).
    """

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.shown = sys.stderr.isatty()
        self.started = self.last = time.monotonic()
        self.width = 0

    def __enter__(self) -> Progress:
        return self

    def __call__(self, step: Step) -> None:
        now = time.monotonic()
        if not self.shown or (now - self.last < 0.1 and step.done < step.total):
            return
        self.last = now
        left = (now - self.started) / step.done * (step.total - step.done)
        line = f"{self.verb} {step.done}/{step.total} sessions, {_size(step.bytes)}, about {left:.0f} s left"
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)

    def __exit__(self, *exc: object) -> None:
        if self.shown and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()


def _size(count: int) -> str:
    return f"{count / 1_000_000:.1f} MB"
