"""Housekeeping commands, run as `flask --app app sessions <command>` in the service's folder (with its `.env`)."""

from __future__ import annotations

import click
import redis
from flask import current_app
from flask.cli import AppGroup

sessions = AppGroup("sessions", help="Housekeeping for the stored StoryArt sessions.")


@sessions.command("reindex")
def reindex() -> None:
    """Rebuild Redis's session index from the session keys (SCAN, in batches; safe while the service runs)."""
    storage = current_app.extensions["storyart"]
    if storage.redis is None:
        click.echo("No Redis is configured (REDIS_URL): the local store keeps its own index; nothing to do.")
        return
    try:
        indexed = storage.redis.reindex()
    except redis.RedisError as error:
        raise click.ClickException(f"Redis could not be reached: {error}") from None
    click.echo(f"Indexed {indexed} session(s) in storyart:sessions:index.")
